//! An approximate set of the keys inserted within a time window, in bounded
//! memory: the aging cuckoo table. Two stages keep one: the filter stage,
//! whose miss sends a key straight to its claim ([`crate::filter`]), and the
//! embedded store, whose miss stands for the read of a row that does not
//! exist ([`crate::store::embedded`]). Both rely on the one promise made
//! here: a key inserted at time t is reported until at least t + ttl, however
//! many keys arrive.
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

use std::alloc::{alloc, dealloc, handle_alloc_error, Layout};
use std::fmt;
use std::ptr::NonNull;
use std::time::Duration;

use crate::config::filter_plan::{planned_bytes, FP_BITS, HUGE_PAGE, LIVE_EPOCHS, SLOTS, TAG_BITS, TAG_MASK};

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

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    const TTL: Duration = Duration::from_secs(400);

    /// Deterministic, uniform stand-ins for key digests (splitmix64, fixed seed).
    pub(crate) fn digests(seed: u64) -> impl Iterator<Item = u128> {
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
