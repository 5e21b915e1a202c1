//! The first hour of a new user, as issue 24 found it: a typo in a topic name, a clean stop
//! during a backlog, `check` against records without the configured event ID.

use std::process::Command;
use std::time::Duration;

use kdedup::kafka_client::KafkaClients;
use kdedup::mock;
use rdkafka::consumer::{BaseConsumer, Consumer};

use crate::utils::*;

/// Every topic the brokers know, read with a metadata request for all topics (which never
/// creates one).
fn topic_names(brokers: &str) -> Vec<String> {
    let reader: BaseConsumer = KafkaClients::from(brokers).reader("kdedup-test-topics").create().unwrap();
    let md = reader.fetch_metadata(None, Duration::from_secs(10)).unwrap();
    md.topics().iter().map(|t| t.name().to_string()).collect()
}

/// `kdedup run` against `brokers` with one topic mistyped: it exits non-zero at start, names
/// the topic with `check`'s words, and the broker holds no topic of that name afterwards.
fn run_refuses_a_mistyped_topic(brokers: &str, [input, output, dlq]: [&str; 3]) {
    for (what, var) in [("output", "KDEDUP_SINK__TOPIC"), ("dead-letter", "KDEDUP_DEAD_LETTER__TOPIC")] {
        let typo = unique(&format!("{what}-typo"));
        let dir = tempfile::tempdir().unwrap();
        let out = Command::new(BIN)
            .args(["run", "--config", "config/kdedup.toml"])
            .env_remove("KDEDUP_LOG")
            .env("KDEDUP_KAFKA__BROKERS", brokers)
            .env("KDEDUP_KAFKA__GROUP_ID", unique("group"))
            .env("KDEDUP_KAFKA__TOPICS", input)
            .env("KDEDUP_SINK__TOPIC", output)
            .env("KDEDUP_DEAD_LETTER__TOPIC", dlq)
            .env(var, &typo)
            .env("KDEDUP_STORE__PATH", dir.path().join("store"))
            .env("KDEDUP_METRICS__LISTEN", "")
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{what}: run must refuse a missing topic:\n{stderr}");
        assert!(stderr.contains(&format!("missing: {typo}")) && stderr.contains("kdedup creates no topics"), "{stderr}");
        assert!(!stderr.contains("kdedup running"), "{what}: refused at start, before consuming:\n{stderr}");
        let topics = topic_names(brokers);
        assert!(topics.iter().any(|t| t == input), "the listing works: {topics:?}");
        assert!(!topics.contains(&typo), "{what}: the broker created {typo}: {topics:?}");
    }
}

#[test]
fn a_mistyped_output_or_dead_letter_topic_is_refused_at_start_and_never_created_mock_cluster() {
    // librdkafka's mock cluster creates a topic that a metadata request asks it to create.
    let kafka = cluster(1);
    run_refuses_a_mistyped_topic(kafka.bootstrap(), [INPUT, OUTPUT, DLQ]);
}

#[test]
fn a_mistyped_output_or_dead_letter_topic_is_refused_at_start_and_never_created_real_broker() {
    // Apache Kafka creates topics on request by default (auto.create.topics.enable=true).
    let Ok(brokers) = std::env::var("KDEDUP_TEST_BROKER") else {
        eprintln!("skipped: KDEDUP_TEST_BROKER is not set (scripts/test sets it)");
        return;
    };
    let (input, output, dlq) = (unique("in"), unique("out"), unique("dlq"));
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    rt.block_on(mock::create_topics(brokers.as_str(), &[(&input, 1), (&output, 1), (&dlq, 1)])).unwrap();
    run_refuses_a_mistyped_topic(&brokers, [&input, &output, &dlq]);
}
