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
//! deadlock each other. A client that declares a large message and then stalls keeps its share
//! until its stream ends (cancel, reset, connection closed). Shares are granted first come, first
//! served; a message larger than the whole budget waits until it is alone.

use std::sync::Arc;
use std::time::Duration;

use prometheus::{IntCounter, IntGauge};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// `--routing-buffer`, bytes: room for 16 messages of BuildKit's 16 MiB limit at once.
pub const DEFAULT_ROUTING_BUFFER: usize = 256 * 1024 * 1024;
/// `--routing-buffer-wait`.
pub const DEFAULT_ROUTING_BUFFER_WAIT: Duration = Duration::from_secs(30);

/// The budget shared by every connection of one router.
#[derive(Debug, Clone)]
pub struct RoutingBuffer {
    room: Arc<Semaphore>,
    /// In bytes, as `--routing-buffer`.
    limit: usize,
    wait: Duration,
    in_use: IntGauge,
    refusals: IntCounter,
}

/// Why a message got no share of the budget.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "the router is already reading {in_use} bytes of requests to route them, and this \
     {len}-byte message found no room under --routing-buffer ({limit} bytes) within {wait:?}; \
     retry later, or raise --routing-buffer"
)]
pub struct BufferFull {
    pub len: usize,
    pub in_use: usize,
    pub limit: usize,
    pub wait: Duration,
}

/// One message's share of the budget, given back when dropped.
#[derive(Debug)]
pub struct BufferShare {
    _permit: OwnedSemaphorePermit,
    bytes: i64,
    in_use: IntGauge,
}

impl Drop for BufferShare {
    fn drop(&mut self) {
        self.in_use.sub(self.bytes);
    }
}

impl RoutingBuffer {
    /// Messages up to this many bytes (prefix included) take no share: the budget is for the
    /// large ones, and the small calls on the hot path pay nothing for it.
    pub const FREE: usize = 64 * 1024;

    /// `limit` bytes shared; a message waits at most `wait` for its share. `in_use` follows the
    /// bytes granted, `refusals` counts the messages refused.
    pub fn new(limit: usize, wait: Duration, in_use: IntGauge, refusals: IntCounter) -> Self {
        // The semaphore counts bytes; its permits are limited to usize::MAX >> 3.
        let limit = limit.clamp(1, Semaphore::MAX_PERMITS);
        Self {
            room: Arc::new(Semaphore::new(limit)),
            limit,
            wait,
            in_use,
            refusals,
        }
    }

    /// A budget with nothing to report to (tests, tools).
    pub fn unmetered(limit: usize, wait: Duration) -> Self {
        Self::new(
            limit,
            wait,
            IntGauge::new("routing_buffer_bytes", "unexported").expect("valid metric name"),
            IntCounter::new("routing_buffer_refusals", "unexported").expect("valid metric name"),
        )
    }

    /// The share for a message of `len` bytes (gRPC prefix included): `None` for a small one,
    /// else waits for room up to the configured wait.
    ///
    /// Errors: [`BufferFull`] when no room came in time.
    pub async fn share(&self, len: usize) -> Result<Option<BufferShare>, BufferFull> {
        if len <= Self::FREE {
            return Ok(None);
        }
        // A message larger than the whole budget waits until it is alone. Semaphore grants at
        // most u32::MAX permits at once.
        let bytes = len.min(self.limit).min(u32::MAX as usize);
        let acquire = self.room.clone().acquire_many_owned(bytes as u32);
        match tokio::time::timeout(self.wait, acquire).await {
            Ok(Ok(permit)) => {
                let bytes = bytes as i64;
                self.in_use.add(bytes);
                Ok(Some(BufferShare {
                    _permit: permit,
                    bytes,
                    in_use: self.in_use.clone(),
                }))
            }
            // The semaphore is never closed; treat it as full all the same.
            Ok(Err(_)) | Err(_) => {
                self.refusals.inc();
                Err(BufferFull {
                    len,
                    // Granted bytes only: the semaphore's free permits also exclude those
                    // set aside for the waiter at the head of the queue.
                    in_use: usize::try_from(self.in_use.get()).unwrap_or(0),
                    limit: self.limit,
                    wait: self.wait,
                })
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn small_messages_take_nothing_and_large_ones_wait_then_are_refused() {
        let buffer = RoutingBuffer::unmetered(1 << 20, Duration::from_secs(30));
        assert!(buffer.share(RoutingBuffer::FREE).await.unwrap().is_none());

        let first = buffer.share(700 << 10).await.unwrap().expect("a share");
        assert_eq!(buffer.in_use.get(), 700 << 10);
        // 700 KiB + 400 KiB > 1 MiB: the second waits the whole 30 s, then is refused.
        let started = tokio::time::Instant::now();
        let refused = buffer.share(400 << 10).await.unwrap_err();
        assert_eq!(started.elapsed(), Duration::from_secs(30));
        assert_eq!(refused.in_use, 700 << 10);
        assert!(refused
            .to_string()
            .contains("--routing-buffer (1048576 bytes)"));
        assert_eq!(buffer.refusals.get(), 1);
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
        assert_eq!(buffer.in_use.get(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_message_larger_than_the_budget_waits_until_it_is_alone() {
        let buffer = RoutingBuffer::unmetered(1 << 20, Duration::from_secs(30));
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
        let buffer = RoutingBuffer::unmetered(1 << 20, Duration::from_secs(30));
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
            assert_eq!(refused.in_use, 700 << 10, "{refused}");
        }
    }
}
