//! The filter stage: two in-process tiers in front of the store. Both only
//! ever make the store do less; neither decides "new" on its own.
//!
//! - [`RecentCache`]: exact keys this process completed recently, with their
//!   fingerprints. A hit with the same fingerprint is a confirmed duplicate
//!   and skips the store. Entries live at most half the store TTL, so the
//!   store still holds every key the cache vouches for.
//! - [`SlicedBloom`]: a time-sliced Bloom filter over the retention window.
//!   A miss means "very likely new" and goes straight to the claim; a hit
//!   means "suspected duplicate" and goes to a cheap store read first.
//!   Slices rotate, so memory stays bounded and old keys age out.

use std::collections::{HashMap, VecDeque};
use std::time::Duration;

use bloomfilter::Bloom;

use crate::config::FilterConfig;
use crate::event::{Envelope, Fingerprint};

/// What the filter thinks of a key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Completed by this process recently with the same fingerprint: a duplicate.
    RecentDuplicate,
    /// The Bloom filter has seen the key: read the store before claiming.
    Suspect,
    /// Never seen: claim directly.
    LikelyNew,
}

/// Bounded exact cache in two generations: lookups check both, inserts go to
/// the current one, and rotation drops the older generation whole.
#[derive(Debug)]
pub struct RecentCache {
    current: HashMap<u128, Fingerprint>,
    previous: HashMap<u128, Fingerprint>,
    per_generation: usize,
    max_age_ms: u64,
    rotated_at_ms: u64,
}

impl RecentCache {
    /// `capacity` keys in all (0 disables the cache); entries live at most `ttl / 2`.
    pub fn new(capacity: usize, ttl: Duration, now_ms: u64) -> RecentCache {
        RecentCache {
            current: HashMap::new(),
            previous: HashMap::new(),
            per_generation: capacity / 2,
            max_age_ms: (ttl.as_millis() as u64 / 4).max(1),
            rotated_at_ms: now_ms,
        }
    }

    pub fn get(&mut self, digest: u128, now_ms: u64) -> Option<Fingerprint> {
        self.maybe_rotate(now_ms);
        self.current.get(&digest).or_else(|| self.previous.get(&digest)).copied()
    }

    pub fn insert(&mut self, digest: u128, fingerprint: Fingerprint, now_ms: u64) {
        if self.per_generation == 0 {
            return;
        }
        self.maybe_rotate(now_ms);
        if self.current.len() >= self.per_generation {
            self.rotate_full();
        }
        self.current.insert(digest, fingerprint);
    }

    /// Drops a key, e.g. after `forget` or a released claim.
    pub fn remove(&mut self, digest: u128) {
        self.current.remove(&digest);
        self.previous.remove(&digest);
    }

    fn maybe_rotate(&mut self, now_ms: u64) {
        // Generations start on a fixed grid of max_age: an entry is inserted
        // within one generation and dropped at the end of the next, so it
        // lives under 2 * max_age = ttl / 2.
        let elapsed = now_ms.saturating_sub(self.rotated_at_ms) / self.max_age_ms;
        match elapsed {
            0 => {}
            1 => {
                self.previous = std::mem::take(&mut self.current);
                self.rotated_at_ms += self.max_age_ms;
            }
            n => {
                self.previous.clear();
                self.current.clear();
                self.rotated_at_ms += n * self.max_age_ms;
            }
        }
    }

    /// Early rotation when the current generation is full (keeps memory bounded).
    fn rotate_full(&mut self) {
        self.previous = std::mem::take(&mut self.current);
    }

    pub fn len(&self) -> usize {
        self.current.len() + self.previous.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// How many Bloom slices cover the TTL window (plus the one being filled).
const SLICES: usize = 4;

/// A Bloom filter cut into time slices. A key inserted at time t stays
/// visible until its slice is dropped, at least one full TTL later.
pub struct SlicedBloom {
    slices: VecDeque<Slice>,
    items_per_slice: usize,
    slice_fpr: f64,
    slice_span_ms: u64,
}

struct Slice {
    bloom: Bloom<u128>,
    started_ms: u64,
    items: usize,
}

impl SlicedBloom {
    pub fn new(expected_keys: u64, false_positive_rate: f64, ttl: Duration, now_ms: u64) -> SlicedBloom {
        let live = (SLICES - 1) as u64;
        // Each slice covers ttl / live of time, so it expects expected_keys / live keys;
        // a quarter more leaves room for bursts before a slice must rotate early.
        let items_per_slice = (expected_keys.div_ceil(live) * 5 / 4).max(1) as usize;
        // A lookup checks every slice, so each gets its share of the false-positive budget.
        let slice_fpr = false_positive_rate / SLICES as f64;
        let mut filter = SlicedBloom {
            slices: VecDeque::with_capacity(SLICES),
            items_per_slice,
            slice_fpr,
            slice_span_ms: (ttl.as_millis() as u64 / live).max(1),
        };
        filter.push_slice(now_ms);
        filter
    }

    fn push_slice(&mut self, now_ms: u64) {
        let bloom = Bloom::new_for_fp_rate(self.items_per_slice, self.slice_fpr)
            .expect("items_per_slice >= 1 and 0 < fpr < 0.5 are checked at config validation");
        self.slices.push_front(Slice { bloom, started_ms: now_ms, items: 0 });
        while self.slices.len() > SLICES {
            self.slices.pop_back();
        }
    }

    pub fn check(&self, digest: u128) -> bool {
        self.slices.iter().any(|s| s.bloom.check(&digest))
    }

    pub fn insert(&mut self, digest: u128, now_ms: u64) {
        let front = self.slices.front().expect("there is always a current slice");
        // Rotate on age, or early when a slice is full so its false-positive rate holds.
        if now_ms.saturating_sub(front.started_ms) >= self.slice_span_ms || front.items >= self.items_per_slice {
            // A slice's keys were inserted within one span of its start and must stay
            // one TTL after that: it goes once it started SLICES spans ago.
            let horizon = self.slice_span_ms * SLICES as u64;
            self.slices.retain(|s| now_ms.saturating_sub(s.started_ms) < horizon);
            self.push_slice(now_ms);
        }
        let front = self.slices.front_mut().expect("there is always a current slice");
        front.bloom.set(&digest);
        front.items += 1;
    }

}

/// Both tiers together; the pipeline locks it once per batch.
pub struct Filter {
    recent: RecentCache,
    bloom: SlicedBloom,
}

impl Filter {
    pub fn new(config: &FilterConfig, ttl: Duration, now_ms: u64) -> Filter {
        Filter {
            recent: RecentCache::new(config.recent_keys, ttl, now_ms),
            bloom: SlicedBloom::new(config.expected_keys.get(), config.false_positive_rate, ttl, now_ms),
        }
    }

    pub fn check(&mut self, envelope: &Envelope, now_ms: u64) -> Verdict {
        let digest = envelope.digest;
        if self.recent.get(digest, now_ms) == Some(envelope.fingerprint) {
            Verdict::RecentDuplicate
        } else if self.bloom.check(digest) {
            Verdict::Suspect
        } else {
            Verdict::LikelyNew
        }
    }

    /// Records a key the store now holds as done with `fingerprint`.
    pub fn remember_done(&mut self, envelope: &Envelope, fingerprint: Fingerprint, now_ms: u64) {
        let digest = envelope.digest;
        self.recent.insert(digest, fingerprint, now_ms);
        self.bloom.insert(digest, now_ms);
    }

    /// Records a key the store holds in some state (the Bloom only).
    pub fn remember_seen(&mut self, envelope: &Envelope, now_ms: u64) {
        self.bloom.insert(envelope.digest, now_ms);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TTL: Duration = Duration::from_secs(400);

    #[test]
    fn recent_cache_is_bounded_and_expires_within_half_the_ttl() {
        let mut c = RecentCache::new(4, TTL, 0);
        for d in 0..10u128 {
            c.insert(d, Fingerprint(d), 0);
        }
        assert!(c.len() <= 4, "holds {} keys", c.len());
        assert_eq!(c.get(9, 0), Some(Fingerprint(9)));
        let mut c = RecentCache::new(100, TTL, 0);
        c.insert(1, Fingerprint(1), 0);
        assert_eq!(c.get(1, 199_000), Some(Fingerprint(1)));
        assert_eq!(c.get(1, 200_000), None, "gone by ttl/2");
    }

    #[test]
    fn disabled_cache_holds_nothing() {
        let mut c = RecentCache::new(0, TTL, 0);
        c.insert(1, Fingerprint(1), 0);
        assert!(c.is_empty());
    }

    #[test]
    fn bloom_has_no_false_negatives_within_the_ttl_and_forgets_after() {
        let mut b = SlicedBloom::new(1000, 0.01, TTL, 0);
        for d in 0..1000u128 {
            b.insert(d, d as u64 * 399); // the expected keys, spread over the TTL
        }
        let now = 399_000;
        assert!((0..1000u128).all(|d| b.check(d)), "no false negatives inside the window");
        // Much later, with fresh inserts rotating the slices, old keys are gone.
        for d in 10_000..10_010u128 {
            b.insert(d, now + 4 * TTL.as_millis() as u64);
        }
        let still = (0..1000u128).filter(|d| b.check(*d)).count();
        assert!(still < 50, "{still} old keys still present");
    }

    #[test]
    fn bloom_false_positive_rate_is_near_target() {
        let n = 100_000u64;
        let mut b = SlicedBloom::new(n, 0.01, TTL, 0);
        for d in 0..n as u128 {
            b.insert(d, 0);
        }
        let fp = (n as u128..2 * n as u128).filter(|d| b.check(*d)).count() as f64 / n as f64;
        assert!(fp < 0.02, "measured fpr {fp}");
    }
}
