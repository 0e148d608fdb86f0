//! Holding a Session: the router answers the client's `Control/Session` itself and runs the
//! inner HTTP/2 connection toward the build client as its HTTP/2 client, as a daemon would.
//!
//! The client's side of the tunnel is an x/net `http2.Server` whose `ServeConn` gives up when
//! the client preface has not arrived within 10 s. The router sends its preface and SETTINGS the
//! moment the Session arrives, so a session can then wait for its backend for as long as the
//! `wait` future takes (the bind window today, a queue tomorrow) without the client noticing.

use std::future::Future;
use std::sync::Arc;

use bytes::Bytes;
use http::{HeaderValue, Request, Response};
use http_body::Frame;
use hyper::body::Incoming;
use prometheus::{IntCounter, IntGauge};
use tokio::sync::mpsc;
use tracing::{debug, field, info, Instrument};

use super::directory::{Directory, METHOD_HEADER};
use super::held::{Held, Open, Placed};
use super::relay;
use super::tunnel::OUT_CHANNEL;
use crate::body::ResponseBody;
use crate::grpc::{code, status_trailers};

/// Why a held session was not placed: the gRPC status its client gets.
#[derive(Debug, Clone)]
pub struct Refusal {
    pub code: u32,
    pub message: String,
}

/// Gauges of sessions by phase (held before placement, relayed to a backend, or passed
/// through to it without being held).
#[derive(Clone)]
pub struct Gauges {
    pub held: IntGauge,
    pub relayed: IntGauge,
    pub passed_through: IntGauge,
    /// Sessions placed after being held (`sessions_placed_total{path="relayed"}`).
    pub placed_relayed: IntCounter,
    /// Sessions placed within the pass-through window
    /// (`sessions_placed_total{path="passed_through"}`).
    pub placed_passed_through: IntCounter,
}

/// Counts one session in a phase while alive.
pub(crate) struct GaugeGuard(IntGauge);

impl GaugeGuard {
    pub(crate) fn new(gauge: &IntGauge) -> Self {
        gauge.inc();
        Self(gauge.clone())
    }
}

impl Drop for GaugeGuard {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// One `Control/Session` to serve.
pub struct SessionCall {
    /// `x-docker-expose-session-uuid`.
    pub uuid: String,
    /// The client's request: its head goes to the daemon unchanged, its body is the tunnel.
    pub request: Request<Incoming>,
    /// What was already read of the request's body ([`super::passthrough::first_look`]).
    pub read: Bytes,
    /// Largest outer message accepted.
    pub max_message: usize,
    pub gauges: Gauges,
    /// Where the session's inner client is listed while it lasts, so the router can call the
    /// client's services itself (the content key reads the Dockerfile through it).
    pub directory: Option<Arc<Directory>>,
}

/// Answers `call` at once and serves it in a task of its own: holds it until `wait` says where
/// it goes, then relays it there (see [`relay`]). `wait` may take as long as it likes: the
/// client's timers are kept satisfied meanwhile. If the client leaves first, `wait` is dropped.
pub fn serve<W>(call: SessionCall, wait: W, open: Open) -> Response<ResponseBody>
where
    W: Future<Output = Result<Placed, Refusal>> + Send + 'static,
{
    let (out_tx, out_rx) = mpsc::channel(OUT_CHANNEL);
    let span = tracing::info_span!("session", session = %call.uuid, backend = field::Empty);
    let (parts, body) = call.request.into_parts();
    tokio::spawn(
        run(
            call.uuid,
            parts,
            call.read,
            body,
            out_tx,
            call.max_message,
            call.gauges,
            call.directory,
            wait,
            open,
        )
        .instrument(span),
    );
    let mut response = Response::new(ResponseBody::channel(out_rx));
    response.headers_mut().insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static("application/grpc"),
    );
    response
}

#[allow(clippy::too_many_arguments)]
async fn run<W>(
    uuid: String,
    parts: http::request::Parts,
    read: Bytes,
    body: Incoming,
    out: mpsc::Sender<Frame<Bytes>>,
    max_message: usize,
    gauges: Gauges,
    directory: Option<Arc<Directory>>,
    wait: W,
    open: Open,
) where
    W: Future<Output = Result<Placed, Refusal>> + Send + 'static,
{
    let held_gauge = GaugeGuard::new(&gauges.held);
    let mut held = match Box::pin(Held::start(read, body, out.clone(), max_message)).await {
        Ok(held) => held,
        Err(error) => {
            info!(%error, "the client's side of the Session tunnel failed before it started");
            let _ = out
                .send(Frame::trailers(status_trailers(
                    code::UNAVAILABLE,
                    &format!("buildkit-router: cannot start the Session tunnel: {error}"),
                )))
                .await;
            return;
        }
    };
    if let (Some(directory), Some(send)) = (&directory, &held.send) {
        let methods = parts
            .headers
            .get_all(METHOD_HEADER)
            .iter()
            .filter_map(|v| v.to_str().ok().map(str::to_owned))
            .collect();
        held.listing = Some(directory.register(&uuid, send.clone(), methods));
    }
    debug!("holding the session; inner connection to the client is up");
    let placed = match held.until(wait).await {
        None => {
            info!("the client ended the session while it was held");
            Box::pin(held.finish(None)).await;
            return;
        }
        Some(Err(refusal)) => {
            Box::pin(held.finish(Some(status_trailers(refusal.code, &refusal.message)))).await;
            return;
        }
        Some(Ok(placed)) => placed,
    };
    drop(held_gauge);
    let _relayed = GaugeGuard::new(&gauges.relayed);
    gauges.placed_relayed.inc();
    tracing::Span::current().record("backend", &**placed.backend.identity());
    // Boxed, as are the start and the ends above: a task's future is as large as its largest
    // state, and a session held idle for as long as its build waits should not carry the
    // relay's or the handshake's (release build: the task was 17.6 KiB, now 3.7 KiB).
    Box::pin(relay::run(held, placed, parts, open, &uuid, max_message)).await;
}
