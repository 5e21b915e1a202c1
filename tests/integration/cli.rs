//! The real binary: help, config errors, the demo, and `run` under SIGTERM.

use std::io::{BufReader, Read};
use std::process::{Command, Stdio};
use std::time::Duration;

use kdedup::mock;

use crate::utils::*;

const BIN: &str = env!("CARGO_BIN_EXE_kdedup");

fn output(args: &[&str]) -> std::process::Output {
    Command::new(BIN).args(args).env_remove("KDEDUP_LOG").output().expect("the binary runs")
}

#[test]
fn help_teaches_the_commands_and_the_environment_overrides() {
    let top = String::from_utf8(output(&["--help"]).stdout).unwrap();
    for word in ["run", "demo", "inspect", "forget", "kdedup demo"] {
        assert!(top.contains(word), "--help lacks {word}:\n{top}");
    }
    let run = String::from_utf8(output(&["run", "--help"]).stdout).unwrap();
    assert!(run.contains("KDEDUP_<SECTION>__<KEY>") && run.contains("SIGTERM"), "{run}");
}

#[test]
fn a_bad_config_is_a_clear_error_naming_file_and_key() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.toml");
    let text =
        std::fs::read_to_string("config/kdedup.toml").unwrap().replace("ttl_secs = 86400", "ttl_seconds = 86400");
    std::fs::write(&path, text).unwrap();
    let out = output(&["run", "--config", path.to_str().unwrap()]);
    let stderr = String::from_utf8(out.stderr).unwrap();
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("bad.toml") && stderr.contains("ttl_seconds"), "{stderr}");
    let missing = output(&["run", "--config", "/nonexistent/kdedup.toml"]);
    assert!(String::from_utf8(missing.stderr).unwrap().contains("/nonexistent/kdedup.toml"));
}

/// `kdedup check` and `kdedup run` with `config/kdedup.toml` and these overrides:
/// the exit code and standard output, then standard error.
fn kdedup_with(args: &[&str], env: &[(&str, &str)]) -> (Option<i32>, String) {
    let out = Command::new(BIN)
        .args(args)
        .args(["--config", "config/kdedup.toml"])
        .envs(env.iter().copied())
        .env("KDEDUP_METRICS__LISTEN", "")
        .env_remove("KDEDUP_LOG")
        .output()
        .unwrap();
    (out.status.code(), format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)))
}

#[test]
fn auto_commit_in_any_spelling_librdkafka_reads_as_true_is_refused_by_check_and_run() {
    // As the environment gives them: a TOML boolean, an integer, and strings.
    for key in ["KDEDUP_KAFKA__CONSUMER__ENABLE_AUTO_COMMIT", "KDEDUP_KAFKA__CLIENT__ENABLE_AUTO_OFFSET_STORE"] {
        for value in ["true", "1", "True", "t", "TRUE", "T"] {
            let (code, text) = kdedup_with(&["check"], &[(key, value)]);
            assert_ne!(code, Some(0), "{key}={value}: check must fail:\n{text}");
            assert!(text.contains("reads as true") && text.contains("FAIL"), "{key}={value}:\n{text}");
            let (code, text) = kdedup_with(&["run"], &[(key, value)]);
            assert_eq!(code, Some(2), "{key}={value}: run must refuse to start:\n{text}");
            assert!(text.contains("reads as true"), "{key}={value}:\n{text}");
        }
        let (code, text) = kdedup_with(&["run"], &[(key, "yes")]);
        assert_eq!(code, Some(2), "{text}");
        assert!(text.contains("allowed: false, f or 0"), "{text}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_warns_that_auto_offset_reset_latest_skips_the_backlog() {
    let kafka = cluster(1);
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("store").display().to_string();
    for value in ["latest", "LARGEST", "end", "earliest"] {
        let env = [
            ("KDEDUP_KAFKA__BROKERS", kafka.bootstrap()),
            ("KDEDUP_KAFKA__TOPICS", INPUT),
            ("KDEDUP_SINK__TOPIC", OUTPUT),
            ("KDEDUP_DEAD_LETTER__TOPIC", DLQ),
            ("KDEDUP_STORE__PATH", store.as_str()),
            ("KDEDUP_KAFKA__CONSUMER__AUTO_OFFSET_RESET", value),
        ];
        let (code, text) = tokio::task::block_in_place(|| kdedup_with(&["check", "--json"], &env));
        let json = text.lines().next().unwrap_or_default();
        let report: serde_json::Value = serde_json::from_str(json).unwrap_or_else(|e| panic!("{e}: {text}"));
        let warning = report["checks"].as_array().unwrap().iter().find(|c| c["name"] == "offset reset").cloned();
        if value == "earliest" {
            assert!(warning.is_none(), "{text}");
        } else {
            let warning = warning.unwrap_or_else(|| panic!("{value}: no warning:\n{text}"));
            assert_eq!(warning["status"], "warn");
            assert!(warning["detail"].as_str().unwrap().contains("skips the backlog"), "{warning}");
        }
        assert_eq!(code, Some(0), "a warning is not a failure:\n{text}");
    }
}

#[test]
fn run_refuses_a_postgres_store_without_its_table() {
    let Ok(url) = std::env::var("KDEDUP_TEST_POSTGRES") else {
        eprintln!("skipped: KDEDUP_TEST_POSTGRES is not set (scripts/test sets it)");
        return;
    };
    // A database of its own, without the table.
    let db = unique("empty").replace('-', "_");
    let admin = std::process::Command::new("psql")
        .args([url.as_str(), "-qc", &format!("CREATE DATABASE {db}")])
        .output()
        .unwrap();
    assert!(admin.status.success(), "{}", String::from_utf8_lossy(&admin.stderr));
    let empty = format!("{}/{db}", url.rsplit_once('/').unwrap().0);
    let out = Command::new(BIN)
        .args(["run", "--config", "config/kdedup.toml"])
        .env("KDEDUP_STORE__KIND", "postgres")
        .env("KDEDUP_STORE__URL", &empty)
        .env("KDEDUP_METRICS__LISTEN", "")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("kdedup schema apply --config config/kdedup.toml"), "names the file given: {stderr}");
}

#[test]
fn demo_json_reports_every_event_exactly_once() {
    let out = output(&["demo", "--events", "20000", "--json"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).expect("one JSON object");
    let n = |k: &str| report[k].as_u64().unwrap_or_else(|| panic!("{k} missing in {report}"));
    assert_eq!(n("records_in"), 20_000);
    assert_eq!(n("lost"), 0);
    assert_eq!(n("duplicated_effects"), 0);
    assert_eq!(n("emitted"), n("unique_events"));
    assert_eq!(n("duplicates_dropped"), n("duplicates_in"));
    assert_eq!(n("dead_lettered"), n("malformed_in"));
    assert!(report["events_per_sec"].as_f64().unwrap() > 0.0);
}

#[test]
fn bench_json_compares_both_runs_and_verifies_their_outputs() {
    let out = output(&["bench", "--events", "20000", "--partitions", "4", "--json"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).expect("one JSON object");
    let f = |path: &[&str]| {
        let v = path.iter().fold(&report, |v, k| &v[*k]);
        v.as_f64().unwrap_or_else(|| panic!("{} missing in {report}", path.join(".")))
    };
    assert_eq!(report["verified"], serde_json::Value::Bool(true), "{report}");
    assert_eq!(f(&["passthrough", "records_out"]), 20_000.0);
    assert_eq!(f(&["kdedup", "records_out"]), f(&["unique_events"]));
    for run in ["passthrough", "kdedup"] {
        assert!(f(&[run, "events_per_sec"]) > 0.0);
        assert!(f(&[run, "cpu_secs_per_event"]) > 0.0);
        assert!(f(&[run, "peak_rss_bytes"]) > 0.0);
        assert!(f(&[run, "latency_p99_ms"]) >= f(&[run, "latency_p50_ms"]));
    }
    let ratio = f(&["kdedup", "events_per_sec"]) / f(&["passthrough", "events_per_sec"]);
    assert!((f(&["ratio"]) - ratio).abs() < 1e-9);
    assert!(f(&["kdedup", "fsyncs_per_1000"]) > 0.0, "commits sync the store");
    // Where the peak goes: both heaps measured, the prefetch a share of the budget.
    let memory = |k: &str| f(&["kdedup", "memory", k]);
    assert!(memory("sampled_peak_rss_bytes") > 0.0 && memory("threads") > 0.0);
    assert!(memory("rust_heap_bytes") > 0.0 && memory("c_heap_bytes") >= memory("c_heap_in_use_bytes"));
    assert_eq!(memory("consumer_prefetch_bound_bytes"), 4.0 * memory("prefetch_per_partition_bytes"));
}

/// `--runs 2`: two pairs on the one dataset, each into outputs of its own and verified; the summary's medians and
/// ranges are the pairs' own figures.
#[test]
fn bench_runs_pairs_on_one_dataset_and_summarises_them() {
    let out = output(&["bench", "--events", "5000", "--partitions", "2", "--runs", "2", "--json"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).expect("one JSON object");
    let runs = report["runs"].as_array().unwrap_or_else(|| panic!("runs missing in {report}"));
    assert_eq!(runs.len(), 2, "{report}");
    for r in runs {
        assert_eq!(r["verified"], serde_json::Value::Bool(true), "{r}");
        assert_eq!(r["passthrough"]["records_out"], 5000, "{r}");
        assert_eq!(r["kdedup"]["records_out"], r["unique_events"], "{r}");
    }
    assert_eq!(runs[0]["unique_events"], runs[1]["unique_events"], "one dataset");
    assert_eq!(runs[0]["topics"]["input"], runs[1]["topics"]["input"], "one dataset");
    assert_ne!(runs[0]["topics"]["kdedup"], runs[1]["topics"]["kdedup"], "outputs of their own");
    // mimalloc's committed count is read in the process's first pair only (it keeps what was given back).
    assert!(runs[0]["kdedup"]["memory"]["rust_heap_bytes"].as_f64().is_some_and(|b| b > 0.0), "{report}");
    assert!(runs[1]["kdedup"]["memory"]["rust_heap_bytes"].is_null(), "{report}");
    let summary = &report["summary"];
    assert_eq!(summary["runs"], 2);
    assert_eq!(summary["verified"], serde_json::Value::Bool(true));
    let ratios: Vec<f64> = runs.iter().map(|r| r["ratio"].as_f64().unwrap()).collect();
    let spread = |k: &str| summary["ratio"][k].as_f64().unwrap_or_else(|| panic!("ratio.{k} missing in {summary}"));
    assert_eq!(spread("min"), ratios[0].min(ratios[1]));
    assert_eq!(spread("max"), ratios[0].max(ratios[1]));
    assert!((spread("median") - (ratios[0] + ratios[1]) / 2.0).abs() < 1e-12, "{summary}");
}

/// `kdedup bench --brokers` on the reference broker (Apache Kafka): both phases verified by reading back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bench_on_a_real_broker_verifies_both_runs() {
    let Some(env) = group_env() else { return };
    let _turn = BROKER_TURN.lock().await;
    let out = tokio::task::block_in_place(|| {
        output(&["bench", "--brokers", &env.brokers, "--events", "20000", "--partitions", "4", "--json"])
    });
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).expect("one JSON object");
    assert_eq!(report["verified"], serde_json::Value::Bool(true), "{report}");
    assert_eq!(report["passthrough"]["records_out"], 20_000, "{report}");
    assert_eq!(report["kdedup"]["records_out"], report["unique_events"], "{report}");
    eprintln!(
        "bench on Kafka: passthrough {} events/s, kdedup {} events/s",
        report["passthrough"]["events_per_sec"], report["kdedup"]["events_per_sec"]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_serves_metrics_and_drains_commits_and_exits_zero_on_sigterm() {
    let kafka = cluster(2);
    let (records, ids) = events(3_000, 500, 2, 9);
    mock::produce_all(kafka.bootstrap(), INPUT, &records).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let group = unique("cli");
    let store = dir.path().join("store");
    let env = [
        ("KDEDUP_KAFKA__BROKERS", kafka.bootstrap().to_string()),
        ("KDEDUP_KAFKA__GROUP_ID", group.clone()),
        ("KDEDUP_KAFKA__TOPICS", INPUT.to_string()),
        ("KDEDUP_SINK__TOPIC", OUTPUT.to_string()),
        ("KDEDUP_DEAD_LETTER__TOPIC", DLQ.to_string()),
        ("KDEDUP_STORE__PATH", store.display().to_string()),
        ("KDEDUP_METRICS__LISTEN", format!("127.0.0.1:{port}")),
        ("KDEDUP_PIPELINE__COMMIT_INTERVAL_MS", "100".to_string()),
        ("KDEDUP_KAFKA__CONSUMER__SESSION_TIMEOUT_MS", "3000".to_string()),
    ];
    let mut child = Command::new(BIN)
        .args(["--log-format", "json", "run", "--config", "config/kdedup.toml"])
        .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
        .env("KDEDUP_LOG", "info")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let logs = std::thread::spawn(move || {
        let mut all = String::new();
        BufReader::new(stderr).read_to_string(&mut all).unwrap();
        all
    });

    let scrape = move |path: &'static str| async move {
        tokio::task::spawn_blocking(move || http_get(port, path)).await.unwrap()
    };
    // Outcomes are counted when a record is finished (consumed is counted on arrival).
    wait_for("every record finished, per /metrics", Duration::from_secs(60), || async {
        scrape("/metrics").await.is_some_and(|(_, body)| {
            let outcome = |o: &str| {
                metric(&body, &format!("kdedup_records_total{{outcome=\"{o}\",topic=\"{INPUT}\"}}")).unwrap_or(0.0)
            };
            outcome("new") + outcome("duplicate") == 3_500.0
        })
    })
    .await;
    let (status, _) = scrape("/healthz").await.unwrap();
    assert_eq!(status, 200);
    let (status, _) = scrape("/readyz").await.unwrap();
    assert_eq!(status, 200, "ready while it owns partitions and the store answers");
    let (_, body) = scrape("/metrics").await.unwrap();
    assert_eq!(metric(&body, r#"kdedup_records_total{outcome="new",topic="in"}"#), Some(3_000.0));
    assert_eq!(metric(&body, r#"kdedup_records_total{outcome="duplicate",topic="in"}"#), Some(500.0));

    // SIGTERM: drain, commit, exit 0.
    assert_eq!(unsafe { libc::kill(child.id() as i32, libc::SIGTERM) }, 0);
    let status = tokio::task::spawn_blocking(move || child.wait().unwrap()).await.unwrap();
    let logs = logs.join().unwrap();
    assert!(status.success(), "exit {status:?}; logs:\n{logs}");
    assert!(logs.lines().any(|l| l.contains("\"level\":\"INFO\"")), "logs are JSON on request:\n{logs}");
    let committed = mock::committed_offsets(kafka.bootstrap(), &group, INPUT).unwrap();
    assert_eq!(committed, mock::end_offsets(kafka.bootstrap(), INPUT).unwrap());
    assert_exactly_once(&mock::read_all(kafka.bootstrap(), OUTPUT).unwrap(), &ids);
}

/// The value of one sample line in Prometheus text.
fn metric(body: &str, name: &str) -> Option<f64> {
    body.lines().find_map(|l| l.strip_prefix(name).and_then(|v| v.trim().parse().ok()))
}
