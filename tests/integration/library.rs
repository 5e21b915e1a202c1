//! kdedup as a library: `examples/pg_outbox.rs`'s own effect (a payments
//! ledger in PostgreSQL, business row and outbox row in one transaction) run
//! against the project's PostgreSQL, through a crash between the effect and
//! its completion.

use std::sync::Arc;
use std::time::Duration;

use kdedup::event::Position;
use kdedup::mock::{self, Produce};
use kdedup::service::RunOptions;
use kdedup::sink::kafka::headers;
use kdedup::sink::CustomSink;
use kdedup::source::StopMode;
use kdedup::testkit::Faults;

use crate::utils::*;

#[path = "../../examples/pg_outbox.rs"]
#[allow(dead_code)] // its `main` is the example's, not the test's
mod pg_outbox;

async fn count(url: &str, table: &str) -> i64 {
    let (client, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls).await.unwrap();
    tokio::spawn(connection);
    client.query_one(&format!("SELECT count(*) FROM {table}"), &[]).await.unwrap().get(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_custom_effect_writes_each_event_once_in_postgres_through_a_crash_after_the_effect() {
    let Ok(url) = std::env::var("KDEDUP_TEST_POSTGRES") else {
        eprintln!("skipped: KDEDUP_TEST_POSTGRES is not set (scripts/services env prints it)");
        return;
    };
    let kafka = cluster(2);
    let (mut records, ids) = events(400, 100, 2, 9);
    records.push(Produce {
        partition: 0,
        key: None,
        payload: Some(br#"{"id":"no-amount"}"#.to_vec()),
        headers: vec![("event-id".into(), b"no-amount".to_vec())],
    });
    mock::produce_all(kafka.bootstrap(), INPUT, &records).await.unwrap();
    let prefix = unique("lib").replace('-', "_");
    let dir = tempfile::tempdir().unwrap();
    let group = unique("lib");
    let config =
        config(&kafka, &group, dir.path(), &[("KDEDUP_SINK__KIND", "custom"), ("KDEDUP_PIPELINE__BATCH_MAX", "50")]);

    // First life: the effect of the batch holding 1/100 commits in PostgreSQL, then kdedup "crashes".
    let faults = Faults::default();
    *faults.crash_after_effect.lock().unwrap() = Some(Position { topic: Arc::from(INPUT), partition: 1, offset: 100 });
    let ledger = pg_outbox::PaymentsLedger::connect(&url, &prefix).await.unwrap();
    let options = RunOptions { sink: Some(CustomSink::new(ledger)), ..RunOptions::default() };
    let first = start_faulty(config.clone(), options, faults.clone());
    tokio::time::timeout(Duration::from_secs(60), faults.fired.notified()).await.expect("the crash fired");
    first.stop(StopMode::Drain).await;
    let after_crash = count(&url, &format!("{prefix}_payments")).await;
    assert!(after_crash > 0, "the first life wrote payments");

    // Second life: the crashed batch's effects run again; the upsert keeps one row each.
    let ledger = pg_outbox::PaymentsLedger::connect(&url, &prefix).await.unwrap();
    let second = start_with(config, RunOptions { sink: Some(CustomSink::new(ledger)), ..RunOptions::default() });
    wait_all_committed(&kafka, &second.metrics).await;
    let metrics = second.metrics.clone();
    second.stop(StopMode::Drain).await;

    assert!(metrics.claims_resumed.get() >= 1, "the crashed batch's claims were resumed: its effects ran again");
    assert_eq!(count(&url, &format!("{prefix}_payments")).await, ids.len() as i64, "one payment per event");
    assert_eq!(count(&url, &format!("{prefix}_outbox")).await, ids.len() as i64, "one outbox row per payment");
    let dead = mock::read_all(kafka.bootstrap(), DLQ).unwrap();
    assert_eq!(dead.len(), 1, "the record without an amount, refused for good");
    assert!(dead[0].header_str(headers::ERROR).is_some_and(|e| e.contains("no amount")));
    assert_outcomes_sum(&metrics);

    // The shared server outlives the test: its tables go.
    let (client, connection) = tokio_postgres::connect(&url, tokio_postgres::NoTls).await.unwrap();
    tokio::spawn(connection);
    client.batch_execute(&format!("DROP TABLE {prefix}_payments, {prefix}_outbox")).await.unwrap();
}

/// A custom sink that answers one result fewer than the effects it was given:
/// a bug in the sink. Which result belongs to which event cannot be told, so
/// none of the batch completes and the run stops with an error. Failed before:
/// results were zipped with effects, the events left over were completed
/// without an effect and committed, and the run went on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sink_answering_fewer_results_than_effects_completes_none_of_them_and_stops() {
    struct OneShort;
    impl kdedup::sink::Sink for OneShort {
        fn kind(&self) -> &'static str {
            "one-short"
        }
        async fn deliver(
            &self,
            batch: &[kdedup::sink::Effect<'_>],
            _stop: &kdedup::sink::Stopping,
        ) -> Vec<Result<kdedup::sink::Delivered, kdedup::error::SinkError>> {
            batch.iter().skip(1).map(|_| Ok(kdedup::sink::Delivered::done())).collect()
        }
    }

    let kafka = cluster(1);
    let (records, ids) = events(20, 0, 1, 4);
    mock::produce_all(kafka.bootstrap(), INPUT, &records).await.unwrap();
    let (dir, group) = (tempfile::tempdir().unwrap(), unique("short"));
    let config = config(&kafka, &group, dir.path(), &[("KDEDUP_SINK__KIND", "custom")]);
    let running =
        start_with(config.clone(), RunOptions { sink: Some(CustomSink::new(OneShort)), ..RunOptions::default() });
    let metrics = running.metrics.clone();
    let ended = tokio::time::timeout(Duration::from_secs(60), running.ended()).await.expect("the run stops by itself");
    let error = format!("{:#}", ended.expect_err("the run ends with an error"));
    assert!(error.contains("results for") && error.contains("one-short"), "the error names the sink's fault: {error}");

    assert_eq!(metrics.outcome("new"), 0, "no event of the batch completed");
    let committed = mock::committed_offsets(kafka.bootstrap(), &group, INPUT).unwrap();
    assert!(committed.is_empty(), "nothing committed: {committed:?}");
    let store = kdedup::store::Store::open(&config.store, &config.retention).unwrap();
    let keys: Vec<kdedup::event::EventKey> = ids
        .iter()
        .map(|id| kdedup::event::EventKey { scope: Arc::from(config.key.scope.as_str()), id: id.as_bytes().to_vec() })
        .collect();
    let rows = kdedup::store::DedupStore::lookup(&store, keys, kdedup::store::now_ms()).await.unwrap();
    assert!(rows.iter().flatten().all(|row| row.state != kdedup::store::ClaimState::Done), "no claim is completed");
}
