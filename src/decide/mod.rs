//! The decision core: one batch of records through key → filter → store →
//! sink → complete, knowing nothing of consumer groups. `kdedup run`'s
//! partition tasks (`pipeline`) and `kdedup replay` (`replay`) are its two
//! drivers: each brings its records, its way of pausing and stopping, and what
//! it knows of writes already made ([`Driver`]); the core brings the decision.
//!
//! Batches, not records, cross every hand-off: the filter is locked once, the
//! store gets one call per step, the producer gets the whole batch before any
//! delivery is awaited.
//!
//! Within a batch, records that share a key are resolved in order: the first
//! goes to the store, later ones follow its answer (a duplicate of it, or a
//! conflict).
//!
//! A batch never waits while it holds claims. Records whose key another owner
//! holds (the same event in flight on another partition) are set aside; the
//! rest of the batch runs its effects and completes, and only then do the
//! set-aside records ask again (most then find the key done: duplicates). So
//! batches that share keys never wait on each other, and an event in flight
//! elsewhere never holds back its batch's other effects. Should it turn out
//! new after all (the other claim was released, or lapsed and is taken over),
//! its effect runs after those of the records that followed it.
//!
//! While a batch holds claims, a heartbeat renews their leases every third of
//! `lease_secs`, so a slow effect never lets another owner take a live claim
//! over. A claim that is taken over after all (its owner died or froze past
//! its lease) is emitted with `kdedup-possible-repeat: true`.
//!
//! Failure handling: store errors and retriable sink errors are retried with
//! backoff while the driver waits (a partition reports itself stalled:
//! `/readyz` answers 503, no offset moves); records that cannot be handled are
//! dead-lettered with their reason; a dead letter that cannot be written
//! stalls the batch, loudly, rather than finish the record unwritten. A fatal
//! producer error raises [`Fatal`].

mod batch;
mod io;
mod lease;

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::watch;
use tracing::{debug, error, info, warn};

use crate::config::{Config, Mode, OnConflict, PipelineConfig};
use crate::error::{RecordError, SinkError};
use crate::event::{Envelope, EventKey, Fingerprint, KeyExtractor, Position, Record};
use crate::filter::{Filter, FilterAllocError, Verdict, PREFETCH_AHEAD};
use crate::metrics::{Metrics, OUTCOMES};
use crate::sink::{AnySink, DeadLetter, Effect, SideTopics};
use crate::store::{
    now_ms, release_marker, Acquired, Claim, ClaimRequest, ClaimState, DedupStore, EffectResponse, Store,
};
use crate::values::{OutputMark, TopicPartition};
use crate::window::First;

use self::batch::{decision_of, envelope, follow_leaders, observed, placeholder, set_aside, set_decision};
pub(crate) use self::io::Backoff;
use self::io::Side;
use self::lease::{renew, Held};

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
    pub(crate) fn take(slot: &Mutex<Option<Position>>, batch: &[Item]) -> bool {
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

/// A record on its way through one batch.
#[non_exhaustive]
pub enum Item {
    /// `leader`: the batch's first record of the same key, when this is a later one.
    Keyed {
        /// The record with its key and fingerprint.
        envelope: Envelope,
        /// `None` until the store (or the filter) has answered.
        decision: Option<Decision>,
        /// Index of the leader within the batch.
        leader: Option<usize>,
    },
    /// A record without a usable key: dead-lettered with `error`.
    Bad {
        /// The record as it came.
        record: Record,
        /// Why it has no usable key.
        error: RecordError,
    },
}

impl Item {
    /// The record, keyed or not.
    pub fn record(&self) -> &Record {
        match self {
            Item::Keyed { envelope, .. } => &envelope.record,
            Item::Bad { record, .. } => record,
        }
    }
}

/// The dedup decision for a keyed record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Decision {
    /// `claimed_at_ms`: the clock the claim was made with (its row expires a TTL later).
    New {
        /// How the claim was won: fresh, resumed, or taken over.
        acquired: Acquired,
        /// Milliseconds since the Unix epoch.
        claimed_at_ms: u64,
    },
    /// `expires_at_ms`: when the row that says so stops counting, when known;
    /// `first`: the key's first claim (its age) and position, when known.
    Duplicate {
        /// Milliseconds since the Unix epoch.
        expires_at_ms: Option<u64>,
        /// The first claim's age and position.
        first: Option<First>,
    },
    /// The key was first claimed with this other fingerprint.
    Conflict(Fingerprint),
}

/// Why a batch stopped short; its driver ends without publishing it.
#[derive(Debug)]
#[non_exhaustive]
pub enum Stop {
    /// Draining was requested (revoke, shutdown), or the partition may be lost.
    Draining,
    /// A test fault fired.
    Crashed,
    /// The process must stop (already raised on [`Fatal`]).
    Fatal,
}

/// Who holds the claims the core makes.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub enum Claimant {
    /// The record's own position: a consumer group's member. A redelivery of
    /// that position (the same member after a crash, or the partition's next
    /// owner) resumes the claim.
    Position,
    /// A replay job: its claims name the job, so they never resume or take
    /// over a live owner's claim by position equality; a rerun of the same job
    /// resumes its own. Its writes carry `kdedup-replay: <job>`.
    Replay(Arc<str>),
}

impl Claimant {
    /// The replay job, when this is one.
    pub fn job(&self) -> Option<&str> {
        match self {
            Claimant::Position => None,
            Claimant::Replay(job) => Some(job),
        }
    }
}

/// Where a write landed: the output topic or the dead-letter topic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Landed {
    /// The effect's output topic.
    Output,
    /// The dead-letter topic.
    DeadLetter,
}

/// What a driver brings to a batch: its partition (for logs and metrics), its
/// way of pausing (which ends when it stops), and what it knows of writes
/// already made before it started.
pub trait Driver: Send + Sync {
    /// The partition the batch came from.
    fn partition(&self) -> &TopicPartition;
    /// Sleeps `wait`, or ends at once with [`Stop::Draining`] when the driver stops.
    fn pause(&self, wait: Duration) -> impl Future<Output = Result<(), Stop>> + Send;
    /// Called before every write to the sink or a side topic (each attempt);
    /// an error drops the rest of the round unwritten. `since_ms`: when the
    /// batch started, or the previous check began.
    fn before_writes(&self, since_ms: u64) -> impl Future<Output = Result<(), Stop>> + Send;
    /// Whether this offset's effect, for this event, is known to be in the output
    /// already: it is then only completed. An effect found at the offset for
    /// another event (a reused position) is not this record's.
    fn already_emitted(&mut self, _offset: i64, _event_id: &[u8]) -> bool {
        false
    }
    /// Whether this offset, with this payload, is known to be dead-lettered already: not again.
    fn already_dead_lettered(&mut self, _offset: i64, _payload: Option<&[u8]>) -> bool {
        false
    }
    /// Whether an earlier owner reached this offset, so a dead letter for it may repeat one.
    fn reached_before(&self, _offset: i64) -> bool {
        false
    }
    /// Claims of our own earlier attempt were resumed, up to this offset.
    fn resumed_up_to(&mut self, _offset: i64) {}
    /// A write for the record at `source_offset` landed here.
    fn landed(&mut self, _log: Landed, _source_offset: i64, _mark: OutputMark) {}
    /// A round's records are done: decided, their effects and dead letters durable.
    fn finished(&mut self, items: &[Item]);
}

/// The decision and everything it uses; shared by all of a process's batches.
pub struct Core {
    /// Makes each record's key and fingerprint.
    pub extractor: KeyExtractor,
    /// The recent-key cache and aging filter.
    pub filter: Mutex<Filter>,
    /// The authority on claims.
    pub store: Store,
    /// The side effect.
    pub sink: AnySink,
    /// Dead-letter and duplicates topics.
    pub side: SideTopics,
    /// Where every outcome and latency is counted.
    pub metrics: Metrics,
    /// Batching, draining and conflict policy.
    pub config: PipelineConfig,
    /// Crash injection for tests; all empty in production.
    pub faults: Faults,
    /// The store's lease: claims are renewed every third of it.
    pub lease: Duration,
    /// Set when an error no retry fixes happened; the service stops on it.
    pub fatal: Fatal,
    /// Counts claim completions and releases in this process, so a batch that
    /// waits on a claim held by another partition here wakes when it is done.
    pub settled_claims: watch::Sender<u64>,
    /// Who claims: group members by position, or a replay job.
    pub claimant: Claimant,
}

impl Core {
    /// The core of `config`'s pipeline; no faults, its own [`Fatal`] (callers may replace both).
    pub fn new(
        config: &Config,
        store: Store,
        sink: AnySink,
        side: SideTopics,
        metrics: Metrics,
        claimant: Claimant,
    ) -> Result<Core, FilterAllocError> {
        Ok(Core {
            extractor: KeyExtractor::new(config.key.clone()),
            filter: Mutex::new(Filter::try_new(&config.filter, config.retention.ttl, now_ms())?),
            store,
            sink,
            side,
            metrics,
            config: config.pipeline.clone(),
            faults: Faults::default(),
            lease: config.retention.lease,
            fatal: Fatal::default(),
            settled_claims: watch::channel(0).0,
            claimant,
        })
    }

    /// The position a claim for this record is made under.
    fn claimant(&self, position: &Position) -> Position {
        match &self.claimant {
            Claimant::Position => position.clone(),
            Claimant::Replay(job) => Position {
                topic: Arc::from(format!("replay:{job}:{}", position.topic)),
                partition: position.partition,
                offset: position.offset,
            },
        }
    }

    fn stalled<D: Driver>(&self, d: &D) {
        self.metrics.partition_stalled(d.partition());
    }

    fn progressing<D: Driver>(&self, d: &D) {
        self.metrics.partition_progressing(d.partition());
    }

    /// One batch through key, filter, store, sink and complete, while a
    /// heartbeat renews the leases of the claims it holds; `arrived` is when
    /// its first record was taken, `started_ms` when the batch began.
    pub async fn run_batch<D: Driver>(&self, d: &mut D, records: Vec<Record>, arrived: Instant) -> Result<(), Stop> {
        let held = Held::default();
        let tp = d.partition().clone();
        let work = self.rounds(d, records, arrived, &held);
        tokio::pin!(work);
        let period = (self.lease / 3).max(Duration::from_millis(100));
        let mut heartbeat = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
        heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                result = &mut work => return result,
                _ = heartbeat.tick() => renew(self, &tp, &held).await,
            }
        }
    }

    /// The zombie's guard before each write: the driver checks it still owns
    /// its partition (after a freeze, by waiting for the group's word).
    async fn guard<D: Driver>(&self, d: &D, held: &Held) -> Result<(), Stop> {
        let at = now_ms();
        d.before_writes(held.checked_ms.load(Ordering::SeqCst)).await?;
        held.checked_ms.store(at, Ordering::SeqCst);
        Ok(())
    }

    /// The batch's rounds; when the driver stops it (a drain) before some of its fresh
    /// claims' effects were handed to the sink, those claims are released: they were never
    /// effected, so the next owner claims them fresh instead of resuming them as a crash's
    /// and marking them as possible repeats. A claim whose effect may have been handed over
    /// is never released: it is completed, or left for reconciliation.
    async fn rounds<D: Driver>(
        &self,
        d: &mut D,
        records: Vec<Record>,
        arrived: Instant,
        held: &Held,
    ) -> Result<(), Stop> {
        let result = self.run_rounds(d, records, arrived, held).await;
        if matches!(result, Err(Stop::Draining)) {
            self.release_unstarted(d, held).await;
        }
        result
    }

    /// Releases the held claims whose effect never started (one attempt: the driver is
    /// stopping, so a failing store is not waited on; the claims then stay for the next owner).
    async fn release_unstarted<D: Driver>(&self, d: &D, held: &Held) {
        let keys = held.take_unstarted();
        if keys.is_empty() {
            return;
        }
        let (topic, partition, count) = (&d.partition().0, d.partition().1, keys.len());
        held.remove(&keys);
        match self.store.release(keys).await {
            Ok(()) => {
                self.settled_claims.send_modify(|n| *n += 1);
                self.metrics.drain_released.inc_by(count as u64);
                info!(%topic, partition, count, "stopping: released the claims whose effects had not started (the next owner claims them fresh, unmarked)");
            }
            Err(e) => {
                warn!(%topic, partition, count, error = %e, "stopping: could not release the claims whose effects had not started; the next owner resumes them")
            }
        }
    }

    async fn run_rounds<D: Driver>(
        &self,
        d: &mut D,
        records: Vec<Record>,
        arrived: Instant,
        held: &Held,
    ) -> Result<(), Stop> {
        let s = self;
        held.checked_ms.store(now_ms(), Ordering::SeqCst);
        s.metrics.taken(d.partition(), &records);

        // key
        let mut items: Vec<Item> = records
            .into_iter()
            .map(|r| match s.extractor.extract(r) {
                Ok(envelope) => Item::Keyed { envelope, decision: None, leader: None },
                Err((record, error)) => Item::Bad { record, error },
            })
            .collect();
        if Faults::take(&s.faults.panic_at, &items) {
            panic!("injected panic in partition {}/{}", d.partition().0, d.partition().1);
        }

        // filter, then rounds of store → sink → complete. A round's records whose
        // key is in flight elsewhere are set aside and claimed again in the next
        // round, once the rest of the batch has completed: a batch never waits
        // while it holds claims, so batches that share keys cannot wait on each other.
        let mut to_claim = self.screen(d, &mut items).await?;
        let mut backoff = Backoff::for_claim_waits();
        loop {
            let mut settled = s.settled_claims.subscribe();
            settled.mark_unchanged();
            let waiting = self.claim(d, &mut items, &to_claim, held).await?;
            if Faults::take(&s.faults.crash_after_claim, &items) {
                return Err(Stop::Crashed);
            }
            let (mut ready, later) = set_aside(items, &waiting);
            follow_leaders(&mut ready);
            self.apply_effects(d, &mut ready, held).await?;
            let secs = arrived.elapsed().as_secs_f64();
            for _ in &ready {
                s.metrics.record_seconds.observe(secs);
            }
            d.finished(&ready);
            if later.is_empty() {
                return Ok(());
            }
            items = later;
            to_claim = (0..items.len()).filter(|&i| matches!(items[i], Item::Keyed { leader: None, .. })).collect();
            // Waiting on another owner's live claim is not a stall: that owner
            // progresses (or reports its own stall), and its lease bounds the wait.
            // A claim settled in this process (most holders are our own other
            // partitions) ends the wait at once; the backoff covers other processes.
            tokio::select! {
                _ = settled.changed() => {}
                paused = d.pause(backoff.next()) => paused?,
            }
        }
    }
    /// filter (+ store reads for suspects): decides what the caches and reads
    /// can, points later records of a key at the batch's first one, and returns
    /// the items that go on to the claim.
    async fn screen<D: Driver>(&self, d: &D, items: &mut [Item]) -> Result<Vec<usize>, Stop> {
        let s = self;
        let now = now_ms();
        // Leaders are the first record of each key in the batch; followers copy their answer.
        let mut leader_of: foldhash::HashMap<u128, usize> = foldhash::HashMap::default();
        let mut suspects = Vec::new();
        let mut to_claim = Vec::new();
        let mut recent = Vec::new();
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
            digests.iter().take(PREFETCH_AHEAD).for_each(|digest| filter.prefetch(*digest));
            let mut ahead = digests.iter().skip(PREFETCH_AHEAD);
            for (i, item) in items.iter_mut().enumerate() {
                let Item::Keyed { envelope, decision, leader } = item else { continue };
                if let Some(next) = ahead.next() {
                    filter.prefetch(*next);
                }
                let digest = envelope.digest;
                if let Some(&first) = leader_of.get(&digest) {
                    *leader = Some(first);
                    continue;
                }
                leader_of.insert(digest, i);
                match filter.check(envelope, now) {
                    Verdict::RecentDuplicate(first) => {
                        recent.push(i);
                        *decision = Some(Decision::Duplicate { expires_at_ms: None, first: Some(first) });
                    }
                    Verdict::Suspect => suspects.push(i),
                    Verdict::LikelyNew => to_claim.push(i),
                }
            }
        }
        // The recent cache vouches only while no release happened since it was
        // last emptied (the store is the only authority): one read of the scope's
        // release marker, in batches where the cache answered at all. If it
        // changed, the cache's answers go to the store like the aging filter's.
        if let Some(&first) = recent.first() {
            let marker = vec![release_marker(&envelope(&items[first]).key.scope)];
            let mark = self
                .store_call(d, "lookup", || {
                    let now = now_ms();
                    s.store.lookup(marker.clone(), now)
                })
                .await?
                .pop()
                .flatten()
                .map(|row| (row.fingerprint, row.claimed_at_ms));
            if !s.filter.lock().unwrap_or_else(|p| p.into_inner()).note_releases(mark) {
                for &i in &recent {
                    if let Item::Keyed { decision, .. } = &mut items[i] {
                        *decision = None;
                    }
                }
                suspects.append(&mut recent);
                suspects.sort_unstable();
            }
        }
        let recent_hits = recent.len();
        s.metrics.filter_checked("recent", "hit", recent_hits);
        s.metrics.filter_checked("recent", "miss", suspects.len() + to_claim.len());
        s.metrics.filter_checked("aging", "hit", suspects.len());
        s.metrics.filter_checked("aging", "miss", to_claim.len());

        // Suspected duplicates: a read first; only keys not found done go on to the claim.
        if !suspects.is_empty() {
            let keys: Vec<_> = suspects.iter().map(|&i| envelope(&items[i]).key.clone()).collect();
            // Each attempt reads with the time it is made at: a retry after an outage
            // must not count rows alive that expired meanwhile.
            let rows = self
                .store_call(d, "lookup", || {
                    let now = now_ms();
                    s.store.lookup(keys.clone(), now)
                })
                .await?;
            for (&i, row) in suspects.iter().zip(rows) {
                match row {
                    Some(row) if row.state == ClaimState::Done => {
                        let fp = envelope(&items[i]).fingerprint;
                        set_decision(
                            &mut items[i],
                            if row.fingerprint == fp {
                                Decision::Duplicate {
                                    expires_at_ms: Some(row.expires_at_ms),
                                    first: Some(First::new(row.claimed_at_ms, &row.position)),
                                }
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
        Ok(to_claim)
    }

    /// One claim round for `to_claim`: decides every item the store answers,
    /// adds the claims won to `held` (for the heartbeat) and returns the items
    /// whose key another owner holds under a live lease.
    async fn claim<D: Driver>(
        &self,
        d: &D,
        items: &mut [Item],
        to_claim: &[usize],
        held: &Held,
    ) -> Result<Vec<usize>, Stop> {
        let s = self;
        if to_claim.is_empty() {
            return Ok(Vec::new());
        }
        let requests: Vec<ClaimRequest> = to_claim
            .iter()
            .map(|&i| {
                let e = envelope(&items[i]);
                ClaimRequest {
                    key: e.key.clone(),
                    fingerprint: e.fingerprint,
                    position: self.claimant(&e.record.position),
                }
            })
            .collect();
        // Each attempt is stamped with the time it is made at: the lease counts from
        // it, and a retry after an outage must not write a lease that already lapsed.
        let attempted_at = AtomicU64::new(0);
        let answers = self
            .store_call(d, "claim", || {
                let at = now_ms();
                attempted_at.store(at, Ordering::Relaxed);
                s.store.claim(requests.clone(), at)
            })
            .await?;
        let claimed_at_ms = attempted_at.load(Ordering::Relaxed);
        // An answer that took a lease or more to come back (a freeze, a stalled
        // store) may hold claims whose leases lapsed before we heard of them: another
        // partition may have taken them over already, so their effects are marked.
        let late = now_ms().saturating_sub(claimed_at_ms) >= s.lease.as_millis() as u64;
        let mut waiting = Vec::new();
        let mut resumed_from: Option<(i64, u64)> = None;
        for (&i, answer) in to_claim.iter().zip(answers) {
            match answer {
                Claim::New(acquired) => {
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
                    let e = envelope(&items[i]);
                    let claim = (e.key.clone(), self.claimant(&e.record.position));
                    if acquired == Acquired::Fresh && !late {
                        held.unstarted.lock().unwrap_or_else(|p| p.into_inner()).push(claim.clone());
                    }
                    held.add([claim]);
                    if late {
                        held.lost.lock().unwrap_or_else(|p| p.into_inner()).insert(e.record.position.offset);
                    }
                    set_decision(&mut items[i], Decision::New { acquired, claimed_at_ms });
                }
                Claim::Duplicate { first, claimed_at_ms } => set_decision(
                    &mut items[i],
                    Decision::Duplicate { expires_at_ms: None, first: Some(First::new(claimed_at_ms, &first)) },
                ),
                Claim::Conflict { stored } => set_decision(&mut items[i], Decision::Conflict(stored)),
                Claim::InFlight { holder, .. } => {
                    s.metrics.claim_waits.inc();
                    debug!(position = %envelope(&items[i]).record.position, %holder, "key in flight elsewhere; set aside until the rest of the batch is done");
                    waiting.push(i);
                }
            }
        }
        if late {
            warn!(topic = %d.partition().0, partition = d.partition().1, waited_ms = now_ms().saturating_sub(claimed_at_ms), "a claim answer came back after its lease ran out (a freeze or a stalled store); the effects of the claims it won are marked as possible repeats");
        }
        if let Some((first_offset, count)) = resumed_from {
            info!(topic = %d.partition().0, partition = d.partition().1, first_offset, count, "resuming our own unfinished claims after a crash");
        }
        Ok(waiting)
    }

    /// sink + side topics + complete/release.
    async fn apply_effects<D: Driver>(&self, d: &mut D, items: &mut [Item], held: &Held) -> Result<(), Stop> {
        let s = self;
        let resumed = items.iter().filter_map(|item| match item {
            Item::Keyed { envelope, decision: Some(Decision::New { acquired: Acquired::Resumed, .. }), .. } => {
                Some(envelope.record.position.offset)
            }
            _ => None,
        });
        if let Some(last) = resumed.max() {
            d.resumed_up_to(last);
        }

        // The effect, for new events, in order; retriable failures are retried.
        // Effects reconciliation found in the output already ran: they are only completed.
        // Observe mode forwards every keyed record, stamped with its decision.
        let observe = s.config.mode == Mode::Observe;
        let mut pending: Vec<usize> = Vec::new();
        for (i, item) in items.iter().enumerate() {
            let Item::Keyed { envelope, decision: Some(decision), .. } = item else { continue };
            let new = matches!(decision, Decision::New { .. });
            if new || observe {
                if d.already_emitted(envelope.record.position.offset, &envelope.key.id) {
                    if new {
                        s.metrics.reconciled.inc();
                        // Its effect is in the output: never released by a drain.
                        held.started(&[(envelope.key.clone(), self.claimant(&envelope.record.position))]);
                    }
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
                        observed: observe.then(|| observed(decision_of(&items[i]))),
                        replay: self.claimant.job(),
                    }
                })
                .collect();
            let repeats = batch.iter().filter(|e| e.possible_repeat).count();
            self.guard(d, held).await?;
            // From here the effects may land: these claims are never released by a drain.
            held.started(
                &batch
                    .iter()
                    .map(|e| (e.envelope.key.clone(), self.claimant(&e.envelope.record.position)))
                    .collect::<Vec<_>>(),
            );
            s.metrics.possible_repeats.inc_by(repeats as u64);
            let results = s.sink.deliver(&batch).await;
            if results.len() != batch.len() {
                // A sink bug: which result belongs to which event cannot be told, so none
                // completes. The process stops; the next run resumes these claims, marked.
                let (given, answered) = (batch.len(), results.len());
                error!(topic = %d.partition().0, partition = d.partition().1, first = %envelope(&items[pending[0]]).record.position, given, answered, sink = s.sink.kind(), "the sink answered a different number of results than the effects it was given (its Sink::deliver must answer one per effect, in order); none of this batch completes, and kdedup stops");
                s.fatal.raise(format!(
                    "the {} sink answered {answered} results for {given} effects; a Sink must answer one result per effect",
                    s.sink.kind()
                ));
                return Err(Stop::Fatal);
            }
            let mut retry = Vec::new();
            for (&i, result) in pending.iter().zip(results) {
                match result {
                    Ok(delivered) => {
                        if let Some(landed) = delivered.mark {
                            d.landed(Landed::Output, envelope(&items[i]).record.position.offset, landed);
                        }
                        responses.extend(delivered.response.map(|r| (i, r)));
                    }
                    Err(e) if e.is_fatal() => {
                        s.metrics.sink_error(&e);
                        error!(topic = %d.partition().0, partition = d.partition().1, position = %envelope(&items[i]).record.position, error = %e, "fatal producer error; kdedup stops so that it restarts with a new producer");
                        s.fatal.raise(format!("fatal producer error: {e}"));
                        return Err(Stop::Fatal);
                    }
                    Err(e) if e.is_retriable() => {
                        s.metrics.sink_error(&e);
                        warn!(position = %envelope(&items[i]).record.position, error = %e, sink = s.sink.kind(), "effect failed; retrying");
                        retry.push(i);
                    }
                    Err(e) => {
                        s.metrics.sink_error(&e);
                        rejected.push((i, e));
                    }
                }
            }
            pending = retry;
            retrying = true;
            if !pending.is_empty() {
                self.stalled(d);
                d.pause(backoff.next()).await?;
            }
        }
        self.progressing(d);
        s.metrics.sink_seconds.observe(started.elapsed().as_secs_f64());
        if Faults::take(&s.faults.crash_after_effect, items) {
            return Err(Stop::Crashed);
        }

        // A rejected effect releases its claim (the key is not burned) and is
        // dead-lettered; so are later records of the same event in this batch,
        // which followed the rejected one as its duplicates.
        // (In observe mode only a new event's record holds a claim to release,
        // and the duplicates that followed it were forwarded themselves.)
        // An effect that may have been applied anyway keeps its claim, no longer
        // renewed: it lapses after the lease, and the next copy of the event
        // takes it over and is sent marked, never as a fresh, unmarked claim.
        if !rejected.is_empty() {
            let keys: Vec<_> = rejected
                .iter()
                .filter(|(i, _)| matches!(decision_of(&items[*i]), Decision::New { .. }))
                .map(|(i, e)| {
                    let envelope = envelope(&items[*i]);
                    (envelope.key.clone(), self.claimant(&envelope.record.position), e.may_have_landed())
                })
                .collect();
            held.remove(&keys.iter().map(|(k, p, _)| (k.clone(), p.clone())).collect::<Vec<_>>());
            let keys: Vec<_> = keys.into_iter().filter(|(_, _, kept)| !kept).map(|(k, p, _)| (k, p)).collect();
            if !keys.is_empty() {
                self.store_call(d, "release", || s.store.release(keys.clone())).await?;
            }
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
            for item in items.iter_mut().filter(|_| !observe) {
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
                    (e.key.clone(), self.claimant(&e.record.position), r)
                })
                .collect();
            self.store_call(d, "record", || s.store.record(recorded.clone())).await?;
        }

        // complete
        let done: Vec<(EventKey, Position)> = items
            .iter()
            .filter_map(|item| match item {
                Item::Keyed { envelope, decision: Some(Decision::New { .. }), .. } => {
                    Some((envelope.key.clone(), self.claimant(&envelope.record.position)))
                }
                _ => None,
            })
            .collect();
        held.clear();
        if !done.is_empty() {
            let held = self.store_call(d, "complete", || s.store.complete(done.clone(), now_ms())).await?;
            s.settled_claims.send_modify(|n| *n += 1);
            for ((_, position), held) in done.iter().zip(held) {
                if !held {
                    s.metrics.claims_lost.inc();
                    warn!(%position, "claim was taken over before completion; the effect may run twice");
                }
            }
        }

        // Side topics: dead letters and (optionally) duplicates.
        // Observe mode forwarded its conflicts, stamped.
        let conflicts_dead_letter = s.config.on_conflict == OnConflict::DeadLetter && !observe;
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
            if d.already_dead_lettered(record.position.offset, record.payload.as_deref()) {
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
                possible_repeat: d.reached_before(record.position.offset),
            })
            .collect();
        let landed =
            self.write_side(d, held, Side::DeadLetter, &dead_letters, |batch| s.side.dead_letter(batch)).await?;
        for (i, mark) in landed {
            d.landed(Landed::DeadLetter, dead_letters[i].record.position.offset, mark);
        }
        s.metrics.dead_lettered(&d.partition().0, dead.iter().map(|(_, e)| e.reason()));
        if s.side.duplicates.is_some() {
            self.write_side(d, held, Side::Duplicates, &dups, |batch| s.side.duplicates(batch)).await?;
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
                            if acquired == Acquired::Fresh {
                                // Window adequacy: new only because its key just expired?
                                let hits = filter.expired_hit(envelope.digest, now);
                                s.metrics.expired_key_hits(&d.partition().0, hits);
                            }
                            if acquired == Acquired::Resumed {
                                filter.remember_seen(envelope, now);
                            } else {
                                filter.remember_claimed(envelope, claimed_at_ms, now);
                            }
                            0
                        }
                        // Only a row read back says how long it lives: a duplicate never
                        // extends what the cache vouches for.
                        Decision::Duplicate { expires_at_ms, first } => {
                            filter.remember_duplicate(envelope, expires_at_ms, first, now);
                            if let Some(first) = first {
                                s.metrics.duplicate_seen(&d.partition().0, first.claimed_at_ms, now);
                            }
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
                s.metrics.records.at([&d.partition().0, outcome]).inc_by(n);
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicUsize;

    use super::*;
    use crate::kafka_client::KafkaClients;
    use crate::mock::MockKafka;
    use crate::sink::{CustomSink, Delivered, KafkaWriter, Sink};

    /// Counts the effects it runs.
    struct Counting(Arc<AtomicUsize>);

    impl Sink for Counting {
        fn kind(&self) -> &'static str {
            "counting"
        }
        async fn deliver(&self, batch: &[Effect<'_>]) -> Vec<Result<crate::sink::Delivered, SinkError>> {
            self.0.fetch_add(batch.len(), Ordering::SeqCst);
            batch.iter().map(|_| Ok(Delivered::done())).collect()
        }
    }

    /// A driver whose partition is revoked after `owned_for` ownership checks
    /// passed: a member frozen between two writes of one round, told on thawing.
    struct RevokedAfter {
        tp: TopicPartition,
        owned_for: AtomicUsize,
        checks: AtomicUsize,
    }

    impl Driver for RevokedAfter {
        fn partition(&self) -> &TopicPartition {
            &self.tp
        }
        async fn pause(&self, wait: Duration) -> Result<(), Stop> {
            tokio::time::sleep(wait).await;
            Ok(())
        }
        async fn before_writes(&self, _since_ms: u64) -> Result<(), Stop> {
            let n = self.checks.fetch_add(1, Ordering::SeqCst);
            if n < self.owned_for.load(Ordering::SeqCst) {
                Ok(())
            } else {
                Err(Stop::Draining)
            }
        }
        fn finished(&mut self, _items: &[Item]) {}
    }

    fn record(offset: i64, event_id: Option<&str>) -> Record {
        Record {
            position: Position { topic: Arc::from("in"), partition: 0, offset },
            key: None,
            payload: Some(b"{}".to_vec()),
            headers: event_id.map(|id| ("event-id".to_string(), Some(id.as_bytes().to_vec()))).into_iter().collect(),
            timestamp_ms: None,
            bad_header: None,
        }
    }

    /// Every write is checked, not only the round's first: the partition lost
    /// between the effect and the dead letter writes no dead letter. Failed
    /// before: one check per round, before the effects, and the dead letter was
    /// written by a member that no longer owned the partition.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_member_that_lost_its_partition_after_the_effects_writes_no_dead_letter() {
        let kafka = MockKafka::start(1).unwrap();
        kafka.create_topic("dlq", 1).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let text = format!(
            "[kafka]\nbrokers = \"{}\"\ngroup_id = \"g\"\ntopics = [\"in\"]\n[store]\npath = \"{}\"\n[sink]\nkind = \"custom\"\n[dead_letter]\ntopic = \"dlq\"\n",
            kafka.bootstrap(),
            dir.path().display()
        );
        let config = Config::from_toml_with_env(&text, "test", std::iter::empty()).unwrap();
        let store = Store::open(&config.store, &config.retention).unwrap();
        let writer = KafkaWriter::new(&KafkaClients::from(kafka.bootstrap())).unwrap();
        let side = SideTopics {
            writer,
            dead_letter: "dlq".into(),
            dead_letter_partitions: 1,
            duplicates: None,
            scope: Arc::from("g"),
            replay: None,
        };
        let effects = Arc::new(AtomicUsize::new(0));
        let sink = AnySink::Custom(CustomSink::new(Counting(effects.clone())));
        let core = Core::new(&config, store, sink, side, Metrics::new(), Claimant::Position).unwrap();
        let mut driver = RevokedAfter { tp: (Arc::from("in"), 0), owned_for: AtomicUsize::new(1), checks: 0.into() };

        let records = vec![record(0, Some("a")), record(1, None)];
        let result = core.run_batch(&mut driver, records, Instant::now()).await;
        assert!(matches!(result, Err(Stop::Draining)), "the round stops at the failed check: {result:?}");
        assert_eq!(effects.load(Ordering::SeqCst), 1, "the effect ran while the partition was owned");
        assert_eq!(driver.checks.load(Ordering::SeqCst), 2, "checked again before the dead letter");
        let dead = crate::mock::read_all(kafka.bootstrap(), "dlq").unwrap();
        assert!(dead.is_empty(), "no dead letter from a member that lost its partition: {} written", dead.len());
    }
}
