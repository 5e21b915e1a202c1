//! The embedded store's claim path: one `claim` call of 1000 keys (one lock,
//! one fjall batch), for keys never seen (`New`, written) and for keys already
//! done (`Duplicate`, read only). Criterion's time is per batch of 1000; its
//! throughput line gives keys per second. The store lives in a temporary
//! directory; no fsync is timed (that is `sync`, once per offset commit).

use std::sync::Arc;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use kdedup::config::Retention;
use kdedup::event::{EventKey, Fingerprint, Position};
use kdedup::store::{Claim, ClaimRequest, DedupStore, EmbeddedStore};

const BATCH: usize = 1000;
const NOW_MS: u64 = 1_795_000_000_000;

fn requests(first: u64, offset_base: i64) -> Vec<ClaimRequest> {
    let scope: Arc<str> = Arc::from("bench");
    let topic: Arc<str> = Arc::from("events");
    (first..first + BATCH as u64)
        .map(|n| ClaimRequest {
            key: EventKey { scope: scope.clone(), id: format!("evt-{n:012}").into_bytes() },
            fingerprint: Fingerprint(n as u128 * 0x9e37_79b9),
            position: Position { topic: topic.clone(), partition: 0, offset: offset_base + n as i64 },
        })
        .collect()
}

fn claim(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("a tokio runtime");
    let dir = tempfile::tempdir().expect("a temporary directory");
    let retention = Retention {
        ttl: Duration::from_secs(24 * 3600),
        lease: Duration::from_secs(30),
        sweep_interval: Duration::from_secs(60),
    };
    let store = EmbeddedStore::open(dir.path(), &retention).expect("the store opens");

    // Keys claimed and completed once, then claimed again from later offsets: duplicates.
    let done = requests(0, 0);
    rt.block_on(async {
        assert!(store.claim(done.clone(), NOW_MS).await.unwrap().iter().all(|c| matches!(c, Claim::New { .. })));
        let held = done.iter().map(|r| (r.key.clone(), r.position.clone())).collect();
        assert!(store.complete(held, NOW_MS).await.unwrap().into_iter().all(|ok| ok));
    });
    let again = requests(0, 1_000_000_000);
    let answers = rt.block_on(store.claim(again.clone(), NOW_MS)).unwrap();
    assert!(answers.iter().all(|c| matches!(c, Claim::Duplicate { .. })), "the second claims are duplicates");

    let mut group = c.benchmark_group("embedded_claim");
    group.throughput(Throughput::Elements(BATCH as u64));
    let mut next = BATCH as u64;
    group.bench_function("new_x1000", |b| {
        b.iter_batched(
            || {
                next += BATCH as u64;
                requests(next, 0)
            },
            |batch| rt.block_on(store.claim(batch, NOW_MS)).expect("claims succeed"),
            BatchSize::PerIteration,
        )
    });
    group.bench_function("duplicate_x1000", |b| {
        b.iter_batched(
            || again.clone(),
            |batch| rt.block_on(store.claim(batch, NOW_MS)).expect("claims succeed"),
            BatchSize::PerIteration,
        )
    });
    group.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(10).warm_up_time(Duration::from_millis(500)).measurement_time(Duration::from_secs(3));
    targets = claim
}
criterion_main!(benches);
