//! The README's quick start, run as written: every command of the fenced `sh` blocks under its
//! `## Quick start` heading, read from README.md at test time (so the text cannot drift from what
//! runs), against the test bed's Apache Kafka (`scripts/services env`).
//!
//! What the test does in the user's place, as the README's prose and comments tell the user to:
//! - the build line (`cargo build …`) is not run: the test's own build of the binary is put first
//!   on `PATH` instead;
//! - it creates the three topics the quick start names (under unique names on the shared broker)
//!   and writes events with an `event-id` header and one record without it to the input;
//! - it sets `KDEDUP_KAFKA__BROKERS` (the comment in the block) and, to keep this run apart from
//!   others on the shared broker, the topic and group names and a free metrics port, all through
//!   `KDEDUP_…` variables that override the sample config, as the README says any key can be;
//! - the commands run in a fresh directory holding the repository's `config/`, so the sample
//!   config's `./kdedup-data` store lands there.
//!
//! Every command must exit 0; `kdedup run` is the service: the test awaits its output and its
//! commits, then stops it with SIGTERM (the README's "Ctrl-C / SIGTERM"), which must exit 0.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use kdedup::mock;
use kdedup::sink::kafka::headers;

use crate::utils::*;

/// The command lines of the fenced `sh` blocks under `## Quick start`: comments and blank
/// lines dropped, trailing comments kept (bash ignores them).
fn quick_start_commands(readme: &str) -> Vec<String> {
    let mut in_section = false;
    let mut in_block = false;
    let mut commands = Vec::new();
    for line in readme.lines() {
        if !in_block && line.starts_with("## ") {
            in_section = line.trim_end() == "## Quick start";
            continue;
        }
        if !in_section {
            continue;
        }
        if line.starts_with("```") {
            if in_block {
                in_block = false;
            } else if line.trim_end() == "```sh" {
                in_block = true;
            }
            continue;
        }
        let command = line.trim();
        if in_block && !command.is_empty() && !command.starts_with('#') {
            commands.push(command.to_string());
        }
    }
    commands
}

#[test]
fn the_section_parser_reads_only_the_quick_starts_shell_blocks() {
    let text =
        "# t\n## Before\n```sh\nnot this\n```\n## Quick start\nprose\n```sh\n# a comment\none  # trailing\n\n```\n\
                ```toml\nnot = \"this\"\n```\n```sh\ntwo\n```\n## After\n```sh\nnor this\n```\n";
    assert_eq!(quick_start_commands(text), ["one  # trailing", "two"]);
}

/// A port nothing listens on now, for the metrics endpoint.
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_readme_quick_start_runs_as_written() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let readme = std::fs::read_to_string(root.join("README.md")).unwrap();
    let commands = quick_start_commands(&readme);
    // The block is the one a newcomer copies: it builds, runs the demo, checks and runs.
    let starts = |prefix: &str| commands.iter().filter(|c| c.starts_with(prefix)).count();
    assert_eq!(starts("cargo build"), 1, "one build line: {commands:?}");
    assert_eq!(starts("kdedup demo"), 1, "{commands:?}");
    assert_eq!(starts("kdedup check"), 1, "{commands:?}");
    assert_eq!(starts("kdedup run"), 1, "{commands:?}");
    assert_eq!(commands.last().map(|c| c.starts_with("kdedup run")), Some(true), "run comes last: {commands:?}");
    assert!(readme.contains("export KDEDUP_KAFKA__BROKERS="), "the README names the variable the test sets");

    let Ok(brokers) = std::env::var("KDEDUP_TEST_BROKER") else {
        eprintln!("skipped: KDEDUP_TEST_BROKER is not set (scripts/test sets it)");
        return;
    };
    let _turn = BROKER_TURN.lock().await;

    // What the prose asks of the user: the topics exist, and the input holds events.
    let (input, output, dlq, group) = (unique("orders"), unique("orders.deduped"), unique("orders.dlq"), unique("g"));
    mock::create_topics(brokers.as_str(), &[(&input, 3), (&output, 3), (&dlq, 1)]).await.unwrap();
    let (mut records, ids) = events(300, 60, 3, 42);
    records.push(mock::Produce {
        partition: 0,
        key: None,
        payload: Some(br#"{"id":"no-header"}"#.to_vec()),
        headers: vec![],
    });
    mock::produce_all(brokers.as_str(), &input, &records).await.unwrap();

    // A fresh working directory with the repository's config/ in it.
    let dir = tempfile::tempdir().unwrap();
    std::os::unix::fs::symlink(root.join("config"), dir.path().join("config")).unwrap();
    let bin_dir = Path::new(BIN).parent().unwrap();
    let path = format!("{}:{}", bin_dir.display(), std::env::var("PATH").unwrap_or_default());
    let metrics = format!("127.0.0.1:{}", free_port());
    let shell = |command: &str| {
        let mut cmd = Command::new("bash");
        cmd.arg("-c")
            .arg(format!("exec {command}"))
            .current_dir(dir.path())
            .env("PATH", &path)
            .env_remove("KDEDUP_LOG")
            .env("KDEDUP_KAFKA__BROKERS", &brokers)
            .env("KDEDUP_KAFKA__TOPICS", &input)
            .env("KDEDUP_SINK__TOPIC", &output)
            .env("KDEDUP_DEAD_LETTER__TOPIC", &dlq)
            .env("KDEDUP_KAFKA__GROUP_ID", &group)
            .env("KDEDUP_METRICS__LISTEN", &metrics);
        cmd
    };

    let mut service = None;
    for command in &commands {
        if command.starts_with("cargo build") {
            continue; // the test's own build is on PATH
        }
        if command.starts_with("kdedup run") {
            let log = std::fs::File::create(dir.path().join("run.log")).unwrap();
            service = Some(shell(command).stdout(Stdio::null()).stderr(log).spawn().unwrap());
            continue;
        }
        let out = tokio::task::block_in_place(|| shell(command).output().unwrap());
        let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        assert!(out.status.success(), "`{command}` exited {:?}:\n{text}", out.status.code());
        if command.starts_with("kdedup check") {
            // The input holds records: check sampled them through the sample config's key.
            let line = text.lines().find(|l| l.contains("event ids")).unwrap_or_else(|| panic!("{text}"));
            assert!(!line.contains("[FAIL]") && !line.contains("empty"), "{line}");
            eprintln!("{line}");
        }
    }
    let service = service.expect("the quick start ends with kdedup run");

    // The service works through the input: every event once on the output, the record
    // without an ID dead-lettered, and its offsets committed to the end.
    let member = ServiceProcess(Some(service));
    let log = || std::fs::read_to_string(dir.path().join("run.log")).unwrap_or_default();
    let deadline = Instant::now() + Duration::from_secs(120);
    let ends = mock::end_offsets(brokers.as_str(), &input).unwrap();
    loop {
        let committed = mock::committed_offsets(brokers.as_str(), &group, &input).unwrap();
        if ends.iter().all(|(p, end)| committed.get(p) == Some(end)) {
            break;
        }
        assert!(Instant::now() < deadline, "kdedup run did not commit to {ends:?}: {committed:?}\n{}", log());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let out = mock::read_all(brokers.as_str(), &output).unwrap();
    assert_exactly_once(&out, &ids);
    let dead = mock::read_all(brokers.as_str(), &dlq).unwrap();
    assert_eq!(dead.len(), 1, "the record without an event-id header, and nothing else");
    assert_eq!(dead[0].header_str(headers::REASON), Some("missing_id"));

    // Ctrl-C / SIGTERM: finish, commit, exit 0.
    let status = member.terminate();
    assert!(status.success(), "kdedup run after SIGTERM: {status:?}\n{}", log());
    assert!(dir.path().join("kdedup-data").is_dir(), "the sample config's store is in the working directory");
}

/// The quick start's `kdedup run`, killed if the test fails before it stops it.
struct ServiceProcess(Option<std::process::Child>);

impl ServiceProcess {
    /// SIGTERM, then the exit status.
    fn terminate(mut self) -> std::process::ExitStatus {
        let child = self.0.take().expect("running");
        // SAFETY: kill(2) on our own child's pid, not yet reaped.
        assert_eq!(unsafe { libc::kill(child.id() as i32, libc::SIGTERM) }, 0);
        exit_within(child, Duration::from_secs(60)).status
    }
}

impl Drop for ServiceProcess {
    fn drop(&mut self) {
        if let Some(mut child) = self.0.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens.
fn anchor(heading: &str) -> String {
    heading
        .trim()
        .to_lowercase()
        .chars()
        .filter(|c| c.is_alphanumeric() || *c == ' ' || *c == '-' || *c == '_')
        .map(|c| if c == ' ' { '-' } else { c })
        .collect()
}

/// The anchors of a Markdown file's headings (outside fenced blocks).
fn anchors(text: &str) -> Vec<String> {
    let mut fenced = false;
    let mut out = Vec::new();
    for line in text.lines() {
        if line.starts_with("```") {
            fenced = !fenced;
        } else if !fenced && line.starts_with('#') {
            let heading = line.trim_start_matches('#');
            if heading.starts_with(' ') {
                out.push(anchor(heading));
            }
        }
    }
    out
}

/// The README was split into docs/ pages that link to each other and to the repository's
/// files: every relative link (and its #anchor) must lead somewhere.
#[test]
fn every_relative_link_of_the_readme_and_the_docs_pages_resolves() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut files = vec![root.join("README.md")];
    for entry in std::fs::read_dir(root.join("docs")).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "md") {
            files.push(path);
        }
    }
    assert!(files.len() > 5, "the docs pages: {files:?}");
    let mut broken = Vec::new();
    for file in &files {
        let text = std::fs::read_to_string(file).unwrap();
        for (i, _) in text.match_indices("](") {
            let rest = &text[i + 2..];
            let Some(end) = rest.find(')') else { continue };
            let target = &rest[..end];
            if target.contains("://") || target.starts_with("mailto:") {
                continue;
            }
            let (path, fragment) = target.split_once('#').unwrap_or((target, ""));
            let linked = if path.is_empty() { file.clone() } else { file.parent().unwrap().join(path) };
            if !linked.exists() {
                broken.push(format!("{}: {target} (no such file)", file.display()));
            } else if !fragment.is_empty() {
                let headings = anchors(&std::fs::read_to_string(&linked).unwrap_or_default());
                if !headings.iter().any(|a| a == fragment) {
                    broken.push(format!("{}: {target} (no such heading; there are {headings:?})", file.display()));
                }
            }
        }
    }
    assert!(broken.is_empty(), "broken links:\n{}", broken.join("\n"));
}

#[test]
fn anchors_follow_githubs_rule() {
    assert_eq!(anchor(" Connecting to a TLS / SASL cluster"), "connecting-to-a-tls--sasl-cluster");
    assert_eq!(anchor(" `kdedup check`"), "kdedup-check");
    assert_eq!(anchor(" Guarantees, in ten lines"), "guarantees-in-ten-lines");
}

/// The README's 20-line config (the `toml` block under `## The config`) is a config kdedup
/// accepts, and says what the sample config file says.
#[test]
fn the_readmes_config_is_accepted_and_agrees_with_the_sample_file() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let readme = std::fs::read_to_string(root.join("README.md")).unwrap();
    let section = readme.split("\n## The config\n").nth(1).expect("a `## The config` section");
    let block = section.split("```toml\n").nth(1).and_then(|b| b.split("\n```").next()).expect("a toml block");
    let lines = block.lines().count();
    assert!(lines <= 25, "about 20 lines, not {lines}");
    let env = std::iter::empty::<(String, String)>();
    let short = kdedup::config::Config::from_toml_with_env(block, "README.md", env).expect("README's config loads");
    let sample = kdedup::config::Config::load(&root.join("config/kdedup.toml")).unwrap();
    assert_eq!(format!("{:?}", short.kafka), format!("{:?}", sample.kafka), "[kafka] as in config/kdedup.toml");
    assert_eq!(format!("{:?}", short.key), format!("{:?}", sample.key), "[key] as in config/kdedup.toml");
    assert_eq!(format!("{:?}", short.store), format!("{:?}", sample.store), "[store] as in config/kdedup.toml");
    assert_eq!(format!("{:?}", short.retention), format!("{:?}", sample.retention), "ttl_secs as in the file");
    assert_eq!(format!("{:?}", short.sink), format!("{:?}", sample.sink), "[sink] as in config/kdedup.toml");
    assert_eq!(short.dead_letter_topic, sample.dead_letter_topic);
}

/// The README's conflict rule: the copy processed first wins, not the copy produced first.
/// An order's original (created a minute earlier, by its timestamp) reaches the topic late, on
/// another partition, after a resend with another amount was processed: the resend is the
/// one emitted, and the original is dead-lettered as the conflict, its error naming the
/// fingerprint stored first and the position that claimed it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_copy_processed_first_wins_a_conflict_not_the_copy_produced_first() {
    use rdkafka::producer::{FutureProducer, FutureRecord};

    let kafka = cluster(2);
    let dir = tempfile::tempdir().unwrap();
    let producer: FutureProducer =
        kdedup::kafka_client::KafkaClients::from(kafka.bootstrap()).producer().create().unwrap();
    let now_ms = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as i64;
    let send = |partition: i32, payload: &'static str, timestamp: i64| {
        let headers = rdkafka::message::OwnedHeaders::new()
            .insert(rdkafka::message::Header { key: "event-id", value: Some("ord-1") });
        let record: FutureRecord<'_, [u8], str> =
            FutureRecord::to(INPUT).partition(partition).payload(payload).headers(headers).timestamp(timestamp);
        producer.send(record, Duration::from_secs(10))
    };

    // The resend, with another amount, on partition 1: processed first.
    send(1, r#"{"id":"ord-1","amount":50}"#, now_ms).await.unwrap();
    let running = start(config(&kafka, &unique("conflict"), &dir.path().join("store"), &[]), Default::default());
    wait_all_committed(&kafka, &running.metrics).await;
    // The original, produced a minute before the resend by its timestamp, arrives on partition 0.
    send(0, r#"{"id":"ord-1","amount":5}"#, now_ms - 60_000).await.unwrap();
    wait_all_committed(&kafka, &running.metrics).await;
    running.stop(kdedup::source::StopMode::Drain).await;

    let output = mock::read_all(kafka.bootstrap(), OUTPUT).unwrap();
    assert_eq!(output.len(), 1, "one effect for ord-1");
    assert_eq!(output[0].header_str(headers::SOURCE_PARTITION), Some("1"), "the resend, processed first, won");
    assert_eq!(output[0].payload.as_deref(), Some(&br#"{"id":"ord-1","amount":50}"#[..]));
    let dead = mock::read_all(kafka.bootstrap(), DLQ).unwrap();
    assert_eq!(dead.len(), 1, "the original is the conflict");
    assert_eq!(dead[0].header_str(headers::REASON), Some("conflict"));
    assert_eq!(dead[0].header_str(headers::SOURCE_PARTITION), Some("0"));
    let error = dead[0].header_str(headers::ERROR).unwrap_or_default();
    assert!(
        error.contains("stored first") && error.contains(&format!("by {INPUT}/1/0, claimed at ")),
        "the error names the winner's fingerprint and where it was claimed: {error}"
    );
}
