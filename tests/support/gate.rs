//! A daemon's sockets as a SIGSTOPped process leaves them, on demand: [`Gate::freeze`] stops
//! every read and write on its connections and stops accepting, while the kernel still completes
//! TCP handshakes into the listen backlog and buffers what peers send. [`Gate::thaw`] resumes
//! them where they stopped. The gate also counts the HTTP/2 frames a peer sends that tests care
//! about (PING, GOAWAY), by parsing the frame headers of the incoming byte stream.

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::watch;

/// Freezes and thaws every connection of one daemon.
#[derive(Default)]
pub struct Gate {
    frozen: watch::Sender<bool>,
    wakers: Mutex<Vec<Waker>>,
    /// PING frames (not ACKs) received from peers.
    pings: AtomicU64,
    /// GOAWAY frames received from peers.
    goaways: AtomicU64,
}

impl Gate {
    pub fn new() -> Arc<Gate> {
        Arc::new(Gate::default())
    }

    /// Stops every read, write and accept, as SIGSTOP does.
    pub fn freeze(&self) {
        self.frozen.send_replace(true);
    }

    /// Resumes everything (SIGCONT).
    pub fn thaw(&self) {
        self.frozen.send_replace(false);
        for waker in self.wakers.lock().unwrap().drain(..) {
            waker.wake();
        }
    }

    pub fn is_frozen(&self) -> bool {
        *self.frozen.borrow()
    }

    /// Waits until the gate is open (for the accept loop).
    pub async fn opened(&self) {
        let mut rx = self.frozen.subscribe();
        let _ = rx.wait_for(|frozen| !frozen).await;
    }

    /// PING frames (not ACKs) peers sent to this daemon.
    pub fn pings(&self) -> u64 {
        self.pings.load(Ordering::SeqCst)
    }

    /// GOAWAY frames peers sent to this daemon.
    pub fn goaways(&self) -> u64 {
        self.goaways.load(Ordering::SeqCst)
    }

    /// `Pending` (with the waker kept) while frozen.
    fn poll_open(&self, cx: &mut Context<'_>) -> Poll<()> {
        if !self.is_frozen() {
            return Poll::Ready(());
        }
        self.wakers.lock().unwrap().push(cx.waker().clone());
        // Thawed between the check and the push: do not sleep through it.
        if self.is_frozen() {
            Poll::Pending
        } else {
            Poll::Ready(())
        }
    }
}

/// Where the frame parser is in the incoming byte stream.
enum Parse {
    /// Skipping the client connection preface (24 bytes) still to come.
    Preface(usize),
    /// Collecting a 9-byte frame header.
    Header { buf: [u8; 9], got: usize },
    /// Skipping a frame payload.
    Payload(usize),
    /// Not HTTP/2 (e.g. TLS): nothing is counted.
    Off,
}

/// One connection behind a [`Gate`].
pub struct GatedIo<IO> {
    inner: IO,
    gate: Arc<Gate>,
    parse: Parse,
}

impl<IO> GatedIo<IO> {
    /// `h2c`: the incoming bytes are HTTP/2 from the start and their frames are counted.
    pub fn new(inner: IO, gate: Arc<Gate>, h2c: bool) -> Self {
        Self {
            inner,
            gate,
            parse: if h2c { Parse::Preface(24) } else { Parse::Off },
        }
    }

    fn observe(&mut self, mut data: &[u8]) {
        while !data.is_empty() {
            match &mut self.parse {
                Parse::Off => return,
                Parse::Preface(left) | Parse::Payload(left) => {
                    let n = (*left).min(data.len());
                    *left -= n;
                    data = &data[n..];
                    if *left == 0 {
                        self.parse = Parse::Header {
                            buf: [0; 9],
                            got: 0,
                        };
                    }
                }
                Parse::Header { buf, got } => {
                    let n = (9 - *got).min(data.len());
                    buf[*got..*got + n].copy_from_slice(&data[..n]);
                    *got += n;
                    data = &data[n..];
                    if *got == 9 {
                        let len = u32::from_be_bytes([0, buf[0], buf[1], buf[2]]) as usize;
                        let (kind, flags) = (buf[3], buf[4]);
                        match kind {
                            0x6 if flags & 0x1 == 0 => {
                                self.gate.pings.fetch_add(1, Ordering::SeqCst);
                            }
                            0x7 => {
                                self.gate.goaways.fetch_add(1, Ordering::SeqCst);
                            }
                            _ => {}
                        }
                        self.parse = if len == 0 {
                            Parse::Header {
                                buf: [0; 9],
                                got: 0,
                            }
                        } else {
                            Parse::Payload(len)
                        };
                    }
                }
            }
        }
    }
}

impl<IO: AsyncRead + Unpin> AsyncRead for GatedIo<IO> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        std::task::ready!(self.gate.poll_open(cx));
        let before = buf.filled().len();
        let this = &mut *self;
        let result = Pin::new(&mut this.inner).poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = result {
            this.observe(&buf.filled()[before..]);
        }
        result
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for GatedIo<IO> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        std::task::ready!(self.gate.poll_open(cx));
        Pin::new(&mut self.inner).poll_write(cx, data)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        std::task::ready!(self.gate.poll_open(cx));
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        std::task::ready!(self.gate.poll_open(cx));
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}
