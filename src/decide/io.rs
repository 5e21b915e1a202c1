//! The decision core's I/O: store calls and side-topic writes, retried with backoff.

use std::time::{Duration, Instant};

use tracing::{error, warn};

use super::lease::Held;
use super::{Core, Driver, Stop};
use crate::error::{SinkError, StoreError};
use crate::event::{Envelope, Position};
use crate::sink::DeadLetter;
use crate::values::OutputMark;

/// Exponential backoff: from 50 ms to 5 s for failures; from 20 ms to 1 s for
/// a claim waiting on another process's batch (one in this process wakes the
/// waiter when it settles).
pub(crate) struct Backoff {
    next: Duration,
    max: Duration,
}

impl Backoff {
    pub(crate) fn new() -> Backoff {
        Backoff { next: Duration::from_millis(50), max: Duration::from_secs(5) }
    }
    pub(super) fn for_claim_waits() -> Backoff {
        Backoff { next: Duration::from_millis(20), max: Duration::from_secs(1) }
    }
    pub(crate) fn next(&mut self) -> Duration {
        let d = self.next;
        self.next = (self.next * 2).min(self.max);
        d
    }
}

impl Core {
    /// Retries a store call with backoff until it answers; the partition reports
    /// itself stalled meanwhile.
    pub(super) async fn store_call<D: Driver, T, F, Fut>(&self, d: &D, op: &'static str, mut call: F) -> Result<T, Stop>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Result<T, StoreError>>,
    {
        let mut backoff = Backoff::new();
        loop {
            let started = Instant::now();
            let result = call().await;
            self.metrics.store_call(op, result.is_ok(), started.elapsed().as_secs_f64());
            self.metrics.store_answered(d.partition(), result.is_ok());
            match result {
                Ok(v) => {
                    self.progressing(d);
                    return Ok(v);
                }
                Err(e) => {
                    self.metrics.store_errors.inc();
                    self.stalled(d);
                    if !e.is_retriable() {
                        // A corrupt row cannot be fixed by waiting; keep the partition
                        // paused and loud rather than guess.
                        error!(topic = %d.partition().0, partition = d.partition().1, op, error = %e, "store call failed; not retriable, operator action needed");
                    } else {
                        warn!(topic = %d.partition().0, partition = d.partition().1, op, error = %e, "store call failed; retrying");
                    }
                    d.pause(backoff.next()).await?;
                }
            }
        }
    }

    /// Writes to a side topic, retrying retriable failures. A dead letter the
    /// topic refuses for good has nowhere else to go: the partition stalls on
    /// it, loudly (error log naming the record, the stalled gauge, `/readyz`
    /// 503), and keeps trying, so the record is never committed unwritten.
    /// (Records refused for their size were already written truncated by
    /// [`SideTopics::dead_letter`].) A duplicates-topic copy refused for good
    /// is only an audit copy: logged, counted, and skipped.
    /// Returns where the written records landed, by their index in `records`.
    pub(super) async fn write_side<D: Driver, T, F, Fut>(
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
        let what = side.name();
        let mut landed = Vec::with_capacity(records.len());
        let mut pending: Vec<usize> = (0..records.len()).collect();
        let mut backoff = Backoff::new();
        while !pending.is_empty() {
            let batch: Vec<T> = pending.iter().map(|&i| records[i].clone()).collect();
            self.guard(d, held).await?;
            let results = write(batch).await;
            let mut retry = Vec::new();
            for (&i, result) in pending.iter().zip(results) {
                match result {
                    Ok(mark) => landed.push((i, mark)),
                    Err(e) if e.is_fatal() => {
                        self.metrics.sink_error(&e);
                        error!(position = %records[i].position(), topic = what, error = %e, "fatal producer error; kdedup stops so that it restarts with a new producer");
                        self.fatal.raise(format!("fatal producer error: {e}"));
                        return Err(Stop::Fatal);
                    }
                    Err(e) if e.is_retriable() => retry.push(i),
                    Err(e) => {
                        self.metrics.sink_error(&e);
                        self.metrics.side_refusals.with_label_values(&[what]).inc();
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
                // One retry round, counted once as before (or as the refusals above).
                self.metrics.sink_errors.at(["retriable"]).inc();
                self.stalled(d);
                warn!(topic = what, records = pending.len(), "side topic write failed; retrying");
                d.pause(backoff.next()).await?;
            }
        }
        self.progressing(d);
        Ok(landed)
    }
}

/// The side topics, for logs and the refusal counter.
#[derive(Debug, Clone, Copy)]
pub(super) enum Side {
    DeadLetter,
    Duplicates,
}

impl Side {
    pub(super) fn name(self) -> &'static str {
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
