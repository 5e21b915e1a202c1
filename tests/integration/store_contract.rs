//! The contract of `DedupStore`, run against every reachable backend: the
//! embedded store always, PostgreSQL when KDEDUP_TEST_POSTGRES holds a URL,
//! the CQL store on Apache Cassandra when KDEDUP_TEST_CASSANDRA holds a node's
//! host:port (`scripts/services up` starts one) and on ScyllaDB when
//! KDEDUP_TEST_SCYLLA does (each test then gets a keyspace of its own, dropped
//! at its end, since a sweep is table-wide).

use std::sync::Arc;
use std::time::Duration;

use std::collections::BTreeMap;
use std::num::{NonZeroU32, NonZeroUsize};

use kdedup::config::{Retention, ScyllaConfig, ScyllaConsistency, ScyllaSerialConsistency, StoreConfig};
use kdedup::event::{EventKey, Fingerprint, Position};
use kdedup::store::{
    mark_released, now_ms, release_marker, Acquired, Claim, ClaimRequest, ClaimState, DedupStore, Released, Store,
};

use crate::utils::CqlKeyspace;

const TTL_MS: u64 = 100_000;
const LEASE_MS: u64 = 10_000;
const T0: u64 = 1_700_000_000_000;

fn retention() -> Retention {
    Retention {
        ttl: Duration::from_millis(TTL_MS),
        lease: Duration::from_millis(LEASE_MS),
        sweep_interval: Duration::from_secs(60),
    }
}

/// One backend under test, with a scope of its own so tests sharing a server
/// never see each other's keys.
struct Backend {
    name: &'static str,
    store: Store,
    scope: Arc<str>,
    _dir: Option<tempfile::TempDir>,
    _keyspace: Option<CqlKeyspace>,
}

/// The CQL servers under test: (backend name, its host:port, its datacenter).
fn cql_servers() -> Vec<(&'static str, String, String)> {
    let mut servers = Vec::new();
    // A node started by scripts/services: SimpleSnitch's datacenter.
    if let Some(contact_point) = crate::utils::cassandra("store contract on cassandra") {
        servers.push(("cassandra", contact_point, "datacenter1".to_string()));
    }
    match std::env::var("KDEDUP_TEST_SCYLLA") {
        Ok(contact_point) => {
            let datacenter = std::env::var("KDEDUP_TEST_SCYLLA_DC").unwrap_or_else(|_| "datacenter1".into());
            servers.push(("scylla", contact_point, datacenter));
        }
        Err(_) => eprintln!(
            "store contract: scylla skipped: KDEDUP_TEST_SCYLLA is not set (give a node's host:port, e.g. \
             KDEDUP_TEST_SCYLLA=127.0.0.1:9042, and KDEDUP_TEST_SCYLLA_DC if its datacenter is not datacenter1)"
        ),
    }
    servers
}

/// A store on a keyspace of its own (the guard drops it), the schema not yet applied.
fn cql_store(contact_point: &str, datacenter: &str) -> (Store, CqlKeyspace) {
    let keyspace = CqlKeyspace::new(contact_point, datacenter);
    let datacenter = datacenter.to_string();
    let config = ScyllaConfig {
        contact_points: vec![contact_point.to_string()],
        local_datacenter: datacenter.clone(),
        keyspace: keyspace.name.clone(),
        replication: BTreeMap::from([(datacenter, NonZeroU32::MIN)]),
        consistency: ScyllaConsistency::LocalQuorum,
        serial_consistency: ScyllaSerialConsistency::LocalSerial,
        request_timeout: Duration::from_secs(10),
        connect_timeout: Duration::from_secs(5),
        max_in_flight: NonZeroUsize::new(64).expect("64 is not zero"),
        tls: None,
        credentials: None,
    };
    (Store::open(&StoreConfig::Scylla(Box::new(config)), &retention()).unwrap(), keyspace)
}

impl Backend {
    fn key(&self, id: &str) -> EventKey {
        EventKey { scope: self.scope.clone(), id: id.as_bytes().to_vec() }
    }

    fn req(&self, id: &str, fp: u128, position: Position) -> ClaimRequest {
        ClaimRequest { key: self.key(id), fingerprint: Fingerprint(fp), position }
    }
}

/// Every backend reachable from here: embedded always, PostgreSQL when
/// KDEDUP_TEST_POSTGRES holds a URL (scripts/test starts one and sets it).
async fn backends() -> Vec<Backend> {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(&StoreConfig::Embedded { path: dir.path().to_path_buf() }, &retention()).unwrap();
    let mut all =
        vec![Backend { name: "embedded", store, scope: Arc::from("contract"), _dir: Some(dir), _keyspace: None }];
    match std::env::var("KDEDUP_TEST_POSTGRES") {
        Ok(url) => {
            let store = Store::open(
                &StoreConfig::Postgres { url: url.into(), pool_size: 8, tls: Default::default() },
                &retention(),
            )
            .unwrap();
            store.apply_schema().await.expect("PostgreSQL at KDEDUP_TEST_POSTGRES answers");
            all.push(Backend {
                name: "postgres",
                store,
                scope: Arc::from(crate::utils::unique("contract")),
                _dir: None,
                _keyspace: None,
            });
        }
        Err(_) => eprintln!("store contract: postgres skipped: KDEDUP_TEST_POSTGRES is not set (scripts/test sets it)"),
    }
    for (name, contact_point, datacenter) in cql_servers() {
        let (store, cleanup) = cql_store(&contact_point, &datacenter);
        store.apply_schema().await.unwrap_or_else(|e| panic!("{name} at {contact_point} accepts the schema: {e}"));
        all.push(Backend {
            name,
            store,
            scope: Arc::from(crate::utils::unique("contract")),
            _dir: None,
            _keyspace: Some(cleanup),
        });
    }
    all
}

fn at(partition: i32, offset: i64) -> Position {
    Position { topic: Arc::from("t"), partition, offset }
}

async fn claim1(store: &Store, r: ClaimRequest, now: u64) -> Claim {
    store.claim(vec![r], now).await.unwrap().pop().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn new_then_duplicate_then_conflict() {
    for b in backends().await {
        let (name, store) = (b.name, &b.store);
        assert_eq!(claim1(store, b.req("k", 1, at(0, 1)), T0).await, Claim::New(Acquired::Fresh), "{name}");
        assert!(store.complete(vec![(b.key("k"), at(0, 1))], T0).await.unwrap()[0], "{name}");
        // A duplicate names its first occurrence and when it was claimed (its age, observe mode's stamp).
        assert_eq!(
            claim1(store, b.req("k", 1, at(1, 9)), T0 + 1).await,
            Claim::Duplicate { first: at(0, 1), claimed_at_ms: T0 },
            "{name}"
        );
        assert_eq!(
            claim1(store, b.req("k", 2, at(1, 10)), T0 + 2).await,
            Claim::Conflict { stored: Fingerprint(1), first: at(0, 1), claimed_at_ms: T0 },
            "{name}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_repeated_in_one_batch_sees_the_first_claim() {
    for b in backends().await {
        let (name, store) = (b.name, &b.store);
        let answers = store.claim(vec![b.req("k", 1, at(0, 1)), b.req("k", 1, at(0, 2))], T0).await.unwrap();
        assert_eq!(answers[0], Claim::New(Acquired::Fresh), "{name}");
        assert!(matches!(answers[1], Claim::InFlight { .. }), "{name}: {:?}", answers[1]);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_claims_of_one_key_yield_exactly_one_new() {
    for b in backends().await {
        let (name, store) = (b.name, &b.store);
        let tasks: Vec<_> = (0..16)
            .map(|i| {
                let store = store.clone();
                let request = b.req("hot", 1, at(i, i as i64));
                tokio::spawn(async move { claim1(&store, request, T0).await })
            })
            .collect();
        let mut new = 0;
        for t in tasks {
            if matches!(t.await.unwrap(), Claim::New { .. }) {
                new += 1;
            }
        }
        assert_eq!(new, 1, "{name}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn live_lease_blocks_others_then_lapses_and_is_taken_over_one_lease_later() {
    for b in backends().await {
        let (name, store) = (b.name, &b.store);
        claim1(store, b.req("k", 1, at(0, 1)), T0).await;
        let other = claim1(store, b.req("k", 1, at(1, 5)), T0 + LEASE_MS - 1).await;
        assert_eq!(other, Claim::InFlight { holder: at(0, 1), lease_until_ms: T0 + LEASE_MS }, "{name}");
        // Lapsed, but its own partition's next owner gets one more lease to resume it.
        let other = claim1(store, b.req("k", 1, at(1, 5)), T0 + 2 * LEASE_MS - 1).await;
        assert_eq!(other, Claim::InFlight { holder: at(0, 1), lease_until_ms: T0 + LEASE_MS }, "{name}");
        let later = T0 + 2 * LEASE_MS;
        assert_eq!(claim1(store, b.req("k", 1, at(1, 5)), later).await, Claim::New(Acquired::TakenOver), "{name}");
        // The first owner lost its claim: its completion is refused.
        assert_eq!(store.complete(vec![(b.key("k"), at(0, 1))], later + 1).await.unwrap(), vec![false], "{name}");
        assert_eq!(store.complete(vec![(b.key("k"), at(1, 5))], later + 1).await.unwrap(), vec![true], "{name}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_renewed_lease_is_not_taken_over_and_only_its_holder_renews() {
    for b in backends().await {
        let (name, store) = (b.name, &b.store);
        claim1(store, b.req("k", 1, at(0, 1)), T0).await;
        // The holder's heartbeat, just before the lease would lapse.
        let renewed_at = T0 + LEASE_MS - 1;
        assert_eq!(store.renew(vec![(b.key("k"), at(0, 1))], renewed_at).await.unwrap(), vec![true], "{name}");
        assert_eq!(
            store.renew(vec![(b.key("k"), at(5, 5))], renewed_at).await.unwrap(),
            vec![false],
            "{name}: not the holder"
        );
        // Past the first lease, within the renewed one: still in flight for everyone else.
        let other = claim1(store, b.req("k", 1, at(1, 5)), T0 + LEASE_MS + 1).await;
        assert_eq!(other, Claim::InFlight { holder: at(0, 1), lease_until_ms: renewed_at + LEASE_MS }, "{name}");
        // Without another heartbeat it lapses, is taken over, and the old holder can renew no more.
        let later = renewed_at + 2 * LEASE_MS;
        assert_eq!(claim1(store, b.req("k", 1, at(1, 5)), later).await, Claim::New(Acquired::TakenOver), "{name}");
        assert_eq!(store.renew(vec![(b.key("k"), at(0, 1))], later + 1).await.unwrap(), vec![false], "{name}");
        assert!(store.complete(vec![(b.key("k"), at(1, 5))], later + 1).await.unwrap()[0], "{name}");
        // A done row is not in flight: nothing to renew.
        assert_eq!(store.renew(vec![(b.key("k"), at(1, 5))], later + 2).await.unwrap(), vec![false], "{name}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redelivery_of_the_same_position_resumes_its_own_claim() {
    for b in backends().await {
        let (name, store) = (b.name, &b.store);
        claim1(store, b.req("k", 1, at(3, 42)), T0).await;
        assert_eq!(claim1(store, b.req("k", 1, at(3, 42)), T0 + 1).await, Claim::New(Acquired::Resumed), "{name}");
        store.complete(vec![(b.key("k"), at(3, 42))], T0 + 2).await.unwrap();
        assert_eq!(
            claim1(store, b.req("k", 1, at(3, 42)), T0 + 3).await,
            Claim::Duplicate { first: at(3, 42), claimed_at_ms: T0 },
            "{name}: done is done, and resuming kept the first claim's clock"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn release_frees_the_key_and_forget_deletes_it() {
    for b in backends().await {
        let (name, store) = (b.name, &b.store);
        claim1(store, b.req("k", 1, at(0, 1)), T0).await;
        store.release(vec![(b.key("k"), at(9, 9))]).await.unwrap(); // not the holder: no effect
        assert!(store.lookup(vec![b.key("k")], T0).await.unwrap()[0].is_some(), "{name}");
        store.release(vec![(b.key("k"), at(0, 1))]).await.unwrap();
        assert_eq!(store.lookup(vec![b.key("k")], T0).await.unwrap(), vec![None], "{name}");
        assert_eq!(claim1(store, b.req("k", 1, at(1, 2)), T0 + 1).await, Claim::New(Acquired::Fresh), "{name}");
        store.complete(vec![(b.key("k"), at(1, 2))], T0 + 1).await.unwrap();
        let row = store.lookup(vec![b.key("k")], T0 + 2).await.unwrap().pop().unwrap().unwrap();
        assert_eq!(row.state, ClaimState::Done, "{name}");
        assert!(store.forget(b.key("k")).await.unwrap(), "{name}");
        assert!(!store.forget(b.key("k")).await.unwrap(), "{name}");
        assert_eq!(claim1(store, b.req("k", 1, at(1, 3)), T0 + 3).await, Claim::New(Acquired::Fresh), "{name}");
    }
}

/// A replay's release: a live owner's in-flight claim and a row claimed since
/// the cut-off are kept (and said so); a lapsed claim and a done row go.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replays_release_keeps_live_claims_and_newer_rows() {
    for b in backends().await {
        let (name, store) = (b.name, &b.store);
        let cut = T0 + 10;
        claim1(store, b.req("live", 1, at(0, 1)), T0).await;
        let kept = store.release_unless_live(b.key("live"), T0 + 1, cut).await.unwrap();
        assert!(matches!(&kept, Released::Live(row) if row.position == at(0, 1)), "{name}: {kept:?}");
        let row = store.lookup(vec![b.key("live")], T0 + 1).await.unwrap().pop().unwrap();
        assert_eq!(row.map(|r| r.state), Some(ClaimState::InFlight), "{name}: the live claim is still there");
        // Its lease lapsed, and the takeover's grace (one lease) too: released.
        let lapsed = T0 + 2 * LEASE_MS;
        assert_eq!(store.release_unless_live(b.key("live"), lapsed, cut).await.unwrap(), Released::Deleted, "{name}");
        assert_eq!(store.lookup(vec![b.key("live")], lapsed).await.unwrap(), vec![None], "{name}");

        claim1(store, b.req("done", 1, at(0, 2)), T0).await;
        store.complete(vec![(b.key("done"), at(0, 2))], T0).await.unwrap();
        claim1(store, b.req("newer", 1, at(0, 3)), cut).await;
        store.complete(vec![(b.key("newer"), at(0, 3))], cut).await.unwrap();
        let kept = store.release_unless_live(b.key("newer"), cut + 1, cut).await.unwrap();
        assert!(matches!(kept, Released::Newer(_)), "{name}: claimed at the cut-off is kept: {kept:?}");
        assert_eq!(store.release_unless_live(b.key("done"), cut + 1, cut).await.unwrap(), Released::Deleted, "{name}");
        assert_eq!(store.release_unless_live(b.key("done"), cut + 1, cut).await.unwrap(), Released::Absent, "{name}");
        assert_eq!(claim1(store, b.req("done", 1, at(1, 2)), cut + 2).await, Claim::New(Acquired::Fresh), "{name}");

        // The release marker (an empty event ID) is a row like any other, and changes with each mark.
        let marker = || async { store.lookup(vec![release_marker(&b.scope)], now_ms()).await.unwrap().pop().unwrap() };
        assert_eq!(marker().await, None, "{name}");
        mark_released(store, &b.scope, now_ms()).await.unwrap();
        let first = marker().await.expect("marked");
        mark_released(store, &b.scope, now_ms()).await.unwrap();
        let second = marker().await.expect("marked");
        assert_ne!(first.fingerprint, second.fingerprint, "{name}");
        if !matches!(name, "scylla" | "cassandra") {
            // Not an event: the scope's key counts leave it out (the rows above,
            // claimed at T0, have expired by the clock's now).
            let census = store.census(&b.scope, now_ms()).await.unwrap();
            assert_eq!((census.done, census.in_flight), (0, 0), "{name}: {census:?}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ttl_expiry_counts_at_once_and_sweep_removes() {
    for b in backends().await {
        let (name, store) = (b.name, &b.store);
        claim1(store, b.req("k", 1, at(0, 1)), T0).await;
        store.complete(vec![(b.key("k"), at(0, 1))], T0).await.unwrap();
        assert_eq!(
            claim1(store, b.req("k", 1, at(0, 2)), T0 + TTL_MS - 1).await,
            Claim::Duplicate { first: at(0, 1), claimed_at_ms: T0 },
            "{name}"
        );
        assert_eq!(store.lookup(vec![b.key("k")], T0 + TTL_MS).await.unwrap(), vec![None], "{name}");
        // Other tests' rows may share a server and expire too: at least ours went.
        assert!(store.sweep(T0 + TTL_MS).await.unwrap() >= 1, "{name}");
        // Gone from storage, not just hidden: asked as of before its expiry, the key is unknown.
        assert_eq!(
            claim1(store, b.req("k", 1, at(0, 3)), T0 + TTL_MS - 2).await,
            Claim::New(Acquired::Fresh),
            "{name}"
        );
    }
}

/// The Bloom route on ScyllaDB: a lookup is a plain read, a claim a Paxos
/// round, and each is counted apart (only backends with statement metrics).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lookups_and_lightweight_transactions_are_counted_apart() {
    for b in backends().await {
        let (name, store) = (b.name, &b.store);
        let Some(ops) = store.op_metrics() else { continue };
        let kind = store.kind();
        assert_eq!(store.lookup(vec![b.key("k")], T0).await.unwrap(), vec![None], "{name}");
        assert_eq!(claim1(store, b.req("k", 1, at(0, 1)), T0).await, Claim::New(Acquired::Fresh), "{name}");
        assert!(matches!(claim1(store, b.req("k", 1, at(0, 2)), T0).await, Claim::InFlight { .. }), "{name}");
        assert_eq!(ops.count(kind, "read", "ok"), 1, "{name}: one plain read");
        assert_eq!(ops.count(kind, "insert", "applied"), 1, "{name}");
        assert_eq!(
            ops.count(kind, "insert", "not_applied"),
            1,
            "{name}: the rejected row answered, no second round trip"
        );
        assert_eq!(ops.count(kind, "serial_read", "ok"), 0, "{name}");
        assert_eq!(store.stats().round_trips, 3, "{name}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_recorded_response_lives_with_its_claim_and_a_new_claim_clears_it() {
    let response = |status: u16| kdedup::store::EffectResponse {
        status,
        body_sha256: "ab".repeat(32),
        body_bytes: 12,
        excerpt: r#"{"id":"ch_1"}"#.into(),
        at_ms: T0,
        attempts: 2,
        headers: vec![("content-type".into(), "application/json".into())],
        body_base64: Some("eyJpZCI6ImNoXzEifQ==".into()),
    };
    for b in backends().await {
        let (name, store) = (b.name, &b.store);
        claim1(store, b.req("k", 1, at(0, 1)), T0).await;
        let other = store.record(vec![(b.key("k"), at(5, 5), response(500))]).await.unwrap();
        assert_eq!(other, vec![false], "{name}: only the holder records");
        assert_eq!(store.response(b.key("k"), T0).await.unwrap(), None, "{name}");
        let held = store.record(vec![(b.key("k"), at(0, 1), response(200))]).await.unwrap();
        assert_eq!(held, vec![true], "{name}");
        // Resuming one's own claim keeps it; completing keeps it.
        assert_eq!(claim1(store, b.req("k", 1, at(0, 1)), T0 + 1).await, Claim::New(Acquired::Resumed), "{name}");
        store.complete(vec![(b.key("k"), at(0, 1))], T0 + 1).await.unwrap();
        assert_eq!(store.response(b.key("k"), T0 + 2).await.unwrap(), Some(response(200)), "{name}");
        // It expires with the row, and a fresh claim after expiry starts without it.
        assert_eq!(store.response(b.key("k"), T0 + TTL_MS).await.unwrap(), None, "{name}: expired");
        let later = T0 + TTL_MS + 1;
        assert_eq!(claim1(store, b.req("k", 1, at(1, 2)), later).await, Claim::New(Acquired::Fresh), "{name}");
        assert_eq!(store.response(b.key("k"), later).await.unwrap(), None, "{name}: a new claim's own answer only");
        // A released claim takes its answer with it.
        store.record(vec![(b.key("k"), at(1, 2), response(201))]).await.unwrap();
        store.release(vec![(b.key("k"), at(1, 2))]).await.unwrap();
        claim1(store, b.req("k", 1, at(1, 3)), later).await;
        assert_eq!(store.response(b.key("k"), later).await.unwrap(), None, "{name}: released");
        // A lapsed claim taken over: the new owner's completion carries no old answer.
        store.record(vec![(b.key("k"), at(1, 3), response(202))]).await.unwrap();
        let taken = later + 2 * LEASE_MS;
        assert_eq!(claim1(store, b.req("k", 1, at(2, 1)), taken).await, Claim::New(Acquired::TakenOver), "{name}");
        assert_eq!(store.record(vec![(b.key("k"), at(1, 3), response(203))]).await.unwrap(), vec![false], "{name}");
        assert!(store.complete(vec![(b.key("k"), at(2, 1))], taken).await.unwrap()[0], "{name}");
        assert_eq!(store.response(b.key("k"), taken).await.unwrap(), None, "{name}: taken over");
    }
}

/// A table made before the `response` column: the store refuses to start on
/// it, and `schema apply` adds the column (again: nothing to do), keeping rows.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn schema_apply_adds_the_response_column_to_an_older_cql_table() {
    for (name, contact_point, datacenter) in cql_servers() {
        let (store, keyspace) = cql_store(&contact_point, &datacenter);
        let session = scylla::client::session_builder::SessionBuilder::new()
            .known_node(&contact_point)
            .build()
            .await
            .expect("the CQL server answers");
        let ks = &keyspace.name;
        for ddl in [
            format!(
                "CREATE KEYSPACE {ks} WITH replication = {{'class': 'NetworkTopologyStrategy', '{datacenter}': 1}}"
            ),
            // The table as kdedup made it before responses were recorded.
            format!(
                r#"CREATE TABLE {ks}.kdedup_claims (scope text, event_id blob, state tinyint, fingerprint blob,
                   topic text, partition int, "offset" bigint, claimed_at_ms bigint, lease_until_ms bigint,
                   expires_at_ms bigint, PRIMARY KEY ((scope, event_id)))"#
            ),
        ] {
            session.query_unpaged(ddl, ()).await.unwrap();
        }
        let old_row = format!(
            r#"INSERT INTO {ks}.kdedup_claims (scope, event_id, state, fingerprint, topic, partition, "offset",
               claimed_at_ms, lease_until_ms, expires_at_ms) VALUES ('s', 0x6f6c64, 2, ?, 't', 0, 1, {T0}, 0, {})
               USING TTL 600"#,
            T0 + TTL_MS
        );
        session.query_unpaged(old_row, (1u128.to_be_bytes().to_vec(),)).await.unwrap();
        let err = store.check_schema(None).await.expect_err("an older table is refused");
        assert!(
            err.to_string().contains("`response` column") && err.to_string().contains("schema apply"),
            "{name}: {err}"
        );
        store.apply_schema().await.unwrap_or_else(|e| panic!("{name}: migration: {e}"));
        store.apply_schema().await.unwrap_or_else(|e| panic!("{name}: applied twice: {e}"));
        store.check_schema(None).await.unwrap_or_else(|e| panic!("{name}: {e}"));
        let old = EventKey { scope: Arc::from("s"), id: b"old".to_vec() };
        let request = ClaimRequest { key: old, fingerprint: Fingerprint(1), position: at(0, 9) };
        assert_eq!(
            claim1(&store, request, T0 + 1).await,
            Claim::Duplicate { first: at(0, 1), claimed_at_ms: T0 },
            "{name}: the old rows stay"
        );
    }
}

/// What each CQL server answers to a lightweight transaction, the difference
/// the store reads both ways: ScyllaDB shows `[applied]` and the whole row;
/// Cassandra shows `[applied]` alone when applied, the whole row for a
/// rejected `INSERT … IF NOT EXISTS`, only the condition's columns for a
/// rejected `UPDATE … IF`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lightweight_transaction_answers_show_each_servers_columns() {
    for (name, contact_point, datacenter) in cql_servers() {
        let (store, keyspace) = cql_store(&contact_point, &datacenter);
        store.apply_schema().await.unwrap();
        let session = scylla::client::session_builder::SessionBuilder::new()
            .known_node(&contact_point)
            .build()
            .await
            .expect("the CQL server answers");
        let t = format!("{}.kdedup_claims", keyspace.name);
        let columns = |statement: String| {
            let session = &session;
            async move {
                let result = session.query_unpaged(statement, ()).await.unwrap();
                let rows = result.into_rows_result().unwrap();
                rows.column_specs().iter().map(|c| c.name().to_string()).collect::<Vec<_>>()
            }
        };
        let insert = format!(
            r#"INSERT INTO {t} (scope, event_id, state, topic, partition, "offset", expires_at_ms)
               VALUES ('s', 0x6b, 1, 't', 0, 1, 5) IF NOT EXISTS"#
        );
        let applied_insert = columns(insert.clone()).await;
        let rejected_insert = columns(insert).await;
        let rejected_update =
            columns(format!("UPDATE {t} SET lease_until_ms = 1 WHERE scope = 's' AND event_id = 0x6b IF state = 2"))
                .await;
        let applied_update =
            columns(format!("UPDATE {t} SET lease_until_ms = 1 WHERE scope = 's' AND event_id = 0x6b IF state = 1"))
                .await;
        eprintln!(
            "{name}: applied insert {applied_insert:?}; rejected insert {rejected_insert:?}; \
             rejected update {rejected_update:?}; applied update {applied_update:?}"
        );
        assert_eq!(rejected_insert.first().map(String::as_str), Some("[applied]"), "{name}");
        for column in ["state", "topic", "partition", "offset", "expires_at_ms", "response"] {
            assert!(rejected_insert.iter().any(|c| c == column), "{name}: a rejected insert shows {column}");
        }
        match name {
            "cassandra" => {
                assert_eq!(applied_insert, ["[applied]"], "{name}");
                assert_eq!(applied_update, ["[applied]"], "{name}");
                assert_eq!(rejected_update, ["[applied]", "state"], "{name}: only the condition's column");
            }
            _ => {
                assert!(applied_update.iter().any(|c| c == "topic"), "{name}: the whole old row");
                assert!(rejected_update.iter().any(|c| c == "topic"), "{name}: the whole row");
            }
        }
    }
}
