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
//!
//! - `mod.rs`: the types drivers see ([`Driver`], [`Earlier`], [`Item`],
//!   [`Decision`], [`Stop`]) and [`Core`], which runs a batch's steps in order;
//! - `batch.rs`: the steps as a plan with no I/O (what to claim, what follows
//!   what, what to write, complete and remember), tested against a model store;
//! - `io.rs`: every store call and write, the one retry, the metrics and logs;
//! - `lease.rs`: the claims a batch holds, and the heartbeat that renews them.

mod batch;
mod io;
mod lease;

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::watch;

use crate::aging::FilterAllocError;
use crate::backoff::Backoff;
use crate::config::{Config, Mode, PipelineConfig};
use crate::error::RecordError;
use crate::event::{Envelope, Fingerprint, KeyExtractor, Record};
use crate::filter::Filter;
use crate::metrics::Metrics;
use crate::sink::{event_identity, is_dead_letter_of, AnySink, Identity, SideTopics, Stopping};
use crate::store::{now_ms, Acquired, DedupStore, Store};
use crate::values::{OutputMark, TopicPartition};
use crate::window::First;

use self::lease::Held;

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
    /// The key was first claimed with another fingerprint: `stored`, by
    /// `first` (its claim's time and position), when known.
    Conflict {
        /// The fingerprint the key was first claimed with.
        stored: Fingerprint,
        /// The first claim's time and position.
        first: Option<First>,
    },
}

/// Why a batch stopped short; its driver ends without publishing it.
#[derive(Debug)]
#[non_exhaustive]
pub enum Stop {
    /// Draining was requested (revoke, shutdown), or the partition may be lost.
    Draining,
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
/// way of pausing (which ends when it stops), its ownership check before each
/// write, and where it learns what landed and what finished. What it knows of
/// writes made before it started is a value, [`Earlier`], passed to each batch.
pub trait Driver: Send + Sync {
    /// The partition the batch came from.
    fn partition(&self) -> &TopicPartition;
    /// Sleeps `wait`, or ends at once with [`Stop::Draining`] when the driver stops.
    fn pause(&self, wait: Duration) -> impl Future<Output = Result<(), Stop>> + Send;
    /// Called before every write to the sink or a side topic (each attempt);
    /// an error drops the rest of the round unwritten. `since_ms`: when the
    /// batch started, or the previous check began.
    fn before_writes(&self, since_ms: u64) -> impl Future<Output = Result<(), Stop>> + Send;
    /// The driver's stop signal, handed to the sink with each delivery (a sink's own
    /// waits, such as an HTTP backoff or `Retry-After`, end when it fires).
    fn stopping(&self) -> Stopping;
    /// A write for the record at `source_offset` landed here.
    fn landed(&mut self, _log: Landed, _source_offset: i64, _mark: OutputMark) {}
    /// A round's records are done: decided, their effects and dead letters durable.
    fn finished(&mut self, items: &[Item]);
}

/// What a driver knows of writes made before it started (reconciliation's
/// findings after a crash), handed to each batch. A batch takes out the
/// entries it passes: each tells of one write, met once.
#[derive(Debug, Default)]
pub struct Earlier {
    /// Offsets whose effect is in the output already, and for which event.
    pub emitted: HashMap<i64, Identity>,
    /// Offsets already in the dead-letter topic, and for which payload.
    pub dead_lettered: HashMap<i64, Identity>,
    /// The highest offset an earlier owner is known to have reached (its
    /// writes found, its claims resumed). That owner may still be alive (a
    /// zombie) and write a dead letter for a record up to here after we
    /// looked, so ours for those records are marked as possible repeats.
    pub reached_before: Option<i64>,
}

impl Earlier {
    /// Nothing known, but every offset possibly reached by another writer
    /// (a replay re-reads a range the live group may have handled).
    pub fn everything_reached() -> Earlier {
        Earlier { reached_before: Some(i64::MAX), ..Earlier::default() }
    }

    /// Whether no write found is left to meet.
    pub fn is_empty(&self) -> bool {
        self.emitted.is_empty() && self.dead_lettered.is_empty()
    }

    /// Whether this offset's effect, for this event, is in the output already.
    /// An effect found at the offset for another event (a reused position) is not this record's.
    fn emitted(&mut self, offset: i64, event_id: &[u8]) -> bool {
        self.emitted.remove(&offset).is_some_and(|identity| identity == event_identity(event_id))
    }

    /// Whether this offset, with this payload, is dead-lettered already.
    fn dead_lettered(&mut self, offset: i64, payload: Option<&[u8]>) -> bool {
        self.dead_lettered.remove(&offset).is_some_and(|identity| is_dead_letter_of(identity, payload))
    }

    /// Whether an earlier owner reached this offset, so a dead letter for it may repeat one.
    fn reached(&self, offset: i64) -> bool {
        self.reached_before.is_some_and(|r| offset <= r)
    }

    /// Claims of our own earlier attempt were resumed, up to this offset.
    fn resumed_up_to(&mut self, offset: i64) {
        self.reached_before = self.reached_before.max(Some(offset));
    }
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
    /// The core of `config`'s pipeline, with its own [`Fatal`] (a caller may replace it).
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
            lease: config.retention.lease,
            fatal: Fatal::default(),
            settled_claims: watch::channel(0).0,
            claimant,
        })
    }

    fn filter(&self) -> std::sync::MutexGuard<'_, Filter> {
        self.filter.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// One batch through key, filter, store, sink and complete, while a
    /// heartbeat renews the leases of the claims it holds; `arrived` is when
    /// its first record was taken; `earlier`: what the driver knows of writes
    /// made before it started.
    pub async fn run_batch<D: Driver>(
        &self,
        d: &mut D,
        records: Vec<Record>,
        arrived: Instant,
        earlier: &mut Earlier,
    ) -> Result<(), Stop> {
        let held = Held::default();
        let tp = d.partition().clone();
        let work = self.rounds(d, records, arrived, earlier, &held);
        lease::with_heartbeat(self, &tp, &held, work).await
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
        earlier: &mut Earlier,
        held: &Held,
    ) -> Result<(), Stop> {
        let result = self.run_rounds(d, records, arrived, earlier, held).await;
        if matches!(result, Err(Stop::Draining)) {
            self.release_unstarted(d, held).await;
        }
        result
    }

    /// Key, filter, then rounds of store → sink → complete. A round's records whose
    /// key is in flight elsewhere are set aside and claimed again in the next
    /// round, once the rest of the batch has completed: a batch never waits
    /// while it holds claims, so batches that share keys cannot wait on each other.
    async fn run_rounds<D: Driver>(
        &self,
        d: &mut D,
        records: Vec<Record>,
        arrived: Instant,
        earlier: &mut Earlier,
        held: &Held,
    ) -> Result<(), Stop> {
        held.checked_ms.store(now_ms(), Ordering::SeqCst);
        self.taken(d, &records);
        let mut items = batch::keyed(&self.extractor, records);
        let mut to_claim = self.screen(d, &mut items).await?;
        let mut backoff = Backoff::claim_waits();
        loop {
            let mut settled = self.settled_claims.subscribe();
            settled.mark_unchanged();
            let waiting = self.claim(d, &mut items, &to_claim, held).await?;
            let (mut ready, later) = batch::set_aside(items, &waiting);
            batch::follow_leaders(&mut ready);
            self.apply_effects(d, &mut ready, earlier, held).await?;
            self.finished(d, &ready, arrived);
            if later.is_empty() {
                return Ok(());
            }
            items = later;
            to_claim = batch::leaders(&items);
            // Waiting on another owner's live claim is not a stall: that owner
            // progresses (or reports its own stall), and its lease bounds the wait.
            // A claim settled in this process (most holders are our own other
            // partitions) ends the wait at once; the backoff covers other processes.
            tokio::select! {
                _ = settled.changed() => {}
                paused = d.pause(backoff.wait()) => paused?,
            }
        }
    }

    /// The filter (and store reads for its suspects): decides what the caches
    /// and reads can, points later records of a key at the batch's first one,
    /// and returns the items that go on to the claim.
    async fn screen<D: Driver>(&self, d: &D, items: &mut [Item]) -> Result<Vec<usize>, Stop> {
        let mut screened = batch::screen(items, &mut self.filter(), now_ms());
        // The recent cache vouches only while no release happened since it was
        // last emptied (the store is the only authority): one read of the scope's
        // release marker, in batches where the cache answered at all.
        if let Some(marker) = screened.marker(items) {
            let rows = self.store_call(d, "lookup", || self.store.lookup(vec![marker.clone()], now_ms())).await?;
            let mark = rows.into_iter().next().flatten().map(|row| (row.fingerprint, row.claimed_at_ms));
            if !self.filter().note_releases(mark) {
                screened.distrust_recent(items);
            }
        }
        self.count_screened(&screened);
        if !screened.suspects.is_empty() {
            let keys = screened.suspect_keys(items);
            // Each attempt reads with the time it is made at: a retry after an outage
            // must not count rows alive that expired meanwhile.
            let rows = self.store_call(d, "lookup", || self.store.lookup(keys.clone(), now_ms())).await?;
            let false_positives = screened.apply_lookups(items, rows);
            self.count_looked_up(false_positives);
        }
        Ok(screened.to_claim)
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
        if to_claim.is_empty() {
            return Ok(Vec::new());
        }
        let requests = batch::claim_requests(items, to_claim, &self.claimant);
        // Each attempt is stamped with the time it is made at: the lease counts from
        // it, and a retry after an outage must not write a lease that already lapsed.
        let attempted_at = AtomicU64::new(0);
        let answers = self
            .store_call(d, "claim", || {
                let at = now_ms();
                attempted_at.store(at, Ordering::Relaxed);
                self.store.claim(requests.clone(), at)
            })
            .await?;
        let claimed_at_ms = attempted_at.load(Ordering::Relaxed);
        // An answer that took a lease or more to come back (a freeze, a stalled
        // store) may hold claims whose leases lapsed before we heard of them: another
        // partition may have taken them over already, so their effects are marked.
        let late = now_ms().saturating_sub(claimed_at_ms) >= self.lease.as_millis() as u64;
        let claimed = batch::apply_claims(items, to_claim, answers, claimed_at_ms);
        self.hold(d, items, &claimed, claimed_at_ms, late, held);
        Ok(claimed.waiting.into_iter().map(|(i, _)| i).collect())
    }

    /// The sink, the store's record of the answers, the completions and the side topics.
    async fn apply_effects<D: Driver>(
        &self,
        d: &mut D,
        items: &mut Vec<Item>,
        earlier: &mut Earlier,
        held: &Held,
    ) -> Result<(), Stop> {
        if let Some(last) = batch::resumed_up_to(items) {
            earlier.resumed_up_to(last);
        }
        // Observe mode forwards every keyed record, stamped with its decision.
        let observe = self.config.mode == Mode::Observe;
        // Effects reconciliation found in the output already ran: they are only completed,
        // and a drain never releases their claims.
        let (pending, emitted) = batch::pending_effects(items, observe, earlier);
        self.count_reconciled(emitted.len());
        held.started(&batch::claims_of(items, &emitted, &self.claimant));
        let delivery = self.deliver(d, items, pending, observe, held).await?;
        if !delivery.rejected.is_empty() {
            let rejected = batch::apply_rejections(items, delivery.rejected, observe, &self.claimant);
            held.remove(&rejected.unheld);
            if !rejected.release.is_empty() {
                self.store_call(d, "release", || self.store.release(rejected.release.clone())).await?;
            }
            let mut filter = self.filter();
            rejected.forget.iter().for_each(|digest| filter.forget(*digest));
        }
        // The endpoints' answers go on the claim rows before they turn done.
        let recorded = batch::to_record(items, delivery.responses, &self.claimant);
        if !recorded.is_empty() {
            self.store_call(d, "record", || self.store.record(recorded.clone())).await?;
        }
        self.complete(d, batch::to_complete(items, &self.claimant), held).await?;
        self.write_sides(d, items, observe, earlier, held).await
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicUsize;

    use super::*;
    use crate::error::SinkError;
    use crate::event::Position;
    use crate::kafka_client::KafkaClients;
    use crate::mock::MockKafka;
    use crate::sink::{CustomSink, Delivered, Effect, KafkaWriter, Sink};

    /// Counts the effects it runs.
    struct Counting(Arc<AtomicUsize>);

    impl Sink for Counting {
        fn kind(&self) -> &'static str {
            "counting"
        }
        async fn deliver(&self, batch: &[Effect<'_>], _stop: &Stopping) -> Vec<Result<Delivered, SinkError>> {
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
        fn stopping(&self) -> Stopping {
            Stopping::never()
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
        let result = core.run_batch(&mut driver, records, Instant::now(), &mut Earlier::default()).await;
        assert!(matches!(result, Err(Stop::Draining)), "the round stops at the failed check: {result:?}");
        assert_eq!(effects.load(Ordering::SeqCst), 1, "the effect ran while the partition was owned");
        assert_eq!(driver.checks.load(Ordering::SeqCst), 2, "checked again before the dead letter");
        let dead = crate::mock::read_all(kafka.bootstrap(), "dlq").unwrap();
        assert!(dead.is_empty(), "no dead letter from a member that lost its partition: {} written", dead.len());
    }
}
