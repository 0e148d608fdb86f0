//! A bound on the memory of requests the router reads to route them.
//!
//! Routed calls (Solve, Status, history, ListWorkers/Info, fan-outs) are read up to the end of
//! their first gRPC message before they can be routed, and a message may be as large as
//! `--max-message-size` (16 MiB by default, as BuildKit allows). Without a bound, 64 clients each
//! sending a 10 MiB Info took the router to 380 MB resident. [`RoutingBuffer`] gives every
//! message larger than [`RoutingBuffer::FREE`] bytes a share of one budget (`--routing-buffer`,
//! bytes) before it is read; a message that finds no room within `--routing-buffer-wait` is
//! refused with RESOURCE_EXHAUSTED, and nothing reaches a backend.
//!
//! The share is taken for the length the message declares (its gRPC prefix), all at once:
//! messages never hold part of the budget while they wait for more, so honest clients cannot
//! deadlock each other. Shares are granted first come, first served; a message larger than the
//! whole budget waits until it is alone. The share is kept until the message's bytes have been
//! given to the backend within its flow-control window (`RequestBody` and `upstream::pipe`), so
//! a frozen backend cannot make the router hold more than the budget either.
//!
//! A message waiting for room leaves its body unread, and HTTP/2 keeps what the client already
//! sent of it: up to one stream window. What the router read before the message waits comes on
//! top: its first DATA frame (up to the listener's 256 KiB frame size), and for a Solve up to
//! [`RoutingBuffer::FREE`] bytes and a frame (a Solve names its build in its leading bytes).
//! HTTP/2 gives the window of bytes read back to the client (at once when the client had sent
//! most of its window already), so they count apart. The number of waiting messages is
//! therefore bounded too (`--routing-buffer` / (stream window + 64 KiB + max frame size), at
//! least 1, see [`RoutingBuffer::held_per_waiter`]); past it, a message is refused at once. In
//! all, large first messages hold at most twice `--routing-buffer`.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use prometheus::{IntCounter, IntGauge};
use tokio::sync::Semaphore;

/// `--routing-buffer`, bytes: room for 16 messages of BuildKit's 16 MiB limit at once.
pub const DEFAULT_ROUTING_BUFFER: usize = 256 * 1024 * 1024;
/// `--routing-buffer-wait`.
pub const DEFAULT_ROUTING_BUFFER_WAIT: Duration = Duration::from_secs(30);
/// The listener's HTTP/2 initial stream window toward clients, bytes: what a client may send
/// on one call before the router reads it, hence the unit of the routing buffer's waiting room.
pub const DEFAULT_CLIENT_STREAM_WINDOW: u32 = 2 * 1024 * 1024;

/// The budget shared by every connection of one router.
#[derive(Debug, Clone)]
pub struct RoutingBuffer {
    shared: Arc<Shared>,
}

#[derive(Debug)]
struct Shared {
    /// Bytes free. Permits granted are forgotten and added back by [`BufferShare`]'s drop.
    room: Semaphore,
    /// In bytes, as `--routing-buffer` (0 is taken as 1).
    limit: usize,
    wait: Duration,
    /// Messages waiting for room now, and how many may.
    waiting: AtomicUsize,
    max_waiting: usize,
    /// Bytes granted now: the one count of them (the semaphore's free permits also exclude
    /// those set aside for the waiter at the head of its queue).
    in_use: IntGauge,
    refusals: IntCounter,
}

/// Why a message got no share of the budget.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BufferFull {
    #[error(
        "the router is already reading {in_use} bytes of requests to route them, and this \
         {len}-byte message found no room under --routing-buffer ({limit} bytes) within \
         {wait:?}; retry later, or raise --routing-buffer"
    )]
    Timeout {
        len: usize,
        in_use: usize,
        limit: usize,
        wait: Duration,
    },
    #[error(
        "the router is already reading {in_use} bytes of requests to route them and {waiting} \
         more wait for room under --routing-buffer ({limit} bytes), as many as may (waiting \
         calls hold unread bytes too); this {len}-byte message is refused at once; retry \
         later, or raise --routing-buffer"
    )]
    TooManyWaiting {
        len: usize,
        in_use: usize,
        limit: usize,
        waiting: usize,
    },
}

/// One message's share of the budget, given back when dropped.
#[derive(Debug)]
pub struct BufferShare {
    bytes: usize,
    shared: Arc<Shared>,
}

impl Drop for BufferShare {
    fn drop(&mut self) {
        self.shared.in_use.sub(self.bytes as i64);
        self.shared.room.add_permits(self.bytes);
    }
}

/// Counts one waiting message while it lives.
struct Waiting<'a>(&'a AtomicUsize);

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

impl RoutingBuffer {
    /// Messages up to this many bytes (prefix included) take no share: the budget is for the
    /// large ones, and the small calls on the hot path pay nothing for it.
    pub const FREE: usize = 64 * 1024;

    /// What one message waiting for room may hold, bytes: what HTTP/2 keeps of its body (the
    /// client stream window, `stream_window`), and what the router read of it first, which
    /// HTTP/2 may give back to the client to send again (up to [`RoutingBuffer::FREE`] and one
    /// DATA frame of up to `max_frame_size`).
    pub fn held_per_waiter(stream_window: u32, max_frame_size: u32) -> usize {
        stream_window as usize + Self::FREE + max_frame_size as usize
    }

    /// `limit` bytes shared; a message waits at most `wait` for its share. `unread_per_waiter`
    /// is what a waiting message may hold ([`RoutingBuffer::held_per_waiter`], bytes); it
    /// bounds how many may wait. `in_use` follows the bytes granted, `refusals` counts the
    /// messages refused.
    pub fn new(
        limit: usize,
        wait: Duration,
        unread_per_waiter: usize,
        in_use: IntGauge,
        refusals: IntCounter,
    ) -> Self {
        // The semaphore counts bytes; its permits are limited to usize::MAX >> 3.
        let limit = limit.clamp(1, Semaphore::MAX_PERMITS);
        Self {
            shared: Arc::new(Shared {
                room: Semaphore::new(limit),
                limit,
                wait,
                waiting: AtomicUsize::new(0),
                max_waiting: (limit / unread_per_waiter.max(1)).max(1),
                in_use,
                refusals,
            }),
        }
    }

    /// A budget with nothing to report to (tests, tools).
    pub fn unmetered(limit: usize, wait: Duration, unread_per_waiter: usize) -> Self {
        Self::new(
            limit,
            wait,
            unread_per_waiter,
            IntGauge::new("routing_buffer_bytes", "unexported").expect("valid metric name"),
            IntCounter::new("routing_buffer_refusals", "unexported").expect("valid metric name"),
        )
    }

    /// Bytes granted now.
    pub fn in_use(&self) -> usize {
        usize::try_from(self.shared.in_use.get()).unwrap_or(0)
    }

    /// The share for a message of `len` bytes (gRPC prefix included): `None` for a small one,
    /// else at once when there is room, else after waiting for it up to the configured wait.
    ///
    /// Errors: [`BufferFull::TooManyWaiting`] at once when as many messages wait as may;
    /// [`BufferFull::Timeout`] when no room came in time.
    pub async fn share(&self, len: usize) -> Result<Option<BufferShare>, BufferFull> {
        if len <= Self::FREE {
            return Ok(None);
        }
        let shared = &self.shared;
        // A message larger than the whole budget waits until it is alone. Semaphore grants at
        // most u32::MAX permits at once.
        let bytes = len.min(shared.limit).min(u32::MAX as usize);
        if let Ok(permit) = shared.room.try_acquire_many(bytes as u32) {
            permit.forget();
            return Ok(Some(self.grant(bytes)));
        }
        let joined = shared
            .waiting
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
                (n < shared.max_waiting).then_some(n + 1)
            });
        if let Err(waiting) = joined {
            shared.refusals.inc();
            return Err(BufferFull::TooManyWaiting {
                len,
                in_use: self.in_use(),
                limit: shared.limit,
                waiting,
            });
        }
        let _waiting = Waiting(&shared.waiting);
        match tokio::time::timeout(shared.wait, shared.room.acquire_many(bytes as u32)).await {
            Ok(Ok(permit)) => {
                permit.forget();
                Ok(Some(self.grant(bytes)))
            }
            // The semaphore is never closed; treat it as full all the same.
            Ok(Err(_)) | Err(_) => {
                shared.refusals.inc();
                Err(BufferFull::Timeout {
                    len,
                    in_use: self.in_use(),
                    limit: shared.limit,
                    wait: shared.wait,
                })
            }
        }
    }

    fn grant(&self, bytes: usize) -> BufferShare {
        self.shared.in_use.add(bytes as i64);
        BufferShare {
            bytes,
            shared: self.shared.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const WINDOW: usize = 64 * 1024;

    fn in_use_of(refused: &BufferFull) -> usize {
        match refused {
            BufferFull::Timeout { in_use, .. } | BufferFull::TooManyWaiting { in_use, .. } => {
                *in_use
            }
        }
    }

    #[tokio::test(start_paused = true)]
    async fn small_messages_take_nothing_and_large_ones_wait_then_are_refused() {
        let buffer = RoutingBuffer::unmetered(1 << 20, Duration::from_secs(30), WINDOW);
        assert!(buffer.share(RoutingBuffer::FREE).await.unwrap().is_none());

        let first = buffer.share(700 << 10).await.unwrap().expect("a share");
        assert_eq!(buffer.in_use(), 700 << 10);
        assert_eq!(buffer.shared.in_use.get(), 700 << 10);
        // 700 KiB + 400 KiB > 1 MiB: the second waits the whole 30 s, then is refused.
        let started = tokio::time::Instant::now();
        let refused = buffer.share(400 << 10).await.unwrap_err();
        assert_eq!(started.elapsed(), Duration::from_secs(30));
        assert!(matches!(refused, BufferFull::Timeout { .. }), "{refused}");
        assert_eq!(in_use_of(&refused), 700 << 10);
        assert!(refused
            .to_string()
            .contains("--routing-buffer (1048576 bytes)"));
        assert_eq!(buffer.shared.refusals.get(), 1);
        // Small calls pass while the budget is spent.
        assert!(buffer.share(1000).await.unwrap().is_none());

        // A waiting message gets its share as soon as the first is done.
        let waiting = tokio::spawn({
            let buffer = buffer.clone();
            async move { buffer.share(400 << 10).await.map(|s| s.is_some()) }
        });
        tokio::time::sleep(Duration::from_secs(1)).await;
        drop(first);
        assert_eq!(waiting.await.unwrap(), Ok(true));
        assert_eq!(buffer.in_use(), 0);
        assert_eq!(buffer.shared.in_use.get(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_message_larger_than_the_budget_waits_until_it_is_alone() {
        let buffer = RoutingBuffer::unmetered(1 << 20, Duration::from_secs(30), WINDOW);
        let other = buffer.share(100 << 10).await.unwrap();
        let big = tokio::spawn({
            let buffer = buffer.clone();
            async move { buffer.share(16 << 20).await.map(|s| s.is_some()) }
        });
        tokio::time::sleep(Duration::from_secs(5)).await;
        assert!(!big.is_finished());
        drop(other);
        assert_eq!(big.await.unwrap(), Ok(true));
    }

    #[tokio::test(start_paused = true)]
    async fn a_refusal_reports_the_bytes_granted_not_those_set_aside_for_other_waiters() {
        let buffer = RoutingBuffer::unmetered(1 << 20, Duration::from_secs(30), WINDOW);
        let _held = buffer.share(700 << 10).await.unwrap();
        // The first waiter is set aside the 324 KiB left while it waits for the rest.
        let waiters: Vec<_> = (0..2)
            .map(|_| {
                let buffer = buffer.clone();
                tokio::spawn(async move { buffer.share(400 << 10).await.unwrap_err() })
            })
            .collect();
        for waiter in waiters {
            let refused = waiter.await.unwrap();
            assert_eq!(in_use_of(&refused), 700 << 10, "{refused}");
        }
    }

    /// Waiting messages hold unread bytes (up to a stream window each): no more of them may
    /// wait than the budget holds windows; the next is refused at once, and may wait again
    /// once one of them is served.
    #[tokio::test(start_paused = true)]
    async fn no_more_messages_wait_than_the_budget_holds_stream_windows() {
        // 1 MiB / 512 KiB: two may wait.
        let buffer = RoutingBuffer::unmetered(1 << 20, Duration::from_secs(30), 512 << 10);
        let held = buffer.share(1 << 20).await.unwrap();
        let waiters: Vec<_> = (0..2)
            .map(|_| {
                let buffer = buffer.clone();
                tokio::spawn(async move { buffer.share(300 << 10).await.map(|s| s.is_some()) })
            })
            .collect();
        tokio::time::sleep(Duration::from_secs(1)).await;
        let started = tokio::time::Instant::now();
        let refused = buffer.share(300 << 10).await.unwrap_err();
        assert_eq!(started.elapsed(), Duration::ZERO, "refused at once");
        assert!(
            matches!(refused, BufferFull::TooManyWaiting { waiting: 2, .. }),
            "{refused}"
        );
        assert!(refused.to_string().contains("refused at once"));
        drop(held);
        for waiter in waiters {
            assert_eq!(waiter.await.unwrap(), Ok(true));
        }
        assert_eq!(buffer.shared.waiting.load(Ordering::Relaxed), 0);
        assert!(buffer.share(300 << 10).await.unwrap().is_some());
    }
}
