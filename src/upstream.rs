//! One HTTP/2 connection to a backend, and the calls made on it, with the `h2` crate directly.
//!
//! Why not hyper's client: per request it sends the request over a channel to the connection's
//! task, spawns a task that waits for the response (`SendWhen`) and, for any body, a task that
//! pipes it (`PipeToSendStream`), and hands the response back over a oneshot: three tasks and
//! their wake-ups per unary call, in a cold cache at one call at a time. Here a call's head and
//! a complete body (every unary call: the router has read its only message to route it) are
//! queued on the connection by the caller's own task, and the caller's task awaits the
//! response; only a body still streaming from the client (Solve, Session) gets a pipe task.
//! Measured in docs/performance.md.
//!
//! Resets pass through both ways: a reset of the request by the backend stops the pipe; a
//! client body that fails resets the backend's stream with the client's reason (`CANCEL` when
//! the client's connection went away). Dropping a [`ResponseFuture`] or a [`BackendBody`]
//! before the end resets the stream with `CANCEL` (h2 does when the last handle goes).

use std::future::{poll_fn, Future};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{ready, Context, Poll};

use bytes::Bytes;
use h2::client::SendRequest;
use h2::{Reason, SendStream};
use http::{Request, Response};
use http_body::{Body, Frame};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_util::sync::CancellationToken;

use crate::body::{BackendBody, RequestBody};

/// HTTP/2 settings of a backend connection.
#[derive(Debug, Clone, Copy)]
pub struct Settings {
    /// Initial stream window (bytes) the router grants the backend.
    pub stream_window: u32,
    /// Initial connection window (bytes).
    pub connection_window: u32,
    /// Largest frame payload (bytes) the router accepts.
    pub max_frame_size: u32,
    /// Bytes queued per stream before the pipe waits for the backend to read.
    pub max_send_buffer: usize,
    /// Largest header list (bytes) accepted in a response.
    pub max_header_list_size: u32,
}

/// A handle to one HTTP/2 connection to a backend; clones share the connection.
#[derive(Clone)]
pub struct Connection {
    send: SendRequest<Bytes>,
    /// Cancelled when the connection's task ends (closed by either side, or dropped).
    ended: CancellationToken,
    /// Tells this connection from others to the same backend.
    id: u64,
}

impl Connection {
    /// Runs the HTTP/2 handshake over `io`. Returns the handle and the future that drives the
    /// connection (spawn it; dropping it ends every stream on the connection).
    ///
    /// No PINGs are ever sent (no keepalive, no adaptive window): see `pool` for why.
    pub async fn handshake<T>(
        io: T,
        settings: Settings,
    ) -> Result<(Self, impl Future<Output = Result<(), h2::Error>> + Send), h2::Error>
    where
        T: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let (send, connection) = h2::client::Builder::new()
            .enable_push(false)
            .initial_window_size(settings.stream_window)
            .initial_connection_window_size(settings.connection_window)
            .max_frame_size(settings.max_frame_size)
            .max_send_buffer_size(settings.max_send_buffer)
            .max_header_list_size(settings.max_header_list_size)
            .handshake::<_, Bytes>(io)
            .await?;
        let ended = CancellationToken::new();
        let guard = ended.clone().drop_guard();
        let drive = async move {
            let _ended = guard;
            connection.await
        };
        static NEXT_ID: AtomicU64 = AtomicU64::new(0);
        let id = NEXT_ID.fetch_add(1, Ordering::Relaxed);
        Ok((Self { send, ended, id }, drive))
    }

    /// Whether `self` and `other` are handles to the same connection.
    pub fn same(&self, other: &Connection) -> bool {
        self.id == other.id
    }

    /// True once the connection has ended: a new one is needed.
    pub fn is_closed(&self) -> bool {
        self.ended.is_cancelled()
    }

    /// Waits until the connection can open a stream (the backend's concurrent stream limit).
    /// An error means the connection is closing or gone (GOAWAY, failure): connect anew.
    pub async fn ready(&mut self) -> Result<(), h2::Error> {
        poll_fn(|cx| self.send.poll_ready(cx)).await
    }

    /// Opens a stream with `request`'s head and sends its body: at once when it is complete,
    /// else by a pipe task on the current runtime. Call after [`Connection::ready`]. An error
    /// here means nothing was sent.
    pub fn send(&mut self, request: Request<RequestBody>) -> Result<ResponseFuture, h2::Error> {
        let (parts, mut body) = request.into_parts();
        let head = Request::from_parts(parts, ());
        let response = match body.take_complete() {
            Some(None) => self.send.send_request(head, true)?.0,
            Some(Some(data)) => {
                let (response, mut stream) = self.send.send_request(head, false)?;
                // Queued whole: h2 sends it as the backend's window allows.
                stream.send_data(data, true)?;
                response
            }
            None => {
                let (response, stream) = self.send.send_request(head, false)?;
                tokio::spawn(pipe(body, stream));
                response
            }
        };
        Ok(ResponseFuture(response))
    }
}

/// The backend's response head, then its body as a [`BackendBody`].
pub struct ResponseFuture(h2::client::ResponseFuture);

impl Future for ResponseFuture {
    type Output = Result<Response<BackendBody>, h2::Error>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let response = ready!(Pin::new(&mut self.0).poll(cx))?;
        Poll::Ready(Ok(response.map(BackendBody::new)))
    }
}

/// The HTTP/2 reason to reset a backend stream with when the client's body failed: the
/// client's own reset reason, else `CANCEL` (its connection went away).
fn reset_reason(error: &hyper::Error) -> Reason {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(error);
    while let Some(err) = source {
        if let Some(h2) = err.downcast_ref::<h2::Error>() {
            return h2.reason().unwrap_or(Reason::CANCEL);
        }
        source = err.source();
    }
    Reason::CANCEL
}

/// What the pipe waits for next.
enum Step {
    Frame(Option<Result<Frame<Bytes>, hyper::Error>>),
    /// The backend reset the stream: nothing more is wanted.
    Reset,
}

/// Copies a streaming client body to the backend, one frame at a time, waiting for send
/// capacity before reading the next (so at most about one frame is queued beyond the
/// backend's window).
async fn pipe(mut body: RequestBody, mut stream: SendStream<Bytes>) {
    loop {
        // Capacity first: the client's next frame is only read when the backend can take it.
        stream.reserve_capacity(1);
        let step = poll_fn(|cx| {
            if stream.poll_reset(cx).is_ready() {
                return Poll::Ready(Step::Reset);
            }
            if stream.capacity() == 0 {
                match stream.poll_capacity(cx) {
                    Poll::Ready(Some(Ok(_))) => {}
                    Poll::Ready(Some(Err(_)) | None) => return Poll::Ready(Step::Reset),
                    Poll::Pending => return Poll::Pending,
                }
                if stream.capacity() == 0 {
                    return Poll::Pending;
                }
            }
            Pin::new(&mut body).poll_frame(cx).map(Step::Frame)
        })
        .await;
        let result = match step {
            Step::Reset => return,
            Step::Frame(None) => {
                let _ = stream.send_data(Bytes::new(), true);
                return;
            }
            Step::Frame(Some(Ok(frame))) => match frame.into_data() {
                Ok(data) => {
                    let end = body.is_end_stream();
                    let sent = stream.send_data(data, end);
                    if end {
                        return;
                    }
                    sent
                }
                Err(frame) => match frame.into_trailers() {
                    Ok(trailers) => {
                        let _ = stream.send_trailers(trailers);
                        return;
                    }
                    Err(_) => Ok(()),
                },
            },
            Step::Frame(Some(Err(error))) => {
                let reason = reset_reason(&error);
                tracing::debug!(%error, ?reason, "client body failed; resetting the backend stream");
                stream.send_reset(reason);
                return;
            }
        };
        if result.is_err() {
            // The stream or connection is gone; the response side reports it.
            return;
        }
    }
}
