//! Claims held across time and refusals: a slow effect keeps its claim alive
//! while a duplicate waits on another partition, and the records behind that
//! duplicate do not wait with it; a crashed owner's claim is
//! taken over only as a marked repeat; a record that both the output and the
//! dead-letter topic refuse stalls its partition instead of being committed;
//! a partition task that panics stops the process with an error.

use std::time::Duration;

use kdedup::event::Position;
use kdedup::metrics::Metrics;
use kdedup::mock::{self, Produce};
use kdedup::service::RunOptions;
use kdedup::sink::kafka::headers;
use kdedup::source::StopMode;
use kdedup::testkit::Faults;
use rdkafka_sys::types::RDKafkaRespErr;

use crate::utils::*;

/// One event as a record on `partition`, ID in the `event-id` header.
fn event(id: &str, partition: i32) -> Produce {
    Produce {
        partition,
        key: Some(format!("k-{partition}").into_bytes()),
        payload: Some(format!(r#"{{"id":"{id}"}}"#).into_bytes()),
        headers: vec![("event-id".into(), id.as_bytes().to_vec())],
    }
}

fn position(partition: i32, offset: i64) -> Position {
    Position { topic: INPUT.into(), partition, offset }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_effect_keeps_its_claim_while_a_duplicate_waits_on_another_partition() {
    let kafka = cluster(2);
    let dir = tempfile::tempdir().unwrap();
    // The effect of the first copy takes three leases; without renewal the copy
    // on partition 1 would take the claim over after one and emit it again.
    let faults = Faults::default();
    *faults.slow_effect.lock().unwrap() = Some((position(0, 0), Duration::from_secs(3)));
    let running =
        start(config(&kafka, &unique("slow"), dir.path(), &[("KDEDUP_STORE__LEASE_SECS", "1")]), faults.clone());
    mock::produce_all(kafka.bootstrap(), INPUT, &[event("slow-1", 0)]).await.unwrap();
    tokio::time::timeout(Duration::from_secs(30), faults.fired.notified()).await.expect("the slow effect started");
    mock::produce_all(kafka.bootstrap(), INPUT, &[event("slow-1", 1), event("other", 1)]).await.unwrap();
    wait_all_committed(&kafka, &running.metrics).await;
    let m = running.metrics.clone();
    running.stop(StopMode::Drain).await;

    let output = mock::read_all(kafka.bootstrap(), OUTPUT).unwrap();
    assert_exactly_once(&output, &["slow-1".to_string(), "other".to_string()]);
    assert!(output.iter().all(|r| r.header(headers::POSSIBLE_REPEAT).is_none()), "nothing was a possible repeat");
    assert!(m.claim_waits.get() >= 1, "the copy waited for the live claim");
    assert_eq!(m.lease_takeovers.get(), 0, "the renewed lease was never taken over");
    assert_eq!(m.outcome("duplicate"), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_behind_an_event_in_flight_elsewhere_are_not_held_back_by_it() {
    let kafka = cluster(2);
    let dir = tempfile::tempdir().unwrap();
    // Partition 0 holds "held-1" in a slow effect for 12 s. Its copy on partition
    // 1 is followed by two other events: they must not wait for it.
    let faults = Faults::default();
    *faults.slow_effect.lock().unwrap() = Some((position(0, 0), Duration::from_secs(12)));
    let running =
        start(config(&kafka, &unique("aside"), dir.path(), &[("KDEDUP_STORE__LEASE_SECS", "1")]), faults.clone());
    mock::produce_all(kafka.bootstrap(), INPUT, &[event("held-1", 0)]).await.unwrap();
    tokio::time::timeout(Duration::from_secs(30), faults.fired.notified()).await.expect("the slow effect started");
    let behind = [event("held-1", 1), event("behind-1", 1), event("behind-2", 1)];
    mock::produce_all(kafka.bootstrap(), INPUT, &behind).await.unwrap();
    let ids = |output: &[mock::Consumed]| -> Vec<String> {
        output.iter().filter_map(|r| r.header_str(headers::EVENT_ID).map(str::to_string)).collect()
    };
    let read = || tokio::task::block_in_place(|| mock::read_all(kafka.bootstrap(), OUTPUT).unwrap());
    wait_for("the records behind the held event to be emitted", Duration::from_secs(10), || {
        let emitted = ids(&read());
        async move { emitted.iter().any(|id| id == "behind-1") && emitted.iter().any(|id| id == "behind-2") }
    })
    .await;
    assert!(!ids(&read()).iter().any(|id| id == "held-1"), "the held event's slow effect had not landed yet");
    let committed = running.metrics.committed_offset.with_label_values(&[INPUT, "1"]).get();
    assert_eq!(committed, 0, "the set-aside copy keeps partition 1's commit at it");

    wait_all_committed(&kafka, &running.metrics).await;
    let m = running.metrics.clone();
    running.stop(StopMode::Drain).await;
    let output = mock::read_all(kafka.bootstrap(), OUTPUT).unwrap();
    assert_exactly_once(&output, &["held-1".to_string(), "behind-1".to_string(), "behind-2".to_string()]);
    assert!(m.claim_waits.get() >= 1, "the copy found the key in flight");
    assert_eq!(m.outcome("duplicate"), 1, "the copy was a duplicate once the slow effect completed");
    assert_eq!(m.lease_takeovers.get(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_after_the_effect_then_a_duplicate_elsewhere_after_the_lease_is_never_an_unmarked_repeat() {
    let kafka = cluster(2);
    let dir = tempfile::tempdir().unwrap();
    let group = unique("takeover");
    let env = [("KDEDUP_STORE__LEASE_SECS", "1"), ("KDEDUP_PIPELINE__BATCH_MAX", "1")];
    mock::produce_all(kafka.bootstrap(), INPUT, &[event("crash-1", 0)]).await.unwrap();
    let faults = Faults::default();
    *faults.crash_after_effect.lock().unwrap() = Some(position(0, 0));
    let first = start(config(&kafka, &group, dir.path(), &env), faults.clone());
    tokio::time::timeout(Duration::from_secs(30), faults.fired.notified()).await.expect("the crash fired");
    first.stop(StopMode::Drain).await;
    // The claim is in flight, its owner gone; its lease runs out, and the grace after it.
    let lapsed = kdedup::store::now_ms() + 2_100;
    wait_for("the crashed claim's lease to lapse", Duration::from_secs(5), || async move {
        kdedup::store::now_ms() >= lapsed
    })
    .await;
    mock::produce_all(kafka.bootstrap(), INPUT, &[event("crash-1", 1)]).await.unwrap();

    let second = start(config(&kafka, &group, dir.path(), &env), Faults::default());
    wait_all_committed(&kafka, &second.metrics).await;
    let m = second.metrics.clone();
    second.stop(StopMode::Drain).await;

    let output = mock::read_all(kafka.bootstrap(), OUTPUT).unwrap();
    let copies: Vec<_> = output.iter().filter(|r| r.header_str(headers::EVENT_ID) == Some("crash-1")).collect();
    // Either partition 0's next owner reconciled first (its effect found in the
    // output: the copy is a duplicate), or the copy took the lapsed claim over
    // and was emitted again, marked.
    let shown: Vec<_> = copies
        .iter()
        .map(|r| format!("out {}/{} marked={:?}", r.partition, r.offset, r.header_str(headers::POSSIBLE_REPEAT)))
        .collect();
    let marked = copies.iter().filter(|r| r.header_str(headers::POSSIBLE_REPEAT) == Some("true")).count();
    match copies.len() {
        1 => assert_eq!(m.lease_takeovers.get(), 0, "{shown:?}"),
        // (The reader interleaves partitions: which copy comes first says nothing.)
        2 => {
            assert_eq!(marked, 1, "the original is unmarked, the takeover's effect marked: {shown:?}");
            assert_eq!(m.lease_takeovers.get(), 1);
        }
        n => panic!("crash-1 emitted {n} times: {shown:?}"),
    }
    eprintln!("takeover after a crash: {} copies, {} takeovers", copies.len(), m.lease_takeovers.get());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_record_both_topics_refuse_stalls_its_partition_and_is_never_committed_unwritten() {
    let kafka = cluster(1);
    let dir = tempfile::tempdir().unwrap();
    let group = unique("refused");
    let ids: Vec<String> = (0..5).map(|i| format!("acl-{i}")).collect();
    let records: Vec<Produce> = ids.iter().map(|id| event(id, 0)).collect();
    mock::produce_all(kafka.bootstrap(), INPUT, &records).await.unwrap();
    // From now on every produce request is refused for good, as an ACL mistake on
    // both the output and the dead-letter topic would be.
    kafka.refuse_produce(&[RDKafkaRespErr::RD_KAFKA_RESP_ERR_TOPIC_AUTHORIZATION_FAILED; 10_000]).unwrap();
    let running = start(config(&kafka, &group, dir.path(), &[]), Faults::default());
    let m = running.metrics.clone();

    wait_for("the dead-letter refusal to stall the partition", Duration::from_secs(60), || {
        let (refused, stalled) = (m.side_refusals.with_label_values(&["dead_letter"]).get(), m.stalled_partitions());
        async move { refused >= 1 && stalled == 1 }
    })
    .await;
    assert!(!m.is_ready(), "a stalled partition makes the process unready");
    assert!(m.partition_stalled_since.with_label_values(&[INPUT, "0"]).get() > 0, "the gauge says since when");
    // Let commit intervals pass (100 ms each) while it stalls: still nothing committed.
    let stalled_at = m.commits.get();
    wait_for("a few commit ticks", Duration::from_secs(10), || {
        let ticks = m.store_errors.get() + m.sink_errors.get();
        async move { ticks >= 3 }
    })
    .await;
    let committed = mock::committed_offsets(kafka.bootstrap(), &group, INPUT).unwrap();
    assert!(committed.get(&0).is_none_or(|&c| c == 0), "nothing committed past the refused records: {committed:?}");
    assert_eq!(m.commits.get(), stalled_at, "no commit moved while the dead letters were refused");

    // The topics accept writes again: the records are dead-lettered (the output refused
    // them for good), the partition moves on and commits.
    kafka.accept_produce().unwrap();
    wait_all_committed(&kafka, &m).await;
    assert!(m.is_ready());
    let dead = mock::read_all(kafka.bootstrap(), DLQ).unwrap();
    let reasons: Vec<_> = dead.iter().map(|r| r.header_str(headers::REASON).unwrap_or("")).collect();
    assert_eq!(reasons, vec!["sink_rejected"; 5], "every refused record is dead-lettered once, with its reason");
    assert!(mock::read_all(kafka.bootstrap(), OUTPUT).unwrap().is_empty());

    // Their claims were released: the same events sent again are emitted.
    mock::produce_all(kafka.bootstrap(), INPUT, &records).await.unwrap();
    wait_all_committed(&kafka, &m).await;
    running.stop(StopMode::Drain).await;
    assert_exactly_once(&mock::read_all(kafka.bootstrap(), OUTPUT).unwrap(), &ids);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panicking_partition_task_stops_the_run_with_an_error_and_commits_nothing_past_it() {
    let kafka = cluster(2);
    let dir = tempfile::tempdir().unwrap();
    let group = unique("panic");
    let (records, ids) = events(200, 0, 2, 5);
    mock::produce_all(kafka.bootstrap(), INPUT, &records).await.unwrap();
    let faults = Faults::default();
    *faults.panic_at.lock().unwrap() = Some(position(0, 50));
    let metrics = Metrics::new();
    let options = RunOptions { metrics: metrics.clone(), serve_metrics: false, sink: None };
    let config = config(&kafka, &group, dir.path(), &[("KDEDUP_PIPELINE__BATCH_MAX", "10")]);
    let run = tokio::time::timeout(
        Duration::from_secs(60),
        kdedup::testkit::run(&config, options, faults, std::future::pending::<StopMode>()),
    )
    .await
    .expect("the run stops by itself after the panic");
    let error = format!("{:#}", run.expect_err("a panicked partition task ends the run with an error"));
    assert!(error.contains("panicked") && error.contains(&format!("{INPUT}/0")), "{error}");
    assert_eq!(metrics.partition_panics.get(), 1);
    let committed = mock::committed_offsets(kafka.bootstrap(), &group, INPUT).unwrap();
    assert!(committed.get(&0).is_none_or(|&c| c <= 50), "partition 0 committed past the panic: {committed:?}");

    // Restarted (as an orchestrator would), the same records go through.
    let again = start(config.clone(), Faults::default());
    wait_all_committed(&kafka, &again.metrics).await;
    again.stop(StopMode::Drain).await;
    assert_exactly_once(&mock::read_all(kafka.bootstrap(), OUTPUT).unwrap(), &ids);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_record_too_large_for_both_topics_is_dead_lettered_truncated_and_its_key_is_not_burned() {
    use sha2::Digest;
    let kafka = cluster(1);
    let dir = tempfile::tempdir().unwrap();
    let env = [("KDEDUP_KAFKA__PRODUCER__MESSAGE_MAX_BYTES", "300000")];
    let running = start(config(&kafka, &unique("large"), dir.path(), &env), Faults::default());
    // Random bytes, so compression cannot bring it under the limit.
    let big: Vec<u8> = (0..400_000u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8).collect();
    let mut large = event("large-1", 0);
    large.payload = Some(big.clone());
    mock::produce_all(kafka.bootstrap(), INPUT, &[large, event("after", 0)]).await.unwrap();
    wait_all_committed(&kafka, &running.metrics).await;

    let dead = mock::read_all(kafka.bootstrap(), DLQ).unwrap();
    assert_eq!(dead.len(), 1, "one dead letter");
    let d = &dead[0];
    assert_eq!(d.header_str(headers::REASON), Some("sink_rejected"));
    assert_eq!(d.header_str(headers::TRUNCATED), Some("true"));
    assert_eq!(d.header_str(headers::PAYLOAD_BYTES), Some("400000"));
    assert_eq!(d.header_str(headers::PAYLOAD_SHA256), Some(kdedup::event::hex(&sha2::Sha256::digest(&big)).as_str()));
    assert_eq!(d.payload.as_deref(), Some(&big[..kdedup::sink::TRUNCATED_PAYLOAD_BYTES]), "the payload's start");
    assert_eq!(d.header_str(headers::SOURCE_OFFSET), Some("0"));
    assert_exactly_once(&mock::read_all(kafka.bootstrap(), OUTPUT).unwrap(), &["after".to_string()]);

    // The refused effect released its claim: the event sent again, smaller, is emitted.
    mock::produce_all(kafka.bootstrap(), INPUT, &[event("large-1", 0)]).await.unwrap();
    wait_all_committed(&kafka, &running.metrics).await;
    running.stop(StopMode::Drain).await;
    assert_exactly_once(
        &mock::read_all(kafka.bootstrap(), OUTPUT).unwrap(),
        &["after".to_string(), "large-1".to_string()],
    );
}

/// A dead letter written for a record behind one set aside (its key in flight
/// on another partition) is not covered by the commit that the records before
/// the set-aside one allow: the commit's dead-letter mark stays at it, so after
/// a crash during the wait the next owner finds it instead of dead-lettering
/// the record again, unmarked. Failed before: the mark passed it, and the next
/// owner wrote a second dead letter without `kdedup-possible-repeat`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_letter_behind_a_record_set_aside_is_not_repeated_after_a_crash() {
    let kafka = cluster(2);
    let (dir, group) = (tempfile::tempdir().unwrap(), unique("aside-dlq"));
    let env = [("KDEDUP_STORE__LEASE_SECS", "5"), ("KDEDUP_PIPELINE__DRAIN_TIMEOUT_MS", "500")];
    // Partition 0 holds "held-1" in a slow effect: its copy on partition 1 waits.
    let faults = Faults::default();
    *faults.slow_effect.lock().unwrap() = Some((position(0, 0), Duration::from_secs(30)));
    let first = start(config(&kafka, &group, dir.path(), &env), faults.clone());
    mock::produce_all(kafka.bootstrap(), INPUT, &[event("held-1", 0)]).await.unwrap();
    tokio::time::timeout(Duration::from_secs(30), faults.fired.notified()).await.expect("the slow effect started");
    let no_id =
        Produce { partition: 1, key: Some(b"k-1".to_vec()), payload: Some(br#"{"id":"x"}"#.to_vec()), headers: vec![] };
    mock::produce_all(kafka.bootstrap(), INPUT, &[event("first-1", 1), event("held-1", 1), no_id]).await.unwrap();
    let dead_letters = || tokio::task::block_in_place(|| mock::read_all(kafka.bootstrap(), DLQ).unwrap());
    let m = first.metrics.clone();
    wait_for(
        "partition 1 to commit up to the set-aside copy, its dead letter written",
        Duration::from_secs(30),
        || {
            let (committed, dead) = (m.committed_offset.with_label_values(&[INPUT, "1"]).get(), dead_letters().len());
            async move { committed == 1 && dead == 1 }
        },
    )
    .await;
    // A crash while the copy waits: nothing more is committed.
    first.stop(StopMode::Abandon).await;

    let second = start(config(&kafka, &group, dir.path(), &env), Faults::default());
    wait_all_committed(&kafka, &second.metrics).await;
    let m = second.metrics.clone();
    second.stop(StopMode::Drain).await;
    let dead = dead_letters();
    assert_eq!(
        dead.len(),
        1,
        "one dead letter for the record without an ID: {:?}",
        dead.iter().map(|d| &d.headers).collect::<Vec<_>>()
    );
    assert!(m.reconciled.get() >= 1, "the next owner found it");
}
