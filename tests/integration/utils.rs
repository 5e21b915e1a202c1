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
use kdedup::pipeline::Faults;
use kdedup::service::{self, RunOptions};
use kdedup::sink::kafka::headers;
use kdedup::source::StopMode;
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
    let text = format!(
        r#"
[kafka]
brokers = "{}"
group_id = "{group}"
topics = ["{INPUT}"]
[store]
path = "{}"
[filter]
expected_keys = 100000
[sink]
kind = "kafka"
topic = "{OUTPUT}"
[dead_letter]
topic = "{DLQ}"
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
        kafka.bootstrap(),
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
    init_logs();
    let metrics = Metrics::new();
    let options = RunOptions { metrics: metrics.clone(), faults, serve_metrics: false };
    let (tx, rx) = oneshot::channel();
    let handle = tokio::spawn(async move {
        service::run(&config, options, async move { rx.await.unwrap_or(StopMode::Abandon) }).await
    });
    Running { metrics, stop: Some(tx), handle }
}

impl Running {
    pub async fn stop(mut self, mode: StopMode) {
        let _ = self.stop.take().expect("stopped once").send(mode);
        self.handle.await.expect("run task").expect("run ended cleanly");
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
pub fn events(n: usize, dups: usize, partitions: i32, seed: u64) -> (Vec<Produce>, Vec<String>) {
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
        if d % 2 == 0 {
            // adjacent: right after a random record
            let at = rng.random_range(1..len);
            let id = &out[at - 1].headers[0].1;
            let i: usize = std::str::from_utf8(&id[4..]).unwrap().parse().unwrap_or(0);
            out.insert(at, record(i));
        } else {
            // far: a copy of an early event near the end
            let i = rng.random_range(0..n / 4);
            let at = rng.random_range(len * 3 / 4..len);
            out.insert(at, record(i));
        }
    }
    (out, ids)
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

/// Asserts every ID in `ids` was emitted exactly once and nothing else was.
pub fn assert_exactly_once(output: &[Consumed], ids: &[String]) {
    let counts = emitted_counts(output);
    let missing: Vec<&String> = ids.iter().filter(|id| !counts.contains_key(*id)).collect();
    let twice: Vec<(&String, &usize)> = counts.iter().filter(|(_, c)| **c > 1).collect();
    assert!(missing.is_empty(), "{} events lost, e.g. {:?}", missing.len(), &missing[..missing.len().min(5)]);
    assert!(twice.is_empty(), "{} events emitted more than once, e.g. {:?}", twice.len(), &twice[..twice.len().min(5)]);
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
