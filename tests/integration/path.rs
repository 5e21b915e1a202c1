//! The whole path on one machine, clean run.

use kdedup::mock;
use kdedup::source::StopMode;
use kdedup::testkit::Faults;

use crate::utils::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_unique_event_exactly_once_in_input_order_and_offsets_committed_to_the_end() {
    let kafka = cluster(4);
    // 20% of 25k records are duplicates, half of those on another partition than their original.
    let (records, ids) = events_crossing(20_000, 5_000, 4, 1, 0.5);
    assert!(cross_partition_copies(&records) > 2_000, "cross-partition duplicates are in the stream");
    mock::produce_all(kafka.bootstrap(), INPUT, &records).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let group = unique("path");
    let running = start(config(&kafka, &group, dir.path(), &[]), Faults::default());
    wait_all_committed(&kafka, &running.metrics).await;
    let metrics = running.metrics.clone();
    running.stop(StopMode::Drain).await;

    let output = mock::read_all(kafka.bootstrap(), OUTPUT).unwrap();
    assert_exactly_once(&output, &ids);
    assert_input_order(&output);
    assert_eq!(metrics.consumed.get(), 25_000);
    assert_eq!(metrics.outcome("new"), 20_000);
    assert_eq!(metrics.outcome("duplicate"), 5_000);
    assert_outcomes_sum(&metrics);
    assert!(mock::read_all(kafka.bootstrap(), DLQ).unwrap().is_empty());

    // The group's committed offsets, read back from the broker, equal the end offsets.
    let ends = mock::end_offsets(kafka.bootstrap(), INPUT).unwrap();
    let committed = mock::committed_offsets(kafka.bootstrap(), &group, INPUT).unwrap();
    assert_eq!(committed, ends);
    // Fewer store fsyncs than one per 1000 records: they ride on commits.
    assert!(metrics.fsyncs.get() <= metrics.commits.get() + 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stdout_sink_and_duplicates_topic() {
    let kafka = cluster(2);
    kafka.create_topic("dups", 1).unwrap();
    let (records, _) = events(200, 50, 2, 2);
    mock::produce_all(kafka.bootstrap(), INPUT, &records).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let config = config(&kafka, &unique("dups"), dir.path(), &[("KDEDUP_DUPLICATES__TOPIC", "dups")]);
    let running = start(config, Faults::default());
    wait_all_committed(&kafka, &running.metrics).await;
    running.stop(StopMode::Drain).await;
    let dups = mock::read_all(kafka.bootstrap(), "dups").unwrap();
    assert_eq!(dups.len(), 50, "every duplicate is copied to the audit topic");
}

/// The same path with the shared PostgreSQL store (skipped, and said so, without one).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn whole_path_on_the_postgres_store() {
    let Ok(url) = std::env::var("KDEDUP_TEST_POSTGRES") else {
        eprintln!("whole_path_on_the_postgres_store skipped: KDEDUP_TEST_POSTGRES is not set (scripts/test sets it)");
        return;
    };
    let kafka = cluster(4);
    let (records, ids) = events(5_000, 1_000, 4, 5);
    mock::produce_all(kafka.bootstrap(), INPUT, &records).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let group = unique("pg-path");
    let config = config(&kafka, &group, dir.path(), &[("KDEDUP_STORE__KIND", "postgres"), ("KDEDUP_STORE__URL", &url)]);
    kdedup::store::Store::open(&config.store, &config.retention).unwrap().apply_schema().await.unwrap();
    let running = start(config, Faults::default());
    wait_all_committed(&kafka, &running.metrics).await;
    let metrics = running.metrics.clone();
    running.stop(StopMode::Drain).await;

    assert_exactly_once(&mock::read_all(kafka.bootstrap(), OUTPUT).unwrap(), &ids);
    assert_eq!(metrics.outcome("new"), 5_000);
    assert_eq!(metrics.outcome("duplicate"), 1_000);
    assert_outcomes_sum(&metrics);
    assert_eq!(metrics.fsyncs.get(), metrics.commits.get(), "one (no-op) barrier per commit");
}

/// The same path with the CQL store on Apache Cassandra, a keyspace of its own
/// (skipped, and said so, without KDEDUP_TEST_CASSANDRA).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn whole_path_on_the_cql_store_on_cassandra() {
    let Some(contact_point) = cassandra("whole_path_on_the_cql_store_on_cassandra") else { return };
    let keyspace = CqlKeyspace::new(&contact_point, "datacenter1");
    let kafka = cluster(4);
    let (records, ids) = events_crossing(5_000, 1_000, 4, 7, 0.5);
    mock::produce_all(kafka.bootstrap(), INPUT, &records).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let env = keyspace.env();
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let group = unique("cql-path");
    let config = config(&kafka, &group, dir.path(), &env);
    let store = kdedup::store::Store::open(&config.store, &config.retention).unwrap();
    store.apply_schema().await.unwrap();
    let running = start(config, Faults::default());
    wait_all_committed(&kafka, &running.metrics).await;
    let metrics = running.metrics.clone();
    running.stop(StopMode::Drain).await;

    let output = mock::read_all(kafka.bootstrap(), OUTPUT).unwrap();
    assert_exactly_once(&output, &ids);
    assert_input_order(&output);
    assert_eq!(metrics.outcome("new"), 5_000);
    assert_eq!(metrics.outcome("duplicate"), 1_000);
    assert_outcomes_sum(&metrics);
    let ends = mock::end_offsets(kafka.bootstrap(), INPUT).unwrap();
    assert_eq!(mock::committed_offsets(kafka.bootstrap(), &group, INPUT).unwrap(), ends);
    assert_eq!(keyspace.claim_rows().await, 5_000, "one row per event, on Cassandra");
}
