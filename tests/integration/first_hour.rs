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
    assert_eq!(line.matches("error connecting to server").count(), 1, "each cause once: {line}");
    assert!(!line.contains("creating a new object"), "not the pool's words: {line}");
    assert!(!stdout.contains("pw-s3cr3t"), "never the password: {stdout}");
}

/// `kdedup CMD --config config/kdedup.toml` on the mock cluster's test topics and `store`.
fn kdedup_on(kafka: &mock::MockKafka, group: &str, store: &std::path::Path, args: &[&str]) -> Command {
    let mut command = Command::new(BIN);
    command
        .args(args)
        .args(["--config", "config/kdedup.toml"])
        .env_remove("KDEDUP_LOG")
        .env("KDEDUP_KAFKA__BROKERS", kafka.bootstrap())
        .env("KDEDUP_KAFKA__GROUP_ID", group)
        .env("KDEDUP_KAFKA__TOPICS", INPUT)
        .env("KDEDUP_SINK__TOPIC", OUTPUT)
        .env("KDEDUP_DEAD_LETTER__TOPIC", DLQ)
        .env("KDEDUP_STORE__PATH", store)
        .env("KDEDUP_METRICS__LISTEN", "");
    command
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inspect_shows_a_key_in_words_and_dates_and_nothing_of_the_storage_engine() {
    use kdedup::event::{EventKey, Fingerprint, Position};
    use kdedup::store::{ClaimRequest, DedupStore, Store};
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("store");
    let kafka = cluster(1);
    {
        let config = config(&kafka, "g", &path, &[]);
        let store = Store::open(&config.store, &config.retention).unwrap();
        let key = EventKey { scope: "inspected".into(), id: b"ord-7".to_vec() };
        let position = Position { topic: INPUT.into(), partition: 0, offset: 3 };
        let now = kdedup::store::now_ms();
        let request = ClaimRequest { key: key.clone(), fingerprint: Fingerprint(7), position: position.clone() };
        store.claim(vec![request], now).await.unwrap();
        assert_eq!(store.complete(vec![(key, position)], now).await.unwrap(), [true]);
        store.sync().unwrap();
    }
    let out = kdedup_on(&kafka, "g", &path, &["inspect", "--id", "ord-7", "--scope", "inspected"]).output().unwrap();
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert_eq!(out.status.code(), Some(0), "{stdout}{stderr}");
    assert!(stdout.contains("state: done (its effect ran"), "the state in words, not `Done`: {stdout}");
    let claimed = stdout.lines().find(|l| l.starts_with("claimed at: ")).unwrap_or_else(|| panic!("{stdout}"));
    assert!(claimed.contains("Z, ") && claimed.ends_with(" s ago"), "a date and how long ago: {claimed}");
    assert!(stdout.contains("lease until: none (done)"), "no lease on a done row, not 1970: {stdout}");
    assert!(stdout.contains("claimed by: in/0@3\n"), "{stdout}");
    let expires = stdout.lines().find(|l| l.starts_with("expires at: ")).unwrap_or_else(|| panic!("{stdout}"));
    assert!(expires.contains("Z, ") && expires.ends_with(" from now"), "{expires}");
    assert!(!stdout.contains("1970") && !stdout.contains("Done"), "{stdout}");
    assert!(stderr.trim().is_empty(), "one answer, no storage engine INFO lines on stderr:\n{stderr}");

    let out = kdedup_on(&kafka, "g", &path, &["inspect", "--id", "never-seen"]).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stdout).contains("never-seen: not in the store"));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!stderr.contains("fjall") && !stderr.contains("lsm_tree") && !stderr.contains("INFO"), "{stderr}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replay_says_what_it_found_once() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("store");
    let kafka = cluster(1);
    let (records, _) = events(20, 5, 1, 24);
    mock::produce_all(kafka.bootstrap(), INPUT, &records).await.unwrap();
    // The group committed past the end the broker gives: a broker's wrong watermark as a
    // replay meets it (or a log that lost records the group had read).
    let group = unique("g");
    let committer: BaseConsumer = KafkaClients::from(kafka.bootstrap()).reader(&group).create().unwrap();
    let mut tpl = rdkafka::TopicPartitionList::new();
    tpl.add_partition_offset(INPUT, 0, rdkafka::Offset::Offset(1000)).unwrap();
    committer.commit(&tpl, rdkafka::consumer::CommitMode::Sync).unwrap();
    drop(committer);

    let out = kdedup_on(&kafka, &group, &path, &["replay", "--from-offset", "0"]).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    let said = "in/0: the broker says the partition ends at offset 25, below the group's committed offset 1000";
    assert_eq!(stderr.matches(said).count(), 1, "said once:\n{stderr}");
    assert!(
        !stderr.contains("ERROR") && !stderr.contains("PartitionEOF"),
        "the end of a partition is no error:\n{stderr}"
    );
    assert!(!stderr.contains("DryRun") && stderr.contains("mode dry-run"), "{stderr}");

    let out = kdedup_on(&kafka, &group, &path, &["replay", "--from-offset", "0", "--mode", "apply", "--show", "5"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    let note = "note: --show lists what a dry-run finds; it is ignored with --mode apply";
    assert_eq!(stderr.matches(note).count(), 1, "{stderr}");
    assert!(!stderr.contains("ERROR"), "{stderr}");
}

#[test]
fn waiting_to_join_the_group_is_said_until_partitions_are_assigned_and_the_stop_in_words() {
    use std::io::BufRead;
    let dir = tempfile::tempdir().unwrap();
    let kafka = cluster(1);
    // The group's first join waits 12 s, as a broker's initial rebalance delay (or a session
    // timeout for a member that left without a word) makes it wait.
    kafka.delay_group_joins(Duration::from_secs(12));
    let mut child = kdedup_on(&kafka, &unique("g"), &dir.path().join("store"), &["run"])
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    let reader = std::thread::spawn(move || {
        for line in std::io::BufReader::new(stderr).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let mut seen = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    let is_assigned = |l: &String| l.contains("source: partitions assigned");
    while !seen.iter().any(is_assigned) {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(line) => seen.push(line),
            Err(_) => break,
        }
    }
    // A clean stop, said in words (not `mode=Drain`).
    // SAFETY: kill(2) on our own child's pid; it is reaped below.
    assert_eq!(unsafe { libc::kill(child.id() as i32, libc::SIGTERM) }, 0);
    let status = child.wait().unwrap();
    let _ = reader.join();
    seen.extend(rx.try_iter());
    let log = seen.join("\n");
    assert!(status.success(), "{status}:\n{log}");
    let stop = "stopping how=\"finishing in-flight work, then committing\"";
    assert_eq!(log.matches(stop).count(), 1, "{log}");
    assert!(!log.contains("Drain"), "{log}");
    let assigned = seen.iter().position(is_assigned).unwrap_or_else(|| panic!("{log}"));
    let waiting: Vec<&String> =
        seen[..assigned].iter().filter(|l| l.contains("waiting to join the consumer group")).collect();
    assert!(!waiting.is_empty(), "said while waiting:\n{log}");
    assert!(waiting.iter().all(|l| l.contains("waited_secs=")), "and for how long:\n{log}");
    let running = seen.iter().position(|l| l.contains("kdedup running")).unwrap_or_else(|| panic!("{log}"));
    assert!(running < assigned, "{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_instances_on_their_own_embedded_stores_say_so_on_the_page_readyz_and_a_gauge() {
    let dir = tempfile::tempdir().unwrap();
    let kafka = cluster(2);
    let group = unique("g");
    let a = start(config(&kafka, &group, &dir.path().join("a"), &[]), Default::default());
    wait_for("the first instance owns both partitions", Duration::from_secs(60), || async {
        a.metrics.assigned_partitions.get() == 2
    })
    .await;
    assert_eq!(a.metrics.embedded_store_partial.get(), 0, "alone, it owns the whole topic");
    assert_eq!(a.metrics.partial_ownership_warning(), None);
    let b = start(config(&kafka, &group, &dir.path().join("b"), &[]), Default::default());
    let said = "owns 1 of 2 partitions but keeps its claims in an embedded store";
    for (name, m) in [("first", &a.metrics), ("second", &b.metrics)] {
        wait_for(&format!("the {name} instance says it owns part of the topic"), Duration::from_secs(60), || async {
            m.embedded_store_partial.get() == 1
        })
        .await;
        assert!(m.render().contains("kdedup_embedded_store_partial 1"));
        assert_eq!(m.readiness_text().matches(said).count(), 1, "{}", m.readiness_text());
        assert_eq!(m.status_page().matches(said).count(), 1);
    }
    b.stop(kdedup::source::StopMode::Drain).await;
    wait_for("the first instance owns the whole topic again", Duration::from_secs(60), || async {
        a.metrics.embedded_store_partial.get() == 0
    })
    .await;
    assert_eq!(a.metrics.readiness_text(), "ready\n");
    a.stop(kdedup::source::StopMode::Drain).await;
}
