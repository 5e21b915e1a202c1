//! The real binary against a TLS broker (Apache Kafka's SSL listener, scripts/services), with
//! certificate verification on: the whole path exactly once, a wrong CA refused with a clear
//! error, `kdedup check` passing and failing, and secrets that never reach any output.
//! Needs KDEDUP_TEST_TLS_BROKER and KDEDUP_TEST_TLS_CA (scripts/test sets them).

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use kdedup::kafka_client::KafkaClients;
use kdedup::mock::{self, Consumed};

use crate::utils::*;

const BIN: &str = env!("CARGO_BIN_EXE_kdedup");

/// The TLS tests share one broker: one at a time keeps their group joins quick.
static BROKER_TURN: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

struct Tls {
    broker: String,
    ca: String,
}

fn tls() -> Option<Tls> {
    match (std::env::var("KDEDUP_TEST_TLS_BROKER"), std::env::var("KDEDUP_TEST_TLS_CA")) {
        (Ok(broker), Ok(ca)) => Some(Tls { broker, ca }),
        _ => {
            eprintln!("skipped: KDEDUP_TEST_TLS_BROKER and KDEDUP_TEST_TLS_CA are not set (scripts/test sets them)");
            None
        }
    }
}

impl Tls {
    /// A test client that verifies the broker's certificate against the throwaway CA.
    fn clients(&self) -> KafkaClients {
        let props = [("security.protocol", "SSL"), ("ssl.ca.location", self.ca.as_str())];
        KafkaClients::with_client_properties(
            &self.broker,
            props.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
        )
    }
}

async fn create_topics(tls: &Tls, partitions: i32) -> Topics {
    let t = Topics { input: unique("tin"), output: unique("tout"), dlq: unique("tdlq"), group: unique("tgroup") };
    mock::create_topics(tls.clients(), &[(&t.input, partitions), (&t.output, partitions), (&t.dlq, 1)])
        .await
        .expect("topics are created over TLS");
    t
}

/// `kdedup <args>` on the example config, pointed at the TLS broker and this test's topics.
fn kdedup(tls: &Tls, topics: &Topics, store: &Path, args: &[&str]) -> Command {
    let mut c = Command::new(BIN);
    c.args(args).args(["--config", "config/kdedup.toml"]).env_remove("KDEDUP_LOG");
    topics
        .point(&mut c, &tls.broker)
        .env("KDEDUP_STORE__KIND", "embedded")
        .env("KDEDUP_STORE__PATH", store)
        .env("KDEDUP_METRICS__LISTEN", "")
        .env("KDEDUP_PIPELINE__COMMIT_INTERVAL_MS", "200")
        .envs(Protocol::Classic.env().iter().copied());
    c
}

/// TLS given per section, as before `[kafka.client]` existed.
fn tls_per_section(c: &mut Command, ca: &str) {
    for section in ["CONSUMER", "PRODUCER"] {
        c.env(format!("KDEDUP_KAFKA__{section}__SECURITY_PROTOCOL"), "SSL")
            .env(format!("KDEDUP_KAFKA__{section}__SSL_CA_LOCATION"), ca);
    }
}

struct Running {
    child: Child,
    stderr: PathBuf,
}

impl Running {
    fn spawn(mut c: Command, stderr: PathBuf) -> Running {
        let log = std::fs::File::create(&stderr).unwrap();
        let child = c.stdout(Stdio::null()).stderr(log).spawn().unwrap();
        Running { child, stderr }
    }

    fn logs(&self) -> String {
        std::fs::read_to_string(&self.stderr).unwrap_or_default()
    }

    /// SIGTERM, then the exit status and everything it wrote to stderr.
    fn terminate(mut self) -> (std::process::ExitStatus, String) {
        assert_eq!(unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) }, 0);
        let status = self.child.wait().unwrap();
        (status, self.logs())
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Reads `topic` whole until every one of `ids` is there (a read may start before the last
/// write), within `limit`; returns that read.
async fn read_until_complete(
    clients: &KafkaClients,
    topic: &str,
    ids: &[String],
    limit: Duration,
    logs: impl Fn() -> String,
) -> Vec<Consumed> {
    let deadline = Instant::now() + limit;
    loop {
        let output = mock::read_all(clients, topic).unwrap();
        let counts = emitted_counts(&output);
        if ids.iter().all(|id| counts.contains_key(id)) {
            return output;
        }
        if Instant::now() > deadline {
            panic!("{topic} holds {} of {} events after {limit:?}\n{}", counts.len(), ids.len(), logs());
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Waits until `group` has committed every input partition to its end.
async fn await_committed(clients: &KafkaClients, topics: &Topics, limit: Duration, logs: impl Fn() -> String) {
    let deadline = Instant::now() + limit;
    loop {
        let ends = mock::end_offsets(clients, &topics.input).unwrap();
        let committed = mock::committed_offsets(clients, &topics.group, &topics.input).unwrap();
        if ends.iter().all(|(p, end)| *end == 0 || committed.get(p) == Some(end)) {
            return;
        }
        if Instant::now() > deadline {
            panic!("commits did not reach the ends: committed {committed:?}, ends {ends:?}\n{}", logs());
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// A CA that did not sign the broker's certificate (a real CA file, so librdkafka loads it).
fn other_ca(dir: &Path) -> String {
    let ca = dir.join("other-ca.pem");
    let out = Command::new("openssl")
        .args(["req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=not the broker's CA"])
        .arg("-keyout")
        .arg(dir.join("other-ca.key"))
        .arg("-out")
        .arg(&ca)
        .output()
        .expect("openssl runs (scripts/services installs it)");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    ca.display().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_whole_path_over_verified_tls_emits_every_event_exactly_once() {
    let Some(tls) = tls() else { return };
    let _turn = BROKER_TURN.lock().await;
    let clients = tls.clients();
    let topics = create_topics(&tls, 2).await;
    let (records, ids) = events(600, 150, 2, 31);
    mock::produce_all(&clients, &topics.input, &records).await.expect("input is produced over TLS");

    let dir = tempfile::tempdir().unwrap();
    let mut c = kdedup(&tls, &topics, &dir.path().join("store"), &["run"]);
    c.env("KDEDUP_LOG", "kdedup=info");
    tls_per_section(&mut c, &tls.ca);
    let run = Running::spawn(c, dir.path().join("run.log"));

    let output = read_until_complete(&clients, &topics.output, &ids, Duration::from_secs(120), || run.logs()).await;
    assert_exactly_once(&output, &ids);
    await_committed(&clients, &topics, Duration::from_secs(60), || run.logs()).await;
    let (status, logs) = run.terminate();
    assert!(status.success(), "kdedup run exited {status} on SIGTERM:\n{logs}");
    // Read again after the drain: still exactly once.
    let output = read_until_complete(&clients, &topics.output, &ids, Duration::from_secs(30), || logs.clone()).await;
    assert_exactly_once(&output, &ids);
    assert_input_order(&output);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_ca_is_refused_with_an_error_naming_the_broker_and_the_tls_failure() {
    let Some(tls) = tls() else { return };
    let _turn = BROKER_TURN.lock().await;
    let topics = create_topics(&tls, 1).await;
    let dir = tempfile::tempdir().unwrap();
    let wrong = other_ca(dir.path());

    let mut c = kdedup(&tls, &topics, &dir.path().join("store"), &["run"]);
    tls_per_section(&mut c, &wrong);
    let out = exit_within(c.stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap(), Duration::from_secs(30));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "kdedup run must not run with an unverifiable broker:\n{stderr}");
    let last = stderr.lines().rfind(|l| l.starts_with("error:")).unwrap_or_else(|| panic!("no error line:\n{stderr}"));
    assert!(last.contains(&tls.broker), "the error names the broker: {last}");
    assert!(last.contains("SSL handshake failed") && last.contains("certificate verify failed"), "{last}");

    // The shared section does the same for every client, and `check` says so too.
    let mut c = kdedup(&tls, &topics, &dir.path().join("store"), &["check", "--json"]);
    c.env("KDEDUP_KAFKA__CLIENT__SECURITY_PROTOCOL", "SSL").env("KDEDUP_KAFKA__CLIENT__SSL_CA_LOCATION", &wrong);
    let out = exit_within(c.stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap(), Duration::from_secs(30));
    assert_eq!(out.status.code(), Some(1), "{}", String::from_utf8_lossy(&out.stderr));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let broker = report["checks"].as_array().unwrap().iter().find(|c| c["name"] == "broker").unwrap();
    assert_eq!(broker["status"], "fail", "{report}");
    let detail = broker["detail"].as_str().unwrap();
    assert!(detail.contains(&tls.broker) && detail.contains("certificate verify failed"), "{detail}");

    // Only the producer's CA is wrong: the readers connect, the producer is still probed.
    let mut c = kdedup(&tls, &topics, &dir.path().join("store"), &["check", "--json"]);
    tls_per_section(&mut c, &tls.ca);
    c.env("KDEDUP_KAFKA__PRODUCER__SSL_CA_LOCATION", &wrong);
    let out = exit_within(c.stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap(), Duration::from_secs(30));
    assert_eq!(out.status.code(), Some(1), "{}", String::from_utf8_lossy(&out.stderr));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let status = |name: &str| report["checks"].as_array().unwrap().iter().find(|c| c["name"] == name).cloned();
    assert_eq!(status("broker").unwrap()["status"], "ok", "{report}");
    let producer = status("producer").unwrap_or_else(|| panic!("no producer check: {report}"));
    assert_eq!(producer["status"], "fail", "{report}");
    assert!(producer["detail"].as_str().unwrap().contains("certificate verify failed"), "{producer}");
    let mut c = kdedup(&tls, &topics, &dir.path().join("store"), &["run"]);
    tls_per_section(&mut c, &tls.ca);
    c.env("KDEDUP_KAFKA__PRODUCER__SSL_CA_LOCATION", &wrong);
    let out = exit_within(c.stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap(), Duration::from_secs(30));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && stderr.contains("certificate verify failed"), "{stderr}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_passes_on_a_ready_tls_deployment_and_fails_naming_what_is_missing() {
    let Some(tls) = tls() else { return };
    let _turn = BROKER_TURN.lock().await;
    let topics = create_topics(&tls, 3).await;
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("store");

    let mut c = kdedup(&tls, &topics, &store, &["check", "--json"]);
    c.env("KDEDUP_KAFKA__CLIENT__SECURITY_PROTOCOL", "SSL").env("KDEDUP_KAFKA__CLIENT__SSL_CA_LOCATION", &tls.ca);
    let out = exit_within(c.stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap(), Duration::from_secs(60));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(out.status.code(), Some(0), "{report:#}");
    assert_eq!(report["ok"], true);
    let checks: BTreeMap<String, (String, String)> = report["checks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| (c["name"].as_str().unwrap().into(), (c["status"].to_string(), c["detail"].to_string())))
        .collect();
    for name in ["config", "broker", "topics", "partitioning", "store", "metrics"] {
        let (status, detail) = &checks[name];
        assert_eq!(status, "\"ok\"", "{name}: {detail}");
    }
    assert!(checks["broker"].1.contains("SSL"), "{:?}", checks["broker"]);
    assert!(checks["topics"].1.contains(&format!("{} (3 partitions)", topics.input)), "{:?}", checks["topics"]);
    assert!(checks["topics"].1.contains(&format!("{} (1 partition)", topics.dlq)), "{:?}", checks["topics"]);
    assert_eq!(report["settings"]["kafka"]["client"]["ssl.ca.location"], tls.ca.as_str());
    assert!(!store.exists(), "check must not create the embedded store");

    // The same config with an output topic nobody created, and the metrics port taken.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let missing = unique("never-created");
    let mut c = kdedup(&tls, &topics, &store, &["check"]);
    c.env("KDEDUP_KAFKA__CLIENT__SECURITY_PROTOCOL", "SSL")
        .env("KDEDUP_KAFKA__CLIENT__SSL_CA_LOCATION", &tls.ca)
        .env("KDEDUP_SINK__TOPIC", &missing)
        .env("KDEDUP_METRICS__LISTEN", taken.local_addr().unwrap().to_string());
    let out = exit_within(c.stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap(), Duration::from_secs(60));
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{text}");
    let line = |name: &str| text.lines().find(|l| l.contains(&format!("] {name} "))).unwrap_or("").to_string();
    assert!(line("broker").contains("[ ok ]"), "{text}");
    assert!(line("topics").contains("[FAIL]") && line("topics").contains(&missing), "{text}");
    assert!(line("partitioning").contains("[skip]"), "{text}");
    assert!(line("metrics").contains("[FAIL]") && line("metrics").contains("in use"), "{text}");
}

/// Known secret values: none may appear in any output.
const SASL_PASSWORD: &str = "kd-sasl-S3CRET-7f3a";
const KEY_PASSWORD: &str = "kd-key-S3CRET-91bc";
const PG_PASSWORD: &str = "kd-pg-S3CRET-22e1";

fn assert_no_secret(what: &str, text: &str) {
    for secret in [SASL_PASSWORD, KEY_PASSWORD, PG_PASSWORD] {
        assert!(!text.contains(secret), "{what} shows the secret {secret}:\n{text}");
    }
}

fn http_get(addr: &str, path: &str) -> String {
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    write!(s, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").unwrap();
    let mut body = String::new();
    s.read_to_string(&mut body).unwrap();
    body
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn secrets_never_reach_logs_errors_help_check_or_metrics() {
    let Some(tls) = tls() else { return };
    let _turn = BROKER_TURN.lock().await;
    let clients = tls.clients();
    let topics = create_topics(&tls, 1).await;
    let dir = tempfile::tempdir().unwrap();
    let secret = |name: &str, value: &str| {
        let path = dir.path().join(name);
        std::fs::write(&path, format!("{value}\n")).unwrap();
        path.display().to_string()
    };
    let sasl_file = secret("sasl-password", SASL_PASSWORD);
    // With PostgreSQL: a URL carrying a password (trust auth here accepts any), from a file.
    let postgres = std::env::var("KDEDUP_TEST_POSTGRES").ok().map(|url| {
        let with_password = url.replacen("://kdedup@", &format!("://kdedup:{PG_PASSWORD}@"), 1);
        assert_ne!(with_password, url, "KDEDUP_TEST_POSTGRES is postgres://kdedup@…");
        secret("pg-url", &with_password)
    });
    let store = dir.path().join("store");
    let with_secrets = |c: &mut Command| {
        c.env("KDEDUP_LOG", "debug")
            .env("KDEDUP_KAFKA__CLIENT__SSL_CA_LOCATION", &tls.ca)
            // librdkafka's own debug output, configuration included.
            .env("KDEDUP_KAFKA__CLIENT__DEBUG", "conf,security,broker")
            .env("KDEDUP_KAFKA__PRODUCER__SSL_KEY_PASSWORD", KEY_PASSWORD);
        if let Some(url_file) = &postgres {
            c.env("KDEDUP_STORE__KIND", "postgres").env("KDEDUP_STORE__URL_FILE", url_file);
        }
    };

    // --help, with every secret in the environment.
    let mut c = kdedup(&tls, &topics, &store, &["run", "--help"]);
    with_secrets(&mut c);
    c.env("KDEDUP_KAFKA__CLIENT__SASL_PASSWORD", SASL_PASSWORD);
    let out = c.output().unwrap();
    assert!(out.status.success());
    assert_no_secret("run --help", &String::from_utf8_lossy(&out.stdout));

    // A failing connection: TLS verifies, then SASL, which this listener does not offer, fails.
    let mut c = kdedup(&tls, &topics, &store, &["run"]);
    with_secrets(&mut c);
    c.env("KDEDUP_KAFKA__CLIENT__SECURITY_PROTOCOL", "SASL_SSL")
        .env("KDEDUP_KAFKA__CLIENT__SASL_MECHANISM", "PLAIN")
        .env("KDEDUP_KAFKA__CLIENT__SASL_USERNAME", "kdedup")
        .env("KDEDUP_KAFKA__CLIENT__SASL_PASSWORD_FILE", &sasl_file);
    let out = exit_within(c.stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap(), Duration::from_secs(60));
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(!out.status.success(), "SASL cannot succeed against this broker:\n{stderr}");
    assert!(stderr.contains("SASL"), "the failure says it was SASL:\n{stderr}");
    assert!(stderr.contains("librdkafka"), "librdkafka's debug output was captured too:\n{stderr}");
    assert_no_secret("a failed run's stdout", &stdout);
    assert_no_secret("a failed run's stderr", &stderr);

    // `check` prints the settings: redacted.
    let mut c = kdedup(&tls, &topics, &store, &["check"]);
    with_secrets(&mut c);
    c.env("KDEDUP_KAFKA__CLIENT__SECURITY_PROTOCOL", "SSL").env("KDEDUP_KAFKA__CLIENT__SASL_PASSWORD", SASL_PASSWORD);
    let out = exit_within(c.stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap(), Duration::from_secs(60));
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(
        stdout.contains("sasl.password: <redacted>") && stdout.contains("ssl.key.password: <redacted>"),
        "{stdout}"
    );
    assert_no_secret("check's stdout", &stdout);
    assert_no_secret("check's stderr", &stderr);

    // A succeeding connection (TLS; the SASL password is set but unused), at debug, with metrics.
    if postgres.is_some() {
        let mut c = kdedup(&tls, &topics, &store, &["schema", "apply"]);
        with_secrets(&mut c);
        let out = c.output().unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        assert_no_secret("schema apply", &format!("{out:?}"));
    }
    let metrics_addr = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().to_string()
    };
    let (records, ids) = events(100, 20, 1, 41);
    mock::produce_all(&clients, &topics.input, &records).await.unwrap();
    let mut c = kdedup(&tls, &topics, &store, &["run"]);
    with_secrets(&mut c);
    c.env("KDEDUP_KAFKA__CLIENT__SECURITY_PROTOCOL", "SSL")
        .env("KDEDUP_KAFKA__CLIENT__SASL_PASSWORD_FILE", &sasl_file)
        .env("KDEDUP_METRICS__LISTEN", &metrics_addr);
    let run = Running::spawn(c, dir.path().join("run.log"));
    let output = read_until_complete(&clients, &topics.output, &ids, Duration::from_secs(120), || run.logs()).await;
    assert_exactly_once(&output, &ids);
    let metrics = http_get(&metrics_addr, "/metrics");
    assert!(metrics.contains("kdedup_"), "{metrics}");
    assert_no_secret("/metrics", &metrics);
    let (status, logs) = run.terminate();
    assert!(status.success(), "{logs}");
    assert!(logs.contains("librdkafka"), "librdkafka's debug output was captured too");
    assert_no_secret("a succeeding run's stderr", &logs);
}
