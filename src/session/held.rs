//! The client's side of a held Session: the router's inner HTTP/2 client connection to the
//! build client ([`Held`]), and what a held session needs to be relayed once placed ([`Placed`],
//! [`Open`]). [`super::hold`] starts and holds it; [`super::relay`] relays it to a daemon.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Response};
use http_body::Frame;
use hyper::body::Incoming;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tracing::{debug, Instrument};

use super::directory::Registration;
use super::inner;
use super::tunnel::{ReadEnd, TunnelHandle, TunnelIo};
use crate::body::{BackendBody, RequestBody};
use crate::grpc::{code, status_trailers};
use crate::pool::Backend;

/// How long the router gives the client's side of the inner connection to take its GOAWAY and
/// close, when the router ends it, before it sends the outer trailers anyway.
const CLIENT_CLOSE_GRACE: Duration = Duration::from_secs(5);

/// When the client ends its Session (half-close or reset) while a Solve naming it still runs
/// in the router, how long that end is held back, waiting for the Solve to end, before it
/// reaches the daemon (through the relay, or passed through).
///
/// buildctl's Ctrl-C resets the Solve (grpc-go queues the RST_STREAM CANCEL before `Invoke`
/// returns) and then half-closes the Session (the Solve goroutine's deferred `s.Close()`): on
/// the wire the cancel comes first, and a daemon reached directly sees it first and records the
/// build as cancelled. The router handles the two streams in separate tasks, so without this
/// wait the session's end could reach the daemon first (its inner streams reset, the inner
/// connection closed): mid-upload, the daemon would then fail the build on its lost session
/// (`diffcopy ...`) before the cancel arrived. A Solve's reset is queued on the backend
/// connection when the router drops it, which is when it gives up its pin on the session. A
/// client that ends the Session of a Solve it keeps running (no BuildKit client does) only
/// delays the session's end by this much.
pub(crate) const SOLVE_END_GRACE: Duration = Duration::from_secs(1);

/// Where a session goes, and what keeps its routing state alive while it is relayed or passed
/// through.
pub struct Placed {
    pub backend: Arc<Backend>,
    /// The registry pin of the session, dropped once both of its directions have ended. Also
    /// tells when the Solves naming the session have ended ([`solves_done`]).
    pub keep: Option<crate::registry::Pin>,
}

/// The message of the UNAVAILABLE a session's client gets when its backend cannot take it.
pub(crate) fn unavailable_for_session(
    backend_label: &str,
    uuid: &str,
    why: impl std::fmt::Display,
) -> String {
    format!("buildkit-router: buildkitd backend {backend_label} is unavailable for session {uuid}: {why}")
}

/// What the end of the client's side of a placed session waits for: the Solves naming it to
/// end, at most [`SOLVE_END_GRACE`] from the moment the end is seen. Holds `keep` until then,
/// so the session's own pin still counts however early its other direction ended (a client
/// that resets its Session drops the answer first).
pub(crate) fn solves_done(keep: Arc<crate::registry::Pin>) -> GateFuture {
    Box::pin(async move {
        if !keep.sole(SOLVE_END_GRACE).await {
            debug!("a Solve naming the session still runs after the client ended it");
        }
        drop(keep);
    })
}

/// Opens the Session on a backend: sends the client's request head with `body` as the outgoing
/// tunnel, and returns the backend's response head (or why it could not, for the client).
pub type OpenFuture = Pin<Box<dyn Future<Output = Result<Response<BackendBody>, String>> + Send>>;
pub type Open =
    Box<dyn FnOnce(Arc<Backend>, http::request::Parts, RequestBody) -> OpenFuture + Send>;

/// What the end of the client's outer Session stream waits for, when set (see
/// [`SOLVE_END_GRACE`]): set by [`Held::hold_end_until`] once the session is placed, read by
/// the client's body ([`EndGate::gate`]). Unset, the end passes at once.
#[derive(Clone, Default)]
struct EndGate(Arc<std::sync::Mutex<Option<GateFuture>>>);

pub(crate) type GateFuture = crate::body::EndGate;

impl EndGate {
    /// The gate of the client's body (`RequestBody::ending_after`): whatever this slot holds
    /// when the end arrives, or nothing.
    fn gate(&self) -> GateFuture {
        let slot = self.0.clone();
        Box::pin(std::future::poll_fn(move |cx| {
            let mut gate = slot.lock().expect("end gate lock");
            if let Some(wait) = gate.as_mut() {
                std::task::ready!(wait.as_mut().poll(cx));
                *gate = None;
            }
            std::task::Poll::Ready(())
        }))
    }
}

/// The client's side of a held session: the router's inner HTTP/2 client connection to the
/// build client, running in its own task.
pub(crate) struct Held {
    /// Opens inner streams toward the client. Dropping every clone lets the connection close
    /// with a GOAWAY once its streams are done.
    pub(crate) send: Option<h2::client::SendRequest<Bytes>>,
    /// The session's entry in the directory of inner clients (dropped with `send`).
    pub(crate) listing: Option<Registration>,
    conn: JoinHandle<Result<(), h2::Error>>,
    conn_end: Option<Result<(), String>>,
    handle: TunnelHandle<RequestBody>,
    /// What the client's end of the outer stream waits for once set.
    end_gate: EndGate,
    /// The outer response: the router's trailers go out on it at the end.
    out: mpsc::Sender<Frame<Bytes>>,
}

impl Drop for Held {
    fn drop(&mut self) {
        self.conn.abort();
    }
}

impl Held {
    /// Starts the inner connection: the HTTP/2 preface and SETTINGS go out right away. `read`
    /// is what was already read of the client's `body`.
    pub(crate) async fn start(
        read: Bytes,
        body: Incoming,
        out: mpsc::Sender<Frame<Bytes>>,
        max_message: usize,
    ) -> Result<Held, h2::Error> {
        let end_gate = EndGate::default();
        let body = RequestBody::prefixed(read, body).ending_after(end_gate.gate());
        let (io, handle) = TunnelIo::new(body, out.clone(), max_message);
        let (send, conn) = inner::client_builder().handshake(io).await?;
        let conn = tokio::spawn(conn.in_current_span());
        Ok(Held {
            send: Some(send),
            listing: None,
            conn,
            conn_end: None,
            handle,
            end_gate,
            out,
        })
    }

    /// From now on, when the client ends its outer stream (half-close, reset, loss), that end
    /// is passed on only once `gate` resolves.
    pub(crate) fn hold_end_until(&self, gate: GateFuture) {
        *self.end_gate.0.lock().expect("end gate lock") = Some(gate);
    }

    /// Runs `fut` while the client's side lasts. `None`: the client's side ended first (the
    /// client half-closed, reset or vanished); `fut` is dropped.
    pub(crate) async fn until<F: Future>(&mut self, fut: F) -> Option<F::Output> {
        if self.conn_end.is_some() {
            return None;
        }
        tokio::select! {
            out = fut => Some(out),
            end = &mut self.conn => {
                self.record_end(end);
                None
            }
        }
    }

    /// Waits for the client's side to end.
    pub(crate) async fn ended(&mut self) {
        if self.conn_end.is_none() {
            let end = (&mut self.conn).await;
            self.record_end(end);
        }
    }

    pub(crate) fn is_ended(&self) -> bool {
        self.conn_end.is_some()
    }

    fn record_end(&mut self, end: Result<Result<(), h2::Error>, tokio::task::JoinError>) {
        let end = match end {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(e.to_string()),
            Err(e) => Err(e.to_string()),
        };
        debug!(?end, read = ?self.handle.end(), "the client's side of the tunnel ended");
        self.conn_end = Some(end);
    }

    /// True when the client is gone: its outer stream was reset or lost, or nobody reads our
    /// answer any more. (A half-close is not gone: the client waits for our trailers.)
    pub(crate) fn client_gone(&self) -> bool {
        self.out.is_closed() || matches!(self.handle.end(), ReadEnd::Reset(_) | ReadEnd::Lost(_))
    }

    /// The status for a client whose Session stream was not a Session stream.
    pub(crate) fn malformed_status(&self) -> Option<HeaderMap> {
        match self.handle.end() {
            ReadEnd::Malformed(error) => Some(status_trailers(
                code::INVALID_ARGUMENT,
                &format!("buildkit-router: malformed Control/Session stream: {error}"),
            )),
            _ => None,
        }
    }

    /// Ends the session toward the client: closes the inner connection (GOAWAY once its streams
    /// are done), then ends the outer stream with `trailers` (OK when `None`).
    pub(crate) async fn finish(mut self, trailers: Option<HeaderMap>) {
        self.send = None;
        self.listing = None;
        if !self.is_ended()
            && tokio::time::timeout(CLIENT_CLOSE_GRACE, self.ended())
                .await
                .is_err()
        {
            debug!("the client's side of the tunnel did not close in time; ending it");
            self.conn.abort();
        }
        if self.client_gone() {
            return;
        }
        let trailers = trailers
            .or_else(|| self.malformed_status())
            .unwrap_or_else(|| status_trailers(code::OK, ""));
        let _ = tokio::time::timeout(CLIENT_CLOSE_GRACE, self.out.send(Frame::trailers(trailers)))
            .await;
    }
}
