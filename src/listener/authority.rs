//! Keeps clients that send a malformed `:authority` working.
//!
//! Older buildctl sent `:authority: tcp://host:port`. The router never looks at `:authority`,
//! but the HTTP/2 library rejects a request whose authority does not parse (RST_STREAM
//! PROTOCOL_ERROR) before the router sees it. This wrapper sits on the client's byte stream and
//! rewrites such a value in place, at the same length: `tcp://h:p` becomes `tcpx--h:p`. Equal
//! length (and, in HPACK's Huffman code, `:`/`x` and `/`/`-` have codes of equal length) keeps
//! every HPACK dynamic-table size identical, so the decoder's state stays in step with the
//! client's encoder. Only HEADERS frames are collected and inspected; every other frame's
//! payload is passed through as it is read.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

const PREFACE_LEN: usize = 24;
const FRAME_HEADER_LEN: usize = 9;
const HEADERS: u8 = 0x1;
const CONTINUATION: u8 = 0x9;
const END_HEADERS: u8 = 0x4;
const PADDED: u8 = 0x8;
const PRIORITY: u8 = 0x20;
/// How much one read asks for when frame headers are needed.
const READ_CHUNK: usize = 16 * 1024;
/// HEADERS frames larger than this are passed through unexamined.
const MAX_COLLECT: usize = 64 * 1024;

enum State {
    /// Passing the client preface.
    Preface(usize),
    /// Reading a 9-byte frame header.
    Header,
    /// Passing `n` more payload bytes untouched.
    Pass(usize),
    /// Collecting a HEADERS payload of this length.
    Collect { len: usize, flags: u8 },
}

/// A client stream whose inbound HTTP/2 HEADERS get a malformed `:authority` repaired.
pub struct AuthorityFix<S> {
    inner: S,
    state: State,
    header: [u8; FRAME_HEADER_LEN],
    /// Bytes read from the client but not yet processed.
    inbuf: BytesMut,
    payload: Vec<u8>,
    /// Processed bytes not yet handed to the reader.
    pending: BytesMut,
    /// How long a client may take to send its preface and first frame, or to finish a header
    /// block it began (HEADERS without END_HEADERS); `None`: no limit.
    handshake_timeout: Option<std::time::Duration>,
    /// The running deadline, and what the client has not finished by then.
    deadline: Option<(Pin<Box<tokio::time::Sleep>>, &'static str)>,
}

impl<S> AuthorityFix<S> {
    pub fn new(inner: S) -> Self {
        Self {
            inner,
            state: State::Preface(PREFACE_LEN),
            header: [0; FRAME_HEADER_LEN],
            inbuf: BytesMut::new(),
            payload: Vec::new(),
            pending: BytesMut::new(),
            handshake_timeout: None,
            deadline: None,
        }
    }

    /// Also ends the connection (a `TimedOut` read error) when the client has not sent its
    /// HTTP/2 preface and first frame within `timeout`, or leaves a header block unfinished
    /// (HEADERS without END_HEADERS, then no CONTINUATION ending it) for `timeout`: slowloris.
    /// An idle connection between requests is never timed out here.
    pub fn with_handshake_timeout(inner: S, timeout: std::time::Duration) -> Self {
        let mut fix = Self::new(inner);
        fix.handshake_timeout = Some(timeout);
        fix.arm("the HTTP/2 preface");
        fix
    }

    fn arm(&mut self, what: &'static str) {
        if let Some(timeout) = self.handshake_timeout {
            self.deadline = Some((Box::pin(tokio::time::sleep(timeout)), what));
        }
    }

    /// Deadlines, at each frame header: the preface is done at the first frame; a header
    /// block is open from a HEADERS without END_HEADERS to the CONTINUATION ending it.
    fn track_deadline(&mut self, kind: u8, flags: u8) {
        if self.handshake_timeout.is_some() {
            if kind == HEADERS && flags & END_HEADERS == 0 {
                self.arm("a header block (HEADERS then CONTINUATION frames)");
            } else if kind != CONTINUATION || flags & END_HEADERS != 0 {
                self.deadline = None;
            }
        }
    }

    pub fn get_ref(&self) -> &S {
        &self.inner
    }
}

impl<S: AsyncRead + Unpin> AuthorityFix<S> {
    /// Reads more bytes into `inbuf` (one read can carry several small frames).
    fn fill(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
        self.inbuf.reserve(READ_CHUNK);
        tokio_util::io::poll_read_buf(Pin::new(&mut self.inner), cx, &mut self.inbuf)
    }

    /// Scans bytes just read into the reader's buffer, in place: passes preface and frame
    /// payloads, repairs complete HEADERS frames. Returns how many of them can be handed out;
    /// the rest (a frame header or a HEADERS frame cut by the end of the read) is collected by
    /// the slow path first.
    fn scan(&mut self, buf: &mut [u8]) -> usize {
        let mut pos = 0;
        while pos < buf.len() {
            match self.state {
                State::Preface(left) | State::Pass(left) => {
                    let n = left.min(buf.len() - pos);
                    pos += n;
                    self.state = match self.state {
                        State::Preface(_) if n < left => State::Preface(left - n),
                        State::Pass(_) if n < left => State::Pass(left - n),
                        _ => State::Header,
                    };
                }
                State::Header => {
                    if buf.len() - pos < FRAME_HEADER_LEN {
                        return pos;
                    }
                    let header = &buf[pos..pos + FRAME_HEADER_LEN];
                    let len = usize::from(header[0]) << 16
                        | usize::from(header[1]) << 8
                        | usize::from(header[2]);
                    let (kind, flags) = (header[3], header[4]);
                    if kind == HEADERS && len <= MAX_COLLECT && len > 0 {
                        let payload = pos + FRAME_HEADER_LEN;
                        if buf.len() - payload < len {
                            // The slow path collects the frame and sees its header then.
                            return pos;
                        }
                        self.track_deadline(kind, flags);
                        if flags & END_HEADERS != 0 {
                            repair_headers_payload(flags, &mut buf[payload..payload + len]);
                        }
                        pos = payload + len;
                    } else {
                        self.track_deadline(kind, flags);
                        pos += FRAME_HEADER_LEN;
                        self.state = if len == 0 {
                            State::Header
                        } else {
                            State::Pass(len)
                        };
                    }
                }
                State::Collect { .. } => return pos,
            }
        }
        pos
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for AuthorityFix<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        out: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        let polled = this.poll_fix(cx, out);
        if polled.is_pending() {
            if let Some((sleep, what)) = this.deadline.as_mut() {
                if sleep.as_mut().poll(cx).is_ready() {
                    let timeout = this.handshake_timeout.unwrap_or_default();
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        format!("the client did not complete {what} within {timeout:?}"),
                    )));
                }
            }
        }
        polled
    }
}

impl<S: AsyncRead + Unpin> AuthorityFix<S> {
    fn poll_fix(&mut self, cx: &mut Context<'_>, out: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self;
        loop {
            if !this.pending.is_empty() {
                let n = this.pending.len().min(out.remaining());
                out.put_slice(&this.pending[..n]);
                this.pending.advance(n);
                return Poll::Ready(Ok(()));
            }
            if this.inbuf.is_empty() && !matches!(this.state, State::Collect { .. }) {
                // Fast path: read straight into the reader's buffer and scan in place. Buffers
                // of an earlier slow path are released (an idle connection holds none).
                if this.inbuf.capacity() > 0 {
                    this.inbuf = BytesMut::new();
                    this.payload = Vec::new();
                    this.pending = BytesMut::new();
                }
                let start = out.filled().len();
                ready!(Pin::new(&mut this.inner).poll_read(cx, out))?;
                let end = out.filled().len();
                if end == start {
                    return Poll::Ready(Ok(()));
                }
                let keep = this.scan(&mut out.filled_mut()[start..end]);
                if start + keep < end {
                    this.inbuf
                        .extend_from_slice(&out.filled()[start + keep..end]);
                    out.set_filled(start + keep);
                }
                if keep > 0 {
                    return Poll::Ready(Ok(()));
                }
                continue;
            }
            match this.state {
                State::Preface(left) | State::Pass(left) => {
                    let n = left.min(this.inbuf.len()).min(out.remaining());
                    out.put_slice(&this.inbuf[..n]);
                    this.inbuf.advance(n);
                    this.state = match this.state {
                        State::Preface(_) if n < left => State::Preface(left - n),
                        State::Pass(_) if n < left => State::Pass(left - n),
                        _ => State::Header,
                    };
                    return Poll::Ready(Ok(()));
                }
                State::Header => {
                    if this.inbuf.len() < FRAME_HEADER_LEN {
                        if ready!(this.fill(cx))? == 0 {
                            // EOF inside a frame header: hand on what there is; HTTP/2 reports it.
                            if this.inbuf.is_empty() {
                                return Poll::Ready(Ok(()));
                            }
                            this.pending.extend_from_slice(&this.inbuf);
                            this.inbuf.clear();
                        }
                        continue;
                    }
                    this.header.copy_from_slice(&this.inbuf[..FRAME_HEADER_LEN]);
                    this.inbuf.advance(FRAME_HEADER_LEN);
                    let len = usize::from(this.header[0]) << 16
                        | usize::from(this.header[1]) << 8
                        | usize::from(this.header[2]);
                    let (kind, flags) = (this.header[3], this.header[4]);
                    this.track_deadline(kind, flags);
                    if kind == HEADERS && len <= MAX_COLLECT && len > 0 {
                        this.payload.clear();
                        this.payload.reserve(len);
                        this.state = State::Collect { len, flags };
                    } else {
                        this.pending.extend_from_slice(&this.header);
                        this.state = if len == 0 {
                            State::Header
                        } else {
                            State::Pass(len)
                        };
                    }
                }
                State::Collect { len, flags } => {
                    if this.inbuf.is_empty() && ready!(this.fill(cx))? == 0 {
                        // EOF inside the frame: hand on what there is.
                        this.pending.extend_from_slice(&this.header);
                        this.pending.extend_from_slice(&this.payload);
                        this.state = State::Header;
                        continue;
                    }
                    let n = (len - this.payload.len()).min(this.inbuf.len());
                    this.payload.extend_from_slice(&this.inbuf[..n]);
                    this.inbuf.advance(n);
                    if this.payload.len() < len {
                        continue;
                    }
                    if flags & END_HEADERS != 0 {
                        repair_headers_payload(flags, &mut this.payload);
                    }
                    this.pending.extend_from_slice(&this.header);
                    this.pending.extend_from_slice(&this.payload);
                    this.state = State::Header;
                }
            }
        }
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for AuthorityFix<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// Reads an HPACK integer with an `n`-bit prefix at `pos`; returns (value, next position).
fn hpack_int(block: &[u8], pos: usize, prefix_bits: u8) -> Option<(usize, usize)> {
    let max = (1usize << prefix_bits) - 1;
    let mut value = usize::from(*block.get(pos)?) & max;
    let mut pos = pos + 1;
    if value < max {
        return Some((value, pos));
    }
    let mut shift = 0u32;
    loop {
        let byte = *block.get(pos)?;
        pos += 1;
        value = value.checked_add(usize::from(byte & 0x7f).checked_shl(shift)?)?;
        if byte & 0x80 == 0 {
            return Some((value, pos));
        }
        shift += 7;
        if shift > 28 {
            return None;
        }
    }
}

/// A string literal at `pos`: (huffman, byte range, next position).
fn hpack_string(block: &[u8], pos: usize) -> Option<(bool, std::ops::Range<usize>, usize)> {
    let huffman = block.get(pos)? & 0x80 != 0;
    let (len, start) = hpack_int(block, pos, 7)?;
    let end = start.checked_add(len)?;
    (end <= block.len()).then_some((huffman, start..end, end))
}

/// Repairs a malformed `:authority` in a complete HEADERS payload, in place. Anything it does
/// not understand is left exactly as it was.
pub fn repair_headers_payload(flags: u8, payload: &mut [u8]) {
    let mut start = 0;
    let mut end = payload.len();
    if flags & PADDED != 0 {
        let Some(&pad) = payload.first() else { return };
        start = 1;
        end = match end.checked_sub(usize::from(pad)) {
            Some(end) if end >= start => end,
            _ => return,
        };
    }
    if flags & PRIORITY != 0 {
        start += 5;
    }
    if start > end {
        return;
    }
    let block = &mut payload[start..end];
    let mut pos = 0;
    while pos < block.len() {
        let first = block[pos];
        let (name_index, after_name_index) = if first & 0x80 != 0 {
            // Indexed field: nothing literal to see.
            match hpack_int(block, pos, 7) {
                Some((_, next)) => {
                    pos = next;
                    continue;
                }
                None => return,
            }
        } else if first & 0xc0 == 0x40 {
            match hpack_int(block, pos, 6) {
                Some(found) => found,
                None => return,
            }
        } else if first & 0xe0 == 0x20 {
            // Dynamic table size update.
            match hpack_int(block, pos, 5) {
                Some((_, next)) => {
                    pos = next;
                    continue;
                }
                None => return,
            }
        } else {
            match hpack_int(block, pos, 4) {
                Some(found) => found,
                None => return,
            }
        };
        let (is_authority, value_pos) = if name_index == 0 {
            let Some((huffman, range, next)) = hpack_string(block, after_name_index) else {
                return;
            };
            let name = &block[range];
            let is_authority = if huffman {
                let mut decoded = Vec::new();
                httlib_huffman::decode(name, &mut decoded, httlib_huffman::DecoderSpeed::FourBits)
                    .is_ok()
                    && decoded == b":authority"
            } else {
                name == b":authority"
            };
            (is_authority, next)
        } else {
            // Static table entry 1 is `:authority`; a dynamic-table name is never rewritten.
            (name_index == 1, after_name_index)
        };
        let Some((huffman, range, next)) = hpack_string(block, value_pos) else {
            return;
        };
        if is_authority {
            repair_value(huffman, &mut block[range]);
        }
        pos = next;
    }
}

/// `scheme://host:port` -> `schemex--host:port`, same length, raw or Huffman-coded.
fn repair_value(huffman: bool, value: &mut [u8]) {
    let mut text = Vec::new();
    if huffman {
        if httlib_huffman::decode(value, &mut text, httlib_huffman::DecoderSpeed::FourBits).is_err()
        {
            return;
        }
    } else {
        text.extend_from_slice(value);
    }
    if http::uri::Authority::try_from(text.as_slice()).is_ok() {
        return;
    }
    let Some(at) = text.windows(3).position(|w| w == b"://") else {
        return;
    };
    text[at..at + 3].copy_from_slice(b"x--");
    if http::uri::Authority::try_from(text.as_slice()).is_err() {
        return;
    }
    if huffman {
        let mut encoded = Vec::with_capacity(value.len());
        if httlib_huffman::encode(&text, &mut encoded).is_ok() && encoded.len() == value.len() {
            value.copy_from_slice(&encoded);
        }
    } else {
        value.copy_from_slice(&text);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncReadExt;

    fn literal(name_index: u8, value: &[u8], huffman: bool) -> Vec<u8> {
        let mut out = vec![0x40 | name_index];
        let bytes = if huffman {
            let mut encoded = Vec::new();
            httlib_huffman::encode(value, &mut encoded).expect("huffman");
            encoded
        } else {
            value.to_vec()
        };
        out.push((if huffman { 0x80 } else { 0 }) | bytes.len() as u8);
        out.extend_from_slice(&bytes);
        out
    }

    fn decoded_authority(block: &[u8], huffman: bool) -> Vec<u8> {
        let (_, after) = hpack_int(block, 0, 6).expect("index");
        let (_, range, _) = hpack_string(block, after).expect("value");
        if huffman {
            let mut out = Vec::new();
            httlib_huffman::decode(
                &block[range],
                &mut out,
                httlib_huffman::DecoderSpeed::FourBits,
            )
            .expect("decode");
            out
        } else {
            block[range].to_vec()
        }
    }

    #[test]
    fn a_scheme_prefixed_authority_is_repaired_at_the_same_length() {
        for huffman in [false, true] {
            let mut block = vec![0x83]; // :method POST (indexed)
            let before = literal(1, b"tcp://127.0.0.1:1234", huffman);
            block.extend_from_slice(&before);
            let len = block.len();
            repair_headers_payload(END_HEADERS, &mut block);
            assert_eq!(block.len(), len);
            assert_eq!(
                decoded_authority(&block[1..], huffman),
                b"tcpx--127.0.0.1:1234",
                "huffman={huffman}"
            );
        }
    }

    #[test]
    fn valid_authorities_and_other_headers_are_untouched() {
        for value in [
            &b"127.0.0.1:1234"[..],
            b"localhost",
            b"buildkit-router.buildkit.svc:1234",
        ] {
            for huffman in [false, true] {
                let mut block = literal(1, value, huffman);
                let original = block.clone();
                repair_headers_payload(END_HEADERS, &mut block);
                assert_eq!(block, original);
            }
        }
        // :path (index 4) with a `://` in it stays as it is.
        let mut block = literal(4, b"/a://b", false);
        let original = block.clone();
        repair_headers_payload(END_HEADERS, &mut block);
        assert_eq!(block, original);
    }

    #[test]
    fn padded_and_prioritised_frames_and_garbage_never_panic() {
        let mut payload = vec![2, 0, 0, 0, 1, 16];
        payload.extend_from_slice(&literal(1, b"tcp://h:1", false));
        payload.extend_from_slice(&[0, 0]);
        repair_headers_payload(END_HEADERS | PADDED | PRIORITY, &mut payload);
        assert_eq!(&payload[6..8], &[0x41, 9]);
        assert_eq!(&payload[8..17], b"tcpx--h:1");
        let mut rng_state = 7u32;
        for len in 0..64 {
            let mut junk: Vec<u8> = (0..len)
                .map(|_| {
                    rng_state = rng_state.wrapping_mul(1_103_515_245).wrapping_add(12345);
                    (rng_state >> 16) as u8
                })
                .collect();
            repair_headers_payload(END_HEADERS | PADDED | PRIORITY, &mut junk);
            repair_headers_payload(END_HEADERS, &mut junk);
        }
    }

    /// `wire` read through the fix in reads of at most `chunk` bytes.
    async fn through_fix(wire: &[u8], chunk: usize) -> Vec<u8> {
        let (mut client, server) = tokio::io::duplex(chunk);
        let write = async {
            use tokio::io::AsyncWriteExt;
            client.write_all(wire).await.expect("write");
        };
        let read = async {
            let mut fixed = AuthorityFix::new(server);
            let mut out = vec![0; wire.len()];
            fixed.read_exact(&mut out).await.expect("read");
            out
        };
        tokio::join!(write, read).1
    }

    /// Whatever the reads' sizes (HEADERS frames and frame headers cut anywhere, or whole
    /// frames in one read: the in-place path), the bytes come out the same and repaired.
    #[tokio::test]
    async fn every_read_size_gives_the_same_repaired_stream() {
        let mut wire = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
        wire.extend_from_slice(&[0, 0, 0, 4, 0, 0, 0, 0, 0]);
        let block = literal(1, b"tcp://127.0.0.1:1234", true);
        let mut headers = vec![0, 0, block.len() as u8, HEADERS, END_HEADERS, 0, 0, 0, 1];
        headers.extend_from_slice(&block);
        let data = [0, 0, 5, 0, 1, 0, 0, 0, 1, 0, 0, 0, 0, 0];
        let mut expected = wire.clone();
        let mut repaired = headers.clone();
        repair_headers_payload(END_HEADERS, &mut repaired[9..]);
        for _ in 0..2 {
            wire.extend_from_slice(&headers);
            wire.extend_from_slice(&data);
            expected.extend_from_slice(&repaired);
            expected.extend_from_slice(&data);
        }
        assert_ne!(expected, wire);
        for chunk in 1..=wire.len() + 1 {
            let out = through_fix(&wire, chunk).await;
            assert_eq!(out, expected, "reads of up to {chunk} bytes");
        }
    }

    #[tokio::test]
    async fn the_stream_passes_every_byte_and_repairs_only_headers() {
        let mut wire = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
        wire.extend_from_slice(&[0, 0, 0, 4, 0, 0, 0, 0, 0]); // SETTINGS, empty
        let block = literal(1, b"tcp://127.0.0.1:1234", true);
        wire.extend_from_slice(&[0, 0, block.len() as u8, HEADERS, END_HEADERS, 0, 0, 0, 1]);
        wire.extend_from_slice(&block);
        wire.extend_from_slice(&[0, 0, 5, 0, 1, 0, 0, 0, 1, 0, 0, 0, 0, 0]); // DATA, END_STREAM
        let out = through_fix(&wire, 7).await; // tiny chunks: every boundary splits
        assert_eq!(out.len(), wire.len());
        let headers_at = PREFACE_LEN + 9 + 9;
        assert_eq!(
            &out[..headers_at],
            &wire[..headers_at],
            "preface and SETTINGS untouched"
        );
        assert_eq!(
            &out[headers_at + block.len()..],
            &wire[headers_at + block.len()..],
            "DATA untouched"
        );
        assert_eq!(
            decoded_authority(&out[headers_at..headers_at + block.len()], true),
            b"tcpx--127.0.0.1:1234"
        );
    }
}
