//! The filter stage: two in-process tiers in front of the store. Both only
//! ever make the store do less; neither decides "new" on its own.
//!
//! - [`RecentCache`]: exact keys this process completed recently, with their
//!   fingerprints. A hit with the same fingerprint is a confirmed duplicate
//!   and skips the store. Entries live at most half the store TTL, so the
//!   store still holds every key the cache vouches for.
//! - [`AgingCuckoo`] ([`crate::aging`]): an approximate set of the keys seen within the
//!   retention window. A miss means "very likely new" and goes straight to
//!   the claim; a hit means "suspected duplicate" and goes to a cheap store
//!   read first. Keys age out in place, so memory stays bounded.


use foldhash::HashMap;
use std::time::Duration;

use crate::aging::{AgingCuckoo, FilterAllocError};
use crate::config::FilterConfig;
use crate::event::{Envelope, Fingerprint};
use crate::window::{First, Origin};

/// What the filter thinks of a key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Verdict {
    /// Completed by this process recently with the same fingerprint: a
    /// duplicate, of the first occurrence the cache remembers.
    RecentDuplicate(First),
    /// The aging filter has seen the key: read the store before claiming.
    Suspect,
    /// Never seen: claim directly.
    LikelyNew,
}

/// Bounded exact cache in two generations: lookups check both, inserts go to
/// the current one, and rotation drops the older generation whole. Every
/// entry carries the time its store row stops counting (the first claim plus
/// the TTL) and is a hit only before it: the cache never outlives the row it
/// vouches for, and a duplicate never extends it.
#[derive(Debug)]
pub struct RecentCache {
    current: HashMap<u128, Cached>,
    previous: HashMap<u128, Cached>,
    per_generation: usize,
    max_age_ms: u64,
    rotated_at_ms: u64,
}

/// A cached key: its fingerprint, when its row stops counting, and where it
/// was first claimed (when known), for a duplicate's age and stamp.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cached {
    /// The fingerprint it completed with; another one is no cached duplicate.
    pub fingerprint: Fingerprint,
    /// Milliseconds since the Unix epoch; not a duplicate from then on.
    pub valid_until_ms: u64,
    /// The first claim's position, when known.
    pub origin: Option<Origin>,
}

impl RecentCache {
    /// `capacity` keys in all (0 disables the cache); entries live at most `ttl / 2`.
    pub fn new(capacity: usize, ttl: Duration, now_ms: u64) -> RecentCache {
        RecentCache {
            current: HashMap::default(),
            previous: HashMap::default(),
            per_generation: capacity / 2,
            max_age_ms: (ttl.as_millis() as u64 / 4).max(1),
            rotated_at_ms: now_ms,
        }
    }

    /// The fingerprint of a key whose row still counts at `now_ms`.
    pub fn get(&mut self, digest: u128, now_ms: u64) -> Option<Fingerprint> {
        self.entry(digest, now_ms).map(|c| c.fingerprint)
    }

    /// The whole entry of a key whose row still counts at `now_ms`.
    pub fn entry(&mut self, digest: u128, now_ms: u64) -> Option<Cached> {
        self.maybe_rotate(now_ms);
        let cached = self.current.get(&digest).or_else(|| self.previous.get(&digest)).copied()?;
        (now_ms < cached.valid_until_ms).then_some(cached)
    }

    /// Caches a key done in the store with `fingerprint`, whose row stops
    /// counting at `valid_until_ms`.
    pub fn insert(&mut self, digest: u128, fingerprint: Fingerprint, valid_until_ms: u64, now_ms: u64) {
        self.insert_from(digest, Cached { fingerprint, valid_until_ms, origin: None }, now_ms);
    }

    /// As [`RecentCache::insert`], with where the key was first claimed.
    pub fn insert_from(&mut self, digest: u128, cached: Cached, now_ms: u64) {
        if self.per_generation == 0 || cached.valid_until_ms <= now_ms {
            return;
        }
        self.maybe_rotate(now_ms);
        if self.current.len() >= self.per_generation {
            self.rotate_full();
        }
        // An older entry of the key in the previous generation is shadowed
        // (lookups read the current one first) and goes at the next rotation.
        self.current.insert(digest, cached);
    }

    /// Drops a key, e.g. after `forget` or a released claim.
    pub fn remove(&mut self, digest: u128) {
        self.current.remove(&digest);
        self.previous.remove(&digest);
    }

    /// Drops every entry (a release may have deleted any of their rows).
    pub fn clear(&mut self) {
        self.current.clear();
        self.previous.clear();
    }

    fn maybe_rotate(&mut self, now_ms: u64) {
        // Generations start on a fixed grid of max_age: an entry is inserted
        // within one generation and dropped at the end of the next, so it
        // lives under 2 * max_age = ttl / 2.
        let elapsed = now_ms.saturating_sub(self.rotated_at_ms) / self.max_age_ms;
        match elapsed {
            0 => {}
            1 => {
                self.shift_generation();
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
        self.shift_generation();
    }

    /// The current generation becomes the previous one; the older one's table,
    /// cleared, becomes the current one. Its allocation is kept: a fresh table
    /// grown by doubling to a generation's size would touch new pages, which the
    /// kernel zeroes (perf, `kdedup bench`: half the pipeline threads' samples
    /// were in clear_page under rotations that dropped and regrew the table).
    fn shift_generation(&mut self) {
        std::mem::swap(&mut self.current, &mut self.previous);
        self.current.clear();
    }

    /// Keys held, both generations.
    pub fn len(&self) -> usize {
        self.current.len() + self.previous.len()
    }

    /// No key held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Estimated from capacity: key, value and a control byte per slot.
    pub fn memory_bytes(&self) -> usize {
        let slot = std::mem::size_of::<(u128, Cached)>() + 1;
        (self.current.capacity() + self.previous.capacity()) * slot
    }
}

/// How many keys ahead a batch should [`AgingCuckoo::prefetch`] while it
/// checks. By `cargo bench --bench filter` at 10M keys: 8 ahead left misses
/// exposed (~31 ns a check); 16 and 32 both reach ~20-27 ns, 32 by a little
/// more, within this machine's noise. The pipeline does more work per key
/// than the bench loop, so the shorter distance covers the same time.
pub const PREFETCH_AHEAD: usize = 16;
/// Keys whose rows expired within the last TTL, to estimate the duplicates a
/// too-short window lets through (`kdedup_expired_key_hits_total`): a `new`
/// event whose key is here arrived after its key's row expired, so it was
/// most likely a duplicate the store could no longer see.
///
/// Exact, so that a genuinely new event is never counted (a 16-bit aging
/// filter's 0.09% false positives would swamp a low duplicate rate): a map of
/// 64-bit digests to when their row stops counting, each kept until one TTL
/// after that. Memory: about 17 bytes a slot, so `max` keys cost at most ~34
/// bytes each (the map's load); past `max`, the set keeps a sample (1 key in
/// 2, then 4, ...), chosen by digest, and each hit counts for the keys it
/// stands for, so the counter stays an unbiased estimate. Per process: a key
/// first claimed by another instance is not known here.
#[derive(Debug)]
pub struct ExpiredKeys {
    keys: HashMap<u64, u64>,
    max: usize,
    /// Only digests whose low `shift` bits are zero are kept: 1 in 2^shift.
    shift: u32,
    ttl_ms: u64,
    purged_at_ms: u64,
}

impl ExpiredKeys {
    /// At most `max` keys (0 disables the estimate).
    pub fn new(max: usize, ttl: Duration, now_ms: u64) -> ExpiredKeys {
        ExpiredKeys {
            keys: HashMap::default(),
            max,
            shift: 0,
            ttl_ms: (ttl.as_millis() as u64).max(1),
            purged_at_ms: now_ms,
        }
    }

    fn fold(digest: u128) -> u64 {
        (digest >> 64) as u64 ^ digest as u64
    }

    fn sampled(&self, d: u64) -> bool {
        self.shift < 64 && d & ((1u64 << self.shift) - 1) == 0
    }

    /// A key whose row stops counting at `expires_at_ms`.
    pub fn remember(&mut self, digest: u128, expires_at_ms: u64, now_ms: u64) {
        if self.max == 0 {
            return;
        }
        if now_ms.saturating_sub(self.purged_at_ms) >= self.ttl_ms / 4 {
            self.purge(now_ms);
        }
        let d = Self::fold(digest);
        if !self.sampled(d) {
            return;
        }
        if let Some(e) = self.keys.get_mut(&d) {
            *e = (*e).max(expires_at_ms);
            return;
        }
        if self.keys.len() >= self.max {
            self.purge(now_ms);
            while self.keys.len() >= self.max && self.shift < 63 {
                self.shift += 1;
                let mask = (1u64 << self.shift) - 1;
                self.keys.retain(|d, _| d & mask == 0);
            }
            if !self.sampled(d) || self.keys.len() >= self.max {
                return;
            }
        }
        self.keys.insert(d, expires_at_ms);
    }

    /// How many `new` events this one stands for whose key expired within the
    /// last TTL: 0 when its key is not known to have expired, else 2^shift.
    pub fn hit(&self, digest: u128, now_ms: u64) -> u64 {
        let d = Self::fold(digest);
        if !self.sampled(d) {
            return 0;
        }
        match self.keys.get(&d) {
            Some(&e) if e <= now_ms && now_ms < e.saturating_add(self.ttl_ms) => 1 << self.shift,
            _ => 0,
        }
    }

    fn purge(&mut self, now_ms: u64) {
        let ttl = self.ttl_ms;
        self.keys.retain(|_, e| e.saturating_add(ttl) > now_ms);
        self.purged_at_ms = now_ms;
    }

    /// Expired keys held (the sample, when sampling).
    pub fn len(&self) -> usize {
        self.keys.len()
    }

    /// No expired key held.
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// 1 in this many keys is kept (1 while under `max`).
    pub fn sample_every(&self) -> u64 {
        1 << self.shift
    }

    /// Estimated from capacity: key, value and a control byte per slot.
    pub fn memory_bytes(&self) -> usize {
        self.keys.capacity() * (2 * std::mem::size_of::<u64>() + 1)
    }
}

/// The tiers together, and the expired keys; the pipeline locks it once per batch.
pub struct Filter {
    recent: RecentCache,
    aging: AgingCuckoo,
    expired: ExpiredKeys,
    ttl_ms: u64,
    /// The scope's release marker as last read (`None`: never read); see [`Filter::note_releases`].
    release_mark: Option<Option<(Fingerprint, u64)>>,
}

impl Filter {
    /// # Panics
    /// When the aging filter's table cannot be allocated ([`Filter::try_new`] says so instead).
    pub fn new(config: &FilterConfig, ttl: Duration, now_ms: u64) -> Filter {
        Filter::try_new(config, ttl, now_ms).unwrap_or_else(|e| panic!("{e}"))
    }

    /// As [`Filter::new`], but an error when the aging filter's table cannot be allocated.
    pub fn try_new(config: &FilterConfig, ttl: Duration, now_ms: u64) -> Result<Filter, FilterAllocError> {
        Ok(Filter {
            recent: RecentCache::new(config.recent_keys, ttl, now_ms),
            aging: AgingCuckoo::try_new(config.expected_keys.get(), config.false_positive_rate, ttl, now_ms)?,
            expired: ExpiredKeys::new(config.expired_keys, ttl, now_ms),
            ttl_ms: ttl.as_millis() as u64,
            release_mark: None,
        })
    }

    /// What the filters know of `envelope`'s key at `now_ms`; never "new" on their own.
    pub fn check(&mut self, envelope: &Envelope, now_ms: u64) -> Verdict {
        let digest = envelope.digest;
        if let Some(c) = self.recent.entry(digest, now_ms).filter(|c| c.fingerprint == envelope.fingerprint) {
            // Every cached row lives one TTL from its first claim.
            let claimed_at_ms = c.valid_until_ms.saturating_sub(self.ttl_ms);
            return Verdict::RecentDuplicate(First { claimed_at_ms, origin: c.origin });
        }
        self.aging.advance(now_ms);
        if self.aging.check(digest) {
            Verdict::Suspect
        } else {
            Verdict::LikelyNew
        }
    }

    /// Records a key this process claimed at `claimed_at_ms` and completed:
    /// its row lives one TTL from the claim.
    pub fn remember_claimed(&mut self, envelope: &Envelope, claimed_at_ms: u64, now_ms: u64) {
        let digest = envelope.digest;
        let valid_until_ms = claimed_at_ms.saturating_add(self.ttl_ms);
        let origin = Origin::of(&envelope.record.position);
        self.recent.insert_from(digest, Cached { fingerprint: envelope.fingerprint, valid_until_ms, origin }, now_ms);
        self.aging.insert(digest, now_ms);
        self.expired.remember(digest, valid_until_ms, now_ms);
    }

    /// Records a duplicate: with the time its row stops counting when a row
    /// was read (`expires_at_ms`; a duplicate never extends what the cache
    /// vouches for), and its first occurrence when known (whose TTL ends the
    /// row, for the expired keys).
    pub fn remember_duplicate(
        &mut self,
        envelope: &Envelope,
        expires_at_ms: Option<u64>,
        first: Option<First>,
        now_ms: u64,
    ) {
        let digest = envelope.digest;
        if let Some(valid_until_ms) = expires_at_ms {
            let cached =
                Cached { fingerprint: envelope.fingerprint, valid_until_ms, origin: first.and_then(|f| f.origin) };
            self.recent.insert_from(digest, cached, now_ms);
        }
        self.aging.insert(digest, now_ms);
        let ends = expires_at_ms.or(first.map(|f| f.claimed_at_ms.saturating_add(self.ttl_ms)));
        if let Some(ends) = ends {
            self.expired.remember(digest, ends, now_ms);
        }
    }

    /// For a key the store answered fresh (`new`): how many `new` events
    /// whose key expired within the last TTL it stands for (see [`ExpiredKeys`]).
    pub fn expired_hit(&self, digest: u128, now_ms: u64) -> u64 {
        self.expired.hit(digest, now_ms)
    }

    /// Records a key the store holds as done with the envelope's fingerprint,
    /// in a row that stops counting at `expires_at_ms`.
    pub fn remember_done(&mut self, envelope: &Envelope, expires_at_ms: u64, now_ms: u64) {
        let digest = envelope.digest;
        self.recent.insert(digest, envelope.fingerprint, expires_at_ms, now_ms);
        self.aging.insert(digest, now_ms);
    }

    /// Drops a key from the exact cache (its claim was released, or it was
    /// forgotten); the aging filter only ever sends it to a store read.
    pub fn forget(&mut self, digest: u128) {
        self.recent.remove(digest);
    }

    /// Whether the recent cache may vouch now, given the scope's release marker
    /// as just read from the store ([`crate::store::release_marker`]: its row's
    /// fingerprint and claim time, `None` without a row). A release
    /// deletes rows this cache may hold; the releaser then rewrites the marker.
    /// So a cache hit counts only once the marker was read after the records
    /// arrived and is what it was when the cache was last emptied: otherwise
    /// (the first read too) the cache is emptied and `false` returned, and its
    /// hits go to the store. The aging filter needs nothing: it only ever sends
    /// a key to a store read.
    pub fn note_releases(&mut self, mark: Option<(Fingerprint, u64)>) -> bool {
        if self.release_mark.as_ref() == Some(&mark) {
            return true;
        }
        self.recent.clear();
        self.release_mark = Some(mark);
        false
    }

    /// Records a key the store holds in some state (the aging filter only).
    pub fn remember_seen(&mut self, envelope: &Envelope, now_ms: u64) {
        self.aging.insert(envelope.digest, now_ms);
    }

    /// Starts reading the aging filter's buckets for a key about to be checked;
    /// a batch does this [`PREFETCH_AHEAD`] keys ahead of its checks.
    pub fn prefetch(&self, digest: u128) {
        self.aging.prefetch(digest);
    }

    /// Bytes held by both tiers and the expired keys (the maps estimated from
    /// their capacity), for a gauge.
    pub fn memory_bytes(&self) -> usize {
        self.aging.memory_bytes() + self.recent.memory_bytes() + self.expired.memory_bytes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::aging::tests::digests;

    const TTL: Duration = Duration::from_secs(400);

    #[test]
    fn recent_cache_is_bounded_and_expires_within_half_the_ttl() {
        let mut c = RecentCache::new(4, TTL, 0);
        for d in 0..10u128 {
            c.insert(d, Fingerprint(d), u64::MAX, 0);
        }
        assert!(c.len() <= 4, "holds {} keys", c.len());
        assert_eq!(c.get(9, 0), Some(Fingerprint(9)));
        let mut c = RecentCache::new(100, TTL, 0);
        c.insert(1, Fingerprint(1), u64::MAX, 0);
        assert_eq!(c.get(1, 199_000), Some(Fingerprint(1)));
        assert_eq!(c.get(1, 200_000), None, "gone by ttl/2");
    }

    #[test]
    fn recent_cache_never_outlives_the_row_it_vouches_for() {
        let mut c = RecentCache::new(100, TTL, 0);
        c.insert(1, Fingerprint(1), 50_000, 0);
        assert_eq!(c.get(1, 49_999), Some(Fingerprint(1)));
        assert_eq!(c.get(1, 50_000), None, "the row stopped counting");
        c.insert(2, Fingerprint(2), 10, 10);
        assert_eq!(c.get(2, 10), None, "an expired row is never cached");
    }

    /// The pipeline's policy, step by step against the real embedded store with
    /// controlled time: a key claimed once, then recurring every tenth of the
    /// TTL (a periodic message under content dedup) until past the TTL, then
    /// claimed and released. Whenever the cache says "duplicate", the store
    /// must say so too; past the TTL both say new.
    #[tokio::test]
    async fn cache_and_store_agree_through_a_keys_life() {
        use std::sync::Arc;

        use crate::config::{FilterConfig, Retention};
        use crate::event::{EventKey, Position, Record};
        use crate::store::{Acquired, Claim, ClaimRequest, DedupStore, EmbeddedStore};

        let dir = tempfile::tempdir().unwrap();
        let retention = Retention { ttl: TTL, lease: Duration::from_secs(10), sweep_interval: Duration::from_secs(1) };
        let store = EmbeddedStore::open(dir.path(), &retention).unwrap();
        let t0: u64 = 1_700_000_000_000;
        let config = FilterConfig {
            expected_keys: std::num::NonZeroU64::new(1000).unwrap(),
            false_positive_rate: 0.001,
            recent_keys: 1000,
            expired_keys: 1000,
        };
        let mut filter = Filter::new(&config, TTL, t0);
        let key = EventKey { scope: Arc::from("s"), id: b"periodic".to_vec() };
        let at = |offset: i64| {
            let position = Position { topic: Arc::from("t"), partition: (offset % 3) as i32, offset };
            let record = Record {
                position,
                bad_header: None,
                key: None,
                payload: Some(b"same".to_vec()),
                headers: Vec::new(),
                timestamp_ms: None,
            };
            Envelope { digest: key.digest(), key: key.clone(), fingerprint: Fingerprint(7), record }
        };
        let request = |e: &Envelope| ClaimRequest {
            key: e.key.clone(),
            fingerprint: e.fingerprint,
            position: e.record.position.clone(),
        };
        let ttl_ms = TTL.as_millis() as u64;

        let first = at(0);
        assert_eq!(store.claim(vec![request(&first)], t0).await.unwrap(), vec![Claim::New(Acquired::Fresh)]);
        store.complete(vec![(first.key.clone(), first.record.position.clone())], t0).await.unwrap();
        filter.remember_claimed(&first, t0, t0);

        let mut cache_hits = 0;
        for step in 1..=11u64 {
            let now = t0 + step * ttl_ms / 10;
            let e = at(step as i64);
            let verdict = filter.check(&e, now);
            let answer = store.claim(vec![request(&e)], now).await.unwrap().remove(0);
            if let Verdict::RecentDuplicate(cached) = verdict {
                cache_hits += 1;
                let Claim::Duplicate { first, claimed_at_ms } = &answer else {
                    panic!("at {step}/10 of the ttl the cache vouched for a row the store lacks: {answer:?}")
                };
                // The cache's first claim (a duplicate's age) is the store's.
                assert_eq!((cached.claimed_at_ms, cached.origin), (*claimed_at_ms, Origin::of(first)), "at {step}/10");
            }
            match answer {
                // Past the TTL the key is new again: claimed, completed, remembered anew.
                Claim::New(_) => {
                    assert!(now >= t0 + ttl_ms, "new before the ttl ran out, at {step}/10");
                    assert_eq!(filter.expired_hit(e.digest, now), 1, "new because its key expired, at {step}/10");
                    store.complete(vec![(e.key.clone(), e.record.position.clone())], now).await.unwrap();
                    filter.remember_claimed(&e, now, now);
                }
                // A duplicate from a claim says nothing of the row's age: aging tier only.
                Claim::Duplicate { .. } => filter.remember_seen(&e, now),
                other => panic!("unexpected {other:?} at {step}/10"),
            }
        }
        assert!(cache_hits >= 3, "the cache saved store calls early in the key's life ({cache_hits})");

        // Released claims leave the cache at once: a resend is new for both.
        let now = t0 + 3 * ttl_ms;
        let e = at(100);
        assert_eq!(store.claim(vec![request(&e)], now).await.unwrap(), vec![Claim::New(Acquired::Fresh)]);
        filter.remember_claimed(&e, now, now);
        store.release(vec![(e.key.clone(), e.record.position.clone())]).await.unwrap();
        filter.forget(e.digest);
        let resend = at(101);
        assert!(!matches!(filter.check(&resend, now + 1), Verdict::RecentDuplicate(_)));
        assert_eq!(store.claim(vec![request(&resend)], now + 1).await.unwrap(), vec![Claim::New(Acquired::Fresh)]);
    }

    #[test]
    fn a_recent_duplicate_knows_its_first_claim_and_position() {
        let config = FilterConfig {
            expected_keys: std::num::NonZeroU64::new(1000).unwrap(),
            false_positive_rate: 0.001,
            recent_keys: 1000,
            expired_keys: 1000,
        };
        let mut filter = Filter::new(&config, TTL, 0);
        let e = envelope(b"a", 7);
        filter.remember_claimed(&e, 1_000, 2_000);
        let Verdict::RecentDuplicate(first) = filter.check(&e, 3_000) else { panic!("cached") };
        assert_eq!(first.claimed_at_ms, 1_000);
        assert_eq!(first.origin.map(|o| o.to_string()), Some("t/0/7".to_string()));
    }

    fn envelope(id: &[u8], offset: i64) -> Envelope {
        use crate::event::{EventKey, Position, Record};
        let key = EventKey { scope: std::sync::Arc::from("s"), id: id.to_vec() };
        let record = Record {
            position: Position { topic: std::sync::Arc::from("t"), partition: 0, offset },
            bad_header: None,
            key: None,
            payload: None,
            headers: Vec::new(),
            timestamp_ms: None,
        };
        Envelope { digest: key.digest(), key, fingerprint: Fingerprint(1), record }
    }

    #[test]
    fn expired_keys_hit_only_within_a_ttl_after_expiry() {
        const TTL_MS: u64 = 400_000;
        let mut x = ExpiredKeys::new(100, TTL, 0);
        x.remember(1, TTL_MS, 0);
        assert_eq!(x.hit(1, TTL_MS - 1), 0, "the row still counts: a new answer means a release, not an expiry");
        assert_eq!(x.hit(1, TTL_MS), 1, "expired at the TTL");
        assert_eq!(x.hit(1, 2 * TTL_MS - 1), 1);
        assert_eq!(x.hit(1, 2 * TTL_MS), 0, "kept one TTL after expiry only");
        assert_eq!(x.hit(2, TTL_MS), 0, "never seen");
        // Purged as time goes by.
        x.remember(3, 3 * TTL_MS, 3 * TTL_MS);
        assert_eq!(x.len(), 1, "the first key went once a TTL past its expiry");
        assert_eq!(ExpiredKeys::new(0, TTL, 0).hit(1, 0), 0);
    }

    #[test]
    fn expired_keys_past_their_bound_keep_a_weighted_sample() {
        const TTL_MS: u64 = 400_000;
        let max = 1000;
        let mut x = ExpiredKeys::new(max, TTL, 0);
        let keys: Vec<u128> = digests(9).take(8 * max).collect();
        for &d in &keys {
            x.remember(d, TTL_MS, 0);
        }
        assert!(x.len() < max, "bounded: {}", x.len());
        assert!(x.sample_every() >= 8, "sampling 1 in {}", x.sample_every());
        let estimate: u64 = keys.iter().map(|&d| x.hit(d, TTL_MS)).sum();
        let n = keys.len() as f64;
        assert!((estimate as f64 - n).abs() < n * 0.2, "estimate {estimate} of {n} expired keys");
        assert!(x.memory_bytes() < max * 40, "{} bytes", x.memory_bytes());
    }

    #[test]
    fn disabled_cache_holds_nothing() {
        let mut c = RecentCache::new(0, TTL, 0);
        c.insert(1, Fingerprint(1), u64::MAX, 0);
        assert!(c.is_empty());
    }
}
