//! `kdedup demo`: the whole path with no setup. An in-process Kafka-protocol
//! cluster, a generated stream with duplicates and a few malformed records,
//! the embedded store in a temporary directory, the Kafka sink; then the
//! output and dead-letter topics are read back and checked.

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

use anyhow::Context;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::Serialize;
use xxhash_rust::xxh3::xxh3_64;

use crate::config::Config;
use crate::metrics::Metrics;
use crate::mock::{self, MockKafka, Produce};
use crate::service::{self, RunOptions};
use crate::sink::kafka::headers;
use crate::source::StopMode;

pub(crate) const INPUT: &str = "orders";
pub(crate) const OUTPUT: &str = "orders.deduped";
pub(crate) const DEAD_LETTER: &str = "orders.dlq";

#[derive(Debug, Clone)]
pub(crate) struct DemoOptions {
    pub events: u64,
    pub duplicate_rate: f64,
    /// Share of duplicates placed on a random other partition than their original.
    pub cross_partition_rate: f64,
    pub partitions: i32,
    pub seed: u64,
    /// Print progress lines to stderr.
    pub progress: bool,
}

/// What the demo measured; `lost` and `duplicated_effects` must be 0.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct DemoReport {
    pub records_in: u64,
    pub unique_events: u64,
    pub duplicates_in: u64,
    /// Duplicates on another partition than their original (a shared store's case).
    pub cross_partition_duplicates_in: u64,
    pub duplicates_dropped: u64,
    pub malformed_in: u64,
    pub dead_lettered: u64,
    pub emitted: u64,
    pub lost: u64,
    pub duplicated_effects: u64,
    /// Output records that came before an earlier record of their source partition.
    pub out_of_order: u64,
    pub partitions: i32,
    pub commits: u64,
    pub store_syncs: u64,
    pub elapsed_secs: f64,
    pub events_per_sec: f64,
}

impl DemoReport {
    pub(crate) fn ok(&self) -> bool {
        self.lost == 0 && self.duplicated_effects == 0
    }
}

/// A generated stream and what it holds.
pub(crate) struct Dataset {
    pub records: Vec<Produce>,
    pub unique_ids: Vec<String>,
    pub duplicates: u64,
    /// Duplicates placed on another partition than their original.
    pub cross_partition: u64,
    pub malformed: u64,
}

/// Events with `duplicate_rate` duplicates: half right after their
/// original (a producer retry), half anywhere earlier in the stream (a replay
/// minutes later). A share `cross_partition_rate` of the duplicates goes to a
/// random other partition than the original, under a random record key (a
/// resend through another producer, a re-keyed copy): in a consumer group that
/// copy reaches another member, and only a shared store can tell. Same ID means
/// same payload. A few malformed records too: no ID header, an empty one, an ID
/// over the size limit.
pub(crate) fn generate(
    events: u64,
    duplicate_rate: f64,
    cross_partition_rate: f64,
    partitions: i32,
    seed: u64,
) -> Dataset {
    let mut rng = StdRng::seed_from_u64(seed);
    let malformed = if events >= 100 { (events / 2000).max(3) } else { 0 };
    let duplicates = ((events - malformed) as f64 * duplicate_rate).round() as u64;
    let unique = events - malformed - duplicates;
    let (mut left_unique, mut left_dup, mut left_bad) = (unique, duplicates, malformed);
    let mut ids: Vec<String> = Vec::with_capacity(unique as usize);
    let mut records = Vec::with_capacity(events as usize);
    let mut cross_partition = 0;
    let event = |id: &str, n: usize| {
        let payload = format!(r#"{{"id":"{id}","amount":{},"currency":"EUR","seq":{n}}}"#, n % 997);
        Produce {
            partition: (xxh3_64(id.as_bytes()) % partitions as u64) as i32,
            key: Some(id.as_bytes().to_vec()),
            payload: Some(payload.into_bytes()),
            headers: vec![("event-id".into(), id.as_bytes().to_vec())],
        }
    };
    while left_unique + left_dup + left_bad > 0 {
        let pick = rng.random_range(0..left_unique + left_dup + left_bad);
        if pick < left_unique || ids.is_empty() && left_unique > 0 {
            let id = format!("evt-{seed}-{:08}", ids.len());
            records.push(event(&id, ids.len()));
            ids.push(id);
            left_unique -= 1;
        } else if pick < left_unique + left_dup && !ids.is_empty() {
            let n = if rng.random_bool(0.5) {
                ids.len() - 1 - rng.random_range(0..ids.len().min(8))
            } else {
                rng.random_range(0..ids.len())
            };
            let mut copy = event(&ids[n], n);
            if partitions > 1 && cross_partition_rate > 0.0 && rng.random_bool(cross_partition_rate) {
                copy.partition = mock::other_partition(&mut rng, copy.partition, partitions);
                copy.key = Some(format!("{:016x}", rng.random::<u64>()).into_bytes());
                cross_partition += 1;
            }
            records.push(copy);
            left_dup -= 1;
        } else if left_bad > 0 {
            let k = malformed - left_bad;
            let partition = (k % partitions as u64) as i32;
            let headers = match k % 3 {
                0 => vec![],
                1 => vec![("event-id".to_string(), Vec::new())],
                _ => vec![("event-id".to_string(), vec![b'x'; 600])],
            };
            records.push(Produce { partition, key: None, payload: Some(b"{\"broken\":true}".to_vec()), headers });
            left_bad -= 1;
        } else {
            // Only duplicates left but no unique yet cannot happen: unique goes first.
            left_dup = 0;
        }
    }
    Dataset { records, unique_ids: ids, duplicates, cross_partition, malformed }
}

/// The demo's pipeline configuration, written as a user would write it.
pub(crate) fn demo_config(brokers: &str, store_path: &std::path::Path, expected_keys: u64) -> anyhow::Result<Config> {
    let text = format!(
        r#"
[kafka]
brokers = "{brokers}"
group_id = "kdedup-demo"
topics = ["{INPUT}"]

[key]
source = "header"
header = "event-id"
max_bytes = 512
on_oversize = "dead_letter"

[store]
kind = "embedded"
path = "{}"

[filter]
expected_keys = {expected_keys}

[sink]
kind = "kafka"
topic = "{OUTPUT}"

[dead_letter]
topic = "{DEAD_LETTER}"

[metrics]
listen = ""

[kafka.producer]
"compression.type" = "lz4"

[pipeline]
commit_interval_ms = 200
"#,
        store_path.display().to_string().replace('\\', "/")
    );
    Ok(Config::from_toml_with_env(&text, "demo config", std::iter::empty())?)
}

/// Waits until the group's commits reach `ends` on every partition, reporting progress.
pub(crate) async fn wait_committed(
    metrics: &Metrics,
    topic: &str,
    ends: &BTreeMap<i32, i64>,
    progress: bool,
    total: u64,
) {
    let started = Instant::now();
    let mut last_report = Instant::now();
    loop {
        let done = ends.iter().all(|(p, end)| {
            *end == 0 || metrics.committed_offset.with_label_values(&[topic, &p.to_string()]).get() >= *end
        });
        if done {
            return;
        }
        if progress && last_report.elapsed() >= Duration::from_secs(1) {
            let consumed = metrics.consumed.get();
            eprintln!(
                "  {consumed}/{total} records decided ({:.0}/s)",
                consumed as f64 / started.elapsed().as_secs_f64()
            );
            last_report = Instant::now();
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

pub(crate) async fn run(options: &DemoOptions) -> anyhow::Result<DemoReport> {
    let say = |s: &str| {
        if options.progress {
            eprintln!("{s}");
        }
    };
    let kafka = MockKafka::start(3)?;
    for (topic, partitions) in [(INPUT, options.partitions), (OUTPUT, options.partitions), (DEAD_LETTER, 1)] {
        kafka.create_topic(topic, partitions)?;
    }
    let data = generate(
        options.events,
        options.duplicate_rate,
        options.cross_partition_rate,
        options.partitions,
        options.seed,
    );
    say(&format!(
        "kdedup demo: {} records ({} unique, {} duplicates of which {} on another partition, {} malformed) on {} partitions",
        data.records.len(),
        data.unique_ids.len(),
        data.duplicates,
        data.cross_partition,
        data.malformed,
        options.partitions
    ));
    mock::produce_all(kafka.bootstrap(), INPUT, &data.records).await.context("producing the demo stream")?;
    let ends = mock::end_offsets(kafka.bootstrap(), INPUT)?;
    if ends.values().sum::<i64>() != data.records.len() as i64 {
        anyhow::bail!("the input topic holds {} records, not {}", ends.values().sum::<i64>(), data.records.len());
    }

    let dir = tempfile::tempdir()?;
    let config = demo_config(kafka.bootstrap(), &dir.path().join("store"), options.events.max(1000))?;
    say("running the pipeline (embedded store, Kafka sink)...");
    let total = data.records.len() as u64;
    let (metrics, elapsed) = run_until_committed(&config, ends, total, options.progress).await?;

    say("reading the output and dead-letter topics back...");
    let output = mock::read_all(kafka.bootstrap(), OUTPUT)?;
    let dead = mock::read_all(kafka.bootstrap(), DEAD_LETTER)?;
    let Checked { lost, duplicated_effects, out_of_order } = check_output(&output, &data.unique_ids);
    let secs = elapsed.as_secs_f64();
    Ok(DemoReport {
        records_in: total,
        unique_events: data.unique_ids.len() as u64,
        duplicates_in: data.duplicates,
        cross_partition_duplicates_in: data.cross_partition,
        duplicates_dropped: metrics.outcome("duplicate"),
        malformed_in: data.malformed,
        dead_lettered: dead.len() as u64,
        emitted: output.len() as u64,
        lost,
        duplicated_effects,
        out_of_order,
        partitions: options.partitions,
        commits: metrics.commits.get(),
        store_syncs: metrics.fsyncs.get(),
        elapsed_secs: secs,
        events_per_sec: if secs > 0.0 { total as f64 / secs } else { 0.0 },
    })
}

/// Runs the pipeline until `total` records are committed; its metrics and the time it took.
async fn run_until_committed(
    config: &Config,
    ends: BTreeMap<i32, i64>,
    total: u64,
    progress: bool,
) -> anyhow::Result<(Metrics, Duration)> {
    let metrics = Metrics::new();
    let run_options = RunOptions { metrics: metrics.clone(), ..RunOptions::default() };
    let started = Instant::now();
    let elapsed = std::sync::Arc::new(std::sync::Mutex::new(Duration::ZERO));
    let elapsed_w = elapsed.clone();
    let m = metrics.clone();
    service::run(config, run_options, async move {
        wait_committed(&m, INPUT, &ends, progress, total).await;
        *elapsed_w.lock().unwrap_or_else(|p| p.into_inner()) = started.elapsed();
        StopMode::Drain
    })
    .await?;
    let elapsed = *elapsed.lock().unwrap_or_else(|p| p.into_inner());
    Ok((metrics, elapsed))
}

/// What the output says of the run: events never emitted, events emitted more than
/// once, and records emitted behind a later offset of their source partition.
struct Checked {
    lost: u64,
    duplicated_effects: u64,
    out_of_order: u64,
}

fn check_output(output: &[mock::Consumed], unique_ids: &[String]) -> Checked {
    let mut emitted: HashMap<&[u8], u64> = HashMap::new();
    for r in output {
        *emitted.entry(r.header(headers::EVENT_ID).unwrap_or_default()).or_default() += 1;
    }
    let lost = unique_ids.iter().filter(|id| !emitted.contains_key(id.as_bytes())).count() as u64;
    let duplicated_effects = emitted.values().filter(|c| **c > 1).count() as u64;
    let mut last: HashMap<i64, i64> = HashMap::new();
    let mut out_of_order = 0;
    for r in output {
        let p: i64 = r.header_str(headers::SOURCE_PARTITION).and_then(|s| s.parse().ok()).unwrap_or(-1);
        let o: i64 = r.header_str(headers::SOURCE_OFFSET).and_then(|s| s.parse().ok()).unwrap_or(-1);
        if last.get(&p).is_some_and(|prev| *prev > o) {
            out_of_order += 1;
        }
        last.insert(p, o);
    }
    Checked { lost, duplicated_effects, out_of_order }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_stream_has_the_asked_mix() {
        let d = generate(10_000, 0.2, 0.5, 4, 7);
        assert_eq!(d.records.len(), 10_000);
        assert_eq!(d.malformed, 5);
        assert_eq!(d.duplicates, ((10_000 - 5) as f64 * 0.2).round() as u64);
        assert_eq!(d.unique_ids.len() as u64, 10_000 - 5 - d.duplicates);
        let with_id = d.records.iter().filter(|r| r.headers.iter().any(|(_, v)| v.starts_with(b"evt-"))).count();
        assert_eq!(with_id as u64, 10_000 - 5);
        // Copies away from their ID's home partition are exactly the cross-partition ones, about half.
        assert_eq!(moved(&d, 4), d.cross_partition);
        let share = d.cross_partition as f64 / d.duplicates as f64;
        assert!((0.45..0.55).contains(&share), "{share} of duplicates on another partition");
        assert_eq!(moved(&generate(10_000, 0.2, 0.0, 4, 7), 4), 0);
    }

    fn moved(d: &Dataset, partitions: u64) -> u64 {
        let home = |id: &[u8]| (xxh3_64(id) % partitions) as i32;
        d.records
            .iter()
            .filter(|r| r.headers.first().is_some_and(|(_, id)| id.starts_with(b"evt-") && r.partition != home(id)))
            .count() as u64
    }
}
