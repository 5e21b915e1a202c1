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
//! Failure handling: store errors and retriable sink errors are retried with
//! backoff while the partition waits (readiness goes false, no offset moves);
//! records that cannot be handled are dead-lettered with their reason.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::{FutureExt, StreamExt};
use tokio::sync::watch;
use tracing::{debug, error, info, warn};

use crate::config::{OnConflict, PipelineConfig};
use crate::error::{RecordError, SinkError, StoreError};
use crate::event::{Envelope, Fingerprint, KeyExtractor, Position, Record};
use crate::filter::{Filter, Verdict, PREFETCH_AHEAD};
use crate::metrics::{Metrics, OUTCOMES};
use crate::offsets::{CommitBook, LogMarks, OffsetTracker, OutputMark, TopicPartition};
use crate::reconcile::{Log, Reconciler};
use crate::sink::{Effect, SideTopics, Sink};
use crate::source::{PartitionHandler, PartitionQueue, Resume};
use crate::store::{now_ms, Claim, ClaimRequest, ClaimState, DedupStore, Store};

/// Test hooks that stand in for crashes at chosen points. Empty in production.
#[derive(Default, Clone)]
pub struct Faults {
    /// Claim the batch holding this position, then stop the partition task
    /// before any effect runs, as a crash would. Fires once.
    pub crash_after_claim: Arc<Mutex<Option<Position>>>,
    /// Run the effects of the batch holding this position, then stop before
    /// completing the claims (the window reconciliation closes). Fires once.
    pub crash_after_effect: Arc<Mutex<Option<Position>>>,
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
}

/// Everything a partition task needs; shared by all partition tasks.
pub struct Stages {
    pub extractor: KeyExtractor,
    pub filter: Mutex<Filter>,
    pub store: Store,
    pub sink: Sink,
    pub side: SideTopics,
    pub metrics: Metrics,
    pub book: Arc<CommitBook>,
    pub config: PipelineConfig,
    pub faults: Faults,
    /// Reads the output and dead-letter topics back on assignment.
    pub reconciler: Reconciler,
}

impl Stages {
    /// The output log an input partition writes to, when it is fixed.
    fn output_log(&self, input_partition: i32, mark: Option<OutputMark>) -> Option<Log> {
        match &self.sink {
            Sink::Kafka(k) => k.output_partition(input_partition).map(|partition| Log {
                topic: k.topic().to_string(),
                partition,
                mark,
            }),
            Sink::Stdout(_) => None,
        }
    }

    fn dead_letter_log(&self, input_partition: i32, mark: Option<OutputMark>) -> Log {
        Log { topic: self.side.dead_letter.clone(), partition: self.side.dead_letter_partition(input_partition), mark }
    }

    /// Waits until this process's own writes to the logs of `input_partition`
    /// have resolved: an abandoned task's writes may still be queued, and must
    /// land before anyone reads those logs back.
    async fn settle_logs(&self, input_partition: i32) {
        if let Some(out) = self.output_log(input_partition, None) {
            self.side.writer.settled(&out.topic, out.partition).await;
        }
        let dead_letter = self.dead_letter_log(input_partition, None);
        self.side.writer.settled(&dead_letter.topic, dead_letter.partition).await;
    }
}

/// A record on its way through one batch.
enum Item {
    Keyed { envelope: Envelope, decision: Option<Decision> },
    Bad { record: Record, error: RecordError },
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
    /// `resumed`: our own earlier attempt at this very record held the claim.
    New {
        resumed: bool,
    },
    Duplicate,
    Conflict(Fingerprint),
}

/// Why a batch stopped short; the partition task ends without publishing it.
#[derive(Debug)]
enum Stop {
    /// Draining was requested while the batch waited on a retry.
    Draining,
    /// A test fault fired.
    Crashed,
}

/// Exponential backoff from 50 ms to 5 s.
struct Backoff(Duration);

impl Backoff {
    fn new() -> Backoff {
        Backoff(Duration::from_millis(50))
    }
    fn next(&mut self) -> Duration {
        let d = self.0;
        self.0 = (self.0 * 2).min(Duration::from_secs(5));
        d
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

    /// Before the first batch: find effects and dead letters written after the
    /// last commit. Retried until it succeeds: going on without it could write twice.
    async fn reconcile(&mut self) -> Result<(), Stop> {
        let from = self.resume.committed.unwrap_or(0);
        let output = self.stages.output_log(self.tp.1, self.resume.logs.output);
        let dead_letter = self.stages.dead_letter_log(self.tp.1, self.resume.logs.dead_letter);
        let stages = self.stages.clone();
        tokio::select! {
            _ = stages.settle_logs(self.tp.1) => {}
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
                    self.emitted = found.emitted;
                    self.dead_lettered = found.dead_lettered;
                    return Ok(());
                }
                Err(e) => {
                    warn!(topic = %self.tp.0, partition = self.tp.1, error = %e, "cannot read the output back; retrying before processing");
                    if self.draining() {
                        return Err(Stop::Draining);
                    }
                    tokio::time::sleep(backoff.next()).await;
                }
            }
        }
    }

    /// Retries a store call with backoff until it answers; readiness is false meanwhile.
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
                    self.stages.metrics.set_ready(true);
                    return Ok(v);
                }
                Err(e) => {
                    self.stages.metrics.store_errors.inc();
                    self.stages.metrics.set_ready(false);
                    if !e.is_retriable() {
                        // A corrupt row cannot be fixed by waiting; keep the partition
                        // paused and loud rather than guess.
                        error!(topic = %self.tp.0, partition = self.tp.1, op, error = %e, "store call failed; not retriable, operator action needed");
                    } else {
                        warn!(topic = %self.tp.0, partition = self.tp.1, op, error = %e, "store call failed; retrying");
                    }
                    if self.draining() {
                        return Err(Stop::Draining);
                    }
                    tokio::time::sleep(backoff.next()).await;
                }
            }
        }
    }

    /// One batch through key, filter, store, sink and complete; `arrived` is
    /// when its first record was taken from the partition queue.
    async fn process(&mut self, records: Vec<Record>, arrived: Instant) -> Result<(), Stop> {
        let s = self.stages.clone();
        s.metrics.consumed.inc_by(records.len() as u64);
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
                Ok(envelope) => Item::Keyed { envelope, decision: None },
                Err((record, error)) => Item::Bad { record, error },
            })
            .collect();

        self.decide(&mut items).await?;
        if Faults::take(&s.faults.crash_after_claim, &items) {
            return Err(Stop::Crashed);
        }
        self.apply_effects(&mut items).await?;

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

    /// filter + store: gives every keyed item its decision.
    async fn decide(&self, items: &mut [Item]) -> Result<(), Stop> {
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
                let Item::Keyed { envelope, decision } = item else { continue };
                if let Some(d) = ahead.next() {
                    filter.prefetch(*d);
                }
                let digest = envelope.digest;
                if let Some(&leader) = leader_of.get(&digest) {
                    followers.push((i, leader));
                    continue;
                }
                leader_of.insert(digest, i);
                match filter.check(envelope, now) {
                    Verdict::RecentDuplicate => {
                        recent_hits += 1;
                        *decision = Some(Decision::Duplicate);
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
                                Decision::Duplicate
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
        let mut backoff = Backoff::new();
        while !to_claim.is_empty() {
            let requests: Vec<ClaimRequest> = to_claim
                .iter()
                .map(|&i| {
                    let e = envelope(&items[i]);
                    ClaimRequest { key: e.key.clone(), fingerprint: e.fingerprint, position: e.record.position.clone() }
                })
                .collect();
            let answers = self.store_call("claim", || s.store.claim(requests.clone(), now_ms())).await?;
            let mut waiting = Vec::new();
            let mut resumed_from: Option<(i64, u64)> = None;
            for (&i, answer) in to_claim.iter().zip(answers) {
                match answer {
                    Claim::New { resumed } => {
                        if resumed {
                            s.metrics.claims_resumed.inc();
                            let offset = envelope(&items[i]).record.position.offset;
                            let (first, n) = resumed_from.unwrap_or((offset, 0));
                            resumed_from = Some((first, n + 1));
                        }
                        set_decision(&mut items[i], Decision::New { resumed });
                    }
                    Claim::Duplicate => set_decision(&mut items[i], Decision::Duplicate),
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
            to_claim = waiting;
            if !to_claim.is_empty() {
                if self.draining() {
                    return Err(Stop::Draining);
                }
                tokio::time::sleep(backoff.next()).await;
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
                if fp == authority { Decision::Duplicate } else { Decision::Conflict(authority) },
            );
        }
        Ok(())
    }

    /// sink + side topics + complete/release.
    async fn apply_effects(&mut self, items: &mut [Item]) -> Result<(), Stop> {
        let s = self.stages.clone();

        // The effect, for new events, in order; retriable failures are retried.
        // Effects reconciliation found in the output already ran: they are only completed.
        let mut pending: Vec<usize> = Vec::new();
        for (i, item) in items.iter().enumerate() {
            if let Item::Keyed { envelope, decision: Some(Decision::New { .. }) } = item {
                if self.emitted.remove(&envelope.record.position.offset) {
                    s.metrics.reconciled.inc();
                } else {
                    pending.push(i);
                }
            }
        }
        let mut rejected: Vec<(usize, SinkError)> = Vec::new();
        let mut backoff = Backoff::new();
        let started = Instant::now();
        // A failed write may still have landed (a delivery timeout says "possibly
        // persisted"), so retries are marked as possible repeats.
        let mut retrying = false;
        while !pending.is_empty() {
            let batch: Vec<Effect<'_>> = pending
                .iter()
                .map(|&i| Effect {
                    envelope: envelope(&items[i]),
                    possible_repeat: retrying
                        || matches!(items[i], Item::Keyed { decision: Some(Decision::New { resumed: true }), .. }),
                })
                .collect();
            let results = s.sink.deliver(&batch).await;
            let mut retry = Vec::new();
            for (&i, result) in pending.iter().zip(results) {
                match result {
                    Ok(None) => {}
                    Ok(Some(landed)) => OutputMark::advance(&mut self.logs.output, landed),
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
                s.metrics.set_ready(false);
                if self.draining() {
                    return Err(Stop::Draining);
                }
                tokio::time::sleep(backoff.next()).await;
            }
        }
        s.metrics.sink_seconds.observe(started.elapsed().as_secs_f64());
        if Faults::take(&s.faults.crash_after_effect, items) {
            return Err(Stop::Crashed);
        }

        // A rejected effect releases its claim (the key is not burned) and is dead-lettered.
        if !rejected.is_empty() {
            let keys: Vec<_> = rejected
                .iter()
                .map(|(i, _)| {
                    let e = envelope(&items[*i]);
                    (e.key.clone(), e.record.position.clone())
                })
                .collect();
            self.store_call("release", || s.store.release(keys.clone())).await?;
            for (i, e) in rejected {
                let Item::Keyed { envelope, .. } = std::mem::replace(&mut items[i], placeholder()) else {
                    unreachable!()
                };
                items[i] = Item::Bad { record: envelope.record, error: RecordError::SinkRejected(e.to_string()) };
            }
        }

        // complete
        let done: Vec<(crate::event::EventKey, Position)> = items
            .iter()
            .filter_map(|item| match item {
                Item::Keyed { envelope, decision: Some(Decision::New { .. }) } => {
                    Some((envelope.key.clone(), envelope.record.position.clone()))
                }
                _ => None,
            })
            .collect();
        if !done.is_empty() {
            let held = self.store_call("complete", || s.store.complete(done.clone(), now_ms())).await?;
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
                Item::Keyed { envelope, decision: Some(Decision::Conflict(stored)) } if conflicts_dead_letter => {
                    (&envelope.record, RecordError::Conflict { stored: stored.to_string() })
                }
                Item::Keyed { envelope, decision: Some(Decision::Duplicate) } => {
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
        let dead_refs: Vec<(&Record, &RecordError)> = dead.iter().map(|(r, e)| (*r, e)).collect();
        for landed in self.write_side("dead_letter", &dead_refs, |batch| s.side.dead_letter(batch)).await? {
            OutputMark::advance(&mut self.logs.dead_letter, landed);
        }
        if s.side.duplicates.is_some() {
            self.write_side("duplicates", &dups, |batch| s.side.duplicates(batch)).await?;
        }

        // filter memory + outcome counts
        let now = now_ms();
        let mut filter = s.filter.lock().unwrap_or_else(|p| p.into_inner());
        let mut counts = [0u64; OUTCOMES.len()];
        for item in items.iter() {
            let outcome = match item {
                Item::Bad { .. } => 3,
                Item::Keyed { envelope, decision } => {
                    match decision.expect("every keyed item is decided before effects") {
                        Decision::New { .. } => {
                            filter.remember_done(envelope, envelope.fingerprint, now);
                            0
                        }
                        Decision::Duplicate => {
                            filter.remember_done(envelope, envelope.fingerprint, now);
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
        drop(filter);
        // Indexes follow OUTCOMES: new, duplicate, conflict, dead_letter.
        for (outcome, n) in OUTCOMES.iter().zip(counts) {
            if n > 0 {
                s.metrics.records.with_label_values(&[outcome]).inc_by(n);
            }
        }
        Ok(())
    }

    /// Writes to a side topic, retrying retriable failures; a record the topic
    /// refuses for good is logged loudly (it cannot be written anywhere else).
    /// Returns where the written records landed.
    async fn write_side<T, F, Fut>(&self, what: &'static str, records: &[T], write: F) -> Result<Vec<OutputMark>, Stop>
    where
        T: HasPosition,
        F: Fn(Vec<T>) -> Fut,
        Fut: std::future::Future<Output = Vec<Result<OutputMark, SinkError>>>,
    {
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
                    Err(e) if e.is_retriable() => retry.push(i),
                    Err(e) => {
                        self.stages.metrics.sink_errors.inc();
                        error!(position = %records[i].position(), topic = what, error = %e, "side topic refused the record for good");
                    }
                }
            }
            pending = retry;
            if !pending.is_empty() {
                self.stages.metrics.sink_errors.inc();
                warn!(topic = what, records = pending.len(), "side topic write failed; retrying");
                if self.draining() {
                    return Err(Stop::Draining);
                }
                tokio::time::sleep(backoff.next()).await;
            }
        }
        Ok(landed)
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
impl HasPosition for (&Record, &RecordError) {
    fn position(&self) -> &Position {
        &self.0.position
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
            logs: resume.logs,
        };
        let handle = self.runtime.spawn(async move {
            let _ended = ended_tx; // dropped with the future, whatever ends it
            task.run(queue).await;
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
        }
        // Writes of the stopped tasks may still be queued in the producer; the
        // next owner reads these logs back to learn what was written, so let
        // them land first (within the same bound). Called on the consumer's
        // own runtime thread: wait on a channel, not by blocking on a runtime.
        let (settled_tx, settled_rx) = std::sync::mpsc::channel::<()>();
        let (stages, inputs) = (self.stages.clone(), taken.iter().map(|(tp, _)| tp.1).collect::<Vec<_>>());
        self.runtime.spawn(async move {
            for p in inputs {
                stages.settle_logs(p).await;
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
