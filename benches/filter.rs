//! The aging filter's check: ns per check, measured false-positive rate and
//! bytes per key, at 1M and 10M keys, for each candidate design.
//!
//! Every candidate is fed the same u128 xxh3 digests (`EventKey::digest`, as
//! the pipeline computes them) and sized for the same target: `n` keys per ttl
//! at a 0.1% false-positive rate. Keys arrive at a steady rate over two ttl
//! windows, so each filter is measured in its steady state, full.
//!
//! - `bloomfilter`: the former `SlicedBloom`: the `bloomfilter` crate in 4 time
//!   slices (each sized expected/3 * 1.25, each given a quarter of the budget).
//! - `blocked_bloom`: the same slicing with split-block slices (one 64-byte
//!   block per slice probe, 8 bits from the digest, one per word).
//! - `aging_cuckoo`: `kdedup::aging::AgingCuckoo`, the filter the pipeline uses.
//!
//! Criterion reports the time per check: `absent` and `present` time a lone
//! check; `absent_batch` times 256 checks in a row (as the pipeline makes
//! them; divide by 256), and `absent_batch_prefetch<d>` the same reading the
//! buckets `d` keys ahead. False-positive rate (on 1M keys never inserted),
//! memory per key of the window and per key held, insert time and false
//! negatives over the last window are printed to stdout
//! (`filter <name> keys=<n> ...` lines), since criterion cannot.

use std::collections::VecDeque;
use std::hint::black_box;
use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion};
use kdedup::aging::AgingCuckoo;
use kdedup::event::EventKey;
use kdedup::filter::PREFETCH_AHEAD;

const TTL: Duration = Duration::from_secs(24 * 3600);
const FPR: f64 = 0.001;
/// Absent and present keys checked per candidate (a power of two: the cursor wraps with a mask).
const PROBES: usize = 1 << 20;

trait Candidate {
    const NAME: &'static str;
    fn build(expected_keys: u64) -> Self;
    fn insert(&mut self, digest: u128, now_ms: u64);
    fn check(&self, digest: u128) -> bool;
    fn memory_bytes(&self) -> usize;
    /// Keys the filter holds now.
    fn len(&self) -> usize;
    const PREFETCHES: bool = false;
    fn prefetch(&self, _digest: u128) {}
}

impl Candidate for AgingCuckoo {
    const NAME: &'static str = "aging_cuckoo";
    fn build(expected_keys: u64) -> Self {
        AgingCuckoo::new(expected_keys, FPR, TTL, 0)
    }
    fn insert(&mut self, digest: u128, now_ms: u64) {
        AgingCuckoo::insert(self, digest, now_ms)
    }
    fn check(&self, digest: u128) -> bool {
        AgingCuckoo::check(self, digest)
    }
    fn memory_bytes(&self) -> usize {
        AgingCuckoo::memory_bytes(self)
    }
    fn len(&self) -> usize {
        AgingCuckoo::len(self)
    }
    const PREFETCHES: bool = true;
    fn prefetch(&self, digest: u128) {
        AgingCuckoo::prefetch(self, digest)
    }
}

/// The slicing both Bloom candidates share, as `SlicedBloom` had it: 4 slices,
/// 3 of them spanning the ttl, a new one per span (or when the current is full).
const SLICES: usize = 4;

struct Sliced<B> {
    slices: VecDeque<(B, u64, usize)>,
    items_per_slice: usize,
    span_ms: u64,
}

trait Slice {
    fn new(items: usize, fpr: f64) -> Self;
    fn set(&mut self, digest: u128);
    fn check(&self, digest: u128) -> bool;
    fn bytes(&self) -> usize;
}

impl<B: Slice> Sliced<B> {
    fn new(expected_keys: u64) -> Self {
        let live = (SLICES - 1) as u64;
        let items_per_slice = (expected_keys.div_ceil(live) * 5 / 4).max(1) as usize;
        let span_ms = (TTL.as_millis() as u64 / live).max(1);
        let mut s = Sliced { slices: VecDeque::new(), items_per_slice, span_ms };
        s.push(0);
        s
    }

    fn push(&mut self, now_ms: u64) {
        self.slices.push_front((B::new(self.items_per_slice, FPR / SLICES as f64), now_ms, 0));
        self.slices.truncate(SLICES);
    }

    fn insert(&mut self, digest: u128, now_ms: u64) {
        let (_, started, items) = self.slices.front().expect("always a current slice");
        if now_ms - started >= self.span_ms || *items >= self.items_per_slice {
            let horizon = self.span_ms * SLICES as u64;
            self.slices.retain(|(_, started, _)| now_ms - started < horizon);
            self.push(now_ms);
        }
        let front = self.slices.front_mut().expect("always a current slice");
        front.0.set(digest);
        front.2 += 1;
    }

    fn check(&self, digest: u128) -> bool {
        self.slices.iter().any(|(b, _, _)| b.check(digest))
    }

    fn memory_bytes(&self) -> usize {
        self.slices.iter().map(|(b, _, _)| b.bytes()).sum()
    }
}

impl Slice for bloomfilter::Bloom<u128> {
    fn new(items: usize, fpr: f64) -> Self {
        bloomfilter::Bloom::new_for_fp_rate(items, fpr).expect("valid sizes")
    }
    fn set(&mut self, digest: u128) {
        bloomfilter::Bloom::set(self, &digest)
    }
    fn check(&self, digest: u128) -> bool {
        bloomfilter::Bloom::check(self, &digest)
    }
    fn bytes(&self) -> usize {
        self.as_slice().len()
    }
}

/// One 64-byte block per key: 8 bits, one in each word.
#[derive(Clone, Copy, Default)]
#[repr(align(64))]
struct Block([u64; 8]);

struct SplitBlock {
    blocks: Vec<Block>,
}

impl SplitBlock {
    #[inline]
    fn locate(&self, digest: u128) -> (usize, [u64; 8]) {
        let block = ((digest as u64 as u128 * self.blocks.len() as u128) >> 64) as usize;
        let hi = (digest >> 64) as u64;
        let mut mask = [0u64; 8];
        for (j, m) in mask.iter_mut().enumerate() {
            *m = 1 << ((hi >> (6 * j)) & 63);
        }
        (block, mask)
    }
}

impl Slice for SplitBlock {
    fn new(items: usize, fpr: f64) -> Self {
        // Blocking costs bits over a plain Bloom filter's 1.44 * log2(1/fpr); 1.3x of that
        // measured within budget at 8 bits per key per block.
        let bits_per_key = 1.3 * 1.44 * (1.0 / fpr).log2();
        let blocks = ((items as f64 * bits_per_key / 512.0).ceil() as usize).max(1);
        SplitBlock { blocks: vec![Block::default(); blocks] }
    }
    fn set(&mut self, digest: u128) {
        let (b, mask) = self.locate(digest);
        for (w, m) in self.blocks[b].0.iter_mut().zip(mask) {
            *w |= m;
        }
    }
    fn check(&self, digest: u128) -> bool {
        let (b, mask) = self.locate(digest);
        self.blocks[b].0.iter().zip(mask).fold(true, |all, (w, m)| all & (w & m != 0))
    }
    fn bytes(&self) -> usize {
        self.blocks.len() * std::mem::size_of::<Block>()
    }
}

struct BloomCrate(Sliced<bloomfilter::Bloom<u128>>);
struct BlockedBloom(Sliced<SplitBlock>);

macro_rules! sliced_candidate {
    ($ty:ident, $name:literal) => {
        impl Candidate for $ty {
            const NAME: &'static str = $name;
            fn build(expected_keys: u64) -> Self {
                $ty(Sliced::new(expected_keys))
            }
            fn insert(&mut self, digest: u128, now_ms: u64) {
                self.0.insert(digest, now_ms)
            }
            fn check(&self, digest: u128) -> bool {
                self.0.check(digest)
            }
            fn memory_bytes(&self) -> usize {
                self.0.memory_bytes()
            }
            fn len(&self) -> usize {
                self.0.slices.iter().map(|(_, _, items)| items).sum()
            }
        }
    };
}
sliced_candidate!(BloomCrate, "bloomfilter");
sliced_candidate!(BlockedBloom, "blocked_bloom");

/// Digests as the pipeline computes them, for ids `prefix-0 ..`.
fn digests(prefix: &str, range: std::ops::Range<usize>) -> Vec<u128> {
    let scope: Arc<str> = Arc::from("bench");
    range.map(|i| EventKey { scope: scope.clone(), id: format!("{prefix}-{i}").into_bytes() }.digest()).collect()
}

fn bench_candidate<C: Candidate>(c: &mut Criterion, n: usize, keys: &[u128], absent: &[u128]) {
    // Two windows of keys at a steady rate: the filter ends in its steady state, holding
    // the last window and its own overhead (the Bloom slice being retired, the cuckoo's
    // extra epoch), with the last key inserted just before a slice or epoch turns.
    let started = Instant::now();
    let mut filter = C::build(n as u64);
    let ttl_ms = TTL.as_millis() as u64;
    for (i, &d) in keys.iter().enumerate() {
        filter.insert(d, i as u64 * ttl_ms / n as u64);
    }
    let build = started.elapsed();
    let false_positives = absent.iter().filter(|d| filter.check(**d)).count();
    // Every key of the last window must be there.
    let window = &keys[keys.len() - n..];
    let missing = window.iter().filter(|d| !filter.check(**d)).count();
    let bytes = filter.memory_bytes();
    println!(
        "filter {:<13} keys={:<9} fpr={:.4}% bytes/key={:.2} held={} bytes/held={:.2} memory={:.1}MiB insert={:.0}ns false_negatives={}",
        C::NAME,
        n,
        100.0 * false_positives as f64 / absent.len() as f64,
        bytes as f64 / n as f64,
        filter.len(),
        bytes as f64 / filter.len() as f64,
        bytes as f64 / (1 << 20) as f64,
        build.as_nanos() as f64 / keys.len() as f64,
        missing,
    );
    // Present keys in a scattered order, so neither set of probes walks memory in order.
    let present: Vec<u128> = (0..PROBES).map(|i| window[i.wrapping_mul(2_654_435_761) % n]).collect();

    let mut group = c.benchmark_group("filter_check");
    // One check per iteration: the time of a lone check.
    for (kind, probes) in [("absent", absent), ("present", &present[..])] {
        let mut at = 0;
        group.bench_function(format!("{}/{n}/{kind}", C::NAME), |b| {
            b.iter(|| {
                at = (at + 1) & (PROBES - 1);
                filter.check(black_box(probes[at]))
            })
        });
    }
    // A batch of 256, as the pipeline checks them: criterion's time / 256 is ns per check.
    let mut at = 0;
    group.throughput(criterion::Throughput::Elements(BATCH as u64));
    group.bench_function(format!("{}/{n}/absent_batch", C::NAME), |b| {
        b.iter(|| {
            at = (at + BATCH) & (PROBES - 1);
            absent[at..at + BATCH].iter().filter(|d| filter.check(**d)).count()
        })
    });
    if C::PREFETCHES {
        for ahead in [PREFETCH_AHEAD, 32] {
            group.bench_function(format!("{}/{n}/absent_batch_prefetch{ahead}", C::NAME), |b| {
                b.iter(|| {
                    at = (at + BATCH) & (PROBES - 1);
                    let batch = &absent[at..at + BATCH];
                    batch.iter().take(ahead).for_each(|d| filter.prefetch(*d));
                    let mut hits = 0;
                    for (i, d) in batch.iter().enumerate() {
                        if let Some(next) = batch.get(i + ahead) {
                            filter.prefetch(*next);
                        }
                        hits += filter.check(*d) as usize;
                    }
                    hits
                })
            });
        }
    }
    group.finish();
}

const BATCH: usize = 256;

fn filter_check(c: &mut Criterion) {
    let absent = digests("absent", 0..PROBES);
    // `cargo test --all-targets` runs each bench once without `--bench`: a smoke
    // run at small sizes there, the measured sizes under `cargo bench`.
    let sizes: &[usize] = if std::env::args().any(|a| a == "--bench") { &[1_000_000, 10_000_000] } else { &[10_000] };
    for &n in sizes {
        let keys = digests("evt", 0..2 * n);
        bench_candidate::<BloomCrate>(c, n, &keys, &absent);
        bench_candidate::<BlockedBloom>(c, n, &keys, &absent);
        bench_candidate::<AgingCuckoo>(c, n, &keys, &absent);
    }
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(10).warm_up_time(Duration::from_millis(500)).measurement_time(Duration::from_secs(2));
    targets = filter_check
}
criterion_main!(benches);
