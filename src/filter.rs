//! The filter stage: two in-process tiers in front of the store. Both only
//! ever make the store do less; neither decides "new" on its own.
//!
//! - [`RecentCache`]: exact keys this process completed recently, with their
//!   fingerprints. A hit with the same fingerprint is a confirmed duplicate
//!   and skips the store. Entries live at most half the store TTL, so the
//!   store still holds every key the cache vouches for.
//! - [`AgingCuckoo`]: an approximate set of the keys seen within the
//!   retention window. A miss means "very likely new" and goes straight to
//!   the claim; a hit means "suspected duplicate" and goes to a cheap store
//!   read first. Keys age out in place, so memory stays bounded.
//!
//! Why a cuckoo table with aging entries rather than a time-sliced Bloom
//! filter: `cargo bench --bench filter`, 10M keys per ttl, 0.1% asked, each
//! filter in its steady state (a shared 2-core machine, so times are rough):
//!
//! | design                              | bytes/key | FPR    | ns/check: lone, in a batch |
//! |-------------------------------------|-----------|--------|----------------------------|
//! | 4 `bloomfilter` slices (the former) | 3.60      | 0.014% | ~1800, ~1700               |
//! | 4 split-block Bloom slices          | 4.67      | 0.014% | ~500, ~360                 |
//! | aging cuckoo table (this one)       | 2.46      | 0.090% | ~67, ~24 (prefetching)     |
//!
//! Slicing costs a Bloom filter twice. Every check probes every slice, so
//! each slice gets a quarter of the false-positive budget (more bits per
//! key, more random reads per check: k SipHash probes in each of 4 slices),
//! and the slice being filled and the one being retired hold memory for keys
//! mostly outside the window. Blocking the slices (one cache line per slice)
//! makes the reads cheaper but not fewer, and costs bits. Here a key is one
//! 16-bit entry in one of two 8-byte buckets: a check is two independent
//! reads whatever the key count, and expiry clears entries where they lie,
//! at the cost of one epoch (ttl / 7) of extra keys instead of whole slices.
//!
//! Under 2 bytes per key would take a quotient filter (the bucket index
//! standing in for fingerprint bits): with the age in each entry, 16 bits
//! are the floor here: 10 for 0.1% at best, 3 more because a check compares
//! 8 entries, 3 for the age; divided by a load under 1 and times 8/7.

use foldhash::HashMap;
use std::alloc::{alloc, dealloc, handle_alloc_error, Layout};
use std::fmt;
use std::ptr::NonNull;
use std::time::Duration;

use crate::config::filter_plan::{planned_bytes, FP_BITS, HUGE_PAGE, LIVE_EPOCHS, SLOTS, TAG_BITS, TAG_MASK};
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
/// Displacements tried before an insert spills into an overflow table.
const MAX_KICKS: u32 = 500;

const LANE_LOW: u64 = 0x0001_0001_0001_0001;
const LANE_HIGH: u64 = 0x8000_8000_8000_8000;
/// The fingerprint bits of every lane (the tags masked off).
const FP_LANES: u64 = (0xffff ^ TAG_MASK) * LANE_LOW;

/// The zero lanes of `v`, flagged by their high bit. Nonzero exactly when a
/// lane is zero, and the lowest flag is always a true zero lane.
#[inline]
fn zero_lanes(v: u64) -> u64 {
    v.wrapping_sub(LANE_LOW) & !v & LANE_HIGH
}

#[inline]
fn lane_of(flags: u64) -> u32 {
    flags.trailing_zeros() / 16 * 16
}

/// `h` mapped onto `0..n` without a division (Lemire's multiply-shift).
#[inline]
fn reduce(h: u64, n: usize) -> usize {
    ((h as u128 * n as u128) >> 64) as usize
}

/// The other bucket of a fingerprint in bucket `i`: `(c - i) mod n` with `c`
/// from the fingerprint alone, so a displaced entry finds its other bucket
/// without its key, and `alt(alt(i)) == i` for any bucket count.
#[inline]
fn alt(i: usize, fp: u64, n: usize) -> usize {
    let c = reduce(fp.wrapping_mul(0x9e37_79b9_7f4a_7c15), n);
    if c >= i {
        c - i
    } else {
        c + n - i
    }
}

/// A table's buckets, zeroed. Tables of 2 MiB and more ask the kernel for
/// 2 MiB pages: a check reads two random buckets, and with 4 KiB pages each
/// read is a TLB miss as well as a cache miss.
struct Buckets {
    ptr: NonNull<u64>,
    len: usize,
}

// Owns its memory like a Box<[u64]>.
unsafe impl Send for Buckets {}
unsafe impl Sync for Buckets {}

impl Buckets {
    /// Overflow tables have the first table's size, which was allocated once.
    fn zeroed(len: usize) -> Buckets {
        match Buckets::layout_for(len) {
            Some(layout) => Buckets::try_zeroed(len).unwrap_or_else(|| handle_alloc_error(layout)),
            None => panic!("a bucket table of {len} u64s cannot be described; AgingCuckoo::try_new checks this first"),
        }
    }

    fn layout_for(len: usize) -> Option<Layout> {
        let bytes = len.max(1).checked_mul(std::mem::size_of::<u64>())?;
        let align = if bytes >= HUGE_PAGE { HUGE_PAGE } else { 64 };
        Layout::from_size_align(bytes, align).ok()
    }

    /// `None` when the table cannot be described or the allocator refuses it.
    fn try_zeroed(len: usize) -> Option<Buckets> {
        let layout = Buckets::layout_for(len)?;
        let (bytes, align) = (layout.size(), layout.align());
        // SAFETY: the layout is non-zero in size; the memory is zeroed before
        // any slice of it exists, and the advice only concerns pages in it.
        unsafe {
            let raw = alloc(layout);
            let ptr = NonNull::new(raw as *mut u64)?;
            #[cfg(target_os = "linux")]
            if align == HUGE_PAGE {
                // Advice before the pages are first touched (by the zeroing), so they
                // fault in huge; a kernel that declines leaves ordinary pages.
                libc::madvise(raw.cast(), bytes / HUGE_PAGE * HUGE_PAGE, libc::MADV_HUGEPAGE);
            }
            std::ptr::write_bytes(raw, 0, bytes);
            Some(Buckets { ptr, len })
        }
    }

    fn layout(&self) -> Layout {
        Buckets::layout_for(self.len).expect("valid when allocated")
    }
}

impl std::ops::Deref for Buckets {
    type Target = [u64];
    fn deref(&self) -> &[u64] {
        // SAFETY: `len` zeroed u64s allocated in `zeroed`, owned by self.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }
}

impl std::ops::DerefMut for Buckets {
    fn deref_mut(&mut self) -> &mut [u64] {
        // SAFETY: as in Deref, and `&mut self` makes this the only reference.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}

impl Drop for Buckets {
    fn drop(&mut self) {
        // SAFETY: allocated in `zeroed` with this same layout.
        unsafe { dealloc(self.ptr.as_ptr().cast(), self.layout()) }
    }
}

/// The aging filter's table cannot be had: too large to address, or the
/// allocator refused it.
#[derive(Debug, Clone, PartialEq)]
pub struct FilterAllocError {
    /// As configured (`[filter] expected_keys`).
    pub expected_keys: u64,
    /// As configured (`[filter] false_positive_rate`).
    pub false_positive_rate: f64,
    /// The planned size, when it could be computed.
    pub bytes: Option<usize>,
}

impl fmt::Display for FilterAllocError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "cannot allocate the filter for {} expected keys at false-positive rate {}: ",
            self.expected_keys, self.false_positive_rate
        )?;
        match self.bytes {
            Some(b) => write!(f, "the allocator refused its {b} bytes")?,
            None => write!(f, "its size overflows memory addresses")?,
        }
        write!(f, "; lower [filter] expected_keys or raise false_positive_rate")
    }
}

impl std::error::Error for FilterAllocError {}

/// An approximate set of the keys inserted within the last ttl: a cuckoo
/// filter whose 16-bit entries carry a 13-bit fingerprint and a 3-bit epoch
/// tag. A key inserted at time t is reported until at least t + ttl (no false
/// negatives inside the window); when an epoch turns, entries that have lived
/// their `LIVE_EPOCHS` are cleared in place, so memory stays bounded without
/// slices. A check reads two 8-byte buckets and compares four entries each at
/// once (lanes in a `u64`); a false positive needs one of those 8 entries to
/// share the 13-bit fingerprint: about `8 * load / 8191`, 0.09% at the
/// planned peak load.
///
/// More keys than planned never turn into false negatives: an insert that
/// finds no room spills into an overflow table of the same shape (checked
/// too, so the false-positive rate rises), which is dropped once its entries
/// have aged out.
pub struct AgingCuckoo {
    tables: Vec<Buckets>,
    buckets: usize,
    entries: usize,
    epoch_span_ms: u64,
    epoch: u64,
    next_epoch_ms: u64,
    /// xorshift state for picking victims; fixed seed, so runs repeat.
    rng: u64,
}

#[derive(Clone, Copy)]
struct Spot {
    i1: usize,
    i2: usize,
    fp: u64,
}

impl AgingCuckoo {
    /// Sized for `expected_keys` per ttl at `false_positive_rate`. Rates of 0.1%
    /// and above cost 16 bits / 0.93 load * 8/7 (the extra epoch): ~2.5 bytes
    /// per key; lower rates lower the planned load, and memory grows as 1/rate.
    ///
    /// # Panics
    /// When the table cannot be allocated (see [`AgingCuckoo::try_new`], which
    /// says so instead).
    pub fn new(expected_keys: u64, false_positive_rate: f64, ttl: Duration, now_ms: u64) -> AgingCuckoo {
        AgingCuckoo::try_new(expected_keys, false_positive_rate, ttl, now_ms).unwrap_or_else(|e| panic!("{e}"))
    }

    /// As [`AgingCuckoo::new`], but an error instead of a panic or an abort
    /// when the planned table is too large to address or to allocate.
    pub fn try_new(
        expected_keys: u64,
        false_positive_rate: f64,
        ttl: Duration,
        now_ms: u64,
    ) -> Result<AgingCuckoo, FilterAllocError> {
        let too_large = FilterAllocError { expected_keys, false_positive_rate, bytes: None };
        let bytes = planned_bytes(expected_keys, false_positive_rate).ok_or(too_large)?;
        let buckets = bytes / std::mem::size_of::<u64>();
        let table = Buckets::try_zeroed(buckets).ok_or(FilterAllocError {
            expected_keys,
            false_positive_rate,
            bytes: Some(bytes),
        })?;
        let epoch_span_ms = u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX).div_ceil(LIVE_EPOCHS).max(1);
        let epoch = now_ms / epoch_span_ms;
        Ok(AgingCuckoo {
            tables: vec![table],
            buckets,
            entries: 0,
            epoch_span_ms,
            epoch,
            next_epoch_ms: epoch.saturating_add(1).saturating_mul(epoch_span_ms),
            rng: 0x2545_f491_4f6c_dd1d,
        })
    }

    #[inline]
    fn spot(&self, digest: u128) -> Spot {
        // The digest is already a uniform 128-bit hash: the low half picks the
        // bucket, the high half the fingerprint (1..=8191, never 0 = empty).
        let i1 = reduce(digest as u64, self.buckets);
        let fp = 1 + (((digest >> 96) as u64 * ((1 << FP_BITS) - 1)) >> 32);
        Spot { i1, i2: alt(i1, fp, self.buckets), fp }
    }

    /// Whether the key was inserted within the window (or shares a
    /// fingerprint with one that was).
    #[inline]
    pub fn check(&self, digest: u128) -> bool {
        let s = self.spot(digest);
        let want = (s.fp << TAG_BITS) * LANE_LOW;
        // Both loads before any branch, so their cache misses overlap.
        let holds =
            |t: &Buckets| zero_lanes((t[s.i1] & FP_LANES) ^ want) | zero_lanes((t[s.i2] & FP_LANES) ^ want) != 0;
        let (first, overflow) = self.tables.split_first().expect("there is always a first table");
        holds(first) || overflow.iter().any(holds)
    }

    /// Starts loading the two buckets of `digest`, so that a `check` of it a
    /// little later finds them in cache. Checking a batch, prefetching a few
    /// keys ahead overlaps their memory reads (a no-op off x86_64).
    #[inline]
    pub fn prefetch(&self, digest: u128) {
        #[cfg(target_arch = "x86_64")]
        {
            use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};
            let s = self.spot(digest);
            let t = self.tables[0].as_ptr();
            // SAFETY: a prefetch never faults, and both indices are within the table.
            unsafe {
                _mm_prefetch::<_MM_HINT_T0>(t.add(s.i1).cast());
                _mm_prefetch::<_MM_HINT_T0>(t.add(s.i2).cast());
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        let _ = digest;
    }

    /// Records the key as seen at `now_ms` (milliseconds since the Unix epoch).
    pub fn insert(&mut self, digest: u128, now_ms: u64) {
        self.advance(now_ms);
        let s = self.spot(digest);
        let tag = self.epoch & TAG_MASK;
        let want = (s.fp << TAG_BITS) * LANE_LOW;
        // Already there (or a fingerprint twin is): restamp it, so it lives a
        // full window from now. No second entry, so duplicates cost no room.
        for t in self.tables.iter_mut() {
            for i in [s.i1, s.i2] {
                let hits = zero_lanes((t[i] & FP_LANES) ^ want);
                if hits != 0 {
                    let shift = lane_of(hits);
                    t[i] = (t[i] & !(TAG_MASK << shift)) | tag << shift;
                    return;
                }
            }
        }
        let (mut i1, mut i2, mut entry) = (s.i1, s.i2, s.fp << TAG_BITS | tag);
        let mut t = 0;
        loop {
            if t == self.tables.len() {
                self.tables.push(Buckets::zeroed(self.buckets));
            }
            match self.place(t, i1, i2, entry) {
                Ok(()) => break,
                // The last one displaced has no room here: it moves on, to its own bucket
                // in the next table (same bucket count, so the same two buckets).
                Err((i, victim)) => {
                    (i1, i2, entry) = (i, alt(i, victim >> TAG_BITS, self.buckets), victim);
                    t += 1;
                }
            }
        }
        self.entries += 1;
    }

    /// Cuckoo insertion into table `t`; on failure, the entry left without a
    /// place and the bucket it was last displaced from.
    fn place(&mut self, t: usize, i1: usize, i2: usize, entry: u64) -> Result<(), (usize, u64)> {
        let n = self.buckets;
        let table = &mut self.tables[t];
        let put = |table: &mut [u64], i: usize, entry: u64| {
            let free = zero_lanes(table[i]);
            if free != 0 {
                table[i] |= entry << lane_of(free);
            }
            free != 0
        };
        if put(table, i1, entry) || put(table, i2, entry) {
            return Ok(());
        }
        let mut rng = self.rng;
        let mut next = || {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            rng
        };
        let (mut i, mut entry) = (if next() & 1 == 0 { i1 } else { i2 }, entry);
        let mut result = Err((i, entry));
        for _ in 0..MAX_KICKS {
            // An occupant whose other bucket has room moves there and ends the chain:
            // four independent reads, overlapping, instead of a chain of dependent ones.
            let room = (0..SLOTS as u32 * 16).step_by(16).find_map(|shift| {
                let other = alt(i, (table[i] >> shift & 0xffff) >> TAG_BITS, n);
                (zero_lanes(table[other]) != 0).then_some((shift, other))
            });
            if let Some((shift, other)) = room {
                let occupant = (table[i] >> shift) & 0xffff;
                put(table, other, occupant);
                table[i] = (table[i] & !(0xffff << shift)) | entry << shift;
                result = Ok(());
                break;
            }
            let shift = (next() % SLOTS as u64) as u32 * 16;
            let victim = (table[i] >> shift) & 0xffff;
            table[i] = (table[i] & !(0xffff << shift)) | entry << shift;
            entry = victim;
            i = alt(i, victim >> TAG_BITS, n);
            if put(table, i, entry) {
                result = Ok(());
                break;
            }
            result = Err((i, entry));
        }
        self.rng = rng;
        result
    }

    /// Moves the clock: when an epoch turns, entries older than the window are
    /// cleared. Cheap until then (one comparison); the turn itself scans the
    /// table once per `ttl / 7`.
    pub fn advance(&mut self, now_ms: u64) {
        if now_ms < self.next_epoch_ms {
            return;
        }
        let epoch = now_ms / self.epoch_span_ms;
        let turned = epoch - self.epoch;
        let mut cleared = 0;
        for table in self.tables.iter_mut() {
            for bucket in table.iter_mut().filter(|b| **b != 0) {
                for shift in (0..64).step_by(16) {
                    let entry = (*bucket >> shift) & 0xffff;
                    let age = self.epoch.wrapping_sub(entry & TAG_MASK) & TAG_MASK;
                    if entry != 0 && age + turned > LIVE_EPOCHS {
                        *bucket &= !(0xffff << shift);
                        cleared += 1;
                    }
                }
            }
        }
        self.entries -= cleared;
        // Overflow tables exist only while more keys arrive than planned; they go once empty.
        let mut index = 0;
        self.tables.retain(|t| {
            index += 1;
            index == 1 || t.iter().any(|b| *b != 0)
        });
        self.epoch = epoch;
        self.next_epoch_ms = (epoch + 1) * self.epoch_span_ms;
    }

    /// Keys held (within the window, plus at most one epoch more).
    pub fn len(&self) -> usize {
        self.entries
    }

    /// No key held.
    pub fn is_empty(&self) -> bool {
        self.entries == 0
    }

    /// Bytes of the tables, overflow included.
    pub fn memory_bytes(&self) -> usize {
        self.tables.len() * self.buckets * std::mem::size_of::<u64>()
    }

    /// Overflow tables in use (0 while the planned key count holds).
    pub fn overflow_tables(&self) -> usize {
        self.tables.len() - 1
    }
}

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

    /// Deterministic, uniform stand-ins for key digests (splitmix64, fixed seed).
    fn digests(seed: u64) -> impl Iterator<Item = u128> {
        let mut state = seed;
        std::iter::repeat_with(move || {
            let mut next = || {
                state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
                let mut z = state;
                z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
                z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
                z ^ (z >> 31)
            };
            (next() as u128) << 64 | next() as u128
        })
    }

    const TTL_MS: u64 = 400_000;

    #[test]
    fn aging_filter_has_no_false_negatives_within_the_ttl() {
        // Keys at a steady rate over three windows; at every step, every key
        // inserted less than a ttl ago is still reported.
        let keys: Vec<u128> = digests(1).take(3000).collect();
        let step = 3 * TTL_MS / keys.len() as u64 + 7; // not a divisor of the epoch span
        let mut f = AgingCuckoo::new(1000, 0.001, TTL, 0);
        for (n, &d) in keys.iter().enumerate() {
            let now = n as u64 * step;
            f.insert(d, now);
            for (m, &old) in keys[..=n].iter().enumerate().rev() {
                if now - m as u64 * step >= TTL_MS {
                    break;
                }
                assert!(f.check(old), "key {m} inserted at {} missing at {now}", m as u64 * step);
            }
        }
        // Right up to the last millisecond of the window, with no inserts to move the clock
        // other than the check path's advance.
        let mut f = AgingCuckoo::new(1000, 0.001, TTL, 0);
        f.insert(keys[0], 12_345);
        f.advance(12_345 + TTL_MS - 1);
        assert!(f.check(keys[0]));
    }

    #[test]
    fn aging_filter_forgets_after_the_window_and_stays_bounded() {
        let expected = 10_000u64;
        let mut f = AgingCuckoo::new(expected, 0.001, TTL, 0);
        let memory = f.memory_bytes();
        let step = TTL_MS / expected;
        let keys: Vec<u128> = digests(2).take(5 * expected as usize).collect();
        let mut peak = 0;
        for (n, &d) in keys.iter().enumerate() {
            f.insert(d, n as u64 * step);
            peak = peak.max(f.len());
        }
        // A window plus at most one epoch (ttl / 7) of keys, and no overflow at the planned rate.
        assert!(peak as u64 <= expected * 8 / 7 + 2, "held {peak} keys");
        assert_eq!(f.overflow_tables(), 0);
        assert_eq!(f.memory_bytes(), memory);
        // Keys from the first window are gone (bar false positives).
        let stale = keys[..expected as usize].iter().filter(|d| f.check(**d)).count();
        assert!(stale < 30, "{stale} keys from 4 windows ago still reported");
        // A long quiet spell clears everything.
        f.advance(100 * TTL_MS);
        assert!(f.is_empty());
        assert!(!keys.iter().any(|d| f.check(*d)));
    }

    #[test]
    fn reinserting_a_key_restamps_it_without_a_second_entry() {
        let mut f = AgingCuckoo::new(100, 0.001, TTL, 0);
        f.insert(42, 0);
        f.insert(42, TTL_MS - 1);
        assert_eq!(f.len(), 1);
        f.advance(2 * TTL_MS - 2);
        assert!(f.check(42), "lives a full window from its last insert");
        f.advance(3 * TTL_MS);
        assert!(!f.check(42));
    }

    #[test]
    fn more_keys_than_planned_spill_over_without_false_negatives_and_then_shrink() {
        let mut f = AgingCuckoo::new(1000, 0.001, TTL, 0);
        let memory = f.memory_bytes();
        let keys: Vec<u128> = digests(3).take(5000).collect();
        for &d in &keys {
            f.insert(d, 0);
        }
        assert!(f.overflow_tables() > 0);
        // A key whose fingerprint twin is already in its buckets takes no entry of its own.
        assert!(f.len() <= keys.len() && f.len() > keys.len() * 99 / 100, "{} entries", f.len());
        assert!(keys.iter().all(|d| f.check(*d)), "no false negatives past the planned count");
        f.advance(2 * TTL_MS);
        f.insert(7, 2 * TTL_MS);
        assert_eq!(f.overflow_tables(), 0, "overflow tables go once their keys age out");
        assert_eq!(f.memory_bytes(), memory);
    }

    /// Keys over a whole window plus one epoch (the peak the filter is sized for);
    /// the false-positive rate measured on keys never inserted.
    fn measured_fpr(expected: u64, rate: f64) -> (f64, AgingCuckoo) {
        let mut f = AgingCuckoo::new(expected, rate, TTL, 0);
        let held = expected * 8 / 7;
        let span = TTL_MS * 8 / 7 - 1;
        for (n, d) in digests(4).take(held as usize).enumerate() {
            f.insert(d, n as u64 * span / held);
        }
        let probes = 400_000;
        let hits = digests(5).take(probes).filter(|d| f.check(*d)).count();
        (hits as f64 / probes as f64, f)
    }

    #[test]
    fn false_positive_rate_is_within_budget_at_the_peak() {
        let (fpr, f) = measured_fpr(100_000, 0.001);
        assert_eq!(f.overflow_tables(), 0);
        assert!(fpr <= 0.001, "measured fpr {fpr}");
        assert!(fpr >= 0.0005, "measured fpr {fpr}: the table is larger than planned");
        let bytes_per_key = f.memory_bytes() as f64 / 100_000.0;
        assert!(bytes_per_key < 2.5, "{bytes_per_key} bytes per key");
    }

    #[test]
    fn a_lower_configured_rate_is_met_with_more_memory() {
        let (fpr, f) = measured_fpr(20_000, 0.0002);
        assert!(fpr <= 0.0002, "measured fpr {fpr}");
        assert!(f.memory_bytes() > 20_000 * 8);
    }

    #[test]
    fn absurd_sizes_are_errors_not_panics_or_aborts() {
        const TTL: Duration = Duration::from_secs(400);
        // Overflows the address space: refused before any allocation.
        assert_eq!(planned_bytes(u64::MAX, 0.001), None);
        let e = AgingCuckoo::try_new(u64::MAX, 0.001, TTL, 0).err().expect("u64::MAX keys cannot be planned");
        assert_eq!(e.bytes, None);
        assert!(e.to_string().contains("overflows") && e.to_string().contains("expected_keys"), "{e}");
        // Addressable (a few PiB) but more than any machine holds: the allocator says no.
        let bytes = planned_bytes(1 << 50, 0.001).expect("2^50 keys fit in a Layout");
        let e = AgingCuckoo::try_new(1 << 50, 0.001, TTL, 0).err().expect("petabytes are refused");
        assert_eq!(e.bytes, Some(bytes));
        assert!(e.to_string().contains(&format!("refused its {bytes} bytes")), "{e}");
        // NaN or a huge ttl plan something sane (a validated config has neither).
        assert!(AgingCuckoo::try_new(1000, f64::NAN, TTL, 0).is_ok());
        assert!(AgingCuckoo::try_new(1000, 0.001, Duration::MAX, u64::MAX).is_ok());
        // The plan is what gets allocated.
        let f = AgingCuckoo::try_new(100_000, 0.001, TTL, 0).unwrap();
        assert_eq!(Some(f.memory_bytes()), planned_bytes(100_000, 0.001));
    }
}
