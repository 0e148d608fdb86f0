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
    crate::body::error_source::<h2::Error>(error)
        .and_then(h2::Error::reason)
        .unwrap_or(Reason::CANCEL)
}

/// Beyond the backend's window, h2 queues at most this much of one frame. Frames of a bulk
/// transfer (64 KiB Session messages, client DATA frames up to 256 KiB) go whole, as before;
/// a large routed first message (up to 16 MiB) goes in pieces as the window opens, so a frozen
/// backend cannot make the router hold it twice (see `crate::routing_buffer`).
const QUEUE_BEYOND_WINDOW: usize = 256 * 1024;

/// Hands `data` to h2 no faster than the backend's window opens (plus
/// [`QUEUE_BEYOND_WINDOW`] once). An error means the stream is gone; the response side
/// reports it.
async fn send_within_window(
    stream: &mut SendStream<Bytes>,
    mut data: Bytes,
    end: bool,
) -> Result<(), h2::Error> {
    let first = stream.capacity().max(QUEUE_BEYOND_WINDOW);
    if data.len() <= first {
        return stream.send_data(data, end);
    }
    stream.send_data(data.split_to(first), false)?;
    // The rest only as the window opens (h2's capacity excludes what it already holds).
    loop {
        stream.reserve_capacity(data.len());
        if !poll_fn(|cx| poll_window(stream, cx)).await {
            return Ok(());
        }
        let room = stream.capacity();
        if data.len() <= room {
            return stream.send_data(data, end);
        }
        stream.send_data(data.split_to(room), false)?;
    }
}

/// Ready(true) once the stream has send capacity (reserve it first), Ready(false) when the
/// backend reset the stream or the connection is gone.
fn poll_window(stream: &mut SendStream<Bytes>, cx: &mut Context<'_>) -> Poll<bool> {
    if stream.poll_reset(cx).is_ready() {
        return Poll::Ready(false);
    }
    // Capacity assigned may be taken at once by data h2 already holds: poll until it shows.
    while stream.capacity() == 0 {
        match ready!(stream.poll_capacity(cx)) {
            Some(Ok(_)) => {}
            Some(Err(_)) | None => return Poll::Ready(false),
        }
    }
    Poll::Ready(true)
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
            if !ready!(poll_window(&mut stream, cx)) {
                return Poll::Ready(Step::Reset);
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
                    let sent = send_within_window(&mut stream, data, end).await;
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

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;
    use tokio::sync::mpsc;

    const WAIT: std::time::Duration = std::time::Duration::from_secs(10);

    const SETTINGS: Settings = Settings {
        stream_window: 64 * 1024,
        connection_window: 64 * 1024,
        max_frame_size: 16 * 1024,
        max_send_buffer: 64 * 1024,
        max_header_list_size: 64 * 1024,
    };

    /// A client connection to an in-memory h2 server whose connection is returned.
    async fn connected() -> (
        Connection,
        h2::server::Connection<tokio::io::DuplexStream, Bytes>,
    ) {
        let (client_io, server_io) = tokio::io::duplex(1 << 20);
        let server = tokio::spawn(async move {
            h2::server::Builder::new()
                .initial_window_size(64 * 1024)
                .handshake::<_, Bytes>(server_io)
                .await
                .expect("server handshake")
        });
        let (connection, drive) = Connection::handshake(client_io, SETTINGS)
            .await
            .expect("client handshake");
        tokio::spawn(drive);
        (connection, server.await.expect("server task"))
    }

    fn request(body: RequestBody) -> Request<RequestBody> {
        let mut request = Request::new(body);
        *request.method_mut() = http::Method::POST;
        *request.uri_mut() =
            http::Uri::from_static("http://backend/moby.buildkit.v1.Control/ListWorkers");
        request
    }

    /// Reads a request body to its end on the server side.
    async fn read_all(body: &mut RecvStream) -> Vec<u8> {
        let mut all = Vec::new();
        while let Some(chunk) = body.data().await {
            let chunk = chunk.expect("request data");
            body.flow_control()
                .release_capacity(chunk.len())
                .expect("release");
            all.extend_from_slice(&chunk);
        }
        all
    }

    use h2::RecvStream;

    /// The server's first stream; the connection is driven meanwhile (window updates) by the
    /// task returned.
    async fn accept_driven(
        mut server: h2::server::Connection<tokio::io::DuplexStream, Bytes>,
    ) -> (
        Request<RecvStream>,
        h2::server::SendResponse<Bytes>,
        tokio::task::JoinHandle<Result<(), h2::Error>>,
    ) {
        let (request, respond) = server.accept().await.expect("a stream").expect("ok");
        let driver =
            tokio::spawn(async move { std::future::poll_fn(|cx| server.poll_closed(cx)).await });
        (request, respond, driver)
    }

    #[tokio::test]
    async fn a_complete_request_and_an_answer_larger_than_the_window_cross_whole() {
        let (mut connection, mut server) = connected().await;
        let answer = vec![7u8; 1024 * 1024];
        let sent = answer.clone();
        let serve = tokio::spawn(async move {
            let (request, mut respond) = server.accept().await.expect("a stream").expect("ok");
            let mut body = request.into_body();
            let got = read_all(&mut body).await;
            let mut stream = respond
                .send_response(Response::new(()), false)
                .expect("response head");
            stream.send_data(Bytes::from(sent), false).expect("data");
            let mut trailers = http::HeaderMap::new();
            trailers.insert("grpc-status", http::HeaderValue::from_static("0"));
            stream.send_trailers(trailers).expect("trailers");
            // Keep the connection driven until the client has read everything.
            let _ = std::future::poll_fn(|cx| server.poll_closed(cx)).await;
            got
        });
        connection.ready().await.expect("ready");
        let response = connection
            .send(request(RequestBody::full(Bytes::from_static(
                b"\0\0\0\0\0",
            ))))
            .expect("sent")
            .await
            .expect("answer");
        // Without the capacity given back per frame, the backend stalls at 64 KiB.
        let collected = tokio::time::timeout(WAIT, response.into_body().collect())
            .await
            .expect("the whole answer within the time limit")
            .expect("body");
        let trailers = collected.trailers().cloned().expect("trailers");
        assert_eq!(
            collected.to_bytes().len(),
            answer.len(),
            "a 1 MiB answer through a 64 KiB window"
        );
        assert_eq!(trailers["grpc-status"], "0");
        drop(connection);
        assert_eq!(serve.await.expect("server"), b"\0\0\0\0\0");
    }

    #[tokio::test]
    async fn a_streaming_body_is_piped_in_order_within_the_backends_window() {
        let (mut connection, server) = connected().await;
        let serve = tokio::spawn(async move {
            let (request, mut respond, driver) = accept_driven(server).await;
            let mut body = request.into_body();
            let got = read_all(&mut body).await;
            respond
                .send_response(Response::new(()), true)
                .expect("response");
            let _ = driver.await;
            got
        });
        let (tx, rx) = mpsc::channel(4);
        connection.ready().await.expect("ready");
        let response = connection
            .send(request(RequestBody::channel(rx)))
            .expect("sent");
        // 512 KiB in 32 KiB frames: eight times the backend's window.
        let mut want = Vec::new();
        for i in 0..16u8 {
            let frame = vec![i; 32 * 1024];
            want.extend_from_slice(&frame);
            tx.send(Frame::data(Bytes::from(frame)))
                .await
                .expect("piped");
        }
        drop(tx);
        tokio::time::timeout(WAIT, response)
            .await
            .expect("the whole body within the time limit")
            .expect("answer");
        drop(connection);
        assert_eq!(serve.await.expect("server"), want);
    }

    /// A large routed first message keeps its share of the routing buffer until the backend's
    /// window has taken it: a backend that stops reading cannot make the router hold the
    /// message beyond the budget. Every byte arrives, in order, once it reads.
    #[tokio::test]
    async fn a_large_first_message_keeps_its_routing_buffer_share_until_the_window_takes_it() {
        use crate::routing_buffer::RoutingBuffer;
        let buffer = RoutingBuffer::unmetered(64 << 20, WAIT, 64 * 1024);
        let (mut connection, server) = connected().await;
        let (stalled_tx, stalled_rx) = tokio::sync::oneshot::channel();
        let (go_tx, go_rx) = tokio::sync::oneshot::channel::<()>();
        let serve = tokio::spawn(async move {
            let (request, mut respond, driver) = accept_driven(server).await;
            let mut body = request.into_body();
            // Take (most of) the first window without giving capacity back: the backend stalls
            // (the connection window is 65 535 bytes).
            let mut got = Vec::new();
            while got.len() < 60 * 1024 {
                got.extend_from_slice(&body.data().await.expect("data").expect("ok"));
            }
            let _ = stalled_tx.send(());
            go_rx.await.expect("go");
            body.flow_control()
                .release_capacity(got.len())
                .expect("release");
            got.extend(read_all(&mut body).await);
            respond
                .send_response(Response::new(()), true)
                .expect("response");
            let _ = driver.await;
            got
        });
        let message: Vec<u8> = (0..4u32 << 20).map(|i| (i % 251) as u8).collect();
        let share = buffer.share(message.len()).await.expect("room");
        assert!(share.is_some());
        connection.ready().await.expect("ready");
        let response = connection
            .send(request(
                RequestBody::full(Bytes::from(message.clone())).holding(share),
            ))
            .expect("sent");
        stalled_rx.await.expect("the backend stalled");
        assert_eq!(
            buffer.in_use(),
            message.len(),
            "the share is kept while the backend's window holds the message back"
        );
        go_tx.send(()).expect("go");
        tokio::time::timeout(WAIT, response)
            .await
            .expect("the whole message within the time limit")
            .expect("answer");
        assert_eq!(buffer.in_use(), 0);
        drop(connection);
        assert_eq!(serve.await.expect("server"), message);
    }

    #[tokio::test]
    async fn a_reset_by_the_backend_stops_the_pipe_and_reaches_the_caller() {
        let (mut connection, mut server) = connected().await;
        let serve = tokio::spawn(async move {
            let (_request, mut respond) = server.accept().await.expect("a stream").expect("ok");
            respond.send_reset(Reason::CANCEL);
            let _ = std::future::poll_fn(|cx| server.poll_closed(cx)).await;
        });
        let (tx, rx) = mpsc::channel(1);
        connection.ready().await.expect("ready");
        let response = connection
            .send(request(RequestBody::channel(rx)))
            .expect("sent");
        let error = response.await.expect_err("reset");
        assert_eq!(error.reason(), Some(Reason::CANCEL));
        assert!(error.is_remote());
        // The pipe let go of the client's body: its sender sees the body closed.
        tokio::time::timeout(std::time::Duration::from_secs(5), tx.closed())
            .await
            .expect("the pipe stopped reading the client's body");
        drop(connection);
        serve.await.expect("server");
    }

    #[tokio::test]
    async fn a_connection_told_to_go_away_refuses_new_streams_and_ends() {
        let (mut connection, mut server) = connected().await;
        server.graceful_shutdown();
        // The client may close the connection before the server's last GOAWAY is written.
        let serve = tokio::spawn(async move { while let Some(Ok(_)) = server.accept().await {} });
        // The GOAWAY arrives; after it no new stream may open on this connection.
        let refused = tokio::time::timeout(std::time::Duration::from_secs(5), async {
            loop {
                if connection.ready().await.is_err() {
                    return;
                }
                tokio::task::yield_now().await;
            }
        })
        .await;
        assert!(refused.is_ok(), "ready() keeps succeeding after GOAWAY");
        serve.await.expect("server");
        tokio::time::timeout(std::time::Duration::from_secs(5), async {
            while !connection.is_closed() {
                tokio::task::yield_now().await;
            }
        })
        .await
        .expect("the connection is reported closed once its task ends");
    }
}
