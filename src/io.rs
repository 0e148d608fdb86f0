//! The byte stream under every HTTP/2 connection the router makes or accepts: a TCP socket
//! that reads ahead and coalesces writes, so HTTP/2 frames cost fewer system calls.
//!
//! Why: on loopback and in virtual machines a `writev` or `recvfrom` costs several microseconds
//! and each write is a packet through the whole TCP stack. The `h2` crate writes each DATA frame
//! larger than 256 bytes with its own `writev` (it chains the payload instead of copying it, and
//! flushes before the next one), and reads into an 8 KiB buffer. Relaying a build context that
//! meant one `writev` per 16 KiB frame toward buildkitd (its maximum frame size) and one
//! `recvfrom` per 8 KiB from the client; a unary call's answer went out as two writes
//! (HEADERS+DATA, then the trailers). Here:
//!
//! - **Writes** are copied into a buffer and written when HTTP/2 flushes with nothing new to
//!   write. A flush that follows new bytes (and finds fewer than [`WRITE_AT`] buffered) is
//!   deferred: the task is woken and the flush reports success, so HTTP/2 goes on encoding the
//!   frames it has, and the connection's task runs again after the other ready tasks (which may
//!   queue more frames). Its next flush with nothing new writes everything in one system call.
//!   Nothing waits on a timer: a deferred flush always ends with the task's next poll. A full
//!   buffer, shutdown, and drop (best effort, non-blocking) write at once. This relies on the
//!   caller flushing again whenever its task runs, as h2 does after every poll; a TLS
//!   handshake does not, so it runs with deferral off ([`BufferedIo::set_defer_flush`]).
//!   Toward backends only bulk writes are deferred ([`BufferedIo::set_defer_small`]).
//! - **Reads** go straight into the reader's buffer, except when the last read filled it
//!   completely (a bulk transfer): then one read of up to [`READ_AHEAD`] bytes is buffered
//!   here and handed out in pieces; a short read turns read-ahead off again.
//!
//! Memory: both buffers are released when they drain after small transfers, so an idle
//! connection holds none (see docs/performance.md, memory per held session).

use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

/// Writes are made as soon as this many bytes are buffered (eight 16 KiB HTTP/2 DATA frames).
/// 128 KiB rather than 64: in a 256 MiB build through the Session relay the router's CPU fell
/// from 1.27 to 1.22 ms/MiB and the context upload went from 0.87x to 0.90x direct (same run,
/// 20 rounds; 256 KiB measured the same as 128). Only bulk transfers fill it.
pub const WRITE_AT: usize = 128 * 1024;

/// Writes of at least this many bytes are a bulk transfer (one 16 KiB HTTP/2 DATA frame, the
/// largest buildkitd accepts, and its header).
pub const BULK: usize = 16 * 1024;

/// Size of one read-ahead: a few frames of a bulk transfer per system call (see [`WRITE_AT`]
/// for why 128 KiB).
pub const READ_AHEAD: usize = 128 * 1024;

/// Buffers that drained after a transfer smaller than this are released.
const KEEP_AFTER: usize = 16 * 1024;

/// A TCP stream with read-ahead and coalesced writes (see the module docs).
pub struct BufferedIo {
    inner: TcpStream,
    /// Bytes read ahead and not yet handed out.
    rbuf: BytesMut,
    /// The last direct read filled the reader's whole buffer: read ahead next time.
    read_ahead: bool,
    /// Bytes written by HTTP/2 and not yet written to the socket.
    wbuf: BytesMut,
    /// Bytes were buffered since the last flush.
    fresh: bool,
    /// Flushes may be deferred (off during a TLS handshake, whose driver does not flush
    /// again when woken: see [`BufferedIo::set_defer_flush`]).
    defer: bool,
    /// Flushes of fewer than [`BULK`] buffered bytes are deferred too (see
    /// [`BufferedIo::set_defer_small`]).
    defer_small: bool,
}

impl BufferedIo {
    pub fn new(inner: TcpStream) -> Self {
        Self {
            inner,
            rbuf: BytesMut::new(),
            read_ahead: false,
            wbuf: BytesMut::new(),
            fresh: false,
            defer: true,
            defer_small: true,
        }
    }

    /// Whether a flush right after new bytes may be deferred to the task's next poll. That is
    /// only safe under a caller that flushes again every time its task runs, as h2 does
    /// (directly or through TLS); a TLS handshake does not, so TLS streams turn it off until
    /// the handshake is done.
    pub fn set_defer_flush(&mut self, defer: bool) {
        self.defer = defer;
    }

    /// Whether a flush of fewer than [`BULK`] bytes may be deferred (default: yes). Toward a
    /// backend it is turned off: there the caller's own task queues a unary call's head and
    /// body before the connection's task runs, so nothing would join a small write, and
    /// deferring it only costs the connection's task another run (about 2 300 instructions per
    /// unary call, with the same number of writes: docs/performance.md). Toward a client it
    /// stays on: hyper's stream task queues an answer's trailers after its headers and data,
    /// and would otherwise cost a second write.
    pub fn set_defer_small(&mut self, defer: bool) {
        self.defer_small = defer;
    }

    pub fn get_ref(&self) -> &TcpStream {
        &self.inner
    }

    /// Writes the whole write buffer to the socket.
    fn poll_write_out(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let batch = self.wbuf.len();
        while !self.wbuf.is_empty() {
            let n = ready!(Pin::new(&mut self.inner).poll_write(cx, &self.wbuf))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.wbuf.advance(n);
        }
        self.fresh = false;
        if batch < KEEP_AFTER {
            self.wbuf = BytesMut::new();
        } else {
            self.wbuf.clear();
        }
        Poll::Ready(Ok(()))
    }

    /// Makes room in the write buffer for `len` more bytes (after [`Self::poll_room`]). A bulk
    /// transfer gets room for a whole batch at once: growing by doubling copied the batch so
    /// far at every step (7 % of the router's instructions in a 256 MiB build, callgrind).
    fn reserve(&mut self, len: usize) {
        if self.wbuf.capacity() - self.wbuf.len() < len {
            let batch = self.wbuf.len() + len;
            let room = if batch >= BULK {
                WRITE_AT.max(batch)
            } else {
                batch
            };
            self.wbuf.reserve(room - self.wbuf.len());
        }
    }

    /// Makes room for `len` more bytes in the write buffer, writing it out if needed.
    fn poll_room(&mut self, cx: &mut Context<'_>, len: usize) -> Poll<io::Result<()>> {
        if !self.wbuf.is_empty() && self.wbuf.len() + len > WRITE_AT {
            ready!(self.poll_write_out(cx))?;
        }
        Poll::Ready(Ok(()))
    }
}

impl AsyncRead for BufferedIo {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        out: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if !this.rbuf.is_empty() {
            let n = this.rbuf.len().min(out.remaining());
            out.put_slice(&this.rbuf[..n]);
            this.rbuf.advance(n);
            if this.rbuf.is_empty() && !this.read_ahead {
                this.rbuf = BytesMut::new();
            }
            return Poll::Ready(Ok(()));
        }
        let want = out.remaining();
        if !this.read_ahead || want >= READ_AHEAD {
            let before = out.filled().len();
            ready!(Pin::new(&mut this.inner).poll_read(cx, out))?;
            let n = out.filled().len() - before;
            this.read_ahead = n > 0 && n == want && want < READ_AHEAD;
            return Poll::Ready(Ok(()));
        }
        // A bulk transfer: one large read, handed out in pieces.
        this.rbuf.reserve(READ_AHEAD);
        let n = ready!(tokio_util::io::poll_read_buf(
            Pin::new(&mut this.inner),
            cx,
            &mut this.rbuf
        ))?;
        if n < KEEP_AFTER {
            this.read_ahead = false;
        }
        let give = this.rbuf.len().min(out.remaining());
        out.put_slice(&this.rbuf[..give]);
        this.rbuf.advance(give);
        if this.rbuf.is_empty() && !this.read_ahead {
            this.rbuf = BytesMut::new();
        }
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for BufferedIo {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        ready!(this.poll_room(cx, buf.len()))?;
        if this.wbuf.is_empty() && buf.len() >= WRITE_AT {
            // Large enough on its own: no copy.
            return Pin::new(&mut this.inner).poll_write(cx, buf);
        }
        this.reserve(buf.len());
        this.wbuf.extend_from_slice(buf);
        this.fresh = true;
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        let total: usize = bufs.iter().map(|b| b.len()).sum();
        ready!(this.poll_room(cx, total))?;
        if this.wbuf.is_empty() && total >= WRITE_AT {
            return Pin::new(&mut this.inner).poll_write_vectored(cx, bufs);
        }
        this.reserve(total);
        for buf in bufs {
            this.wbuf.extend_from_slice(buf);
        }
        this.fresh = true;
        Poll::Ready(Ok(total))
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if this.wbuf.is_empty() {
            return Pin::new(&mut this.inner).poll_flush(cx);
        }
        let len = this.wbuf.len();
        if this.defer && this.fresh && len < WRITE_AT && (this.defer_small || len >= BULK) {
            // More frames may follow (from this task, or from the other ready tasks before it
            // runs again): this task runs again, and its next flush with nothing new writes
            // everything at once.
            this.fresh = false;
            cx.waker().wake_by_ref();
            return Poll::Ready(Ok(()));
        }
        ready!(this.poll_write_out(cx))?;
        Pin::new(&mut this.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        ready!(self.poll_write_out(cx))?;
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

impl Drop for BufferedIo {
    fn drop(&mut self) {
        // Frames of a connection dropped right after a deferred flush (a last GOAWAY or
        // RST_STREAM): hand them to the kernel if it takes them now; never block.
        while !self.wbuf.is_empty() {
            match self.inner.try_write(&self.wbuf) {
                Ok(n) if n > 0 => self.wbuf.advance(n),
                _ => break,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    async fn pair() -> (BufferedIo, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (client, server) = tokio::join!(TcpStream::connect(addr), listener.accept());
        (BufferedIo::new(client.unwrap()), server.unwrap().0)
    }

    /// Every byte written arrives in order, whatever the mix of small, vectored and large
    /// writes, once the writer flushes (deferred flushes included).
    #[tokio::test]
    async fn writes_arrive_whole_and_in_order() {
        let (mut io, mut peer) = pair().await;
        let mut expected = Vec::new();
        let reader = tokio::spawn(async move {
            let mut got = Vec::new();
            peer.read_to_end(&mut got).await.unwrap();
            got
        });
        for i in 0..200u32 {
            let len = [1usize, 9, 300, 16 * 1024, 70 * 1024][i as usize % 5];
            let chunk: Vec<u8> = (0..len).map(|j| (i as usize + j) as u8).collect();
            if i % 3 == 0 {
                let (a, b) = chunk.split_at(len / 2);
                let n = io
                    .write_vectored(&[io::IoSlice::new(a), io::IoSlice::new(b)])
                    .await
                    .unwrap();
                expected.extend_from_slice(&chunk[..n]);
                io.write_all(&chunk[n..]).await.unwrap();
                expected.extend_from_slice(&chunk[n..]);
            } else {
                io.write_all(&chunk).await.unwrap();
                expected.extend_from_slice(&chunk);
            }
            if i % 7 == 0 {
                io.flush().await.unwrap();
            }
        }
        io.shutdown().await.unwrap();
        drop(io);
        assert_eq!(reader.await.unwrap(), expected);
    }

    /// A deferred flush still reaches the peer: the task is woken and the next flush writes.
    #[tokio::test]
    async fn a_deferred_flush_is_written_on_the_next_poll() {
        let (mut io, mut peer) = pair().await;
        io.write_all(b"ping").await.unwrap();
        // The first flush is deferred (reported done); a second one, as the HTTP/2 task
        // makes when it runs again, writes.
        io.flush().await.unwrap();
        io.flush().await.unwrap();
        let mut got = [0u8; 4];
        peer.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"ping");
    }

    /// Bytes buffered by a deferred flush are handed to the kernel when the stream is dropped.
    #[tokio::test]
    async fn dropping_after_a_deferred_flush_loses_nothing() {
        let (mut io, mut peer) = pair().await;
        io.write_all(b"goaway").await.unwrap();
        io.flush().await.unwrap();
        drop(io);
        let mut got = Vec::new();
        peer.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, b"goaway");
    }

    /// Reads return the same bytes with small and large reader buffers (read-ahead on and
    /// off), and EOF at the end.
    #[tokio::test]
    async fn reads_return_every_byte_with_and_without_read_ahead() {
        let (io, mut peer) = pair().await;
        let data: Vec<u8> = (0..3 * 1024 * 1024).map(|i| (i * 7 + 3) as u8).collect();
        let sent = data.clone();
        let writer = tokio::spawn(async move {
            for chunk in sent.chunks(40_000) {
                peer.write_all(chunk).await.unwrap();
            }
        });
        let mut io = io;
        let mut got = Vec::new();
        let mut sizes = [8 * 1024, 100, 8 * 1024, 128 * 1024, 3].into_iter().cycle();
        loop {
            let mut buf = vec![0u8; sizes.next().unwrap()];
            let n = io.read(&mut buf).await.unwrap();
            if n == 0 {
                break;
            }
            got.extend_from_slice(&buf[..n]);
            if got.len() == data.len() {
                writer.await.unwrap();
                // The writer is done and dropped: EOF next.
                assert_eq!(io.read(&mut [0u8; 16]).await.unwrap(), 0);
                break;
            }
        }
        assert_eq!(got, data);
    }
}
