//! The claims a batch holds between its claim and its completion, and the
//! heartbeat that renews their leases every third of `lease_secs` while the
//! batch runs, so a slow effect never lets another owner take a live claim
//! over. A renewal refused (the claim was taken over while we held it) marks
//! the claim's offset lost: its effect is then sent as a possible repeat.

use std::collections::HashSet;
use std::future::Future;
use std::sync::atomic::AtomicU64;
use std::sync::Mutex;
use std::time::Duration;

use super::Core;
use crate::event::{EventKey, Position};
use crate::values::TopicPartition;

/// Claims a batch holds between its claim and its completion, for the heartbeat.
#[derive(Default)]
pub(super) struct Held {
    keys: Mutex<Vec<(EventKey, Position)>>,
    /// Offsets whose lease renewal was refused: taken over while we held them.
    lost: Mutex<HashSet<i64>>,
    /// When the last ownership check before a write began (ms since the epoch).
    pub(super) checked_ms: AtomicU64,
    /// Claims won fresh whose effect was not yet handed to the sink: a drain that stops
    /// before their effect releases them (never effected, nothing to resume or mark).
    unstarted: Mutex<Vec<(EventKey, Position)>>,
}

/// A set to test claims against: a batch's claims number up to `batch_max`, so a
/// `Vec::contains` per claim was quadratic (a tenth of the pipeline's CPU in `kdedup bench`).
fn set_of(claims: &[(EventKey, Position)]) -> foldhash::HashSet<&(EventKey, Position)> {
    claims.iter().collect()
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Held {
    /// Claims won: held from now on; each `true` beside it when a drain may
    /// release it until its effect starts. `lost`: the offsets of those whose
    /// lease may have lapsed before we heard of them. (One call per round: its
    /// locks were taken once per claim before.)
    pub(super) fn won(&self, claims: Vec<((EventKey, Position), bool)>, lost: Vec<i64>) {
        let mut unstarted = lock(&self.unstarted);
        let mut keys = lock(&self.keys);
        for (claim, releasable) in claims {
            if releasable {
                unstarted.push(claim.clone());
            }
            keys.push(claim);
        }
        lock(&self.lost).extend(lost);
    }
    pub(super) fn clear(&self) {
        lock(&self.keys).clear();
    }
    pub(super) fn snapshot(&self) -> Vec<(EventKey, Position)> {
        lock(&self.keys).clone()
    }
    pub(super) fn remove(&self, gone: &[(EventKey, Position)]) {
        let gone = set_of(gone);
        lock(&self.keys).retain(|k| !gone.contains(k));
    }
    /// Their effects may land from now on: never released by a drain.
    pub(super) fn started(&self, keys: &[(EventKey, Position)]) {
        let mut unstarted = lock(&self.unstarted);
        if unstarted.is_empty() || keys.is_empty() {
            return;
        }
        let keys = set_of(keys);
        unstarted.retain(|k| !keys.contains(k));
    }
    /// The claims still held whose effect never started.
    pub(super) fn take_unstarted(&self) -> Vec<(EventKey, Position)> {
        let mut unstarted = std::mem::take(&mut *lock(&self.unstarted));
        let held = lock(&self.keys);
        let held = set_of(&held);
        unstarted.retain(|k| held.contains(k));
        unstarted
    }
    /// These offsets' claims were taken over while we held them.
    pub(super) fn lose(&self, offsets: impl IntoIterator<Item = i64>) {
        lock(&self.lost).extend(offsets);
    }
    /// The offsets whose claims were taken over while we held them.
    pub(super) fn lost(&self) -> HashSet<i64> {
        lock(&self.lost).clone()
    }
}

/// Runs `work` while a heartbeat renews the leases of the claims in `held`.
pub(super) async fn with_heartbeat<F: Future>(core: &Core, tp: &TopicPartition, held: &Held, work: F) -> F::Output {
    tokio::pin!(work);
    let period = (core.lease / 3).max(Duration::from_millis(100));
    let mut heartbeat = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
    heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            result = &mut work => return result,
            _ = heartbeat.tick() => core.renew(tp, held).await,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    fn claim(id: &str, offset: i64) -> (EventKey, Position) {
        (
            EventKey { scope: Arc::from("s"), id: id.as_bytes().to_vec() },
            Position { topic: Arc::from("t"), partition: 0, offset },
        )
    }

    /// A drain releases exactly the claims still held whose effect never started: not
    /// those started, not those no longer held, and a key is told apart by its position too.
    #[test]
    fn only_claims_held_and_never_started_are_left_to_release() {
        let held = Held::default();
        let (a, b, c, d) = (claim("a", 0), claim("b", 1), claim("c", 2), claim("d", 3));
        held.won([&a, &b, &c, &d].map(|k| (k.clone(), true)).into(), Vec::new());
        held.won(vec![(claim("e", 4), false)], Vec::new());
        held.started(&[b.clone(), claim("a", 9)]);
        held.remove(std::slice::from_ref(&c));
        assert_eq!(held.snapshot().len(), 4, "c is no longer held");
        assert_eq!(held.take_unstarted(), vec![a, d], "b started, c gone, e was never releasable");
        assert!(held.take_unstarted().is_empty(), "taken once");
    }
}
