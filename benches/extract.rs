//! The key stage: `KeyExtractor::extract` per source kind, on a ~250-byte
//! JSON payload with three headers. Each extraction includes the payload
//! fingerprint (xxh3 of the payload, or of the configured fields) and the key
//! digest the filters use. The record clone is outside the timing.

use std::hint::black_box;
use std::num::NonZeroUsize;
use std::sync::Arc;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, BatchSize, Criterion};
use kdedup::config::{KeyConfig, KeySource, OnOversize};
use kdedup::event::{KeyExtractor, Position, Record};

fn record() -> Record {
    let payload = br#"{"type":"payment.captured","payment":{"id":"pay_7f3a9c2e41d84b6b","amount":12950,"currency":"EUR","customer":"cus_51b2a"},"merchant":{"id":"m_889","country":"DE"},"created_at":"2026-11-23T20:41:07.118Z","attempt":1}"#;
    Record {
        position: Position { topic: Arc::from("payments"), partition: 3, offset: 1_234_567 },
        key: Some(b"cus_51b2a".to_vec()),
        payload: Some(payload.to_vec()),
        headers: vec![
            ("traceparent".into(), Some(b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01".to_vec())),
            ("content-type".into(), Some(b"application/json".to_vec())),
            ("event-id".into(), Some(b"evt_01JDQ3V6Z4K8M2N7P5R9T1W3Y5".to_vec())),
        ],
        timestamp_ms: Some(1_795_000_000_000),
        bad_header: None,
    }
}

fn extractor(source: KeySource, fingerprint_fields: &[&str]) -> KeyExtractor {
    KeyExtractor::new(KeyConfig {
        source,
        scope: "payments-dedup".into(),
        max_bytes: NonZeroUsize::new(512).expect("512 > 0"),
        on_oversize: OnOversize::Hash,
        fingerprint_fields: fingerprint_fields.iter().map(|s| s.to_string()).collect(),
    })
}

fn extract(c: &mut Criterion) {
    let record = record();
    let cases = [
        ("header", extractor(KeySource::Header("event-id".into()), &[])),
        ("record_key", extractor(KeySource::RecordKey, &[])),
        ("json_pointer", extractor(KeySource::Json("/payment/id".into()), &[])),
        (
            "json_pointer_fingerprint_fields",
            extractor(KeySource::Json("/payment/id".into()), &["/payment/amount", "/payment/currency"]),
        ),
        ("payload_hash", extractor(KeySource::PayloadHash, &[])),
    ];
    let mut group = c.benchmark_group("extract");
    for (name, x) in &cases {
        assert!(x.extract(record.clone()).is_ok(), "{name} extracts a key from the bench record");
        group.bench_function(*name, |b| {
            b.iter_batched(|| record.clone(), |r| black_box(x.extract(r)).is_ok(), BatchSize::SmallInput)
        });
    }
    group.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(10).warm_up_time(Duration::from_millis(500)).measurement_time(Duration::from_secs(2));
    targets = extract
}
criterion_main!(benches);
