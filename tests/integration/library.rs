//! kdedup as a library: `examples/pg_outbox.rs`'s own effect (a payments
//! ledger in PostgreSQL, business row and outbox row in one transaction) run
//! against the project's PostgreSQL, through a crash between the effect and
//! its completion.

use std::sync::Arc;
use std::time::Duration;

use kdedup::event::Position;
use kdedup::mock::{self, Produce};
use kdedup::pipeline::Faults;
use kdedup::service::RunOptions;
use kdedup::sink::kafka::headers;
use kdedup::sink::CustomSink;
use kdedup::source::StopMode;

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
    let first = start_with(
        config.clone(),
        RunOptions { sink: Some(CustomSink::new(ledger)), faults: faults.clone(), ..RunOptions::default() },
    );
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
