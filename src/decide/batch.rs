//! The batch as a plan, with no I/O: each step takes what the store or the
//! sink answered and says what comes next. The caller (`decide::Core`) does the
//! calls, retries, counts and logs; nothing here awaits, counts or logs, so the
//! steps are tested alone and, in sequence, against a model of the store.
//!
//! A batch's items are decided in place. Within a batch the first record of a
//! key is its leader: it alone is screened and claimed; later ones follow its
//! answer ([`follow_leaders`]). The order of the steps, as `Core` runs them:
//!
//! ```text
//! keyed → screen (filter) → [marker read → distrust_recent] → [lookups → apply_lookups]
//!   → rounds of: claim_requests → apply_claims → set_aside → follow_leaders
//!       → pending_effects → effects → apply_rejections → to_record → to_complete
//!       → side_writes → remember
//! ```

use std::collections::{HashMap, HashSet};

use super::{Claimant, Decision, Earlier, Item};
use crate::error::{RecordError, SinkError};
use crate::event::{Envelope, EventKey, KeyExtractor, Position, Record};
use crate::filter::{Filter, Verdict, PREFETCH_AHEAD};
use crate::sink::{DeadLetter, Effect, Observed};
use crate::store::{release_marker, Acquired, Claim, ClaimRequest, ClaimRow, ClaimState};
use crate::values::EffectResponse;
use crate::window::First;

/// What became of a record, as `kdedup_records_total` counts it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum Outcome {
    /// Its effect ran (or, resumed, completed).
    New,
    /// A repeat of an event already done.
    Duplicate,
    /// Its event ID was first claimed with another payload.
    Conflict,
    /// It could not be handled (no key, or its effect was refused).
    DeadLetter,
}

impl Outcome {
    /// Every outcome, in the order of [`crate::metrics::OUTCOMES`].
    pub(crate) const ALL: [Outcome; 4] = [Outcome::New, Outcome::Duplicate, Outcome::Conflict, Outcome::DeadLetter];

    /// The `outcome` label.
    pub(crate) fn label(self) -> &'static str {
        match self {
            Outcome::New => "new",
            Outcome::Duplicate => "duplicate",
            Outcome::Conflict => "conflict",
            Outcome::DeadLetter => "dead_letter",
        }
    }

    /// A decided item's outcome; `None` for a keyed item not yet decided.
    pub(crate) fn of(item: &Item) -> Option<Outcome> {
        match item {
            Item::Bad { .. } => Some(Outcome::DeadLetter),
            Item::Keyed { decision, .. } => decision.map(|d| match d {
                Decision::New { .. } => Outcome::New,
                Decision::Duplicate { .. } => Outcome::Duplicate,
                Decision::Conflict { .. } => Outcome::Conflict,
            }),
        }
    }
}

/// The position a claim for this record is made under: its own, or a replay job's.
pub(super) fn claim_position(claimant: &Claimant, position: &Position) -> Position {
    match claimant {
        Claimant::Position => position.clone(),
        Claimant::Replay(job) => Position {
            topic: std::sync::Arc::from(format!("replay:{job}:{}", position.topic)),
            partition: position.partition,
            offset: position.offset,
        },
    }
}

/// Keys each record; a record without a usable key becomes [`Item::Bad`].
pub(super) fn keyed(extractor: &KeyExtractor, records: Vec<Record>) -> Vec<Item> {
    records
        .into_iter()
        .map(|r| match extractor.extract(r) {
            Ok(envelope) => Item::Keyed { envelope, decision: None, leader: None },
            Err((record, error)) => Item::Bad { record, error },
        })
        .collect()
}

/// What the filter said of a batch's leaders, by item index (each list ascending).
#[derive(Debug, Default)]
pub(super) struct Screened {
    /// Likely new: straight to the claim.
    pub(super) to_claim: Vec<usize>,
    /// The aging filter may have seen them: read from the store first.
    pub(super) suspects: Vec<usize>,
    /// Decided duplicates by the recent cache, while it still vouches.
    pub(super) recent: Vec<usize>,
}

/// Screens the batch with the filter: points later records of a key at the
/// batch's first one, decides what the recent cache knows, and sorts the rest.
pub(super) fn screen(items: &mut [Item], filter: &mut Filter, now_ms: u64) -> Screened {
    let mut leader_of: foldhash::HashMap<u128, usize> = foldhash::HashMap::default();
    let mut screened = Screened::default();
    // The aging filter outgrows the caches: read its buckets a few keys ahead.
    let digests: Vec<u128> = items.iter().filter_map(|item| keyed_envelope(item).map(|e| e.digest)).collect();
    digests.iter().take(PREFETCH_AHEAD).for_each(|digest| filter.prefetch(*digest));
    let mut ahead = digests.iter().skip(PREFETCH_AHEAD);
    for (i, item) in items.iter_mut().enumerate() {
        let Item::Keyed { envelope, decision, leader } = item else { continue };
        if let Some(next) = ahead.next() {
            filter.prefetch(*next);
        }
        if let Some(&first) = leader_of.get(&envelope.digest) {
            *leader = Some(first);
            continue;
        }
        leader_of.insert(envelope.digest, i);
        match filter.check(envelope, now_ms) {
            Verdict::RecentDuplicate(first) => {
                screened.recent.push(i);
                *decision = Some(Decision::Duplicate { expires_at_ms: None, first: Some(first) });
            }
            Verdict::Suspect => screened.suspects.push(i),
            Verdict::LikelyNew => screened.to_claim.push(i),
        }
    }
    screened
}

impl Screened {
    /// The release marker to read before trusting the recent cache, when it answered at all.
    pub(super) fn marker(&self, items: &[Item]) -> Option<EventKey> {
        self.recent.first().map(|&i| release_marker(&envelope(&items[i]).key.scope))
    }

    /// A release happened since the cache was last emptied: its answers go to the store.
    pub(super) fn distrust_recent(&mut self, items: &mut [Item]) {
        for &i in &self.recent {
            set_decision(&mut items[i], None);
        }
        self.suspects.append(&mut self.recent);
        self.suspects.sort_unstable();
    }

    /// The keys of the suspects, for one lookup.
    pub(super) fn suspect_keys(&self, items: &[Item]) -> Vec<EventKey> {
        self.suspects.iter().map(|&i| envelope(&items[i]).key.clone()).collect()
    }

    /// Decides the suspects the store found done; the rest go on to the claim.
    /// Returns how many the store did not know at all (the filter's false positives).
    pub(super) fn apply_lookups(&mut self, items: &mut [Item], rows: Vec<Option<ClaimRow>>) -> usize {
        let mut false_positives = 0;
        for (&i, row) in self.suspects.iter().zip(rows) {
            match row {
                Some(row) if row.state == ClaimState::Done => {
                    let first = Some(First::new(row.claimed_at_ms, &row.position));
                    let decision = if row.fingerprint == envelope(&items[i]).fingerprint {
                        Decision::Duplicate { expires_at_ms: Some(row.expires_at_ms), first }
                    } else {
                        Decision::Conflict { stored: row.fingerprint, first }
                    };
                    set_decision(&mut items[i], Some(decision));
                }
                Some(_) => self.to_claim.push(i),
                None => {
                    false_positives += 1;
                    self.to_claim.push(i);
                }
            }
        }
        self.to_claim.sort_unstable();
        false_positives
    }
}

/// The leaders of a set-aside round, which claim again.
pub(super) fn leaders(items: &[Item]) -> Vec<usize> {
    (0..items.len()).filter(|&i| matches!(items[i], Item::Keyed { leader: None, .. })).collect()
}

/// One claim request per item in `to_claim`.
pub(super) fn claim_requests(items: &[Item], to_claim: &[usize], claimant: &Claimant) -> Vec<ClaimRequest> {
    to_claim
        .iter()
        .map(|&i| {
            let e = envelope(&items[i]);
            ClaimRequest {
                key: e.key.clone(),
                fingerprint: e.fingerprint,
                position: claim_position(claimant, &e.record.position),
            }
        })
        .collect()
}

/// What one claim round decided, by item index.
#[derive(Debug, Default)]
pub(super) struct Claimed {
    /// Claims won, and how.
    pub(super) won: Vec<(usize, Acquired)>,
    /// Keys another owner holds under a live lease: set aside for the next round.
    pub(super) waiting: Vec<(usize, Position)>,
}

/// Decides every item the store answered for; `claimed_at_ms`: the clock the claims were made with.
pub(super) fn apply_claims(items: &mut [Item], to_claim: &[usize], answers: Vec<Claim>, claimed_at_ms: u64) -> Claimed {
    let mut claimed = Claimed::default();
    for (&i, answer) in to_claim.iter().zip(answers) {
        let decision = match answer {
            Claim::New(acquired) => {
                claimed.won.push((i, acquired));
                Decision::New { acquired, claimed_at_ms }
            }
            Claim::Duplicate { first, claimed_at_ms } => {
                Decision::Duplicate { expires_at_ms: None, first: Some(First::new(claimed_at_ms, &first)) }
            }
            Claim::Conflict { stored, first, claimed_at_ms } => {
                Decision::Conflict { stored, first: Some(First::new(claimed_at_ms, &first)) }
            }
            Claim::InFlight { holder, .. } => {
                claimed.waiting.push((i, holder));
                continue;
            }
        };
        set_decision(&mut items[i], Some(decision));
    }
    claimed
}

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
/// a conflict with the fingerprint that decided it (and where that was claimed).
pub(super) fn follow_leaders(items: &mut [Item]) {
    for i in 0..items.len() {
        let Item::Keyed { leader: Some(leader), .. } = items[i] else { continue };
        let lead = envelope(&items[leader]);
        // The key's first occurrence: the leader, or the leader's own first.
        let (authority, first) = match decision_of(&items[leader]) {
            Decision::New { claimed_at_ms, .. } => {
                (lead.fingerprint, Some(First::new(claimed_at_ms, &lead.record.position)))
            }
            Decision::Duplicate { first, .. } => (lead.fingerprint, first),
            Decision::Conflict { stored, first } => (stored, first),
        };
        let decision = if envelope(&items[i]).fingerprint == authority {
            Decision::Duplicate { expires_at_ms: None, first }
        } else {
            Decision::Conflict { stored: authority, first }
        };
        set_decision(&mut items[i], Some(decision));
    }
}

/// The highest offset whose claim was resumed (our own earlier attempt's), if any.
pub(super) fn resumed_up_to(items: &[Item]) -> Option<i64> {
    items
        .iter()
        .filter_map(|item| match item {
            Item::Keyed { envelope, decision: Some(Decision::New { acquired: Acquired::Resumed, .. }), .. } => {
                Some(envelope.record.position.offset)
            }
            _ => None,
        })
        .max()
}

/// The effects a round must run, in order: every new event's (and in observe
/// mode every keyed record's), except those `earlier` found in the output
/// already. Returns (pending, already emitted new events: only completed).
pub(super) fn pending_effects(items: &[Item], observe: bool, earlier: &mut Earlier) -> (Vec<usize>, Vec<usize>) {
    let (mut pending, mut emitted) = (Vec::new(), Vec::new());
    for (i, item) in items.iter().enumerate() {
        let Item::Keyed { envelope, decision: Some(decision), .. } = item else { continue };
        let new = matches!(decision, Decision::New { .. });
        if !(new || observe) {
            continue;
        }
        if earlier.emitted(envelope.record.position.offset, &envelope.key.id) {
            if new {
                emitted.push(i);
            }
        } else {
            pending.push(i);
        }
    }
    (pending, emitted)
}

/// The effects for `pending`. `retrying`: an earlier attempt may have landed;
/// `lost`: offsets whose claim another owner took over while we held it.
pub(super) fn effects<'a>(
    items: &'a [Item],
    pending: &[usize],
    retrying: bool,
    lost: &HashSet<i64>,
    observe: bool,
    job: Option<&'a str>,
) -> Vec<Effect<'a>> {
    pending
        .iter()
        .map(|&i| {
            let envelope = envelope(&items[i]);
            let decision = decision_of(&items[i]);
            let taken = matches!(decision, Decision::New { acquired, .. } if acquired.may_repeat());
            Effect {
                envelope,
                possible_repeat: retrying || taken || lost.contains(&envelope.record.position.offset),
                observed: observe.then(|| observed(decision)),
                replay: job,
            }
        })
        .collect()
}

/// The claims of `indices`, as held (key, claim position).
pub(super) fn claims_of(items: &[Item], indices: &[usize], claimant: &Claimant) -> Vec<(EventKey, Position)> {
    indices
        .iter()
        .map(|&i| {
            let e = envelope(&items[i]);
            (e.key.clone(), claim_position(claimant, &e.record.position))
        })
        .collect()
}

/// What the sink's refusals leave to do.
#[derive(Debug, Default)]
pub(super) struct Rejected {
    /// Claims no longer renewed (every refused new event's).
    pub(super) unheld: Vec<(EventKey, Position)>,
    /// Claims to release: those whose effect surely did not land (the key is not burned).
    pub(super) release: Vec<(EventKey, Position)>,
    /// Digests the filter must forget.
    pub(super) forget: Vec<u128>,
}

/// A refused effect is dead-lettered with the sink's reason; so are later
/// records of the same event in this batch, which followed it as its
/// duplicates (in observe mode those were forwarded themselves). An effect
/// that may have landed anyway keeps its claim, no longer renewed: it lapses
/// after the lease, and the next copy takes it over, marked.
pub(super) fn apply_rejections(
    items: &mut Vec<Item>,
    rejected: Vec<(usize, SinkError)>,
    observe: bool,
    claimant: &Claimant,
) -> Rejected {
    let mut out = Rejected::default();
    let mut reasons: HashMap<usize, String> = HashMap::new();
    for (i, e) in rejected {
        let envelope = envelope(&items[i]);
        out.forget.push(envelope.digest);
        if matches!(decision_of(&items[i]), Decision::New { .. }) {
            let claim = (envelope.key.clone(), claim_position(claimant, &envelope.record.position));
            if !e.may_have_landed() {
                out.release.push(claim.clone());
            }
            out.unheld.push(claim);
        }
        reasons.insert(i, e.to_string());
    }
    let bad = |item: Item, error: RecordError| match item {
        Item::Keyed { envelope, .. } => Item::Bad { record: envelope.record, error },
        bad @ Item::Bad { .. } => bad,
    };
    *items = std::mem::take(items)
        .into_iter()
        .enumerate()
        .map(|(i, item)| match (&item, reasons.get(&i)) {
            (_, Some(reason)) => bad(item, RecordError::SinkRejected(reason.clone())),
            (Item::Keyed { leader: Some(leader), .. }, None) if !observe => match reasons.get(leader) {
                Some(reason) => bad(
                    item,
                    RecordError::SinkRejected(format!(
                        "the first record of this event in its batch was rejected: {reason}"
                    )),
                ),
                None => item,
            },
            _ => item,
        })
        .collect();
    out
}

/// The endpoints' answers, by claim, to go on the claim rows before they turn done.
pub(super) fn to_record(
    items: &[Item],
    responses: Vec<(usize, EffectResponse)>,
    claimant: &Claimant,
) -> Vec<(EventKey, Position, EffectResponse)> {
    responses
        .into_iter()
        .map(|(i, r)| {
            let e = envelope(&items[i]);
            (e.key.clone(), claim_position(claimant, &e.record.position), r)
        })
        .collect()
}

/// The claims to complete: every new event's still keyed (its effect durable).
pub(super) fn to_complete(items: &[Item], claimant: &Claimant) -> Vec<(EventKey, Position)> {
    items
        .iter()
        .filter_map(|item| match item {
            Item::Keyed { envelope, decision: Some(Decision::New { .. }), .. } => {
                Some((envelope.key.clone(), claim_position(claimant, &envelope.record.position)))
            }
            _ => None,
        })
        .collect()
}

/// What a round writes to the side topics.
pub(super) struct Sides<'a> {
    /// The dead letters: bad records, and conflicts when they are dead-lettered.
    pub(super) dead: Vec<(&'a Record, RecordError)>,
    /// The duplicates, for the duplicates topic when there is one.
    pub(super) dups: Vec<&'a Envelope>,
    /// Dead letters `earlier` found written already: not again.
    pub(super) reconciled: u64,
}

/// The round's side writes; `conflicts_dead_letter`: conflicts go to the dead-letter topic.
pub(super) fn side_writes<'a>(items: &'a [Item], conflicts_dead_letter: bool, earlier: &mut Earlier) -> Sides<'a> {
    let mut sides = Sides { dead: Vec::new(), dups: Vec::new(), reconciled: 0 };
    for item in items {
        let (record, error) = match item {
            Item::Bad { record, error } => (record, error.clone()),
            Item::Keyed { envelope, decision: Some(Decision::Conflict { stored, first }), .. }
                if conflicts_dead_letter =>
            {
                (&envelope.record, RecordError::Conflict { stored: stored.to_string(), first: winner(*first) })
            }
            Item::Keyed { envelope, decision: Some(Decision::Duplicate { .. }), .. } => {
                sides.dups.push(envelope);
                continue;
            }
            _ => continue,
        };
        // Dead-lettered by an owner that died before committing: not again.
        if earlier.dead_lettered(record.position.offset, record.payload.as_deref()) {
            sides.reconciled += 1;
        } else {
            sides.dead.push((record, error));
        }
    }
    sides
}

/// Where and when a conflict's winning copy was claimed, for its dead letter's reason.
fn winner(first: Option<First>) -> String {
    let Some(first) = first else { return "an earlier claim".to_string() };
    let at = chrono::DateTime::from_timestamp_millis(first.claimed_at_ms as i64)
        .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true))
        .unwrap_or_else(|| format!("{} ms since the epoch", first.claimed_at_ms));
    match first.origin {
        Some(origin) => format!("{origin}, claimed at {at}"),
        None => format!("a claim made at {at}"),
    }
}

/// The dead letters to write, each marked when an earlier owner may have written it too.
pub(super) fn dead_letters<'a>(dead: &'a [(&'a Record, RecordError)], earlier: &Earlier) -> Vec<DeadLetter<'a>> {
    dead.iter()
        .map(|(record, error)| DeadLetter { record, error, possible_repeat: earlier.reached(record.position.offset) })
        .collect()
}

/// What a finished round leaves for the counters.
#[derive(Debug, Default, PartialEq, Eq)]
pub(super) struct Remembered {
    /// Records per outcome.
    pub(super) counts: HashMap<Outcome, u64>,
    /// Fresh claims whose key had just expired (window adequacy).
    pub(super) expired_hits: u64,
    /// Duplicates' first claims (ms since the epoch), for their age.
    pub(super) duplicate_firsts: Vec<u64>,
}

/// Teaches the filter what a finished round decided and counts its outcomes.
pub(super) fn remember(items: &[Item], filter: &mut Filter, now: u64) -> Remembered {
    let mut out = Remembered::default();
    for item in items {
        let outcome = Outcome::of(item).expect("every keyed item is decided before it finishes");
        *out.counts.entry(outcome).or_default() += 1;
        let Item::Keyed { envelope, decision: Some(decision), .. } = item else { continue };
        match *decision {
            // The row lives a TTL from its claim; a resumed claim kept an
            // older claim time we do not know here, so it is not cached.
            Decision::New { acquired: Acquired::Resumed, .. } => filter.remember_seen(envelope, now),
            Decision::New { acquired, claimed_at_ms } => {
                if acquired == Acquired::Fresh {
                    // Window adequacy: new only because its key just expired?
                    out.expired_hits += filter.expired_hit(envelope.digest, now);
                }
                filter.remember_claimed(envelope, claimed_at_ms, now);
            }
            // Only a row read back says how long it lives: a duplicate never
            // extends what the cache vouches for.
            Decision::Duplicate { expires_at_ms, first } => {
                filter.remember_duplicate(envelope, expires_at_ms, first, now);
                out.duplicate_firsts.extend(first.map(|f| f.claimed_at_ms));
            }
            Decision::Conflict { .. } => filter.remember_seen(envelope, now),
        }
    }
    out
}

pub(super) fn envelope(item: &Item) -> &Envelope {
    keyed_envelope(item).expect("only keyed items are indexed for the store")
}

fn keyed_envelope(item: &Item) -> Option<&Envelope> {
    match item {
        Item::Keyed { envelope, .. } => Some(envelope),
        Item::Bad { .. } => None,
    }
}

/// What observe mode stamps on a forwarded record.
fn observed(decision: Decision) -> Observed {
    match decision {
        Decision::New { .. } => Observed { duplicate: false, conflict: false, first: None },
        Decision::Duplicate { first, .. } => {
            Observed { duplicate: true, conflict: false, first: first.and_then(|f| f.origin) }
        }
        Decision::Conflict { .. } => Observed { duplicate: false, conflict: true, first: None },
    }
}

fn decision_of(item: &Item) -> Decision {
    match item {
        Item::Keyed { decision: Some(d), .. } => *d,
        _ => unreachable!("leaders are decided before their followers"),
    }
}

fn set_decision(item: &mut Item, d: Option<Decision>) {
    if let Item::Keyed { decision, .. } = item {
        *decision = d;
    }
}

#[cfg(test)]
mod tests;
