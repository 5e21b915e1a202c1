//! The per-partition task of `kdedup run`: the consumer-group plumbing around
//! the decision core ([`crate::decide`]). It takes batches from one
//! partition's queue, tracks their offsets and publishes the contiguous
//! watermark for the commit, reconciles what an earlier owner wrote after the
//! last commit before its first batch, and stops when the partition is
//! revoked. Batches of one partition run one after another, so a key seen
//! again in the next batch finds the first one completed.
//!
//! Before every write (each effect attempt, each dead-letter and duplicates
//! write), the task checks it still owns its partition: if the process was
//! frozen (SIGSTOP, a VM pause) for half the session timeout or more since the
//! last check, it waits for the group's word (a revoke) for a few heartbeats
//! before writing, so a thawed zombie writes nothing for partitions already
//! reassigned.
//!
//! An error on the partition's queue (a batch librdkafka cannot decode: a
//! corrupt or unknown compressed batch, a failed CRC, an unsupported record
//! format; a refused fetch) stalls the partition, loudly, until a record
//! arrives at the next offset expected. librdkafka re-fetches a batch it cannot
//! decompress for ever, but skips one that fails its CRC or has an unknown
//! format when later batches of the same fetch decode. So a record that comes
//! after an error *past* the next expected offset may mean records were
//! skipped, or that compaction or transaction markers left a gap there (those
//! leave gaps with no error too). The queue is then read again from the first
//! offset missing: the same gap read without an error is taken; after an error
//! again, records were skipped, and the partition stops there (nothing at or
//! after the gap is processed, so no commit passes it) and stays stalled until
//! it is revoked; its next owner starts again from the commit. See [`Continuity`].
//!
//! A fatal producer error or a panicking partition task stops the process
//! with a non-zero exit (see [`Fatal`]).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::{FutureExt, StreamExt};
use tokio::sync::watch;
use tracing::{debug, error, info, warn};

use crate::backoff::Backoff;
use crate::decide::{Core, Driver, Earlier, Item, Landed, Stop};
use crate::event::Record;
use crate::offsets::{CommitBook, LogMarks, OffsetTracker, OutputMark, TopicPartition};
use crate::reconcile::{Log, Reconciler, Share};
use crate::sink::{AnySink, Stopping};
use crate::source::{PartitionHandler, PartitionQueue, Resume, Rewind};
use crate::store::now_ms;

/// Why a partition stopped at a gap, as the status page says it.
const GAP: &str = "records were not delivered after an error on this partition; it stops at the first one \
                   missing (the log says what to check)";

/// Notices that this process was frozen (SIGSTOP, a paused VM, a starved
/// host) for long enough that the group may have given its partitions away.
/// A ticker records every tick; a tick that comes late by half the session
/// timeout or more marks a freeze.
pub struct Liveness {
    /// When the last freeze ended (ms since the epoch; 0: never).
    thawed_at_ms: AtomicU64,
    /// A gap between ticks this long is a freeze.
    freeze_after: Duration,
    /// How long a task that saw a freeze waits for a revoke before writing.
    confirm_for: Duration,
}

impl Liveness {
    /// From the consumer's `session.timeout.ms` and `heartbeat.interval.ms`.
    pub fn new(session_timeout: Duration, heartbeat_interval: Duration) -> Liveness {
        Liveness {
            thawed_at_ms: AtomicU64::new(0),
            freeze_after: (session_timeout / 2).max(Duration::from_millis(200)),
            // A thawed member's next heartbeat learns it was expelled; a few of them.
            confirm_for: (heartbeat_interval * 3 + Duration::from_millis(500)).min(session_timeout),
        }
    }

    /// Ticks until the runtime stops; spawn it once per process.
    pub async fn watch(self: Arc<Self>) {
        let tick = (self.freeze_after / 4).clamp(Duration::from_millis(10), Duration::from_millis(250));
        let mut last = Instant::now();
        loop {
            tokio::time::sleep(tick).await;
            let now = Instant::now();
            let gap = now.duration_since(last);
            if gap >= self.freeze_after {
                warn!(
                    frozen_ms = gap.as_millis() as u64,
                    "this process was frozen; partitions check they are still owned before writing"
                );
                self.thawed_at_ms.store(now_ms(), Ordering::SeqCst);
            }
            last = now;
        }
    }

    /// When the last freeze ended, if one ended after `since_ms`.
    fn thawed_since(&self, since_ms: u64) -> Option<u64> {
        let thawed = self.thawed_at_ms.load(Ordering::SeqCst);
        (thawed > 0 && thawed >= since_ms).then_some(thawed)
    }
}

/// Everything a partition task needs; shared by all partition tasks.
pub struct Stages {
    /// The decision, shared with replay.
    pub core: Core,
    /// Where partition tasks publish their watermarks for the committer.
    pub book: Arc<CommitBook>,
    /// Reads the output and dead-letter topics back on assignment.
    pub reconciler: Reconciler,
    /// Whether this process was frozen long enough to have lost its partitions.
    pub liveness: Arc<Liveness>,
}

impl Stages {
    /// The output log an input partition writes to, when it is fixed.
    fn output_log(&self, input_partition: i32, mark: Option<OutputMark>) -> Option<Log> {
        match self.core.sink.undecorated() {
            AnySink::Kafka(k) => k.output_partition(input_partition).map(|partition| Log {
                topic: k.topic().to_string(),
                partition,
                mark,
            }),
            // The HTTP sink's log is its results topic, when it has one.
            AnySink::Http(h) => h.results_log(input_partition).map(|(topic, partition)| Log {
                topic: topic.to_string(),
                partition,
                mark,
            }),
            _ => None,
        }
    }

    fn dead_letter_log(&self, input_partition: i32, mark: Option<OutputMark>) -> Log {
        Log {
            topic: self.core.side.dead_letter.clone(),
            partition: self.core.side.dead_letter_partition(input_partition),
            mark,
        }
    }

    /// Waits until this process's own writes for `input` to its logs have
    /// resolved: an abandoned task's writes may still be queued, and must land
    /// before anyone reads those logs back. Other input partitions' writes to
    /// the same logs are not waited for (under load they never stop).
    async fn settle_logs(&self, input: &TopicPartition) {
        if let Some(out) = self.output_log(input.1, None) {
            self.core.side.writer.settled(&out.topic, out.partition, input).await;
        }
        let dead_letter = self.dead_letter_log(input.1, None);
        self.core.side.writer.settled(&dead_letter.topic, dead_letter.partition, input).await;
    }
}

/// How long a partition waits idle before it looks whether the consumer skipped past offsets
/// that hold no record (see [`OffsetTracker::skip_to`]).
const IDLE_SKIP: Duration = Duration::from_millis(200);

/// One partition's worker.
pub struct PartitionTask {
    tp: TopicPartition,
    stages: Arc<Stages>,
    stop: watch::Receiver<bool>,
    tracker: OffsetTracker,
    resume: Resume,
    /// The writes reconciliation found (met and taken out by the batches that
    /// pass them), and the highest offset an earlier owner is known to have reached.
    earlier: Earlier,
    /// The share of the process's reconciliation budget the two maps hold; given back once both are empty.
    share: Share,
    /// Where this partition's latest writes for records below the watermark landed, plus one.
    logs: LogMarks,
    /// Writes for records not yet below the watermark (a record set aside may
    /// hold it back): (source offset, log, where). A commit's marks stay at or
    /// below the first of them, so the next owner's reconciliation finds them.
    unsettled: Vec<(i64, Landed, OutputMark)>,
    /// What the partition's queue delivered: tells a gap an error left from a normal one.
    continuity: Continuity,
    /// Moves the partition's fetch position back, to read a gap after an error again.
    rewind: Rewind,
    /// The end of the last freeze after which the group was found to keep this partition.
    confirmed_thaw_ms: AtomicU64,
    /// Whether nearly every recent record is dead-lettered for the same reason.
    dead_letters: DeadLetterWatch,
}

/// Watches a partition's records in windows of [`DeadLetterWatch::WINDOW`]: when nearly all
/// of a window are dead-lettered for one reason (the sample config's header on events that
/// carry none: every record `missing_id`, every offset committed), it says so once, loudly,
/// and again when it ends. Readiness stays true: the partition progresses and commits, and a
/// restart would change nothing; it is the data or `[key]` that needs a person, and the
/// metric and the alert reach one.
#[derive(Debug, Default)]
pub(crate) struct DeadLetterWatch {
    records: u32,
    reasons: HashMap<&'static str, u32>,
    /// The reason of the streak being reported, if one is.
    loud: Option<&'static str>,
}

/// What a window ended with.
#[derive(Debug, PartialEq)]
pub(crate) enum DeadLetterVerdict {
    /// Nothing to say (the window is not full, or nothing changed).
    Quiet,
    /// The share of the window dead-lettered for its most common reason.
    Share(f64),
    /// A streak began: nearly all dead-lettered for this reason, with the share.
    Began(&'static str, f64),
    /// The streak of this reason ended, with the share now.
    Ended(&'static str, f64),
}

impl DeadLetterWatch {
    /// Records per window.
    pub(crate) const WINDOW: u32 = 200;
    /// The share of a window above which it is "nearly all".
    pub(crate) const NEARLY_ALL: f64 = 0.9;

    /// Counts one finished record (`reason`: why it was dead-lettered, if it was).
    pub(crate) fn record(&mut self, reason: Option<&'static str>) -> DeadLetterVerdict {
        self.records += 1;
        if let Some(reason) = reason {
            *self.reasons.entry(reason).or_default() += 1;
        }
        if self.records < Self::WINDOW {
            return DeadLetterVerdict::Quiet;
        }
        let top = self.reasons.iter().max_by_key(|(_, n)| **n).map(|(r, n)| (*r, *n));
        let share = top.map_or(0.0, |(_, n)| f64::from(n) / f64::from(self.records));
        self.records = 0;
        self.reasons.clear();
        match (top, self.loud) {
            (Some((reason, _)), None) if share >= Self::NEARLY_ALL => {
                self.loud = Some(reason);
                DeadLetterVerdict::Began(reason, share)
            }
            (top, Some(was)) if share < Self::NEARLY_ALL || top.is_some_and(|(r, _)| r != was) => {
                self.loud = None;
                DeadLetterVerdict::Ended(was, share)
            }
            _ => DeadLetterVerdict::Share(share),
        }
    }
}

/// What one partition's queue delivered so far, to tell a gap in offsets that
/// an error left (librdkafka skipped a batch it could not decode) from one that
/// compaction or transaction markers leave (no error before it).
#[derive(Debug, Default)]
struct Continuity {
    /// The offset the next record should have: the last delivered plus one
    /// (before any, the committed offset, when there is one).
    next: Option<i64>,
    /// Why the queue last reported an error, when no record came since.
    error: Option<&'static str>,
    /// The queue was moved back to `next` after a gap that followed an error, to
    /// read it again: a gap read again without an error is compaction or markers.
    rewound: bool,
}

/// How a record arrived, seen against what came before it.
#[derive(Debug, PartialEq, Eq)]
enum Arrival {
    /// No error since the last record (a gap, if any, is compaction or markers).
    InOrder,
    /// At the next offset expected after an error: the error did not cost a record.
    Recovered,
    /// After an error and not at the next offset expected (or with nothing to
    /// compare with): read again from `from` (the log start when unknown).
    ReadAgain {
        /// The first offset not delivered, when known.
        from: Option<i64>,
    },
    /// The same after reading again: records from `from` on were skipped.
    Gap {
        /// The first offset not delivered, when known.
        from: Option<i64>,
        /// The error's reason.
        reason: &'static str,
    },
}

impl Continuity {
    fn starting_at(committed: Option<i64>) -> Continuity {
        Continuity { next: committed, error: None, rewound: false }
    }

    /// The queue reported an error; returns whether it starts a streak (the first since a record).
    fn error(&mut self, reason: &'static str) -> bool {
        self.error.replace(reason).is_none()
    }

    /// A record arrived at `offset`. At [`Arrival::ReadAgain`] the caller moves
    /// the queue back to `from`; at a gap it stops taking records.
    fn record(&mut self, offset: i64) -> Arrival {
        let arrival = match self.error {
            None => Arrival::InOrder,
            Some(_) if self.next == Some(offset) => Arrival::Recovered,
            Some(_) if !self.rewound => {
                self.rewound = true;
                self.error = None;
                return Arrival::ReadAgain { from: self.next };
            }
            Some(reason) => return Arrival::Gap { from: self.next, reason },
        };
        self.error = None;
        self.rewound = false;
        self.next = Some(offset + 1);
        arrival
    }
}

/// What taking a polled message left the batch at.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Taken {
    /// Go on taking records.
    More,
    /// Stop the batch here and read the partition again from this offset (its start when `None`).
    ReadAgain(Option<i64>),
    /// Stop the batch here, and the partition for good: records were skipped.
    Gap,
}

/// The `reason` label of a partition queue's error.
fn queue_error_reason(e: &rdkafka::error::KafkaError) -> &'static str {
    use rdkafka::types::RDKafkaErrorCode as C;
    match e.rdkafka_error_code() {
        Some(
            C::BadMessage
            | C::BadCompression
            | C::NotImplemented
            | C::Underflow
            | C::InvalidMessage
            | C::InvalidRecord
            | C::UnsupportedCompressionType
            | C::MessageSizeTooLarge,
        ) => "decode",
        Some(C::AutoOffsetReset | C::OffsetOutOfRange) => "offset_reset",
        Some(C::TopicAuthorizationFailed) => "authorization",
        _ => "other",
    }
}

impl PartitionTask {
    /// Takes batches from `queue` until it is revoked or the process stops, then drains and
    /// publishes its last watermark.
    pub async fn run(mut self, queue: PartitionQueue) {
        let (topic, partition) = (self.tp.0.clone(), self.tp.1);
        let batch_max = self.stages.core.config.batch_max.get();
        let mut stream = queue.stream();
        debug!(%topic, partition, "partition task started");
        if self.reconcile().await.is_err() {
            return;
        }
        loop {
            let first = tokio::select! {
                biased;
                _ = self.stop.wait_for(|s| *s) => break,
                m = stream.next() => m,
                // Idle: move the watermark past what the consumer skipped (transaction markers).
                _ = tokio::time::sleep(IDLE_SKIP), if self.tracker.in_flight() == 0 => {
                    if let Some(w) = queue.position().and_then(|next| self.tracker.skip_to(next)) {
                        self.stages.book.publish(&self.tp, w, self.logs);
                    }
                    continue;
                }
            };
            let arrived = Instant::now();
            let mut records = Vec::with_capacity(batch_max);
            let mut taken = self.take(&mut records, first);
            // Take whatever else is ready now, up to a full batch: batches grow under load.
            while records.len() < batch_max && taken == Taken::More {
                match stream.next().now_or_never() {
                    Some(m) => taken = self.take(&mut records, m),
                    None => break,
                }
            }
            if records.is_empty() && taken == Taken::More {
                continue;
            }
            for r in &records {
                if let Err(e) = self.tracker.begin(r.position.offset) {
                    // librdkafka delivers a partition in order; this would be a bug upstream.
                    error!(%topic, partition, error = %e, "offset order broken");
                }
            }
            let stages = self.stages.clone();
            let batch = async {
                if records.is_empty() {
                    return Ok(());
                }
                let mut earlier = std::mem::take(&mut self.earlier);
                let result = stages.core.run_batch(&mut self, records, arrived, &mut earlier).await;
                self.earlier = earlier;
                self.release_share();
                result
            };
            match batch.await {
                Ok(()) => match taken {
                    Taken::More => {}
                    Taken::ReadAgain(from) => {
                        if self.read_again(from).await.is_err() {
                            break;
                        }
                    }
                    Taken::Gap => {
                        // The records before the gap are done; nothing after it runs.
                        self.stages.core.metrics.partition_stalled_because(&self.tp, GAP);
                        let _ = self.stop.wait_for(|s| *s).await;
                        break;
                    }
                },
                Err(Stop::Draining) => break,
                Err(Stop::Fatal) => return,
            }
        }
        debug!(%topic, partition, in_flight = self.tracker.in_flight(), "partition task stopped");
    }

    /// Adds a polled message to the batch, or notes the error the queue
    /// reported: the partition is stalled until a record arrives at the next
    /// offset expected. At a gap after an error, that record and everything
    /// after it are not taken: the queue is read again from the gap, once, and
    /// the partition stops if the gap comes again after an error.
    fn take(
        &mut self,
        records: &mut Vec<Record>,
        message: Option<rdkafka::error::KafkaResult<rdkafka::message::BorrowedMessage<'_>>>,
    ) -> Taken {
        let (topic, partition) = (&self.tp.0, self.tp.1);
        let metrics = &self.stages.core.metrics;
        match message {
            Some(Ok(m)) => {
                let record = Record::from_message(&m, topic);
                let offset = record.position.offset;
                match self.continuity.record(offset) {
                    Arrival::InOrder => {}
                    Arrival::Recovered => {
                        info!(%topic, partition, offset, "the partition's queue delivers again at the offset it stopped at");
                        metrics.partition_progressing(&self.tp);
                    }
                    Arrival::ReadAgain { from } => {
                        warn!(%topic, partition, offset = from, next_delivered = offset, "records were not delivered after an error on this partition; reading the partition again from the first one missing (a gap read again without an error is compaction or transaction markers)");
                        return Taken::ReadAgain(from);
                    }
                    Arrival::Gap { from, reason } => {
                        metrics.partition_errors.with_label_values(&[topic.as_ref(), "skipped"]).inc();
                        metrics.partition_stalled_because(&self.tp, GAP);
                        error!(%topic, partition, offset = from, next_delivered = offset, reason, "records were not delivered after an error on this partition (librdkafka skipped a batch it could not decode, or the gap is not known to be compaction or transaction markers); the partition stops here and nothing at or after the offset is processed or committed by this member: check the batch at that offset (its compression, its CRC, the client's codecs), then restart, or move the group's offset past it on purpose");
                        return Taken::Gap;
                    }
                }
                records.push(record);
            }
            // Not an error: the end of the partition, when `enable.partition.eof` asks for it.
            Some(Err(rdkafka::error::KafkaError::PartitionEOF(_))) => {}
            Some(Err(e)) => {
                let reason = queue_error_reason(&e);
                metrics.partition_errors.with_label_values(&[topic.as_ref(), reason]).inc();
                metrics.partition_stalled_because(
                    &self.tp,
                    &format!("its queue reported an error ({reason}: {e}) and delivered nothing since"),
                );
                let offset = self.continuity.next;
                if self.continuity.error(reason) {
                    error!(%topic, partition, offset, reason, error = %e, "the partition's queue reported an error; the partition is stalled until a record arrives at this offset (readiness false)");
                } else {
                    debug!(%topic, partition, offset, reason, error = %e, "the partition's queue reported an error again");
                }
            }
            None => {}
        }
        Taken::More
    }

    /// Moves the partition's queue back to `from` (its start when `None`),
    /// retrying until it moves; the partition stays stalled meanwhile.
    async fn read_again(&mut self, from: Option<i64>) -> Result<(), Stop> {
        self.stages.core.metrics.partition_stalled_because(
            &self.tp,
            "reading the partition again from records not delivered after an error",
        );
        let mut backoff = Backoff::failures();
        loop {
            let rewind = self.rewind.clone();
            match tokio::task::spawn_blocking(move || rewind.to(from)).await {
                Ok(Ok(())) => return Ok(()),
                Ok(Err(e)) => {
                    warn!(topic = %self.tp.0, partition = self.tp.1, offset = from, error = %e, "cannot move the partition back to read it again; retrying")
                }
                Err(e) => {
                    warn!(topic = %self.tp.0, partition = self.tp.1, error = %e, "moving the partition back failed")
                }
            }
            self.sleep(backoff.wait()).await?;
        }
    }

    fn draining(&self) -> bool {
        *self.stop.borrow()
    }

    /// Sleeps `wait`, or ends at once when the partition drains.
    async fn sleep(&self, wait: Duration) -> Result<(), Stop> {
        let mut stop = self.stop.clone();
        tokio::select! {
            biased;
            _ = stop.wait_for(|s| *s) => Err(Stop::Draining),
            _ = tokio::time::sleep(wait) => Ok(()),
        }
    }

    /// Before the first batch: find effects and dead letters written after the
    /// last commit. Retried until it succeeds: going on without it could write twice.
    async fn reconcile(&mut self) -> Result<(), Stop> {
        let from = self.resume.committed.unwrap_or(0);
        let output = self.stages.output_log(self.tp.1, self.resume.logs.output);
        let dead_letter = self.stages.dead_letter_log(self.tp.1, self.resume.logs.dead_letter);
        let stages = self.stages.clone();
        tokio::select! {
            _ = stages.settle_logs(&self.tp) => {}
            _ = self.stop.wait_for(|s| *s) => return Err(Stop::Draining),
        }
        let mut backoff = Backoff::failures();
        loop {
            let (r, tp, output, dead_letter) =
                (self.stages.reconciler.clone(), self.tp.clone(), output.clone(), dead_letter.clone());
            let started = Instant::now();
            let result = tokio::task::spawn_blocking(move || r.find(&tp, from, output, dead_letter)).await;
            match result.map_err(anyhow::Error::from).and_then(|r| r) {
                Ok(found) => {
                    let secs = started.elapsed().as_secs_f64();
                    if !found.emitted.is_empty() || !found.dead_lettered.is_empty() {
                        info!(topic = %self.tp.0, partition = self.tp.1, emitted = found.emitted.len(), dead_lettered = found.dead_lettered.len(), secs, "writes after the last commit found; they will not be made again");
                    }
                    if !found.complete {
                        self.stages.core.metrics.reconciliations_incomplete.inc();
                    }
                    let reached_before = found.emitted.keys().chain(found.dead_lettered.keys()).max().copied();
                    self.earlier =
                        Earlier { emitted: found.emitted, dead_lettered: found.dead_lettered, reached_before };
                    self.share = found.share;
                    self.release_share();
                    self.stages.core.metrics.partition_progressing(&self.tp);
                    return Ok(());
                }
                Err(e) => {
                    self.stages.core.metrics.partition_stalled_because(
                        &self.tp,
                        "cannot read the output back to find writes after the last commit; retrying before processing",
                    );
                    warn!(topic = %self.tp.0, partition = self.tp.1, error = %e, "cannot read the output back; retrying before processing");
                    self.sleep(backoff.wait()).await?;
                }
            }
        }
    }

    /// Gives the reconciliation budget back once every write found has been passed.
    fn release_share(&mut self) {
        if self.earlier.is_empty() {
            self.share = Share::default();
        }
    }

    /// A zombie's guard: after a freeze that may have cost this process its
    /// partitions, wait for the group's word before writing. librdkafka learns
    /// at its next heartbeat that the member was expelled, and revokes the
    /// partitions (the stop signal); no revoke within a few heartbeats means
    /// the group kept us.
    /// A freeze already confirmed (the group kept us) is not waited on again
    /// by the next writes.
    async fn confirm_ownership(&self, since_ms: u64) -> Result<(), Stop> {
        let liveness = &self.stages.liveness;
        let thawed = liveness.thawed_since(since_ms.saturating_sub(liveness.freeze_after.as_millis() as u64));
        let Some(thawed) = thawed.filter(|&t| t > self.confirmed_thaw_ms.load(Ordering::SeqCst)) else {
            return if self.draining() { Err(Stop::Draining) } else { Ok(()) };
        };
        self.stages.core.metrics.ownership_checks.inc();
        let mut stop = self.stop.clone();
        let revoked = tokio::time::timeout(liveness.confirm_for, stop.wait_for(|s| *s)).await.is_ok();
        if revoked {
            warn!(topic = %self.tp.0, partition = self.tp.1, "partition revoked after a freeze; its batch is not written (the next owner processes it)");
            self.stages.core.metrics.zombie_batches_dropped.inc();
            return Err(Stop::Draining);
        }
        self.confirmed_thaw_ms.fetch_max(thawed, Ordering::SeqCst);
        Ok(())
    }
}

impl PartitionTask {
    fn watch_dead_letters(&mut self, reason: Option<&'static str>) {
        let (topic, partition) = (&self.tp.0, self.tp.1);
        let share = match self.dead_letters.record(reason) {
            DeadLetterVerdict::Quiet => return,
            DeadLetterVerdict::Share(share) => share,
            DeadLetterVerdict::Began(reason, share) => {
                warn!(%topic, partition, reason, share, "nearly every record of this partition is dead-lettered for the same reason (their offsets are committed): check [key] against the records (`kdedup check` samples them) and the dead-letter topic's kdedup-reason headers");
                share
            }
            DeadLetterVerdict::Ended(reason, share) => {
                info!(%topic, partition, reason, share, "this partition no longer dead-letters nearly every record");
                share
            }
        };
        let labels = [topic.to_string(), partition.to_string()];
        self.stages.core.metrics.partition_dead_letter_share.with_label_values(&labels).set(share);
    }
}

impl Driver for PartitionTask {
    fn partition(&self) -> &TopicPartition {
        &self.tp
    }

    fn pause(&self, wait: Duration) -> impl std::future::Future<Output = Result<(), Stop>> + Send {
        self.sleep(wait)
    }

    fn before_writes(&self, since_ms: u64) -> impl std::future::Future<Output = Result<(), Stop>> + Send {
        self.confirm_ownership(since_ms)
    }

    /// The sink's own waits (HTTP backoff, Retry-After) end when the partition drains.
    fn stopping(&self) -> Stopping {
        Stopping::on(self.stop.clone())
    }

    fn landed(&mut self, log: Landed, source_offset: i64, mark: OutputMark) {
        self.unsettled.push((source_offset, log, mark));
    }

    /// Marks a round's records finished and publishes the new watermark, with
    /// log marks that do not pass a write for a record at or above it.
    fn finished(&mut self, items: &[Item]) {
        for item in items {
            let reason = match item {
                Item::Bad { error, .. } => Some(error.reason()),
                Item::Keyed { .. } => None,
            };
            self.watch_dead_letters(reason);
            if let Err(e) = self.tracker.finish(item.record().position.offset) {
                error!(topic = %self.tp.0, partition = self.tp.1, error = %e, "offset tracking broken");
            }
        }
        let Some(w) = self.tracker.watermark() else { return };
        let logs = &mut self.logs;
        self.unsettled.retain(|&(source, log, mark)| {
            if source >= w {
                return true;
            }
            match log {
                Landed::Output => OutputMark::advance(&mut logs.output, mark),
                Landed::DeadLetter => OutputMark::advance(&mut logs.dead_letter, mark),
            }
            false
        });
        let mut published = self.logs;
        for &(_, log, mark) in &self.unsettled {
            let slot = match log {
                Landed::Output => &mut published.output,
                Landed::DeadLetter => &mut published.dead_letter,
            };
            OutputMark::hold_at(slot, mark);
        }
        self.stages.book.publish(&self.tp, w, published);
    }
}

/// Starts and stops partition tasks as the source assigns and revokes partitions.
pub struct Workers {
    stages: Arc<Stages>,
    runtime: tokio::runtime::Handle,
    running: Mutex<HashMap<TopicPartition, Running>>,
}

struct Running {
    stop: watch::Sender<bool>,
    handle: tokio::task::JoinHandle<()>,
    /// Disconnected when the task's future is dropped: finished, aborted or panicked.
    ended: std::sync::mpsc::Receiver<()>,
}

impl Workers {
    /// No task running yet; tasks run on `runtime`.
    pub fn new(stages: Arc<Stages>, runtime: tokio::runtime::Handle) -> Workers {
        Workers { stages, runtime, running: Mutex::new(HashMap::new()) }
    }

    fn running(&self) -> std::sync::MutexGuard<'_, HashMap<TopicPartition, Running>> {
        self.running.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl PartitionHandler for Workers {
    fn assigned(&self, tp: TopicPartition, queue: PartitionQueue, resume: Resume, rewind: Rewind) {
        let (stop_tx, stop_rx) = watch::channel(false);
        let (ended_tx, ended_rx) = std::sync::mpsc::channel::<()>();
        let task = PartitionTask {
            tp: tp.clone(),
            stages: self.stages.clone(),
            stop: stop_rx,
            tracker: OffsetTracker::new(),
            resume,
            earlier: Earlier::default(),
            share: Share::default(),
            logs: resume.logs,
            unsettled: Vec::new(),
            continuity: Continuity::starting_at(resume.committed),
            rewind,
            confirmed_thaw_ms: AtomicU64::new(0),
            dead_letters: DeadLetterWatch::default(),
        };
        let stages = self.stages.clone();
        let tp_of_task = tp.clone();
        let handle = self.runtime.spawn(async move {
            let _ended = ended_tx; // dropped with the future, whatever ends it
            if let Err(panic) = std::panic::AssertUnwindSafe(task.run(queue)).catch_unwind().await {
                let what = panic
                    .downcast_ref::<&str>()
                    .map(|s| s.to_string())
                    .or_else(|| panic.downcast_ref::<String>().cloned())
                    .unwrap_or_else(|| "a panic".to_string());
                let (topic, partition) = (&tp_of_task.0, tp_of_task.1);
                error!(%topic, partition, panic = %what, "partition task panicked; its partition is stalled and kdedup stops (exit non-zero) so that it restarts from the last commit");
                stages.core.metrics.partition_panics.inc();
                stages.core.metrics.partition_stalled_because(&tp_of_task, "its task panicked; kdedup stops");
                stages.core.fatal.raise(format!("partition task {topic}/{partition} panicked: {what}"));
            }
        });
        self.stages.core.metrics.assigned_partitions.inc();
        if let Some(old) = self.running().insert(tp, Running { stop: stop_tx, handle, ended: ended_rx }) {
            old.handle.abort();
        }
    }

    fn revoked(&self, partitions: &[TopicPartition]) {
        let taken: Vec<(TopicPartition, Running)> = {
            let mut running = self.running();
            partitions.iter().filter_map(|tp| running.remove(tp).map(|r| (tp.clone(), r))).collect()
        };
        for (_, r) in &taken {
            let _ = r.stop.send(true);
        }
        let deadline = Instant::now() + self.stages.core.config.drain_timeout;
        for (tp, r) in &taken {
            let left = deadline.saturating_duration_since(Instant::now());
            if let Err(std::sync::mpsc::RecvTimeoutError::Timeout) = r.ended.recv_timeout(left) {
                warn!(topic = %tp.0, partition = tp.1, "partition did not drain in time; abandoning its unfinished batch");
                r.handle.abort();
                let _ = r.ended.recv_timeout(Duration::from_secs(5));
            }
            self.stages.core.metrics.assigned_partitions.dec();
            self.stages.core.metrics.partition_gone(tp);
        }
        // Writes of the stopped tasks may still be queued in the producer; the
        // next owner reads these logs back to learn what was written, so let
        // them land first (within the same bound). Called on the consumer's
        // own runtime thread: wait on a channel, not by blocking on a runtime.
        let (settled_tx, settled_rx) = std::sync::mpsc::channel::<()>();
        let (stages, inputs) = (self.stages.clone(), taken.iter().map(|(tp, _)| tp.clone()).collect::<Vec<_>>());
        self.runtime.spawn(async move {
            for tp in inputs {
                stages.settle_logs(&tp).await;
            }
            let _ = settled_tx.send(());
        });
        if settled_rx.recv_timeout(deadline.saturating_duration_since(Instant::now())).is_err() {
            warn!(partitions = taken.len(), "writes of revoked partitions still unresolved at the drain timeout; the next owner may repeat them (marked as possible repeats)");
        }
    }

    fn all(&self) -> Vec<TopicPartition> {
        self.running().keys().cloned().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_window_nearly_all_dead_lettered_alike_is_loud_once_then_ends() {
        let mut w = DeadLetterWatch::default();
        let window = |w: &mut DeadLetterWatch, bad: u32, reason| {
            (0..DeadLetterWatch::WINDOW).map(|i| w.record((i < bad).then_some(reason))).last().unwrap()
        };
        assert_eq!(window(&mut w, 20, "missing_id"), DeadLetterVerdict::Share(0.1));
        assert_eq!(window(&mut w, 199, "missing_id"), DeadLetterVerdict::Began("missing_id", 0.995));
        assert_eq!(window(&mut w, 200, "missing_id"), DeadLetterVerdict::Share(1.0), "said once per streak");
        assert_eq!(window(&mut w, 200, "invalid_json"), DeadLetterVerdict::Ended("missing_id", 1.0));
        assert_eq!(window(&mut w, 200, "invalid_json"), DeadLetterVerdict::Began("invalid_json", 1.0));
        assert_eq!(window(&mut w, 0, "invalid_json"), DeadLetterVerdict::Ended("invalid_json", 0.0));
        // Many dead letters, but for mixed reasons: none dominates.
        let mut w = DeadLetterWatch::default();
        let last = (0..DeadLetterWatch::WINDOW)
            .map(|i| w.record(Some(if i % 2 == 0 { "missing_id" } else { "invalid_json" })))
            .last()
            .unwrap();
        assert_eq!(last, DeadLetterVerdict::Share(0.5));
    }

    #[test]
    fn gaps_without_an_error_are_compaction_or_markers() {
        let mut c = Continuity::starting_at(Some(10));
        assert_eq!(c.record(12), Arrival::InOrder, "compacted away or a control record: no error, no concern");
        assert_eq!(c.record(20), Arrival::InOrder);
        assert_eq!(c.next, Some(21));
    }

    #[test]
    fn an_error_then_the_next_offset_recovers() {
        let mut c = Continuity::starting_at(Some(5));
        assert!(c.error("decode"), "the first error of a streak");
        assert!(!c.error("decode"), "a repeat is not a new streak");
        assert_eq!(c.record(5), Arrival::Recovered);
        assert_eq!(c.record(9), Arrival::InOrder, "after recovering, gaps are normal again");
    }

    #[test]
    fn an_error_then_a_later_offset_is_read_again_and_a_gap_only_if_the_error_comes_again() {
        let mut c = Continuity::starting_at(Some(5));
        assert_eq!(c.record(5), Arrival::InOrder);
        c.error("decode");
        assert_eq!(c.record(9), Arrival::ReadAgain { from: Some(6) }, "read the gap again");
        c.error("decode");
        assert_eq!(c.record(9), Arrival::Gap { from: Some(6), reason: "decode" }, "the error came again: skipped");
        assert_eq!(c.record(10), Arrival::Gap { from: Some(6), reason: "decode" }, "nothing moves past a gap");
    }

    #[test]
    fn a_gap_read_again_without_an_error_is_compaction_or_markers() {
        let mut c = Continuity::starting_at(Some(5));
        c.error("other");
        assert_eq!(c.record(8), Arrival::ReadAgain { from: Some(5) });
        assert_eq!(c.record(8), Arrival::InOrder, "the same gap without an error: markers, taken");
        c.error("other");
        assert_eq!(c.record(12), Arrival::ReadAgain { from: Some(9) }, "a later error is read again too");
    }

    #[test]
    fn an_error_before_anything_is_known_reads_from_the_start() {
        let mut c = Continuity::starting_at(None);
        c.error("decode");
        assert_eq!(c.record(3), Arrival::ReadAgain { from: None }, "no commit, no record: read from the log start");
        c.error("decode");
        assert_eq!(c.record(3), Arrival::Gap { from: None, reason: "decode" });
        let mut c = Continuity::starting_at(None);
        assert_eq!(c.record(3), Arrival::InOrder, "without an error the first record is taken as the start");
    }
}
