//! Records that cannot be handled land on the dead-letter topic with reasons;
//! the partition keeps going.

use std::collections::BTreeMap;

use kdedup::mock::{self, Produce};
use kdedup::pipeline::Faults;
use kdedup::sink::kafka::headers;
use kdedup::source::StopMode;

use crate::utils::*;

fn json(partition: i32, payload: &str) -> Produce {
    Produce { partition, key: None, payload: Some(payload.as_bytes().to_vec()), headers: vec![] }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_missing_and_oversize_ids_and_conflicts_are_dead_lettered_with_reasons() {
    let kafka = cluster(2);
    let long = "x".repeat(600);
    let records = vec![
        json(0, r#"{"id":"a","amount":1}"#),
        json(0, "this is not json"),
        json(0, r#"{"amount":2}"#),
        json(1, r#"{"id":{"nested":true}}"#),
        json(1, &format!(r#"{{"id":"{long}"}}"#)),
        json(1, r#"{"id":"b","amount":3}"#),
        json(0, r#"{"id":"a","amount":999}"#), // same ID, other content: conflict
        json(0, r#"{"id":"a","amount":1}"#),   // a true duplicate
        Produce { partition: 1, key: None, payload: None, headers: vec![] }, // tombstone, no payload
        json(1, r#"{"id":"c","amount":4}"#),
    ];
    mock::produce_all(kafka.bootstrap(), INPUT, &records).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let env = [
        ("KDEDUP_KEY__SOURCE", "json"),
        ("KDEDUP_KEY__JSON_POINTER", "/id"),
        ("KDEDUP_KEY__ON_OVERSIZE", "dead_letter"),
    ];
    let running = start(config(&kafka, &unique("dlq"), dir.path(), &env), Faults::default());
    wait_all_committed(&kafka, &running.metrics).await;
    let metrics = running.metrics.clone();
    running.stop(StopMode::Drain).await;

    let dead = mock::read_all(kafka.bootstrap(), DLQ).unwrap();
    let mut reasons: BTreeMap<String, usize> = BTreeMap::new();
    for r in &dead {
        *reasons.entry(r.header_str(headers::REASON).unwrap().to_string()).or_default() += 1;
        assert!(r.header_str(headers::ERROR).is_some_and(|e| !e.is_empty()), "a human-readable error travels too");
        assert!(r.header_str(headers::SOURCE_OFFSET).is_some(), "the source position travels too");
    }
    let expected: BTreeMap<String, usize> =
        [("invalid_json", 1), ("missing_id", 3), ("oversize_id", 1), ("conflict", 1)]
            .iter()
            .map(|(k, v)| (k.to_string(), *v))
            .collect();
    assert_eq!(reasons, expected);
    let conflict = dead.iter().find(|r| r.header_str(headers::REASON) == Some("conflict")).unwrap();
    assert_eq!(
        conflict.payload.as_deref(),
        Some(br#"{"id":"a","amount":999}"#.as_slice()),
        "the original payload is kept"
    );

    let output = mock::read_all(kafka.bootstrap(), OUTPUT).unwrap();
    assert_exactly_once(&output, &["a".into(), "b".into(), "c".into()]);
    assert_eq!(metrics.outcome("dead_letter"), 5);
    assert_eq!(metrics.outcome("conflict"), 1);
    assert_eq!(metrics.outcome("duplicate"), 1);
    assert_outcomes_sum(&metrics);
}
