//! The aging filter's sizing plan: how many buckets (and bytes) a table needs for a
//! number of keys per ttl at a false-positive rate. Shared by config validation, which
//! bounds the size before anything is allocated, and by `filter::AgingCuckoo`,
//! which allocates it: one plan, so the two cannot disagree. A leaf: it imports nothing
//! from the crate.

/// Entries per bucket: a bucket is one `u64` of four 16-bit entries.
pub(crate) const SLOTS: usize = 4;
/// Fingerprint bits of an entry; the other three are its epoch tag.
pub(crate) const FP_BITS: u32 = 13;
pub(crate) const TAG_BITS: u32 = 16 - FP_BITS;
pub(crate) const TAG_MASK: u64 = (1 << TAG_BITS) - 1;
/// Epochs that cover the ttl. An entry lives through its own epoch and
/// `LIVE_EPOCHS` more, each `ttl / LIVE_EPOCHS` long: at least the ttl, at
/// most `ttl * 8 / 7`. Every tag value is a live age (0..=7); the epoch turn
/// clears an entry before its tag value comes round again.
pub(crate) const LIVE_EPOCHS: u64 = TAG_MASK;
/// Planned load at the peak (a full window plus one epoch). Cuckoo tables with
/// 4-entry buckets fill to about 95% before inserts start to fail.
pub(crate) const MAX_LOAD: f64 = 0.93;
/// Lowest planned load: bounds the memory a very low configured rate may cost
/// (the false-positive rate then bottoms out near 1e-4).
pub(crate) const MIN_LOAD: f64 = 0.1;

/// Tables of this size and more are aligned to (and ask the kernel for) 2 MiB pages.
pub(crate) const HUGE_PAGE: usize = 2 << 20;

/// Bytes of the table planned for `expected_keys` per ttl at
/// `false_positive_rate` (overflow tables come on top only when more keys
/// arrive than planned); `None` when that size does not fit in memory
/// addresses at all. Config validation bounds it with this same plan.
pub fn planned_bytes(expected_keys: u64, false_positive_rate: f64) -> Option<usize> {
    let buckets = planned_buckets(expected_keys, false_positive_rate)?;
    let bytes = buckets.checked_mul(std::mem::size_of::<u64>())?;
    // What a Layout can describe, rounded up to the 2 MiB alignment of large tables.
    (bytes <= isize::MAX as usize - HUGE_PAGE).then_some(bytes)
}

fn planned_buckets(expected_keys: u64, false_positive_rate: f64) -> Option<usize> {
    // A check compares 2 * SLOTS entries, each matching with 1 / (2^FP_BITS - 1).
    let fp_values = ((1u64 << FP_BITS) - 1) as f64;
    // NaN (never from a validated config) plans the densest table, not a panic.
    let load = (false_positive_rate * fp_values / (2 * SLOTS) as f64).clamp(MIN_LOAD, MAX_LOAD);
    let load = if load.is_nan() { MAX_LOAD } else { load };
    let peak = expected_keys as f64 * (LIVE_EPOCHS + 1) as f64 / LIVE_EPOCHS as f64;
    let buckets = (peak / (SLOTS as f64 * load)).ceil().max(1.0);
    // f64 -> usize saturates; anything this large fails the byte check.
    (buckets < usize::MAX as f64).then_some(buckets as usize)
}
