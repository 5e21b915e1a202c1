//! The offset tracker: `begin` then `finish` of 1000 offsets, finished in
//! offset order and out of order (a fixed shuffle: the watermark only moves
//! when the lowest unfinished offset finishes). Time is per 1000 offsets.

use std::hint::black_box;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use kdedup::offsets::OffsetTracker;

const BATCH: i64 = 1000;

/// A permutation of 0..BATCH, shuffled with a fixed seed (Fisher–Yates, xorshift).
fn shuffled() -> Vec<i64> {
    let mut order: Vec<i64> = (0..BATCH).collect();
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    for i in (1..order.len()).rev() {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        order.swap(i, (state % (i as u64 + 1)) as usize);
    }
    order
}

fn tracker(c: &mut Criterion) {
    let mut group = c.benchmark_group("offset_tracker");
    group.throughput(Throughput::Elements(BATCH as u64));
    for (name, order) in [("in_order_x1000", (0..BATCH).collect::<Vec<_>>()), ("out_of_order_x1000", shuffled())] {
        let mut tracker = OffsetTracker::new();
        let mut base = 0;
        group.bench_function(name, |b| {
            b.iter(|| {
                for o in base..base + BATCH {
                    tracker.begin(o).expect("offsets increase");
                }
                for &o in &order {
                    black_box(tracker.finish(base + o).expect("begun above"));
                }
                base += BATCH;
                debug_assert_eq!(tracker.watermark(), Some(base));
            })
        });
    }
    group.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(10).warm_up_time(Duration::from_millis(500)).measurement_time(Duration::from_secs(2));
    targets = tracker
}
criterion_main!(benches);
