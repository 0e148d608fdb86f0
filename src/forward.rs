//! Streaming one HTTP/2 request and its response, trailers and resets to a backend; reading the
//! first message of a request to route it; fanning a call out to every backend and merging.

use std::ops::Range;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use http::request::Parts;
use http::uri::PathAndQuery;
use http::{HeaderMap, HeaderValue, Request, Response, Version};
use http_body::Body;
use http_body_util::BodyExt;
use hyper::body::{Frame, Incoming};
use tokio::sync::mpsc;

use crate::body::BackendBody;
use crate::body::{RequestBody, ResponseBody, StreamContext};
pub use crate::grpc::code;
use crate::grpc::{grpc_message_of, grpc_status_of, status_trailers};
use crate::pool::{Backend, ConnectError};
use crate::routing_buffer::{BufferFull, BufferShare, RoutingBuffer};
use crate::wire::{self, MessageSplitter, WireError, GRPC_PREFIX_LEN};

/// Why a call could not be handed to a backend.
#[derive(Debug, thiserror::Error)]
pub enum ForwardError {
    /// Nothing reached the backend: another backend may be tried.
    #[error(transparent)]
    Connect(#[from] ConnectError),
    /// The request may have reached the backend: never retried.
    #[error("the call failed: {source}")]
    Send {
        backend: Arc<str>,
        #[source]
        source: h2::Error,
    },
    /// The backend was declared dead while the call waited for its answer (see
    /// `Backend::dead_reason`); its connection was ended on purpose.
    #[error("{reason}")]
    Dead { backend: Arc<str>, reason: Arc<str> },
    /// The call was sent but no answer began within the time given (a frozen daemon, before
    /// its health checks declare it dead); the stream was reset (CANCEL).
    #[error("no answer within {within:?} (the daemon may be frozen or overloaded)")]
    NoAnswer { backend: Arc<str>, within: Duration },
}

impl ForwardError {
    /// True when no byte of the request reached the backend.
    pub fn nothing_sent(&self) -> bool {
        matches!(self, ForwardError::Connect(_))
    }
}

/// A request head that can be sent to several backends.
#[derive(Debug, Clone)]
pub struct Head {
    pub method: http::Method,
    pub path_and_query: PathAndQuery,
    pub headers: HeaderMap,
}

impl Head {
    /// A gRPC call the router makes itself: POST `path`, `application/grpc`, `te: trailers`.
    pub fn grpc(path: &'static str) -> Self {
        let mut headers = HeaderMap::with_capacity(2);
        headers.insert(
            http::header::CONTENT_TYPE,
            http::HeaderValue::from_static("application/grpc"),
        );
        headers.insert(http::header::TE, http::HeaderValue::from_static("trailers"));
        Self {
            method: http::Method::POST,
            path_and_query: PathAndQuery::from_static(path),
            headers,
        }
    }

    /// The head of a request the router owns (no header copy).
    pub fn from_owned(parts: Parts) -> Self {
        Self {
            path_and_query: path_of(&parts.uri),
            method: parts.method,
            headers: parts.headers,
        }
    }

    pub fn from_parts(parts: &Parts) -> Self {
        Self {
            method: parts.method.clone(),
            path_and_query: path_of(&parts.uri),
            headers: parts.headers.clone(),
        }
    }
}

/// The request's path and query (a cheap, shared-bytes clone).
fn path_of(uri: &http::Uri) -> PathAndQuery {
    uri.path_and_query()
        .cloned()
        .unwrap_or_else(|| PathAndQuery::from_static("/"))
}

fn prepare(
    backend: &Backend,
    method: http::Method,
    path: PathAndQuery,
    mut headers: HeaderMap,
    body: RequestBody,
) -> Request<RequestBody> {
    // HTTP/2 carries the authority in :authority; a stale Host header would contradict it.
    headers.remove(http::header::HOST);
    let mut request = Request::new(body);
    *request.method_mut() = method;
    *request.uri_mut() = backend.uri_for(path);
    *request.version_mut() = Version::HTTP_2;
    *request.headers_mut() = headers;
    request
}

/// Sends a client's request to `backend` and returns the backend's response head and body.
/// A request the connection refused before sending anything is retried once on a new connection.
pub async fn send(
    backend: &Arc<Backend>,
    parts: Parts,
    body: RequestBody,
) -> Result<Response<BackendBody>, ForwardError> {
    let request = prepare(
        backend,
        parts.method,
        path_of(&parts.uri),
        parts.headers,
        body,
    );
    send_request(backend, request, None).await
}

/// Sends a router-made copy of a call (`head` + one complete request body) to `backend`.
pub async fn send_copy(
    backend: &Arc<Backend>,
    head: &Head,
    body: Bytes,
) -> Result<Response<BackendBody>, ForwardError> {
    send_request(backend, copy_request(backend, head, body), None).await
}

/// [`send_copy`] whose answer must begin (response headers) within `within` of the call being
/// sent; connecting is bounded by `--connect-timeout` as always.
///
/// Errors: [`ForwardError::NoAnswer`] when it does not; nothing is retried here.
pub async fn send_copy_answered_within(
    backend: &Arc<Backend>,
    head: &Head,
    body: Bytes,
    within: Duration,
) -> Result<Response<BackendBody>, ForwardError> {
    send_request(backend, copy_request(backend, head, body), Some(within)).await
}

fn copy_request(backend: &Arc<Backend>, head: &Head, body: Bytes) -> Request<RequestBody> {
    prepare(
        backend,
        head.method.clone(),
        head.path_and_query.clone(),
        head.headers.clone(),
        RequestBody::full(body),
    )
}

async fn send_request(
    backend: &Arc<Backend>,
    request: Request<RequestBody>,
    answer_within: Option<Duration>,
) -> Result<Response<BackendBody>, ForwardError> {
    // A call that failed because the router ended a dead backend's connection says why.
    let send_error = |source| match backend.dead_reason() {
        Some(reason) => ForwardError::Dead {
            backend: backend.identity().clone(),
            reason,
        },
        None => ForwardError::Send {
            backend: backend.identity().clone(),
            source,
        },
    };
    let mut connection = backend.sender().await?;
    if let Err(error) = connection.ready().await {
        // The cached connection takes no new stream (GOAWAY received, or it failed); nothing
        // was sent: connect anew.
        tracing::debug!(backend = %backend.identity(), %error, "connection refuses new streams; connecting anew");
        backend.forget(&connection);
        connection = backend.sender().await?;
        connection.ready().await.map_err(send_error)?;
    }
    let answer = connection.send(request).map_err(send_error)?;
    match answer_within {
        None => answer.await.map_err(send_error),
        Some(within) => match tokio::time::timeout(within, answer).await {
            Ok(answer) => answer.map_err(send_error),
            Err(_) => Err(ForwardError::NoAnswer {
                backend: backend.identity().clone(),
                within,
            }),
        },
    }
}

/// Turns a backend's response into the client's, passing every frame through.
pub fn relay(response: Response<BackendBody>, context: StreamContext) -> Response<ResponseBody> {
    let (parts, body) = response.into_parts();
    let header_status = grpc_status_of(&parts.headers);
    Response::from_parts(parts, ResponseBody::backend(body, context, header_status))
}

/// A Trailers-Only gRPC response carrying `code` and `message`.
pub fn status_response(code: u32, message: &str) -> Response<ResponseBody> {
    let mut response = Response::new(ResponseBody::empty(code));
    let headers = response.headers_mut();
    headers.insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static("application/grpc"),
    );
    headers.extend(status_trailers(code, message));
    response
}

/// A gRPC response with framed `messages` and an OK status.
pub fn ok_response(head_from: Option<&HeaderMap>, messages: Bytes) -> Response<ResponseBody> {
    let mut response = Response::new(ResponseBody::local(
        (!messages.is_empty()).then_some(messages),
        Some(status_trailers(code::OK, "")),
    ));
    copy_response_headers(head_from, response.headers_mut());
    response
}

fn copy_response_headers(from: Option<&HeaderMap>, to: &mut HeaderMap) {
    to.insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static("application/grpc"),
    );
    if let Some(from) = from {
        for (name, value) in from {
            if !name.as_str().starts_with("grpc-") && name != http::header::CONTENT_TYPE {
                to.append(name.clone(), value.clone());
            }
        }
    }
}

/// Why the first message of a request could not be read.
#[derive(Debug, thiserror::Error)]
pub enum PeekError {
    #[error(transparent)]
    Wire(#[from] WireError),
    #[error("the request ended before its first gRPC message was complete ({got} bytes)")]
    Incomplete { got: usize },
    #[error("the client's request stream failed: {0}")]
    Body(#[source] hyper::Error),
    #[error(transparent)]
    Full(#[from] BufferFull),
}

impl PeekError {
    /// The gRPC status a client gets for this error.
    pub fn code(&self) -> u32 {
        match self {
            PeekError::Wire(WireError::TooLarge { .. }) | PeekError::Full(_) => {
                code::RESOURCE_EXHAUSTED
            }
            PeekError::Wire(WireError::Compressed) => code::UNIMPLEMENTED,
            PeekError::Wire(_) | PeekError::Incomplete { .. } => code::INVALID_ARGUMENT,
            PeekError::Body(_) => code::CANCELLED,
        }
    }
}

/// The first message of a request, read so the call can be routed.
#[derive(Debug)]
pub struct Peeked {
    /// Every byte read from the body so far: the first message and possibly more. Sent to the
    /// backend ahead of the rest of the body.
    pub buffered: Bytes,
    /// Where the first message's payload lies in `buffered`.
    pub message: Range<usize>,
    /// The message's share of the routing buffer (large messages only): hand it on with
    /// `buffered` ([`RequestBody::holding`]), or drop it when `buffered` is dropped.
    pub share: Option<BufferShare>,
}

impl Peeked {
    pub fn message(&self) -> &[u8] {
        &self.buffered[self.message.clone()]
    }
}

/// Reads the request body until its first gRPC message is complete. A message larger than
/// [`RoutingBuffer::FREE`] first waits for its share of `buffer`.
///
/// Errors: the message is malformed, compressed or over `max_len` bytes ([`PeekError::Wire`]),
/// the body ends or fails first, or no share came in time ([`PeekError::Full`]).
pub async fn read_first_message(
    body: &mut Incoming,
    max_len: usize,
    buffer: &RoutingBuffer,
) -> Result<Peeked, PeekFailure> {
    read_first_message_seen(body, max_len, buffer, |_| true).await
}

/// [`read_first_message`], showing `seen` the bytes read so far (the gRPC prefix and the start
/// of the message) whenever more arrive, until it returns true. Until then a large message reads
/// up to [`RoutingBuffer::FREE`] bytes (what a small message holds anyway) before it waits for
/// its share of `buffer`: a Solve names its build in its leading bytes, and the build's other
/// calls should learn that while it waits.
pub async fn read_first_message_seen(
    body: &mut Incoming,
    max_len: usize,
    buffer: &RoutingBuffer,
    seen: impl FnMut(&[u8]) -> bool,
) -> Result<Peeked, PeekFailure> {
    let mut buf = BytesMut::new();
    read_into(body, max_len, buffer, &mut buf, seen)
        .await
        .map_err(|error| PeekFailure {
            error,
            read: buf.freeze(),
        })
}

/// A first message that could not be read, and the bytes read before that (the gRPC prefix and
/// the start of the message, if they came).
#[derive(Debug)]
pub struct PeekFailure {
    pub error: PeekError,
    pub read: Bytes,
}

async fn read_into(
    body: &mut Incoming,
    max_len: usize,
    buffer: &RoutingBuffer,
    buf: &mut BytesMut,
    mut seen: impl FnMut(&[u8]) -> bool,
) -> Result<Peeked, PeekError> {
    let mut share = None;
    let (mut reserved, mut seen_enough) = (false, false);
    loop {
        if let Some(header) = wire::parse_frame_header(buf, max_len)? {
            if header.compressed {
                return Err(WireError::Compressed.into());
            }
            let end = GRPC_PREFIX_LEN + header.len;
            if buf.len() >= end {
                return Ok(Peeked {
                    buffered: std::mem::take(buf).freeze(),
                    message: GRPC_PREFIX_LEN..end,
                    share,
                });
            }
            let read_ahead = !seen_enough && buf.len() < RoutingBuffer::FREE;
            if !reserved && !read_ahead {
                share = buffer.share(end).await?;
                buf.reserve(end - buf.len());
                reserved = true;
            }
        }
        match body.frame().await {
            Some(Ok(frame)) => {
                if let Ok(data) = frame.into_data() {
                    buf.extend_from_slice(&data);
                    if !seen_enough {
                        seen_enough = seen(buf);
                    }
                }
            }
            Some(Err(error)) => return Err(PeekError::Body(error)),
            None => return Err(PeekError::Incomplete { got: buf.len() }),
        }
    }
}

/// One backend's complete answer to a unary call.
pub struct Collected {
    pub headers: HeaderMap,
    /// grpc-status from the trailers, or from Trailers-Only headers.
    pub status: u32,
    /// grpc-message, percent-decoded.
    pub message: String,
    /// Framed messages.
    pub body: Bytes,
}

/// Reads a whole (small) response.
pub async fn collect(
    response: Response<BackendBody>,
    max_len: usize,
) -> Result<Collected, h2::Error> {
    let (parts, mut body) = response.into_parts();
    let mut data = BytesMut::new();
    let mut trailers = None;
    while let Some(frame) = body.frame().await {
        let frame = frame?;
        match frame.into_data() {
            Ok(chunk) => {
                if data.len() + chunk.len() > max_len + GRPC_PREFIX_LEN {
                    break;
                }
                data.extend_from_slice(&chunk);
            }
            Err(frame) => trailers = frame.into_trailers().ok(),
        }
    }
    let status_source = trailers.as_ref().unwrap_or(&parts.headers);
    let status = grpc_status_of(status_source).unwrap_or(code::UNKNOWN);
    let message = grpc_message_of(status_source);
    Ok(Collected {
        headers: parts.headers,
        status,
        message,
        body: data.freeze(),
    })
}

/// Concatenates the payloads of framed messages into one framed message. Protobuf merges
/// repeated fields by concatenation, so this merges e.g. several DiskUsageResponses.
pub fn merge_unary_payloads<'a>(
    bodies: impl Iterator<Item = &'a Bytes>,
    max_len: usize,
) -> Result<Bytes, WireError> {
    let mut payload = BytesMut::new();
    for body in bodies {
        let mut splitter = MessageSplitter::default();
        splitter.push(body);
        while let Some(mut message) = splitter.next_message(max_len)? {
            message.advance(GRPC_PREFIX_LEN);
            payload.extend_from_slice(&message);
        }
    }
    Ok(wire::encode_frame(&payload))
}

/// Forwards whole messages of a backend's streamed response into `tx`; returns its final status
/// (the message percent-decoded).
pub async fn pump_messages(
    response: Response<BackendBody>,
    tx: &mpsc::Sender<Frame<Bytes>>,
    max_len: usize,
) -> Result<(u32, String), String> {
    let (parts, mut body) = response.into_parts();
    if let Some(code) = grpc_status_of(&parts.headers) {
        return Ok((code, grpc_message_of(&parts.headers)));
    }
    let mut splitter = MessageSplitter::default();
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| e.to_string())?;
        match frame.into_data() {
            Ok(data) => {
                splitter.push(&data);
                while let Some(message) =
                    splitter.next_message(max_len).map_err(|e| e.to_string())?
                {
                    if tx.send(Frame::data(message)).await.is_err() {
                        return Err("client went away".into());
                    }
                }
            }
            Err(frame) => {
                if let Ok(trailers) = frame.into_trailers() {
                    let code = grpc_status_of(&trailers).unwrap_or(code::UNKNOWN);
                    return Ok((code, grpc_message_of(&trailers)));
                }
            }
        }
    }
    if body.is_end_stream() && splitter.is_empty() {
        Ok((code::OK, String::new()))
    } else {
        Err("stream ended without trailers".into())
    }
}
