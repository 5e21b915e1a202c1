//! What only the reference broker (Apache Kafka 4, scripts/services) can show: SASL/SCRAM-SHA-512
//! over SASL_SSL end to end with the real binary, and input from an independent transactional
//! producer (Kafka's own Java client) that aborts some of its transactions. Needs
//! KDEDUP_TEST_SASL_BROKER (with _USER, _PASSWORD and KDEDUP_TEST_TLS_CA) and
//! KDEDUP_TEST_KAFKA_LIB (Kafka's classpath, for scripts/servers/kafka/Client.java).

use std::collections::{BTreeMap, HashSet};
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use kdedup::kafka_client::KafkaClients;
use kdedup::mock;

use crate::utils::*;

struct Sasl {
    broker: String,
    user: String,
    password: String,
    ca: String,
}

fn sasl() -> Option<Sasl> {
    let var = |name| std::env::var(name).ok();
    match (
        var("KDEDUP_TEST_SASL_BROKER"),
        var("KDEDUP_TEST_SASL_USER"),
        var("KDEDUP_TEST_SASL_PASSWORD"),
        var("KDEDUP_TEST_TLS_CA"),
    ) {
        (Some(broker), Some(user), Some(password), Some(ca)) => Some(Sasl { broker, user, password, ca }),
        _ => {
            eprintln!(
                "skipped: KDEDUP_TEST_SASL_BROKER, _USER, _PASSWORD and KDEDUP_TEST_TLS_CA are not set \
                 (scripts/services starts Apache Kafka and prints them)"
            );
            None
        }
    }
}

impl Sasl {
    /// `[kafka.client]` for this listener, with `password`.
    fn properties(&self, password: &str) -> BTreeMap<String, String> {
        [
            ("security.protocol", "SASL_SSL"),
            ("ssl.ca.location", self.ca.as_str()),
            ("sasl.mechanism", "SCRAM-SHA-512"),
            ("sasl.username", self.user.as_str()),
            ("sasl.password", password),
        ]
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
    }

    fn clients(&self) -> KafkaClients {
        KafkaClients::with_client_properties(&self.broker, self.properties(&self.password))
    }

    /// `kdedup <args>` on the example config for `topics`, over SASL_SSL with the password in a
    /// file (as a deployment mounts it), an embedded store in `dir`.
    fn kdedup(&self, topics: &Topics, dir: &Path, password: &str, args: &[&str]) -> Command {
        let file = dir.join(format!("password-{}", password.len()));
        std::fs::write(&file, format!("{password}\n")).unwrap();
        let mut c = Command::new(BIN);
        c.args(args).args(["--config", "config/kdedup.toml"]).env("KDEDUP_LOG", "debug");
        topics
            .point(&mut c, &self.broker)
            .env("KDEDUP_STORE__KIND", "embedded")
            .env("KDEDUP_STORE__PATH", dir.join("store"))
            .env("KDEDUP_METRICS__LISTEN", "")
            .env("KDEDUP_PIPELINE__COMMIT_INTERVAL_MS", "200")
            .env("KDEDUP_KAFKA__CLIENT__SECURITY_PROTOCOL", "SASL_SSL")
            .env("KDEDUP_KAFKA__CLIENT__SSL_CA_LOCATION", &self.ca)
            .env("KDEDUP_KAFKA__CLIENT__SASL_MECHANISM", "SCRAM-SHA-512")
            .env("KDEDUP_KAFKA__CLIENT__SASL_USERNAME", &self.user)
            .env("KDEDUP_KAFKA__CLIENT__SASL_PASSWORD_FILE", &file);
        c.envs(Protocol::Classic.env().iter().copied());
        c
    }
}

async fn sasl_topics(sasl: &Sasl, partitions: i32) -> Topics {
    let t = Topics { input: unique("sin"), output: unique("sout"), dlq: unique("sdlq"), group: unique("sgroup") };
    mock::create_topics(sasl.clients(), &[(&t.input, partitions), (&t.output, partitions), (&t.dlq, 1)])
        .await
        .expect("topics are created over SASL_SSL");
    t
}

/// Runs `c` to its exit (within 60 s), its output captured.
fn finish(mut c: Command) -> Output {
    exit_within(c.stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap(), Duration::from_secs(60))
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sasl_scram_sha_512_right_credentials_run_check_and_replay_exactly() {
    let Some(sasl) = sasl() else { return };
    let _turn = BROKER_TURN.lock().await;
    let clients = sasl.clients();
    let topics = sasl_topics(&sasl, 2).await;
    let dir = tempfile::tempdir().unwrap();
    let secret = sasl.password.as_str();
    let (records, ids) = events(400, 100, 2, 71);
    mock::produce_all(&clients, &topics.input, &records).await.expect("input is produced over SASL_SSL");

    // check: every dependency answers, the settings are printed redacted.
    let out = finish(sasl.kdedup(&topics, dir.path(), secret, &["check", "--json"]));
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert_eq!(out.status.code(), Some(0), "{stdout}\n{stderr}");
    assert!(!stdout.contains(secret) && !stderr.contains(secret), "check shows the password:\n{stdout}\n{stderr}");
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["settings"]["kafka"]["client"]["sasl.password"], "<redacted>", "{report}");

    // run: the whole path exactly once, ready, and the password nowhere.
    let port = free_port();
    let log = dir.path().join("run.log");
    let mut c = sasl.kdedup(&topics, dir.path(), secret, &["run"]);
    c.env("KDEDUP_METRICS__LISTEN", format!("127.0.0.1:{port}"));
    let mut run = c.stdout(Stdio::null()).stderr(std::fs::File::create(&log).unwrap()).spawn().unwrap();
    let logs = || std::fs::read_to_string(&log).unwrap_or_default();
    let deadline = Instant::now() + Duration::from_secs(90);
    let output = loop {
        let output = mock::read_all(&clients, &topics.output).unwrap();
        if emitted_counts(&output).len() >= ids.len() {
            break output;
        }
        assert!(Instant::now() < deadline, "{} of {} events after 90 s\n{}", output.len(), ids.len(), logs());
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_exactly_once(&output, &ids);
    assert_eq!(http_get(port, "/readyz").map(|(status, _)| status), Some(200), "ready over SASL_SSL");
    let (_, metrics) = http_get(port, "/metrics").expect("/metrics answers");
    assert!(metrics.contains("kdedup_") && !metrics.contains(secret), "/metrics:\n{metrics}");
    let ends = mock::end_offsets(&clients, &topics.input).unwrap();
    wait_for("the commits to reach the ends", Duration::from_secs(60), || {
        let committed = mock::committed_offsets(&clients, &topics.group, &topics.input).unwrap();
        let done = ends.iter().all(|(p, end)| committed.get(p) == Some(end));
        async move { done }
    })
    .await;
    assert_eq!(unsafe { libc::kill(run.id() as i32, libc::SIGTERM) }, 0);
    let status = run.wait().unwrap();
    let logs = logs();
    assert!(status.success(), "kdedup run exited {status}:\n{logs}");
    assert!(logs.contains("partitions assigned"), "{logs}");
    assert!(!logs.contains(secret), "the run's log shows the password");

    // replay: the range read over SASL_SSL, every record now handled: each event's first
    // copy done at its own position, the later copies duplicates.
    let out = finish(sasl.kdedup(&topics, dir.path(), secret, &["replay", "--from-offset", "0", "--to-end", "--json"]));
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert_eq!(out.status.code(), Some(0), "{stdout}\n{stderr}");
    assert!(!stdout.contains(secret) && !stderr.contains(secret), "replay shows the password");
    let report: serde_json::Value = serde_json::from_str(stdout.lines().last().unwrap()).unwrap();
    assert_eq!(
        [&report["records"], &report["new"], &report["done"], &report["duplicate"]],
        [500, 0, 400, 100],
        "{report}"
    );

    // A panic message that formats the config (Debug) does not carry the password either.
    let config = kdedup::config::Config::from_toml_with_env(
        &std::fs::read_to_string("config/kdedup.toml").unwrap(),
        "config/kdedup.toml",
        [("KDEDUP_KAFKA__CLIENT__SASL_PASSWORD".to_string(), secret.to_string())],
    )
    .unwrap();
    assert!(!format!("{config:?}").contains(secret), "Config's Debug shows the password");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_sasl_password_fails_naming_mechanism_and_listener_never_ready_exit_2() {
    let Some(sasl) = sasl() else { return };
    let _turn = BROKER_TURN.lock().await;
    let topics = sasl_topics(&sasl, 1).await;
    let dir = tempfile::tempdir().unwrap();
    let wrong = "kd-wrong-SCRAM-pw-5d1e";
    let listener = format!("sasl_ssl://{}", sasl.broker);
    let says_what = |text: &str| text.contains("SCRAM-SHA-512") && text.contains(&listener);

    // run: exits 2 (documented in `run --help`), never ready, the error names mechanism and listener.
    let port = free_port();
    let mut c = sasl.kdedup(&topics, dir.path(), wrong, &["run"]);
    c.env("KDEDUP_METRICS__LISTEN", format!("127.0.0.1:{port}"));
    let mut child = c.stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut ready_answers = 0;
    while child.try_wait().unwrap().is_none() {
        // 503 while it runs (tiny_http may answer 500 while the server shuts down): never 200.
        if let Some((status, _)) = http_get(port, "/readyz") {
            assert_ne!(status, 200, "ready with a wrong password");
            ready_answers += 1;
        }
        assert!(Instant::now() < deadline, "kdedup run still running 60 s after a SASL failure");
        std::thread::sleep(Duration::from_millis(20)); // polling readiness and the exit
    }
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    eprintln!("/readyz answered {ready_answers} times before the exit, never ready");
    let last = stderr.lines().rfind(|l| l.starts_with("error:")).unwrap_or_else(|| panic!("no error line:\n{stderr}"));
    assert!(says_what(last), "the error names the mechanism and the listener: {last}");
    assert!(!stderr.contains(wrong) && !String::from_utf8_lossy(&out.stdout).contains(wrong), "{stderr}");
    let help = Command::new(BIN).args(["run", "--help"]).output().unwrap();
    assert!(String::from_utf8_lossy(&help.stdout).contains("exits 2"), "`run --help` documents the exit code");

    // check: the broker check fails with the same words, exit 1.
    let out = finish(sasl.kdedup(&topics, dir.path(), wrong, &["check", "--json"]));
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert_eq!(out.status.code(), Some(1), "{stdout}\n{stderr}");
    assert!(!stdout.contains(wrong) && !stderr.contains(wrong), "check shows the password");
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let broker = report["checks"].as_array().unwrap().iter().find(|c| c["name"] == "broker").unwrap().clone();
    assert_eq!(broker["status"], "fail", "{report}");
    assert!(says_what(broker["detail"].as_str().unwrap()), "{broker}");

    // replay: broker unreachable, exit 3 (documented in `replay --help`).
    let out = finish(sasl.kdedup(&topics, dir.path(), wrong, &["replay", "--from-offset", "0"]));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(3), "{stderr}");
    assert!(says_what(&stderr), "{stderr}");
    assert!(!stderr.contains(wrong), "replay shows the password");
}

// ---------------------------------------------------------------------------
// Transactional input

/// Runs scripts/servers/kafka/Client.java (Kafka's own Java client) with `args`; its stdout.
fn java_client(args: &[&str]) -> Option<String> {
    let Ok(lib) = std::env::var("KDEDUP_TEST_KAFKA_LIB") else {
        eprintln!("skipped: KDEDUP_TEST_KAFKA_LIB is not set (scripts/services resolves Kafka's classpath)");
        return None;
    };
    let out = Command::new("java")
        .arg("-cp")
        .arg(format!("{lib}/*"))
        .arg("-Dlog4j2.configurationFile=scripts/servers/kafka/log4j2.properties")
        .arg("-Dkdedup.log.level=warn")
        .arg("scripts/servers/kafka/Client.java")
        .args(args)
        .output()
        .expect("java runs (scripts/services installs it)");
    assert!(out.status.success(), "Client.java {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    Some(String::from_utf8(out.stdout).unwrap())
}

/// An independent transactional producer writes 150 one-record transactions and aborts every
/// third (the last one too). The group emits every committed event exactly once and no aborted
/// one, and commits each partition to its very end, past the transaction markers (Kafka's own
/// admin client says so). Then `replay --to-end` reads the committed records only,
/// `replay --from-committed` finds nothing left, and an explicit end past the ends stops there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transactional_input_committed_once_aborted_never_commits_reach_the_end() {
    let Some(env) = group_env() else { return };
    let _turn = BROKER_TURN.lock().await;
    let topics = Topics::create(&env.brokers, &env.postgres, 2).await;
    let prefix = unique("txn");
    let Some(committed_ids) = java_client(&["transactions", &env.brokers, &topics.input, &prefix, "150", "3"]) else {
        return;
    };
    let committed_ids: HashSet<String> = committed_ids.lines().map(str::to_string).collect();
    assert_eq!(committed_ids.len(), 100, "the producer committed two of every three");
    let ends = mock::end_offsets(env.brokers.as_str(), &topics.input).unwrap();
    assert_eq!(ends.values().sum::<i64>(), 300, "150 records and 150 transaction markers");

    let logs = LogDir::new();
    let member = Member::spawn(&env.brokers, &env.postgres, &topics, logs.path(), 0, &[]);
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let committed = mock::committed_offsets(env.brokers.as_str(), &topics.group, &topics.input).unwrap();
        if ends.iter().all(|(p, end)| committed.get(p) == Some(end)) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "commits did not reach the ends past the transaction markers: committed {committed:?}, ends {ends:?}\n{}",
            member_logs(logs.path())
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Kafka's own admin client agrees: committed = end, per partition.
    let answer = java_client(&["committed", &env.brokers, &topics.group, &topics.input]).unwrap();
    for line in answer.lines() {
        let v: Vec<i64> = line.split_whitespace().map(|n| n.parse().unwrap()).collect();
        assert_eq!(v[1], v[2], "partition {}: committed {} but the end is {}", v[0], v[1], v[2]);
    }
    assert!(member.terminate().success(), "{}", member_logs(logs.path()));

    let output = mock::read_all(env.brokers.as_str(), &topics.output).unwrap();
    let ids: Vec<String> = committed_ids.iter().cloned().collect();
    assert_exactly_once(&output, &ids);

    let replay = |args: &[&str]| {
        let mut replay = Command::new(BIN);
        replay.args(["replay", "--config", "config/kdedup.toml", "--json"]).args(args);
        let out = topics
            .point(&mut replay, &env.brokers)
            .env("KDEDUP_STORE__KIND", "postgres")
            .env("KDEDUP_STORE__URL", &env.postgres)
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout).to_string();
        assert_eq!(out.status.code(), Some(0), "replay {args:?}: {stdout}\n{}", String::from_utf8_lossy(&out.stderr));
        serde_json::from_str::<serde_json::Value>(stdout.lines().last().unwrap()).unwrap()
    };
    let whole = tokio::task::block_in_place(|| replay(&["--from-offset", "0", "--to-end"]));
    assert_eq!([&whole["records"], &whole["new"], &whole["done"], &whole["duplicate"]], [100, 0, 100, 0], "{whole}");
    let rest = tokio::task::block_in_place(|| replay(&["--from-committed"]));
    assert_eq!(rest["records"], 0, "{rest}");
    // An explicit end past the partitions' ends ends at them (nothing waits for records that
    // are not there): each partition's range is cut at its end offset.
    let beyond = tokio::task::block_in_place(|| replay(&["--from-offset", "0", "--to-offset", "1000000"]));
    assert_eq!(beyond["records"], 100, "{beyond}");
    for p in beyond["partitions"].as_array().unwrap() {
        let partition = p["partition"].as_i64().unwrap() as i32;
        assert_eq!(p["to"].as_i64(), Some(ends[&partition]), "{beyond}");
    }
}
