//! The plan's steps alone, and in sequence against a model of the store.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use proptest::prelude::*;

use super::*;
use crate::config::Config;
use crate::error::HttpError;
use crate::event::Fingerprint;

const T0: u64 = 1_780_000_000_000;

fn config() -> Config {
    let text = "[kafka]\nbrokers = \"localhost:9092\"\ngroup_id = \"g\"\ntopics = [\"in\"]\n[store]\npath = \"unused\"\n[sink]\nkind = \"custom\"\n[dead_letter]\ntopic = \"dlq\"\n";
    Config::from_toml_with_env(text, "test", std::iter::empty()).unwrap()
}

fn parts() -> (KeyExtractor, Filter) {
    let config = config();
    let filter = Filter::try_new(&config.filter, config.retention.ttl, T0).unwrap();
    (KeyExtractor::new(config.key.clone()), filter)
}

/// A record at `offset` of in/0: event `id` (none: a bad record) with payload version `v`.
fn record(offset: i64, id: Option<&str>, v: u8) -> Record {
    Record {
        position: at(offset),
        key: None,
        payload: Some(format!("{{\"v\":{v}}}").into_bytes()),
        headers: id.map(|id| ("event-id".to_string(), Some(id.as_bytes().to_vec()))).into_iter().collect(),
        timestamp_ms: None,
        bad_header: None,
    }
}

fn at(offset: i64) -> Position {
    Position { topic: Arc::from("in"), partition: 0, offset }
}

fn decisions(items: &[Item]) -> Vec<Option<Outcome>> {
    items.iter().map(Outcome::of).collect()
}

fn fingerprint(items: &[Item], i: usize) -> Fingerprint {
    envelope(&items[i]).fingerprint
}

#[test]
fn the_outcomes_keep_the_order_and_labels_of_the_records_metric() {
    let labels: Vec<&str> = Outcome::ALL.iter().map(|o| o.label()).collect();
    assert_eq!(labels, crate::metrics::OUTCOMES);
}

#[test]
fn later_records_of_a_key_follow_their_leader_as_duplicates_or_conflicts() {
    let (extractor, mut filter) = parts();
    let mut items = keyed(&extractor, vec![record(0, Some("a"), 1), record(1, Some("a"), 1), record(2, Some("a"), 2)]);
    let screened = screen(&mut items, &mut filter, T0);
    assert_eq!(screened.to_claim, vec![0], "only the leader goes to the store");
    let claimed = apply_claims(&mut items, &screened.to_claim, vec![Claim::New(Acquired::Fresh)], T0);
    assert_eq!(claimed.won, vec![(0, Acquired::Fresh)]);
    follow_leaders(&mut items);
    let first = Some(First::new(T0, &at(0)));
    assert!(matches!(items[1], Item::Keyed { decision: Some(Decision::Duplicate { first: f, .. }), .. } if f == first));
    let stored = fingerprint(&items, 0);
    assert!(
        matches!(items[2], Item::Keyed { decision: Some(Decision::Conflict { stored: s, first: f }), .. } if s == stored && f == first),
        "a follower with another payload conflicts with its leader, claimed at offset 0"
    );
}

#[test]
fn a_leader_found_in_conflict_passes_the_stored_fingerprint_and_its_winner_to_its_followers() {
    let (extractor, mut filter) = parts();
    let mut items = keyed(&extractor, vec![record(3, Some("a"), 2), record(4, Some("a"), 1)]);
    let screened = screen(&mut items, &mut filter, T0);
    let winner = Position { topic: Arc::from("other"), partition: 2, offset: 9 };
    let answer = Claim::Conflict { stored: Fingerprint(7), first: winner.clone(), claimed_at_ms: T0 - 5 };
    apply_claims(&mut items, &screened.to_claim, vec![answer], T0);
    follow_leaders(&mut items);
    let first = Some(First::new(T0 - 5, &winner));
    for (i, item) in items.iter().enumerate() {
        assert!(
            matches!(item, Item::Keyed { decision: Some(Decision::Conflict { stored: Fingerprint(7), first: f }), .. } if *f == first),
            "item {i}"
        );
    }
}

#[test]
fn a_conflicts_dead_letter_names_where_and_when_the_winning_copy_was_claimed() {
    let (extractor, mut filter) = parts();
    let mut items = keyed(&extractor, vec![record(5, Some("a"), 2)]);
    let screened = screen(&mut items, &mut filter, T0);
    let winner = Position { topic: Arc::from("other"), partition: 2, offset: 9 };
    let answer = Claim::Conflict { stored: Fingerprint(7), first: winner, claimed_at_ms: 1_764_900_000_123 };
    apply_claims(&mut items, &screened.to_claim, vec![answer], T0);
    let sides = side_writes(&items, true, &mut Earlier::default());
    assert_eq!(sides.dead.len(), 1);
    let reason = sides.dead[0].1.to_string();
    assert!(reason.contains("by other/2/9, claimed at 2025-12-05T02:00:00.123Z"), "{reason}");
    // Observe mode (or on_conflict = "skip") writes no dead letter for it.
    assert!(side_writes(&items, false, &mut Earlier::default()).dead.is_empty());
}

#[test]
fn set_aside_defers_a_waiting_leader_with_its_followers_and_remaps_leaders_in_each_half() {
    let (extractor, mut filter) = parts();
    let records = vec![record(0, Some("a"), 1), record(1, Some("b"), 1), record(2, None, 1), record(3, Some("a"), 1)];
    let mut items = keyed(&extractor, records);
    let screened = screen(&mut items, &mut filter, T0);
    assert_eq!(screened.to_claim, vec![0, 1]);
    let holder = Position { topic: Arc::from("in"), partition: 1, offset: 0 };
    let answers = vec![Claim::InFlight { holder, lease_until_ms: T0 + 1 }, Claim::New(Acquired::Fresh)];
    let claimed = apply_claims(&mut items, &screened.to_claim, answers, T0);
    let waiting: Vec<usize> = claimed.waiting.iter().map(|(i, _)| *i).collect();
    assert_eq!(waiting, vec![0]);
    let (ready, later) = set_aside(items, &waiting);
    let offsets = |items: &[Item]| items.iter().map(|i| i.record().position.offset).collect::<Vec<_>>();
    assert_eq!((offsets(&ready), offsets(&later)), (vec![1, 2], vec![0, 3]));
    assert!(matches!(later[1], Item::Keyed { leader: Some(0), .. }), "the follower points at its leader's new place");
    assert_eq!(leaders(&later), vec![0]);
}

#[test]
fn suspects_the_store_found_done_are_decided_and_the_rest_go_to_the_claim() {
    let (extractor, _) = parts();
    let mut items = keyed(&extractor, vec![record(0, Some("a"), 1), record(1, Some("b"), 1), record(2, Some("c"), 1)]);
    let mut screened = Screened { to_claim: vec![], suspects: vec![0, 1, 2], recent: vec![] };
    let row = |state, fingerprint| ClaimRow {
        state,
        fingerprint,
        position: at(40),
        claimed_at_ms: T0,
        lease_until_ms: T0,
        expires_at_ms: T0 + 1000,
    };
    let rows = vec![
        Some(row(ClaimState::Done, fingerprint(&items, 0))),
        Some(row(ClaimState::InFlight, Fingerprint(0))),
        None,
    ];
    assert_eq!(screened.apply_lookups(&mut items, rows), 1, "one key the store does not know: a false positive");
    assert_eq!(screened.to_claim, vec![1, 2]);
    assert_eq!(decisions(&items), vec![Some(Outcome::Duplicate), None, None]);
}

#[test]
fn a_refused_effect_dead_letters_its_followers_and_releases_only_a_claim_that_cannot_have_landed() {
    let (extractor, mut filter) = parts();
    let records =
        vec![record(0, Some("a"), 1), record(1, Some("b"), 1), record(2, Some("a"), 1), record(3, Some("b"), 1)];
    let mut items = keyed(&extractor, records);
    let screened = screen(&mut items, &mut filter, T0);
    apply_claims(&mut items, &screened.to_claim, vec![Claim::New(Acquired::Fresh); 2], T0);
    follow_leaders(&mut items);
    let (pending, emitted) = pending_effects(&items, false, &mut Earlier::default());
    assert_eq!((pending.clone(), emitted), (vec![0, 1], vec![]));
    let landed = SinkError::Http(HttpError::Refused { status: 500, excerpt: String::new(), may_have_landed: true });
    let rejected = vec![(0, SinkError::permanent("no")), (1, landed)];
    let out = apply_rejections(&mut items, rejected, false, &Claimant::Position);
    assert_eq!(out.unheld.len(), 2, "neither claim is renewed any more");
    assert_eq!(
        out.release.iter().map(|(_, p)| p.offset).collect::<Vec<_>>(),
        vec![0],
        "one that may have landed is kept"
    );
    assert_eq!(decisions(&items), vec![Some(Outcome::DeadLetter); 4]);
    assert!(to_complete(&items, &Claimant::Position).is_empty());
    let Item::Bad { error, .. } = &items[2] else { unreachable!() };
    assert!(error.to_string().contains("the first record of this event in its batch was rejected: "), "{error}");
}

#[test]
fn an_effect_found_in_the_output_for_the_same_event_is_only_completed_and_one_for_another_event_runs() {
    let (extractor, mut filter) = parts();
    let mut items = keyed(&extractor, vec![record(0, Some("a"), 1), record(1, Some("b"), 1)]);
    let screened = screen(&mut items, &mut filter, T0);
    apply_claims(&mut items, &screened.to_claim, vec![Claim::New(Acquired::Resumed); 2], T0);
    let mut earlier = Earlier::default();
    earlier.emitted.insert(0, crate::sink::event_identity(b"a"));
    earlier.emitted.insert(1, crate::sink::event_identity(b"someone else"));
    let (pending, emitted) = pending_effects(&items, false, &mut earlier);
    assert_eq!((pending, emitted), (vec![1], vec![0]));
    assert!(earlier.is_empty(), "each write found is met once");
    assert_eq!(resumed_up_to(&items), Some(1));
}

/// An in-memory store that answers as `store::decide` does, with other owners
/// holding some keys in flight for a few rounds before they finish or release them.
#[derive(Default)]
struct Model {
    rows: HashMap<Vec<u8>, ClaimRow>,
    /// Keys other owners hold: rounds left, then Some(fingerprint) done or None released.
    elsewhere: HashMap<Vec<u8>, (u8, Option<Fingerprint>)>,
    effects: HashSet<i64>,
    dead_letters: HashSet<i64>,
}

impl Model {
    fn claim(&mut self, requests: &[ClaimRequest], now: u64) -> Vec<Claim> {
        requests
            .iter()
            .map(|r| {
                let row = self.rows.get(&r.key.id);
                // Our own claims left unfinished (an effect that may have landed) lapse at once here.
                let ours = row.is_some_and(|row| row.state == ClaimState::InFlight && &*row.position.topic == "in");
                let answer = if ours { Claim::New(Acquired::TakenOver) } else { crate::store::decide(row, r, now, 0) };
                if let Claim::New(_) = answer {
                    self.rows.insert(r.key.id.clone(), self.row(ClaimState::InFlight, r.fingerprint, &r.position, now));
                }
                answer
            })
            .collect()
    }

    fn row(&self, state: ClaimState, fingerprint: Fingerprint, position: &Position, now: u64) -> ClaimRow {
        ClaimRow {
            state,
            fingerprint,
            position: position.clone(),
            claimed_at_ms: now,
            lease_until_ms: u64::MAX,
            expires_at_ms: u64::MAX,
        }
    }

    fn lookup(&self, keys: &[EventKey]) -> Vec<Option<ClaimRow>> {
        keys.iter().map(|k| self.rows.get(&k.id).cloned()).collect()
    }

    /// Other owners move on: a held key finishes or is released when its rounds run out.
    fn tick(&mut self, now: u64) {
        let ended: Vec<_> = self
            .elsewhere
            .iter_mut()
            .filter_map(|(k, (n, end))| {
                *n = n.saturating_sub(1);
                (*n == 0).then(|| (k.clone(), *end))
            })
            .collect();
        for (key, end) in ended {
            self.elsewhere.remove(&key);
            match end {
                Some(fp) => {
                    let row = self.row(
                        ClaimState::Done,
                        fp,
                        &Position { topic: Arc::from("other"), partition: 0, offset: 0 },
                        now,
                    );
                    self.rows.insert(key, row);
                }
                None => drop(self.rows.remove(&key)),
            }
        }
    }
}

/// One generated record: event ID (None: bad), payload version, and whether the sink
/// refuses its effect (and if so, whether the refused effect may have landed).
type Gen = (Option<u8>, u8, bool, bool);

/// Runs one batch through the plan's steps as `Core` does, the model standing in for
/// the store and the sink; returns the records finished, with their outcomes, in order.
fn run_batch(
    model: &mut Model,
    extractor: &KeyExtractor,
    filter: &mut Filter,
    records: Vec<(Record, bool, bool)>,
    now: u64,
) -> Vec<(Record, Outcome, bool)> {
    let refusals: HashMap<i64, (bool, bool)> =
        records.iter().map(|(r, refuse, landed)| (r.position.offset, (*refuse, *landed))).collect();
    let mut items = keyed(extractor, records.into_iter().map(|(r, _, _)| r).collect());
    let mut screened = screen(&mut items, filter, now);
    if screened.marker(&items).is_some() && !filter.note_releases(None) {
        screened.distrust_recent(&mut items);
    }
    if !screened.suspects.is_empty() {
        let rows = model.lookup(&screened.suspect_keys(&items));
        screened.apply_lookups(&mut items, rows);
    }
    let (mut to_claim, mut finished, mut earlier) = (screened.to_claim, Vec::new(), Earlier::default());
    for round in 0.. {
        assert!(round < 50, "a batch's rounds end once other owners finish");
        let answers = model.claim(&claim_requests(&items, &to_claim, &Claimant::Position), now);
        let claimed = apply_claims(&mut items, &to_claim, answers, now);
        let waiting: Vec<usize> = claimed.waiting.iter().map(|(i, _)| *i).collect();
        let (mut ready, later) = set_aside(items, &waiting);
        follow_leaders(&mut ready);
        let (pending, _) = pending_effects(&ready, false, &mut earlier);
        let mut rejected = Vec::new();
        for &i in &pending {
            let offset = ready[i].record().position.offset;
            match refusals[&offset] {
                (true, landed) => rejected.push((
                    i,
                    SinkError::Http(HttpError::Refused {
                        status: 500,
                        excerpt: String::new(),
                        may_have_landed: landed,
                    }),
                )),
                (false, _) => drop(model.effects.insert(offset)),
            }
        }
        let out = apply_rejections(&mut ready, rejected, false, &Claimant::Position);
        for (key, _) in &out.release {
            model.rows.remove(&key.id);
        }
        out.forget.iter().for_each(|d| filter.forget(*d));
        for (key, position) in to_complete(&ready, &Claimant::Position) {
            let row = model.rows.get_mut(&key.id).expect("a claim won is in the store");
            assert_eq!(row.position, position);
            row.state = ClaimState::Done;
        }
        let sides = side_writes(&ready, true, &mut earlier);
        model.dead_letters.extend(sides.dead.iter().map(|(r, _)| r.position.offset));
        let counted: u64 = remember(&ready, filter, now).counts.values().sum();
        assert_eq!(counted as usize, ready.len(), "each finished record has one outcome");
        for item in ready {
            let outcome = Outcome::of(&item).expect("decided");
            let follower = matches!(item, Item::Keyed { leader: Some(_), .. });
            finished.push((item.record().clone(), outcome, follower));
        }
        if later.is_empty() {
            break;
        }
        items = later;
        to_claim = leaders(&items);
        model.tick(now);
    }
    finished
}

fn id_of(record: &Record) -> Option<Vec<u8>> {
    record.headers.iter().find(|(k, _)| k == "event-id").and_then(|(_, v)| v.clone())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// The plan against a model store, with repeated keys in and across batches, payloads
    /// that conflict, keys done before the run or held by other owners for a few rounds,
    /// and effects the sink refuses:
    /// - a key is New at most once;
    /// - a record that follows its batch's leader is never New;
    /// - the outcomes sum to the records;
    /// - an offset finishes only once its effect, its decision or its dead letter is durable.
    #[test]
    fn the_plan_decides_each_key_once_and_finishes_only_durable_records(
        batches in prop::collection::vec(prop::collection::vec((prop::option::weighted(0.9, 0u8..5), 0u8..2, prop::bool::weighted(0.15), any::<bool>()), 1..8), 1..5),
        done_before in prop::collection::vec((0u8..5, 0u8..2), 0..3),
        elsewhere in prop::collection::vec((0u8..5, 1u8..4, prop::option::of(0u8..2)), 0..3),
    ) {
        let (extractor, mut filter) = parts();
        let fp = |v: u8| extractor.extract(record(0, Some("x"), v)).unwrap().fingerprint;
        let mut model = Model::default();
        for (id, v) in done_before {
            let row = model.row(ClaimState::Done, fp(v), &Position { topic: Arc::from("old"), partition: 0, offset: 0 }, T0 - 10);
            model.rows.insert(format!("k{id}").into_bytes(), row);
        }
        for (id, rounds, end) in elsewhere {
            let key = format!("k{id}").into_bytes();
            if model.rows.contains_key(&key) {
                continue;
            }
            let row = model.row(ClaimState::InFlight, fp(end.unwrap_or(0)), &Position { topic: Arc::from("other"), partition: 0, offset: 0 }, T0 - 10);
            model.rows.insert(key.clone(), row);
            model.elsewhere.insert(key, (rounds, end.map(fp)));
        }
        let (mut offset, mut total, mut finished) = (0i64, 0usize, Vec::new());
        for (n, batch) in batches.into_iter().enumerate() {
            let records: Vec<(Record, bool, bool)> = batch
                .into_iter()
                .map(|(id, v, refuse, landed): Gen| {
                    offset += 1;
                    (record(offset, id.map(|id| format!("k{id}")).as_deref(), v), refuse, landed)
                })
                .collect();
            total += records.len();
            finished.extend(run_batch(&mut model, &extractor, &mut filter, records, T0 + n as u64));
        }
        prop_assert_eq!(finished.len(), total, "outcomes sum to the records");
        let offsets: HashSet<i64> = finished.iter().map(|(r, _, _)| r.position.offset).collect();
        prop_assert_eq!(offsets.len(), total, "each record finishes once");
        let mut new_keys = HashSet::new();
        for (record, outcome, follower) in &finished {
            let offset = record.position.offset;
            prop_assert!(!(*follower && *outcome == Outcome::New), "follower at {} is New", offset);
            let row = id_of(record).and_then(|id| model.rows.get(&id).cloned());
            let fingerprint = extractor.extract(record.clone()).ok().map(|e| e.fingerprint);
            match outcome {
                Outcome::New => {
                    prop_assert!(new_keys.insert(id_of(record)), "key of offset {} New twice", offset);
                    prop_assert!(model.effects.contains(&offset), "New at {} without its effect", offset);
                    let row = row.expect("a New key has a row");
                    prop_assert_eq!(row.state, ClaimState::Done);
                    prop_assert_eq!(row.position.offset, offset);
                }
                Outcome::Duplicate => {
                    let row = row.expect("a duplicate's key has a row");
                    prop_assert_eq!(row.state, ClaimState::Done, "duplicate at {} of a key not done", offset);
                    prop_assert_eq!(Some(row.fingerprint), fingerprint);
                }
                Outcome::Conflict => {
                    prop_assert!(model.dead_letters.contains(&offset), "conflict at {} not dead-lettered", offset);
                    let row = row.expect("a conflict's key has a row");
                    prop_assert_eq!(row.state, ClaimState::Done);
                    prop_assert_ne!(Some(row.fingerprint), fingerprint);
                }
                Outcome::DeadLetter => prop_assert!(model.dead_letters.contains(&offset), "dead letter at {} not written", offset),
            }
        }
    }
}
