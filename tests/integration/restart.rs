//! Stops that are not clean: a member that leaves without committing, and a
//! crash between claim and effect.

use std::sync::Arc;
use std::time::Duration;

use kdedup::event::{EventKey, Position};
use kdedup::mock;
use kdedup::source::StopMode;
use kdedup::store::{now_ms, ClaimState, DedupStore, Store};
use kdedup::testkit::Faults;

use crate::utils::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn member_dropped_mid_stream_without_committing_then_restarted_on_the_same_store() {
    let kafka = cluster(4);
    let (records, ids) = events(20_000, 5_000, 4, 3);
    mock::produce_all(kafka.bootstrap(), INPUT, &records).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let group = unique("drop");
    // Commits are rare in the first life, so most finished work is uncommitted when it dies.
    let first = start(
        config(
            &kafka,
            &group,
            dir.path(),
            &[("KDEDUP_PIPELINE__COMMIT_INTERVAL_MS", "3600000"), ("KDEDUP_PIPELINE__BATCH_MAX", "100")],
        ),
        Faults::default(),
    );
    let m = first.metrics.clone();
    wait_for("half the stream to be decided", Duration::from_secs(60), || {
        let n = m.consumed.get();
        async move { n >= 12_000 }
    })
    .await;
    first.stop(StopMode::Abandon).await;
    // Read after the stop: batches in flight at the stop finish their effects.
    let decided_first = m.outcome("new");
    let committed = mock::committed_offsets(kafka.bootstrap(), &group, INPUT).unwrap();
    assert!(committed.is_empty(), "the first member committed nothing: {committed:?}");
    assert!(decided_first > 0 && decided_first < 20_000);

    let second = start(config(&kafka, &group, dir.path(), &[]), Faults::default());
    wait_all_committed(&kafka, &second.metrics).await;
    let metrics = second.metrics.clone();
    second.stop(StopMode::Drain).await;

    let output = mock::read_all(kafka.bootstrap(), OUTPUT).unwrap();
    assert_exactly_once(&output, &ids);
    assert_eq!(metrics.consumed.get(), 25_000, "everything was redelivered to the second member");
    assert_eq!(metrics.outcome("new"), 20_000 - decided_first, "the store remembered the first life's events");
    assert_outcomes_sum(&metrics);
}

/// A first life in small batches with one fault armed by `arm`; returns once the
/// fault fired and the member stopped (committing only what finished).
async fn first_life_until_fault(
    kafka: &kdedup::mock::MockKafka,
    group: &str,
    dir: &std::path::Path,
    arm: impl FnOnce(&Faults),
) {
    let faults = Faults::default();
    arm(&faults);
    let first = start(config(kafka, group, dir, &[("KDEDUP_PIPELINE__BATCH_MAX", "50")]), faults.clone());
    tokio::time::timeout(Duration::from_secs(60), faults.fired.notified()).await.expect("the fault fired");
    first.stop(StopMode::Drain).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_between_claim_and_effect_is_resumed_on_redelivery_not_dropped() {
    let kafka = cluster(2);
    let (records, ids) = events(2_000, 0, 2, 4);
    mock::produce_all(kafka.bootstrap(), INPUT, &records).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let group = unique("crash");
    let victim = Position { topic: Arc::from(INPUT), partition: 0, offset: 500 };
    first_life_until_fault(&kafka, &group, dir.path(), |f| *f.crash_after_claim.lock().unwrap() = Some(victim.clone()))
        .await;

    // The victim was claimed and never completed: its row names its own position.
    let config = config(&kafka, &group, dir.path(), &[]);
    let victim_id = records.iter().filter(|r| r.partition == 0).nth(500).unwrap().headers[0].1.clone();
    {
        let store = Store::open(&config.store, &config.retention).unwrap();
        let key = EventKey { scope: Arc::from(group.as_str()), id: victim_id.clone() };
        let row = store.lookup(vec![key], now_ms()).await.unwrap().pop().unwrap().expect("claim row exists");
        assert_eq!(row.state, ClaimState::InFlight);
        assert_eq!(row.position, victim);
    }
    let out_before = emitted_counts(&mock::read_all(kafka.bootstrap(), OUTPUT).unwrap());
    let victim_id = String::from_utf8(victim_id).unwrap();
    assert!(!out_before.contains_key(&victim_id), "the crashed record {victim_id} was not emitted before the restart");

    let second = start(config, Faults::default());
    wait_all_committed(&kafka, &second.metrics).await;
    let metrics = second.metrics.clone();
    second.stop(StopMode::Drain).await;
    assert!(metrics.claims_resumed.get() >= 1, "the redelivered victim resumed its own claim");
    let output = mock::read_all(kafka.bootstrap(), OUTPUT).unwrap();
    assert_exactly_once(&output, &ids);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_between_effect_and_completion_is_reconciled_from_the_output_not_emitted_twice() {
    let kafka = cluster(2);
    let (records, ids) = events(2_000, 200, 2, 6);
    mock::produce_all(kafka.bootstrap(), INPUT, &records).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let group = unique("effect-crash");
    let victim = Position { topic: Arc::from(INPUT), partition: 1, offset: 700 };
    first_life_until_fault(&kafka, &group, dir.path(), |f| *f.crash_after_effect.lock().unwrap() = Some(victim)).await;
    let emitted_before = emitted_counts(&mock::read_all(kafka.bootstrap(), OUTPUT).unwrap());
    let victim_id =
        String::from_utf8(records.iter().filter(|r| r.partition == 1).nth(700).unwrap().headers[0].1.clone()).unwrap();
    assert_eq!(emitted_before.get(&victim_id), Some(&1), "the victim's effect ran before the crash");

    let second = start(config(&kafka, &group, dir.path(), &[]), Faults::default());
    wait_all_committed(&kafka, &second.metrics).await;
    let metrics = second.metrics.clone();
    second.stop(StopMode::Drain).await;
    assert!(metrics.reconciled.get() >= 1, "the victim's batch was found in the output");
    assert_exactly_once(&mock::read_all(kafka.bootstrap(), OUTPUT).unwrap(), &ids);
    assert_outcomes_sum(&metrics);
}
