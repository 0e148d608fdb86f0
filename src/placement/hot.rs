//! Which affinity keys are hot: a small, fixed-size, lock-free estimate of each key's share of
//! the recent keyed builds.
//!
//! A hot key (a share of recent builds above `threshold / ready backends`) is placed under the
//! mean load bound instead of `c` times it (see [`super::Placement::choose`]), so that it, and not
//! the rarely built keys that share its home, takes the spills. A hot key is cached wherever it
//! spills after its first build there; a rare key that spills is a miss and evicts someone
//! else's cache.
//!
//! The estimate is a direct-mapped table of exponentially decayed counters:
//! - one 64-bit word per slot: a 16-bit tag of the key hash, the 24-bit epoch of its last update
//!   and a 24-bit count, halved for every epoch that passed since;
//! - an epoch lasts [`EPOCH_PER_BACKEND`] x ready backends keyed decisions, so a key at the
//!   threshold share counts about `2 x 64 x threshold` builds whatever the pool size;
//! - a key whose slot holds another key's tag decrements that count instead (Misra-Gries style),
//!   taking the slot over at zero: of two keys that collide, the more frequent keeps the slot and
//!   the other reads as cold (never as hot by mistake).
//!
//! Memory: [`SLOTS`] x 8 bytes, allocated once; a decision does two or three atomic
//! read-modify-writes and allocates nothing. State is per router replica: replicas behind a
//! connection balancer see statistically the same mix of builds, so they agree on which keys
//! are hot, but not decision by decision (like their load counts).

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

/// Table slots (a power of two). More keys than this are fine: only the frequent need a slot.
pub const SLOTS: usize = 4096;
/// An epoch (half-life of the counts) is this many keyed decisions per ready backend.
pub const EPOCH_PER_BACKEND: u64 = 64;
/// A key needs at least this decayed count to be hot (startup, tiny pools).
pub const MIN_HOT_COUNT: u64 = 8;

const COUNT_BITS: u32 = 24;
const COUNT_MAX: u64 = (1 << COUNT_BITS) - 1;
const EPOCH_MASK: u64 = (1 << 24) - 1;

/// Decayed per-key counts of recent keyed builds.
pub struct HotKeys {
    slots: Box<[AtomicU64]>,
    /// All keyed builds, decayed like a key's count (tag 0).
    total: AtomicU64,
    /// Epoch (high 24 bits) and decisions counted in it (low 40 bits).
    clock: AtomicU64,
}

impl std::fmt::Debug for HotKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let (epoch, _) = unpack_clock(self.clock.load(Relaxed));
        f.debug_struct("HotKeys")
            .field("slots", &self.slots.len())
            .field("epoch", &epoch)
            .finish()
    }
}

impl Default for HotKeys {
    fn default() -> Self {
        Self {
            slots: (0..SLOTS).map(|_| AtomicU64::new(0)).collect(),
            total: AtomicU64::new(0),
            clock: AtomicU64::new(0),
        }
    }
}

fn unpack_clock(w: u64) -> (u64, u64) {
    (w >> 40, w & ((1 << 40) - 1))
}

/// (tag, count decayed to `epoch`).
fn decayed(word: u64, epoch: u64) -> (u64, u64) {
    let tag = word >> 48;
    let then = (word >> COUNT_BITS) & EPOCH_MASK;
    let count = word & COUNT_MAX;
    let age = epoch.wrapping_sub(then) & EPOCH_MASK;
    (
        tag,
        if age >= COUNT_BITS as u64 {
            0
        } else {
            count >> age
        },
    )
}

fn pack(tag: u64, epoch: u64, count: u64) -> u64 {
    (tag << 48) | ((epoch & EPOCH_MASK) << COUNT_BITS) | count.min(COUNT_MAX)
}

impl HotKeys {
    /// Counts one keyed build in `slot` for `tag` and returns the key's decayed count (0 when
    /// another key holds the slot).
    fn bump(slot: &AtomicU64, tag: u64, epoch: u64) -> u64 {
        let mut mine = 0;
        let _ = slot.fetch_update(Relaxed, Relaxed, |old| {
            let (held, count) = decayed(old, epoch);
            let (held, count) = if held == tag || count == 0 {
                (tag, count + 1)
            } else {
                (held, count - 1)
            };
            mine = if held == tag { count } else { 0 };
            Some(pack(held, epoch, count))
        });
        mine
    }

    /// Counts one build of `key` and says whether the key is hot: its decayed count is at least
    /// [`MIN_HOT_COUNT`] and above `threshold / ready` of all keyed builds.
    pub fn record(&self, key: u64, ready: usize, threshold: f64) -> bool {
        let epoch_len = EPOCH_PER_BACKEND * ready.max(1) as u64;
        let mut epoch = 0;
        let _ = self.clock.fetch_update(Relaxed, Relaxed, |w| {
            let (e, n) = unpack_clock(w);
            let (e, n) = if n + 1 >= epoch_len {
                ((e + 1) & EPOCH_MASK, 0)
            } else {
                (e, n + 1)
            };
            epoch = e;
            Some((e << 40) | n)
        });
        // Tag 0 is the total's; keys use 1..=0xffff.
        let tag = (key >> 48).max(1);
        let count = Self::bump(&self.slots[key as usize & (SLOTS - 1)], tag, epoch);
        let total = Self::bump(&self.total, 0, epoch);
        count >= MIN_HOT_COUNT && (count as f64) * (ready as f64) > threshold * total as f64
    }

    /// The key's current decayed count (for tests and diagnostics); does not count a build.
    pub fn count(&self, key: u64) -> u64 {
        let (epoch, _) = unpack_clock(self.clock.load(Relaxed));
        let (held, count) = decayed(self.slots[key as usize & (SLOTS - 1)].load(Relaxed), epoch);
        if held == (key >> 48).max(1) {
            count
        } else {
            0
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::placement::hash::fmix64;

    #[test]
    fn a_frequent_key_is_hot_and_rare_ones_are_not() {
        let h = HotKeys::default();
        let hot = fmix64(1);
        let mut hot_seen = false;
        for i in 0..5_000u64 {
            if i % 5 == 0 {
                // 20 % of builds on 8 backends: above 0.3 / 8.
                hot_seen = h.record(hot, 8, 0.3);
            } else {
                // The rest spread over 1000 keys: 0.08 % each.
                assert!(!h.record(fmix64(1000 + i % 1000), 8, 0.3), "build {i}");
            }
        }
        assert!(hot_seen);
        assert!(h.count(hot) > 100, "count {}", h.count(hot));
    }

    #[test]
    fn a_key_cools_down_when_it_stops() {
        let h = HotKeys::default();
        let k = fmix64(7);
        for _ in 0..1_000 {
            h.record(k, 4, 0.3);
        }
        assert!(h.record(k, 4, 0.3));
        // 10 epochs of other builds: its count halves each epoch.
        for i in 0..(10 * EPOCH_PER_BACKEND * 4) {
            h.record(fmix64(100_000 + i), 4, 0.3);
        }
        assert!(h.count(k) < MIN_HOT_COUNT, "count {}", h.count(k));
        assert!(!h.record(k, 4, 0.3));
    }

    #[test]
    fn colliding_keys_keep_the_more_frequent_one() {
        let h = HotKeys::default();
        // Same slot, different tags.
        let a = 5u64 | (1 << 48);
        let b = 5u64 | (2 << 48);
        for i in 0..3_000 {
            h.record(if i % 4 == 0 { b } else { a }, 8, 0.3);
        }
        assert!(h.count(a) > 0);
        assert_eq!(h.count(b), 0, "the rarer key reads as cold");
    }

    #[test]
    fn same_sequence_same_answers() {
        let (x, y) = (HotKeys::default(), HotKeys::default());
        for i in 0..10_000u64 {
            let k = fmix64(i % 7 + (i % 3) * 100);
            assert_eq!(x.record(k, 6, 0.3), y.record(k, 6, 0.3));
        }
    }
}
