//! The per-partition task of `kdedup run`: the consumer-group plumbing around
//! the decision core ([`crate::decide`]). It takes batches from one
//! partition's queue, tracks their offsets and publishes the contiguous
//! watermark for the commit, reconciles what an earlier owner wrote after the
//! last commit before its first batch, and stops when the partition is
//! revoked. Batches of one partition run one after another, so a key seen
//! again in the next batch finds the first one completed.
//!
//! Before a batch writes anything, the task checks it still owns its
//! partition: if the process was frozen (SIGSTOP, a VM pause) for half the
//! session timeout or more, it waits for the group's word (a revoke) for a
//! few heartbeats before writing, so a thawed zombie does not write batches
//! for partitions already reassigned.
//!
//! A fatal producer error or a panicking partition task stops the process
//! with a non-zero exit (see [`Fatal`]).

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::{FutureExt, StreamExt};
use tokio::sync::watch;
use tracing::{debug, error, info, warn};

use crate::decide::{Backoff, Core, Driver, Item, Landed, Stop};
pub use crate::decide::{Fatal, Faults};
use crate::event::Record;
use crate::offsets::{CommitBook, LogMarks, OffsetTracker, OutputMark, TopicPartition};
use crate::reconcile::{Log, Reconciler};
use crate::sink::AnySink;
use crate::source::{PartitionHandler, PartitionQueue, Resume};
use crate::store::now_ms;

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

    /// Whether a freeze ended after `since_ms`.
    fn froze_since(&self, since_ms: u64) -> bool {
        self.thawed_at_ms.load(Ordering::SeqCst) >= since_ms
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
        match &self.core.sink {
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
            AnySink::Stdout(_) | AnySink::Custom(_) => None,
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
    /// Offsets whose effect is already in the output (found by reconciliation).
    emitted: HashSet<i64>,
    /// Offsets already in the dead-letter topic (found by reconciliation).
    dead_lettered: HashSet<i64>,
    /// The highest offset of this partition an earlier owner is known to have
    /// reached: its writes found by reconciliation, its claims resumed. That
    /// owner may still be alive (a zombie) and write a dead letter for a record
    /// up to here after we looked, so ours for those records are marked.
    reached_before: Option<i64>,
    /// Where this partition's latest writes landed, plus one.
    logs: LogMarks,
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
            take(&mut records, first, &topic, partition);
            // Take whatever else is ready now, up to a full batch: batches grow under load.
            while records.len() < batch_max {
                match stream.next().now_or_never() {
                    Some(m) => take(&mut records, m, &topic, partition),
                    None => break,
                }
            }
            if records.is_empty() {
                continue;
            }
            for r in &records {
                if let Err(e) = self.tracker.begin(r.position.offset) {
                    // librdkafka delivers a partition in order; this would be a bug upstream.
                    error!(%topic, partition, error = %e, "offset order broken");
                }
            }
            let (stages, stop) = (self.stages.clone(), self.stop.clone());
            // The sink's own waits (HTTP backoff, Retry-After) end when the partition drains.
            match crate::sink::with_stop(stop, stages.core.run_batch(&mut self, records, arrived)).await {
                Ok(()) => {}
                Err(Stop::Draining) => break,
                Err(Stop::Fatal) => return,
                Err(Stop::Crashed) => {
                    warn!(%topic, partition, "injected crash: partition task stops without finishing its batch");
                    self.stages.core.faults.fired.notify_one();
                    return;
                }
            }
        }
        debug!(%topic, partition, in_flight = self.tracker.in_flight(), "partition task stopped");
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
        let mut backoff = Backoff::new();
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
                    self.reached_before = found.emitted.iter().chain(&found.dead_lettered).max().copied();
                    self.emitted = found.emitted;
                    self.dead_lettered = found.dead_lettered;
                    self.stages.core.metrics.partition_progressing(&self.tp);
                    return Ok(());
                }
                Err(e) => {
                    self.stages.core.metrics.partition_stalled(&self.tp);
                    warn!(topic = %self.tp.0, partition = self.tp.1, error = %e, "cannot read the output back; retrying before processing");
                    self.sleep(backoff.next()).await?;
                }
            }
        }
    }

    /// A zombie's guard: after a freeze that may have cost this process its
    /// partitions, wait for the group's word before writing. librdkafka learns
    /// at its next heartbeat that the member was expelled, and revokes the
    /// partitions (the stop signal); no revoke within a few heartbeats means
    /// the group kept us.
    async fn confirm_ownership(&self, batch_started_ms: u64) -> Result<(), Stop> {
        let liveness = &self.stages.liveness;
        if !liveness.froze_since(batch_started_ms.saturating_sub(liveness.freeze_after.as_millis() as u64)) {
            return if self.draining() { Err(Stop::Draining) } else { Ok(()) };
        }
        self.stages.core.metrics.ownership_checks.inc();
        let mut stop = self.stop.clone();
        let revoked = tokio::time::timeout(liveness.confirm_for, stop.wait_for(|s| *s)).await.is_ok();
        if revoked {
            warn!(topic = %self.tp.0, partition = self.tp.1, "partition revoked after a freeze; its batch is not written (the next owner processes it)");
            self.stages.core.metrics.zombie_batches_dropped.inc();
            return Err(Stop::Draining);
        }
        Ok(())
    }
}

impl Driver for PartitionTask {
    fn partition(&self) -> &TopicPartition {
        &self.tp
    }

    fn pause(&self, wait: Duration) -> impl std::future::Future<Output = Result<(), Stop>> + Send {
        self.sleep(wait)
    }

    fn before_writes(&self, batch_started_ms: u64) -> impl std::future::Future<Output = Result<(), Stop>> + Send {
        self.confirm_ownership(batch_started_ms)
    }

    fn already_emitted(&mut self, offset: i64) -> bool {
        self.emitted.remove(&offset)
    }

    fn already_dead_lettered(&mut self, offset: i64) -> bool {
        self.dead_lettered.remove(&offset)
    }

    fn reached_before(&self, offset: i64) -> bool {
        self.reached_before.is_some_and(|r| offset <= r)
    }

    fn resumed_up_to(&mut self, offset: i64) {
        self.reached_before = self.reached_before.max(Some(offset));
    }

    fn landed(&mut self, log: Landed, mark: OutputMark) {
        match log {
            Landed::Output => OutputMark::advance(&mut self.logs.output, mark),
            Landed::DeadLetter => OutputMark::advance(&mut self.logs.dead_letter, mark),
        }
    }

    /// Marks a round's records finished and publishes the new watermark.
    fn finished(&mut self, items: &[Item]) {
        for item in items {
            if let Err(e) = self.tracker.finish(item.record().position.offset) {
                error!(topic = %self.tp.0, partition = self.tp.1, error = %e, "offset tracking broken");
            }
        }
        if let Some(w) = self.tracker.watermark() {
            self.stages.book.publish(&self.tp, w, self.logs);
        }
    }
}

/// Adds a polled message to the batch (errors are librdkafka's own, logged; it retries).
fn take(
    records: &mut Vec<Record>,
    message: Option<rdkafka::error::KafkaResult<rdkafka::message::BorrowedMessage<'_>>>,
    topic: &Arc<str>,
    partition: i32,
) {
    match message {
        Some(Ok(m)) => records.push(Record::from_message(&m, topic)),
        Some(Err(e)) => warn!(%topic, partition, error = %e, "partition queue reported an error"),
        None => {}
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
    fn assigned(&self, tp: TopicPartition, queue: PartitionQueue, resume: Resume) {
        let (stop_tx, stop_rx) = watch::channel(false);
        let (ended_tx, ended_rx) = std::sync::mpsc::channel::<()>();
        let task = PartitionTask {
            tp: tp.clone(),
            stages: self.stages.clone(),
            stop: stop_rx,
            tracker: OffsetTracker::new(),
            resume,
            emitted: HashSet::new(),
            dead_lettered: HashSet::new(),
            reached_before: None,
            logs: resume.logs,
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
                stages.core.metrics.partition_stalled(&tp_of_task);
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
