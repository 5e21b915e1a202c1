//! The first hour of a new user, as issue 24 found it: a typo in a topic name, a clean stop
//! during a backlog, `check` against records without the configured event ID.

use std::process::Command;
use std::time::{Duration, Instant};

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
        assert!(
            stderr.contains(&format!("missing: {typo}")) && stderr.contains("kdedup creates no topics"),
            "{stderr}"
        );
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

/// Sums of the group's committed offsets and of the input's end offsets.
fn progress(env: &GroupEnv, topics: &Topics) -> (i64, i64) {
    let committed = mock::committed_offsets(&env.brokers, &topics.group, &topics.input).unwrap();
    let ends = mock::end_offsets(&env.brokers, &topics.input).unwrap();
    (committed.values().sum(), ends.values().sum())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_sigterms_during_a_backlog_leave_nothing_to_resume_and_mark_nothing() {
    let Some(env) = group_env() else { return };
    let _turn = BROKER_TURN.lock().await;
    let topics = Topics::create(&env.brokers, &env.postgres, 3).await;
    let logs = LogDir::new();
    let (records, ids) = events(150_000, 15_000, 3, 24);
    mock::produce_all(&env.brokers, &topics.input, &records).await.unwrap();
    let total = records.len() as i64;

    // Three graceful stops, each mid-backlog: at a tenth, two and three tenths committed.
    for n in 0..3 {
        let member = Member::spawn(&env.brokers, &env.postgres, &topics, logs.path(), n, &[]);
        // This member's own commits past the previous one's: it is working through the backlog.
        let start = progress(&env, &topics).0;
        assert!(start < total, "the backlog finished before SIGTERM {n}; make it longer");
        let target = (total * (n as i64 + 1) / 10).max(start + 1);
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            let (committed, _) = progress(&env, &topics);
            if committed >= target {
                assert!(committed < total, "the backlog finished before SIGTERM {n}; make it longer");
                break;
            }
            assert!(Instant::now() < deadline, "stuck below {target}\n{}", member_logs(logs.path()));
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let status = member.terminate();
        assert!(status.success(), "SIGTERM {n}: exit status {status:?}\n{}", member_logs(logs.path()));
    }
    // A last member finishes the backlog.
    let member = Member::spawn(&env.brokers, &env.postgres, &topics, logs.path(), 3, &[]);
    let deadline = Instant::now() + Duration::from_secs(180);
    while progress(&env, &topics).0 < total {
        assert!(Instant::now() < deadline, "the backlog was not finished\n{}", member_logs(logs.path()));
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(member.terminate().success());

    let text = member_logs(logs.path());
    // What each drain did, for the reader of the test's output.
    for line in text.lines().filter(|l| l.contains("stopping: released")) {
        eprintln!("{line}");
    }
    assert!(!text.contains("after a crash"), "a clean stop left claims to resume:\n{text}");
    let output = mock::read_all(&env.brokers, &topics.output).unwrap();
    let marked = output.iter().filter(|r| r.header(kdedup::sink::kafka::headers::POSSIBLE_REPEAT).is_some()).count();
    assert_eq!(marked, 0, "records marked as possible repeats after clean stops only");
    assert_exactly_once(&output, &ids);
}

/// `kdedup check --config config/kdedup.toml` against `kafka` with `env`: exit code, output.
fn check_with(kafka: &mock::MockKafka, store: &std::path::Path, env: &[(&str, &str)]) -> (Option<i32>, String) {
    let out = Command::new(BIN)
        .args(["check", "--config", "config/kdedup.toml"])
        .env_remove("KDEDUP_LOG")
        .env("KDEDUP_KAFKA__BROKERS", kafka.bootstrap())
        .env("KDEDUP_KAFKA__TOPICS", INPUT)
        .env("KDEDUP_SINK__TOPIC", OUTPUT)
        .env("KDEDUP_DEAD_LETTER__TOPIC", DLQ)
        .env("KDEDUP_STORE__PATH", store)
        .env("KDEDUP_METRICS__LISTEN", "")
        .envs(env.iter().copied())
        .output()
        .unwrap();
    (out.status.code(), format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_reads_a_sample_through_the_key_and_builds_the_real_clients() {
    let kafka = cluster(2);
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("store");
    // JSON events with their ID in the payload, not in the sample config's `event-id` header.
    let records: Vec<mock::Produce> = (0..30)
        .map(|i| mock::Produce {
            partition: i % 2,
            key: None,
            payload: Some(format!(r#"{{"id":"ord-{i}"}}"#).into_bytes()),
            headers: vec![],
        })
        .collect();
    mock::produce_all(kafka.bootstrap(), INPUT, &records).await.unwrap();

    let (code, text) = tokio::task::block_in_place(|| check_with(&kafka, &store, &[]));
    assert_ne!(code, Some(0), "{text}");
    let line = text.lines().find(|l| l.contains("event ids")).unwrap_or_else(|| panic!("no event ids line:\n{text}"));
    assert!(line.contains("[FAIL]") && line.contains("0 of 30 records have an event ID"), "{line}");
    assert!(
        line.contains("missing_id") && line.contains("\"event-id\""),
        "names the first reason and the source: {line}"
    );
    assert!(text.contains("source: the header \"event-id\""), "[key] is among the settings:\n{text}");
    assert!(text.contains("batch_max") && text.contains("expected_keys"), "[pipeline] and [filter] too:\n{text}");

    // The same records read through [key] source = "json": every one has an ID.
    let json = [("KDEDUP_KEY__SOURCE", "json"), ("KDEDUP_KEY__JSON_POINTER", "/id")];
    let (code, text) = tokio::task::block_in_place(|| check_with(&kafka, &store, &json));
    assert!(text.contains("[ ok ] event ids") && text.contains("30 of 30 records have an event ID"), "{text}");
    assert_eq!(code, Some(0), "{text}");

    // A misspelled librdkafka property fails check as it fails run.
    let typo = [("KDEDUP_KAFKA__CONSUMER__SESION_TIMEOUT_MS", "6000")];
    let (code, text) = tokio::task::block_in_place(|| check_with(&kafka, &store, &typo));
    assert_ne!(code, Some(0), "{text}");
    let line = text.lines().find(|l| l.contains("kafka clients")).unwrap_or_else(|| panic!("{text}"));
    assert!(line.contains("[FAIL]") && line.contains("sesion.timeout.ms"), "{line}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partition_dead_lettering_nearly_every_record_alike_is_loud_and_stays_ready() {
    let kafka = cluster(2);
    let dir = tempfile::tempdir().unwrap();
    // Partition 0: JSON events without the configured `event-id` header; partition 1: good ones.
    let (good, _) = events(400, 0, 1, 7);
    let records: Vec<mock::Produce> = (0..400)
        .map(|i| mock::Produce {
            partition: 0,
            key: None,
            payload: Some(format!(r#"{{"id":"ord-{i}"}}"#).into_bytes()),
            headers: vec![],
        })
        .chain(good.into_iter().map(|r| mock::Produce { partition: 1, ..r }))
        .collect();
    mock::produce_all(kafka.bootstrap(), INPUT, &records).await.unwrap();
    let running = start(config(&kafka, &unique("g"), &dir.path().join("store"), &[]), Default::default());
    wait_all_committed(&kafka, &running.metrics).await;
    let share = |p: &str| running.metrics.partition_dead_letter_share.with_label_values(&[INPUT, p]).get();
    assert_eq!(share("0"), 1.0, "every record of partition 0 was dead-lettered as missing_id");
    assert_eq!(share("1"), 0.0);
    assert!(running.metrics.is_ready(), "the partition progresses: readiness stays true");
    let page = running.metrics.render();
    assert!(page.contains(r#"kdedup_partition_dead_letter_share{partition="0",topic="in"} 1"#), "{page}");
    running.stop(kdedup::source::StopMode::Drain).await;
}

#[test]
fn a_wrong_broker_address_is_said_once_early_without_colours() {
    // Nothing listens on port 1 of the loopback address.
    let dir = tempfile::tempdir().unwrap();
    let started = Instant::now();
    let out = Command::new(BIN)
        .args(["run", "--config", "config/kdedup.toml"])
        .env_remove("KDEDUP_LOG")
        .env("KDEDUP_KAFKA__BROKERS", "127.0.0.1:1")
        .env("KDEDUP_STORE__PATH", dir.path().join("store"))
        .env("KDEDUP_METRICS__LISTEN", "")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert_eq!(stderr.matches("cannot reach Kafka at 127.0.0.1:1").count(), 1, "said once:\n{stderr}");
    assert!(!stderr.contains("must exist") && !stderr.contains("kdedup running"), "refused before starting:\n{stderr}");
    assert!(started.elapsed() < Duration::from_secs(30), "early: {:?}", started.elapsed());
    assert!(!stderr.contains('\u{1b}'), "no ANSI colours in a redirected log:\n{stderr}");
}

#[test]
fn inspect_of_an_unknown_id_exits_non_zero() {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(BIN)
        .args(["inspect", "--config", "config/kdedup.toml", "--id", "never-seen"])
        .env("KDEDUP_STORE__PATH", dir.path().join("store"))
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{stdout}");
    assert!(stdout.contains("never-seen: not in the store"), "{stdout}");
}

#[test]
fn a_locked_embedded_store_names_the_other_process_in_run_stats_and_replay() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("store");
    let kafka = cluster(1);
    let config = config(&kafka, "g", &path, &[]);
    let _held = kdedup::store::Store::open(&config.store, &config.retention).unwrap();
    for args in [&["run"][..], &["stats", "--store"], &["replay", "--from-offset", "0"]] {
        let out = Command::new(BIN)
            .args(args)
            .args(["--config", "config/kdedup.toml"])
            .env_remove("KDEDUP_LOG")
            .env("KDEDUP_KAFKA__BROKERS", kafka.bootstrap())
            .env("KDEDUP_KAFKA__TOPICS", INPUT)
            .env("KDEDUP_SINK__TOPIC", OUTPUT)
            .env("KDEDUP_DEAD_LETTER__TOPIC", DLQ)
            .env("KDEDUP_STORE__PATH", &path)
            .env("KDEDUP_METRICS__LISTEN", "")
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?}: {stderr}");
        let said = format!("another kdedup process holds {}", path.display());
        assert_eq!(stderr.matches(&said).count(), 1, "{args:?}: {stderr}");
        assert!(!stderr.contains("check disk space"), "{args:?}: {stderr}");
    }
}

#[test]
fn a_postgres_connection_error_names_the_host_and_port() {
    // Nothing listens on port 1.
    let out = Command::new(BIN)
        .args(["check", "--config", "config/kdedup.toml"])
        .env_remove("KDEDUP_LOG")
        .env("KDEDUP_KAFKA__BROKERS", "127.0.0.1:1")
        .env("KDEDUP_STORE__KIND", "postgres")
        .env("KDEDUP_STORE__URL", "postgres://kdedup:pw-s3cr3t@127.0.0.1:1/kdedup")
        .env("KDEDUP_METRICS__LISTEN", "")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let line = stdout.lines().find(|l| l.contains("] store")).unwrap_or_else(|| panic!("{stdout}"));
    assert!(line.contains("[FAIL]") && line.contains("at 127.0.0.1:1:"), "{line}");
    assert!(!stdout.contains("pw-s3cr3t"), "never the password: {stdout}");
}
