//! Helpers: unique names, a pipeline running in the background with a stop
//! button, conditions awaited (never slept on), output checks.

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use kdedup::config::Config;
use kdedup::metrics::Metrics;
use kdedup::mock::{self, Consumed, MockKafka, Produce};
use kdedup::service::RunOptions;
use kdedup::sink::kafka::headers;
use kdedup::source::StopMode;
use kdedup::testkit::{self, Faults};
use tokio::sync::oneshot;

pub const INPUT: &str = "in";
pub const OUTPUT: &str = "out";
pub const DLQ: &str = "dlq";

static COUNTER: AtomicU64 = AtomicU64::new(0);

pub fn unique(prefix: &str) -> String {
    format!("{prefix}-{}-{}", std::process::id(), COUNTER.fetch_add(1, Ordering::Relaxed))
}

/// A mock cluster with the three topics.
pub fn cluster(partitions: i32) -> MockKafka {
    let kafka = MockKafka::start(3).expect("mock cluster");
    kafka.create_topic(INPUT, partitions).unwrap();
    kafka.create_topic(OUTPUT, partitions).unwrap();
    kafka.create_topic(DLQ, 1).unwrap();
    kafka
}

/// A config for the test topics; `env` holds KDEDUP_… overrides, as a user would set them.
pub fn config(kafka: &MockKafka, group: &str, store: &Path, env: &[(&str, &str)]) -> Config {
    config_for(kafka.bootstrap(), [INPUT, OUTPUT, DLQ], group, store, env)
}

/// [`config`] for any brokers and topics: `[input, output, dead letters]`.
pub fn config_for(brokers: &str, topics: [&str; 3], group: &str, store: &Path, env: &[(&str, &str)]) -> Config {
    let [input, output, dlq] = topics;
    let text = format!(
        r#"
[kafka]
brokers = "{brokers}"
group_id = "{group}"
topics = ["{input}"]
[store]
path = "{}"
[filter]
expected_keys = 100000
[sink]
kind = "kafka"
topic = "{output}"
[dead_letter]
topic = "{dlq}"
[metrics]
listen = ""
[pipeline]
commit_interval_ms = 100
[kafka.consumer]
# The mock cluster holds a departed member until its session times out before
# it lets a new member in (45 s by default): tests restart members often.
"session.timeout.ms" = 3000
"heartbeat.interval.ms" = 500
"#,
        store.display()
    );
    Config::from_toml_with_env(&text, "test config", env.iter().map(|(k, v)| (k.to_string(), v.to_string())))
        .expect("test config is valid")
}

/// A pipeline running in the background.
pub struct Running {
    pub metrics: Metrics,
    stop: Option<oneshot::Sender<StopMode>>,
    handle: tokio::task::JoinHandle<anyhow::Result<()>>,
}

/// Logs to the test's output when KDEDUP_TEST_LOG is set (e.g. `kdedup=debug`).
fn init_logs() {
    if let Ok(filter) = std::env::var("KDEDUP_TEST_LOG") {
        let _ = tracing_subscriber::fmt().with_env_filter(filter).with_test_writer().try_init();
    }
}

pub fn start(config: Config, faults: Faults) -> Running {
    start_faulty(config, RunOptions::default(), faults)
}

/// [`start`], serving `[metrics] listen` too, for tests that read `/metrics` as Prometheus would.
pub fn start_serving(config: Config) -> Running {
    start_with(config, RunOptions { serve_metrics: true, ..RunOptions::default() })
}

/// [`start`] with options of the caller's (a custom sink, serving metrics); metrics are always the run's own.
pub fn start_with(config: Config, options: RunOptions) -> Running {
    start_faulty(config, options, Faults::default())
}

/// [`start_with`], with `faults` armed around the configured sink.
pub fn start_faulty(config: Config, options: RunOptions, faults: Faults) -> Running {
    init_logs();
    let metrics = Metrics::new();
    let options = RunOptions { metrics: metrics.clone(), ..options };
    let (tx, rx) = oneshot::channel();
    let handle = tokio::spawn(async move {
        let shutdown = async move { rx.await.unwrap_or(StopMode::Abandon) };
        testkit::run(&config, options, faults, shutdown).await
    });
    Running { metrics, stop: Some(tx), handle }
}

impl Running {
    pub async fn stop(mut self, mode: StopMode) {
        let _ = self.stop.take().expect("stopped once").send(mode);
        self.handle.await.expect("run task").expect("run ended cleanly");
    }

    /// Waits for the run to end by itself (a fatal error), without asking it to stop.
    pub async fn ended(mut self) -> anyhow::Result<()> {
        let _not_asked = self.stop.take();
        self.handle.await.expect("run task")
    }
}

/// Awaits `cond`, checking every 10 ms; panics with `what` after `limit`.
pub async fn wait_for<F, Fut>(what: &str, limit: Duration, mut cond: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = Instant::now() + limit;
    while !cond().await {
        assert!(Instant::now() < deadline, "timed out after {limit:?} waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Waits until the pipeline has committed every partition's end offset.
pub async fn wait_all_committed(kafka: &MockKafka, metrics: &Metrics) {
    let ends = mock::end_offsets(kafka.bootstrap(), INPUT).unwrap();
    let m = metrics.clone();
    wait_for("commits to reach the end offsets", Duration::from_secs(90), move || {
        let done = ends
            .iter()
            .all(|(p, end)| *end == 0 || m.committed_offset.with_label_values(&[INPUT, &p.to_string()]).get() >= *end);
        async move { done }
    })
    .await;
}

/// Events `evt-0..n` spread over partitions by ID, with `dups` duplicates:
/// half right after their original, half far back. Same ID, same payload.
/// Every copy on its original's partition; [`events_crossing`] moves some.
pub fn events(n: usize, dups: usize, partitions: i32, seed: u64) -> (Vec<Produce>, Vec<String>) {
    events_crossing(n, dups, partitions, seed, 0.0)
}

/// [`events`], with a share `cross_partition_rate` of the duplicates on a
/// random other partition than their original, under a random record key (a
/// resend through another producer): in a group, that copy reaches another
/// member, the case the shared store exists for.
pub fn events_crossing(
    n: usize,
    dups: usize,
    partitions: i32,
    seed: u64,
    cross_partition_rate: f64,
) -> (Vec<Produce>, Vec<String>) {
    use rand::{Rng, SeedableRng};
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let ids: Vec<String> = (0..n).map(|i| format!("evt-{i:06}")).collect();
    let record = |i: usize| Produce {
        partition: (i % partitions as usize) as i32,
        key: Some(ids[i].clone().into_bytes()),
        payload: Some(format!(r#"{{"id":"{}","n":{i}}}"#, ids[i]).into_bytes()),
        headers: vec![("event-id".into(), ids[i].clone().into_bytes())],
    };
    let mut out: Vec<Produce> = (0..n).map(record).collect();
    for d in 0..dups {
        let len = out.len();
        let (at, i) = if d % 2 == 0 {
            // adjacent: right after a random record
            let at = rng.random_range(1..len);
            let id = &out[at - 1].headers[0].1;
            (at, std::str::from_utf8(&id[4..]).unwrap().parse().unwrap_or(0))
        } else {
            // far: a copy of an early event near the end
            (rng.random_range(len * 3 / 4..len), rng.random_range(0..n / 4))
        };
        let mut copy = record(i);
        if partitions > 1 && cross_partition_rate > 0.0 && rng.random_bool(cross_partition_rate) {
            copy.partition = mock::other_partition(&mut rng, copy.partition, partitions);
            copy.key = Some(format!("{:016x}", rng.random::<u64>()).into_bytes());
        }
        out.insert(at, copy);
    }
    (out, ids)
}

/// How many records of `records` sit on another partition than their ID's
/// first record: the cross-partition duplicates.
pub fn cross_partition_copies(records: &[Produce]) -> usize {
    let mut home: HashMap<&[u8], i32> = HashMap::new();
    records
        .iter()
        .filter(|r| {
            r.headers.first().is_some_and(|(_, id)| *home.entry(id.as_slice()).or_insert(r.partition) != r.partition)
        })
        .count()
}

/// Per event ID, how often it appears in the output.
pub fn emitted_counts(output: &[Consumed]) -> HashMap<String, usize> {
    let mut counts = HashMap::new();
    for r in output {
        let id = r.header_str(headers::EVENT_ID).expect("output carries the event ID").to_string();
        *counts.entry(id).or_insert(0) += 1;
    }
    counts
}

/// A written record as `out P/O <- src P/O [marked]`: where to look in the member logs.
pub fn describe(r: &Consumed) -> String {
    let src = |h| r.header_str(h).unwrap_or("?");
    let marked = r.header_str(headers::POSSIBLE_REPEAT) == Some("true");
    format!(
        "out {}/{} <- src {}/{}{}",
        r.partition,
        r.offset,
        src(headers::SOURCE_PARTITION),
        src(headers::SOURCE_OFFSET),
        if marked { " marked" } else { "" }
    )
}

/// Asserts every ID in `ids` was emitted exactly once and nothing else was.
pub fn assert_exactly_once(output: &[Consumed], ids: &[String]) {
    let counts = emitted_counts(output);
    let missing: Vec<&String> = ids.iter().filter(|id| !counts.contains_key(*id)).collect();
    let twice: Vec<(&String, &usize)> = counts.iter().filter(|(_, c)| **c > 1).collect();
    assert!(missing.is_empty(), "{} events lost, e.g. {:?}", missing.len(), &missing[..missing.len().min(5)]);
    if !twice.is_empty() {
        // Each copy as `out P/O <- src P/O [marked]`: where to look in the member logs.
        let mut examples: Vec<String> = twice.iter().map(|(id, _)| (*id).clone()).collect();
        examples.sort();
        examples.truncate(5);
        let copies = |id: &String| {
            output
                .iter()
                .filter(|r| r.header_str(headers::EVENT_ID) == Some(id))
                .map(describe)
                .collect::<Vec<_>>()
                .join(", ")
        };
        let marked = output.iter().filter(|r| r.header_str(headers::POSSIBLE_REPEAT) == Some("true")).count();
        let examples: Vec<String> = examples.iter().map(|id| format!("{id}: [{}]", copies(id))).collect();
        panic!(
            "{} events emitted more than once ({marked} output records marked kdedup-possible-repeat), e.g. {}",
            twice.len(),
            examples.join("; ")
        );
    }
    assert_eq!(counts.len(), ids.len(), "unexpected events in the output");
}

/// Asserts each source partition's records appear in the output in source-offset order.
pub fn assert_input_order(output: &[Consumed]) {
    let mut last: BTreeMap<i64, i64> = BTreeMap::new();
    for r in output {
        let p: i64 = r.header_str(headers::SOURCE_PARTITION).unwrap().parse().unwrap();
        let o: i64 = r.header_str(headers::SOURCE_OFFSET).unwrap().parse().unwrap();
        if let Some(prev) = last.insert(p, o) {
            assert!(prev < o, "source partition {p}: offset {o} emitted after {prev}");
        }
    }
}

/// Outcome counters sum to the records consumed.
pub fn assert_outcomes_sum(metrics: &Metrics) {
    let sum: u64 = kdedup::metrics::OUTCOMES.iter().map(|o| metrics.outcome(o)).sum();
    assert_eq!(sum, metrics.consumed.get(), "outcomes must account for every consumed record");
}

// ---------------------------------------------------------------------------
// Real `kdedup run` processes on a real broker (Apache Kafka, scripts/services), and a
// private PostgreSQL server for tests that stop it.

pub const BIN: &str = env!("CARGO_BIN_EXE_kdedup");

/// The tests on the shared broker each run several processes: one at a time.
pub static BROKER_TURN: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// The shared services, from the environment (`scripts/services env` prints them).
pub struct GroupEnv {
    pub brokers: String,
    pub postgres: String,
}

pub fn group_env() -> Option<GroupEnv> {
    match (std::env::var("KDEDUP_TEST_BROKER"), std::env::var("KDEDUP_TEST_POSTGRES")) {
        (Ok(brokers), Ok(postgres)) => Some(GroupEnv { brokers, postgres }),
        _ => {
            eprintln!("skipped: KDEDUP_TEST_BROKER and KDEDUP_TEST_POSTGRES are not both set (scripts/test sets them)");
            None
        }
    }
}

/// Topic names of one test, unique on the shared broker.
pub struct Topics {
    pub input: String,
    pub output: String,
    pub dlq: String,
    pub group: String,
}

impl Topics {
    /// Points `cmd` (a `kdedup` command on the example config) at `brokers` and these topics,
    /// with the group as the key scope: the shared store outlives tests, so a scope per test
    /// keeps their keys apart.
    pub fn point<'c>(&self, cmd: &'c mut std::process::Command, brokers: &str) -> &'c mut std::process::Command {
        cmd.env("KDEDUP_KAFKA__BROKERS", brokers)
            .env("KDEDUP_KAFKA__GROUP_ID", &self.group)
            .env("KDEDUP_KEY__SCOPE", &self.group)
            .env("KDEDUP_KAFKA__TOPICS", &self.input)
            .env("KDEDUP_SINK__TOPIC", &self.output)
            .env("KDEDUP_DEAD_LETTER__TOPIC", &self.dlq)
    }

    /// Creates the topics, and the store's table at `store_url` the way an operator would.
    pub async fn create(brokers: &str, store_url: &str, partitions: i32) -> Topics {
        let t = Topics { input: unique("in"), output: unique("out"), dlq: unique("dlq"), group: unique("group") };
        mock::create_topics(brokers, &[(&t.input, partitions), (&t.output, partitions), (&t.dlq, 1)]).await.unwrap();
        let applied = std::process::Command::new(BIN)
            .args(["schema", "apply", "--config", "config/kdedup.toml"])
            .env("KDEDUP_STORE__KIND", "postgres")
            .env("KDEDUP_STORE__URL", store_url)
            .output()
            .unwrap();
        assert!(applied.status.success(), "schema apply: {}", String::from_utf8_lossy(&applied.stderr));
        t
    }
}

const GROUP_PROTOCOL: &str = "KDEDUP_KAFKA__CONSUMER__GROUP_PROTOCOL";

/// The consumer group protocol the members speak.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    /// The classic protocol: the members assign; the session is the client's, 2000 ms with
    /// heartbeats every 500 ms here (test settings: the test broker's floor is lowered for them).
    Classic,
    /// KIP-848 (`group.protocol = "consumer"`): the broker assigns and keeps the session,
    /// 2000 / 500 ms on the test broker too (its group.consumer.* settings, scripts/services).
    Consumer,
}

impl Protocol {
    /// The `KDEDUP_…` variables that choose it ([`Member::spawn`] takes them as `extra`).
    pub fn env(self) -> &'static [(&'static str, &'static str)] {
        match self {
            Protocol::Classic => &[
                (GROUP_PROTOCOL, "classic"),
                ("KDEDUP_KAFKA__CONSUMER__SESSION_TIMEOUT_MS", "2000"),
                ("KDEDUP_KAFKA__CONSUMER__HEARTBEAT_INTERVAL_MS", "500"),
            ],
            Protocol::Consumer => &[(GROUP_PROTOCOL, "consumer")],
        }
    }
}

/// One `kdedup run` process; its logs go to `member-N.log` in `logs`.
pub struct Member {
    child: std::process::Child,
    pub n: usize,
}

impl Member {
    /// A member with the group tests' settings; `extra` overrides or adds `KDEDUP_…` variables
    /// (the classic protocol unless it holds a [`Protocol::env`]).
    pub fn spawn(
        brokers: &str,
        store_url: &str,
        topics: &Topics,
        logs: &Path,
        n: usize,
        extra: &[(&str, &str)],
    ) -> Member {
        let log = std::fs::File::create(logs.join(format!("member-{n}.log"))).unwrap();
        let level = std::env::var("KDEDUP_TEST_LOG").unwrap_or_else(|_| "kdedup=info".into());
        let mut cmd = std::process::Command::new(BIN);
        cmd.args(["run", "--config", "config/kdedup.toml"]).env("KDEDUP_LOG", level);
        topics
            .point(&mut cmd, brokers)
            .env("KDEDUP_STORE__KIND", "postgres")
            .env("KDEDUP_STORE__URL", store_url)
            .env("KDEDUP_STORE__LEASE_SECS", "5")
            .env("KDEDUP_METRICS__LISTEN", "")
            .env("KDEDUP_PIPELINE__COMMIT_INTERVAL_MS", "200");
        if !extra.iter().any(|(k, _)| *k == GROUP_PROTOCOL) {
            cmd.envs(Protocol::Classic.env().iter().copied());
        }
        for (k, v) in extra {
            cmd.env(k, v);
        }
        let child = cmd.stdout(std::process::Stdio::null()).stderr(log).spawn().unwrap();
        Member { child, n }
    }

    pub fn signal(&self, signal: i32) {
        // SAFETY: kill(2) on our own child's pid; the child is not reaped before `self` is dropped.
        assert_eq!(unsafe { libc::kill(self.child.id() as i32, signal) }, 0, "signal {signal} to member {}", self.n);
    }

    /// SIGKILL, and reap.
    pub fn kill(mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }

    /// Waits for the exit until `deadline`: the exit code, or `None` if a signal
    /// ended it or it was still running (then it is SIGKILLed).
    pub fn wait_until(mut self, deadline: Instant) -> Option<i32> {
        loop {
            match self.child.try_wait().unwrap() {
                Some(status) => return status.code(),
                None if Instant::now() >= deadline => {
                    eprintln!("member {} did not exit in time; SIGKILL", self.n);
                    return None;
                }
                None => std::thread::sleep(Duration::from_millis(50)),
            }
        }
    }

    /// SIGTERM (a graceful stop), and its exit status.
    pub fn terminate(mut self) -> std::process::ExitStatus {
        self.signal(libc::SIGCONT); // a stopped process does not act on SIGTERM
        self.signal(libc::SIGTERM);
        self.child.wait().unwrap()
    }
}

impl Drop for Member {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A temporary directory for member logs that is kept (and its path printed)
/// when the test panics, so a failure's logs can be read afterwards.
pub struct LogDir(Option<tempfile::TempDir>);

impl LogDir {
    pub fn new() -> LogDir {
        LogDir(Some(tempfile::tempdir().unwrap()))
    }

    pub fn path(&self) -> &Path {
        self.0.as_ref().expect("present until dropped").path()
    }
}

impl Drop for LogDir {
    fn drop(&mut self) {
        if let (true, Some(dir)) = (std::thread::panicking(), self.0.take()) {
            eprintln!("member logs kept in {}", dir.keep().display());
        }
    }
}

/// Every member log of a test, for a failure message.
pub fn member_logs(logs: &Path) -> String {
    let mut all = String::new();
    for entry in std::fs::read_dir(logs).unwrap() {
        let path = entry.unwrap().path();
        all += &format!("--- {}\n{}", path.display(), std::fs::read_to_string(&path).unwrap_or_default());
    }
    all
}

/// Reads a member's `kdedup_assigned_partitions` from its metrics endpoint.
pub fn owned_partitions(port: u16) -> Option<i64> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect_timeout(&([127, 0, 0, 1], port).into(), Duration::from_secs(1)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    s.write_all(b"GET /metrics HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").ok()?;
    let mut body = String::new();
    s.read_to_string(&mut body).ok()?;
    body.lines().find_map(|l| l.strip_prefix("kdedup_assigned_partitions ")).and_then(|v| v.trim().parse().ok())
}

/// A throwaway PostgreSQL server on a free loopback port, for tests that stop it
/// (never the shared one). `initdb` + `pg_ctl` take about a second.
pub struct PrivatePostgres {
    bin: std::path::PathBuf,
    data: tempfile::TempDir,
    port: u16,
}

/// The certificates of a TLS-only [`PrivatePostgres`] (see `start_tls`).
pub struct PgTlsFiles {
    /// The CA that signed the server's certificate (for 127.0.0.1).
    pub ca: std::path::PathBuf,
    /// Another CA, which signed nothing the server holds.
    pub wrong_ca: std::path::PathBuf,
}

impl PrivatePostgres {
    pub fn start() -> Option<PrivatePostgres> {
        PrivatePostgres::start_with(false).map(|(pg, _)| pg)
    }

    /// A server that speaks only TLS on 127.0.0.1 (`hostnossl … reject`), with a
    /// throwaway CA and server certificate made by Debian's `openssl`; `None`
    /// when the PostgreSQL binaries are absent.
    pub fn start_tls() -> Option<(PrivatePostgres, PgTlsFiles)> {
        PrivatePostgres::start_with(true).map(|(pg, files)| (pg, files.expect("made when TLS is asked for")))
    }

    fn start_with(tls: bool) -> Option<(PrivatePostgres, Option<PgTlsFiles>)> {
        let bin = std::fs::read_dir("/usr/lib/postgresql")
            .ok()?
            .filter_map(|e| e.ok())
            .map(|e| e.path().join("bin"))
            .max()?;
        let data = tempfile::tempdir().ok()?;
        let root = unsafe { libc::geteuid() } == 0;
        if root {
            // The server refuses to run as root: it runs as the `postgres` user.
            std::process::Command::new("chown").args(["-R", "postgres"]).arg(data.path()).status().ok()?;
        }
        let port = std::net::TcpListener::bind("127.0.0.1:0").ok()?.local_addr().ok()?.port();
        let pg = PrivatePostgres { bin, data, port };
        assert!(pg.run("initdb", &["-D", &pg.dir(), "-U", "kdedup", "--auth=trust"]), "initdb failed");
        let files = tls.then(|| pg.make_tls_only(root));
        pg.up();
        Some((pg, files))
    }

    /// Certificates in `<tmp>/tls` (the key 0600 and the server's own), `ssl = on`, and a
    /// pg_hba.conf that takes TLS from 127.0.0.1 and refuses plain TCP.
    fn make_tls_only(&self, root: bool) -> PgTlsFiles {
        let dir = self.data.path().join("tls");
        std::fs::create_dir(&dir).unwrap();
        let openssl = |args: &[&str]| {
            let out = std::process::Command::new("openssl").args(args).current_dir(&dir).output().unwrap();
            assert!(out.status.success(), "openssl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        };
        for (name, cn) in [("ca", "kdedup test CA"), ("wrong-ca", "kdedup wrong CA")] {
            let (key, pem, subject) = (format!("{name}.key"), format!("{name}.pem"), format!("/CN={cn}"));
            openssl(&[
                "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", &subject, "-keyout", &key,
                "-out", &pem,
            ]);
        }
        std::fs::write(dir.join("server.ext"), "subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth\n").unwrap();
        openssl(&[
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-subj",
            "/CN=127.0.0.1",
            "-keyout",
            "server.key",
            "-out",
            "server.csr",
        ]);
        openssl(&[
            "x509",
            "-req",
            "-in",
            "server.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-days",
            "2",
            "-extfile",
            "server.ext",
            "-out",
            "server.pem",
        ]);
        // The server refuses a key others may read; as root, the server runs as `postgres`.
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(dir.join("server.key"), std::fs::Permissions::from_mode(0o600)).unwrap();
        if root {
            let chown = std::process::Command::new("chown").args(["-R", "postgres"]).arg(&dir).status().unwrap();
            assert!(chown.success(), "chown of the TLS files");
        }
        let conf = std::path::Path::new(&self.dir()).join("postgresql.conf");
        let mut text = std::fs::read_to_string(&conf).unwrap();
        text.push_str(&format!(
            "\nssl = on\nssl_cert_file = '{}'\nssl_key_file = '{}'\n",
            dir.join("server.pem").display(),
            dir.join("server.key").display()
        ));
        std::fs::write(&conf, text).unwrap();
        let hba = "local all all trust\nhostssl all all 127.0.0.1/32 trust\nhostnossl all all 127.0.0.1/32 reject\n";
        std::fs::write(std::path::Path::new(&self.dir()).join("pg_hba.conf"), hba).unwrap();
        PgTlsFiles { ca: dir.join("ca.pem"), wrong_ca: dir.join("wrong-ca.pem") }
    }

    fn dir(&self) -> String {
        self.data.path().join("pgdata").display().to_string()
    }

    fn run(&self, tool: &str, args: &[&str]) -> bool {
        let exe = self.bin.join(tool);
        let mut cmd = if unsafe { libc::geteuid() } == 0 {
            let mut c = std::process::Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(&exe);
            c
        } else {
            std::process::Command::new(&exe)
        };
        cmd.args(args).stdout(std::process::Stdio::null()).stderr(std::process::Stdio::null());
        cmd.status().map(|s| s.success()).unwrap_or(false)
    }

    /// Starts the server and waits until it accepts connections (`pg_ctl -w`).
    pub fn up(&self) {
        let options =
            format!("-c listen_addresses=127.0.0.1 -p {} -c unix_socket_directories={}", self.port, self.dir());
        assert!(self.run("pg_ctl", &["-D", &self.dir(), "-w", "-o", &options, "start"]), "pg_ctl start failed");
    }

    /// Stops the server at once (`-m immediate`: a crash as clients see it).
    pub fn down(&self) {
        assert!(self.run("pg_ctl", &["-D", &self.dir(), "-m", "immediate", "-w", "stop"]), "pg_ctl stop failed");
    }

    pub fn url(&self) -> String {
        format!("postgres://kdedup@127.0.0.1:{}/postgres", self.port)
    }
}

impl Drop for PrivatePostgres {
    fn drop(&mut self) {
        self.run("pg_ctl", &["-D", &self.dir(), "-m", "immediate", "stop"]);
    }
}

/// Waits for a child that should exit by itself; kills it and fails past `limit`.
pub fn exit_within(mut child: std::process::Child, limit: Duration) -> std::process::Output {
    let deadline = Instant::now() + limit;
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            let out = child.wait_with_output().unwrap();
            panic!("still running after {limit:?}; stderr:\n{}", String::from_utf8_lossy(&out.stderr));
        }
        std::thread::sleep(Duration::from_millis(50)); // polling the exit, not synchronising
    }
    child.wait_with_output().unwrap()
}

/// A minimal HTTP/1.0 GET on loopback: (status, body), or None if nothing answers yet.
pub fn http_get(port: u16, path: &str) -> Option<(u16, String)> {
    use std::io::{BufRead, BufReader, Read, Write};
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
    write!(stream, "GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").ok()?;
    let mut reader = BufReader::new(stream);
    let mut status_line = String::new();
    reader.read_line(&mut status_line).ok()?;
    let status = status_line.split_whitespace().nth(1)?.parse().ok()?;
    let mut rest = String::new();
    reader.read_to_string(&mut rest).ok()?;
    let body = rest.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default();
    Some((status, body))
}

/// Apache Cassandra's native CQL address when KDEDUP_TEST_CASSANDRA names it
/// (`scripts/services up` starts the node, `scripts/services env` sets it);
/// otherwise `None`, after saying that `test` was skipped and why.
pub fn cassandra(test: &str) -> Option<String> {
    let found = std::env::var("KDEDUP_TEST_CASSANDRA").ok();
    if found.is_none() {
        eprintln!(
            "{test} skipped: KDEDUP_TEST_CASSANDRA is not set (`scripts/services up` starts Apache Cassandra, \
             `scripts/services env` sets it)"
        );
    }
    found
}

/// A keyspace of one test on a shared CQL server, dropped when the guard goes
/// (on the multi-threaded test runtime, where blocking in place is allowed).
pub struct CqlKeyspace {
    pub contact_point: String,
    pub datacenter: String,
    pub name: String,
}

impl CqlKeyspace {
    pub fn new(contact_point: &str, datacenter: &str) -> CqlKeyspace {
        CqlKeyspace {
            contact_point: contact_point.to_string(),
            datacenter: datacenter.to_string(),
            name: unique("kdedup_t").replace('-', "_"),
        }
    }

    /// The `KDEDUP_STORE__…` variables that point a pipeline at this keyspace.
    pub fn env(&self) -> Vec<(String, String)> {
        vec![
            ("KDEDUP_STORE__KIND".into(), "scylla".into()),
            ("KDEDUP_STORE__CONTACT_POINTS".into(), format!("[\"{}\"]", self.contact_point)),
            ("KDEDUP_STORE__LOCAL_DATACENTER".into(), self.datacenter.clone()),
            ("KDEDUP_STORE__KEYSPACE".into(), self.name.clone()),
            ("KDEDUP_STORE__REPLICATION".into(), format!("{{ {} = 1 }}", self.datacenter)),
        ]
    }
}

impl CqlKeyspace {
    /// Rows in this keyspace's claims table: one per event ID the store saw.
    pub async fn claim_rows(&self) -> i64 {
        let session = scylla::client::session_builder::SessionBuilder::new()
            .known_node(&self.contact_point)
            .build()
            .await
            .expect("the CQL server answers");
        let statement = format!("SELECT count(*) FROM {}.kdedup_claims", self.name);
        let result = session.query_unpaged(statement, ()).await.expect("count the claims");
        let rows = result.into_rows_result().expect("count(*) answers a row");
        rows.single_row::<(i64,)>().expect("one bigint").0
    }
}

impl Drop for CqlKeyspace {
    fn drop(&mut self) {
        let Ok(runtime) = tokio::runtime::Handle::try_current() else { return };
        let (contact_point, keyspace) = (self.contact_point.clone(), self.name.clone());
        tokio::task::block_in_place(|| {
            runtime.block_on(async move {
                let session =
                    scylla::client::session_builder::SessionBuilder::new().known_node(&contact_point).build().await;
                if let Ok(session) = session {
                    let _ = session.query_unpaged(format!("DROP KEYSPACE IF EXISTS {keyspace}"), ()).await;
                }
            })
        });
    }
}
