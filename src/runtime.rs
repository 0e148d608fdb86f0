//! The process's runtime layout: one single-threaded tokio runtime per worker thread
//! ("thread per core", as HAProxy and Pingora run), each serving whole client connections.
//!
//! Why: a unary call crosses a client connection, a per-stream task, hyper's per-request task and
//! a backend connection. On tokio's work-stealing pool these hand-offs cross threads (a futex
//! wake and a context switch each) and idle workers are woken to look for work; with every task
//! of a connection on one thread they are plain queue pushes. Each worker also has its own
//! HTTP/2 connection to every backend ([`shard`]), so the backend side of a call stays on the
//! thread too. Measured in docs/performance.md.
//!
//! The accept loop and the background tasks (health checks, discovery, admin, queue) run on
//! worker 0, the main thread; connections are handed to the workers in turn.

use std::cell::Cell;
use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpStream;
use tokio::runtime::{Builder, Handle, Runtime};

thread_local! {
    static SHARD: Cell<usize> = const { Cell::new(0) };
}

/// The worker this thread is (0 on the main thread and on any thread of a work-stealing
/// runtime). Backends keep one HTTP/2 connection per shard.
pub fn shard() -> usize {
    SHARD.with(Cell::get)
}

/// A single-threaded runtime with every driver enabled.
pub fn single_threaded() -> std::io::Result<Runtime> {
    Builder::new_current_thread().enable_all().build()
}

/// Period of each worker's standing timer (see [`keep_timer_armed`]); per-call timeouts at
/// least this long register without waking the worker's I/O driver.
pub const TIMER_ANCHOR: Duration = Duration::from_millis(250);

/// Keeps one timer of this thread's runtime always due within [`TIMER_ANCHOR`].
///
/// Why: tokio's time driver wakes its I/O driver (an `eventfd` write, and an extra
/// `epoll_wait` round) whenever a timer is registered that is due before the deadline the
/// driver last parked with, even when that driver is this very thread and is busy running tasks
/// (tokio issue #5207). A worker with no other timers parks with no deadline, so every
/// ListWorkers' answer timeout (`--health-timeout`) cost one such wake: 1 `write` per call in
/// `strace -c`, measured at 1x1 on worker 1. With this timer standing, the driver always parks
/// with a deadline at most 250 ms ahead, and a later per-call deadline needs no wake. It costs
/// each worker 4 wake-ups a second.
pub async fn keep_timer_armed() {
    let mut tick = tokio::time::interval(TIMER_ANCHOR);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    loop {
        tick.tick().await;
    }
}

/// The worker threads that serve client connections, worker 0 being the caller's runtime.
pub struct Workers {
    handles: Vec<Handle>,
    next: AtomicUsize,
}

impl Workers {
    /// Starts `count - 1` worker threads, each running its own single-threaded runtime until
    /// the process ends, next to the caller's runtime (`main`), which is worker 0.
    pub fn start(main: Handle, count: usize) -> std::io::Result<Arc<Workers>> {
        main.spawn(keep_timer_armed());
        let mut handles = vec![main];
        for index in 1..count.max(1) {
            let runtime = single_threaded()?;
            handles.push(runtime.handle().clone());
            std::thread::Builder::new()
                .name(format!("worker-{index}"))
                .spawn(move || {
                    SHARD.with(|s| s.set(index));
                    // Runs the connections handed to it; ends with the process.
                    runtime.block_on(keep_timer_armed());
                })?;
        }
        Ok(Arc::new(Workers {
            handles,
            next: AtomicUsize::new(0),
        }))
    }

    /// Number of workers (backend connections per backend).
    pub fn len(&self) -> usize {
        self.handles.len()
    }

    pub fn is_empty(&self) -> bool {
        self.handles.is_empty()
    }

    /// Serves `stream` on the next worker in turn: `serve` runs there, with the socket
    /// registered with that worker's I/O driver.
    pub fn spawn_connection<F, Fut>(&self, stream: TcpStream, serve: F)
    where
        F: FnOnce(TcpStream) -> Fut + Send + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let index = self.next.fetch_add(1, Ordering::Relaxed) % self.handles.len();
        if index == shard() {
            tokio::spawn(serve(stream));
            return;
        }
        let stream = match stream.into_std() {
            Ok(stream) => stream,
            Err(error) => {
                tracing::warn!(%error, "cannot hand a connection to a worker");
                return;
            }
        };
        self.handles[index].spawn(async move {
            match TcpStream::from_std(stream) {
                Ok(stream) => serve(stream).await,
                Err(error) => tracing::warn!(%error, "cannot register a connection on its worker"),
            }
        });
    }
}
