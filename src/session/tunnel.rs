//! The Session tunnel as a byte stream.
//!
//! One direction of `Control/Session` is a sequence of gRPC messages (5-byte prefix: compressed
//! flag and big-endian length), each a protobuf `BytesMessage { bytes data = 1; }`. The
//! concatenated `data` fields are one direction of the inner HTTP/2 connection. [`TunnelIo`]
//! reads the inbound direction from an HTTP body and writes the outbound direction as framed
//! messages into a bounded channel that feeds an outgoing HTTP body, so an HTTP/2 library can run
//! on top of it.
//!
//! Allocation: inbound payloads are slices of the body's own `Bytes` (no copy until the reader's
//! buffer); outbound writes are coalesced into one message per flush with nothing new to write
//! (or per [`OUT_MESSAGE_TARGET`] bytes; see `poll_flush`), built in place behind room reserved for its header, so each
//! outgoing message costs one allocation and one copy. Buffering is bounded on both sides: the
//! inbound side holds at most one body chunk, the outbound side at most [`OUT_CHANNEL`] messages.
//!
//! Malformed framing is a precise [`TunnelError`], surfaced to the HTTP/2 library as an
//! `InvalidData` I/O error and recorded in the [`ReadEnd`]; nothing here panics on input.

use std::error::Error as StdError;
use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{ready, Context, Poll};

use bytes::{Buf, BufMut, Bytes, BytesMut};
use http::HeaderMap;
use http_body::{Body, Frame};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::PollSender;

/// The largest Session message accepted by default: BuildKit's 16 MiB message limit plus
/// slack for the framing. (The fake and real clients send 32 KiB or smaller.)
pub const MAX_MESSAGE: usize = 16 * 1024 * 1024 + 64 * 1024;

/// Coalesce outbound writes into messages of up to this many payload bytes. Large enough that
/// a burst of 16 KiB inner DATA frames costs one outer message, not four; small enough to stay
/// under glibc's default mmap threshold (128 KiB), so each message buffer comes from the heap
/// instead of a fresh, page-faulted mapping (with 256 KiB messages, page faults and page
/// clearing showed up at ~1.5% of the benchmark's CPU; 64 KiB was no slower within the noise),
/// and far below every peer's message limit (4 MiB by default in grpc-go and tonic).
pub const OUT_MESSAGE_TARGET: usize = 64 * 1024;

/// Outbound messages buffered between the inner HTTP/2 connection and the outer stream.
/// With [`OUT_MESSAGE_TARGET`] this bounds a tunnel's outbound buffer to 512 KiB; the outer
/// stream's own flow control does the rest.
pub const OUT_CHANNEL: usize = 8;

/// Room reserved for a message that starts with a small write.
const SMALL_MESSAGE: usize = 4 * 1024;

/// gRPC prefix, the `data` field's tag, and its length as a varint of up to 5 bytes (2^35 bytes
/// is far above any message we emit).
const HEADER_ROOM: usize = 5 + 1 + 5;

/// What is wrong with the bytes of a Session stream.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TunnelError {
    #[error("Session stream message is compressed (gRPC compressed flag 1); BuildKit never compresses the Session stream and the router does not decompress it")]
    Compressed,
    #[error("Session stream message has an invalid gRPC compressed flag {0:#04x} (expected 0): the stream is not gRPC framed")]
    BadFlag(u8),
    #[error("Session stream message of {len} bytes exceeds the limit of {max} bytes (raise --max-message-size if a client really sends that)")]
    TooLarge { len: usize, max: usize },
    #[error("Session stream message is not a BytesMessage: {0}")]
    NotBytesMessage(&'static str),
    #[error("Session stream ended in the middle of a message ({0})")]
    Truncated(&'static str),
}

impl From<TunnelError> for io::Error {
    fn from(e: TunnelError) -> Self {
        io::Error::new(io::ErrorKind::InvalidData, e)
    }
}

/// A protobuf varint being read one byte at a time (it may straddle body chunks).
#[derive(Debug, Clone, Copy, Default)]
struct Varint {
    value: u64,
    shift: u32,
}

impl Varint {
    fn push(&mut self, byte: u8) -> Result<Option<u64>, TunnelError> {
        if self.shift >= 64 {
            return Err(TunnelError::NotBytesMessage(
                "a varint is longer than 10 bytes",
            ));
        }
        self.value |= u64::from(byte & 0x7f) << self.shift;
        self.shift += 7;
        Ok((byte & 0x80 == 0).then_some(self.value))
    }
}

#[derive(Debug, Clone, Copy)]
enum State {
    /// Reading the 5-byte gRPC prefix.
    Prefix { buf: [u8; 5], got: usize },
    /// Reading a field tag; `left` message bytes remain after the current position.
    Tag { left: usize, varint: Varint },
    /// Reading the length of a length-delimited field (`data`: field 1).
    Len {
        left: usize,
        data: bool,
        varint: Varint,
    },
    /// Skipping a varint field of another number.
    SkipVarint { left: usize },
    /// Skipping `n` bytes of another field.
    Skip { left: usize, n: usize },
    /// Passing `n` bytes of the `data` field through.
    Data { left: usize, n: usize },
}

impl State {
    const START: State = State::Prefix {
        buf: [0; 5],
        got: 0,
    };

    /// After a field: the next tag, or the next message.
    fn after_field(left: usize) -> State {
        if left == 0 {
            State::START
        } else {
            State::Tag {
                left,
                varint: Varint::default(),
            }
        }
    }
}

/// Splits a stream of body chunks into the `data` payloads of its `BytesMessage`s, without
/// copying them. Other (unknown) fields are skipped, as protobuf requires.
#[derive(Debug, Clone)]
pub struct Decoder {
    state: State,
    max_message: usize,
    /// The current message already had a `data` field.
    seen_data: bool,
}

impl Decoder {
    /// A decoder accepting messages of up to `max_message` bytes (without the prefix).
    pub fn new(max_message: usize) -> Self {
        Self {
            state: State::START,
            max_message,
            seen_data: false,
        }
    }

    /// Consumes bytes from the front of `chunk` until one slice of `data` payload is ready
    /// (returned, sharing `chunk`'s memory) or `chunk` is used up (`None`).
    pub fn next(&mut self, chunk: &mut Bytes) -> Result<Option<Bytes>, TunnelError> {
        while !chunk.is_empty() {
            match &mut self.state {
                State::Prefix { buf, got } => {
                    let take = (5 - *got).min(chunk.len());
                    buf[*got..*got + take].copy_from_slice(&chunk[..take]);
                    chunk.advance(take);
                    *got += take;
                    if *got < 5 {
                        continue;
                    }
                    match buf[0] {
                        0 => {}
                        1 => return Err(TunnelError::Compressed),
                        flag => return Err(TunnelError::BadFlag(flag)),
                    }
                    let len = u32::from_be_bytes([buf[1], buf[2], buf[3], buf[4]]) as usize;
                    if len > self.max_message {
                        return Err(TunnelError::TooLarge {
                            len,
                            max: self.max_message,
                        });
                    }
                    self.seen_data = false;
                    self.state = State::after_field(len);
                }
                State::Tag { left, varint } => {
                    let byte = chunk[0];
                    chunk.advance(1);
                    *left -= 1;
                    let Some(tag) = varint.push(byte)? else {
                        if *left == 0 {
                            return Err(TunnelError::NotBytesMessage(
                                "the message ends inside a field tag",
                            ));
                        }
                        continue;
                    };
                    let left = *left;
                    let (field, wire) = (tag >> 3, tag & 7);
                    if field == 0 {
                        return Err(TunnelError::NotBytesMessage("field number 0"));
                    }
                    let need_more = |state: State| {
                        if left == 0 {
                            Err(TunnelError::NotBytesMessage(
                                "the message ends right after a field tag",
                            ))
                        } else {
                            Ok(state)
                        }
                    };
                    self.state = match (field, wire) {
                        (1, 2) => {
                            if self.seen_data {
                                return Err(TunnelError::NotBytesMessage(
                                    "field 1 (data) appears twice in one message",
                                ));
                            }
                            self.seen_data = true;
                            need_more(State::Len {
                                left,
                                data: true,
                                varint: Varint::default(),
                            })?
                        }
                        (1, _) => {
                            return Err(TunnelError::NotBytesMessage(
                                "field 1 (data) is not length-delimited",
                            ))
                        }
                        (_, 0) => need_more(State::SkipVarint { left })?,
                        (_, 2) => need_more(State::Len {
                            left,
                            data: false,
                            varint: Varint::default(),
                        })?,
                        (_, 1 | 5) => {
                            let n = if wire == 1 { 8 } else { 4 };
                            if n > left {
                                return Err(TunnelError::NotBytesMessage(
                                    "a fixed-size field overruns the message",
                                ));
                            }
                            State::Skip { left: left - n, n }
                        }
                        _ => {
                            return Err(TunnelError::NotBytesMessage("invalid or group wire type"))
                        }
                    };
                }
                State::Len { left, data, varint } => {
                    let byte = chunk[0];
                    chunk.advance(1);
                    *left -= 1;
                    match varint.push(byte)? {
                        None if *left == 0 => {
                            return Err(TunnelError::NotBytesMessage(
                                "the message ends inside a field length",
                            ))
                        }
                        None => {}
                        Some(len) => {
                            let left = *left;
                            let n = usize::try_from(len).unwrap_or(usize::MAX);
                            if n > left {
                                return Err(TunnelError::NotBytesMessage(
                                    "a field's length overruns the message",
                                ));
                            }
                            self.state = if *data {
                                State::Data { left: left - n, n }
                            } else {
                                State::Skip { left: left - n, n }
                            };
                            if n == 0 {
                                self.state = State::after_field(left);
                            }
                        }
                    }
                }
                State::SkipVarint { left } => {
                    let byte = chunk[0];
                    chunk.advance(1);
                    *left -= 1;
                    if byte & 0x80 == 0 {
                        self.state = State::after_field(*left);
                    } else if *left == 0 {
                        return Err(TunnelError::NotBytesMessage(
                            "the message ends inside a varint field",
                        ));
                    }
                }
                State::Skip { left, n } => {
                    let take = (*n).min(chunk.len());
                    chunk.advance(take);
                    *n -= take;
                    if *n == 0 {
                        self.state = State::after_field(*left);
                    }
                }
                State::Data { left, n } => {
                    let take = (*n).min(chunk.len());
                    let out = chunk.split_to(take);
                    *n -= take;
                    if *n == 0 {
                        self.state = State::after_field(*left);
                    }
                    return Ok(Some(out));
                }
            }
        }
        Ok(None)
    }

    /// Checks that the stream may end here (between messages).
    pub fn finish(&self) -> Result<(), TunnelError> {
        match self.state {
            State::Prefix { got: 0, .. } => Ok(()),
            State::Prefix { .. } => Err(TunnelError::Truncated("inside a gRPC message prefix")),
            State::Data { .. } => Err(TunnelError::Truncated("inside the data field")),
            _ => Err(TunnelError::Truncated("inside a BytesMessage")),
        }
    }
}

/// Builds one outgoing `BytesMessage` in place: the payload is appended behind room reserved
/// for the gRPC prefix and protobuf header, which are written when the message is finished.
#[derive(Debug, Default)]
pub struct Encoder {
    buf: BytesMut,
}

impl Encoder {
    /// Payload bytes in the message being built.
    pub fn pending(&self) -> usize {
        self.buf.len().saturating_sub(HEADER_ROOM)
    }

    /// Makes room for `coming` more payload bytes: a message that starts small (SETTINGS,
    /// pings, window updates) gets a small buffer, so an idle tunnel does not keep 64 KiB; once
    /// bulk data comes, the buffer grows to a whole message at once. Growing by doubling
    /// (4, 8, 16, 32, 64 KiB) copied the message so far at every step: 14 % of the router's
    /// instructions in a 256 MiB build (callgrind).
    pub fn reserve(&mut self, coming: usize) {
        if self.buf.is_empty() {
            let room = if coming >= SMALL_MESSAGE {
                OUT_MESSAGE_TARGET
            } else {
                SMALL_MESSAGE
            };
            self.buf.reserve(HEADER_ROOM + room);
            self.buf.put_bytes(0, HEADER_ROOM);
        }
        let fits = coming.min(OUT_MESSAGE_TARGET - self.pending());
        if self.buf.capacity() - self.buf.len() < fits {
            self.buf
                .reserve(HEADER_ROOM + OUT_MESSAGE_TARGET - self.buf.len());
        }
    }

    /// Appends as much of `data` as fits under [`OUT_MESSAGE_TARGET`]; returns how much.
    pub fn push(&mut self, data: &[u8]) -> usize {
        self.reserve(data.len());
        let n = data.len().min(OUT_MESSAGE_TARGET - self.pending());
        self.buf.extend_from_slice(&data[..n]);
        n
    }

    /// Whether the message being built is full.
    pub fn is_full(&self) -> bool {
        self.pending() >= OUT_MESSAGE_TARGET
    }

    /// The finished framed message, if any payload is pending.
    pub fn finish(&mut self) -> Option<Bytes> {
        let n = self.pending();
        if n == 0 {
            return None;
        }
        let mut varint = [0u8; 5];
        let mut k = 0;
        let mut v = n;
        loop {
            let byte = (v & 0x7f) as u8;
            v >>= 7;
            if v == 0 {
                varint[k] = byte;
                k += 1;
                break;
            }
            varint[k] = byte | 0x80;
            k += 1;
        }
        let proto_len = 1 + k + n;
        let start = HEADER_ROOM - (5 + 1 + k);
        let head = &mut self.buf[start..HEADER_ROOM];
        head[0] = 0;
        head[1..5].copy_from_slice(&(proto_len as u32).to_be_bytes());
        head[5] = 0x0a;
        head[6..6 + k].copy_from_slice(&varint[..k]);
        // The whole buffer goes with the message: a remainder kept for the next message would
        // keep the allocation (up to 64 KiB after bulk data) alive for as long as the tunnel
        // lasts, idle or not.
        let mut message = std::mem::take(&mut self.buf).freeze();
        message.advance(start);
        Some(message)
    }

    /// Frames `data` as one message (tests and one-off messages).
    pub fn frame(data: &[u8]) -> Bytes {
        let mut out = BytesMut::new();
        for chunk in data.chunks(OUT_MESSAGE_TARGET) {
            let mut e = Encoder::default();
            e.push(chunk);
            out.extend_from_slice(&e.finish().expect("non-empty"));
        }
        out.freeze()
    }
}

/// How the inbound direction of a tunnel ended, as far as the reader saw it.
#[derive(Debug, Clone, Default)]
pub enum ReadEnd {
    /// Still open (or abandoned unread: see [`TunnelHandle::rest`]).
    #[default]
    Open,
    /// The body ended without trailers.
    Eof,
    /// The body ended with these trailers (a daemon's `grpc-status`).
    Trailers(HeaderMap),
    /// The peer reset the outer stream with this HTTP/2 reason.
    Reset(h2::Reason),
    /// The outer stream or its connection failed.
    Lost(String),
    /// The peer sent bytes that are not a Session stream.
    Malformed(TunnelError),
}

impl ReadEnd {
    /// True once the inbound direction is over, however it ended.
    pub fn is_over(&self) -> bool {
        !matches!(self, ReadEnd::Open)
    }
}

/// The HTTP/2 reset reason inside a body error, if the peer reset the stream.
pub fn remote_reset_reason(error: &(dyn StdError + 'static)) -> Option<h2::Reason> {
    crate::body::error_source::<h2::Error>(error)
        .filter(|h2| h2.is_reset() && h2.is_remote())
        .and_then(h2::Error::reason)
}

/// What the owner of a tunnel keeps: how its inbound side ended, and the unread rest of the
/// inbound body when the tunnel is dropped before its end (to read a daemon's trailers after
/// the inner connection is closed).
pub struct TunnelHandle<B> {
    end: Arc<Mutex<ReadEnd>>,
    rest: Option<oneshot::Receiver<B>>,
}

impl<B> TunnelHandle<B> {
    /// How the inbound side ended so far.
    pub fn end(&self) -> ReadEnd {
        self.end.lock().expect("tunnel end lock").clone()
    }

    /// The inbound body the tunnel had not read to its end when it was dropped, if any.
    pub async fn rest(&mut self) -> Option<B> {
        self.rest.take()?.await.ok()
    }
}

/// A byte stream over one Session stream: reads the payloads of the inbound messages, writes
/// outbound bytes as messages.
pub struct TunnelIo<B> {
    body: Option<B>,
    decoder: Decoder,
    /// Raw inbound bytes not yet decoded.
    raw: Bytes,
    /// Decoded payload not yet read.
    ready: Bytes,
    end: Arc<Mutex<ReadEnd>>,
    rest: Option<oneshot::Sender<B>>,
    encoder: Encoder,
    /// Bytes were written since the last flush (see `poll_flush`).
    fresh: bool,
    out: PollSender<Frame<Bytes>>,
    out_closed: bool,
}

impl<B> TunnelIo<B>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: StdError + Send + Sync + 'static,
{
    /// A tunnel reading `inbound` and writing messages into `outbound` (closed, ending the
    /// outgoing body, when the tunnel is shut down or dropped).
    pub fn new(
        inbound: B,
        outbound: mpsc::Sender<Frame<Bytes>>,
        max_message: usize,
    ) -> (Self, TunnelHandle<B>) {
        let end = Arc::new(Mutex::new(ReadEnd::Open));
        let (rest_tx, rest_rx) = oneshot::channel();
        (
            Self {
                body: Some(inbound),
                decoder: Decoder::new(max_message),
                raw: Bytes::new(),
                ready: Bytes::new(),
                end: end.clone(),
                rest: Some(rest_tx),
                encoder: Encoder::default(),
                fresh: false,
                out: PollSender::new(outbound),
                out_closed: false,
            },
            TunnelHandle {
                end,
                rest: Some(rest_rx),
            },
        )
    }

    fn set_end(&mut self, end: ReadEnd) {
        self.body = None;
        self.rest = None;
        *self.end.lock().expect("tunnel end lock") = end;
    }

    fn malformed(&mut self, error: TunnelError) -> io::Error {
        tracing::warn!(%error, "malformed Session stream");
        self.set_end(ReadEnd::Malformed(error.clone()));
        error.into()
    }

    /// Sends the message being built. Ready once it is queued (or there was none).
    fn poll_send(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if self.encoder.pending() == 0 {
            return Poll::Ready(Ok(()));
        }
        if self.out_closed {
            return Poll::Ready(Err(broken_pipe()));
        }
        ready!(self.out.poll_reserve(cx)).map_err(|_| broken_pipe())?;
        let message = self.encoder.finish().expect("pending message");
        self.out
            .send_item(Frame::data(message))
            .map_err(|_| broken_pipe())?;
        Poll::Ready(Ok(()))
    }
}

fn broken_pipe() -> io::Error {
    io::Error::new(
        io::ErrorKind::BrokenPipe,
        "the Session stream's other end is gone",
    )
}

impl<B> AsyncRead for TunnelIo<B>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: StdError + Send + Sync + 'static,
{
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        out: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if out.remaining() == 0 {
            return Poll::Ready(Ok(()));
        }
        loop {
            if !this.ready.is_empty() {
                let n = this.ready.len().min(out.remaining());
                out.put_slice(&this.ready[..n]);
                this.ready.advance(n);
                if this.ready.is_empty() {
                    // An empty slice still holds the body chunk's buffer (the peer
                    // connection's read buffer): let it go while the tunnel waits.
                    this.ready = Bytes::new();
                }
                return Poll::Ready(Ok(()));
            }
            if !this.raw.is_empty() {
                match this.decoder.next(&mut this.raw) {
                    Ok(Some(payload)) => this.ready = payload,
                    Ok(None) => {}
                    Err(e) => return Poll::Ready(Err(this.malformed(e))),
                }
                if this.raw.is_empty() {
                    this.raw = Bytes::new();
                }
                continue;
            }
            let Some(body) = this.body.as_mut() else {
                // Ended before: EOF again (or the error was reported already).
                return Poll::Ready(Ok(()));
            };
            match ready!(Pin::new(body).poll_frame(cx)) {
                Some(Ok(frame)) => match frame.into_data() {
                    Ok(data) => this.raw = data,
                    Err(frame) => {
                        if let Ok(trailers) = frame.into_trailers() {
                            if let Err(e) = this.decoder.finish() {
                                return Poll::Ready(Err(this.malformed(e)));
                            }
                            this.set_end(ReadEnd::Trailers(trailers));
                            return Poll::Ready(Ok(()));
                        }
                    }
                },
                Some(Err(error)) => {
                    let (end, kind) = match remote_reset_reason(&error) {
                        Some(reason) => (ReadEnd::Reset(reason), io::ErrorKind::ConnectionReset),
                        None => (
                            ReadEnd::Lost(error.to_string()),
                            io::ErrorKind::ConnectionAborted,
                        ),
                    };
                    this.set_end(end);
                    return Poll::Ready(Err(io::Error::new(kind, error)));
                }
                None => {
                    if let Err(e) = this.decoder.finish() {
                        return Poll::Ready(Err(this.malformed(e)));
                    }
                    this.set_end(ReadEnd::Eof);
                    return Poll::Ready(Ok(()));
                }
            }
        }
    }
}

impl<B> AsyncWrite for TunnelIo<B>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: StdError + Send + Sync + 'static,
{
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        if this.encoder.is_full() {
            ready!(this.poll_send(cx))?;
        }
        if this.out_closed {
            return Poll::Ready(Err(broken_pipe()));
        }
        this.fresh = true;
        Poll::Ready(Ok(this.encoder.push(buf)))
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        if this.encoder.is_full() {
            ready!(this.poll_send(cx))?;
        }
        if this.out_closed {
            return Poll::Ready(Err(broken_pipe()));
        }
        this.fresh = true;
        // An HTTP/2 DATA frame comes as its 9-byte header and its payload: room for both.
        this.encoder.reserve(bufs.iter().map(|b| b.len()).sum());
        let mut written = 0;
        for buf in bufs {
            let n = this.encoder.push(buf);
            written += n;
            if n < buf.len() {
                break;
            }
        }
        Poll::Ready(Ok(written))
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    /// A flush right after new bytes, with the message not full, is deferred as in
    /// [`crate::io::BufferedIo`]: the task is woken, and its next flush with nothing new sends
    /// the message. h2 flushes after every DATA frame larger than 256 bytes, so without this
    /// each 16 KiB inner frame would cost a whole outer message and HTTP/2 DATA frame.
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if this.fresh && this.encoder.pending() > 0 && !this.encoder.is_full() {
            this.fresh = false;
            cx.waker().wake_by_ref();
            return Poll::Ready(Ok(()));
        }
        this.fresh = false;
        this.poll_send(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        ready!(self.poll_send(cx))?;
        self.out.close();
        self.out_closed = true;
        Poll::Ready(Ok(()))
    }
}

impl<B> Drop for TunnelIo<B> {
    fn drop(&mut self) {
        // A message held by a deferred flush (a last GOAWAY or RST_STREAM) goes out if the
        // channel has room; never waits.
        if !self.out_closed {
            if let (Some(message), Some(tx)) = (self.encoder.finish(), self.out.get_ref()) {
                let _ = tx.try_send(Frame::data(message));
            }
        }
        if let (Some(body), Some(rest)) = (self.body.take(), self.rest.take()) {
            let _ = rest.send(body);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::StreamBody;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    const MAX: usize = MAX_MESSAGE;

    fn decode_all(chunks: &[&[u8]]) -> Result<Vec<u8>, TunnelError> {
        let mut d = Decoder::new(MAX);
        let mut out = Vec::new();
        for c in chunks {
            let mut c = Bytes::copy_from_slice(c);
            while let Some(p) = d.next(&mut c)? {
                out.extend_from_slice(&p);
            }
        }
        d.finish()?;
        Ok(out)
    }

    /// Every way of splitting a stream of messages into two or three chunks decodes the same.
    #[test]
    fn split_messages_decode_the_same_at_every_boundary() {
        let mut wire = Vec::new();
        wire.extend_from_slice(&Encoder::frame(b"hello, "));
        wire.extend_from_slice(&[0, 0, 0, 0, 0]); // an empty BytesMessage
        wire.extend_from_slice(&Encoder::frame(&[7u8; 300])); // a 2-byte length varint
        wire.extend_from_slice(&Encoder::frame(b"world"));
        let mut want = b"hello, ".to_vec();
        want.extend_from_slice(&[7u8; 300]);
        want.extend_from_slice(b"world");
        assert_eq!(decode_all(&[&wire]).unwrap(), want);
        for i in 0..wire.len() {
            assert_eq!(
                decode_all(&[&wire[..i], &wire[i..]]).unwrap(),
                want,
                "split {i}"
            );
        }
        for i in (0..wire.len()).step_by(7) {
            for j in (i..wire.len()).step_by(5) {
                assert_eq!(
                    decode_all(&[&wire[..i], &wire[i..j], &wire[j..]]).unwrap(),
                    want
                );
            }
        }
        // One byte at a time.
        let bytes: Vec<&[u8]> = wire.chunks(1).collect();
        assert_eq!(decode_all(&bytes).unwrap(), want);
    }

    #[test]
    fn payload_slices_share_the_chunk_memory() {
        let wire = Encoder::frame(&[1u8; 4096]);
        let mut chunk = wire.clone();
        let mut d = Decoder::new(MAX);
        let p = d.next(&mut chunk).unwrap().unwrap();
        assert_eq!(p.len(), 4096);
        // Same allocation: the payload starts inside the framed message.
        let base = wire.as_ptr() as usize;
        let at = p.as_ptr() as usize;
        assert!(at > base && at < base + wire.len());
    }

    #[test]
    fn unknown_fields_are_skipped() {
        // field 2 varint 150, field 3 fixed64, field 4 bytes "xy", field 5 fixed32, then data.
        let mut msg = vec![0x10, 0x96, 0x01];
        msg.push(0x19);
        msg.extend_from_slice(&[0; 8]);
        msg.extend_from_slice(&[0x22, 2, b'x', b'y']);
        msg.push(0x2d);
        msg.extend_from_slice(&[0; 4]);
        msg.extend_from_slice(&[0x0a, 3, b'a', b'b', b'c']);
        msg.extend_from_slice(&[0x30, 1]); // field 6 varint after data
        let mut wire = vec![0];
        wire.extend_from_slice(&(msg.len() as u32).to_be_bytes());
        wire.extend_from_slice(&msg);
        assert_eq!(decode_all(&[&wire]).unwrap(), b"abc");
        for i in 0..wire.len() {
            assert_eq!(decode_all(&[&wire[..i], &wire[i..]]).unwrap(), b"abc");
        }
    }

    #[test]
    fn malformed_input_is_a_precise_error() {
        let framed = |msg: &[u8]| {
            let mut w = vec![0];
            w.extend_from_slice(&(msg.len() as u32).to_be_bytes());
            w.extend_from_slice(msg);
            w
        };
        assert_eq!(
            decode_all(&[&[1, 0, 0, 0, 1, 0x0a]]),
            Err(TunnelError::Compressed)
        );
        assert_eq!(
            decode_all(&[&[2, 0, 0, 0, 0]]),
            Err(TunnelError::BadFlag(2))
        );
        // HTTP/1.1 text where a Session stream should be.
        assert_eq!(
            decode_all(&[b"GET / HTTP/1.1\r\n"]),
            Err(TunnelError::BadFlag(b'G'))
        );
        let too_big = (MAX as u32 + 1).to_be_bytes();
        assert_eq!(
            decode_all(&[&[0, too_big[0], too_big[1], too_big[2], too_big[3]]]),
            Err(TunnelError::TooLarge {
                len: MAX + 1,
                max: MAX
            })
        );
        let not_bytes = |msg: &[u8]| match decode_all(&[&framed(msg)]) {
            Err(TunnelError::NotBytesMessage(why)) => why,
            other => panic!("{msg:?}: {other:?}"),
        };
        assert!(not_bytes(&[0x08, 1]).contains("field 1 (data) is not length-delimited"));
        assert!(not_bytes(&[0x0a, 5, 1, 2]).contains("overruns"));
        assert!(not_bytes(&[0x0a, 1, 9, 0x0a, 1, 9]).contains("twice"));
        assert!(not_bytes(&[0x13]).contains("wire type"));
        assert!(not_bytes(&[0x00]).contains("field number 0"));
        assert!(not_bytes(&[0x0a]).contains("right after a field tag"));
        assert!(not_bytes(&[0x0a, 0x80]).contains("inside a field length"));
        assert!(not_bytes(&[0x10, 0x80]).contains("inside a varint field"));
        assert!(not_bytes(&[0x15, 1, 2]).contains("fixed-size field overruns"));
        assert!(not_bytes(&[0xff; 12]).contains("longer than 10 bytes"));
        // Ends mid-message.
        let wire = Encoder::frame(b"abcdef");
        assert_eq!(
            decode_all(&[&wire[..3]]),
            Err(TunnelError::Truncated("inside a gRPC message prefix"))
        );
        assert_eq!(
            decode_all(&[&wire[..wire.len() - 1]]),
            Err(TunnelError::Truncated("inside the data field"))
        );
        // The messages say what to do.
        assert!(TunnelError::TooLarge { len: 1, max: 0 }
            .to_string()
            .contains("--max-message-size"));
    }

    #[test]
    fn encoder_frames_every_length_class() {
        for n in [1usize, 127, 128, 16383, 16384, OUT_MESSAGE_TARGET] {
            let data = vec![0x5a; n];
            let mut e = Encoder::default();
            assert_eq!(e.push(&data), n);
            let m = e.finish().unwrap();
            assert_eq!(decode_all(&[&m]).unwrap(), data, "{n}");
            assert!(e.finish().is_none());
        }
        let mut e = Encoder::default();
        assert_eq!(
            e.push(&vec![0; OUT_MESSAGE_TARGET + 10]),
            OUT_MESSAGE_TARGET
        );
        assert!(e.is_full());
    }

    /// A finished message takes its whole buffer: the encoder of an idle tunnel keeps none
    /// (after bulk data, a kept remainder held the message's 64 KiB allocation).
    #[test]
    fn the_encoder_keeps_no_buffer_between_messages() {
        let mut e = Encoder::default();
        for n in [20_000, 10] {
            e.push(&vec![1; n]);
            assert!(e.finish().is_some());
            assert_eq!(e.buf.capacity(), 0, "after a message of {n} bytes");
        }
    }

    type ChunkBody =
        StreamBody<tokio_stream::wrappers::ReceiverStream<Result<Frame<Bytes>, std::io::Error>>>;

    fn body() -> (
        mpsc::Sender<Result<Frame<Bytes>, std::io::Error>>,
        ChunkBody,
    ) {
        let (tx, rx) = mpsc::channel(16);
        (
            tx,
            StreamBody::new(tokio_stream::wrappers::ReceiverStream::new(rx)),
        )
    }

    #[tokio::test]
    async fn reads_payloads_and_writes_messages() {
        let (in_tx, inbound) = body();
        let (out_tx, mut out_rx) = mpsc::channel(OUT_CHANNEL);
        let (mut io, handle) = TunnelIo::new(inbound, out_tx, MAX);
        let wire = [Encoder::frame(b"ping "), Encoder::frame(b"pong")].concat();
        in_tx
            .send(Ok(Frame::data(Bytes::copy_from_slice(&wire[..8]))))
            .await
            .unwrap();
        in_tx
            .send(Ok(Frame::data(Bytes::copy_from_slice(&wire[8..]))))
            .await
            .unwrap();
        let mut trailers = HeaderMap::new();
        trailers.insert("grpc-status", "0".parse().unwrap());
        in_tx.send(Ok(Frame::trailers(trailers))).await.unwrap();
        let mut got = Vec::new();
        io.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, b"ping pong");
        assert!(matches!(handle.end(), ReadEnd::Trailers(t) if t["grpc-status"] == "0"));

        io.write_all(b"abc").await.unwrap();
        io.write_all(b"def").await.unwrap();
        io.flush().await.unwrap();
        io.shutdown().await.unwrap();
        let message = out_rx.recv().await.unwrap().into_data().unwrap();
        assert_eq!(decode_all(&[&message]).unwrap(), b"abcdef");
        assert!(
            out_rx.recv().await.is_none(),
            "shutdown ends the outbound body"
        );
    }

    /// Once its bytes are read, a body chunk is let go though the tunnel stays open: an idle
    /// tunnel must not keep the buffer its last chunk came in (the peer connection's).
    #[tokio::test]
    async fn a_chunk_read_to_its_end_is_released_while_the_tunnel_waits() {
        use std::sync::atomic::{AtomicBool, Ordering::SeqCst};
        struct Owner(Bytes, Arc<AtomicBool>);
        impl AsRef<[u8]> for Owner {
            fn as_ref(&self) -> &[u8] {
                &self.0
            }
        }
        impl Drop for Owner {
            fn drop(&mut self) {
                self.1.store(true, SeqCst);
            }
        }
        let released = Arc::new(AtomicBool::new(false));
        let (in_tx, inbound) = body();
        let (out_tx, _out_rx) = mpsc::channel(OUT_CHANNEL);
        let (mut io, _handle) = TunnelIo::new(inbound, out_tx, MAX);
        let chunk = Bytes::from_owner(Owner(Encoder::frame(b"settings"), released.clone()));
        in_tx.send(Ok(Frame::data(chunk))).await.unwrap();
        let mut buf = [0u8; 64];
        let n = io.read(&mut buf).await.unwrap();
        assert_eq!(&buf[..n], b"settings");
        assert!(
            released.load(SeqCst),
            "the chunk read to its end is released"
        );
    }

    #[tokio::test]
    async fn malformed_inbound_is_an_invalid_data_error() {
        let (in_tx, inbound) = body();
        let (out_tx, _out_rx) = mpsc::channel(OUT_CHANNEL);
        let (mut io, handle) = TunnelIo::new(inbound, out_tx, MAX);
        in_tx
            .send(Ok(Frame::data(Bytes::from_static(&[1, 0, 0, 0, 0]))))
            .await
            .unwrap();
        let err = io.read(&mut [0u8; 64]).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
        assert!(err.to_string().contains("compressed"), "{err}");
        assert!(matches!(
            handle.end(),
            ReadEnd::Malformed(TunnelError::Compressed)
        ));
    }

    #[tokio::test]
    async fn a_full_outbound_channel_applies_backpressure() {
        let (_in_tx, inbound) = body();
        let (out_tx, mut out_rx) = mpsc::channel(1);
        let (mut io, _handle) = TunnelIo::new(inbound, out_tx, MAX);
        // A flush right after writing is deferred; the next one (as h2 makes when its task
        // runs again) sends.
        io.write_all(b"one").await.unwrap();
        io.flush().await.unwrap();
        io.flush().await.unwrap();
        io.write_all(b"two").await.unwrap();
        io.flush().await.unwrap();
        // The channel holds one message: sending the second waits for the reader.
        let flush = tokio::time::timeout(std::time::Duration::from_millis(50), io.flush()).await;
        assert!(flush.is_err(), "flush waits while the channel is full");
        assert!(out_rx.recv().await.is_some());
        io.flush().await.unwrap();
        assert!(out_rx.recv().await.is_some());
        drop(out_rx);
        io.write_all(b"three").await.unwrap();
        io.flush().await.unwrap();
        let err = io.flush().await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::BrokenPipe);
    }

    #[tokio::test]
    async fn dropping_the_tunnel_hands_back_the_unread_body() {
        let (in_tx, inbound) = body();
        let (out_tx, _out_rx) = mpsc::channel(OUT_CHANNEL);
        let (io, mut handle) = TunnelIo::new(inbound, out_tx, MAX);
        drop(io);
        let mut rest = handle.rest().await.expect("unread body handed back");
        in_tx
            .send(Ok(Frame::data(Bytes::from_static(b"x"))))
            .await
            .unwrap();
        drop(in_tx);
        use http_body_util::BodyExt;
        assert!(rest.frame().await.is_some());
    }
}
