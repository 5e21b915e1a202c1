//! The store stage: the only authority on whether an event was handled.
//!
//! - [`DedupStore`]: the contract every backend keeps (batch-first: each call
//!   takes many keys, so a partition is never limited to one round trip per record).
//! - [`Claim`]: the answer to an atomic insert-if-absent.
//! - [`ClaimRow`]: what a key's row holds: state, fingerprint, claimant position, lease.
//! - [`Store`]: the enum that picks a backend and dispatches to it.
//! - `embedded`: on-disk store for one machine.
//! - `postgres`: shared store for consumer groups across processes.
//! - `scylla`: shared store for consumer groups across machines (lightweight transactions).
//!
//! Lifecycle of a key: `claim` writes `InFlight` with a short lease and the
//! claimant's position; `complete` turns it `Done` (it then lives until its
//! TTL, counted from the claim); `release` deletes an `InFlight` row whose
//! effect failed, so the key is not burned without its effect. While its
//! effect runs, the owner `renew`s the lease (a heartbeat per partition task),
//! so a live owner's claim is never taken over. A redelivery of the same
//! position is the claimant's own crashed attempt and resumes
//! (`New(Acquired::Resumed)`); a different position waits for the lease
//! (`InFlight`) and takes over once it has lapsed (`New(Acquired::TakenOver)`):
//! the old owner's effect may have landed, so the effect is marked as a
//! possible repeat.

pub mod embedded;
pub mod postgres;
// Its statements and row decoding are internals of `ScyllaStore` (re-exported below).
pub(crate) mod scylla;

use std::future::Future;

use crate::config::{Retention, StoreConfig};
use crate::error::StoreError;
use crate::event::{EventKey, Fingerprint, Position};
use crate::metrics::{StoreBatchMetrics, StoreOpMetrics};

pub use embedded::EmbeddedStore;
pub use postgres::PostgresStore;
pub use scylla::ScyllaStore;
// Shared with the sinks and the core through the `values` leaf; kept here, where the
// stores and the tests name them.
pub use crate::values::{now_ms, EffectResponse};

/// A request to claim one key for one record.
#[derive(Debug, Clone)]
pub struct ClaimRequest {
    /// The key to claim.
    pub key: EventKey,
    /// The record's payload fingerprint: another one on a done row is a conflict.
    pub fingerprint: Fingerprint,
    /// The record claiming: a later claim from this same position resumes it.
    pub position: Position,
}

/// How a `New` claim was won.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Acquired {
    /// No live row: nobody ran the effect within the TTL.
    Fresh,
    /// The row already named this very position: our own earlier attempt at
    /// this record (a crash, or an abandoned batch), whose effect may have run.
    Resumed,
    /// Another position's in-flight claim whose lease lapsed: its owner died or
    /// stalled, and its effect may have run.
    TakenOver,
}

impl Acquired {
    /// Whether an earlier attempt's effect may already have landed.
    pub fn may_repeat(self) -> bool {
        !matches!(self, Acquired::Fresh)
    }
}

/// The store's answer to a claim.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Claim {
    /// The caller owns the key now and must run the effect, then `complete` or `release`.
    New(Acquired),
    /// Completed earlier with the same fingerprint: by `first`, whose claim
    /// was made at `claimed_at_ms` (the row's clock: its TTL counts from there),
    /// for the duplicate's age and observe mode's stamp.
    Duplicate {
        /// The position whose claim completed the key.
        first: Position,
        /// When that claim was made, ms since the epoch.
        claimed_at_ms: u64,
    },
    /// Another position holds a live lease; ask again later.
    InFlight {
        /// The position holding the claim.
        holder: Position,
        /// When its lease lapses unless renewed, ms since the epoch.
        lease_until_ms: u64,
    },
    /// The key exists with another fingerprint.
    Conflict {
        /// The fingerprint the key was first claimed with.
        stored: Fingerprint,
        /// The position whose claim won the key (for the conflict's reason).
        first: Position,
        /// When that claim was made, ms since the epoch.
        claimed_at_ms: u64,
    },
}

/// Where a claim row is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum ClaimState {
    /// Claimed; its effect not yet known to be done. Honoured while its lease lives.
    InFlight,
    /// Its effect is done: later claims of the key are duplicates until the row expires.
    Done,
}

/// One key's row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClaimRow {
    /// In flight or done.
    pub state: ClaimState,
    /// The first claimant's payload fingerprint.
    pub fingerprint: Fingerprint,
    /// Who claimed it (and, once done, whose effect it was).
    pub position: Position,
    /// When it was claimed, ms since the epoch; the TTL counts from here.
    pub claimed_at_ms: u64,
    /// For `InFlight`: when another owner may take over.
    pub lease_until_ms: u64,
    /// When the row stops counting, whatever its state.
    pub expires_at_ms: u64,
}

/// Decides a claim against the current row. Shared by backends that read and
/// write under their own lock, so every backend answers alike.
///
/// An in-flight row of another position is taken over only once its lease has
/// been lapsed for `grace_ms` more (the stores pass one lease): its holder's
/// heartbeat stopped, and the holder's own partition is being handed to a new
/// owner, who reconciles it against the output and resumes the claim at its
/// own position, completing it without a second effect. Taking it over from
/// elsewhere first would emit again (marked); waiting a little longer lets the
/// original's owner finish it, and takeover stays the fallback when it never
/// comes back (its records gone, its pipeline stopped).
pub fn decide(existing: Option<&ClaimRow>, request: &ClaimRequest, now_ms: u64, grace_ms: u64) -> Claim {
    match existing {
        None => Claim::New(Acquired::Fresh),
        Some(row) if row.expires_at_ms <= now_ms => Claim::New(Acquired::Fresh),
        Some(row) if row.state == ClaimState::Done => {
            if row.fingerprint == request.fingerprint {
                Claim::Duplicate { first: row.position.clone(), claimed_at_ms: row.claimed_at_ms }
            } else {
                Claim::Conflict {
                    stored: row.fingerprint,
                    first: row.position.clone(),
                    claimed_at_ms: row.claimed_at_ms,
                }
            }
        }
        Some(row) if row.position == request.position => Claim::New(Acquired::Resumed),
        Some(row) if row.lease_until_ms.saturating_add(grace_ms) <= now_ms => Claim::New(Acquired::TakenOver),
        Some(row) => Claim::InFlight { holder: row.position.clone(), lease_until_ms: row.lease_until_ms },
    }
}

/// What a replay's conditional release ([`DedupStore::release_unless_live`]) did.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Released {
    /// The row was deleted: the key is new again.
    Deleted,
    /// No live row.
    Absent,
    /// Kept: an in-flight claim whose owner may still be working on it (its
    /// lease, plus the takeover grace, has not lapsed). Deleting it would let
    /// another copy claim the key fresh while the owner's effect runs.
    Live(ClaimRow),
    /// Kept: claimed at or after the release's cut-off, i.e. after the replay
    /// began (by this replay itself, or a new event of the live group).
    Newer(ClaimRow),
}

/// Whether a replay may release this row ([`DedupStore::release_unless_live`]):
/// `None` when it may (expired, done, or in flight past its lease and grace,
/// claimed before `claimed_before_ms`), else why it is kept. One rule for
/// every backend; those that cannot read and delete under one lock encode it
/// in their conditional delete.
pub fn kept_on_release(row: &ClaimRow, now_ms: u64, grace_ms: u64, claimed_before_ms: u64) -> Option<Released> {
    if row.expires_at_ms <= now_ms {
        None
    } else if row.state == ClaimState::InFlight && row.lease_until_ms.saturating_add(grace_ms) > now_ms {
        Some(Released::Live(row.clone()))
    } else if row.claimed_at_ms >= claimed_before_ms {
        Some(Released::Newer(row.clone()))
    } else {
        None
    }
}

/// The key of a scope's release marker: the scope with an empty event ID,
/// which no event has (extraction refuses empty IDs). Its row changes on every
/// release (`kdedup replay --mode release|redrive`, `kdedup forget`), so that
/// live processes know their recent caches may vouch for keys the store no
/// longer holds ([`mark_released`], [`crate::filter::Filter::note_releases`]).
pub fn release_marker(scope: &str) -> EventKey {
    EventKey { scope: std::sync::Arc::from(scope), id: Vec::new() }
}

/// Records that keys of `scope` were released: the marker row is replaced by a
/// done row with a random fingerprint, claimed now. Call it after the
/// releases themselves, so a process that reads the new marker cannot have
/// cached a key the releases then deleted.
pub async fn mark_released(store: &impl DedupStore, scope: &str, now_ms: u64) -> Result<(), StoreError> {
    let key = release_marker(scope);
    let position = Position { topic: std::sync::Arc::from("kdedup-release"), partition: 0, offset: 0 };
    store.forget(key.clone()).await?;
    let request =
        ClaimRequest { key: key.clone(), fingerprint: Fingerprint(rand::random()), position: position.clone() };
    store.claim(vec![request], now_ms).await?;
    store.complete(vec![(key, position)], now_ms).await?;
    store.sync()
}

/// What a store holds for one scope (`kdedup stats --config`).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct Census {
    /// Keys claimed and not yet done (leases live or not).
    pub in_flight: u64,
    /// Keys done.
    pub done: u64,
    /// The claim time of the oldest live key, ms since the epoch.
    pub oldest_claimed_at_ms: Option<u64>,
    /// On-disk size of the store (all scopes), when the store can tell.
    pub bytes: Option<u64>,
}

/// Counters a backend keeps about its own work (for metrics and the bench).
#[derive(Debug, Default, Clone, Copy)]
pub struct StoreStats {
    /// Calls to the backend (one call may carry a batch).
    pub round_trips: u64,
    /// Keys written (rows, index entries, deletions), where the backend counts them.
    pub writes: Option<u64>,
    /// Bytes the backend holds in this process (memtables and block cache),
    /// where it can tell.
    pub memory_bytes: Option<u64>,
    /// Durability barriers run.
    pub syncs: u64,
}

/// The contract of a dedup store. All calls take batches; answers come back
/// in request order. Time is passed in, so tests control it.
pub trait DedupStore: Send + Sync {
    /// Atomic insert-if-absent per key, in request order (a key repeated in one
    /// batch sees the earlier request's write).
    fn claim(
        &self,
        requests: Vec<ClaimRequest>,
        now_ms: u64,
    ) -> impl Future<Output = Result<Vec<Claim>, StoreError>> + Send;

    /// Marks claims done. `false` for a key whose claim this position no longer holds.
    fn complete(
        &self,
        done: Vec<(EventKey, Position)>,
        now_ms: u64,
    ) -> impl Future<Output = Result<Vec<bool>, StoreError>> + Send;

    /// Extends the leases of in-flight claims this position holds to `now_ms +
    /// lease`: the owner's heartbeat while its effects run. `false` for a key
    /// whose claim this position no longer holds (taken over, or expired).
    fn renew(
        &self,
        held: Vec<(EventKey, Position)>,
        now_ms: u64,
    ) -> impl Future<Output = Result<Vec<bool>, StoreError>> + Send;

    /// Drops in-flight claims this position holds (the effect failed).
    fn release(&self, keys: Vec<(EventKey, Position)>) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// Keeps each effect's response on its claim row, for claims this position
    /// still holds (`false` where it no longer does). A new claim of the key
    /// (fresh or taken over) clears it; resuming one's own claim keeps it.
    fn record(
        &self,
        responses: Vec<(EventKey, Position, EffectResponse)>,
    ) -> impl Future<Output = Result<Vec<bool>, StoreError>> + Send;

    /// The response recorded on a key's live row, if any.
    fn response(
        &self,
        key: EventKey,
        now_ms: u64,
    ) -> impl Future<Output = Result<Option<EffectResponse>, StoreError>> + Send;

    /// Current rows, expired ones answered as `None`.
    fn lookup(
        &self,
        keys: Vec<EventKey>,
        now_ms: u64,
    ) -> impl Future<Output = Result<Vec<Option<ClaimRow>>, StoreError>> + Send;

    /// Deletes a key whatever its state; `true` if it existed (`kdedup forget`).
    fn forget(&self, key: EventKey) -> impl Future<Output = Result<bool, StoreError>> + Send;

    /// A replay's release (`release`, `redrive`): deletes the key's row unless
    /// [`kept_on_release`] keeps it (a live owner's in-flight claim, or a row
    /// claimed at or after `claimed_before_ms`), atomically with that check.
    fn release_unless_live(
        &self,
        key: EventKey,
        now_ms: u64,
        claimed_before_ms: u64,
    ) -> impl Future<Output = Result<Released, StoreError>> + Send;

    /// Removes expired rows from storage; returns how many.
    fn sweep(&self, now_ms: u64) -> impl Future<Output = Result<usize, StoreError>> + Send;

    /// Durability barrier: everything written before returns is durable. Blocking;
    /// called on the commit path before offsets are committed.
    fn sync(&self) -> Result<(), StoreError>;

    /// What this backend has counted of its own work so far.
    fn stats(&self) -> StoreStats;
}

/// The configured backend.
#[derive(Clone)]
#[non_exhaustive]
pub enum Store {
    /// `[store] kind = "embedded"`.
    Embedded(EmbeddedStore),
    /// `[store] kind = "postgres"`.
    Postgres(PostgresStore),
    /// `[store] kind = "scylla"`.
    Scylla(ScyllaStore),
}

impl Store {
    /// Counts the live keys of `scope` by state, with the oldest one's claim time.
    /// A full read of the scope's rows on the embedded store and PostgreSQL; the
    /// ScyllaDB store would need a full table scan and does not offer it.
    pub async fn census(&self, scope: &str, now_ms: u64) -> Result<Census, StoreError> {
        match self {
            Store::Embedded(s) => s.census(scope, now_ms).await,
            Store::Postgres(s) => s.census(scope, now_ms).await,
            Store::Scylla(_) => Err(StoreError::Config(
                "the ScyllaDB store cannot count its keys without scanning the whole table; \
                 use kdedup_claims_in_flight and the window metrics instead"
                    .into(),
            )),
        }
    }

    /// Opens (or connects to) the configured backend; ScyllaDB and PostgreSQL connect lazily.
    pub fn open(config: &StoreConfig, retention: &Retention) -> Result<Store, StoreError> {
        match config {
            StoreConfig::Embedded { path } => Ok(Store::Embedded(EmbeddedStore::open(path, retention)?)),
            StoreConfig::Postgres { url, pool_size, tls } => {
                Ok(Store::Postgres(PostgresStore::open(url.expose(), *pool_size, tls, retention)?))
            }
            StoreConfig::Scylla(scylla) => Ok(Store::Scylla(ScyllaStore::open(scylla, retention)?)),
        }
    }

    /// The `store` label of metrics: `embedded`, `postgres` or `scylla`.
    pub fn kind(&self) -> &'static str {
        match self {
            Store::Embedded(_) => "embedded",
            Store::Postgres(_) => "postgres",
            Store::Scylla(_) => "scylla",
        }
    }

    /// The schema this backend needs, if any (`kdedup schema print`).
    pub fn schema(&self) -> Option<&'static str> {
        match self {
            Store::Embedded(_) => None,
            Store::Postgres(_) => Some(postgres::SCHEMA),
            Store::Scylla(_) => Some(scylla::SCHEMA_TEMPLATE),
        }
    }

    /// Creates what the schema describes, idempotently (`kdedup schema apply`).
    pub async fn apply_schema(&self) -> Result<(), StoreError> {
        match self {
            Store::Embedded(_) => Ok(()),
            Store::Postgres(s) => s.apply_schema().await,
            Store::Scylla(s) => s.apply_schema().await,
        }
    }

    /// Refuses to start on a store whose schema is missing; the error names the command
    /// that applies it with the config read from `config_file`.
    pub async fn check_schema(&self, config_file: Option<&std::path::Path>) -> Result<(), StoreError> {
        match self {
            Store::Embedded(_) => Ok(()),
            Store::Postgres(s) => s.check_schema(config_file).await,
            Store::Scylla(s) => s.check_schema(config_file).await,
        }
    }

    /// Whether the backend removes expired rows by itself (ScyllaDB's TTL), so
    /// the service schedules no sweeps (a ScyllaDB sweep scans the whole table).
    pub fn expires_by_itself(&self) -> bool {
        matches!(self, Store::Scylla(_))
    }

    /// Per-statement metrics, for backends that keep them.
    pub fn op_metrics(&self) -> Option<&StoreOpMetrics> {
        match self {
            Store::Scylla(s) => Some(s.op_metrics()),
            Store::Embedded(_) | Store::Postgres(_) => None,
        }
    }

    /// Keys per statement, for the backend that batches keys into statements.
    pub fn batch_metrics(&self) -> Option<&StoreBatchMetrics> {
        match self {
            Store::Postgres(s) => Some(s.batch_metrics()),
            Store::Embedded(_) | Store::Scylla(_) => None,
        }
    }

    /// Whether this backend is only correct when one process owns every partition.
    pub fn is_single_instance(&self) -> bool {
        matches!(self, Store::Embedded(_))
    }
}

macro_rules! dispatch {
    ($self:ident, $s:ident => $call:expr) => {
        match $self {
            Store::Embedded($s) => $call,
            Store::Postgres($s) => $call,
            Store::Scylla($s) => $call,
        }
    };
}

impl DedupStore for Store {
    async fn claim(&self, requests: Vec<ClaimRequest>, now_ms: u64) -> Result<Vec<Claim>, StoreError> {
        dispatch!(self, s => s.claim(requests, now_ms).await)
    }
    async fn complete(&self, done: Vec<(EventKey, Position)>, now_ms: u64) -> Result<Vec<bool>, StoreError> {
        dispatch!(self, s => s.complete(done, now_ms).await)
    }
    async fn renew(&self, held: Vec<(EventKey, Position)>, now_ms: u64) -> Result<Vec<bool>, StoreError> {
        dispatch!(self, s => s.renew(held, now_ms).await)
    }
    async fn release(&self, keys: Vec<(EventKey, Position)>) -> Result<(), StoreError> {
        dispatch!(self, s => s.release(keys).await)
    }
    async fn record(&self, responses: Vec<(EventKey, Position, EffectResponse)>) -> Result<Vec<bool>, StoreError> {
        dispatch!(self, s => s.record(responses).await)
    }
    async fn response(&self, key: EventKey, now_ms: u64) -> Result<Option<EffectResponse>, StoreError> {
        dispatch!(self, s => s.response(key, now_ms).await)
    }
    async fn lookup(&self, keys: Vec<EventKey>, now_ms: u64) -> Result<Vec<Option<ClaimRow>>, StoreError> {
        dispatch!(self, s => s.lookup(keys, now_ms).await)
    }
    async fn forget(&self, key: EventKey) -> Result<bool, StoreError> {
        dispatch!(self, s => s.forget(key).await)
    }
    async fn release_unless_live(
        &self,
        key: EventKey,
        now_ms: u64,
        claimed_before_ms: u64,
    ) -> Result<Released, StoreError> {
        dispatch!(self, s => s.release_unless_live(key, now_ms, claimed_before_ms).await)
    }
    async fn sweep(&self, now_ms: u64) -> Result<usize, StoreError> {
        dispatch!(self, s => s.sweep(now_ms).await)
    }
    fn sync(&self) -> Result<(), StoreError> {
        dispatch!(self, s => s.sync())
    }
    fn stats(&self) -> StoreStats {
        dispatch!(self, s => s.stats())
    }
}
