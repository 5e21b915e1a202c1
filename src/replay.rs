//! `kdedup replay`: re-reads a partition range through the dedup decision,
//! without joining the live consumer group or moving its offsets.
//!
//! A second driver of the decision core ([`crate::decide`]): it reads by
//! `assign`, one partition after another, in batches of `batch_max`, and
//! - `dry-run` asks the store about every record and changes nothing;
//! - `apply` runs the range through the whole path (claim, effect, complete,
//!   dead-letter), so only events not already done get their effect;
//! - `redrive` forgets each event's key and then applies it: every event in
//!   the range gets its effect once more;
//! - `release` forgets the keys of the range's events.
//!
//! Its claims are the job's ([`Claimant::Replay`]): a replay never resumes or
//! takes over a live owner's claim by position equality, and its writes carry
//! `kdedup-replay: <job>`.
//!
//! `release` and `redrive` delete a row only through
//! [`DedupStore::release_unless_live`], with the job's start as the cut-off: a
//! live owner's in-flight claim is kept (counted `in_flight`), and so is a row
//! claimed after the job began: the job's own redriven claims, or new events of
//! the live group. That is also what makes a key met again later in the range
//! (however far apart) released or redriven once, with no memory that grows
//! with the range.
//!
//! The dry-run and `release` remember the range's events (for the duplicate
//! counts) up to [`SEEN_MAX`] keys; past it, later keys are not remembered and
//! their later copies are classified by the store alone (`seen_full` in the
//! report says so).

use std::collections::{HashMap, HashSet};

/// The most events of a range the dry-run and `release` remember (~100 bytes
/// each: ~100 MB at the bound).
pub const SEEN_MAX: usize = 1 << 20;
use std::io::IsTerminal;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::error::KafkaError;
use rdkafka::message::Message;
use rdkafka::{Offset, TopicPartitionList};
use serde::Serialize;
use tokio::sync::watch;

use crate::config::Config;
use crate::decide::{Claimant, Core, Decision, Driver, Earlier, Item, Stop};
use crate::event::{Envelope, EventKey, Fingerprint, KeyExtractor, Position, Record};
use crate::kafka_client::KafkaClients;
use crate::metrics::Metrics;
use crate::offsets::TopicPartition;
use crate::service::{configured_sink, side_topics};
use crate::sink::{KafkaSink, KafkaWriter, Stopping};
use crate::store::{mark_released, now_ms, ClaimState, DedupStore, Released, Store};

/// What a replay does with its range.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
#[non_exhaustive]
pub enum Mode {
    /// Changes nothing: counts what the decision would say.
    DryRun,
    /// The whole path: effects only for events not already done.
    Apply,
    /// The effect again for every event of the range, then marked done (needs `--yes`).
    Redrive,
    /// Forgets the keys of the range's events in the store (needs `--yes`).
    Release,
}

/// As on the command line (`--mode dry-run`), for people.
impl std::fmt::Display for Mode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Mode::DryRun => "dry-run",
            Mode::Apply => "apply",
            Mode::Redrive => "redrive",
            Mode::Release => "release",
        })
    }
}

/// Where a range starts (inclusive).
#[derive(Debug, Clone, Copy)]
#[non_exhaustive]
pub enum From {
    /// This offset.
    Offset(i64),
    /// Milliseconds since the epoch: the first record at or after it.
    Time(i64),
    /// The live group's committed offset (what it has not committed yet).
    Committed,
}

/// Where a range ends (exclusive).
#[derive(Debug, Clone, Copy)]
#[non_exhaustive]
pub enum To {
    /// This offset.
    Offset(i64),
    /// Milliseconds since the epoch: the first record at or after it.
    Time(i64),
    /// The end of the partition when the replay starts.
    End,
}

/// What `kdedup replay` was asked to do (its flags, parsed).
#[derive(Debug, Clone)]
pub struct ReplayOptions {
    /// The topic; the config's only input topic when `None`.
    pub topic: Option<String>,
    /// Partitions to replay; every partition of the topic when empty.
    pub partitions: Vec<i32>,
    /// Start of the range, inclusive.
    pub from: From,
    /// End of the range, exclusive.
    pub to: To,
    /// What to do with the range.
    pub mode: Mode,
    /// Where effects go instead of the configured output topic (apply, redrive).
    pub to_topic: Option<String>,
    /// Most records per second, across partitions.
    pub max_rate: Option<u32>,
    /// Names the replay's claims and is written as `kdedup-replay` on its writes.
    pub job_id: String,
    /// How many duplicates and conflicts to list (dry-run).
    pub show: usize,
    /// Show progress on standard error.
    pub progress: bool,
}

/// Counts of one partition's range, or of all.
#[derive(Debug, Default, Clone, Copy, Serialize)]
pub struct Counts {
    /// Records read.
    pub records: u64,
    /// New: no live row (dry-run), or claimed and effected (apply, redrive).
    pub new: u64,
    /// Done earlier with the same fingerprint, or an earlier record of the range: a later copy.
    pub duplicate: u64,
    /// Dry-run: already handled here, at this very position (the live group's own work, not a copy).
    pub done: u64,
    /// The ID was first claimed with another fingerprint.
    pub conflict: u64,
    /// Another owner holds a live claim.
    pub in_flight: u64,
    /// Records that cannot be keyed.
    pub bad: u64,
    /// Effects run.
    pub emitted: u64,
    /// Keys forgotten (release).
    pub released: u64,
}

impl Counts {
    fn add(&mut self, o: &Counts) {
        self.records += o.records;
        self.new += o.new;
        self.duplicate += o.duplicate;
        self.done += o.done;
        self.conflict += o.conflict;
        self.in_flight += o.in_flight;
        self.bad += o.bad;
        self.emitted += o.emitted;
        self.released += o.released;
    }
}

/// One partition's range and what was found in it.
#[derive(Debug, Clone, Serialize)]
pub struct PartitionReport {
    /// The partition.
    pub partition: i32,
    /// First offset read.
    pub from: i64,
    /// Offset the range ended before.
    pub to: i64,
    /// What was found.
    #[serde(flatten)]
    pub counts: Counts,
}

/// A duplicate or conflict the dry-run found, with where the event was first seen.
#[derive(Debug, Clone, Serialize)]
pub struct Shown {
    /// `duplicate` or `conflict`.
    pub outcome: &'static str,
    /// Where the record sits, `topic/partition@offset`.
    pub position: String,
    /// The event ID, for humans.
    pub event_id: String,
    /// Where the key was first claimed, when known.
    pub first: String,
}

/// What `kdedup replay` prints at the end (as text or `--json`).
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// The mode it ran in.
    pub mode: Mode,
    /// The job ID its claims and writes carry.
    pub job_id: String,
    /// The topic read.
    pub topic: String,
    /// Sums over partitions.
    #[serde(flatten)]
    pub counts: Counts,
    /// Wall-clock seconds the replay took.
    pub elapsed_secs: f64,
    /// Stopped early (Ctrl-C): the counts cover only what was read.
    pub interrupted: bool,
    /// The range held more than [`SEEN_MAX`] events: later ones were not
    /// remembered, so their later copies in the range were counted by the
    /// store alone (dry-run: as new when the store has no row).
    pub seen_full: bool,
    /// Per partition.
    pub partitions: Vec<PartitionReport>,
    /// The first duplicates and conflicts (dry-run, `--show`).
    pub shown: Vec<Shown>,
}

/// Why a replay could not run, with the exit code `kdedup replay` documents.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ReplayError {
    /// Exit 2.
    #[error("{0}")]
    Usage(String),
    /// Exit 3.
    #[error("{0}")]
    Unreachable(String),
}

impl ReplayError {
    /// The exit code `kdedup replay` documents for this error.
    pub fn exit_code(&self) -> i32 {
        match self {
            ReplayError::Usage(_) => 2,
            ReplayError::Unreachable(_) => 3,
        }
    }
}

fn unreachable(what: &str, e: impl std::fmt::Display) -> ReplayError {
    ReplayError::Unreachable(format!("{what}: {e}"))
}

/// Parses `--from-time` / `--to-time`: RFC 3339, or relative to now (`-2h`, `-30m`, `-45s`, `-1d`).
pub fn parse_time(text: &str, now_ms: i64) -> Result<i64, String> {
    if let Some(rel) = text.strip_prefix('-') {
        let (number, unit) = rel.split_at(rel.find(|c: char| !c.is_ascii_digit()).unwrap_or(rel.len()));
        let n: i64 = number.parse().map_err(|_| format!("`{text}`: expected e.g. -30m, -2h, -1d"))?;
        let unit_ms = match unit {
            "s" => 1_000,
            "m" => 60_000,
            "h" => 3_600_000,
            "d" => 86_400_000,
            _ => return Err(format!("`{text}`: the unit must be s, m, h or d")),
        };
        return Ok(now_ms - n * unit_ms);
    }
    chrono::DateTime::parse_from_rfc3339(text)
        .map(|t| t.timestamp_millis())
        .map_err(|e| format!("`{text}` is neither RFC 3339 (2026-12-01T10:00:00Z) nor relative (-2h): {e}"))
}

/// Runs a replay; `stop` turning true interrupts it (a partial report).
pub async fn run(config: &Config, options: &ReplayOptions, stop: watch::Receiver<bool>) -> Result<Report, ReplayError> {
    let started = Instant::now();
    let topic = job_topic(config, options)?;
    preflight(config, options)?;
    let clients: KafkaClients = (&config.kafka).into();
    let consumer: StreamConsumer = clients
        .reader(&config.kafka.group_id)
        .set("enable.partition.eof", "true")
        .create()
        .map_err(|e| unreachable("cannot create the Kafka reader", e))?;
    // The reader carries the live group's ID, so that --from-committed reads its offsets; it never joins or commits.
    let ranges = tokio::task::block_in_place(|| ranges(&consumer, &topic, options))?;

    let store =
        Store::open(&config.store, &config.retention).map_err(|e| unreachable("cannot open the store ([store])", e))?;
    store.check_schema(config.file.as_deref()).await.map_err(|e| unreachable("the store is not ready", e))?;
    let (core, writer) = match options.mode {
        Mode::Apply | Mode::Redrive => {
            let (core, writer) = writing_core(config, options, store.clone())?;
            (Some(core), Some(writer))
        }
        Mode::DryRun | Mode::Release => (None, None),
    };
    let total: i64 = ranges.iter().map(|(_, from, to)| (to - from).max(0)).sum();
    let progress = Progress::new(options.progress, total as u64);

    let mut report = Report {
        mode: options.mode,
        job_id: options.job_id.clone(),
        topic: topic.clone(),
        counts: Counts::default(),
        elapsed_secs: 0.0,
        interrupted: false,
        seen_full: false,
        partitions: Vec::new(),
        shown: Vec::new(),
    };
    // Rows claimed from here on are not released (see the module's doc). A row
    // claimed within the millisecond the job starts counts as older; the job's
    // own claims come after it.
    let started_ms = now_ms() + 1;
    while now_ms() < started_ms {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let mut job = Job {
        options,
        topic: &topic,
        consumer: &consumer,
        store: &store,
        core: core.as_ref(),
        extractor: KeyExtractor::new(config.key.clone()),
        batch_max: config.pipeline.batch_max.get(),
        started_ms,
        stop: &stop,
        limiter: RateLimiter::new(options.max_rate),
        progress,
        seen: Seen::default(),
        shown: Vec::new(),
    };
    for &(partition, from, to) in &ranges {
        let counts =
            if from < to && !*stop.borrow() { job.partition(partition, from, to).await? } else { Counts::default() };
        report.counts.add(&counts);
        report.partitions.push(PartitionReport { partition, from, to: to.max(from), counts });
    }
    if let Some(writer) = writer {
        tokio::task::block_in_place(|| writer.flush(Duration::from_secs(30)))
            .map_err(|e| unreachable("flushing the producer", e))?;
    }
    job.progress.finish();
    report.shown = job.shown;
    report.interrupted = *stop.borrow();
    report.seen_full = job.seen.full;
    report.elapsed_secs = started.elapsed().as_secs_f64();
    Ok(report)
}

/// The topic to replay: `--topic`, or the config's only one.
fn job_topic(config: &Config, options: &ReplayOptions) -> Result<String, ReplayError> {
    match (&options.topic, config.kafka.topics.as_slice()) {
        (Some(t), _) => Ok(t.clone()),
        (None, [only]) => Ok(only.clone()),
        (None, many) => Err(ReplayError::Usage(format!(
            "the config reads {} topics ({}): say which with --topic",
            many.len(),
            many.join(", ")
        ))),
    }
}

/// Every mode asks the brokers first: a TLS or SASL failure is named (mechanism, listener,
/// librdkafka's reason) instead of surfacing as a bare metadata transport failure. What the
/// job will write must exist before a producer asks for it (kdedup creates no topics).
fn preflight(config: &Config, options: &ReplayOptions) -> Result<(), ReplayError> {
    let mut written = match (options.mode, &options.to_topic) {
        (Mode::DryRun | Mode::Release, _) => Vec::new(),
        (_, Some(t)) => vec![t.clone(), config.dead_letter_topic.clone()],
        (_, None) => crate::kafka_client::written_topics(config),
    };
    written.dedup();
    let kafka = config.kafka.clone();
    match tokio::task::block_in_place(|| crate::kafka_client::preflight(&kafka, &written)) {
        Ok(_) => Ok(()),
        Err(crate::kafka_client::PreflightError::MissingTopics(refusal)) => {
            Err(ReplayError::Usage(format!("topics {refusal}")))
        }
        Err(crate::kafka_client::PreflightError::Unreachable(e)) => Err(ReplayError::Unreachable(e.to_string())),
    }
}

/// A replay job's reader, store and core, and what it carries from one partition to the next.
struct Job<'a> {
    options: &'a ReplayOptions,
    topic: &'a str,
    consumer: &'a StreamConsumer,
    store: &'a Store,
    /// For apply and redrive.
    core: Option<&'a Core>,
    extractor: KeyExtractor,
    batch_max: usize,
    /// Rows claimed from then on are not released.
    started_ms: u64,
    stop: &'a watch::Receiver<bool>,
    limiter: RateLimiter,
    progress: Progress,
    /// Events seen earlier in the range, for the dry-run and release: key digest → (first position, fingerprint).
    seen: Seen,
    /// What a dry-run shows (`--show`).
    shown: Vec<Shown>,
}

impl Job<'_> {
    /// Replays `from..to` of one partition, batch by batch, in the job's mode; its counts
    /// (so far, when stopped).
    async fn partition(&mut self, partition: i32, from: i64, to: i64) -> Result<Counts, ReplayError> {
        let (topic, options) = (self.topic, self.options);
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition_offset(topic, partition, Offset::Offset(from))
            .map_err(|e| unreachable("cannot assign the partition", e))?;
        self.consumer.assign(&tpl).map_err(|e| unreachable("cannot assign the partition", e))?;
        let mut driver =
            ReplayDriver { tp: (Arc::from(topic), partition), stop: self.stop.clone(), counts: Counts::default() };
        // A replay re-reads a range the live group may have handled already, so
        // its dead letters (bad records, conflicts) may repeat the group's: each
        // is marked `kdedup-possible-repeat` (besides `kdedup-replay`). They are
        // still written, since the range may hold records nobody dead-lettered
        // (a group whose offsets were reset past them); a reader dedups them by
        // their `kdedup-source-*` position.
        let mut earlier = Earlier::everything_reached();
        let mut next = from;
        while next < to {
            let to_end = matches!(options.to, To::End);
            let batch =
                read_batch(self.consumer, (topic, partition), &mut next, to, self.batch_max, to_end, self.stop).await?;
            if batch.is_empty() {
                break;
            }
            let n = batch.len() as u64;
            self.limiter.wait(n, self.stop).await;
            let (extractor, store, counts) = (&self.extractor, self.store, &mut driver.counts);
            let result = match (options.mode, self.core) {
                (Mode::DryRun, _) => {
                    dry_run(extractor, store, batch, &mut self.seen, counts, options.show, &mut self.shown).await
                }
                (Mode::Release, _) => release(extractor, store, batch, &mut self.seen, self.started_ms, counts).await,
                (Mode::Apply, Some(core)) => {
                    core.run_batch(&mut driver, batch, Instant::now(), &mut earlier).await.map_err(stopped)
                }
                (Mode::Redrive, Some(core)) => redrive(core, &mut driver, batch, self.started_ms).await,
                (_, None) => unreachable!("apply and redrive have a core"),
            };
            match result {
                Ok(()) => {}
                Err(Interrupted::Stopped) => break,
                Err(Interrupted::Store(e)) => return Err(unreachable("the store failed", e)),
            }
            self.progress.advance(n);
        }
        self.consumer.unassign().map_err(|e| unreachable("cannot unassign the partition", e))?;
        Ok(driver.counts)
    }
}

/// The core that writes: the configured sink, or `--to-topic`; the configured dead-letter topic.
fn writing_core(config: &Config, options: &ReplayOptions, store: Store) -> Result<(Core, KafkaWriter), ReplayError> {
    let writer =
        KafkaWriter::new(&(&config.kafka).into()).map_err(|e| unreachable("cannot create the Kafka producer", e))?;
    let metrics = Metrics::new();
    let sink = match &options.to_topic {
        Some(topic) => crate::sink::AnySink::Kafka(
            KafkaSink::new(writer.clone(), topic, crate::config::Partitioning::Source)
                .map_err(|e| ReplayError::Usage(format!("--to-topic `{topic}` must exist: {e}")))?,
        ),
        None => {
            configured_sink(config, &writer, None, &metrics).map_err(|e| unreachable("the output", format!("{e:#}")))?
        }
    };
    let mut side = side_topics(config, &writer).map_err(|e| unreachable("the side topics", format!("{e:#}")))?;
    side.duplicates = None;
    side.replay = Some(Arc::from(options.job_id.as_str()));
    let claimant = Claimant::Replay(Arc::from(options.job_id.as_str()));
    let core = Core::new(config, store, sink, side, metrics, claimant)
        .map_err(|e| ReplayError::Usage(format!("[filter]: {e}")))?;
    Ok((core, writer))
}

/// Each partition's `(partition, from, to)`, from the broker's offsets.
fn ranges(
    consumer: &StreamConsumer,
    topic: &str,
    options: &ReplayOptions,
) -> Result<Vec<(i32, i64, i64)>, ReplayError> {
    let timeout = Duration::from_secs(10);
    let wanted = wanted_partitions(consumer, topic, options, timeout)?;
    let committed = committed_offsets(consumer, topic, &wanted, options, timeout)?;
    let at_time = |t: i64| -> Result<HashMap<i32, i64>, ReplayError> {
        let mut tpl = TopicPartitionList::new();
        for &p in &wanted {
            tpl.add_partition_offset(topic, p, Offset::Offset(t)).map_err(|e| unreachable("offsets for times", e))?;
        }
        let found =
            consumer.offsets_for_times(tpl, timeout).map_err(|e| unreachable("cannot map times to offsets", e))?;
        Ok(crate::kafka_client::known_offsets(&found).collect())
    };
    let from_times = match options.from {
        From::Time(t) => Some(at_time(t)?),
        _ => None,
    };
    let to_times = match options.to {
        To::Time(t) => Some(at_time(t)?),
        _ => None,
    };
    let mut out = Vec::new();
    for p in wanted {
        let (low, high) = consumer
            .fetch_watermarks(topic, p, timeout)
            .map_err(|e| unreachable("cannot read the partition's offsets", e))?;
        if let Some(Offset::Offset(c)) = committed.get(&p).copied().flatten() {
            if let Some(warning) = end_below_committed(topic, p, high, c) {
                tracing::warn!("{warning}");
            }
        }
        // A time past the last record maps to the end.
        let from = match options.from {
            From::Offset(n) => n.max(low),
            From::Time(_) => from_times.as_ref().and_then(|m| m.get(&p)).copied().unwrap_or(high).max(low),
            From::Committed => match committed.get(&p).copied().flatten() {
                Some(Offset::Offset(o)) => o.max(low),
                _ => low,
            },
        };
        // Nothing lies past the high watermark: an explicit end beyond it ends there
        // (instead of waiting for records that are not there); a start at or past the
        // end is empty. (tansu, the old test broker, reported it wrong; Kafka does not.)
        let to = match options.to {
            To::Offset(n) => n.min(high),
            To::Time(_) => to_times.as_ref().and_then(|m| m.get(&p)).copied().unwrap_or(high),
            To::End => high,
        };
        out.push((p, from, if from >= high { from } else { to }));
    }
    Ok(out)
}

/// The partitions to replay: `--partition`s, or all of the topic's; errors name what is missing.
fn wanted_partitions(
    consumer: &StreamConsumer,
    topic: &str,
    options: &ReplayOptions,
    timeout: Duration,
) -> Result<Vec<i32>, ReplayError> {
    let metadata = consumer
        .fetch_metadata(Some(topic), timeout)
        .map_err(|e| unreachable("cannot read the topic's metadata from the brokers", e))?;
    let known: Vec<i32> = metadata
        .topics()
        .iter()
        .find(|t| t.name() == topic && t.error().is_none())
        .map(|t| t.partitions().iter().map(|p| p.id()).collect())
        .unwrap_or_default();
    if known.is_empty() {
        return Err(ReplayError::Usage(format!("topic `{topic}` does not exist (or has no partitions)")));
    }
    let wanted = if options.partitions.is_empty() { known.clone() } else { options.partitions.clone() };
    if let Some(p) = wanted.iter().find(|p| !known.contains(p)) {
        return Err(ReplayError::Usage(format!(
            "topic `{topic}` has no partition {p} (it has {} partitions: 0 to {})",
            known.len(),
            known.len() - 1
        )));
    }
    Ok(wanted)
}

/// The live group's committed offsets: the start of --from-committed, and a check of the
/// broker's end for every range (a failure to read them only fails --from-committed).
fn committed_offsets(
    consumer: &StreamConsumer,
    topic: &str,
    wanted: &[i32],
    options: &ReplayOptions,
    timeout: Duration,
) -> Result<HashMap<i32, Option<Offset>>, ReplayError> {
    let mut tpl = TopicPartitionList::new();
    for &p in wanted {
        tpl.add_partition(topic, p);
    }
    match consumer.committed_offsets(tpl, timeout) {
        Ok(c) => Ok(wanted.iter().map(|&p| (p, c.find_partition(topic, p).map(|e| e.offset()))).collect()),
        Err(e) if matches!(options.from, From::Committed) => {
            Err(unreachable("cannot read the group's committed offsets", e))
        }
        Err(e) => {
            tracing::debug!(error = %e, "cannot read the group's committed offsets; the end is not checked against them");
            Ok(HashMap::new())
        }
    }
}

/// The warning for a partition whose end, as the broker gives it, lies below the live
/// group's committed offset: the group read records that the broker now says are not there.
fn end_below_committed(topic: &str, partition: i32, high: i64, committed: i64) -> Option<String> {
    (high < committed).then(|| {
        format!(
            "{topic}/{partition}: the broker says the partition ends at offset {high}, below the group's committed \
             offset {committed}: its end (high watermark) is wrong, or the log lost records the group had read \
             (an unclean leader election, a topic deleted and created again); the replay reads only up to {high}"
        )
    })
}

/// Reads up to `max` records below `to` from the assigned partition, starting at `*next`.
async fn read_batch(
    consumer: &StreamConsumer,
    (topic, partition): (&str, i32),
    next: &mut i64,
    to: i64,
    max: usize,
    to_end: bool,
    stop: &watch::Receiver<bool>,
) -> Result<Vec<Record>, ReplayError> {
    let topic: Arc<str> = Arc::from(topic);
    let mut batch = Vec::new();
    let mut stop = stop.clone();
    while batch.len() < max && *next < to {
        let received = tokio::select! {
            biased;
            _ = stop.wait_for(|s| *s) => break,
            // Nothing for this long below the range's end: the rest was compacted or aborted.
            m = tokio::time::timeout(Duration::from_secs(10), consumer.recv()) => m,
        };
        match received {
            Err(_) => {
                tracing::warn!(%topic, next = *next, to, "no record for 10 s before the range's end; ending this partition there");
                *next = to;
            }
            // The end as the broker sees it: the range ends there only when it is
            // "to the end" (an explicit end is read up to; see `ranges`).
            Ok(Err(KafkaError::PartitionEOF(_))) if to_end => {
                if batch.is_empty() {
                    *next = to;
                }
                break;
            }
            Ok(Err(KafkaError::PartitionEOF(_))) => {}
            Ok(Err(e)) => return Err(unreachable("reading the topic failed", e)),
            Ok(Ok(m)) if m.partition() != partition => {}
            Ok(Ok(m)) => {
                *next = m.offset() + 1;
                if m.offset() < to {
                    batch.push(Record::from_message(&m, &topic));
                }
            }
        }
    }
    Ok(batch)
}

enum Interrupted {
    Stopped,
    Store(crate::error::StoreError),
}

fn stopped(_: Stop) -> Interrupted {
    Interrupted::Stopped
}

/// Classifies each record against the range so far and the store, changing nothing.
async fn dry_run(
    extractor: &KeyExtractor,
    store: &Store,
    batch: Vec<Record>,
    seen: &mut Seen,
    counts: &mut Counts,
    show: usize,
    shown: &mut Vec<Shown>,
) -> Result<(), Interrupted> {
    let mut keyed: Vec<Envelope> = Vec::new();
    for record in batch {
        counts.records += 1;
        match extractor.extract(record) {
            Ok(e) => keyed.push(e),
            Err(_) => counts.bad += 1,
        }
    }
    let rows =
        store.lookup(keyed.iter().map(|e| e.key.clone()).collect(), now_ms()).await.map_err(Interrupted::Store)?;
    for (e, row) in keyed.iter().zip(rows) {
        let outcome = match seen.map.get(&e.digest) {
            Some((first, fp)) => Some((if *fp == e.fingerprint { "duplicate" } else { "conflict" }, first.to_string())),
            None => {
                seen.remember(e);
                match row {
                    None => None,
                    Some(row) if row.state == ClaimState::InFlight => {
                        Some(("in_flight", claimant_display(&row.position)))
                    }
                    // Claimed at this very record: the original, handled here already, not a copy of itself.
                    Some(row) if claimed_at(&row.position, &e.record.position) && row.fingerprint == e.fingerprint => {
                        Some(("done", claimant_display(&row.position)))
                    }
                    Some(row) if row.fingerprint == e.fingerprint => {
                        Some(("duplicate", claimant_display(&row.position)))
                    }
                    Some(row) => Some(("conflict", claimant_display(&row.position))),
                }
            }
        };
        match outcome {
            None => counts.new += 1,
            Some((outcome, first)) => {
                match outcome {
                    "duplicate" => counts.duplicate += 1,
                    "conflict" => counts.conflict += 1,
                    "done" => counts.done += 1,
                    _ => counts.in_flight += 1,
                }
                if (outcome == "duplicate" || outcome == "conflict") && shown.len() < show {
                    shown.push(Shown {
                        outcome,
                        position: e.record.position.to_string(),
                        event_id: e.key.display_id(),
                        first,
                    });
                }
            }
        }
    }
    Ok(())
}

/// A claim row's claimant as a person reads it: `topic/partition@offset`, and for a replay
/// job's claim (`replay:JOB:TOPIC`, see `decide::Core::claimant`) `topic/partition@offset
/// (replay job JOB)` instead of the encoded topic (a topic name holds no `:`; a job ID may).
pub fn claimant_display(claimant: &Position) -> String {
    let Some((job, topic)) = claimant.topic.strip_prefix("replay:").and_then(|rest| rest.rsplit_once(':')) else {
        return claimant.to_string();
    };
    format!("{topic}/{}@{} (replay job {job})", claimant.partition, claimant.offset)
}

/// Whether a claim row's claimant is this very record: the live group's claim at its position,
/// or a replay job's (`replay:JOB:TOPIC`, see `decide::Core::claimant`) at the same place.
fn claimed_at(claimant: &Position, record: &Position) -> bool {
    let same_topic = claimant.topic == record.topic
        || claimant
            .topic
            .strip_prefix("replay:")
            .and_then(|rest| rest.strip_suffix(&*record.topic))
            .is_some_and(|job| job.ends_with(':'));
    same_topic && claimant.partition == record.partition && claimant.offset == record.offset
}

/// Events of the range met so far, up to [`SEEN_MAX`].
#[derive(Default)]
struct Seen {
    map: HashMap<u128, (Position, Fingerprint)>,
    full: bool,
}

impl Seen {
    /// Remembers `e`'s event; `false` if it was met before.
    fn remember(&mut self, e: &Envelope) -> bool {
        if self.map.contains_key(&e.digest) {
            return false;
        }
        if self.map.len() >= SEEN_MAX {
            self.full = true;
        } else {
            self.map.insert(e.digest, (e.record.position.clone(), e.fingerprint));
        }
        true
    }
}

/// Releases the keys of the batch's events: deleted unless a live owner holds
/// them in flight or they were claimed since the job began.
async fn release(
    extractor: &KeyExtractor,
    store: &Store,
    batch: Vec<Record>,
    seen: &mut Seen,
    started_ms: u64,
    counts: &mut Counts,
) -> Result<(), Interrupted> {
    // The scope of the keys deleted, if any: live processes' caches must hear of it.
    let mut scope = None;
    for record in batch {
        counts.records += 1;
        let e = match extractor.extract(record) {
            Ok(e) => e,
            Err(_) => {
                counts.bad += 1;
                continue;
            }
        };
        if !seen.remember(&e) {
            counts.duplicate += 1;
            continue;
        }
        match store.release_unless_live(e.key.clone(), now_ms(), started_ms).await.map_err(Interrupted::Store)? {
            Released::Deleted => {
                counts.released += 1;
                scope.get_or_insert(e.key.scope);
            }
            Released::Live(row) => {
                counts.in_flight += 1;
                tracing::warn!(position = %e.record.position, holder = %row.position, "kept: a live owner holds this key in flight; release it again once it is done");
            }
            Released::Absent | Released::Newer(_) => {}
        }
    }
    store.sync().map_err(Interrupted::Store)?;
    if let Some(scope) = scope {
        mark_released(store, &scope, now_ms()).await.map_err(Interrupted::Store)?;
    }
    Ok(())
}

/// Releases the batch's keys (as `release` does), then applies it: every event's
/// effect runs once more. A key this job already redrove was claimed after it
/// began, so it is kept and its later copies are duplicates; a live owner's
/// in-flight claim is kept too, and the core waits for it like any other.
async fn redrive(
    core: &Core,
    driver: &mut ReplayDriver,
    batch: Vec<Record>,
    started_ms: u64,
) -> Result<(), Interrupted> {
    let mut asked: HashSet<EventKey> = HashSet::new();
    let mut scope = None;
    for record in &batch {
        if let Ok(e) = core.extractor.extract(record.clone()) {
            if asked.insert(e.key.clone()) {
                let released = core
                    .store
                    .release_unless_live(e.key.clone(), now_ms(), started_ms)
                    .await
                    .map_err(Interrupted::Store)?;
                if released == Released::Deleted {
                    core.filter.lock().unwrap_or_else(|p| p.into_inner()).forget(e.digest);
                    scope.get_or_insert(e.key.scope);
                }
            }
        }
    }
    if let Some(scope) = scope {
        mark_released(&core.store, &scope, now_ms()).await.map_err(Interrupted::Store)?;
    }
    core.run_batch(driver, batch, Instant::now(), &mut Earlier::everything_reached()).await.map_err(stopped)
}

/// The replay's driver of the core: counts what each round decided.
struct ReplayDriver {
    tp: TopicPartition,
    stop: watch::Receiver<bool>,
    counts: Counts,
}

impl Driver for ReplayDriver {
    fn partition(&self) -> &TopicPartition {
        &self.tp
    }

    fn pause(&self, wait: Duration) -> impl std::future::Future<Output = Result<(), Stop>> + Send {
        let mut stop = self.stop.clone();
        async move {
            tokio::select! {
                biased;
                _ = stop.wait_for(|s| *s) => Err(Stop::Draining),
                _ = tokio::time::sleep(wait) => Ok(()),
            }
        }
    }

    fn before_writes(&self, _since_ms: u64) -> impl std::future::Future<Output = Result<(), Stop>> + Send {
        let stopping = *self.stop.borrow();
        async move {
            if stopping {
                Err(Stop::Draining)
            } else {
                Ok(())
            }
        }
    }

    /// The sink's own waits (HTTP backoff, Retry-After) end when the replay is interrupted.
    fn stopping(&self) -> Stopping {
        Stopping::on(self.stop.clone())
    }

    fn finished(&mut self, items: &[Item]) {
        for item in items {
            self.counts.records += 1;
            match item {
                Item::Bad { .. } => self.counts.bad += 1,
                Item::Keyed { decision: Some(Decision::New { .. }), .. } => {
                    self.counts.new += 1;
                    self.counts.emitted += 1;
                }
                Item::Keyed { decision: Some(Decision::Duplicate { .. }), .. } => self.counts.duplicate += 1,
                Item::Keyed { decision: Some(Decision::Conflict { .. }), .. } => self.counts.conflict += 1,
                Item::Keyed { decision: None, .. } => {}
            }
        }
    }
}

/// `--max-rate`: records per second, on average since the start.
struct RateLimiter {
    per_sec: Option<u32>,
    started: Instant,
    done: u64,
}

impl RateLimiter {
    fn new(per_sec: Option<u32>) -> RateLimiter {
        RateLimiter { per_sec, started: Instant::now(), done: 0 }
    }

    async fn wait(&mut self, n: u64, stop: &watch::Receiver<bool>) {
        let Some(rate) = self.per_sec.filter(|r| *r > 0) else { return };
        let due = Duration::from_secs_f64(self.done as f64 / rate as f64);
        self.done += n;
        if let Some(wait) = due.checked_sub(self.started.elapsed()) {
            let mut stop = stop.clone();
            tokio::select! {
                _ = stop.wait_for(|s| *s) => {}
                _ = tokio::time::sleep(wait) => {}
            }
        }
    }
}

/// Progress on stderr: one updating line on a terminal, a plain line every few seconds otherwise.
struct Progress {
    on: bool,
    terminal: bool,
    total: u64,
    done: u64,
    started: Instant,
    last: Instant,
}

impl Progress {
    fn new(on: bool, total: u64) -> Progress {
        let now = Instant::now();
        Progress { on, terminal: std::io::stderr().is_terminal(), total, done: 0, started: now, last: now }
    }

    fn advance(&mut self, n: u64) {
        if self.done == 0 {
            // The rate counts from the first records, not from the setup before them (a store
            // opening, a broker answering), which would make the first estimates far too long.
            self.started = Instant::now();
        }
        self.done += n;
        let every = if self.terminal { Duration::from_millis(200) } else { Duration::from_secs(5) };
        if !self.on || self.last.elapsed() < every {
            return;
        }
        self.last = Instant::now();
        let (rate, eta) = rate_and_eta(self.done, self.total, self.started.elapsed());
        let line = format!("{} of {} records, {:.0}/s, ETA {:.0}s", self.done, self.total, rate, eta);
        if self.terminal {
            eprint!("\r{line}   ");
        } else {
            eprintln!("{line}");
        }
    }

    fn finish(&self) {
        if self.on && self.terminal && self.done > 0 {
            eprintln!();
        }
    }
}

/// Records a second so far, and the seconds left at that rate, from `done` of `total`
/// records read in `elapsed` (counted from the first record).
fn rate_and_eta(done: u64, total: u64, elapsed: Duration) -> (f64, f64) {
    let rate = done as f64 / elapsed.as_secs_f64().max(0.001);
    (rate, total.saturating_sub(done) as f64 / rate.max(1.0))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_eta_is_the_rest_at_the_rate_so_far() {
        // A 31 s job, 10 s in: about 21 s left, not an hour.
        let (rate, eta) = rate_and_eta(10_000, 31_000, Duration::from_secs(10));
        assert_eq!((rate, eta), (1000.0, 21.0));
        assert_eq!(rate_and_eta(5, 5, Duration::from_secs(1)).1, 0.0, "nothing left");
        assert_eq!(rate_and_eta(31_000, 1_000, Duration::from_secs(1)).1, 0.0, "more read than counted");
    }

    #[test]
    fn a_replay_jobs_claim_reads_as_its_place_and_job() {
        let at = |topic: &str| Position { topic: topic.into(), partition: 1, offset: 2 };
        assert_eq!(claimant_display(&at("replay:incident-42:orders")), "orders/1@2 (replay job incident-42)");
        assert_eq!(claimant_display(&at("orders")), "orders/1@2");
        // A topic name holds no ':', a job ID may.
        assert_eq!(claimant_display(&at("replay:a:b:orders")), "orders/1@2 (replay job a:b)");
    }

    #[test]
    fn an_end_below_the_committed_offset_is_named() {
        let said = end_below_committed("orders", 3, 100, 250).unwrap();
        assert!(
            said.starts_with(
                "orders/3: the broker says the partition ends at offset 100, below the group's committed offset 250"
            ),
            "{said}"
        );
        assert_eq!(end_below_committed("orders", 3, 250, 250), None);
    }

    #[test]
    fn times_are_rfc3339_or_relative() {
        assert_eq!(parse_time("1970-01-01T00:00:01Z", 0), Ok(1000));
        assert_eq!(parse_time("2026-12-01T10:00:00+01:00", 0), Ok(1_796_115_600_000));
        assert_eq!(parse_time("-2h", 10_000_000), Ok(10_000_000 - 7_200_000));
        assert_eq!(parse_time("-30m", 2_000_000), Ok(200_000));
        assert!(parse_time("-2w", 0).unwrap_err().contains("unit"));
        assert!(parse_time("yesterday", 0).unwrap_err().contains("RFC 3339"));
    }
}
