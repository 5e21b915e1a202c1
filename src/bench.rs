//! `kdedup bench`: what deduplication costs next to the consumer a user
//! already runs. One seeded dataset is produced once; then, one after the
//! other on that same input, (a) a **passthrough** (consume, produce to an
//! output topic, commit behind deliveries; same client settings, batch size
//! and commit interval, no dedup) and (b) **kdedup**'s whole path. Both
//! outputs are read back and checked.
//!
//! Without `--brokers`, the Kafka-protocol cluster is librdkafka's mock
//! cluster in a child process (`kdedup mock-cluster`), so the CPU time and
//! peak RSS measured here are the pipeline's, not the broker's.
//!
//! Each phase ends when its last record's work is finished: the passthrough's
//! last output delivered, kdedup's last record decided, its effect delivered
//! and its claim completed. Neither waits for its next commit tick (both
//! commit on the same interval): ending kdedup at its commit, as the bench
//! once did, added up to a whole commit interval (1 s) to a 5 s phase the
//! passthrough never paid, and split repeated runs into two clusters a tick
//! apart (159k and 189k events/s).
//!
//! Latency is per record, from its arrival in the consumer-side batch to its
//! output delivery (and, for kdedup, its claim completed): the time each
//! pipeline adds. An event-timestamp clock would measure queueing instead,
//! since the dataset is produced before either run starts.

use std::collections::{BTreeMap, HashMap};
use std::io::{BufRead, BufReader, Write};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};
use futures::stream::{FuturesOrdered, StreamExt};
use futures::FutureExt;
use prometheus::{Histogram, HistogramOpts};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rdkafka::consumer::{CommitMode, Consumer, StreamConsumer};
use rdkafka::message::{Message, OwnedMessage};
use rdkafka::{Offset, TopicPartitionList};
use serde::Serialize;
use xxhash_rust::xxh3::xxh3_64;

use crate::config::{Config, Retention, StoreConfig};
use crate::demo::wait_committed;
use crate::error::SinkError;
use crate::metrics::{self, Metrics};
use crate::mock::{self, Produce};
use crate::service::{self, RunOptions};
use crate::sink::kafka::{headers, OutRecord};
use crate::sink::KafkaWriter;
use crate::source::{self, StopMode};
use crate::store::postgres::PostgresStore;
use crate::values::OutputMark;

/// The store `kdedup bench --store` measures.
// No variant docs: clap would print them in `--help` as the values' descriptions.
#[allow(missing_docs)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum BenchStore {
    Embedded,
    Postgres,
    Scylla,
}

#[derive(Debug, Clone)]
pub(crate) struct BenchOptions {
    /// External brokers; `None` starts a mock cluster in a child process.
    pub brokers: Option<String>,
    pub events: u64,
    pub duplicate_rate: f64,
    /// Share of duplicates placed on a random other partition than their original.
    pub cross_partition_rate: f64,
    pub payload_bytes: usize,
    pub partitions: i32,
    pub store: BenchStore,
    pub seed: u64,
    /// Pairs of runs (passthrough, then kdedup) over the one dataset.
    pub runs: u32,
    pub progress: bool,
}

/// One pipeline's figures.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct Phase {
    pub events_per_sec: f64,
    pub elapsed_secs: f64,
    /// User + system CPU time of this process per input record.
    pub cpu_secs_per_event: f64,
    /// Peak resident set during the phase (the peak is reset before it starts).
    pub peak_rss_bytes: u64,
    pub latency_p50_ms: f64,
    pub latency_p99_ms: f64,
    pub records_out: u64,
}

/// kdedup's run: the figures both runs have, and its own counters.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct KdedupFigures {
    #[serde(flatten)]
    pub run: Phase,
    #[serde(flatten)]
    pub dedup: DedupFigures,
    pub memory: MemoryFigures,
}

/// Where kdedup's memory goes at its peak: the resident set sampled every 100 ms
/// through the run, split at its highest sample by what each heap says it holds, and
/// what the filter and the store say they hold at the end.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct MemoryFigures {
    /// The highest resident set sampled (the phase's `peak_rss_bytes` may be a little
    /// higher: a peak between two samples).
    pub sampled_peak_rss_bytes: u64,
    /// Threads at that sample.
    pub threads: u64,
    /// The Rust heap at that sample: what the global allocator (mimalloc) holds
    /// committed, live blocks and its slack; `None` when it cannot tell.
    pub rust_heap_bytes: Option<u64>,
    /// The C heap at that sample (glibc's malloc: librdkafka's queues and buffers, the
    /// compression libraries): what it holds from the system, and of that in use.
    pub c_heap_bytes: Option<u64>,
    pub c_heap_in_use_bytes: Option<u64>,
    /// The resident rest at that sample (thread stacks, code, the runtime's own maps):
    /// negative when the heaps hold more committed than is resident (pages reserved
    /// for blocks not yet touched).
    /// `None` when a heap is not counted.
    pub other_bytes: Option<i64>,
    /// Of the Rust heap, at the end: the filter (aging table, recent-key cache,
    /// expired keys; `kdedup_filter_bytes`), and the store's memtables and block cache
    /// where it can tell (embedded).
    pub filter_bytes: u64,
    pub store_bytes: Option<u64>,
    /// Of the C heap: the most the consumer may prefetch (`[kafka] prefetch_mib`
    /// shared among the partitions), and per partition in bytes and in records.
    pub consumer_prefetch_bound_bytes: u64,
    pub prefetch_per_partition_bytes: u64,
    pub prefetch_per_partition_records: u64,
}

/// The process's memory at one moment, by holder.
#[derive(Debug, Clone, Copy, Default)]
struct MemorySample {
    rss_bytes: u64,
    threads: u64,
    rust_heap_bytes: Option<u64>,
    c_heap_bytes: Option<u64>,
    c_heap_in_use_bytes: Option<u64>,
}

/// What the bench asks of the global allocator (set by the binary, which chooses it).
#[derive(Debug, Clone, Copy)]
pub struct HeapProbe {
    /// The bytes it holds committed now, when it can tell.
    pub committed: fn() -> Option<u64>,
    /// Gives what it holds free back to the system now.
    pub release_free: fn(),
}

static HEAP_PROBE: std::sync::OnceLock<HeapProbe> = std::sync::OnceLock::new();

pub(crate) fn set_heap_probe(probe: HeapProbe) {
    let _ = HEAP_PROBE.set(probe);
}

impl MemorySample {
    /// Now; the Rust heap only when `rust_heap`: mimalloc's count of what it holds committed keeps memory it has
    /// since given back (a later pair's read 8.9 GiB at an 843 MiB peak), so only a process's first run reads it.
    fn now(rust_heap: bool) -> MemorySample {
        let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
        let field = |name: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        };
        let (c_heap_bytes, c_heap_in_use_bytes) = c_heap();
        MemorySample {
            rss_bytes: field("VmRSS:").unwrap_or(0) * 1024,
            threads: field("Threads:").unwrap_or(0),
            rust_heap_bytes: HEAP_PROBE.get().filter(|_| rust_heap).and_then(|probe| (probe.committed)()),
            c_heap_bytes,
            c_heap_in_use_bytes,
        }
    }
}

/// glibc's malloc over all its arenas: bytes held from the system (`arena` + `hblkhd`), and
/// of those in use (`uordblks` + `hblkhd`).
#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn c_heap() -> (Option<u64>, Option<u64>) {
    // SAFETY: mallinfo2 only reads the allocator's counters (glibc 2.33+).
    let m = unsafe { libc::mallinfo2() };
    (Some((m.arena + m.hblkhd) as u64), Some((m.uordblks + m.hblkhd) as u64))
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn c_heap() -> (Option<u64>, Option<u64>) {
    (None, None)
}

/// Gives both heaps' free memory back to the system: the Rust heap's through the binary's probe, the C heap's
/// (which glibc keeps otherwise) here.
fn release_free_heaps() {
    if let Some(probe) = HEAP_PROBE.get() {
        (probe.release_free)();
    }
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only releases memory no block uses.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Samples the process's memory every 100 ms on a thread of its own, keeping the sample
/// with the highest resident set, until [`PeakWatch::finish`].
struct PeakWatch {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: std::thread::JoinHandle<MemorySample>,
}

impl PeakWatch {
    /// Samples with the Rust heap's count when `rust_heap` (see [`MemorySample::now`]).
    fn start(rust_heap: bool) -> PeakWatch {
        use std::sync::atomic::Ordering;
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let stopped = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut peak = MemorySample::default();
            while !stopped.load(Ordering::Relaxed) {
                let s = MemorySample::now(rust_heap);
                if s.rss_bytes >= peak.rss_bytes {
                    peak = s;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            peak
        });
        PeakWatch { stop, thread }
    }

    fn finish(self) -> MemorySample {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        self.thread.join().unwrap_or_default()
    }
}

/// kdedup's own counters, per 1000 input records unless named otherwise.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct DedupFigures {
    pub store_round_trips_per_1000: f64,
    /// Store read calls (each carries a batch of suspected duplicates).
    pub store_reads_per_1000: f64,
    /// Keys read from the store per input event (Bloom hits: suspected duplicates).
    pub store_key_reads_per_event: f64,
    pub fsyncs_per_1000: f64,
    /// Keys the store wrote (rows, index entries, deletions) per new event,
    /// for the stores that count them (embedded).
    pub writes_per_new_event: Option<f64>,
    pub recent_cache_hit_rate: f64,
    pub bloom_hit_rate: f64,
    /// Bloom hits whose store read found nothing, over the keys that were new.
    pub bloom_false_positive_rate: f64,
    pub duplicates_dropped: u64,
}

#[derive(Debug, Clone, Serialize)]
pub(crate) struct BenchReport {
    pub machine: String,
    pub brokers: String,
    pub store: BenchStore,
    pub events: u64,
    pub unique_events: u64,
    pub duplicate_rate: f64,
    pub cross_partition_rate: f64,
    /// Duplicates the dataset holds on another partition than their original.
    pub cross_partition_duplicates: u64,
    pub payload_bytes: usize,
    pub partitions: i32,
    /// The topics of this run (named per run on real brokers, so they can be read again).
    pub topics: BenchTopics,
    pub passthrough: Phase,
    pub kdedup: KdedupFigures,
    /// kdedup events/s over passthrough events/s.
    pub ratio: f64,
    pub verified: bool,
    /// What the check of both outputs found.
    pub verification: String,
    /// Where kdedup's run spent its time (`--store postgres`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub store_time: Option<StoreTime>,
    /// On real brokers (`--brokers`), both runs are timed from their first
    /// record consumed: how long each took to get there (group join, start).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub before_first_record: Option<BeforeFirstRecord>,
}

/// What `--runs` pairs found, for figures that one pair's noise does not decide: the
/// medians over the pairs, and each figure's range.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct RunsSummary {
    pub runs: usize,
    pub ratio: Spread,
    pub passthrough_events_per_sec: Spread,
    pub kdedup_events_per_sec: Spread,
    pub kdedup_cpu_secs_per_event: Spread,
    pub kdedup_peak_rss_bytes: Spread,
    /// Every pair verified.
    pub verified: bool,
}

/// A figure over the pairs.
#[derive(Debug, Clone, Copy, Serialize)]
pub(crate) struct Spread {
    pub median: f64,
    pub min: f64,
    pub max: f64,
}

impl Spread {
    fn of(mut values: Vec<f64>) -> Spread {
        values.sort_by(f64::total_cmp);
        let n = values.len();
        let median = match n {
            0 => f64::NAN,
            _ if n % 2 == 1 => values[n / 2],
            _ => (values[n / 2 - 1] + values[n / 2]) / 2.0,
        };
        Spread {
            median,
            min: values.first().copied().unwrap_or(f64::NAN),
            max: values.last().copied().unwrap_or(f64::NAN),
        }
    }
}

impl RunsSummary {
    pub(crate) fn of(reports: &[BenchReport]) -> RunsSummary {
        let spread = |f: fn(&BenchReport) -> f64| Spread::of(reports.iter().map(f).collect());
        RunsSummary {
            runs: reports.len(),
            ratio: spread(|r| r.ratio),
            passthrough_events_per_sec: spread(|r| r.passthrough.events_per_sec),
            kdedup_events_per_sec: spread(|r| r.kdedup.run.events_per_sec),
            kdedup_cpu_secs_per_event: spread(|r| r.kdedup.run.cpu_secs_per_event),
            kdedup_peak_rss_bytes: spread(|r| r.kdedup.run.peak_rss_bytes as f64),
            verified: reports.iter().all(|r| r.verified),
        }
    }
}

/// The topics a run made and used.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct BenchTopics {
    pub input: String,
    pub passthrough: String,
    pub kdedup: String,
}

/// Seconds from a run's start to its first record consumed: on a real broker
/// mostly the consumer group's join (tansu: about half `session.timeout.ms`,
/// see DESIGN.md §4), which says nothing about the cost per event, so the
/// figures leave it out.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct BeforeFirstRecord {
    pub passthrough_secs: f64,
    pub kdedup_secs: f64,
}

/// Where kdedup's run spent its time, on a store that batches keys into
/// statements (PostgreSQL): from `kdedup_store_statement_keys`,
/// `kdedup_store_seconds`, `kdedup_sink_seconds` and the machine's CPU counters.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct StoreTime {
    /// Keys per claim statement; each statement is one round trip.
    pub claims_per_round_trip: f64,
    pub claim_round_trips: u64,
    pub complete_round_trips: u64,
    /// Store calls by kind, and the sink's batches.
    pub calls: Vec<CallTime>,
    /// CPU seconds over the kdedup run: this process; every other process
    /// (the store's server, the broker, and whatever else the machine runs);
    /// and what the machine's cores offered in that time.
    pub cpu_secs_kdedup: f64,
    pub cpu_secs_others: f64,
    pub cpu_secs_available: f64,
    /// The bench's own database, dropped after the run.
    pub database: String,
    /// Deadlocks PostgreSQL detected in that database during the run
    /// (`pg_stat_database.deadlocks`); each one cost a `deadlock_timeout` wait.
    pub deadlocks: u64,
    /// Store calls that failed and were retried (`kdedup_store_errors_total`), deadlocks included.
    pub store_errors_retried: u64,
}

/// One kind of call of the kdedup run.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct CallTime {
    pub op: String,
    pub calls: u64,
    pub mean_ms: f64,
    /// Its seconds over the partition tasks' seconds (partitions × the run's time).
    pub share_of_task_time: f64,
}

const INPUT: &str = "bench.in";
const PASSTHROUGH_OUT: &str = "bench.passthrough";
const KDEDUP_OUT: &str = "bench.kdedup";
const DEAD_LETTER: &str = "bench.dlq";

pub(crate) async fn run(options: &BenchOptions) -> anyhow::Result<Vec<BenchReport>> {
    let (names, brokers, _cluster) = brokers_with_topics(options).await?;
    options.say(&format!(
        "kdedup bench: producing {} events ({:.0}% duplicates, {:.0}% of those on another partition, {} B payloads) to {} partitions...",
        options.events,
        options.duplicate_rate * 100.0,
        options.cross_partition_rate * 100.0,
        options.payload_bytes,
        options.partitions
    ));
    let dataset = produce_dataset(&brokers, &names.input, options).await?;
    let ends = count_input(&brokers, &names.input, options)?;
    let mut reports = Vec::with_capacity(names.pairs.len());
    for pair in &names.pairs {
        if pair.number > 1 {
            // What reading the last pair's outputs back left free in both heaps would count in this pair's peaks.
            release_free_heaps();
            options.say(&format!("run {} of {}:", pair.number, names.pairs.len()));
        }
        reports.push(run_once(options, &brokers, &names.input, pair, &dataset, &ends).await?);
    }
    Ok(reports)
}

/// One pair of runs over the produced input: (a) the passthrough, then (b) kdedup, each into output topics, a
/// consumer group and a store of this pair's own; then both outputs read back and checked.
async fn run_once(
    options: &BenchOptions,
    brokers: &str,
    input: &str,
    pair: &Pair,
    dataset: &Produced,
    ends: &BTreeMap<i32, i64>,
) -> anyhow::Result<BenchReport> {
    let Pair { number, pass_out, dedup_out, dlq, group_suffix } = pair;
    let Produced { unique, cross_partition } = *dataset;
    let produced = options.events;
    let dir = tempfile::tempdir()?;
    let mut config = bench_config(brokers, input, dedup_out, dlq, &dir.path().join("store"), group_suffix, options)?;
    let database = prepare_store(&mut config, options).await?;

    options.say("(a) passthrough: consume, produce, commit...");
    let latency = latency_histogram();
    let real_brokers = options.brokers.is_some();
    let mut meter = Meter::start();
    let first = passthrough(&config, input, pass_out, ends, &latency, options.progress).await?;
    let pass_wait = meter.time_from(first, real_brokers);
    let passthrough = meter.finish(options.events, &latency);

    options.say("(b) kdedup: the whole path...");
    let (kdedup, kdedup_wait, metrics, machine_cpu, peak) =
        kdedup_phase(&config, input, ends, options, *number == 1).await?;

    options.say("reading both outputs back...");
    let (pass_read, dedup_read) =
        (read_back(brokers, pass_out, produced, true)?, read_back(brokers, dedup_out, unique, true)?);
    if options.brokers.is_none() {
        mock_truncated(pass_out, &pass_read)?;
        mock_truncated(dedup_out, &dedup_read)?;
    }
    let deadlocks = match database {
        Some(db) => Some(db.finish().await?),
        None => None,
    };
    let (pass_records, dedup_records) = (pass_read.records, dedup_read.records);
    let (verified, verification) = verify(produced, unique, &pass_records, &dedup_records);
    let (passthrough, kdedup) = (
        Phase { records_out: pass_records.len() as u64, ..passthrough },
        Phase { records_out: dedup_records.len() as u64, ..kdedup },
    );
    let store_time = deadlocks.map(|(database, deadlocks)| StoreTime {
        database,
        deadlocks,
        ..store_time(&metrics, options, &kdedup, machine_cpu)
    });
    let before_first_record = pass_wait
        .zip(kdedup_wait)
        .map(|(p, k)| BeforeFirstRecord { passthrough_secs: p.as_secs_f64(), kdedup_secs: k.as_secs_f64() });
    Ok(BenchReport {
        machine: machine(),
        brokers: if options.brokers.is_some() { brokers.to_string() } else { "mock cluster (child process)".into() },
        store: options.store,
        events: options.events,
        unique_events: unique,
        duplicate_rate: options.duplicate_rate,
        cross_partition_rate: options.cross_partition_rate,
        cross_partition_duplicates: cross_partition,
        payload_bytes: options.payload_bytes,
        partitions: options.partitions,
        topics: BenchTopics { input: input.to_string(), passthrough: pass_out.clone(), kdedup: dedup_out.clone() },
        ratio: kdedup.events_per_sec / passthrough.events_per_sec.max(f64::MIN_POSITIVE),
        passthrough,
        kdedup: KdedupFigures {
            memory: memory(&config, &metrics, options.partitions, peak),
            dedup: dedup_figures(&metrics, options),
            run: kdedup,
        },
        verified,
        verification,
        store_time,
        before_first_record,
    })
}

impl BenchOptions {
    /// A progress line on stderr, unless the report is JSON.
    fn say(&self, s: &str) {
        if self.progress {
            eprintln!("{s}");
        }
    }
}

/// The bench's topics: the input, and the outputs of each pair of runs.
struct BenchNames {
    input: String,
    pairs: Vec<Pair>,
}

/// One pair of runs: its number (from 1), what it writes to, and the suffix of its consumer groups.
struct Pair {
    number: u32,
    pass_out: String,
    dedup_out: String,
    dlq: String,
    group_suffix: String,
}

/// Creates the topics on `--brokers`, or spawns a mock cluster that has them (it
/// lives as long as the [`ChildCluster`] returned); and the bootstrap address.
async fn brokers_with_topics(options: &BenchOptions) -> anyhow::Result<(BenchNames, String, Option<ChildCluster>)> {
    // Topic names of their own on real brokers, so runs never see each other's data.
    let suffix = if options.brokers.is_some() {
        format!("-{}-{}", std::process::id(), crate::store::now_ms())
    } else {
        String::new()
    };
    // The first pair writes to the plain names; each later one to names of its own, `bench.kdedup.2` and on.
    let pairs: Vec<Pair> = (1..=options.runs.max(1))
        .map(|n| {
            let name = |t: &str| if n == 1 { format!("{t}{suffix}") } else { format!("{t}.{n}{suffix}") };
            Pair {
                number: n,
                pass_out: name(PASSTHROUGH_OUT),
                dedup_out: name(KDEDUP_OUT),
                dlq: name(DEAD_LETTER),
                group_suffix: if n == 1 { suffix.clone() } else { format!("{suffix}-{n}") },
            }
        })
        .collect();
    let input = format!("{INPUT}{suffix}");
    let mut topics = vec![(input.as_str(), options.partitions)];
    for r in &pairs {
        topics.extend([(r.pass_out.as_str(), options.partitions), (&r.dedup_out, options.partitions), (&r.dlq, 1)]);
    }
    let mut cluster = None;
    let brokers = match &options.brokers {
        Some(b) => {
            mock::create_topics(b, &topics).await.context("creating the bench topics")?;
            b.clone()
        }
        None => {
            let (child, bootstrap) = spawn_mock_cluster(&topics)?;
            cluster = Some(ChildCluster(child));
            bootstrap
        }
    };
    Ok((BenchNames { input, pairs }, brokers, cluster))
}

/// Reads the input back to count it; errors unless it holds `--events` records.
/// Counted by reading, not from high watermarks (some brokers' are wrong, see
/// [`read_back`]): where each partition ends, returned, is where both runs must get to.
fn count_input(brokers: &str, input: &str, options: &BenchOptions) -> anyhow::Result<BTreeMap<i32, i64>> {
    options.say("reading the input back to count it...");
    let input_read = read_back(brokers, input, options.events, false)?;
    if options.brokers.is_none() {
        mock_truncated(input, &input_read)?;
    }
    let produced = input_read.count;
    if produced != options.events {
        bail!(
            "the input topic holds {produced} records, not {} (read back per partition: {:?})",
            options.events,
            input_read.counts
        );
    }
    Ok(input_read.ends)
}

/// A PostgreSQL database of the bench's own (in `config`), and the schema applied
/// to any store but the embedded one.
async fn prepare_store(config: &mut Config, options: &BenchOptions) -> anyhow::Result<Option<PrivateDatabase>> {
    let database = match &mut config.store {
        StoreConfig::Postgres { url, tls, .. } => {
            options.say("creating a PostgreSQL database of the bench's own...");
            Some(PrivateDatabase::create(url, tls, &config.retention).await?)
        }
        _ => None,
    };
    if options.store != BenchStore::Embedded {
        crate::store::Store::open(&config.store, &config.retention)?
            .apply_schema()
            .await
            .context("applying the store schema")?;
    }
    Ok(database)
}

/// Phase (b): kdedup's whole path over the input, until every partition's end is
/// committed. Returns the phase, the wait before its first record, its metrics,
/// and the machine's CPU seconds spent meanwhile. The Rust heap is counted in the
/// process's first pair only (see [`MemorySample::now`]).
async fn kdedup_phase(
    config: &Config,
    input: &str,
    ends: &BTreeMap<i32, i64>,
    options: &BenchOptions,
    first_pair: bool,
) -> anyhow::Result<(Phase, Option<Duration>, Metrics, Option<f64>, MemorySample)> {
    let machine_cpu_before = machine_cpu_secs();
    let metrics = Metrics::new();
    let run_options = RunOptions { metrics: metrics.clone(), ..RunOptions::default() };
    let mut meter = Meter::start();
    let watch = PeakWatch::start(first_pair);
    let (m, input_topic, ends_b, progress, total) =
        (metrics.clone(), input.to_string(), ends.clone(), options.progress, options.events);
    let finished = std::sync::Arc::new(std::sync::Mutex::new(None));
    let finished_w = finished.clone();
    service::run(config, run_options, async move {
        let first_consumed = async {
            while m.consumed_total() == 0 {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            Instant::now()
        };
        // Every record's round finished (see the module's doc); the run stops once committed.
        let work_done = async {
            while m.record_seconds.get_sample_count() < total {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            Instant::now()
        };
        let (first, done, ()) =
            tokio::join!(first_consumed, work_done, wait_committed(&m, &input_topic, &ends_b, progress, total));
        *finished_w.lock().unwrap_or_else(|p| p.into_inner()) = Some((first, done));
        StopMode::Drain
    })
    .await?;
    let (first, finished_at) = finished.lock().unwrap_or_else(|p| p.into_inner()).unzip();
    let finished_at = finished_at.unwrap_or_else(Instant::now);
    let kdedup_wait = meter.time_from(first, options.brokers.is_some());
    let kdedup = meter.finish_at(options.events, &metrics.record_seconds, finished_at);
    let machine_cpu = machine_cpu_secs().zip(machine_cpu_before).map(|(after, before)| after - before);
    Ok((kdedup, kdedup_wait, metrics, machine_cpu, watch.finish()))
}

/// The filter's and the store's work per event, from phase (b)'s metrics.
fn dedup_figures(metrics: &Metrics, options: &BenchOptions) -> DedupFigures {
    let per_1000 = |n: f64| n * 1000.0 / options.events as f64;
    let filter = |tier: &str, result: &str| metrics.filter_checks(tier, result) as f64;
    let (recent, bloom_hit, bloom_miss) = (filter("recent", "hit"), filter("aging", "hit"), filter("aging", "miss"));
    let checked = (recent + bloom_hit + bloom_miss).max(1.0);
    let false_positives = metrics.bloom_false_positives.get() as f64;
    let store_calls: u64 = ["lookup", "claim", "complete", "release"].iter().map(|op| metrics.store_calls_ok(op)).sum();
    DedupFigures {
        store_round_trips_per_1000: per_1000(store_calls as f64),
        store_reads_per_1000: per_1000(metrics.store_calls_ok("lookup") as f64),
        store_key_reads_per_event: bloom_hit / options.events as f64,
        fsyncs_per_1000: per_1000(metrics.fsyncs.get() as f64),
        writes_per_new_event: (metrics.store_writes.get() > 0)
            .then(|| metrics.store_writes.get() as f64 / metrics.outcome("new").max(1) as f64),
        recent_cache_hit_rate: recent / checked,
        bloom_hit_rate: bloom_hit / checked,
        bloom_false_positive_rate: false_positives / (false_positives + bloom_miss).max(1.0),
        duplicates_dropped: metrics.outcome("duplicate"),
    }
}

fn memory(config: &Config, metrics: &Metrics, partitions: i32, peak: MemorySample) -> MemoryFigures {
    let filter_bytes = metrics.filter_bytes.get().max(0) as u64;
    let store_bytes = (metrics.store_memory_bytes.get() > 0).then(|| metrics.store_memory_bytes.get() as u64);
    let partitions = partitions.max(0) as usize;
    // What the group consumer was given (a `[kafka.consumer]` override wins, as in the run).
    let consumer = crate::kafka_client::KafkaClients::from(&config.kafka).group_consumer("bench", Some(partitions));
    let get = |key: &str| consumer.get(key).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    let per_partition_bytes = get("queued.max.messages.kbytes") * 1024;
    let heaps = peak.rust_heap_bytes.zip(peak.c_heap_bytes).map(|(rust, c)| rust + c);
    MemoryFigures {
        sampled_peak_rss_bytes: peak.rss_bytes,
        threads: peak.threads,
        rust_heap_bytes: peak.rust_heap_bytes,
        c_heap_bytes: peak.c_heap_bytes,
        c_heap_in_use_bytes: peak.c_heap_in_use_bytes,
        other_bytes: heaps.map(|heaps| peak.rss_bytes as i64 - heaps as i64),
        filter_bytes,
        store_bytes,
        consumer_prefetch_bound_bytes: per_partition_bytes * partitions as u64,
        prefetch_per_partition_bytes: per_partition_bytes,
        prefetch_per_partition_records: get("queued.min.messages"),
    }
}

/// The [`StoreTime`] of a kdedup run over `run`'s span; `machine_cpu` is the
/// busy CPU seconds of the whole machine in it, when the kernel tells.
fn store_time(metrics: &Metrics, options: &BenchOptions, run: &Phase, machine_cpu: Option<f64>) -> StoreTime {
    let (claim_round_trips, claimed) = metrics.store_statement_keys("postgres", "claim");
    let (complete_round_trips, _) = metrics.store_statement_keys("postgres", "complete");
    let task_secs = (run.elapsed_secs * options.partitions as f64).max(f64::MIN_POSITIVE);
    let call = |op: &str, (calls, secs): (u64, f64)| CallTime {
        op: op.to_string(),
        calls,
        mean_ms: secs * 1000.0 / calls.max(1) as f64,
        share_of_task_time: secs / task_secs,
    };
    let mut calls: Vec<CallTime> =
        ["lookup", "claim", "complete", "release"].iter().map(|op| call(op, metrics.store_call_seconds(op))).collect();
    calls.push(call("sink", (metrics.sink_seconds.get_sample_count(), metrics.sink_seconds.get_sample_sum())));
    let own = run.cpu_secs_per_event * options.events as f64;
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    StoreTime {
        claims_per_round_trip: claimed as f64 / claim_round_trips.max(1) as f64,
        claim_round_trips,
        complete_round_trips,
        calls,
        cpu_secs_kdedup: own,
        cpu_secs_others: machine_cpu.map_or(f64::NAN, |m| (m - own).max(0.0)),
        cpu_secs_available: run.elapsed_secs * cores as f64,
        database: String::new(),
        deadlocks: 0,
        store_errors_retried: metrics.store_errors.get(),
    }
}

/// A PostgreSQL database of the bench's own, on the server of `[store] url`
/// (`KDEDUP_STORE__URL`): every run starts from an empty table (a second run
/// would otherwise find the first one's keys and drop every event as a
/// duplicate), and the database's `pg_stat_database.deadlocks` counts this
/// run's deadlocks and nobody else's. Needs the `CREATEDB` privilege.
struct PrivateDatabase {
    admin: PostgresStore,
    name: String,
    deadlocks_before: u64,
}

impl PrivateDatabase {
    /// Creates the database and points `url` at it.
    async fn create(
        url: &mut crate::config::Secret,
        tls: &crate::config::PostgresTls,
        retention: &Retention,
    ) -> anyhow::Result<Self> {
        let name = format!("kdedup_bench_{}_{}", std::process::id(), crate::store::now_ms());
        let admin = PostgresStore::open(url.expose(), 1, tls, retention)?;
        admin
            .admin_query(&format!("CREATE DATABASE {name}"))
            .await
            .with_context(|| format!("creating the bench's database {name} (the user needs CREATEDB)"))?;
        *url = with_database(url.expose(), &name).into();
        let mut db = PrivateDatabase { admin, name, deadlocks_before: 0 };
        db.deadlocks_before = db.deadlocks().await?;
        Ok(db)
    }

    async fn deadlocks(&self) -> anyhow::Result<u64> {
        let sql = format!("SELECT deadlocks FROM pg_stat_database WHERE datname = '{}'", self.name);
        let rows = self.admin.admin_query(&sql).await.context("reading pg_stat_database")?;
        Ok(rows.first().cloned().flatten().and_then(|n| n.parse().ok()).unwrap_or(0))
    }

    /// The database's name and the deadlocks of the run; then drops it. Call
    /// it a while after the run ended: a backend reports its statistics when
    /// it goes idle for a second or exits, not at once.
    async fn finish(self) -> anyhow::Result<(String, u64)> {
        let deadlocks = self.deadlocks().await?.saturating_sub(self.deadlocks_before);
        self.admin
            .admin_query(&format!("DROP DATABASE {} WITH (FORCE)", self.name))
            .await
            .with_context(|| format!("dropping the bench's database {}", self.name))?;
        Ok((self.name, deadlocks))
    }
}

/// `url` with its database replaced by `database` (a name that needs no
/// quoting): the path of a `postgres://` URL, or a `dbname=` added to the
/// key=value form (the last one given wins).
fn with_database(url: &str, database: &str) -> String {
    let Some(rest_at) = url.find("://").map(|i| i + 3) else {
        return format!("{url} dbname={database}");
    };
    let (head, rest) = url.split_at(rest_at);
    let query_at = rest.find('?').unwrap_or(rest.len());
    let (authority_and_path, query) = rest.split_at(query_at);
    let authority = authority_and_path.split('/').next().unwrap_or_default();
    format!("{head}{authority}/{database}{query}")
}

/// Busy CPU seconds of the whole machine since boot (all but idle and iowait
/// in /proc/stat), or `None` off Linux.
fn machine_cpu_secs() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let fields: Vec<u64> = stat.lines().next()?.split_whitespace().skip(1).filter_map(|f| f.parse().ok()).collect();
    let idle = fields.get(3)? + fields.get(4).copied().unwrap_or(0);
    // SAFETY: sysconf only reads a system constant.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    Some((fields.iter().take(8).sum::<u64>() - idle) as f64 / ticks)
}

/// Event `n`'s ID; the bench checks the output by these numbers.
fn event_id(n: u64) -> String {
    format!("bench-{n:010}")
}

/// What [`produce_dataset`] wrote.
#[derive(Debug, Clone, Copy)]
struct Produced {
    unique: u64,
    cross_partition: u64,
}

/// Produces the dataset in chunks (never all in memory): events with
/// `duplicate_rate` repeats, half right after their original (a producer
/// retry), half anywhere earlier (a replay). A share `cross_partition_rate` of
/// the repeats goes to a random other partition under a random record key (a
/// resend through another producer): the copy a group member cannot see in
/// its own partitions, which only the shared store catches.
async fn produce_dataset(brokers: &str, topic: &str, o: &BenchOptions) -> anyhow::Result<Produced> {
    let mut rng = StdRng::seed_from_u64(o.seed);
    let (mut unique, mut cross_partition) = (0u64, 0u64);
    let mut chunk = Vec::with_capacity(100_000);
    let started = Instant::now();
    for i in 0..o.events {
        let repeat = unique > 0 && rng.random_bool(o.duplicate_rate);
        let n = if repeat {
            if rng.random_bool(0.5) {
                unique - 1 - rng.random_range(0..unique.min(8))
            } else {
                rng.random_range(0..unique)
            }
        } else {
            unique += 1;
            unique - 1
        };
        let mut record = event(n, o.payload_bytes, o.partitions);
        if repeat && o.partitions > 1 && o.cross_partition_rate > 0.0 && rng.random_bool(o.cross_partition_rate) {
            record.partition = mock::other_partition(&mut rng, record.partition, o.partitions);
            record.key = Some(format!("{:016x}", rng.random::<u64>()).into_bytes());
            cross_partition += 1;
        }
        chunk.push(record);
        if chunk.len() == chunk.capacity() || i + 1 == o.events {
            mock::produce_all(brokers, topic, &chunk).await.context("producing the bench dataset")?;
            chunk.clear();
            if o.progress {
                eprintln!(
                    "  {}/{} produced ({:.0}/s)",
                    i + 1,
                    o.events,
                    (i + 1) as f64 / started.elapsed().as_secs_f64()
                );
            }
        }
    }
    Ok(Produced { unique, cross_partition })
}

/// A topic read back by [`read_back`].
struct ReadBack {
    /// The records, when asked to keep them.
    records: Vec<mock::Consumed>,
    count: u64,
    counts: BTreeMap<i32, u64>,
    /// Per partition, the first offset read and the last one plus one.
    firsts: BTreeMap<i32, i64>,
    ends: BTreeMap<i32, i64>,
}

/// After `expected` records, how long nothing more must arrive before the read
/// ends: extra records (repeats) are seen, not cut off.
const READ_QUIET: Duration = Duration::from_secs(1);
/// Short of `expected`, how long the read waits for anything new before it
/// gives up (the count then says what is missing).
const READ_IDLE: Duration = Duration::from_secs(15);

/// Reads every partition of `topic` from its beginning until `expected`
/// records arrived and nothing more came for [`READ_QUIET`], or nothing came
/// for [`READ_IDLE`]. High watermarks are never consulted: tansu's
/// `ListOffsets` answers can be far off (a partition of hundreds of records
/// reporting 1; see DESIGN.md §4), so a count, an end offset or a check taken
/// from them is wrong there.
fn read_back(brokers: &str, topic: &str, expected: u64, keep: bool) -> anyhow::Result<ReadBack> {
    use rdkafka::consumer::BaseConsumer;
    let kafka = crate::kafka_client::KafkaClients::from(brokers);
    // From offset 0, not `Beginning` (a ListOffsets answer); a log that no
    // longer starts there (the mock cluster's retention) resets to its earliest.
    let c: BaseConsumer = kafka
        .reader("kdedup-bench-reader")
        .set("auto.offset.reset", "earliest")
        .create()
        .with_context(|| format!("creating a reader for {topic}"))?;
    let md = c.fetch_metadata(Some(topic), Duration::from_secs(10))?;
    let partitions: Vec<i32> =
        md.topics().first().map(|t| t.partitions().iter().map(|p| p.id()).collect()).unwrap_or_default();
    if partitions.is_empty() {
        bail!("no metadata for {topic}");
    }
    let mut tpl = TopicPartitionList::new();
    for p in &partitions {
        tpl.add_partition_offset(topic, *p, Offset::Offset(0))?;
    }
    c.assign(&tpl)?;
    let mut read = ReadBack {
        records: Vec::with_capacity(if keep { expected as usize } else { 0 }),
        count: 0,
        counts: BTreeMap::new(),
        firsts: BTreeMap::new(),
        ends: partitions.iter().map(|p| (*p, 0)).collect(),
    };
    let mut last_arrival = Instant::now();
    loop {
        let waited = last_arrival.elapsed();
        if (read.count >= expected && waited >= READ_QUIET) || waited >= READ_IDLE {
            return Ok(read);
        }
        let m = match c.poll(Duration::from_millis(100)) {
            Some(Ok(m)) => m,
            Some(Err(e)) => bail!("reading {topic}: {e}"),
            None => continue,
        };
        last_arrival = Instant::now();
        read.count += 1;
        *read.counts.entry(m.partition()).or_default() += 1;
        read.firsts.entry(m.partition()).or_insert(m.offset());
        let end = read.ends.entry(m.partition()).or_default();
        *end = (*end).max(m.offset() + 1);
        if keep {
            read.records.push(mock::Consumed::of(&m));
        }
    }
}

/// The mock cluster keeps 5 MiB per partition and silently drops the oldest
/// batches beyond: a partition that no longer starts at 0 says so.
fn mock_truncated(topic: &str, read: &ReadBack) -> anyhow::Result<()> {
    match read.firsts.iter().find(|(_, first)| **first > 0) {
        Some((p, first)) => bail!(
            "{topic}/{p} starts at offset {first}: the mock cluster dropped records beyond its 5 MiB per partition; use more partitions"
        ),
        None => Ok(()),
    }
}

/// Event `n`: same ID, same payload, whenever it repeats. The payload is JSON
/// padded to `payload_bytes` with text derived from the ID.
fn event(n: u64, payload_bytes: usize, partitions: i32) -> Produce {
    let id = event_id(n);
    let mut payload = format!(r#"{{"id":"{id}","amount":{},"pad":""#, n % 9973);
    let mut x = xxh3_64(id.as_bytes());
    while payload.len() + 2 < payload_bytes {
        payload.push((b'a' + (x % 26) as u8) as char);
        x = x.rotate_left(5) ^ 0x9e37_79b9_7f4a_7c15;
    }
    payload.push_str("\"}");
    Produce {
        partition: (xxh3_64(id.as_bytes()) % partitions as u64) as i32,
        key: Some(id.as_bytes().to_vec()),
        payload: Some(payload.into_bytes()),
        headers: vec![("event-id".into(), id.into_bytes())],
    }
}

/// The pipeline configuration both runs share, written as a user would.
/// `KDEDUP_…` environment variables apply, e.g. `KDEDUP_STORE__URL` for `--store postgres`.
fn bench_config(
    brokers: &str,
    input: &str,
    output: &str,
    dlq: &str,
    store_dir: &std::path::Path,
    group_suffix: &str,
    o: &BenchOptions,
) -> anyhow::Result<Config> {
    let store = match o.store {
        BenchStore::Embedded => {
            format!("kind = \"embedded\"\npath = \"{}\"", store_dir.display().to_string().replace('\\', "/"))
        }
        BenchStore::Postgres => "kind = \"postgres\"".to_string(),
        BenchStore::Scylla => "kind = \"scylla\"".to_string(),
    };
    let text = format!(
        r#"
[kafka]
brokers = "{brokers}"
group_id = "kdedup-bench-{seed}{group_suffix}"
topics = ["{input}"]

[key]
source = "header"
header = "event-id"

[store]
{store}

[filter]
expected_keys = {expected}

[sink]
kind = "kafka"
topic = "{output}"

[dead_letter]
topic = "{dlq}"

[metrics]
listen = ""

[kafka.producer]
"compression.type" = "lz4"
"#,
        seed = o.seed,
        expected = o.events.max(1000),
    );
    let env = std::env::vars().filter(|(k, _)| k.starts_with("KDEDUP_"));
    Ok(Config::from_toml_with_env(&text, "bench config", env)?)
}

/// The baseline: a plain consume -> produce -> commit loop with kdedup's own
/// client settings (consumer, producer), batch size and commit interval.
/// Batches are pipelined (several awaiting delivery at once); offsets are
/// committed only behind delivered records.
async fn passthrough(
    config: &Config,
    input: &str,
    output: &str,
    ends: &BTreeMap<i32, i64>,
    latency: &Histogram,
    progress: bool,
) -> anyhow::Result<Option<Instant>> {
    let mut kafka = config.kafka.clone();
    kafka.group_id = format!("{}-passthrough", kafka.group_id);
    let consumer: StreamConsumer =
        source::consumer_config(&kafka, Some(ends.len())).create().context("creating the passthrough consumer")?;
    consumer.subscribe(&[input])?;
    let writer = KafkaWriter::new(&(&kafka).into())?;
    let partitions = ends.len() as i32;
    let batch_max = config.pipeline.batch_max.get();
    let mut inflight = FuturesOrdered::new();
    let mut delivered: HashMap<i32, i64> = HashMap::new();
    let mut tick = tokio::time::interval(config.pipeline.commit_interval);
    let started = Instant::now();
    let mut first = None;
    let mut last_report = Instant::now();
    let finished = |delivered: &HashMap<i32, i64>| {
        ends.iter().all(|(p, end)| *end == 0 || delivered.get(p).is_some_and(|d| d >= end))
    };
    while !finished(&delivered) {
        tokio::select! {
            m = consumer.recv(), if inflight.len() < 4 => {
                let arrived = Instant::now();
                first.get_or_insert(arrived);
                let mut batch: Vec<OwnedMessage> = vec![m?.detach()];
                while batch.len() < batch_max {
                    match consumer.recv().now_or_never() {
                        Some(m) => batch.push(m?.detach()),
                        None => break,
                    }
                }
                inflight.push_back(forward(writer.clone(), output.to_string(), batch, partitions, arrived));
            }
            Some((positions, results, arrived)) = inflight.next() => {
                let secs = arrived.elapsed().as_secs_f64();
                for ((p, o), result) in positions.into_iter().zip(results) {
                    result.map_err(|e| anyhow!("passthrough write failed: {e}"))?;
                    latency.observe(secs);
                    delivered.insert(p, o + 1);
                }
            }
            _ = tick.tick() => {
                commit(&consumer, input, &delivered, CommitMode::Async)?;
                if progress && last_report.elapsed() >= Duration::from_secs(1) {
                    let n: i64 = delivered.values().sum();
                    eprintln!("  {n} records passed through ({:.0}/s)", n as f64 / started.elapsed().as_secs_f64());
                    last_report = Instant::now();
                }
            }
        }
    }
    commit(&consumer, input, &delivered, CommitMode::Sync)?;
    Ok(first)
}

/// The passthrough's write of one batch to `topic`, each record to its source
/// partition's number; the batch's positions and results, and when it arrived.
async fn forward(
    writer: KafkaWriter,
    topic: String,
    batch: Vec<OwnedMessage>,
    partitions: i32,
    arrived: Instant,
) -> (Vec<(i32, i64)>, Vec<Result<OutputMark, SinkError>>, Instant) {
    // The writer counts writes per origin partition; one topic Arc per batch.
    let input: std::sync::Arc<str> = batch[0].topic().into();
    let sources: Vec<crate::event::Position> = batch
        .iter()
        .map(|m| crate::event::Position {
            topic: if m.topic() == &*input { input.clone() } else { m.topic().into() },
            partition: m.partition(),
            offset: m.offset(),
        })
        .collect();
    let out = batch
        .iter()
        .zip(&sources)
        .map(|(m, source)| OutRecord {
            partition: Some(m.partition().rem_euclid(partitions)),
            source,
            key: m.key(),
            payload: m.payload(),
            headers: m.headers().cloned().unwrap_or_default(),
        })
        .collect();
    let results = writer.write_all(&topic, out).await;
    let positions: Vec<(i32, i64)> = batch.iter().map(|m| (m.partition(), m.offset())).collect();
    (positions, results, arrived)
}

fn commit(
    consumer: &StreamConsumer,
    topic: &str,
    delivered: &HashMap<i32, i64>,
    mode: CommitMode,
) -> anyhow::Result<()> {
    if delivered.is_empty() {
        return Ok(());
    }
    let mut tpl = TopicPartitionList::new();
    for (p, next) in delivered {
        tpl.add_partition_offset(topic, *p, Offset::Offset(*next))?;
    }
    consumer.commit(&tpl, mode).context("passthrough commit")
}

/// Checks both outputs: the passthrough copied every record; kdedup emitted
/// every unique event exactly once.
fn verify(records_in: u64, unique: u64, passthrough: &[mock::Consumed], dedup: &[mock::Consumed]) -> (bool, String) {
    let mut seen = vec![0u8; unique as usize];
    let mut strangers = 0u64;
    for r in dedup {
        let n = r
            .header(headers::EVENT_ID)
            .and_then(|id| std::str::from_utf8(id).ok())
            .and_then(|id| id.strip_prefix("bench-"))
            .and_then(|n| n.parse::<usize>().ok());
        match n {
            Some(n) if n < seen.len() => seen[n] = seen[n].saturating_add(1),
            _ => strangers += 1,
        }
    }
    let lost = seen.iter().filter(|c| **c == 0).count();
    let repeated = seen.iter().filter(|c| **c > 1).count();
    let pass_ok = passthrough.len() as u64 == records_in;
    let ok = pass_ok && lost == 0 && repeated == 0 && strangers == 0;
    let text = format!(
        "passthrough copied {} of {records_in} records; kdedup emitted {} records: {lost} unique events lost, {repeated} emitted more than once, {strangers} unknown",
        passthrough.len(),
        dedup.len()
    );
    (ok, text)
}

/// CPU time and peak memory of this process over one phase.
struct Meter {
    started: Instant,
    cpu_secs: f64,
}

impl Meter {
    fn start() -> Meter {
        // Writing 5 to clear_refs resets the peak RSS (VmHWM) to the current RSS (Linux 4.0+).
        let _ = std::fs::write("/proc/self/clear_refs", "5");
        Meter { started: Instant::now(), cpu_secs: cpu_secs() }
    }

    /// With `from_first`, times the phase from `first` (its first record) on,
    /// and returns how long the phase took to get there.
    fn time_from(&mut self, first: Option<Instant>, from_first: bool) -> Option<Duration> {
        let first = first.filter(|_| from_first)?;
        let waited = first.saturating_duration_since(self.started);
        self.started = first;
        Some(waited)
    }

    fn finish(self, events: u64, latency: &Histogram) -> Phase {
        self.finish_at(events, latency, Instant::now())
    }

    fn finish_at(self, events: u64, latency: &Histogram, at: Instant) -> Phase {
        let elapsed = at.duration_since(self.started).as_secs_f64();
        Phase {
            events_per_sec: events as f64 / elapsed.max(f64::MIN_POSITIVE),
            elapsed_secs: elapsed,
            cpu_secs_per_event: (cpu_secs() - self.cpu_secs) / events.max(1) as f64,
            peak_rss_bytes: peak_rss_bytes(),
            latency_p50_ms: quantile(latency, 0.50) * 1000.0,
            latency_p99_ms: quantile(latency, 0.99) * 1000.0,
            records_out: 0,
        }
    }
}

fn cpu_secs() -> f64 {
    // SAFETY: getrusage writes into the struct we pass and nothing else.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    if unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut usage) } != 0 {
        return 0.0;
    }
    let secs = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    secs(usage.ru_utime) + secs(usage.ru_stime)
}

fn peak_rss_bytes() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map_or(0, |kb| kb * 1024)
}

/// The same buckets as kdedup's own `kdedup_record_seconds`.
fn latency_histogram() -> Histogram {
    Histogram::with_opts(
        HistogramOpts::new("bench_passthrough_record_seconds", "passthrough latency")
            .buckets(metrics::record_buckets()),
    )
    .expect("static metric")
}

/// Quantile `q` of a histogram, interpolated linearly inside its bucket.
fn quantile(h: &Histogram, q: f64) -> f64 {
    let total = h.get_sample_count();
    if total == 0 {
        return 0.0;
    }
    let rank = q * total as f64;
    let proto = prometheus::core::Collector::collect(h);
    let buckets = proto[0].get_metric()[0].get_histogram().get_bucket();
    let (mut lower, mut below) = (0.0, 0u64);
    for b in buckets {
        let (upper, count) = (b.upper_bound(), b.cumulative_count());
        if count as f64 >= rank {
            let inside = (count - below).max(1) as f64;
            return lower + (upper - lower) * ((rank - below as f64) / inside).clamp(0.0, 1.0);
        }
        (lower, below) = (upper, count);
    }
    lower
}

fn machine() -> String {
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    let mem_gib = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find_map(|l| l.strip_prefix("MemTotal:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        })
        .map_or(0, |kb| (kb as f64 / 1024.0 / 1024.0).round() as u64);
    format!("{cpus} cores, {mem_gib} GiB, {} {}", std::env::consts::OS, std::env::consts::ARCH)
}

/// The mock cluster in a child process; it ends when its stdin closes.
struct ChildCluster(Child);

impl Drop for ChildCluster {
    fn drop(&mut self) {
        drop(self.0.stdin.take());
        let _ = self.0.wait();
    }
}

fn spawn_mock_cluster(topics: &[(&str, i32)]) -> anyhow::Result<(Child, String)> {
    let exe = std::env::current_exe().context("locating the kdedup binary")?;
    let mut child = Command::new(exe)
        .arg("mock-cluster")
        .args(topics.iter().map(|(name, partitions)| format!("{name}:{partitions}")))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .context("starting the mock cluster process")?;
    let stdout = child.stdout.take().ok_or_else(|| anyhow!("mock cluster stdout"))?;
    let mut line = String::new();
    BufReader::new(stdout).read_line(&mut line).context("reading the mock cluster's address")?;
    let bootstrap = line.trim().to_string();
    if bootstrap.is_empty() {
        bail!("the mock cluster process printed no address");
    }
    Ok((child, bootstrap))
}

/// `kdedup mock-cluster NAME:PARTITIONS...`: runs librdkafka's mock cluster
/// with these topics, prints its bootstrap address on stdout, and serves
/// until stdin closes.
pub(crate) fn serve_mock_cluster(topics: &[String]) -> anyhow::Result<()> {
    let kafka = mock::MockKafka::start(3)?;
    for t in topics {
        let (name, partitions) = t.rsplit_once(':').ok_or_else(|| anyhow!("topic {t}: expected NAME:PARTITIONS"))?;
        kafka.create_topic(name, partitions.parse().with_context(|| format!("topic {t}: partitions"))?)?;
    }
    let mut out = std::io::stdout();
    writeln!(out, "{}", kafka.bootstrap())?;
    out.flush()?;
    let mut sink = Vec::new();
    let _ = std::io::Read::read_to_end(&mut std::io::stdin(), &mut sink);
    drop(kafka);
    Ok(())
}

/// The report as a table for people.
pub(crate) fn print_table(r: &BenchReport) {
    println!("kdedup bench  ({}; {}; store {:?})", r.machine, r.brokers, r.store);
    println!(
        "  {} events ({} unique, {:.0}% duplicates, {} of them on another partition), {} B payloads, {} partitions",
        r.events,
        r.unique_events,
        r.duplicate_rate * 100.0,
        r.cross_partition_duplicates,
        r.payload_bytes,
        r.partitions
    );
    println!(
        "  {:<12} {:>11} {:>9} {:>13} {:>10} {:>9} {:>9}",
        "", "events/s", "secs", "CPU µs/event", "peak RSS", "p50 ms", "p99 ms"
    );
    for (name, p) in [("passthrough", &r.passthrough), ("kdedup", &r.kdedup.run)] {
        println!(
            "  {:<12} {:>11.0} {:>9.2} {:>13.2} {:>7.0} MiB {:>9.2} {:>9.2}",
            name,
            p.events_per_sec,
            p.elapsed_secs,
            p.cpu_secs_per_event * 1e6,
            p.peak_rss_bytes as f64 / 1048576.0,
            p.latency_p50_ms,
            p.latency_p99_ms
        );
    }
    let d = &r.kdedup.dedup;
    println!("  ratio kdedup/passthrough: {:.2}", r.ratio);
    println!(
        "  per 1000 events: {:.2} store round trips ({:.2} of them reads), {:.2} fsyncs; {:.3} keys read from the store per event",
        d.store_round_trips_per_1000, d.store_reads_per_1000, d.fsyncs_per_1000, d.store_key_reads_per_event
    );
    if let Some(w) = d.writes_per_new_event {
        println!("  store writes per new event: {w:.2}");
    }
    let m = &r.kdedup.memory;
    let mib = |b: u64| b as f64 / 1048576.0;
    let maybe = |b: Option<u64>| b.map_or("not counted".to_string(), |b| format!("{:.0} MiB", mib(b)));
    println!(
        "  memory at the peak: {:.0} MiB resident, {} threads: Rust heap {} (at the end: filter {:.0} MiB, \
         store {}), C heap {} ({} in use){}",
        mib(m.sampled_peak_rss_bytes),
        m.threads,
        m.rust_heap_bytes.map_or("not counted (a process's first pair counts it)".to_string(), |b| format!(
            "{:.0} MiB committed",
            mib(b)
        )),
        mib(m.filter_bytes),
        maybe(m.store_bytes),
        maybe(m.c_heap_bytes),
        maybe(m.c_heap_in_use_bytes),
        match m.other_bytes {
            Some(other) if other >= 0 => format!(", other {:.0} MiB (stacks, code)", mib(other as u64)),
            Some(other) => format!(", {:.0} MiB of which not resident yet", mib(other.unsigned_abs())),
            None => String::new(),
        },
    );
    println!(
        "    the C heap holds the consumer's prefetch: at most {:.0} MiB of records ({:.0} KiB or {} records per partition), \
         and librdkafka's bookkeeping of each and the batches it decompressed them from",
        mib(m.consumer_prefetch_bound_bytes),
        m.prefetch_per_partition_bytes as f64 / 1024.0,
        m.prefetch_per_partition_records
    );
    println!(
        "  filter: recent-cache hits {:.1}%, Bloom hits {:.1}%, Bloom false-positive rate {:.4}%; {} duplicates dropped",
        d.recent_cache_hit_rate * 100.0,
        d.bloom_hit_rate * 100.0,
        d.bloom_false_positive_rate * 100.0,
        d.duplicates_dropped
    );
    println!("  verified: {} ({})", if r.verified { "yes" } else { "NO" }, r.verification);
    if let Some(t) = &r.store_time {
        print_store_time(t);
    }
    if let Some(b) = &r.before_first_record {
        println!(
            "  timed from each run's first record consumed: the passthrough took {:.1} s to get there, kdedup {:.1} s (group join, start)",
            b.passthrough_secs, b.kdedup_secs
        );
    }
}

/// The lines after `--runs` pairs' tables: each figure's median and range.
pub(crate) fn print_summary(s: &RunsSummary) {
    let range = |x: Spread, scale: f64, digits: usize| {
        format!("{:.*} (from {:.*} to {:.*})", digits, x.median * scale, digits, x.min * scale, digits, x.max * scale)
    };
    println!("over {} pairs of runs, alternating on the same input (median, range):", s.runs);
    println!("  ratio kdedup/passthrough: {}", range(s.ratio, 1.0, 2));
    println!("  passthrough events/s:     {}", range(s.passthrough_events_per_sec, 1.0, 0));
    println!("  kdedup events/s:          {}", range(s.kdedup_events_per_sec, 1.0, 0));
    println!("  kdedup CPU µs/event:      {}", range(s.kdedup_cpu_secs_per_event, 1e6, 2));
    println!("  kdedup peak RSS, MiB:     {}", range(s.kdedup_peak_rss_bytes, 1.0 / 1048576.0, 0));
    println!("  verified: {}", if s.verified { "yes, every pair" } else { "NO" });
}

/// The [`StoreTime`] block of the table.
fn print_store_time(t: &StoreTime) {
    println!(
        "  store: {:.0} claims per round trip ({} claim, {} complete statements)",
        t.claims_per_round_trip, t.claim_round_trips, t.complete_round_trips
    );
    let calls: Vec<String> = t
        .calls
        .iter()
        .filter(|c| c.calls > 0)
        .map(|c| format!("{} {} × {:.1} ms ({:.0}%)", c.op, c.calls, c.mean_ms, c.share_of_task_time * 100.0))
        .collect();
    println!("  time of the partition tasks: {}", calls.join(", "));
    println!(
        "  CPU over the kdedup run: kdedup {:.1} s, other processes (store server, broker, the rest) {:.1} s, of {:.1} s the cores offered",
        t.cpu_secs_kdedup, t.cpu_secs_others, t.cpu_secs_available
    );
    println!(
        "  deadlocks: {} (pg_stat_database of the bench's own database {}, dropped); store calls retried: {}",
        t.deadlocks, t.database, t.store_errors_retried
    );
}

#[cfg(test)]
mod tests {
    use super::Spread;

    #[test]
    fn a_spread_has_the_middle_value_or_the_mean_of_the_middle_two() {
        let odd = Spread::of(vec![0.7, 0.5, 0.6]);
        assert_eq!((odd.median, odd.min, odd.max), (0.6, 0.5, 0.7));
        let even = Spread::of(vec![4.0, 1.0, 3.0, 2.0]);
        assert_eq!((even.median, even.min, even.max), (2.5, 1.0, 4.0));
    }

    use super::with_database;

    #[test]
    fn with_database_replaces_only_the_database() {
        let db = "kdedup_bench_1_2";
        assert_eq!(
            with_database("postgres://u@127.0.0.1:5432/postgres", db),
            "postgres://u@127.0.0.1:5432/kdedup_bench_1_2"
        );
        assert_eq!(
            with_database("postgresql://u:p@h/app?sslmode=require", db),
            "postgresql://u:p@h/kdedup_bench_1_2?sslmode=require"
        );
        assert_eq!(with_database("postgres://u@h", db), "postgres://u@h/kdedup_bench_1_2");
        assert_eq!(
            with_database("postgres://u@h?options=-c%20x%3Dy", db),
            "postgres://u@h/kdedup_bench_1_2?options=-c%20x%3Dy"
        );
        assert_eq!(with_database("host=h user=u dbname=app", db), "host=h user=u dbname=app dbname=kdedup_bench_1_2");
    }
}
