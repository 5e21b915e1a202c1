//! The configured sink with kdedup's own test hooks around it (cargo feature
//! `testkit`; see `kdedup::testkit`): crash, panic and slow points as a
//! decoration, the way tansu's `LatencyIntroducingStorage<S>` wraps a storage.
//!
//! A crash point stands in for a process that dies at that point: the partition
//! does nothing more for that batch (no effect, or no completion) until the run
//! is stopped, and the drain then leaves the batch unfinished and uncommitted.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::{AnySink, BoxFuture, Delivered, Effect, Stopping};
use crate::error::SinkError;
use crate::event::Position;

/// Points at which a test makes a run fail, each armed with a position and
/// fired once, by the batch that holds that position.
#[derive(Default, Clone)]
pub struct Faults {
    /// Claim the batch holding this position, then stop before any of its
    /// effects runs, as a crash would.
    pub crash_after_claim: Arc<Mutex<Option<Position>>>,
    /// Run the effects of the batch holding this position, then stop before
    /// completing the claims (the window reconciliation closes).
    pub crash_after_effect: Arc<Mutex<Option<Position>>>,
    /// Panic in the partition task that handles the batch holding this position.
    pub panic_at: Arc<Mutex<Option<Position>>>,
    /// Hold the effects of the batch holding this position this long before
    /// delivering them (a slow endpoint, an output leader that is down).
    pub slow_effect: Arc<Mutex<Option<(Position, Duration)>>>,
    /// Notified when a fault fired.
    pub fired: Arc<tokio::sync::Notify>,
}

fn take<T>(slot: &Mutex<Option<T>>, at: impl Fn(&T) -> &Position, batch: &[Effect<'_>]) -> Option<T> {
    let mut slot = slot.lock().unwrap_or_else(|p| p.into_inner());
    let hit = slot.as_ref().is_some_and(|armed| batch.iter().any(|e| e.envelope.record.position == *at(armed)));
    if hit {
        slot.take()
    } else {
        None
    }
}

/// The configured sink with [`Faults`] around it.
pub struct FaultySink {
    pub(crate) inner: AnySink,
    pub(crate) faults: Faults,
}

impl FaultySink {
    /// The sink it decorates.
    pub(crate) fn inner(&self) -> &AnySink {
        &self.inner
    }

    /// Delivers through the inner sink, unless a fault armed for this batch says
    /// otherwise. (Boxed, with `Send` in its type: the decoration's future holds
    /// the inner sink's, whose `Send` the compiler could not otherwise prove.)
    pub(crate) fn deliver<'a, 'b: 'a>(
        &'a self,
        batch: &'a [Effect<'b>],
        stop: &'a Stopping,
    ) -> BoxFuture<'a, Vec<Result<Delivered, SinkError>>> {
        Box::pin(self.deliver_now(batch, stop))
    }

    async fn deliver_now(&self, batch: &[Effect<'_>], stop: &Stopping) -> Vec<Result<Delivered, SinkError>> {
        let f = &self.faults;
        if let Some(p) = take(&f.panic_at, |p| p, batch) {
            panic!("injected panic in partition {}/{}", p.topic, p.partition);
        }
        if take(&f.crash_after_claim, |p| p, batch).is_some() {
            return self.crashed(batch, stop).await;
        }
        if let Some((_, delay)) = take(&f.slow_effect, |(p, _)| p, batch) {
            f.fired.notify_one();
            tokio::time::sleep(delay).await;
        }
        let results = self.inner.deliver(batch, stop).await;
        if take(&f.crash_after_effect, |p| p, batch).is_some() {
            return self.crashed(batch, stop).await;
        }
        results
    }

    /// Does nothing more until the partition stops; then nothing of the batch completes.
    async fn crashed(&self, batch: &[Effect<'_>], stop: &Stopping) -> Vec<Result<Delivered, SinkError>> {
        self.faults.fired.notify_one();
        stop.stopped().await;
        batch.iter().map(|_| Err(SinkError::retriable("injected crash"))).collect()
    }
}
