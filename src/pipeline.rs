//! The per-partition task: takes batches from one partition's queue and runs
//! each through key → filter → store → sink → complete → offsets.
//!
//! Batches, not records, cross every hand-off: up to `batch_max` records are
//! taken at once, the filter is locked once, the store gets one call per step,
//! the producer gets the whole batch before any delivery is awaited.
//!
//! Within a batch, records that share a key are resolved in order: the first
//! goes to the store, later ones follow its answer (a duplicate of it, or a
//! conflict). Batches of one partition run one after another, so a key seen
//! again in the next batch finds the first one completed.
//!
//! While a batch holds claims, a heartbeat renews their leases every third of
//! `lease_secs`, so a slow effect never lets another partition take a live
//! claim over. A claim that is taken over after all (its owner died or froze
//! past its lease) is emitted with `kdedup-possible-repeat: true`.
//!
//! Before a batch writes anything, the task checks it still owns its
//! partition: if the process was frozen (SIGSTOP, a VM pause) for half the
//! session timeout or more, it waits for the group's word (a revoke) for a
//! few heartbeats before writing, so a thawed zombie does not write batches
//! for partitions already reassigned.
//!
//! Failure handling: store errors and retriable sink errors are retried with
//! backoff while the partition waits (it reports itself stalled: `/readyz`
//! answers 503, no offset moves); records that cannot be handled are
//! dead-lettered with their reason; a dead letter that cannot be written
//! stalls the partition, loudly, rather than commit the record unwritten.
//! A fatal producer error or a panicking partition task stops the process
//! with a non-zero exit (see [`Fatal`]).

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::{FutureExt, StreamExt};
use tokio::sync::watch;
use tracing::{debug, error, info, warn};

use crate::config::{OnConflict, PipelineConfig};
use crate::error::{RecordError, SinkError, StoreError};
use crate::event::{Envelope, EventKey, Fingerprint, KeyExtractor, Position, Record};
use crate::filter::{Filter, Verdict, PREFETCH_AHEAD};
use crate::metrics::{Metrics, OUTCOMES};
use crate::offsets::{CommitBook, LogMarks, OffsetTracker, OutputMark, TopicPartition};
use crate::reconcile::{Log, Reconciler};
use crate::sink::{AnySink, DeadLetter, Effect, SideTopics};
use crate::source::{PartitionHandler, PartitionQueue, Resume};
use crate::store::{now_ms, Acquired, Claim, ClaimRequest, ClaimState, DedupStore, EffectResponse, Store};

/// Test hooks that stand in for crashes at chosen points. Empty in production.
/// Hidden from the docs: kdedup's own tests use it; no part of the library API.
#[doc(hidden)]
#[derive(Default, Clone)]
pub struct Faults {
    /// Claim the batch holding this position, then stop the partition task
    /// before any effect runs, as a crash would. Fires once.
    pub crash_after_claim: Arc<Mutex<Option<Position>>>,
    /// Run the effects of the batch holding this position, then stop before
    /// completing the claims (the window reconciliation closes). Fires once.
    pub crash_after_effect: Arc<Mutex<Option<Position>>>,
    /// Panic in the partition task that takes the batch holding this position. Fires once.
    pub panic_at: Arc<Mutex<Option<Position>>>,
    /// Hold the effects of the batch holding this position this long before
    /// delivering them (a slow endpoint, an output leader that is down). Fires once.
    pub slow_effect: Arc<Mutex<Option<(Position, Duration)>>>,
    /// Notified when a fault fired.
    pub fired: Arc<tokio::sync::Notify>,
}

impl Faults {
    fn take(slot: &Mutex<Option<Position>>, batch: &[Item]) -> bool {
        let mut slot = slot.lock().unwrap_or_else(|p| p.into_inner());
        let hit = slot.as_ref().is_some_and(|p| batch.iter().any(|i| i.record().position == *p));
        if hit {
            *slot = None;
        }
        hit
    }

    fn take_delay(&self, batch: &[Item]) -> Option<Duration> {
        let mut slot = self.slow_effect.lock().unwrap_or_else(|p| p.into_inner());
        let hit = slot.as_ref().is_some_and(|(p, _)| batch.iter().any(|i| i.record().position == *p));
        if hit {
            slot.take().map(|(_, d)| d)
        } else {
            None
        }
    }
}

/// Why the process must stop: raised by a partition task that cannot go on
/// (a panic, a fatal producer error); `kdedup run` then drains what it can,
/// commits, and exits non-zero, so the orchestrator restarts it.
///
/// Why exit rather than restart the partition in-process: a panic is a bug
/// whose state cannot be trusted, and a fatal producer error (the idempotent
/// producer's sequence is broken) cannot be cleared without a new producer,
/// which every partition shares. A restarted process starts from the last
/// commit and reconciles, so nothing finished is lost and nothing unfinished
/// is committed; a record that panics every owner makes a crash loop, which
/// is loud, instead of a silent stall.
#[derive(Clone)]
pub struct Fatal(watch::Sender<Option<String>>);

impl Default for Fatal {
    fn default() -> Self {
        Fatal(watch::channel(None).0)
    }
}

impl Fatal {
    /// The first reason raised wins.
    pub fn raise(&self, why: String) {
        self.0.send_if_modified(|slot| {
            if slot.is_some() {
                return false;
            }
            *slot = Some(why);
            true
        });
    }

    /// Resolves with the reason once one is raised.
    pub async fn raised(&self) -> String {
        let mut rx = self.0.subscribe();
        let raised = rx.wait_for(Option::is_some).await.map(|why| why.clone().unwrap_or_default());
        match raised {
            Ok(why) => why,
            // The sender lives in `self`: this cannot close while we wait.
            Err(_) => std::future::pending().await,
        }
    }
}

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
    pub extractor: KeyExtractor,
    pub filter: Mutex<Filter>,
    pub store: Store,
    pub sink: AnySink,
    pub side: SideTopics,
    pub metrics: Metrics,
    pub book: Arc<CommitBook>,
    pub config: PipelineConfig,
    pub faults: Faults,
    /// Reads the output and dead-letter topics back on assignment.
    pub reconciler: Reconciler,
    /// The store's lease: claims are renewed every third of it.
    pub lease: Duration,
    pub liveness: Arc<Liveness>,
    pub fatal: Fatal,
    /// Counts claim completions and releases in this process, so a batch that
    /// waits on a claim held by another partition here wakes when it is done.
    pub settled_claims: watch::Sender<u64>,
}

impl Stages {
    /// The output log an input partition writes to, when it is fixed.
    fn output_log(&self, input_partition: i32, mark: Option<OutputMark>) -> Option<Log> {
        match &self.sink {
            AnySink::Kafka(k) => k.output_partition(input_partition).map(|partition| Log {
                topic: k.topic().to_string(),
                partition,
                mark,
            }),
            AnySink::Stdout(_) | AnySink::Http(_) | AnySink::Custom(_) => None,
        }
    }

    fn dead_letter_log(&self, input_partition: i32, mark: Option<OutputMark>) -> Log {
        Log { topic: self.side.dead_letter.clone(), partition: self.side.dead_letter_partition(input_partition), mark }
    }

    /// Waits until this process's own writes for `input` to its logs have
    /// resolved: an abandoned task's writes may still be queued, and must land
    /// before anyone reads those logs back. Other input partitions' writes to
    /// the same logs are not waited for (under load they never stop).
    async fn settle_logs(&self, input: &TopicPartition) {
        if let Some(out) = self.output_log(input.1, None) {
            self.side.writer.settled(&out.topic, out.partition, input).await;
        }
        let dead_letter = self.dead_letter_log(input.1, None);
        self.side.writer.settled(&dead_letter.topic, dead_letter.partition, input).await;
    }
}

/// A record on its way through one batch.
enum Item {
    /// `leader`: the batch's first record of the same key, when this is a later one.
    Keyed {
        envelope: Envelope,
        decision: Option<Decision>,
        leader: Option<usize>,
    },
    Bad {
        record: Record,
        error: RecordError,
    },
}

impl Item {
    fn record(&self) -> &Record {
        match self {
            Item::Keyed { envelope, .. } => &envelope.record,
            Item::Bad { record, .. } => record,
        }
    }
}

/// The dedup decision for a keyed record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Decision {
    /// `claimed_at_ms`: the clock the claim was made with (its row expires a TTL later).
    New {
        acquired: Acquired,
        claimed_at_ms: u64,
    },
    /// `expires_at_ms`: when the row that says so stops counting, when known.
    Duplicate {
        expires_at_ms: Option<u64>,
    },
    Conflict(Fingerprint),
}

/// Why a batch stopped short; the partition task ends without publishing it.
#[derive(Debug)]
enum Stop {
    /// Draining was requested (revoke, shutdown), or the partition may be lost.
    Draining,
    /// A test fault fired.
    Crashed,
    /// The process must stop (already raised on [`Fatal`]).
    Fatal,
}

/// Exponential backoff: from 50 ms to 5 s for failures; from 20 ms to 1 s for
/// a claim waiting on another process's batch (one in this process wakes the
/// waiter when it settles).
struct Backoff {
    next: Duration,
    max: Duration,
}

impl Backoff {
    fn new() -> Backoff {
        Backoff { next: Duration::from_millis(50), max: Duration::from_secs(5) }
    }
    fn for_claim_waits() -> Backoff {
        Backoff { next: Duration::from_millis(20), max: Duration::from_secs(1) }
    }
    fn next(&mut self) -> Duration {
        let d = self.next;
        self.next = (self.next * 2).min(self.max);
        d
    }
}

/// How long a batch waits on claims held elsewhere while holding its own
/// before it gives them back (see `PartitionTask::decide`).
const GIVE_BACK_AFTER: Duration = Duration::from_secs(1);

/// Claims a batch holds between its claim and its completion, for the heartbeat.
#[derive(Default)]
struct Held {
    keys: Mutex<Vec<(EventKey, Position)>>,
    /// Offsets whose lease renewal was refused: taken over while we held them.
    lost: Mutex<HashSet<i64>>,
}

impl Held {
    fn add(&self, keys: impl IntoIterator<Item = (EventKey, Position)>) {
        self.keys.lock().unwrap_or_else(|p| p.into_inner()).extend(keys);
    }
    fn clear(&self) {
        self.keys.lock().unwrap_or_else(|p| p.into_inner()).clear();
    }
    fn snapshot(&self) -> Vec<(EventKey, Position)> {
        self.keys.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
    fn remove(&self, gone: &[(EventKey, Position)]) {
        self.keys.lock().unwrap_or_else(|p| p.into_inner()).retain(|k| !gone.contains(k));
    }
    fn was_lost(&self, offset: i64) -> bool {
        self.lost.lock().unwrap_or_else(|p| p.into_inner()).contains(&offset)
    }
}

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
    pub async fn run(mut self, queue: PartitionQueue) {
        let (topic, partition) = (self.tp.0.clone(), self.tp.1);
        let batch_max = self.stages.config.batch_max.get();
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
            match self.process(records, arrived).await {
                Ok(()) => {}
                Err(Stop::Draining) => break,
                Err(Stop::Fatal) => return,
                Err(Stop::Crashed) => {
                    warn!(%topic, partition, "injected crash: partition task stops without finishing its batch");
                    self.stages.faults.fired.notify_one();
                    return;
                }
            }
        }
        debug!(%topic, partition, in_flight = self.tracker.in_flight(), "partition task stopped");
    }

    fn draining(&self) -> bool {
        *self.stop.borrow()
    }

    /// Sleeps the next backoff step, or ends at once when the partition drains.
    async fn pause(&self, backoff: &mut Backoff) -> Result<(), Stop> {
        let mut stop = self.stop.clone();
        tokio::select! {
            biased;
            _ = stop.wait_for(|s| *s) => Err(Stop::Draining),
            _ = tokio::time::sleep(backoff.next()) => Ok(()),
        }
    }

    fn stalled(&self) {
        self.stages.metrics.partition_stalled(&self.tp);
    }

    fn progressing(&self) {
        self.stages.metrics.partition_progressing(&self.tp);
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
                        self.stages.metrics.reconciliations_incomplete.inc();
                    }
                    self.reached_before = found.emitted.iter().chain(&found.dead_lettered).max().copied();
                    self.emitted = found.emitted;
                    self.dead_lettered = found.dead_lettered;
                    self.progressing();
                    return Ok(());
                }
                Err(e) => {
                    self.stalled();
                    warn!(topic = %self.tp.0, partition = self.tp.1, error = %e, "cannot read the output back; retrying before processing");
                    self.pause(&mut backoff).await?;
                }
            }
        }
    }

    /// Retries a store call with backoff until it answers; the partition reports
    /// itself stalled meanwhile.
    async fn store_call<T, F, Fut>(&self, op: &'static str, mut call: F) -> Result<T, Stop>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Result<T, StoreError>>,
    {
        let mut backoff = Backoff::new();
        loop {
            let started = Instant::now();
            let result = call().await;
            self.stages.metrics.store_seconds.with_label_values(&[op]).observe(started.elapsed().as_secs_f64());
            match result {
                Ok(v) => {
                    self.progressing();
                    return Ok(v);
                }
                Err(e) => {
                    self.stages.metrics.store_errors.inc();
                    self.stalled();
                    if !e.is_retriable() {
                        // A corrupt row cannot be fixed by waiting; keep the partition
                        // paused and loud rather than guess.
                        error!(topic = %self.tp.0, partition = self.tp.1, op, error = %e, "store call failed; not retriable, operator action needed");
                    } else {
                        warn!(topic = %self.tp.0, partition = self.tp.1, op, error = %e, "store call failed; retrying");
                    }
                    self.pause(&mut backoff).await?;
                }
            }
        }
    }

    /// One batch through key, filter, store, sink and complete, while a
    /// heartbeat renews the leases of the claims it holds; `arrived` is when
    /// its first record was taken from the partition queue.
    async fn process(&mut self, records: Vec<Record>, arrived: Instant) -> Result<(), Stop> {
        let held = Held::default();
        let stages = self.stages.clone();
        let tp = self.tp.clone();
        let work = self.process_batch(records, arrived, &held);
        tokio::pin!(work);
        let period = (stages.lease / 3).max(Duration::from_millis(100));
        let mut heartbeat = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
        heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                result = &mut work => return result,
                _ = heartbeat.tick() => renew(&stages, &tp, &held).await,
            }
        }
    }

    async fn process_batch(&mut self, records: Vec<Record>, arrived: Instant, held: &Held) -> Result<(), Stop> {
        let s = self.stages.clone();
        let started_ms = now_ms();
        s.metrics.taken(&self.tp, &records);
        let offsets: Vec<i64> = records.iter().map(|r| r.position.offset).collect();
        for &o in &offsets {
            if let Err(e) = self.tracker.begin(o) {
                // librdkafka delivers a partition in order; this would be a bug upstream.
                error!(topic = %self.tp.0, partition = self.tp.1, error = %e, "offset order broken");
            }
        }

        // key
        let mut items: Vec<Item> = records
            .into_iter()
            .map(|r| match s.extractor.extract(r) {
                Ok(envelope) => Item::Keyed { envelope, decision: None, leader: None },
                Err((record, error)) => Item::Bad { record, error },
            })
            .collect();
        if Faults::take(&s.faults.panic_at, &items) {
            panic!("injected panic in partition {}/{}", self.tp.0, self.tp.1);
        }

        self.decide(&mut items, held).await?;
        if Faults::take(&s.faults.crash_after_claim, &items) {
            return Err(Stop::Crashed);
        }
        self.confirm_ownership(started_ms).await?;
        self.apply_effects(&mut items, held).await?;

        let secs = arrived.elapsed().as_secs_f64();
        for _ in &offsets {
            s.metrics.record_seconds.observe(secs);
        }
        for o in offsets {
            if let Err(e) = self.tracker.finish(o) {
                error!(topic = %self.tp.0, partition = self.tp.1, error = %e, "offset tracking broken");
            }
        }
        if let Some(w) = self.tracker.watermark() {
            s.book.publish(&self.tp, w, self.logs);
        }
        Ok(())
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
        self.stages.metrics.ownership_checks.inc();
        let mut stop = self.stop.clone();
        let revoked = tokio::time::timeout(liveness.confirm_for, stop.wait_for(|s| *s)).await.is_ok();
        if revoked {
            warn!(topic = %self.tp.0, partition = self.tp.1, "partition revoked after a freeze; its batch is not written (the next owner processes it)");
            self.stages.metrics.zombie_batches_dropped.inc();
            return Err(Stop::Draining);
        }
        Ok(())
    }

    /// filter + store: gives every keyed item its decision; the claims won are
    /// added to `held` as they are won, for the heartbeat.
    async fn decide(&self, items: &mut [Item], held: &Held) -> Result<(), Stop> {
        let s = &self.stages;
        let now = now_ms();
        // Leaders are the first record of each key in the batch; followers copy their answer.
        let mut leader_of: HashMap<u128, usize> = HashMap::new();
        let mut followers: Vec<(usize, usize)> = Vec::new();
        let mut suspects = Vec::new();
        let mut to_claim = Vec::new();
        let mut recent_hits = 0;
        {
            let mut filter = s.filter.lock().unwrap_or_else(|p| p.into_inner());
            // The aging filter outgrows the caches: read its buckets a few keys ahead.
            let digests: Vec<u128> = items
                .iter()
                .filter_map(|item| match item {
                    Item::Keyed { envelope, .. } => Some(envelope.digest),
                    Item::Bad { .. } => None,
                })
                .collect();
            digests.iter().take(PREFETCH_AHEAD).for_each(|d| filter.prefetch(*d));
            let mut ahead = digests.iter().skip(PREFETCH_AHEAD);
            for (i, item) in items.iter_mut().enumerate() {
                let Item::Keyed { envelope, decision, leader } = item else { continue };
                if let Some(d) = ahead.next() {
                    filter.prefetch(*d);
                }
                let digest = envelope.digest;
                if let Some(&first) = leader_of.get(&digest) {
                    *leader = Some(first);
                    followers.push((i, first));
                    continue;
                }
                leader_of.insert(digest, i);
                match filter.check(envelope, now) {
                    Verdict::RecentDuplicate => {
                        recent_hits += 1;
                        *decision = Some(Decision::Duplicate { expires_at_ms: None });
                    }
                    Verdict::Suspect => suspects.push(i),
                    Verdict::LikelyNew => to_claim.push(i),
                }
            }
        }
        for (result, n) in [("recent_hit", recent_hits), ("bloom_hit", suspects.len()), ("bloom_miss", to_claim.len())]
        {
            s.metrics.filter.with_label_values(&[result]).inc_by(n as u64);
        }

        // Suspected duplicates: a read first; only keys not found done go on to the claim.
        if !suspects.is_empty() {
            let keys: Vec<_> = suspects.iter().map(|&i| envelope(&items[i]).key.clone()).collect();
            let rows = self.store_call("lookup", || s.store.lookup(keys.clone(), now)).await?;
            for (&i, row) in suspects.iter().zip(rows) {
                match row {
                    Some(row) if row.state == ClaimState::Done => {
                        let fp = envelope(&items[i]).fingerprint;
                        set_decision(
                            &mut items[i],
                            if row.fingerprint == fp {
                                Decision::Duplicate { expires_at_ms: Some(row.expires_at_ms) }
                            } else {
                                Decision::Conflict(row.fingerprint)
                            },
                        );
                    }
                    Some(_) => to_claim.push(i),
                    None => {
                        s.metrics.bloom_false_positives.inc();
                        to_claim.push(i);
                    }
                }
            }
            to_claim.sort_unstable();
        }

        // Claims; in-flight answers (another owner's live lease) wait and ask again.
        //
        // A batch that keeps waiting gives back what it won: two batches that each
        // hold keys the other wants (cross-partition duplicates claimed in
        // different rounds, or key by key on ScyllaDB) would otherwise wait on
        // each other for ever, both kept alive by their heartbeats. Most waits
        // end within milliseconds (the other batch completes), so only a wait
        // past GIVE_BACK_AFTER gives back. A claim that was resumed or taken
        // over keeps that (and its possible-repeat mark) when it is claimed
        // again after being given back.
        let mut backoff = Backoff::for_claim_waits();
        let mut won: Vec<usize> = Vec::new();
        let mut first_won_as: HashMap<usize, Acquired> = HashMap::new();
        let mut waiting_since: Option<Instant> = None;
        let mut parked: Vec<usize> = Vec::new();
        while !to_claim.is_empty() {
            let requests: Vec<ClaimRequest> = to_claim
                .iter()
                .map(|&i| {
                    let e = envelope(&items[i]);
                    ClaimRequest { key: e.key.clone(), fingerprint: e.fingerprint, position: e.record.position.clone() }
                })
                .collect();
            let mut settled = s.settled_claims.subscribe();
            settled.mark_unchanged();
            let claimed_at_ms = now_ms();
            let answers = self.store_call("claim", || s.store.claim(requests.clone(), claimed_at_ms)).await?;
            let mut waiting = Vec::new();
            let mut resumed_from: Option<(i64, u64)> = None;
            for (&i, answer) in to_claim.iter().zip(answers) {
                match answer {
                    Claim::New(acquired) => {
                        let acquired = match first_won_as.get(&i) {
                            Some(&first) if first.may_repeat() => first,
                            Some(_) => acquired,
                            None => {
                                first_won_as.insert(i, acquired);
                                match acquired {
                                    Acquired::Fresh => {}
                                    Acquired::Resumed => {
                                        s.metrics.claims_resumed.inc();
                                        let offset = envelope(&items[i]).record.position.offset;
                                        let (first, n) = resumed_from.unwrap_or((offset, 0));
                                        resumed_from = Some((first, n + 1));
                                    }
                                    Acquired::TakenOver => {
                                        s.metrics.lease_takeovers.inc();
                                        warn!(position = %envelope(&items[i]).record.position, "took over a claim whose lease lapsed; its owner's effect may have run, so this one is marked as a possible repeat");
                                    }
                                }
                                acquired
                            }
                        };
                        won.push(i);
                        let e = envelope(&items[i]);
                        held.add([(e.key.clone(), e.record.position.clone())]);
                        set_decision(&mut items[i], Decision::New { acquired, claimed_at_ms });
                    }
                    Claim::Duplicate => set_decision(&mut items[i], Decision::Duplicate { expires_at_ms: None }),
                    Claim::Conflict { stored } => set_decision(&mut items[i], Decision::Conflict(stored)),
                    Claim::InFlight { holder, .. } => {
                        s.metrics.claim_waits.inc();
                        debug!(position = %envelope(&items[i]).record.position, %holder, "key in flight elsewhere; waiting");
                        waiting.push(i);
                    }
                }
            }
            if let Some((first_offset, count)) = resumed_from {
                info!(topic = %self.tp.0, partition = self.tp.1, first_offset, count, "resuming our own unfinished claims after a crash");
            }
            if !waiting.is_empty() {
                let since = *waiting_since.get_or_insert_with(Instant::now);
                if !won.is_empty() && since.elapsed() >= GIVE_BACK_AFTER {
                    waiting_since = None;
                    // Fresh claims are released: no effect of them can exist. A resumed
                    // or taken-over claim's earlier effect may be in the output, so its
                    // row must stay (a fresh claim elsewhere would repeat it unmarked):
                    // it is parked instead, no longer renewed, so its lease lapses and
                    // whoever waits on it takes it over, marked. Parked keys are asked
                    // again only once nothing else waits.
                    let (fresh, marked): (Vec<usize>, Vec<usize>) =
                        won.drain(..).partition(|&i| !first_won_as.get(&i).is_some_and(|a| a.may_repeat()));
                    let keys_of = |idx: &[usize]| -> Vec<(EventKey, Position)> {
                        idx.iter()
                            .map(|&i| {
                                let e = envelope(&items[i]);
                                (e.key.clone(), e.record.position.clone())
                            })
                            .collect()
                    };
                    let (released, kept) = (keys_of(&fresh), keys_of(&marked));
                    debug!(topic = %self.tp.0, partition = self.tp.1, released = released.len(), parked = kept.len(), "waiting on claims held elsewhere; giving ours back meanwhile");
                    held.remove(&released);
                    held.remove(&kept);
                    if !released.is_empty() {
                        self.store_call("release", || s.store.release(released.clone())).await?;
                        s.settled_claims.send_modify(|n| *n += 1);
                    }
                    s.metrics.claims_given_back.inc_by((released.len() + kept.len()) as u64);
                    for &i in fresh.iter().chain(&marked) {
                        clear_decision(&mut items[i]);
                    }
                    waiting.extend(fresh);
                    waiting.sort_unstable();
                    parked.extend(marked);
                    // Jitter, so two batches that gave back do not meet again in step.
                    tokio::time::sleep(Duration::from_millis(rand::random_range(0..50))).await;
                }
            } else if !parked.is_empty() {
                waiting.append(&mut parked);
                waiting.sort_unstable();
            }
            to_claim = waiting;
            if !to_claim.is_empty() {
                // Waiting on another owner's live claim is not a stall: that owner
                // progresses (or reports its own stall), and its lease bounds the wait.
                // A claim settled in this process (most holders are our own other
                // partitions) ends the wait at once; the backoff covers other processes.
                tokio::select! {
                    _ = settled.changed() => {}
                    paused = self.pause(&mut backoff) => paused?,
                }
            }
        }

        for (i, leader) in followers {
            let authority = match (decision_of(&items[leader]), envelope(&items[leader]).fingerprint) {
                (Decision::Conflict(stored), _) => stored,
                (_, fp) => fp,
            };
            let fp = envelope(&items[i]).fingerprint;
            set_decision(
                &mut items[i],
                if fp == authority {
                    Decision::Duplicate { expires_at_ms: None }
                } else {
                    Decision::Conflict(authority)
                },
            );
        }
        Ok(())
    }

    /// sink + side topics + complete/release.
    async fn apply_effects(&mut self, items: &mut [Item], held: &Held) -> Result<(), Stop> {
        let s = self.stages.clone();
        let resumed = items.iter().filter_map(|item| match item {
            Item::Keyed { envelope, decision: Some(Decision::New { acquired: Acquired::Resumed, .. }), .. } => {
                Some(envelope.record.position.offset)
            }
            _ => None,
        });
        self.reached_before = self.reached_before.into_iter().chain(resumed).max();

        // The effect, for new events, in order; retriable failures are retried.
        // Effects reconciliation found in the output already ran: they are only completed.
        let mut pending: Vec<usize> = Vec::new();
        for (i, item) in items.iter().enumerate() {
            if let Item::Keyed { envelope, decision: Some(Decision::New { .. }), .. } = item {
                if self.emitted.remove(&envelope.record.position.offset) {
                    s.metrics.reconciled.inc();
                } else {
                    pending.push(i);
                }
            }
        }
        if let Some(delay) = s.faults.take_delay(items) {
            s.faults.fired.notify_one();
            tokio::time::sleep(delay).await;
        }
        let mut rejected: Vec<(usize, SinkError)> = Vec::new();
        let mut responses: Vec<(usize, EffectResponse)> = Vec::new();
        let mut backoff = Backoff::new();
        let started = Instant::now();
        // A failed write may still have landed (a delivery timeout says "possibly
        // persisted"), so retries are marked as possible repeats.
        let mut retrying = false;
        while !pending.is_empty() {
            let batch: Vec<Effect<'_>> = pending
                .iter()
                .map(|&i| {
                    let envelope = envelope(&items[i]);
                    let taken = matches!(items[i], Item::Keyed { decision: Some(Decision::New { acquired, .. }), .. } if acquired.may_repeat());
                    Effect {
                        envelope,
                        possible_repeat: retrying || taken || held.was_lost(envelope.record.position.offset),
                    }
                })
                .collect();
            let repeats = batch.iter().filter(|e| e.possible_repeat).count();
            s.metrics.possible_repeats.inc_by(repeats as u64);
            let results = s.sink.deliver(&batch).await;
            let mut retry = Vec::new();
            for (&i, result) in pending.iter().zip(results) {
                match result {
                    Ok(delivered) => {
                        if let Some(landed) = delivered.mark {
                            OutputMark::advance(&mut self.logs.output, landed);
                        }
                        responses.extend(delivered.response.map(|r| (i, r)));
                    }
                    Err(e) if e.is_fatal() => {
                        s.metrics.sink_errors.inc();
                        error!(topic = %self.tp.0, partition = self.tp.1, position = %envelope(&items[i]).record.position, error = %e, "fatal producer error; kdedup stops so that it restarts with a new producer");
                        s.fatal.raise(format!("fatal producer error: {e}"));
                        return Err(Stop::Fatal);
                    }
                    Err(e) if e.is_retriable() => {
                        s.metrics.sink_errors.inc();
                        warn!(position = %envelope(&items[i]).record.position, error = %e, sink = s.sink.kind(), "effect failed; retrying");
                        retry.push(i);
                    }
                    Err(e) => {
                        s.metrics.sink_errors.inc();
                        rejected.push((i, e));
                    }
                }
            }
            pending = retry;
            retrying = true;
            if !pending.is_empty() {
                self.stalled();
                self.pause(&mut backoff).await?;
            }
        }
        self.progressing();
        s.metrics.sink_seconds.observe(started.elapsed().as_secs_f64());
        if Faults::take(&s.faults.crash_after_effect, items) {
            return Err(Stop::Crashed);
        }

        // A rejected effect releases its claim (the key is not burned) and is
        // dead-lettered; so are later records of the same event in this batch,
        // which followed the rejected one as its duplicates.
        if !rejected.is_empty() {
            let keys: Vec<_> = rejected
                .iter()
                .map(|(i, _)| {
                    let e = envelope(&items[*i]);
                    (e.key.clone(), e.record.position.clone())
                })
                .collect();
            held.remove(&keys);
            self.store_call("release", || s.store.release(keys.clone())).await?;
            let mut filter = s.filter.lock().unwrap_or_else(|p| p.into_inner());
            let mut reasons: HashMap<usize, String> = HashMap::new();
            for (i, e) in rejected {
                filter.forget(envelope(&items[i]).digest);
                let reason = e.to_string();
                reasons.insert(i, reason.clone());
                let Item::Keyed { envelope, .. } = std::mem::replace(&mut items[i], placeholder()) else {
                    unreachable!("only keyed items have effects")
                };
                items[i] = Item::Bad { record: envelope.record, error: RecordError::SinkRejected(reason) };
            }
            drop(filter);
            for item in items.iter_mut() {
                let Item::Keyed { leader: Some(leader), .. } = item else { continue };
                let Some(reason) = reasons.get(leader) else { continue };
                let error = RecordError::SinkRejected(format!(
                    "the first record of this event in its batch was rejected: {reason}"
                ));
                let Item::Keyed { envelope, .. } = std::mem::replace(item, placeholder()) else {
                    unreachable!("matched as keyed above")
                };
                *item = Item::Bad { record: envelope.record, error };
            }
        }

        // The endpoints' answers go on the claim rows before they turn done.
        if !responses.is_empty() {
            let recorded: Vec<(EventKey, Position, EffectResponse)> = responses
                .into_iter()
                .map(|(i, r)| {
                    let e = envelope(&items[i]);
                    (e.key.clone(), e.record.position.clone(), r)
                })
                .collect();
            self.store_call("record", || s.store.record(recorded.clone())).await?;
        }

        // complete
        let done: Vec<(EventKey, Position)> = items
            .iter()
            .filter_map(|item| match item {
                Item::Keyed { envelope, decision: Some(Decision::New { .. }), .. } => {
                    Some((envelope.key.clone(), envelope.record.position.clone()))
                }
                _ => None,
            })
            .collect();
        held.clear();
        if !done.is_empty() {
            let held = self.store_call("complete", || s.store.complete(done.clone(), now_ms())).await?;
            s.settled_claims.send_modify(|n| *n += 1);
            for ((_, position), held) in done.iter().zip(held) {
                if !held {
                    s.metrics.claims_lost.inc();
                    warn!(%position, "claim was taken over before completion; the effect may run twice");
                }
            }
        }

        // Side topics: dead letters and (optionally) duplicates.
        let conflicts_dead_letter = s.config.on_conflict == OnConflict::DeadLetter;
        let mut dead: Vec<(&Record, RecordError)> = Vec::new();
        let mut dups: Vec<&Envelope> = Vec::new();
        for item in items.iter() {
            let (record, error) = match item {
                Item::Bad { record, error } => (record, error.clone()),
                Item::Keyed { envelope, decision: Some(Decision::Conflict(stored)), .. } if conflicts_dead_letter => {
                    (&envelope.record, RecordError::Conflict { stored: stored.to_string() })
                }
                Item::Keyed { envelope, decision: Some(Decision::Duplicate { .. }), .. } => {
                    dups.push(envelope);
                    continue;
                }
                _ => continue,
            };
            // Dead-lettered by an owner that died before committing: not again.
            if self.dead_lettered.remove(&record.position.offset) {
                s.metrics.reconciled.inc();
            } else {
                dead.push((record, error));
            }
        }
        let dead_letters: Vec<DeadLetter<'_>> = dead
            .iter()
            .map(|(record, error)| DeadLetter {
                record,
                error,
                possible_repeat: self.reached_before.is_some_and(|r| record.position.offset <= r),
            })
            .collect();
        for landed in self.write_side(Side::DeadLetter, &dead_letters, |batch| s.side.dead_letter(batch)).await? {
            OutputMark::advance(&mut self.logs.dead_letter, landed);
        }
        s.metrics.dead_lettered(&self.tp.0, dead.iter().map(|(_, e)| e.reason()));
        if s.side.duplicates.is_some() {
            self.write_side(Side::Duplicates, &dups, |batch| s.side.duplicates(batch)).await?;
        }

        // filter memory + outcome counts
        let now = now_ms();
        let mut filter = s.filter.lock().unwrap_or_else(|p| p.into_inner());
        let mut counts = [0u64; OUTCOMES.len()];
        for item in items.iter() {
            let outcome = match item {
                Item::Bad { .. } => 3,
                Item::Keyed { envelope, decision, .. } => {
                    match decision.expect("every keyed item is decided before effects") {
                        // The row lives a TTL from its claim; a resumed claim kept an
                        // older claim time we do not know here, so it is not cached.
                        Decision::New { acquired, claimed_at_ms } => {
                            if acquired == Acquired::Resumed {
                                filter.remember_seen(envelope, now);
                            } else {
                                filter.remember_claimed(envelope, claimed_at_ms, now);
                            }
                            0
                        }
                        // Only a row read back says how long it lives: a duplicate never
                        // extends what the cache vouches for.
                        Decision::Duplicate { expires_at_ms: Some(expires_at_ms) } => {
                            filter.remember_done(envelope, expires_at_ms, now);
                            1
                        }
                        Decision::Duplicate { expires_at_ms: None } => {
                            filter.remember_seen(envelope, now);
                            1
                        }
                        Decision::Conflict(_) => {
                            filter.remember_seen(envelope, now);
                            2
                        }
                    }
                }
            };
            counts[outcome] += 1;
        }
        s.metrics.filter_bytes.set(filter.memory_bytes() as i64);
        drop(filter);
        // Indexes follow OUTCOMES: new, duplicate, conflict, dead_letter.
        for (outcome, n) in OUTCOMES.iter().zip(counts) {
            if n > 0 {
                s.metrics.records.at([&self.tp.0, outcome]).inc_by(n);
            }
        }
        Ok(())
    }

    /// Writes to a side topic, retrying retriable failures. A dead letter the
    /// topic refuses for good has nowhere else to go: the partition stalls on
    /// it, loudly (error log naming the record, the stalled gauge, `/readyz`
    /// 503), and keeps trying, so the record is never committed unwritten.
    /// (Records refused for their size were already written truncated by
    /// [`SideTopics::dead_letter`].) A duplicates-topic copy refused for good
    /// is only an audit copy: logged, counted, and skipped.
    /// Returns where the written records landed.
    async fn write_side<T, F, Fut>(&self, side: Side, records: &[T], write: F) -> Result<Vec<OutputMark>, Stop>
    where
        T: HasPosition,
        F: Fn(Vec<T>) -> Fut,
        Fut: std::future::Future<Output = Vec<Result<OutputMark, SinkError>>>,
    {
        let what = side.name();
        let mut landed = Vec::with_capacity(records.len());
        let mut pending: Vec<usize> = (0..records.len()).collect();
        let mut backoff = Backoff::new();
        while !pending.is_empty() {
            let batch: Vec<T> = pending.iter().map(|&i| records[i].clone()).collect();
            let results = write(batch).await;
            let mut retry = Vec::new();
            for (&i, result) in pending.iter().zip(results) {
                match result {
                    Ok(mark) => landed.push(mark),
                    Err(e) if e.is_fatal() => {
                        error!(position = %records[i].position(), topic = what, error = %e, "fatal producer error; kdedup stops so that it restarts with a new producer");
                        self.stages.fatal.raise(format!("fatal producer error: {e}"));
                        return Err(Stop::Fatal);
                    }
                    Err(e) if e.is_retriable() => retry.push(i),
                    Err(e) => {
                        self.stages.metrics.sink_errors.inc();
                        self.stages.metrics.side_refusals.with_label_values(&[what]).inc();
                        match side {
                            Side::DeadLetter => {
                                error!(position = %records[i].position(), topic = what, error = %e, "the dead-letter topic refuses this record: the partition stalls on it until the topic accepts it (check its ACLs, size limits and existence)");
                                retry.push(i);
                            }
                            Side::Duplicates => {
                                error!(position = %records[i].position(), topic = what, error = %e, "the duplicates topic refused an audit copy; skipped")
                            }
                        }
                    }
                }
            }
            pending = retry;
            if !pending.is_empty() {
                self.stages.metrics.sink_errors.inc();
                self.stalled();
                warn!(topic = what, records = pending.len(), "side topic write failed; retrying");
                self.pause(&mut backoff).await?;
            }
        }
        self.progressing();
        Ok(landed)
    }
}

/// The side topics, for logs and the refusal counter.
#[derive(Debug, Clone, Copy)]
enum Side {
    DeadLetter,
    Duplicates,
}

impl Side {
    fn name(self) -> &'static str {
        match self {
            Side::DeadLetter => "dead_letter",
            Side::Duplicates => "duplicates",
        }
    }
}

/// One heartbeat: extends the leases of the claims a batch holds. A refusal
/// means another owner took the claim over while we held it (our lease had
/// lapsed: a freeze, a store outage longer than the lease): the effect is then
/// marked as a possible repeat.
async fn renew(stages: &Stages, tp: &TopicPartition, held: &Held) {
    let keys = held.snapshot();
    if keys.is_empty() {
        return;
    }
    match stages.store.renew(keys.clone(), now_ms()).await {
        Ok(answers) => {
            let lost: Vec<i64> = keys.iter().zip(answers).filter(|(_, ok)| !ok).map(|((_, p), _)| p.offset).collect();
            if !lost.is_empty() {
                stages.metrics.leases_lost.inc_by(lost.len() as u64);
                warn!(topic = %tp.0, partition = tp.1, claims = lost.len(), first_offset = lost[0], "claims taken over while this partition held them; their effects will be marked as possible repeats");
                held.lost.lock().unwrap_or_else(|p| p.into_inner()).extend(lost);
            }
        }
        Err(e) => {
            warn!(topic = %tp.0, partition = tp.1, error = %e, "lease renewal failed; trying again at the next heartbeat")
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

trait HasPosition: Clone {
    fn position(&self) -> &Position;
}
impl HasPosition for DeadLetter<'_> {
    fn position(&self) -> &Position {
        &self.record.position
    }
}
impl HasPosition for &Envelope {
    fn position(&self) -> &Position {
        &self.record.position
    }
}

fn envelope(item: &Item) -> &Envelope {
    match item {
        Item::Keyed { envelope, .. } => envelope,
        Item::Bad { .. } => unreachable!("only keyed items are indexed for the store"),
    }
}

fn decision_of(item: &Item) -> Decision {
    match item {
        Item::Keyed { decision: Some(d), .. } => *d,
        _ => unreachable!("leaders are decided before their followers"),
    }
}

fn clear_decision(item: &mut Item) {
    if let Item::Keyed { decision, .. } = item {
        *decision = None;
    }
}

fn set_decision(item: &mut Item, d: Decision) {
    if let Item::Keyed { decision, .. } = item {
        *decision = Some(d);
    }
}

fn placeholder() -> Item {
    Item::Bad {
        record: Record {
            position: Position { topic: Arc::from(""), partition: -1, offset: -1 },
            key: None,
            payload: None,
            headers: Vec::new(),
            timestamp_ms: None,
            bad_header: None,
        },
        error: RecordError::MissingId(String::new()),
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
                stages.metrics.partition_panics.inc();
                stages.metrics.partition_stalled(&tp_of_task);
                stages.fatal.raise(format!("partition task {topic}/{partition} panicked: {what}"));
            }
        });
        self.stages.metrics.assigned_partitions.inc();
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
        let deadline = Instant::now() + self.stages.config.drain_timeout;
        for (tp, r) in &taken {
            let left = deadline.saturating_duration_since(Instant::now());
            if let Err(std::sync::mpsc::RecvTimeoutError::Timeout) = r.ended.recv_timeout(left) {
                warn!(topic = %tp.0, partition = tp.1, "partition did not drain in time; abandoning its unfinished batch");
                r.handle.abort();
                let _ = r.ended.recv_timeout(Duration::from_secs(5));
            }
            self.stages.metrics.assigned_partitions.dec();
            self.stages.metrics.partition_gone(tp);
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
