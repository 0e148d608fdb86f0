//! HTTP bodies that cross the router.
//!
//! Requests: the client's own body, optionally with the bytes the router already read to route
//! it put back in front, or a body the router made (fan-out copies, health checks).
//! Responses: a backend's body passed through frame by frame, or one the router made (errors,
//! merged fan-out answers). A backend that dies mid-stream becomes a gRPC UNAVAILABLE trailer
//! naming it, while a reset by the backend (e.g. CANCEL) stays a reset.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use bytes::Bytes;
use http::HeaderMap;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use tokio::sync::mpsc;

use crate::grpc::{code, grpc_status_of, status_trailers};
use crate::routing_buffer::BufferShare;

/// The body of a request the router sends to a backend.
pub struct RequestBody {
    prefix: Option<Bytes>,
    /// The prefix's share of the routing buffer, kept until the frame after the prefix is
    /// asked for: the pipe asks only once the prefix went out within the backend's window.
    prefix_share: Option<BufferShare>,
    inner: Option<Incoming>,
    /// Frames the router produces as it goes (the Session relay's side of the tunnel).
    channel: Option<mpsc::Receiver<Frame<Bytes>>>,
    /// While set and pending, the end of `inner` (its END_STREAM, trailers or error) is held
    /// back: a Session passed through ends only after the Solves naming it (`session::held`).
    end_gate: Option<EndGate>,
    /// The end read from `inner`, waiting for `end_gate`.
    held_end: Option<Option<Result<Frame<Bytes>, hyper::Error>>>,
}

/// What the end of a request body waits for ([`RequestBody::ending_after`]).
pub type EndGate = Pin<Box<dyn Future<Output = ()> + Send>>;

impl RequestBody {
    /// The client's body, untouched.
    pub fn incoming(inner: Incoming) -> Self {
        Self {
            prefix: None,
            prefix_share: None,
            inner: Some(inner),
            channel: None,
            end_gate: None,
            held_end: None,
        }
    }

    /// The client's body with the bytes already read from it put back in front.
    pub fn prefixed(prefix: Bytes, inner: Incoming) -> Self {
        Self {
            prefix: (!prefix.is_empty()).then_some(prefix),
            prefix_share: None,
            inner: Some(inner),
            channel: None,
            end_gate: None,
            held_end: None,
        }
    }

    /// Holds back the end of the client's body (END_STREAM, trailers, or the error of a reset
    /// or lost stream) until `gate` resolves; frames before the end pass at once.
    pub fn ending_after(mut self, gate: EndGate) -> Self {
        self.end_gate = Some(gate);
        self
    }

    /// Keeps the routing-buffer share of the bytes put back in front until they are sent (see
    /// `upstream::pipe`): a body holding one is never taken whole by [`Self::take_complete`].
    pub fn holding(mut self, share: Option<BufferShare>) -> Self {
        self.prefix_share = share;
        self
    }

    /// A complete body the router made.
    pub fn full(data: Bytes) -> Self {
        Self {
            prefix: (!data.is_empty()).then_some(data),
            prefix_share: None,
            inner: None,
            channel: None,
            end_gate: None,
            held_end: None,
        }
    }

    /// The whole body, when nothing more will come from the client: `Some(None)` when empty,
    /// `Some(Some(bytes))` with all of it (taken); `None` while it is still streaming.
    pub fn take_complete(&mut self) -> Option<Option<Bytes>> {
        if self.channel.is_some()
            || self.prefix_share.is_some()
            || self.end_gate.is_some()
            || self.inner.as_ref().is_some_and(|i| !i.is_end_stream())
        {
            return None;
        }
        Some(self.prefix.take())
    }

    /// Frames produced by a task; the body ends when every sender is dropped.
    pub fn channel(rx: mpsc::Receiver<Frame<Bytes>>) -> Self {
        Self {
            prefix: None,
            prefix_share: None,
            inner: None,
            channel: Some(rx),
            end_gate: None,
            held_end: None,
        }
    }
}

impl Body for RequestBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        if let Some(prefix) = self.prefix.take() {
            return Poll::Ready(Some(Ok(Frame::data(prefix))));
        }
        // The prefix went out (see `prefix_share`): its share of the routing buffer is free.
        self.prefix_share = None;
        if let Some(rx) = self.channel.as_mut() {
            return rx.poll_recv(cx).map(|frame| frame.map(Ok));
        }
        let this = &mut *self;
        let Some(inner) = this.inner.as_mut() else {
            return Poll::Ready(None);
        };
        let Some(gate) = this.end_gate.as_mut() else {
            return Pin::new(inner).poll_frame(cx);
        };
        if this.held_end.is_none() {
            match ready!(Pin::new(inner).poll_frame(cx)) {
                Some(Ok(frame)) if frame.is_data() => return Poll::Ready(Some(Ok(frame))),
                end => this.held_end = Some(end),
            }
        }
        ready!(gate.as_mut().poll(cx));
        this.end_gate = None;
        Poll::Ready(this.held_end.take().flatten())
    }

    fn is_end_stream(&self) -> bool {
        self.prefix.is_none()
            && self.channel.is_none()
            && self.end_gate.is_none()
            && self.inner.as_ref().is_none_or(Body::is_end_stream)
    }

    fn size_hint(&self) -> SizeHint {
        if self.channel.is_some() {
            return SizeHint::default();
        }
        let prefix = self.prefix.as_ref().map_or(0, |p| p.len() as u64);
        let inner = self
            .inner
            .as_ref()
            .map_or_else(|| SizeHint::with_exact(0), Body::size_hint);
        let mut hint = SizeHint::new();
        // Upper first: SizeHint asserts lower <= upper at every step.
        if let Some(upper) = inner.upper() {
            hint.set_upper(upper + prefix);
        }
        hint.set_lower(inner.lower() + prefix);
        hint
    }
}

/// A backend's response body: DATA frames, then trailers. Flow-control capacity is given back
/// as each frame is taken, so the backend sends as fast as the client reads.
pub struct BackendBody {
    recv: h2::RecvStream,
    data_done: bool,
}

impl fmt::Debug for BackendBody {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BackendBody")
            .field("data_done", &self.data_done)
            .finish()
    }
}

impl BackendBody {
    pub(crate) fn new(recv: h2::RecvStream) -> Self {
        Self {
            recv,
            data_done: false,
        }
    }
}

impl Body for BackendBody {
    type Data = Bytes;
    type Error = h2::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, h2::Error>>> {
        let this = &mut *self;
        if !this.data_done {
            match ready!(this.recv.poll_data(cx)) {
                Some(Ok(data)) => {
                    // Fails only for a stream already closed; the next poll reports that.
                    let _ = this.recv.flow_control().release_capacity(data.len());
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
                Some(Err(error)) => return Poll::Ready(Some(Err(error))),
                None => this.data_done = true,
            }
        }
        match ready!(this.recv.poll_trailers(cx)) {
            Ok(Some(trailers)) => Poll::Ready(Some(Ok(Frame::trailers(trailers)))),
            Ok(None) => Poll::Ready(None),
            Err(error) => Poll::Ready(Some(Err(error))),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.recv.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::default()
    }
}

/// The first error of type `E` in `error`'s source chain (an h2 reset inside a hyper error, an
/// I/O error inside a connection error), if any.
pub fn error_source<'a, E: std::error::Error + 'static>(
    error: &'a (dyn std::error::Error + 'static),
) -> Option<&'a E> {
    let mut source = Some(error);
    while let Some(err) = source {
        if let Some(found) = err.downcast_ref::<E>() {
            return Some(found);
        }
        source = err.source();
    }
    None
}

/// How a call ended, as seen by the router.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CallEnd {
    /// The response finished with this `grpc-status` (0 when trailers carried none).
    Status(u32),
    /// The stream was reset or dropped before it finished (cancel by either side).
    Cancelled,
}

/// Runs once when a response body ends or is dropped.
pub struct EndHook(Option<Box<dyn FnOnce(CallEnd) + Send + Sync>>);

impl EndHook {
    pub fn new(hook: impl FnOnce(CallEnd) + Send + Sync + 'static) -> Self {
        Self(Some(Box::new(hook)))
    }

    /// Runs `first`, then `second`.
    pub fn chain(mut first: EndHook, mut second: EndHook) -> Self {
        let (a, b) = (first.0.take(), second.0.take());
        Self::new(move |end| {
            if let Some(a) = a {
                a(end);
            }
            if let Some(b) = b {
                b(end);
            }
        })
    }

    fn fire(&mut self, end: CallEnd) {
        if let Some(hook) = self.0.take() {
            hook(end);
        }
    }
}

impl Drop for EndHook {
    fn drop(&mut self) {
        self.fire(CallEnd::Cancelled);
    }
}

impl fmt::Debug for EndHook {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("EndHook")
    }
}

/// Told when a backend's connection fails under a stream, so the backend takes no new builds
/// until a health check passes again (passive ejection).
pub trait ConnectionHealth: Send + Sync {
    fn connection_failed(&self, reason: &str);

    /// Why the backend was declared dead (it stopped answering health checks), if it was: the
    /// router then ended its connections on purpose, and this is what clients are told.
    fn dead_reason(&self) -> Option<std::sync::Arc<str>> {
        None
    }
}

/// Names the backend and build in the error a client gets when a backend dies mid-stream.
#[derive(Clone)]
pub struct StreamContext {
    pub backend: std::sync::Arc<str>,
    pub build_ref: Option<std::sync::Arc<str>>,
    /// What `build_ref` names: a build's ref, or a Session's uuid.
    pub subject: Subject,
    pub health: Option<std::sync::Arc<dyn ConnectionHealth>>,
}

/// What a stream's [`StreamContext::build_ref`] names, in its errors and logs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Subject {
    /// A build's ref (Solve, Status, LLBBridge...).
    Build,
    /// A `Control/Session`'s uuid.
    Session,
}

impl fmt::Display for Subject {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Subject::Build => "build",
            Subject::Session => "session",
        })
    }
}

impl fmt::Debug for StreamContext {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StreamContext")
            .field("backend", &self.backend)
            .field("build_ref", &self.build_ref)
            .finish()
    }
}

impl StreamContext {
    /// The `build_ref` log field: the ref, or `session:<uuid>` as the Session's own span has it.
    fn logged_ref(&self) -> impl fmt::Display + '_ {
        struct Logged<'a>(&'a StreamContext);
        impl fmt::Display for Logged<'_> {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                match (self.0.subject, self.0.build_ref.as_deref()) {
                    (_, None) => f.write_str("-"),
                    (Subject::Build, Some(r)) => f.write_str(r),
                    (Subject::Session, Some(r)) => write!(f, "session:{r}"),
                }
            }
        }
        Logged(self)
    }

    fn lost_message(&self, error: &h2::Error) -> String {
        if let Some(reason) = self.health.as_ref().and_then(|h| h.dead_reason()) {
            return match &self.build_ref {
                Some(r) => format!(
                    "buildkit-router: buildkitd backend {} is unavailable for {} {r}: {reason}",
                    self.backend, self.subject
                ),
                None => format!(
                    "buildkit-router: buildkitd backend {} is unavailable: {reason}",
                    self.backend
                ),
            };
        }
        match &self.build_ref {
            Some(r) => format!(
                "buildkit-router: lost buildkitd backend {} during {} {r}: {error}",
                self.backend, self.subject
            ),
            None => format!(
                "buildkit-router: lost buildkitd backend {}: {error}",
                self.backend
            ),
        }
    }
}

enum Source {
    Backend {
        inner: BackendBody,
        context: StreamContext,
    },
    Local {
        data: Option<Bytes>,
        trailers: Option<HeaderMap>,
    },
    Channel(mpsc::Receiver<Frame<Bytes>>),
    Done,
}

/// The body of a response the router sends to a client.
pub struct ResponseBody {
    source: Source,
    hook: Option<EndHook>,
    /// How the call counts if the body is dropped unfinished: a Trailers-Only answer already
    /// carried its status in the headers, anything else was cut short.
    end_if_dropped: CallEnd,
}

impl Drop for ResponseBody {
    fn drop(&mut self) {
        let end = self.end_if_dropped;
        if let Some(mut hook) = self.hook.take() {
            hook.fire(end);
        }
    }
}

impl fmt::Debug for ResponseBody {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ResponseBody")
    }
}

impl ResponseBody {
    /// A backend's response body, passed through.
    /// `header_status` is the grpc-status of a Trailers-Only answer.
    pub fn backend(inner: BackendBody, context: StreamContext, header_status: Option<u32>) -> Self {
        Self {
            source: Source::Backend { inner, context },
            hook: None,
            end_if_dropped: header_status.map_or(CallEnd::Cancelled, CallEnd::Status),
        }
    }

    /// Messages (already framed) followed by trailers.
    pub fn local(data: Option<Bytes>, trailers: Option<HeaderMap>) -> Self {
        Self {
            source: Source::Local { data, trailers },
            hook: None,
            end_if_dropped: CallEnd::Cancelled,
        }
    }

    /// An empty body: the response headers said everything (Trailers-Only with `status`).
    pub fn empty(status: u32) -> Self {
        Self {
            source: Source::Done,
            hook: None,
            end_if_dropped: CallEnd::Status(status),
        }
    }

    /// Frames produced by a task (merged fan-out streams). The last frame should be trailers.
    pub fn channel(rx: mpsc::Receiver<Frame<Bytes>>) -> Self {
        Self {
            source: Source::Channel(rx),
            hook: None,
            end_if_dropped: CallEnd::Cancelled,
        }
    }

    /// Runs `hook` (after any hook already set) when the body ends or is dropped.
    pub fn with_hook(mut self, hook: EndHook) -> Self {
        self.hook = Some(match self.hook.take() {
            Some(previous) => EndHook::chain(previous, hook),
            None => hook,
        });
        self
    }

    fn finish(&mut self, end: CallEnd) {
        self.source = Source::Done;
        if let Some(mut hook) = self.hook.take() {
            hook.fire(end);
        }
    }
}

/// Whether a stream error is the peer resetting the stream (cancel), as opposed to the
/// connection failing.
pub fn is_stream_reset(error: &h2::Error) -> bool {
    error.is_reset() && error.is_remote()
}

impl Body for ResponseBody {
    type Data = Bytes;
    type Error = h2::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, h2::Error>>> {
        let this = &mut *self;
        match &mut this.source {
            Source::Done => Poll::Ready(None),
            Source::Local { data, trailers } => {
                if let Some(data) = data.take() {
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
                let trailers = trailers.take();
                let code = trailers.as_ref().and_then(grpc_status_of).unwrap_or(0);
                this.finish(CallEnd::Status(code));
                Poll::Ready(trailers.map(|t| Ok(Frame::trailers(t))))
            }
            Source::Channel(rx) => match ready!(rx.poll_recv(cx)) {
                Some(frame) => {
                    if let Some(trailers) = frame.trailers_ref() {
                        let code = grpc_status_of(trailers).unwrap_or(0);
                        this.finish(CallEnd::Status(code));
                    }
                    Poll::Ready(Some(Ok(frame)))
                }
                None => {
                    this.finish(CallEnd::Status(0));
                    Poll::Ready(None)
                }
            },
            Source::Backend { inner, context } => match ready!(Pin::new(inner).poll_frame(cx)) {
                Some(Ok(frame)) => {
                    if let Some(trailers) = frame.trailers_ref() {
                        let code = grpc_status_of(trailers).unwrap_or(0);
                        this.finish(CallEnd::Status(code));
                    }
                    Poll::Ready(Some(Ok(frame)))
                }
                Some(Err(error)) if is_stream_reset(&error) => {
                    // The backend reset the stream: hand the reset on to the client.
                    tracing::debug!(backend = %context.backend, build_ref = %context.logged_ref(), %error, "backend reset the stream");
                    this.finish(CallEnd::Cancelled);
                    Poll::Ready(Some(Err(error)))
                }
                Some(Err(error)) => {
                    let message = context.lost_message(&error);
                    let build_ref = context.logged_ref().to_string();
                    match context.health.as_ref().and_then(|h| h.dead_reason()) {
                        // The router ended the connection itself: the error (a broken pipe)
                        // says nothing about the backend; the reason does.
                        Some(reason) => {
                            tracing::warn!(backend = %context.backend, %build_ref, %reason, "stream ended: the backend was declared dead")
                        }
                        None => {
                            if let Some(health) = &context.health {
                                health.connection_failed(&error.to_string());
                            }
                            tracing::warn!(backend = %context.backend, %build_ref, %error, "backend connection failed mid-stream");
                        }
                    }
                    this.finish(CallEnd::Status(code::UNAVAILABLE));
                    Poll::Ready(Some(Ok(Frame::trailers(status_trailers(
                        code::UNAVAILABLE,
                        &message,
                    )))))
                }
                None => {
                    let end = match this.end_if_dropped {
                        CallEnd::Status(code) => CallEnd::Status(code),
                        CallEnd::Cancelled => CallEnd::Status(0),
                    };
                    this.finish(end);
                    Poll::Ready(None)
                }
            },
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.source {
            Source::Done => true,
            Source::Backend { inner, .. } => inner.is_end_stream(),
            Source::Local { data, trailers } => data.is_none() && trailers.is_none(),
            Source::Channel(_) => false,
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.source {
            Source::Backend { inner, .. } => inner.size_hint(),
            _ => SizeHint::default(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;
    use std::time::Duration;
    use tokio::sync::oneshot;

    /// A request body as the listener gets it (`Incoming` exists only inside hyper), and the
    /// client's side of its stream. The exchange runs over an in-memory pipe.
    async fn incoming() -> (Incoming, h2::SendStream<Bytes>) {
        let (client_io, server_io) = tokio::io::duplex(1 << 20);
        let (bodies_tx, mut bodies) = mpsc::channel(1);
        let service = hyper::service::service_fn(move |request: http::Request<Incoming>| {
            let bodies_tx = bodies_tx.clone();
            async move {
                let _ = bodies_tx.send(request.into_body()).await;
                // No answer: an answer that ended would end the request's stream too.
                std::future::pending::<Result<http::Response<String>, hyper::Error>>().await
            }
        });
        tokio::spawn(
            hyper::server::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
                .serve_connection(hyper_util::rt::TokioIo::new(server_io), service),
        );
        let (client, connection) = h2::client::handshake(client_io).await.expect("handshake");
        tokio::spawn(connection);
        let mut client = client.ready().await.expect("ready");
        let request = http::Request::post("http://router/moby.buildkit.v1.Control/Session")
            .body(())
            .expect("request");
        let (answer, send) = client.send_request(request, false).expect("send");
        // The connection and the call (dropping its answer resets it) outlive this function.
        tokio::spawn(async move {
            let _keep = (client, answer);
            std::future::pending::<()>().await
        });
        (bodies.recv().await.expect("a request"), send)
    }

    /// Reads `body` to its end in a task, reporting each frame (`Err` for an error) as it comes.
    fn read_all(mut body: RequestBody) -> mpsc::UnboundedReceiver<Result<Frame<Bytes>, String>> {
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            while let Some(frame) = body.frame().await {
                let failed = frame.is_err();
                let _ = tx.send(frame.map_err(|e| e.to_string()));
                if failed {
                    break;
                }
            }
        });
        rx
    }

    fn closed_gate() -> (oneshot::Sender<()>, EndGate) {
        let (open, opened) = oneshot::channel::<()>();
        (
            open,
            Box::pin(async move {
                let _ = opened.await;
            }),
        )
    }

    /// The end of a body (its trailers and END_STREAM, or the error of a reset) waits for its
    /// gate; data before the end flows at once. Paused time: a sleep lets every task run until
    /// nothing can move.
    #[tokio::test(start_paused = true)]
    async fn a_body_ending_after_a_gate_holds_only_its_end() {
        let (inner, mut send) = incoming().await;
        let (open, gate) = closed_gate();
        let mut body = RequestBody::incoming(inner).ending_after(gate);
        assert!(body.take_complete().is_none());
        assert!(!body.is_end_stream());
        let mut frames = read_all(body);
        send.send_data(Bytes::from_static(b"before"), false)
            .expect("send");
        let first = frames.recv().await.expect("a frame").expect("data");
        assert_eq!(
            first.into_data().expect("data"),
            Bytes::from_static(b"before")
        );
        send.send_data(Bytes::from_static(b"more"), false)
            .expect("send");
        let more = frames.recv().await.expect("a frame").expect("data");
        assert_eq!(more.into_data().expect("data"), Bytes::from_static(b"more"));
        let mut trailers = HeaderMap::new();
        trailers.insert("grpc-status", "0".parse().expect("value"));
        send.send_trailers(trailers).expect("trailers");
        tokio::time::sleep(Duration::from_secs(60)).await;
        assert!(frames.try_recv().is_err(), "the end waits for the gate");
        open.send(()).expect("open");
        let end = frames.recv().await.expect("a frame").expect("trailers");
        assert_eq!(end.into_trailers().expect("trailers")["grpc-status"], "0");
        assert!(frames.recv().await.is_none(), "then the body ends");

        // A reset is an end too.
        let (inner, mut send) = incoming().await;
        let (open, gate) = closed_gate();
        let mut frames = read_all(RequestBody::incoming(inner).ending_after(gate));
        send.send_data(Bytes::from_static(b"before"), false)
            .expect("send");
        assert!(frames.recv().await.expect("a frame").is_ok());
        send.send_reset(h2::Reason::CANCEL);
        tokio::time::sleep(Duration::from_secs(60)).await;
        assert!(frames.try_recv().is_err(), "the reset waits for the gate");
        open.send(()).expect("open");
        let reset = frames.recv().await.expect("a frame");
        assert!(reset.is_err(), "{reset:?}");
        assert!(frames.recv().await.is_none());
    }
}
