//! The decision core's I/O: every store call, sink delivery and side-topic
//! write a batch makes, each retried through [`Retry`] (jittered backoff, the
//! partition reported stalled meanwhile, the wait cut short when the driver
//! stops). The core's metrics and logs are written here and nowhere else in
//! `decide`; the plan (`batch`) only says what to do.

use std::time::Instant;

use tracing::{debug, error, info, warn};

use super::batch::{self, claim_position, envelope, Claimed, Outcome};
use super::lease::Held;
use super::{Core, Driver, Earlier, Item, Landed, Stop};
use crate::backoff::Backoff;
use crate::config::OnConflict;
use crate::error::{SinkError, StoreError};
use crate::event::{Envelope, EventKey, Position};
use crate::sink::DeadLetter;
use crate::store::{now_ms, Acquired, DedupStore};
use crate::values::{EffectResponse, OutputMark, TopicPartition};

/// The one way the core waits before trying again: the partition reports
/// itself stalled (`/readyz` 503, no offset moves), and the wait, a jittered
/// backoff from 50 ms to 5 s, ends at once with [`Stop::Draining`] when the
/// driver stops.
pub(super) struct Retry(Backoff);

impl Retry {
    pub(super) fn new() -> Retry {
        Retry(Backoff::failures())
    }

    pub(super) async fn again<D: Driver>(&mut self, core: &Core, d: &D) -> Result<(), Stop> {
        core.metrics.partition_stalled(d.partition());
        d.pause(self.0.wait()).await
    }
}

/// What a round's deliveries came to.
#[derive(Default)]
pub(super) struct Delivery {
    /// Effects the sink refused for good, by item index.
    pub(super) rejected: Vec<(usize, SinkError)>,
    /// The endpoints' answers, by item index.
    pub(super) responses: Vec<(usize, EffectResponse)>,
}

impl Core {
    /// Retries a store call until it answers; the partition reports itself stalled meanwhile.
    pub(super) async fn store_call<D: Driver, T, F, Fut>(&self, d: &D, op: &'static str, mut call: F) -> Result<T, Stop>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Result<T, StoreError>>,
    {
        let mut retry = Retry::new();
        loop {
            let started = Instant::now();
            let result = call().await;
            self.metrics.store_call(op, result.is_ok(), started.elapsed().as_secs_f64());
            self.metrics.store_answered(d.partition(), result.is_ok());
            match result {
                Ok(v) => {
                    self.metrics.partition_progressing(d.partition());
                    return Ok(v);
                }
                Err(e) => {
                    self.metrics.store_errors.inc();
                    let (topic, partition) = (&d.partition().0, d.partition().1);
                    if !e.is_retriable() {
                        // A corrupt row cannot be fixed by waiting; keep the partition
                        // paused and loud rather than guess.
                        error!(%topic, partition, op, error = %e, "store call failed; not retriable, operator action needed");
                    } else {
                        warn!(%topic, partition, op, error = %e, "store call failed; retrying");
                    }
                    retry.again(self, d).await?;
                }
            }
        }
    }

    /// The zombie's guard before each write: the driver checks it still owns
    /// its partition (after a freeze, by waiting for the group's word).
    pub(super) async fn guard<D: Driver>(&self, d: &D, held: &Held) -> Result<(), Stop> {
        let at = now_ms();
        d.before_writes(held.checked_ms.load(std::sync::atomic::Ordering::SeqCst)).await?;
        held.checked_ms.store(at, std::sync::atomic::Ordering::SeqCst);
        Ok(())
    }

    pub(super) fn taken<D: Driver>(&self, d: &D, records: &[crate::event::Record]) {
        self.metrics.taken(d.partition(), records);
    }

    /// Suspects the store did not know at all: the aging filter's false positives.
    pub(super) fn count_looked_up(&self, false_positives: usize) {
        self.metrics.bloom_false_positives.inc_by(false_positives as u64);
    }

    /// Writes reconciliation found already made: not made again.
    pub(super) fn count_reconciled(&self, n: usize) {
        self.metrics.reconciled.inc_by(n as u64);
    }

    pub(super) fn count_screened(&self, screened: &batch::Screened) {
        let (recent, suspects, to_claim) = (screened.recent.len(), screened.suspects.len(), screened.to_claim.len());
        self.metrics.filter_checked("recent", "hit", recent);
        self.metrics.filter_checked("recent", "miss", suspects + to_claim);
        self.metrics.filter_checked("aging", "hit", suspects);
        self.metrics.filter_checked("aging", "miss", to_claim);
    }

    /// Holds the claims a round won (for the heartbeat, and for a drain to
    /// release those never effected), and counts and tells how they were won.
    pub(super) fn hold<D: Driver>(
        &self,
        d: &D,
        items: &[Item],
        claimed: &Claimed,
        claimed_at_ms: u64,
        late: bool,
        held: &Held,
    ) {
        let mut resumed = Vec::new();
        let mut won = Vec::with_capacity(claimed.won.len());
        // Late, every claim won may have lapsed before we heard of it.
        let mut lost = Vec::new();
        for &(i, acquired) in &claimed.won {
            let e = envelope(&items[i]);
            match acquired {
                Acquired::Fresh => {}
                Acquired::Resumed => {
                    self.metrics.claims_resumed.inc();
                    resumed.push(e.record.position.offset);
                }
                Acquired::TakenOver => {
                    self.metrics.lease_takeovers.inc();
                    warn!(position = %e.record.position, "took over a claim whose lease lapsed; its owner's effect may have run, so this one is marked as a possible repeat");
                }
            }
            let claim = (e.key.clone(), claim_position(&self.claimant, &e.record.position));
            won.push((claim, acquired == Acquired::Fresh && !late));
            if late {
                lost.push(e.record.position.offset);
            }
        }
        held.won(won, lost);
        for (i, holder) in &claimed.waiting {
            self.metrics.claim_waits.inc();
            debug!(position = %envelope(&items[*i]).record.position, %holder, "key in flight elsewhere; set aside until the rest of the batch is done");
        }
        let (topic, partition) = (&d.partition().0, d.partition().1);
        if late {
            warn!(%topic, partition, waited_ms = now_ms().saturating_sub(claimed_at_ms), "a claim answer came back after its lease ran out (a freeze or a stalled store); the effects of the claims it won are marked as possible repeats");
        }
        if let Some(&first_offset) = resumed.first() {
            info!(%topic, partition, first_offset, count = resumed.len() as u64, "resuming our own unfinished claims after a crash");
        }
    }

    /// The effects of `pending`, in order, until each is delivered or refused;
    /// retriable failures are tried again (marked as possible repeats: a failed
    /// write may still have landed, a delivery timeout says "possibly persisted").
    pub(super) async fn deliver<D: Driver>(
        &self,
        d: &mut D,
        items: &[Item],
        mut pending: Vec<usize>,
        observe: bool,
        held: &Held,
    ) -> Result<Delivery, Stop> {
        let mut delivery = Delivery::default();
        let (mut retry, started, mut retrying) = (Retry::new(), Instant::now(), false);
        let stop = d.stopping();
        while !pending.is_empty() {
            let effects = batch::effects(items, &pending, retrying, &held.lost(), observe, self.claimant.job());
            let repeats = effects.iter().filter(|e| e.possible_repeat).count();
            self.guard(d, held).await?;
            // From here the effects may land: these claims are never released by a drain.
            held.started(&batch::claims_of(items, &pending, &self.claimant));
            self.metrics.possible_repeats.inc_by(repeats as u64);
            let results = self.sink.deliver(&effects, &stop).await;
            if results.len() != effects.len() {
                return Err(self.miscounted(d, items, &pending, results.len()));
            }
            pending = self.sort_results(d, items, &pending, results, &mut delivery)?;
            retrying = true;
            if !pending.is_empty() {
                retry.again(self, d).await?;
            }
        }
        self.metrics.partition_progressing(d.partition());
        self.metrics.sink_seconds.observe(started.elapsed().as_secs_f64());
        Ok(delivery)
    }

    /// A sink bug: which result belongs to which event cannot be told, so none
    /// completes. The process stops; the next run resumes these claims, marked.
    fn miscounted<D: Driver>(&self, d: &D, items: &[Item], pending: &[usize], answered: usize) -> Stop {
        let (given, kind) = (pending.len(), self.sink.kind());
        let first = &envelope(&items[pending[0]]).record.position;
        error!(topic = %d.partition().0, partition = d.partition().1, %first, given, answered, sink = kind, "the sink answered a different number of results than the effects it was given (its Sink::deliver must answer one per effect, in order); none of this batch completes, and kdedup stops");
        self.fatal.raise(format!(
            "the {kind} sink answered {answered} results for {given} effects; a Sink must answer one result per effect"
        ));
        Stop::Fatal
    }

    /// Sorts a delivery's results into `delivery`; returns the items to try again.
    fn sort_results<D: Driver>(
        &self,
        d: &mut D,
        items: &[Item],
        pending: &[usize],
        results: Vec<Result<crate::sink::Delivered, SinkError>>,
        delivery: &mut Delivery,
    ) -> Result<Vec<usize>, Stop> {
        let mut retry = Vec::new();
        for (&i, result) in pending.iter().zip(results) {
            let position = &envelope(&items[i]).record.position;
            match result {
                Ok(delivered) => {
                    if let Some(landed) = delivered.mark {
                        d.landed(Landed::Output, position.offset, landed);
                    }
                    delivery.responses.extend(delivered.response.map(|r| (i, r)));
                }
                Err(e) if e.is_fatal() => return Err(self.fatal_producer(d.partition(), position, &e)),
                Err(e) if e.is_retriable() => {
                    self.metrics.sink_error(&e);
                    warn!(%position, error = %e, sink = self.sink.kind(), "effect failed; retrying");
                    retry.push(i);
                }
                Err(e) => {
                    self.metrics.sink_error(&e);
                    delivery.rejected.push((i, e));
                }
            }
        }
        Ok(retry)
    }

    fn fatal_producer(&self, tp: &TopicPartition, position: &Position, e: &SinkError) -> Stop {
        self.metrics.sink_error(e);
        error!(topic = %tp.0, partition = tp.1, %position, error = %e, "fatal producer error; kdedup stops so that it restarts with a new producer");
        self.fatal.raise(format!("fatal producer error: {e}"));
        Stop::Fatal
    }

    /// Completes the claims whose effects are durable; a claim found taken over
    /// meanwhile is counted and told (its effect may run twice).
    pub(super) async fn complete<D: Driver>(
        &self,
        d: &D,
        done: Vec<(EventKey, Position)>,
        held: &Held,
    ) -> Result<(), Stop> {
        held.clear();
        if done.is_empty() {
            return Ok(());
        }
        let answers = self.store_call(d, "complete", || self.store.complete(done.clone(), now_ms())).await?;
        self.settled_claims.send_modify(|n| *n += 1);
        for ((_, position), kept) in done.iter().zip(answers) {
            if !kept {
                self.metrics.claims_lost.inc();
                warn!(%position, "claim was taken over before completion; the effect may run twice");
            }
        }
        Ok(())
    }

    /// Side topics: dead letters and (optionally) duplicates. Observe mode
    /// forwarded its conflicts, stamped.
    pub(super) async fn write_sides<D: Driver>(
        &self,
        d: &mut D,
        items: &[Item],
        observe: bool,
        earlier: &mut Earlier,
        held: &Held,
    ) -> Result<(), Stop> {
        let conflicts_dead_letter = self.config.on_conflict == OnConflict::DeadLetter && !observe;
        let sides = batch::side_writes(items, conflicts_dead_letter, earlier);
        self.count_reconciled(sides.reconciled as usize);
        let dead_letters = batch::dead_letters(&sides.dead, earlier);
        let landed = self.write_side(d, held, Side::DeadLetter, &dead_letters, |b| self.side.dead_letter(b)).await?;
        for (i, mark) in landed {
            d.landed(Landed::DeadLetter, dead_letters[i].record.position.offset, mark);
        }
        self.metrics.dead_lettered(&d.partition().0, sides.dead.iter().map(|(_, e)| e.reason()));
        if self.side.duplicates.is_some() {
            self.write_side(d, held, Side::Duplicates, &sides.dups, |b| self.side.duplicates(b)).await?;
        }
        Ok(())
    }

    /// Writes to a side topic, retrying retriable failures. A dead letter the
    /// topic refuses for good has nowhere else to go: the partition stalls on
    /// it, loudly (error log naming the record, the stalled gauge, `/readyz`
    /// 503), and keeps trying, so the record is never committed unwritten.
    /// (Records refused for their size were already written truncated by
    /// [`crate::sink::SideTopics::dead_letter`].) A duplicates-topic copy refused
    /// for good is only an audit copy: logged, counted, and skipped.
    /// Returns where the written records landed, by their index in `records`.
    async fn write_side<D: Driver, T, F, Fut>(
        &self,
        d: &D,
        held: &Held,
        side: Side,
        records: &[T],
        write: F,
    ) -> Result<Vec<(usize, OutputMark)>, Stop>
    where
        T: HasPosition,
        F: Fn(Vec<T>) -> Fut,
        Fut: std::future::Future<Output = Vec<Result<OutputMark, SinkError>>>,
    {
        let mut landed = Vec::with_capacity(records.len());
        let mut pending: Vec<usize> = (0..records.len()).collect();
        let mut retry = Retry::new();
        while !pending.is_empty() {
            let batch: Vec<T> = pending.iter().map(|&i| records[i].clone()).collect();
            self.guard(d, held).await?;
            let results = write(batch).await;
            let mut again = Vec::new();
            for (&i, result) in pending.iter().zip(results) {
                match result {
                    Ok(mark) => landed.push((i, mark)),
                    Err(e) if e.is_fatal() => {
                        return Err(self.fatal_producer(d.partition(), records[i].position(), &e))
                    }
                    Err(e) if e.is_retriable() => again.push(i),
                    Err(e) => again.extend(self.side_refused(side, records[i].position(), &e).then_some(i)),
                }
            }
            pending = again;
            if !pending.is_empty() {
                // One retry round, counted once as before (or as the refusals above).
                self.metrics.sink_errors.at(["retriable"]).inc();
                warn!(topic = side.name(), records = pending.len(), "side topic write failed; retrying");
                retry.again(self, d).await?;
            }
        }
        self.metrics.partition_progressing(d.partition());
        Ok(landed)
    }

    /// Counts and tells a side topic's refusal for good; whether to try again (a dead letter).
    fn side_refused(&self, side: Side, position: &Position, e: &SinkError) -> bool {
        let what = side.name();
        self.metrics.sink_error(e);
        self.metrics.side_refusals.with_label_values(&[what]).inc();
        match side {
            Side::DeadLetter => {
                error!(%position, topic = what, error = %e, "the dead-letter topic refuses this record: the partition stalls on it until the topic accepts it (check its ACLs, size limits and existence)");
                true
            }
            Side::Duplicates => {
                error!(%position, topic = what, error = %e, "the duplicates topic refused an audit copy; skipped");
                false
            }
        }
    }

    /// Releases the held claims whose effect never started (one attempt: the driver is
    /// stopping, so a failing store is not waited on; the claims then stay for the next owner).
    pub(super) async fn release_unstarted<D: Driver>(&self, d: &D, held: &Held) {
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

    /// One heartbeat: extends the leases of the claims a batch holds. A refusal
    /// means another owner took the claim over while we held it (our lease had
    /// lapsed: a freeze, a store outage longer than the lease): the effect is then
    /// marked as a possible repeat.
    pub(super) async fn renew(&self, tp: &TopicPartition, held: &Held) {
        let keys = held.snapshot();
        if keys.is_empty() {
            return;
        }
        match self.store.renew(keys.clone(), now_ms()).await {
            Ok(answers) => {
                let lost: Vec<i64> =
                    keys.iter().zip(answers).filter(|(_, ok)| !ok).map(|((_, p), _)| p.offset).collect();
                if !lost.is_empty() {
                    self.metrics.leases_lost.inc_by(lost.len() as u64);
                    warn!(topic = %tp.0, partition = tp.1, claims = lost.len(), first_offset = lost[0], "claims taken over while this partition held them; their effects will be marked as possible repeats");
                    held.lose(lost);
                }
            }
            Err(e) => {
                warn!(topic = %tp.0, partition = tp.1, error = %e, "lease renewal failed; trying again at the next heartbeat")
            }
        }
    }

    /// A finished round: its latency, what the filter learns, its outcomes counted,
    /// then the driver told.
    pub(super) fn finished<D: Driver>(&self, d: &mut D, items: &[Item], arrived: Instant) {
        let secs = arrived.elapsed().as_secs_f64();
        for _ in items {
            self.metrics.record_seconds.observe(secs);
        }
        let now = now_ms();
        let mut filter = self.filter();
        let remembered = batch::remember(items, &mut filter, now);
        self.metrics.filter_bytes.set(filter.memory_bytes() as i64);
        drop(filter);
        let topic = &d.partition().0;
        self.metrics.expired_key_hits(topic, remembered.expired_hits);
        for first in remembered.duplicate_firsts {
            self.metrics.duplicate_seen(topic, first, now);
        }
        for outcome in Outcome::ALL {
            match remembered.counts.get(&outcome) {
                Some(&n) if n > 0 => self.metrics.records.at([topic, outcome.label()]).inc_by(n),
                _ => {}
            }
        }
        d.finished(items);
    }
}

/// The side topics, for logs and the refusal counter.
#[derive(Debug, Clone, Copy)]
pub(super) enum Side {
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

pub(super) trait HasPosition: Clone {
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
