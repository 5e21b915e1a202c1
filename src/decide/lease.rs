//! The claims a batch holds and their renewal.

use std::collections::HashSet;
use std::sync::atomic::AtomicU64;
use std::sync::Mutex;

use tracing::warn;

use super::Core;
use crate::event::{EventKey, Position};
use crate::store::{now_ms, DedupStore};
use crate::values::TopicPartition;

/// Claims a batch holds between its claim and its completion, for the heartbeat.
#[derive(Default)]
pub(super) struct Held {
    pub(super) keys: Mutex<Vec<(EventKey, Position)>>,
    /// Offsets whose lease renewal was refused: taken over while we held them.
    pub(super) lost: Mutex<HashSet<i64>>,
    /// When the last ownership check before a write began (ms since the epoch).
    pub(super) checked_ms: AtomicU64,
    /// Claims won fresh whose effect was not yet handed to the sink: a drain that stops
    /// before their effect releases them (never effected, nothing to resume or mark).
    pub(super) unstarted: Mutex<Vec<(EventKey, Position)>>,
}

impl Held {
    pub(super) fn add(&self, keys: impl IntoIterator<Item = (EventKey, Position)>) {
        self.keys.lock().unwrap_or_else(|p| p.into_inner()).extend(keys);
    }
    pub(super) fn clear(&self) {
        self.keys.lock().unwrap_or_else(|p| p.into_inner()).clear();
    }
    pub(super) fn snapshot(&self) -> Vec<(EventKey, Position)> {
        self.keys.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
    pub(super) fn remove(&self, gone: &[(EventKey, Position)]) {
        self.keys.lock().unwrap_or_else(|p| p.into_inner()).retain(|k| !gone.contains(k));
    }
    pub(super) fn started(&self, keys: &[(EventKey, Position)]) {
        self.unstarted.lock().unwrap_or_else(|p| p.into_inner()).retain(|k| !keys.contains(k));
    }
    /// The claims still held whose effect never started.
    pub(super) fn take_unstarted(&self) -> Vec<(EventKey, Position)> {
        let held = self.snapshot();
        let mut unstarted = std::mem::take(&mut *self.unstarted.lock().unwrap_or_else(|p| p.into_inner()));
        unstarted.retain(|k| held.contains(k));
        unstarted
    }
    pub(super) fn was_lost(&self, offset: i64) -> bool {
        self.lost.lock().unwrap_or_else(|p| p.into_inner()).contains(&offset)
    }
}

/// One heartbeat: extends the leases of the claims a batch holds. A refusal
/// means another owner took the claim over while we held it (our lease had
/// lapsed: a freeze, a store outage longer than the lease): the effect is then
/// marked as a possible repeat.
pub(super) async fn renew(core: &Core, tp: &TopicPartition, held: &Held) {
    let keys = held.snapshot();
    if keys.is_empty() {
        return;
    }
    match core.store.renew(keys.clone(), now_ms()).await {
        Ok(answers) => {
            let lost: Vec<i64> = keys.iter().zip(answers).filter(|(_, ok)| !ok).map(|((_, p), _)| p.offset).collect();
            if !lost.is_empty() {
                core.metrics.leases_lost.inc_by(lost.len() as u64);
                warn!(topic = %tp.0, partition = tp.1, claims = lost.len(), first_offset = lost[0], "claims taken over while this partition held them; their effects will be marked as possible repeats");
                held.lost.lock().unwrap_or_else(|p| p.into_inner()).extend(lost);
            }
        }
        Err(e) => {
            warn!(topic = %tp.0, partition = tp.1, error = %e, "lease renewal failed; trying again at the next heartbeat")
        }
    }
}
