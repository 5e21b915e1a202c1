//! The batch as a plan: pure steps over its items.

use std::collections::HashSet;
use std::sync::Arc;

use super::{Decision, Item};
use crate::error::RecordError;
use crate::event::{Envelope, Position, Record};
use crate::sink::Observed;
use crate::window::First;

/// Splits a round's items into those ready for their effects and those set
/// aside for the next round: the leaders in `waiting` and every later record
/// of their keys. Leader indices are remapped into each half.
pub(super) fn set_aside(items: Vec<Item>, waiting: &[usize]) -> (Vec<Item>, Vec<Item>) {
    if waiting.is_empty() {
        return (items, Vec::new());
    }
    let waits: HashSet<usize> = waiting.iter().copied().collect();
    let (mut ready, mut later) = (Vec::new(), Vec::new());
    // Where each item went, within its half; a leader always precedes its followers.
    let mut moved_to: Vec<usize> = Vec::with_capacity(items.len());
    for (i, mut item) in items.into_iter().enumerate() {
        let defer = match &mut item {
            Item::Keyed { leader: Some(first), .. } => {
                let deferred = waits.contains(first);
                *first = moved_to[*first];
                deferred
            }
            Item::Keyed { leader: None, .. } => waits.contains(&i),
            Item::Bad { .. } => false,
        };
        let half = if defer { &mut later } else { &mut ready };
        moved_to.push(half.len());
        half.push(item);
    }
    (ready, later)
}

/// Later records of a key follow the batch's first one: a duplicate of it, or
/// a conflict with the fingerprint that decided it.
pub(super) fn follow_leaders(items: &mut [Item]) {
    for i in 0..items.len() {
        let Item::Keyed { leader: Some(leader), .. } = items[i] else { continue };
        let authority = match (decision_of(&items[leader]), envelope(&items[leader]).fingerprint) {
            (Decision::Conflict(stored), _) => stored,
            (_, fp) => fp,
        };
        // The duplicate's first occurrence: the leader, or the leader's own first.
        let first = match decision_of(&items[leader]) {
            Decision::New { claimed_at_ms, .. } => {
                Some(First::new(claimed_at_ms, &envelope(&items[leader]).record.position))
            }
            Decision::Duplicate { first, .. } => first,
            Decision::Conflict(_) => None,
        };
        let decision = if envelope(&items[i]).fingerprint == authority {
            Decision::Duplicate { expires_at_ms: None, first }
        } else {
            Decision::Conflict(authority)
        };
        set_decision(&mut items[i], decision);
    }
}

pub(super) fn envelope(item: &Item) -> &Envelope {
    match item {
        Item::Keyed { envelope, .. } => envelope,
        Item::Bad { .. } => unreachable!("only keyed items are indexed for the store"),
    }
}

/// What observe mode stamps on a forwarded record.
pub(super) fn observed(decision: Decision) -> Observed {
    match decision {
        Decision::New { .. } => Observed { duplicate: false, conflict: false, first: None },
        Decision::Duplicate { first, .. } => {
            Observed { duplicate: true, conflict: false, first: first.and_then(|f| f.origin) }
        }
        Decision::Conflict(_) => Observed { duplicate: false, conflict: true, first: None },
    }
}

pub(super) fn decision_of(item: &Item) -> Decision {
    match item {
        Item::Keyed { decision: Some(d), .. } => *d,
        _ => unreachable!("leaders are decided before their followers"),
    }
}

pub(super) fn set_decision(item: &mut Item, d: Decision) {
    if let Item::Keyed { decision, .. } = item {
        *decision = Some(d);
    }
}

pub(super) fn placeholder() -> Item {
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
