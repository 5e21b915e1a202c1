//! The ScyllaDB store: a shared store for consumer groups across machines,
//! where one PostgreSQL is not enough. Every write is a lightweight
//! transaction (Paxos) on the key's own partition. It speaks CQL only, so it
//! runs on Apache Cassandra too (the contract suite runs on Cassandra 5.0).
//!
//! - `claim` is `INSERT … IF NOT EXISTS USING TTL ?`. A rejected insert comes
//!   back with the row that rejected it, and [`next_step`] maps that row
//!   through [`decide`] (so every backend answers alike): `Duplicate`,
//!   `Conflict` and `InFlight` need no second round trip. A row past
//!   `expires_at_ms`, or in flight with its lease lapsed, is taken over by a
//!   conditional rewrite (`IF expires_at_ms <= now`, `IF state = 1 AND
//!   lease_until_ms <= now`); our own position resumes with a conditional
//!   lease extension. A rewrite that loses a race returns the new row, which
//!   is decided again.
//! - Why every write is conditional: ScyllaDB does not order plain writes
//!   against Paxos rounds on the same row (a plain write carries its own
//!   timestamp and may land before or after an LWT's), so completion, release
//!   and forget are LWTs too; only `lookup` is a plain (quorum) read.
//! - Time is the caller's `now_ms`, compared in the IF conditions against the
//!   row's columns. ScyllaDB's TTL is storage-level expiry on top: every write
//!   sets every column with TTL = time left until `expires_at_ms`, rounded up,
//!   so a row never half-expires and never vanishes before it stops counting.
//!   Completion therefore needs the claim's row: the store keeps the rows it
//!   granted in memory (bounded; a SERIAL read stands in when one is missing).
//! - An LWT whose outcome is unknown (write timeout, client timeout, broken
//!   connection) is settled by a SERIAL read of the row, which completes any
//!   Paxos round in progress: either our write is visible or it never will be.
//! - A batch runs many statements at once (`max_in_flight`), one key's
//!   requests in order, so a key repeated in one batch sees the earlier write.
//! - The two servers answer an LWT with other columns: ScyllaDB with
//!   `[applied]` and the whole old row; Cassandra with `[applied]` alone when
//!   applied, and with only the condition's columns for a rejected `UPDATE …
//!   IF`. Rows are read by column name, and a partial one ([`Shown::Partial`])
//!   is completed by a SERIAL read.
//! - An effect's response (`record`) is kept with the granted claim and
//!   written by the conditional update that completes it, so it costs no
//!   Paxos round of its own and gets the row's TTL; takeovers clear it.
//! - Durability: LWT writes hit the commit log synchronously on a quorum of
//!   replicas before they are acknowledged, so `sync` has nothing to do.
//!
//! Connection is lazy: the session is built on first use, so a cluster that is
//! down at start makes the pipeline wait, not exit. Schema: `schemas/scylla.cql`.

use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::stream::{self, StreamExt, TryStreamExt};
use scylla::client::execution_profile::{ExecutionProfile, ExecutionProfileHandle};
use scylla::client::session::Session;
use scylla::client::session_builder::SessionBuilder;
use scylla::errors::{DbError, ExecutionError, RequestAttemptError};
use scylla::policies::load_balancing::DefaultPolicy;
use scylla::response::query_result::QueryResult;
use scylla::serialize::row::SerializeRow;
use scylla::statement::prepared::PreparedStatement;
use scylla::statement::{Consistency, SerialConsistency};
use scylla::value::{CqlValue, MaybeUnset, Row};
use tokio::sync::OnceCell;
use tracing::{info, warn};

use super::{
    decide, Acquired, Claim, ClaimRequest, ClaimRow, ClaimState, DedupStore, EffectResponse, Released, StoreStats,
};
use crate::config::{Retention, ScyllaConfig, ScyllaConsistency, ScyllaSerialConsistency};
use crate::error::StoreError;
use crate::event::{EventKey, Fingerprint, Position};
use crate::metrics::StoreOpMetrics;

/// The schema with `{{…}}` fields; see [`render_schema`].
pub(crate) const SCHEMA_TEMPLATE: &str = include_str!("../../schemas/scylla.cql");

/// The claims table's name, in the configured keyspace.
pub(crate) const TABLE: &str = "kdedup_claims";

/// Rounds of insert / takeover / resume one claim may take before the batch
/// gives up (retriable): each lost round means another writer changed the row.
const MAX_ROUNDS: usize = 16;

/// Granted claims kept for completion before stale ones are pruned.
const GRANTED_SOFT_LIMIT: usize = 100_000;

const STORE: &str = "scylla";

/// Time a schema statement may take (it waits for the nodes to agree).
const SCHEMA_TIMEOUT: Duration = Duration::from_secs(60);

// ---------------------------------------------------------------------------
// Schema and statement text (pure, unit-tested)
// ---------------------------------------------------------------------------

/// The replication map of the keyspace: NetworkTopologyStrategy with the
/// configured factor per datacenter.
pub(crate) fn replication_map(config: &ScyllaConfig) -> String {
    let mut map = String::from("{'class': 'NetworkTopologyStrategy'");
    for (dc, rf) in &config.replication {
        map.push_str(&format!(", '{dc}': {rf}"));
    }
    map.push('}');
    map
}

/// Hours per compaction window: about 24 windows per TTL, at least one hour.
pub(crate) fn compaction_window_hours(ttl: Duration) -> u64 {
    (ttl.as_secs().div_ceil(3600 * 24)).max(1)
}

/// The schema for this keyspace, replication and TTL (`kdedup schema print`).
pub(crate) fn render_schema(config: &ScyllaConfig, retention: &Retention) -> String {
    SCHEMA_TEMPLATE
        .replace("{{keyspace}}", &config.keyspace)
        .replace("{{replication}}", &replication_map(config))
        .replace("{{ttl_secs}}", &retention.ttl.as_secs().max(1).to_string())
        .replace("{{window_hours}}", &compaction_window_hours(retention.ttl).to_string())
}

/// The statements of a rendered schema, comments dropped, in order.
pub(crate) fn schema_statements(rendered: &str) -> Vec<String> {
    let without_comments: String = rendered
        .lines()
        .map(|line| match line.find("--") {
            Some(at) => &line[..at],
            None => line,
        })
        .collect::<Vec<_>>()
        .join("\n");
    without_comments
        .split(';')
        .map(|s| s.split_whitespace().collect::<Vec<_>>().join(" "))
        .filter(|s| !s.is_empty())
        .collect()
}

/// The keyspace statement without the tablets option, for servers that do not know it.
fn without_tablets_option(statement: &str) -> String {
    match statement.find(" AND tablets =") {
        Some(at) => statement[..at].to_string(),
        None => statement.to_string(),
    }
}

/// Whether a failed CREATE KEYSPACE failed only because the server does not
/// know the `tablets` option (ScyllaDB before 6.0, Cassandra).
fn rejects_tablets_option(message: &str) -> bool {
    let m = message.to_ascii_lowercase();
    m.contains("tablets")
        && (m.contains("unknown") || m.contains("not supported") || m.contains("unrecognized") || m.contains("invalid"))
}

const COLUMNS: &str = r#"state, fingerprint, topic, partition, "offset", claimed_at_ms, lease_until_ms, expires_at_ms"#;
const SET_ALL: &str = r#"SET state = ?, fingerprint = ?, topic = ?, partition = ?, "offset" = ?, claimed_at_ms = ?, lease_until_ms = ?, expires_at_ms = ?"#;
/// The condition of every rewrite of a claim its owner holds: still in flight, still ours.
const OWN: &str = r#"IF state = 1 AND topic = ? AND partition = ? AND "offset" = ? AND expires_at_ms = ?"#;

/// Whether the table has the `response` column (tables made before it was added lack it).
const RESPONSE_COLUMN: &str =
    "SELECT column_name FROM system_schema.columns WHERE keyspace_name = ? AND table_name = ? AND column_name = 'response'";

/// Every statement the store runs, for one keyspace.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Cql {
    /// values: scope, event_id, the row's 8 columns, ttl
    pub insert: String,
    /// values: ttl, the row's 8 columns, scope, event_id, now
    pub take_over_expired: String,
    /// values: ttl, the row's 8 columns, scope, event_id, now
    pub take_over_lapsed: String,
    /// Resume and renew: rewrite our own live in-flight row (its response untouched).
    /// values: ttl, the row's 8 columns, scope, event_id, topic, partition, offset, expires_at_ms
    pub rewrite_own: String,
    /// Complete: `rewrite_own` that also writes the recorded response (unset: none recorded).
    /// values: ttl, the row's 8 columns, response, scope, event_id, topic, partition, offset, expires_at_ms
    pub complete: String,
    /// values: scope, event_id, topic, partition, offset
    pub release: String,
    /// values: scope, event_id
    pub forget: String,
    /// values: scope, event_id
    pub read: String,
    /// values: scope, event_id
    pub response: String,
    /// values: now
    pub sweep_scan: String,
    /// The migration of tables made before the `response` column (run only when it is missing).
    pub add_response: String,
    /// values: scope, event_id, now
    pub sweep_delete: String,
}

impl Cql {
    /// Every statement against `keyspace.kdedup_claims`.
    pub(crate) fn new(keyspace: &str) -> Cql {
        let t = format!("{keyspace}.{TABLE}");
        let key = "WHERE scope = ? AND event_id = ?";
        Cql {
            insert: format!(
                "INSERT INTO {t} (scope, event_id, {COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?) IF NOT EXISTS USING TTL ?"
            ),
            // A takeover starts a new claim: the old claim's response goes with it.
            take_over_expired: format!(
                "UPDATE {t} USING TTL ? {SET_ALL}, response = null {key} IF expires_at_ms <= ?"
            ),
            take_over_lapsed: format!(
                "UPDATE {t} USING TTL ? {SET_ALL}, response = null {key} IF state = 1 AND lease_until_ms <= ?"
            ),
            rewrite_own: format!("UPDATE {t} USING TTL ? {SET_ALL} {key} {OWN}"),
            complete: format!("UPDATE {t} USING TTL ? {SET_ALL}, response = ? {key} {OWN}"),
            release: format!(r#"DELETE FROM {t} {key} IF state = 1 AND topic = ? AND partition = ? AND "offset" = ?"#),
            forget: format!("DELETE FROM {t} {key} IF EXISTS"),
            read: format!("SELECT {COLUMNS} FROM {t} {key}"),
            response: format!("SELECT response, expires_at_ms FROM {t} {key}"),
            sweep_scan: format!("SELECT scope, event_id, expires_at_ms FROM {t} WHERE expires_at_ms <= ? ALLOW FILTERING"),
            sweep_delete: format!("DELETE FROM {t} {key} IF expires_at_ms <= ?"),
            add_response: format!("ALTER TABLE {t} ADD response text"),
        }
    }
}

/// `USING TTL` for a write at `now_ms` of a row that stops counting at
/// `expires_at_ms`: the time left, rounded up to whole seconds (at least 1), so
/// storage never drops a row before it stops counting.
pub(crate) fn ttl_secs(expires_at_ms: u64, now_ms: u64) -> i32 {
    let left_ms = expires_at_ms.saturating_sub(now_ms);
    i32::try_from(left_ms.div_ceil(1000).max(1)).unwrap_or(i32::MAX)
}

// ---------------------------------------------------------------------------
// Rows as they come back, and what they decide (pure, unit-tested)
// ---------------------------------------------------------------------------

/// A key's row as one response shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Shown {
    /// No row (or every claim column null).
    Absent,
    /// The whole row.
    Row(ClaimRow),
    /// Some claim columns are missing from the response: Cassandra answers a
    /// rejected `UPDATE … IF` with the condition's columns only. A SERIAL read
    /// shows the whole row.
    Partial,
}

/// The answer to one lightweight transaction: `[applied]` and the row as it
/// was (ScyllaDB returns the old row whether or not the condition held).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct LwtAnswer {
    /// Whether the condition held and the write happened.
    pub applied: bool,
    /// The row before the statement.
    pub row: Shown,
}

const CLAIM_COLUMNS: [&str; 8] =
    ["state", "fingerprint", "topic", "partition", "offset", "claimed_at_ms", "lease_until_ms", "expires_at_ms"];

/// Reads the claim columns of one response row, by name.
pub(crate) fn shown_row(names: &[&str], values: &[Option<CqlValue>]) -> Result<Shown, StoreError> {
    let get = |name: &str| names.iter().position(|n| *n == name).map(|i| values.get(i).cloned().flatten());
    let columns: Vec<Option<Option<CqlValue>>> = CLAIM_COLUMNS.iter().map(|c| get(c)).collect();
    if columns.iter().all(|c| matches!(c, None | Some(None))) {
        return Ok(Shown::Absent);
    }
    if columns.iter().any(Option::is_none) {
        return Ok(Shown::Partial);
    }
    let corrupt = |what: &str| StoreError::Corrupt(format!("ScyllaDB row: {what}"));
    let value =
        |i: usize| columns[i].clone().flatten().ok_or_else(|| corrupt(&format!("{} is null", CLAIM_COLUMNS[i])));
    let bigint = |i: usize| match value(i)? {
        CqlValue::BigInt(v) => Ok(v),
        other => Err(corrupt(&format!("{} is {other:?}, not bigint", CLAIM_COLUMNS[i]))),
    };
    let state = match value(0)? {
        CqlValue::TinyInt(1) => ClaimState::InFlight,
        CqlValue::TinyInt(2) => ClaimState::Done,
        other => return Err(corrupt(&format!("unknown state {other:?}"))),
    };
    let fingerprint = match value(1)? {
        CqlValue::Blob(b) => {
            let bytes: [u8; 16] = b.try_into().map_err(|_| corrupt("fingerprint is not 16 bytes"))?;
            Fingerprint(u128::from_be_bytes(bytes))
        }
        other => return Err(corrupt(&format!("fingerprint is {other:?}, not blob"))),
    };
    let topic = match value(2)? {
        CqlValue::Text(t) | CqlValue::Ascii(t) => t,
        other => return Err(corrupt(&format!("topic is {other:?}, not text"))),
    };
    let partition = match value(3)? {
        CqlValue::Int(p) => p,
        other => return Err(corrupt(&format!("partition is {other:?}, not int"))),
    };
    let non_negative = |v: i64, what: &str| u64::try_from(v).map_err(|_| corrupt(&format!("{what} is negative")));
    Ok(Shown::Row(ClaimRow {
        state,
        fingerprint,
        position: Position { topic: Arc::from(topic), partition, offset: bigint(4)? },
        claimed_at_ms: non_negative(bigint(5)?, "claimed_at_ms")?,
        lease_until_ms: non_negative(bigint(6)?, "lease_until_ms")?,
        expires_at_ms: non_negative(bigint(7)?, "expires_at_ms")?,
    }))
}

/// Reads an LWT response row: `[applied]` and the old row.
pub(crate) fn lwt_answer(names: &[&str], values: &[Option<CqlValue>]) -> Result<LwtAnswer, StoreError> {
    let applied = match names.iter().position(|n| *n == "[applied]").and_then(|i| values.get(i)) {
        Some(Some(CqlValue::Boolean(b))) => *b,
        _ => return Err(StoreError::Corrupt("ScyllaDB answered a lightweight transaction without [applied]".into())),
    };
    Ok(LwtAnswer { applied, row: shown_row(names, values)? })
}

/// What a claim does next, given the row it saw.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Step {
    /// The answer, from the row alone.
    Answer(Claim),
    /// No row: `INSERT … IF NOT EXISTS`.
    Insert,
    /// The row stopped counting (`expires_at_ms <= now`): rewrite it `IF expires_at_ms <= now`.
    TakeOverExpired,
    /// In flight, its lease lapsed: rewrite it `IF state = 1 AND lease_until_ms <= now`.
    TakeOverLapsed,
    /// Our own live in-flight claim (a redelivery of the same position): extend
    /// its lease `IF` it is still ours.
    Resume(ClaimRow),
}

impl Step {
    /// How a claim that applied this step was won.
    fn acquired(&self) -> Acquired {
        match self {
            Step::Resume(_) => Acquired::Resumed,
            Step::TakeOverLapsed => Acquired::TakenOver,
            Step::Insert | Step::TakeOverExpired | Step::Answer(_) => Acquired::Fresh,
        }
    }
}

/// Maps the row a claim saw (a rejected LWT's old row, or a SERIAL read) to
/// the next step, through [`decide`], so ScyllaDB answers as every backend does.
pub(crate) fn next_step(existing: Option<&ClaimRow>, request: &ClaimRequest, now_ms: u64, grace_ms: u64) -> Step {
    let Some(row) = existing else { return Step::Insert };
    match decide(Some(row), request, now_ms, grace_ms) {
        Claim::New(Acquired::Resumed) => Step::Resume(row.clone()),
        Claim::New(_) if row.expires_at_ms <= now_ms => Step::TakeOverExpired,
        Claim::New(_) => Step::TakeOverLapsed,
        other => Step::Answer(other),
    }
}

/// The row a claim's write leaves when it applies.
pub(crate) fn intended_row(
    step: &Step,
    request: &ClaimRequest,
    now_ms: u64,
    lease_ms: u64,
    ttl_ms: u64,
) -> Option<ClaimRow> {
    let fresh = || ClaimRow {
        state: ClaimState::InFlight,
        fingerprint: request.fingerprint,
        position: request.position.clone(),
        claimed_at_ms: now_ms,
        lease_until_ms: now_ms + lease_ms,
        expires_at_ms: now_ms + ttl_ms,
    };
    match step {
        Step::Answer(_) => None,
        Step::Insert | Step::TakeOverExpired | Step::TakeOverLapsed => Some(fresh()),
        // Resuming keeps the claim's clock: the TTL does not stretch.
        Step::Resume(old) => {
            Some(ClaimRow { fingerprint: request.fingerprint, lease_until_ms: now_ms + lease_ms, ..old.clone() })
        }
    }
}

/// After an ambiguous LWT, whether the SERIAL read shows our write.
pub(crate) fn shows_our_write(intended: &ClaimRow, current: Option<&ClaimRow>) -> bool {
    current == Some(intended)
}

/// Whether a completion holds: applied, or not applied because an earlier
/// attempt of ours already did it (a retry after an unknown outcome).
pub(crate) fn completion_holds(done: &ClaimRow, answer: &LwtAnswer) -> bool {
    answer.applied || matches!(&answer.row, Shown::Row(row) if row == done)
}

/// How a failed statement is handled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ErrorClass {
    /// The statement may or may not have been applied: settle it with a SERIAL read.
    Ambiguous,
    /// It did not run (or was a read): retry later.
    Retriable,
    /// Retrying cannot help: a bad statement, schema or credentials.
    Fatal,
}

/// Sorts a driver error into what the store does next.
pub(crate) fn classify(error: &ExecutionError) -> ErrorClass {
    match error {
        // The client stopped waiting; the coordinator may still have run it.
        ExecutionError::RequestTimeout(_) => ErrorClass::Ambiguous,
        ExecutionError::LastAttemptError(attempt) => match attempt {
            RequestAttemptError::DbError(db, _) => classify_db(db),
            // Sent, then the connection broke: the node may have run it.
            RequestAttemptError::BrokenConnectionError(_) => ErrorClass::Ambiguous,
            RequestAttemptError::UnableToAllocStreamId => ErrorClass::Retriable,
            RequestAttemptError::SerializationError(_) | RequestAttemptError::CqlRequestSerialization(_) => {
                ErrorClass::Fatal
            }
            _ => ErrorClass::Retriable,
        },
        ExecutionError::BadQuery(_) => ErrorClass::Fatal,
        // No connection, empty plan, schema agreement, metadata: nothing ran.
        _ => ErrorClass::Retriable,
    }
}

fn classify_db(db: &DbError) -> ErrorClass {
    match db {
        // A write timeout in any phase of Paxos (CAS) or in its commit (SIMPLE)
        // leaves the outcome unknown; a write failure may have reached some replicas.
        DbError::WriteTimeout { .. } | DbError::WriteFailure { .. } => ErrorClass::Ambiguous,
        DbError::Unavailable { .. }
        | DbError::Overloaded
        | DbError::IsBootstrapping
        | DbError::ReadTimeout { .. }
        | DbError::ReadFailure { .. }
        | DbError::Unprepared { .. }
        | DbError::ServerError
        | DbError::TruncateError
        | DbError::RateLimitReached { .. } => ErrorClass::Retriable,
        DbError::SyntaxError
        | DbError::Invalid
        | DbError::AlreadyExists { .. }
        | DbError::FunctionFailure { .. }
        | DbError::AuthenticationError
        | DbError::Unauthorized
        | DbError::ConfigError
        | DbError::ProtocolError => ErrorClass::Fatal,
        _ => ErrorClass::Retriable,
    }
}

fn scylla_error(context: &str, error: &ExecutionError) -> StoreError {
    StoreError::Scylla { message: format!("{context}: {error}"), retriable: classify(error) != ErrorClass::Fatal }
}

// ---------------------------------------------------------------------------
// The store
// ---------------------------------------------------------------------------

/// The ScyllaDB store: claims by lightweight transactions (`INSERT … IF NOT EXISTS USING TTL`),
/// completions and takeovers conditional too. Cheap to clone.
#[derive(Clone)]
pub struct ScyllaStore {
    inner: Arc<Inner>,
}

struct Inner {
    config: ScyllaConfig,
    retention: Retention,
    cql: Cql,
    ttl_ms: u64,
    lease_ms: u64,
    connected: OnceCell<Connected>,
    /// Claims this store granted and not yet completed or released, by key
    /// (a key has one claim at a time: a newer grant replaces an older one):
    /// completion rewrites the whole row with its TTL, and the response
    /// recorded for it.
    granted: Mutex<HashMap<EventKey, Granted>>,
    round_trips: AtomicU64,
    ops: StoreOpMetrics,
}

struct Connected {
    session: Session,
    insert: PreparedStatement,
    take_over_expired: PreparedStatement,
    take_over_lapsed: PreparedStatement,
    rewrite_own: PreparedStatement,
    complete: PreparedStatement,
    release: PreparedStatement,
    forget: PreparedStatement,
    /// Plain read at the configured consistency (the Bloom route's cheap read).
    read: PreparedStatement,
    /// The same read at SERIAL / LOCAL_SERIAL: sees (and finishes) Paxos rounds in progress.
    serial_read: PreparedStatement,
    response: PreparedStatement,
    sweep_scan: PreparedStatement,
    sweep_delete: PreparedStatement,
}

/// A claim this store holds: its row as written, and the effect's response
/// once recorded (written by the completion, in the same Paxos round).
struct Granted {
    row: ClaimRow,
    response: Option<EffectResponse>,
}

/// An LWT's result: answered, or unknown (to be settled by a SERIAL read).
enum Lwt {
    Answer(LwtAnswer),
    Unknown,
}

type Values<'a> = (i8, &'a [u8], &'a str, i32, i64, i64, i64, i64);

fn row_values<'a>(row: &'a ClaimRow, fingerprint: &'a [u8; 16]) -> Values<'a> {
    (
        match row.state {
            ClaimState::InFlight => 1,
            ClaimState::Done => 2,
        },
        fingerprint.as_slice(),
        &row.position.topic,
        row.position.partition,
        row.position.offset,
        row.claimed_at_ms as i64,
        row.lease_until_ms as i64,
        row.expires_at_ms as i64,
    )
}

type OwnValues<'a> = (i32, i8, &'a [u8], &'a str, i32, i64, i64, i64, i64, &'a str, &'a [u8], &'a str, i32, i64, i64);

/// Values of `rewrite_own`: the new row, conditional on the row we hold.
fn rewrite_own_values<'a>(
    key: &'a EventKey,
    held: &'a ClaimRow,
    new: &'a ClaimRow,
    fingerprint: &'a [u8; 16],
    now_ms: u64,
) -> OwnValues<'a> {
    let (st, sc, to, pa, of, ca, lu, ea) = row_values(new, fingerprint);
    let ttl = ttl_secs(new.expires_at_ms, now_ms);
    (
        ttl,
        st,
        sc,
        to,
        pa,
        of,
        ca,
        lu,
        ea,
        &*key.scope,
        key.id.as_slice(),
        &*held.position.topic,
        held.position.partition,
        held.position.offset,
        held.expires_at_ms as i64,
    )
}

impl ScyllaStore {
    /// Checks the configuration; connects on first use.
    pub fn open(config: &ScyllaConfig, retention: &Retention) -> Result<ScyllaStore, StoreError> {
        if let Some(tls) = &config.tls {
            // Fail at start on a bad CA file rather than on first use.
            tls_config(tls.ca_file.as_deref())?;
        }
        Ok(ScyllaStore {
            inner: Arc::new(Inner {
                cql: Cql::new(&config.keyspace),
                config: config.clone(),
                retention: retention.clone(),
                ttl_ms: retention.ttl.as_millis() as u64,
                lease_ms: retention.lease.as_millis() as u64,
                connected: OnceCell::new(),
                granted: Mutex::new(HashMap::new()),
                round_trips: AtomicU64::new(0),
                ops: StoreOpMetrics::new(),
            }),
        })
    }

    /// Per-statement metrics, for the service to expose.
    pub fn op_metrics(&self) -> &StoreOpMetrics {
        &self.inner.ops
    }

    /// Creates the keyspace (tablets off where the server has them) and the
    /// table if missing, then waits for the cluster to agree on the schema.
    pub async fn apply_schema(&self) -> Result<(), StoreError> {
        let session = self.session_only().await?;
        let rendered = render_schema(&self.inner.config, &self.inner.retention);
        // Schema changes go through the cluster's schema agreement: give them time.
        let ddl = |text: &str| {
            let mut statement = scylla::statement::Statement::new(text);
            statement.set_request_timeout(Some(SCHEMA_TIMEOUT));
            statement
        };
        for statement in schema_statements(&rendered) {
            match session.query_unpaged(ddl(&statement), ()).await {
                Ok(_) => {}
                Err(e) if statement.starts_with("CREATE KEYSPACE") && rejects_tablets_option(&e.to_string()) => {
                    info!(error = %e, "the server does not know tablets; creating the keyspace without the option");
                    session
                        .query_unpaged(ddl(&without_tablets_option(&statement)), ())
                        .await
                        .map_err(|e| scylla_error("creating the keyspace", &e))?;
                }
                Err(e) => return Err(scylla_error(&format!("applying `{statement}`"), &e)),
            }
        }
        // Tables made before the `response` column: CQL has no `ADD IF NOT
        // EXISTS` on every server, so ask first; a concurrent apply that added
        // it in between is no failure.
        if !self.has_response_column(&session).await? {
            if let Err(e) = session.query_unpaged(ddl(&self.inner.cql.add_response), ()).await {
                if !self.has_response_column(&session).await? {
                    return Err(scylla_error(&format!("applying `{}`", self.inner.cql.add_response), &e));
                }
            }
            info!(keyspace = %self.inner.config.keyspace, "added the response column to {TABLE}");
        }
        session.await_schema_agreement().await.map_err(|e| StoreError::Scylla {
            message: format!("the nodes did not agree on the new schema: {e}"),
            retriable: true,
        })?;
        Ok(())
    }

    /// Fails with a clear error when the table is missing; a cluster that does
    /// not answer is not an error here (the pipeline waits for it).
    pub async fn check_schema(&self, config_file: Option<&std::path::Path>) -> Result<(), StoreError> {
        let apply = crate::config::schema_apply_command(config_file);
        let Ok(session) = self.session_only().await else { return Ok(()) };
        let found = session
            .query_unpaged(
                "SELECT table_name FROM system_schema.tables WHERE keyspace_name = ? AND table_name = ?",
                (self.inner.config.keyspace.as_str(), TABLE),
            )
            .await;
        let Ok(found) = found else { return Ok(()) };
        let rows = found.into_rows_result().map(|r| r.rows_num()).unwrap_or(1);
        if rows == 0 {
            return Err(StoreError::Config(format!(
                "table {}.{TABLE} does not exist: run `{apply}` first",
                self.inner.config.keyspace
            )));
        }
        if let Ok(false) = self.has_response_column(&session).await {
            return Err(StoreError::Config(format!(
                "table {}.{TABLE} has no `response` column (made by an older kdedup): run `{apply}` to add it",
                self.inner.config.keyspace
            )));
        }
        Ok(())
    }

    async fn has_response_column(&self, session: &Session) -> Result<bool, StoreError> {
        let found = session
            .query_unpaged(RESPONSE_COLUMN, (self.inner.config.keyspace.as_str(), TABLE))
            .await
            .map_err(|e| scylla_error("reading the table's columns", &e))?;
        let rows = found.into_rows_result().map_err(|e| StoreError::Corrupt(format!("system_schema.columns: {e}")))?;
        Ok(rows.rows_num() > 0)
    }

    /// The session alone (schema work needs no prepared statements, and the
    /// table they name may not exist yet).
    async fn session_only(&self) -> Result<Session, StoreError> {
        connect(&self.inner.config).await.map(|(session, _)| session)
    }

    async fn connected(&self) -> Result<&Connected, StoreError> {
        self.inner.connected.get_or_try_init(|| prepare_all(&self.inner.config, &self.inner.cql)).await
    }

    fn observe(&self, op: &str, result: &str, started: Instant) {
        self.inner.round_trips.fetch_add(1, Ordering::Relaxed);
        self.inner.ops.observe(STORE, op, result, started.elapsed().as_secs_f64());
    }

    /// Runs one lightweight transaction; an unknown outcome is returned as such.
    async fn lwt(&self, op: &str, statement: &PreparedStatement, values: impl SerializeRow) -> Result<Lwt, StoreError> {
        let c = self.connected().await?;
        let started = Instant::now();
        match c.session.execute_unpaged(statement, values).await {
            Ok(result) => {
                let answer = first_row(result, lwt_answer)?.ok_or_else(|| {
                    StoreError::Corrupt("ScyllaDB answered a lightweight transaction with no row".into())
                })?;
                self.observe(op, if answer.applied { "applied" } else { "not_applied" }, started);
                Ok(Lwt::Answer(answer))
            }
            Err(e) => match classify(&e) {
                ErrorClass::Ambiguous => {
                    self.observe(op, "timeout", started);
                    warn!(op, error = %e, "lightweight transaction outcome unknown; settling it with a SERIAL read");
                    Ok(Lwt::Unknown)
                }
                _ => {
                    self.observe(op, "error", started);
                    Err(scylla_error(op, &e))
                }
            },
        }
    }

    /// The row as a plain read (`serial = false`) or a SERIAL read shows it.
    async fn read_row(&self, key: &EventKey, serial: bool) -> Result<Option<ClaimRow>, StoreError> {
        let c = self.connected().await?;
        let (op, statement) = if serial { ("serial_read", &c.serial_read) } else { ("read", &c.read) };
        let started = Instant::now();
        let result = c.session.execute_unpaged(statement, (&*key.scope, key.id.as_slice())).await.map_err(|e| {
            self.observe(op, if classify(&e) == ErrorClass::Ambiguous { "timeout" } else { "error" }, started);
            scylla_error(op, &e)
        })?;
        self.observe(op, "ok", started);
        match first_row(result, shown_row)? {
            None | Some(Shown::Absent) => Ok(None),
            Some(Shown::Row(row)) => Ok(Some(row)),
            Some(Shown::Partial) => Err(StoreError::Corrupt("ScyllaDB row has null claim columns".into())),
        }
    }

    /// The row an LWT's answer shows, reading it (SERIAL) when the answer holds only part of it.
    async fn row_of(&self, key: &EventKey, shown: Shown) -> Result<Option<ClaimRow>, StoreError> {
        match shown {
            Shown::Absent => Ok(None),
            Shown::Row(row) => Ok(Some(row)),
            Shown::Partial => self.read_row(key, true).await,
        }
    }

    /// Claims one key: insert, or take over / resume what the rejected row allows.
    async fn claim_one(&self, request: &ClaimRequest, now_ms: u64) -> Result<Claim, StoreError> {
        let c = self.connected().await?;
        let key = &request.key;
        let (ttl_ms, lease_ms) = (self.inner.ttl_ms, self.inner.lease_ms);
        let mut step = Step::Insert;
        for _ in 0..MAX_ROUNDS {
            if let Step::Answer(claim) = step {
                return Ok(claim);
            }
            let intended =
                intended_row(&step, request, now_ms, lease_ms, ttl_ms).expect("every step but an answer writes a row");
            let fp = intended.fingerprint.0.to_be_bytes();
            let (st, sc, to, pa, of, ca, lu, ea) = row_values(&intended, &fp);
            let ttl = ttl_secs(intended.expires_at_ms, now_ms);
            let (scope, id, now) = (&*key.scope, key.id.as_slice(), now_ms as i64);
            let lwt = match &step {
                Step::Insert => self.lwt("insert", &c.insert, (scope, id, st, sc, to, pa, of, ca, lu, ea, ttl)).await?,
                Step::TakeOverExpired => {
                    self.lwt("takeover", &c.take_over_expired, (ttl, st, sc, to, pa, of, ca, lu, ea, scope, id, now))
                        .await?
                }
                Step::TakeOverLapsed => {
                    // Lapsed for one lease more (see `decide`).
                    let lapsed_before = now - lease_ms as i64;
                    self.lwt(
                        "takeover",
                        &c.take_over_lapsed,
                        (ttl, st, sc, to, pa, of, ca, lu, ea, scope, id, lapsed_before),
                    )
                    .await?
                }
                Step::Resume(old) => {
                    let expected =
                        (&*old.position.topic, old.position.partition, old.position.offset, old.expires_at_ms as i64);
                    let values = (
                        ttl, st, sc, to, pa, of, ca, lu, ea, scope, id, expected.0, expected.1, expected.2, expected.3,
                    );
                    self.lwt("resume", &c.rewrite_own, values).await?
                }
                Step::Answer(_) => unreachable!("answers return before a statement is chosen"),
            };
            let existing = match lwt {
                Lwt::Answer(answer) if answer.applied => {
                    self.remember(key, &intended, now_ms, matches!(step, Step::Resume(_)));
                    return Ok(Claim::New(step.acquired()));
                }
                Lwt::Answer(answer) => self.row_of(key, answer.row).await?,
                Lwt::Unknown => {
                    let current = self.read_row(key, true).await?;
                    if shows_our_write(&intended, current.as_ref()) {
                        self.remember(key, &intended, now_ms, matches!(step, Step::Resume(_)));
                        return Ok(Claim::New(step.acquired()));
                    }
                    current
                }
            };
            step = next_step(existing.as_ref(), request, now_ms, lease_ms);
        }
        Err(StoreError::Scylla { message: format!("claims of key {} kept racing", key.display_id()), retriable: true })
    }

    /// Completes one claim; `false` when this position no longer holds it.
    async fn complete_one(&self, key: &EventKey, position: &Position, now_ms: u64) -> Result<bool, StoreError> {
        let c = self.connected().await?;
        let (granted, response) = match self.forget_granted(key, position) {
            Some(g) => (Some(g.row), g.response),
            None => (None, None),
        };
        let Some(held) = self.held_row(key, position, granted, now_ms).await? else { return Ok(false) };
        let done = ClaimRow { state: ClaimState::Done, lease_until_ms: 0, ..held.clone() };
        let fp = done.fingerprint.0.to_be_bytes();
        // Unset, not null, when nothing was recorded: no tombstone is written.
        let response = match &response {
            Some(r) => MaybeUnset::Set(r.encode()),
            None => MaybeUnset::Unset,
        };
        let (ttl, st, sc, to, pa, of, ca, lu, ea, scope, id, h_to, h_pa, h_of, h_ea) =
            rewrite_own_values(key, &held, &done, &fp, now_ms);
        let values = (ttl, st, sc, to, pa, of, ca, lu, ea, &response, scope, id, h_to, h_pa, h_of, h_ea);
        // At most two attempts: the second only after an unknown outcome that the
        // SERIAL read shows still pending (our row, still in flight).
        for _ in 0..2 {
            match self.lwt("complete", &c.complete, values).await? {
                Lwt::Answer(answer) => {
                    let answer = match answer.row {
                        Shown::Partial => {
                            LwtAnswer { applied: answer.applied, row: shown(self.row_of(key, Shown::Partial).await?) }
                        }
                        _ => answer,
                    };
                    return Ok(completion_holds(&done, &answer));
                }
                Lwt::Unknown => match self.read_row(key, true).await? {
                    Some(row) if row == done => return Ok(true),
                    Some(row) if row == held => continue,
                    _ => return Ok(false),
                },
            }
        }
        Err(StoreError::Scylla {
            message: format!("completion of key {} stayed unknown", key.display_id()),
            retriable: true,
        })
    }

    /// Extends the lease of one claim this position holds: a conditional rewrite
    /// of our own in-flight row, like completion; `false` when it is no longer ours.
    async fn renew_one(&self, key: &EventKey, position: &Position, now_ms: u64) -> Result<bool, StoreError> {
        let c = self.connected().await?;
        let granted = self
            .inner
            .granted
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(key)
            .filter(|g| &g.row.position == position)
            .map(|g| g.row.clone());
        let Some(held) = self.held_row(key, position, granted, now_ms).await? else { return Ok(false) };
        let renewed =
            ClaimRow { lease_until_ms: (now_ms + self.inner.lease_ms).max(held.lease_until_ms), ..held.clone() };
        let fp = renewed.fingerprint.0.to_be_bytes();
        let values = rewrite_own_values(key, &held, &renewed, &fp, now_ms);
        let applied = match self.lwt("renew", &c.rewrite_own, values).await? {
            Lwt::Answer(answer) => answer.applied,
            Lwt::Unknown => self.read_row(key, true).await?.is_some_and(|row| row == renewed),
        };
        if applied {
            self.remember(key, &renewed, now_ms, true);
        }
        Ok(applied)
    }

    /// The live in-flight row this position holds: as this store granted it, or
    /// (not granted here: a restart in between) the row as it is now.
    async fn held_row(
        &self,
        key: &EventKey,
        position: &Position,
        granted: Option<ClaimRow>,
        now_ms: u64,
    ) -> Result<Option<ClaimRow>, StoreError> {
        let held = match granted {
            Some(row) => Some(row),
            None => {
                self.read_row(key, true).await?.filter(|r| r.state == ClaimState::InFlight && &r.position == position)
            }
        };
        Ok(held.filter(|row| row.expires_at_ms > now_ms))
    }

    async fn release_one(&self, key: &EventKey, position: &Position) -> Result<(), StoreError> {
        let c = self.connected().await?;
        self.forget_granted(key, position);
        let values = (&*key.scope, key.id.as_slice(), &*position.topic, position.partition, position.offset);
        for _ in 0..2 {
            match self.lwt("release", &c.release, values).await? {
                Lwt::Answer(_) => return Ok(()),
                Lwt::Unknown => match self.read_row(key, true).await? {
                    Some(row) if row.state == ClaimState::InFlight && &row.position == position => continue,
                    _ => return Ok(()),
                },
            }
        }
        Err(StoreError::Scylla {
            message: format!("release of key {} stayed unknown", key.display_id()),
            retriable: true,
        })
    }

    /// Keeps a claim's row for its completion; `keep_response`: the same claim
    /// (resumed or renewed) keeps the response recorded for it, a new one starts without.
    fn remember(&self, key: &EventKey, row: &ClaimRow, now_ms: u64, keep_response: bool) {
        let mut granted = self.inner.granted.lock().unwrap_or_else(|p| p.into_inner());
        if granted.len() >= GRANTED_SOFT_LIMIT {
            // Claims never completed nor released (a partition revoked mid-batch):
            // once expired, no completion could use them.
            granted.retain(|_, g| g.row.expires_at_ms > now_ms);
        }
        let response = match granted.get(key) {
            Some(g) if keep_response && g.row.position == row.position => g.response.clone(),
            _ => None,
        };
        granted.insert(key.clone(), Granted { row: row.clone(), response });
    }

    /// Keeps a response for the completion of a claim this position holds;
    /// `false` when it holds none (taken over, released, expired) as far as
    /// this store knows: a takeover by another process shows at completion.
    async fn record_one(
        &self,
        key: &EventKey,
        position: &Position,
        response: EffectResponse,
    ) -> Result<bool, StoreError> {
        {
            let mut granted = self.inner.granted.lock().unwrap_or_else(|p| p.into_inner());
            match granted.get_mut(key) {
                Some(g) if &g.row.position == position => {
                    g.response = Some(response);
                    return Ok(true);
                }
                // Another position's claim was granted since: this one's is gone.
                Some(_) => return Ok(false),
                None => {}
            }
        }
        // Not granted by this store (claimed before a restart): the row as it is now.
        let now = super::now_ms();
        let Some(row) = self.held_row(key, position, None, now).await? else { return Ok(false) };
        let mut granted = self.inner.granted.lock().unwrap_or_else(|p| p.into_inner());
        granted.insert(key.clone(), Granted { row, response: Some(response) });
        Ok(true)
    }

    fn forget_granted(&self, key: &EventKey, position: &Position) -> Option<Granted> {
        let mut granted = self.inner.granted.lock().unwrap_or_else(|p| p.into_inner());
        match granted.get(key) {
            Some(g) if &g.row.position == position => granted.remove(key),
            _ => None,
        }
    }

    /// Runs `f` over `items` with at most `max_in_flight` at once; answers in item order.
    async fn each<T, R, F, Fut>(&self, items: Vec<T>, f: F) -> Result<Vec<R>, StoreError>
    where
        F: Fn(T) -> Fut,
        Fut: std::future::Future<Output = Result<R, StoreError>>,
    {
        let mut answers: Vec<(usize, R)> = stream::iter(items.into_iter().enumerate().map(|(i, item)| {
            let call = f(item);
            async move { call.await.map(|r| (i, r)) }
        }))
        .buffer_unordered(self.inner.config.max_in_flight.get())
        .try_collect()
        .await?;
        answers.sort_unstable_by_key(|(i, _)| *i);
        Ok(answers.into_iter().map(|(_, r)| r).collect())
    }
}

fn shown(row: Option<ClaimRow>) -> Shown {
    row.map_or(Shown::Absent, Shown::Row)
}

/// Applies `read` to the first row of a result, with the column names.
fn first_row<T>(
    result: QueryResult,
    read: impl FnOnce(&[&str], &[Option<CqlValue>]) -> Result<T, StoreError>,
) -> Result<Option<T>, StoreError> {
    let rows = result
        .into_rows_result()
        .map_err(|e| StoreError::Corrupt(format!("ScyllaDB answered without rows where rows were due: {e}")))?;
    let names: Vec<&str> = rows.column_specs().iter().map(|c| c.name()).collect();
    let mut iter = rows.rows::<Row>().map_err(|e| StoreError::Corrupt(format!("ScyllaDB rows: {e}")))?;
    match iter.next() {
        None => Ok(None),
        Some(row) => {
            let row = row.map_err(|e| StoreError::Corrupt(format!("ScyllaDB row: {e}")))?;
            read(&names, &row.columns).map(Some)
        }
    }
}

/// Groups request indexes by key, first appearance first, each group in request order.
pub(crate) fn group_by_key(keys: &[&EventKey]) -> Vec<Vec<usize>> {
    let mut at: HashMap<&EventKey, usize> = HashMap::new();
    let mut groups: Vec<Vec<usize>> = Vec::new();
    for (i, key) in keys.iter().enumerate() {
        match at.get(key) {
            Some(&g) => groups[g].push(i),
            None => {
                at.insert(key, groups.len());
                groups.push(vec![i]);
            }
        }
    }
    groups
}

// ---------------------------------------------------------------------------
// Connecting
// ---------------------------------------------------------------------------

fn tls_config(ca_file: Option<&Path>) -> Result<Arc<rustls::ClientConfig>, StoreError> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::CertificateDer;
    let bad = |message: String| StoreError::Config(message);
    let mut roots = rustls::RootCertStore::empty();
    match ca_file {
        Some(path) => {
            let certs = CertificateDer::pem_file_iter(path)
                .map_err(|e| bad(format!("[store] tls_ca_file {}: {e}", path.display())))?;
            for cert in certs {
                let cert = cert.map_err(|e| bad(format!("[store] tls_ca_file {}: {e}", path.display())))?;
                roots.add(cert).map_err(|e| bad(format!("[store] tls_ca_file {}: {e}", path.display())))?;
            }
            if roots.is_empty() {
                return Err(bad(format!("[store] tls_ca_file {} holds no PEM certificate", path.display())));
            }
        }
        None => {
            let found = rustls_native_certs::load_native_certs();
            for cert in found.certs {
                let _ = roots.add(cert);
            }
            if roots.is_empty() {
                return Err(bad("[store] tls = true but the system has no CA certificates; set tls_ca_file".into()));
            }
        }
    }
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| bad(format!("TLS setup: {e}")))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Arc::new(config))
}

/// The execution profiles, one per statement kind.
struct Profiles {
    lwt: ExecutionProfileHandle,
    read: ExecutionProfileHandle,
    serial_read: ExecutionProfileHandle,
    scan: ExecutionProfileHandle,
}

fn profiles(config: &ScyllaConfig) -> Profiles {
    let local = config.consistency == ScyllaConsistency::LocalQuorum
        || config.serial_consistency == ScyllaSerialConsistency::LocalSerial;
    // Token-aware (replicas first, shard-aware connections come with the
    // driver), local datacenter only when any LOCAL_* level is in use: a
    // coordinator in another datacenter would make "local" mean that one.
    let policy = DefaultPolicy::builder()
        .prefer_datacenter(config.local_datacenter.clone())
        .token_aware(true)
        .permit_dc_failover(!local)
        .build();
    let consistency = match config.consistency {
        ScyllaConsistency::LocalQuorum => Consistency::LocalQuorum,
        ScyllaConsistency::Quorum => Consistency::Quorum,
    };
    let (serial, serial_read) = match config.serial_consistency {
        ScyllaSerialConsistency::LocalSerial => (SerialConsistency::LocalSerial, Consistency::LocalSerial),
        ScyllaSerialConsistency::Serial => (SerialConsistency::Serial, Consistency::Serial),
    };
    let base = ExecutionProfile::builder()
        .load_balancing_policy(policy)
        .request_timeout(Some(config.request_timeout))
        .consistency(consistency)
        .serial_consistency(None);
    Profiles {
        lwt: base.clone().serial_consistency(Some(serial)).build().into_handle(),
        read: base.clone().build().into_handle(),
        serial_read: base.clone().consistency(serial_read).build().into_handle(),
        // A sweep scans the table: give its pages more time.
        scan: base.request_timeout(Some(config.request_timeout * 4)).build().into_handle(),
    }
}

async fn connect(config: &ScyllaConfig) -> Result<(Session, Profiles), StoreError> {
    let profiles = profiles(config);
    let mut builder = SessionBuilder::new()
        .known_nodes(&config.contact_points)
        .prefer_datacenter(config.local_datacenter.clone())
        .connection_timeout(config.connect_timeout)
        .default_execution_profile_handle(profiles.read.clone());
    if let Some((user, password)) = &config.credentials {
        builder = builder.user(user, password.expose());
    }
    if let Some(tls) = &config.tls {
        builder = builder.tls_context(Some(tls_config(tls.ca_file.as_deref())?));
    }
    let session = builder.build().await.map_err(|e| StoreError::Scylla {
        message: format!("cannot connect to {}: {e}", config.contact_points.join(", ")),
        retriable: true,
    })?;
    Ok((session, profiles))
}

async fn prepare_all(config: &ScyllaConfig, cql: &Cql) -> Result<Connected, StoreError> {
    let (session, profiles) = connect(config).await?;
    let prepare = |text: &str, profile: &ExecutionProfileHandle, idempotent: bool| {
        let session = &session;
        let text = text.to_string();
        let profile = profile.clone();
        async move {
            let mut statement = session.prepare(text.as_str()).await.map_err(|e| {
                let missing = e.to_string().contains(TABLE) || e.to_string().to_ascii_lowercase().contains("keyspace");
                StoreError::Scylla {
                    message: format!(
                        "cannot prepare `{text}`: {e}{}",
                        if missing { " (has `kdedup schema apply` run?)" } else { "" }
                    ),
                    retriable: true,
                }
            })?;
            statement.set_execution_profile_handle(Some(profile));
            // LWTs are not idempotent: the driver must not retry them on a timeout
            // by itself; an unknown outcome is settled here, by a SERIAL read.
            statement.set_is_idempotent(idempotent);
            Ok::<_, StoreError>(statement)
        }
    };
    let p = &profiles;
    let connected = Connected {
        insert: prepare(&cql.insert, &p.lwt, false).await?,
        take_over_expired: prepare(&cql.take_over_expired, &p.lwt, false).await?,
        take_over_lapsed: prepare(&cql.take_over_lapsed, &p.lwt, false).await?,
        rewrite_own: prepare(&cql.rewrite_own, &p.lwt, false).await?,
        complete: prepare(&cql.complete, &p.lwt, false).await?,
        release: prepare(&cql.release, &p.lwt, false).await?,
        forget: prepare(&cql.forget, &p.lwt, false).await?,
        read: prepare(&cql.read, &p.read, true).await?,
        serial_read: prepare(&cql.read, &p.serial_read, true).await?,
        response: prepare(&cql.response, &p.read, true).await?,
        sweep_scan: {
            let mut s = prepare(&cql.sweep_scan, &p.scan, true).await?;
            s.set_page_size(1000);
            s
        },
        sweep_delete: prepare(&cql.sweep_delete, &p.lwt, false).await?,
        session,
    };
    Ok(connected)
}

// ---------------------------------------------------------------------------
// The contract
// ---------------------------------------------------------------------------

impl DedupStore for ScyllaStore {
    async fn claim(&self, requests: Vec<ClaimRequest>, now_ms: u64) -> Result<Vec<Claim>, StoreError> {
        let keys: Vec<&EventKey> = requests.iter().map(|r| &r.key).collect();
        let groups = group_by_key(&keys);
        let requests = &requests;
        // Keys run concurrently; one key's requests run in order, so a repeat
        // sees the earlier request's write.
        let answered = self
            .each(groups, |group| async move {
                let mut out = Vec::with_capacity(group.len());
                for i in group {
                    out.push((i, self.claim_one(&requests[i], now_ms).await?));
                }
                Ok(out)
            })
            .await?;
        let mut answers: Vec<Option<Claim>> = vec![None; requests.len()];
        for (i, claim) in answered.into_iter().flatten() {
            answers[i] = Some(claim);
        }
        Ok(answers.into_iter().map(|a| a.expect("group_by_key covers every request index exactly once")).collect())
    }

    async fn complete(&self, done: Vec<(EventKey, Position)>, now_ms: u64) -> Result<Vec<bool>, StoreError> {
        self.each(done, |(key, position)| async move { self.complete_one(&key, &position, now_ms).await }).await
    }

    async fn renew(&self, held: Vec<(EventKey, Position)>, now_ms: u64) -> Result<Vec<bool>, StoreError> {
        self.each(held, |(key, position)| async move { self.renew_one(&key, &position, now_ms).await }).await
    }

    async fn release(&self, keys: Vec<(EventKey, Position)>) -> Result<(), StoreError> {
        self.each(keys, |(key, position)| async move { self.release_one(&key, &position).await }).await.map(drop)
    }

    /// Kept with the claim in memory and written by the conditional update
    /// that completes it (one Paxos round, not two; the cell gets the row's
    /// TTL). A crash before completion loses it with the claim's completion:
    /// the redelivery runs the effect again and records its answer.
    async fn record(&self, responses: Vec<(EventKey, Position, EffectResponse)>) -> Result<Vec<bool>, StoreError> {
        self.each(
            responses,
            |(key, position, response)| async move { self.record_one(&key, &position, response).await },
        )
        .await
    }

    async fn response(&self, key: EventKey, now_ms: u64) -> Result<Option<EffectResponse>, StoreError> {
        let c = self.connected().await?;
        let started = Instant::now();
        let result = c.session.execute_unpaged(&c.response, (&*key.scope, key.id.as_slice())).await.map_err(|e| {
            self.observe("response", "error", started);
            scylla_error("response", &e)
        })?;
        self.observe("response", "ok", started);
        let rows = result
            .into_rows_result()
            .map_err(|e| StoreError::Corrupt(format!("ScyllaDB answered without rows where rows were due: {e}")))?;
        let row = rows
            .maybe_first_row::<(Option<String>, Option<i64>)>()
            .map_err(|e| StoreError::Corrupt(format!("ScyllaDB response row: {e}")))?;
        match row {
            Some((Some(text), Some(expires_at_ms))) if expires_at_ms > now_ms as i64 => {
                EffectResponse::decode(&text).map(Some)
            }
            _ => Ok(None),
        }
    }

    /// The Bloom route's cheap read: a plain read at the configured quorum, no Paxos.
    async fn lookup(&self, keys: Vec<EventKey>, now_ms: u64) -> Result<Vec<Option<ClaimRow>>, StoreError> {
        self.each(
            keys,
            |key| async move { Ok(self.read_row(&key, false).await?.filter(|row| row.expires_at_ms > now_ms)) },
        )
        .await
    }

    async fn forget(&self, key: EventKey) -> Result<bool, StoreError> {
        let c = self.connected().await?;
        // Whether it existed is what the SERIAL read shows; the delete then only
        // has to leave it gone (not applied = someone else deleted it first).
        if self.read_row(&key, true).await?.is_none() {
            return Ok(false);
        }
        for _ in 0..2 {
            match self.lwt("forget", &c.forget, (&*key.scope, key.id.as_slice())).await? {
                Lwt::Answer(_) => return Ok(true),
                Lwt::Unknown => {
                    if self.read_row(&key, true).await?.is_none() {
                        return Ok(true);
                    }
                }
            }
        }
        Err(StoreError::Scylla {
            message: format!("forgetting key {} stayed unknown", key.display_id()),
            retriable: true,
        })
    }

    /// [`super::kept_on_release`] as the delete's condition (`IF claimed_at_ms <
    /// cut-off AND lease_until_ms <= now - lease`: a done row's lease is 0, so
    /// done rows pass; an expired row is already gone by its TTL). Prepared per
    /// call, like the statement of a rare operator action: it stays beside its
    /// one use. An unknown outcome is settled by a SERIAL read.
    async fn release_unless_live(
        &self,
        key: EventKey,
        now_ms: u64,
        claimed_before_ms: u64,
    ) -> Result<Released, StoreError> {
        let c = self.connected().await?;
        let text = format!(
            "DELETE FROM {}.{TABLE} WHERE scope = ? AND event_id = ? IF claimed_at_ms < ? AND lease_until_ms <= ?",
            self.inner.config.keyspace
        );
        let mut statement = c.session.prepare(text).await.map_err(|e| StoreError::Scylla {
            message: format!("cannot prepare the replay's release: {e}"),
            retriable: true,
        })?;
        statement.set_execution_profile_handle(c.forget.get_execution_profile_handle().cloned());
        statement.set_is_idempotent(false);
        let lapsed_before = now_ms.saturating_sub(self.inner.lease_ms) as i64;
        let values = (&*key.scope, key.id.as_slice(), claimed_before_ms as i64, lapsed_before);
        let kept = |row: ClaimRow| super::kept_on_release(&row, now_ms, self.inner.lease_ms, claimed_before_ms);
        for _ in 0..2 {
            match self.lwt("release_unless_live", &statement, values).await? {
                Lwt::Answer(answer) if answer.applied => return Ok(Released::Deleted),
                Lwt::Answer(_) | Lwt::Unknown => match self.read_row(&key, true).await? {
                    None => return Ok(Released::Absent),
                    // Past its expiry, only the TTL's rounding up keeps it.
                    Some(row) if row.expires_at_ms <= now_ms => return Ok(Released::Absent),
                    Some(row) => match kept(row) {
                        Some(why) => return Ok(why),
                        None => continue,
                    },
                },
            }
        }
        Err(StoreError::Scylla {
            message: format!("releasing key {} stayed unknown", key.display_id()),
            retriable: true,
        })
    }

    /// Scans the table for rows past `expires_at_ms` and deletes them (`IF`
    /// still expired). ScyllaDB's TTL removes rows by itself, so the service
    /// does not schedule this; it serves the contract and an operator.
    async fn sweep(&self, now_ms: u64) -> Result<usize, StoreError> {
        let c = self.connected().await?;
        let started = Instant::now();
        let pager = c.session.execute_iter(c.sweep_scan.clone(), (now_ms as i64,)).await.map_err(|e| {
            self.observe("scan", "error", started);
            StoreError::Scylla { message: format!("sweep scan: {e}"), retriable: true }
        })?;
        let mut rows = pager
            .rows_stream::<(String, Vec<u8>, Option<i64>)>()
            .map_err(|e| StoreError::Corrupt(format!("sweep scan columns: {e}")))?;
        let mut expired = Vec::new();
        while let Some(row) = rows.next().await {
            let (scope, id, _) =
                row.map_err(|e| StoreError::Scylla { message: format!("sweep scan: {e}"), retriable: true })?;
            expired.push(EventKey { scope: Arc::from(scope), id });
        }
        self.observe("scan", "ok", started);
        let removed = self
            .each(expired, |key| async move {
                // An unknown outcome is not settled here: the condition only ever
                // removes an expired row, and the next sweep finds it if it stayed.
                match self.lwt("sweep_delete", &c.sweep_delete, (&*key.scope, key.id.as_slice(), now_ms as i64)).await?
                {
                    Lwt::Answer(answer) => Ok(usize::from(answer.applied)),
                    Lwt::Unknown => Ok(0),
                }
            })
            .await?;
        Ok(removed.into_iter().sum())
    }

    /// Nothing to do: an acknowledged LWT is in a quorum of replicas' commit
    /// logs (ScyllaDB syncs the commit log for every LWT write).
    fn sync(&self) -> Result<(), StoreError> {
        Ok(())
    }

    fn stats(&self) -> StoreStats {
        StoreStats {
            round_trips: self.inner.round_trips.load(Ordering::Relaxed),
            writes: None,
            memory_bytes: None,
            syncs: 0,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::num::{NonZeroU32, NonZeroUsize};

    use scylla::errors::{BrokenConnectionErrorKind, WriteType};

    use super::*;

    const NOW: u64 = 1_700_000_000_000;
    const LEASE: u64 = 10_000;
    const TTL: u64 = 100_000;

    fn config() -> ScyllaConfig {
        ScyllaConfig {
            contact_points: vec!["127.0.0.1:9042".into()],
            local_datacenter: "dc1".into(),
            keyspace: "dedup".into(),
            replication: BTreeMap::from([
                ("dc1".into(), NonZeroU32::new(3).unwrap()),
                ("dc2".into(), NonZeroU32::new(2).unwrap()),
            ]),
            consistency: ScyllaConsistency::LocalQuorum,
            serial_consistency: ScyllaSerialConsistency::LocalSerial,
            request_timeout: Duration::from_secs(5),
            connect_timeout: Duration::from_secs(5),
            max_in_flight: NonZeroUsize::new(8).unwrap(),
            tls: None,
            credentials: None,
        }
    }

    fn retention(ttl_secs: u64) -> Retention {
        Retention {
            ttl: Duration::from_secs(ttl_secs),
            lease: Duration::from_secs(60),
            sweep_interval: Duration::from_secs(60),
        }
    }

    fn at(partition: i32, offset: i64) -> Position {
        Position { topic: Arc::from("orders"), partition, offset }
    }

    fn request(fp: u128, position: Position) -> ClaimRequest {
        ClaimRequest {
            key: EventKey { scope: Arc::from("s"), id: b"k".to_vec() },
            fingerprint: Fingerprint(fp),
            position,
        }
    }

    fn row(state: ClaimState, fp: u128, position: Position, claimed: u64) -> ClaimRow {
        ClaimRow {
            state,
            fingerprint: Fingerprint(fp),
            position,
            claimed_at_ms: claimed,
            lease_until_ms: if state == ClaimState::InFlight { claimed + LEASE } else { 0 },
            expires_at_ms: claimed + TTL,
        }
    }

    /// The columns ScyllaDB returns for an LWT on this table, with a row's values.
    fn response(applied: bool, row: Option<&ClaimRow>) -> (Vec<&'static str>, Vec<Option<CqlValue>>) {
        let names = vec![
            "[applied]",
            "scope",
            "event_id",
            "claimed_at_ms",
            "expires_at_ms",
            "fingerprint",
            "lease_until_ms",
            "offset",
            "partition",
            "state",
            "topic",
        ];
        let mut values = vec![Some(CqlValue::Boolean(applied))];
        match row {
            None => values.extend(std::iter::repeat_n(None, 10)),
            Some(r) => values.extend([
                Some(CqlValue::Text("s".into())),
                Some(CqlValue::Blob(b"k".to_vec())),
                Some(CqlValue::BigInt(r.claimed_at_ms as i64)),
                Some(CqlValue::BigInt(r.expires_at_ms as i64)),
                Some(CqlValue::Blob(r.fingerprint.0.to_be_bytes().to_vec())),
                Some(CqlValue::BigInt(r.lease_until_ms as i64)),
                Some(CqlValue::BigInt(r.position.offset)),
                Some(CqlValue::Int(r.position.partition)),
                Some(CqlValue::TinyInt(if r.state == ClaimState::InFlight { 1 } else { 2 })),
                Some(CqlValue::Text(r.position.topic.to_string())),
            ]),
        }
        (names, values)
    }

    #[test]
    fn statement_text_names_the_keyspace_and_conditions_on_the_passed_in_time() {
        let cql = Cql::new("dedup");
        assert_eq!(
            cql.insert,
            r#"INSERT INTO dedup.kdedup_claims (scope, event_id, state, fingerprint, topic, partition, "offset", claimed_at_ms, lease_until_ms, expires_at_ms) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?) IF NOT EXISTS USING TTL ?"#
        );
        assert!(
            cql.take_over_expired.starts_with("UPDATE dedup.kdedup_claims USING TTL ? SET state = ?,"),
            "{}",
            cql.take_over_expired
        );
        assert!(cql.take_over_expired.ends_with("WHERE scope = ? AND event_id = ? IF expires_at_ms <= ?"));
        // A takeover starts a new claim: the old claim's response does not carry over.
        assert!(cql.take_over_expired.contains(", response = null WHERE"), "{}", cql.take_over_expired);
        assert!(cql.take_over_lapsed.contains(", response = null WHERE"), "{}", cql.take_over_lapsed);
        assert!(!cql.rewrite_own.contains("response"), "resume and renew keep the response");
        assert!(cql.complete.contains(", response = ? WHERE"), "{}", cql.complete);
        assert!(cql
            .complete
            .ends_with(r#"IF state = 1 AND topic = ? AND partition = ? AND "offset" = ? AND expires_at_ms = ?"#));
        assert_eq!(cql.add_response, "ALTER TABLE dedup.kdedup_claims ADD response text");
        assert!(cql.take_over_lapsed.ends_with("IF state = 1 AND lease_until_ms <= ?"));
        assert!(cql
            .rewrite_own
            .ends_with(r#"IF state = 1 AND topic = ? AND partition = ? AND "offset" = ? AND expires_at_ms = ?"#));
        assert!(cql
            .release
            .starts_with("DELETE FROM dedup.kdedup_claims WHERE scope = ? AND event_id = ? IF state = 1"));
        assert!(cql.forget.ends_with("IF EXISTS"));
        assert!(cql.sweep_delete.ends_with("IF expires_at_ms <= ?"));
        assert!(!cql.read.contains(" IF "), "lookup is a plain read");
        // Every write is conditional: no plain write mixes with Paxos on a row.
        for write in [
            &cql.insert,
            &cql.take_over_expired,
            &cql.take_over_lapsed,
            &cql.rewrite_own,
            &cql.complete,
            &cql.release,
            &cql.forget,
            &cql.sweep_delete,
        ] {
            assert!(write.contains(" IF "), "{write}");
        }
        // Bind markers match the value tuples the store sends.
        let markers = |s: &str| s.matches('?').count();
        assert_eq!(markers(&cql.insert), 11);
        assert_eq!(markers(&cql.take_over_expired), 12);
        assert_eq!(markers(&cql.take_over_lapsed), 12);
        assert_eq!(markers(&cql.rewrite_own), 15);
        assert_eq!(markers(&cql.complete), 16);
        assert_eq!(markers(&cql.release), 5);
        assert_eq!(markers(&cql.sweep_delete), 3);
    }

    #[test]
    fn schema_renders_keyspace_replication_ttl_and_tablets_off() {
        let text = render_schema(&config(), &retention(86_400));
        assert!(!text.contains("{{"), "every field filled: {text}");
        let statements = schema_statements(&text);
        assert_eq!(statements.len(), 2, "{statements:#?}");
        assert_eq!(
            statements[0],
            "CREATE KEYSPACE IF NOT EXISTS dedup WITH replication = {'class': 'NetworkTopologyStrategy', 'dc1': 3, 'dc2': 2} AND tablets = {'enabled': false}"
        );
        assert!(statements[1].starts_with("CREATE TABLE IF NOT EXISTS dedup.kdedup_claims ("), "{}", statements[1]);
        assert!(statements[1].contains("PRIMARY KEY ((scope, event_id))"));
        assert!(statements[1].contains("default_time_to_live = 86400"));
        assert!(statements[1].contains("'class': 'TimeWindowCompactionStrategy'"));
        assert!(statements[1].contains("'compaction_window_size': 1"));
        assert_eq!(
            without_tablets_option(&statements[0]),
            "CREATE KEYSPACE IF NOT EXISTS dedup WITH replication = {'class': 'NetworkTopologyStrategy', 'dc1': 3, 'dc2': 2}"
        );
        assert!(rejects_tablets_option("Unknown property 'tablets'"));
        assert!(!rejects_tablets_option("Unauthorized: no CREATE permission"));
    }

    #[test]
    fn compaction_windows_are_about_a_24th_of_the_ttl() {
        assert_eq!(compaction_window_hours(Duration::from_secs(3600)), 1);
        assert_eq!(compaction_window_hours(Duration::from_secs(86_400)), 1);
        assert_eq!(compaction_window_hours(Duration::from_secs(7 * 86_400)), 7);
    }

    #[test]
    fn ttl_is_the_time_left_rounded_up() {
        assert_eq!(ttl_secs(NOW + TTL, NOW), 100);
        assert_eq!(ttl_secs(NOW + 1, NOW), 1);
        assert_eq!(ttl_secs(NOW + 1001, NOW), 2, "never shorter than the row's life");
        assert_eq!(ttl_secs(NOW, NOW), 1, "a write always carries a TTL");
        assert_eq!(ttl_secs(u64::MAX, 0), i32::MAX);
    }

    #[test]
    fn lwt_rows_are_read_by_column_name() {
        let held = row(ClaimState::Done, 7, at(2, 40), NOW);
        let (names, values) = response(false, Some(&held));
        assert_eq!(lwt_answer(&names, &values).unwrap(), LwtAnswer { applied: false, row: Shown::Row(held) });
        let (names, values) = response(true, None);
        assert_eq!(lwt_answer(&names, &values).unwrap(), LwtAnswer { applied: true, row: Shown::Absent });
        // Cassandra's rejected UPDATE … IF shows only the condition's columns.
        let names = ["[applied]", "state", "lease_until_ms"];
        let values = [Some(CqlValue::Boolean(false)), Some(CqlValue::TinyInt(1)), Some(CqlValue::BigInt(5))];
        assert_eq!(lwt_answer(&names, &values).unwrap().row, Shown::Partial);
        assert!(lwt_answer(&names[1..], &values[1..]).is_err(), "no [applied]");
        let (names, mut values) = response(false, Some(&row(ClaimState::Done, 7, at(2, 40), NOW)));
        values[9] = Some(CqlValue::TinyInt(9));
        assert!(matches!(lwt_answer(&names, &values), Err(StoreError::Corrupt(_))));
    }

    /// The two servers answer a lightweight transaction with other columns.
    /// ScyllaDB: `[applied]` and the whole old row, applied or not. Cassandra:
    /// applied, `[applied]` alone; a rejected `INSERT … IF NOT EXISTS`, the
    /// whole row; a rejected `UPDATE … IF` or `DELETE … IF`, only the columns
    /// its condition names; no row, `[applied]` alone.
    #[test]
    fn lwt_answers_of_scylla_and_cassandra_are_both_read() {
        let held = row(ClaimState::Done, 7, at(2, 40), NOW);
        // Both: a rejected insert shows the whole row (with `response`, which no claim column is).
        let (mut names, mut values) = response(false, Some(&held));
        names.push("response");
        values.push(Some(CqlValue::Text("{}".into())));
        assert_eq!(lwt_answer(&names, &values).unwrap(), LwtAnswer { applied: false, row: Shown::Row(held.clone()) });
        // ScyllaDB, applied: the old row too (a takeover's rewritten row).
        let (names, values) = response(true, Some(&held));
        assert_eq!(lwt_answer(&names, &values).unwrap(), LwtAnswer { applied: true, row: Shown::Row(held.clone()) });
        // Cassandra, applied: `[applied]` alone.
        let applied = lwt_answer(&["[applied]"], &[Some(CqlValue::Boolean(true))]).unwrap();
        assert_eq!(applied, LwtAnswer { applied: true, row: Shown::Absent });
        // Cassandra, rejected `UPDATE … IF state = 1 AND topic = ? AND partition = ? AND "offset" = ? AND
        // expires_at_ms = ?` (completion, renewal, resume): the condition's columns, in the table's order.
        let names = ["[applied]", "expires_at_ms", "offset", "partition", "state", "topic"];
        let values = [
            Some(CqlValue::Boolean(false)),
            Some(CqlValue::BigInt((NOW + TTL) as i64)),
            Some(CqlValue::BigInt(40)),
            Some(CqlValue::Int(2)),
            Some(CqlValue::TinyInt(2)),
            Some(CqlValue::Text("orders".into())),
        ];
        let answer = lwt_answer(&names, &values).unwrap();
        assert_eq!(answer, LwtAnswer { applied: false, row: Shown::Partial }, "a SERIAL read must show the rest");
        assert!(!completion_holds(&held, &answer), "a partial row never proves a completion");
        // Cassandra, rejected takeover `IF expires_at_ms <= ?`: one column.
        let answer =
            lwt_answer(&["[applied]", "expires_at_ms"], &[Some(CqlValue::Boolean(false)), Some(CqlValue::BigInt(5))])
                .unwrap();
        assert_eq!(answer.row, Shown::Partial);
        // Cassandra, a condition on a row that is not there: `[applied]` alone, or the condition's columns null.
        let gone = lwt_answer(&["[applied]"], &[Some(CqlValue::Boolean(false))]).unwrap();
        assert_eq!(gone, LwtAnswer { applied: false, row: Shown::Absent });
        let gone = lwt_answer(&["[applied]", "state", "topic"], &[Some(CqlValue::Boolean(false)), None, None]).unwrap();
        assert_eq!(gone.row, Shown::Absent);
        // `[applied]` that is not a boolean: corrupt, never a guess.
        assert!(matches!(lwt_answer(&["[applied]"], &[Some(CqlValue::Int(1))]), Err(StoreError::Corrupt(_))));
    }

    #[test]
    fn the_rejected_row_decides_like_every_backend() {
        let mine = request(1, at(0, 5));
        let now = NOW + 1;
        // Completed earlier: duplicate, or conflict with another fingerprint.
        let done = row(ClaimState::Done, 1, at(3, 3), NOW);
        assert_eq!(
            next_step(Some(&done), &mine, now, LEASE),
            Step::Answer(Claim::Duplicate { first: at(3, 3), claimed_at_ms: NOW })
        );
        assert_eq!(
            next_step(Some(&done), &request(2, at(0, 5)), now, LEASE),
            Step::Answer(Claim::Conflict { stored: Fingerprint(1), first: at(3, 3), claimed_at_ms: NOW })
        );
        // Another position's live lease.
        let theirs = row(ClaimState::InFlight, 1, at(3, 3), NOW);
        assert_eq!(
            next_step(Some(&theirs), &mine, now, LEASE),
            Step::Answer(Claim::InFlight { holder: at(3, 3), lease_until_ms: NOW + LEASE })
        );
        // Our own position: resume, keeping the claim's clock.
        let ours = row(ClaimState::InFlight, 1, at(0, 5), NOW);
        assert_eq!(next_step(Some(&ours), &mine, now, LEASE), Step::Resume(ours.clone()));
        let resumed = intended_row(&Step::Resume(ours.clone()), &mine, now, LEASE, TTL).unwrap();
        assert_eq!(
            (resumed.claimed_at_ms, resumed.expires_at_ms, resumed.lease_until_ms),
            (NOW, NOW + TTL, now + LEASE)
        );
        // A lease lapsed for less than the grace still waits; past it, a takeover.
        assert!(matches!(next_step(Some(&theirs), &mine, NOW + LEASE, LEASE), Step::Answer(Claim::InFlight { .. })));
        assert_eq!(next_step(Some(&theirs), &mine, NOW + 2 * LEASE, LEASE), Step::TakeOverLapsed);
        // Expired rows (done or not), no row.
        assert_eq!(next_step(Some(&done), &mine, NOW + TTL, LEASE), Step::TakeOverExpired);
        assert_eq!(next_step(Some(&theirs), &mine, NOW + TTL, LEASE), Step::TakeOverExpired);
        assert_eq!(next_step(None, &mine, now, LEASE), Step::Insert);
        // A fresh claim's row.
        let fresh = intended_row(&Step::TakeOverLapsed, &mine, now, LEASE, TTL).unwrap();
        assert_eq!(
            fresh,
            ClaimRow {
                state: ClaimState::InFlight,
                fingerprint: Fingerprint(1),
                position: at(0, 5),
                claimed_at_ms: now,
                lease_until_ms: now + LEASE,
                expires_at_ms: now + TTL
            }
        );
        assert_eq!(
            intended_row(
                &Step::Answer(Claim::Duplicate { first: at(3, 3), claimed_at_ms: NOW }),
                &mine,
                now,
                LEASE,
                TTL
            ),
            None
        );
    }

    #[test]
    fn an_unknown_outcome_is_settled_by_what_the_serial_read_shows() {
        let mine = row(ClaimState::InFlight, 1, at(0, 5), NOW);
        assert!(shows_our_write(&mine, Some(&mine)));
        assert!(!shows_our_write(&mine, None), "not applied, and never will be");
        assert!(!shows_our_write(&mine, Some(&row(ClaimState::InFlight, 1, at(1, 9), NOW))), "someone else won");
        assert!(!shows_our_write(&mine, Some(&ClaimRow { lease_until_ms: 1, ..mine.clone() })));
        // A completion retried after an unknown outcome finds its own done row.
        let done = ClaimRow { state: ClaimState::Done, lease_until_ms: 0, ..mine.clone() };
        assert!(completion_holds(&done, &LwtAnswer { applied: true, row: Shown::Row(mine.clone()) }));
        assert!(completion_holds(&done, &LwtAnswer { applied: false, row: Shown::Row(done.clone()) }));
        assert!(!completion_holds(
            &done,
            &LwtAnswer { applied: false, row: Shown::Row(row(ClaimState::InFlight, 1, at(1, 9), NOW)) }
        ));
        assert!(!completion_holds(&done, &LwtAnswer { applied: false, row: Shown::Absent }));
    }

    #[test]
    fn errors_are_classed_ambiguous_retriable_or_fatal() {
        let db = |e: DbError| ExecutionError::LastAttemptError(RequestAttemptError::DbError(e, "msg".into()));
        let write_timeout = DbError::WriteTimeout {
            consistency: Consistency::LocalQuorum,
            received: 1,
            required: 2,
            write_type: WriteType::Cas,
        };
        assert_eq!(classify(&db(write_timeout)), ErrorClass::Ambiguous);
        assert_eq!(classify(&ExecutionError::RequestTimeout(Duration::from_secs(5))), ErrorClass::Ambiguous);
        let node = std::net::IpAddr::from([127, 0, 0, 1]);
        let broken =
            RequestAttemptError::BrokenConnectionError(BrokenConnectionErrorKind::KeepaliveTimeout(node).into());
        assert_eq!(classify(&ExecutionError::LastAttemptError(broken)), ErrorClass::Ambiguous);
        let unavailable = DbError::Unavailable { consistency: Consistency::LocalSerial, required: 2, alive: 1 };
        assert_eq!(classify(&db(unavailable)), ErrorClass::Retriable);
        assert_eq!(classify(&db(DbError::Overloaded)), ErrorClass::Retriable);
        let read_timeout = DbError::ReadTimeout {
            consistency: Consistency::LocalSerial,
            received: 1,
            required: 2,
            data_present: false,
        };
        assert_eq!(classify(&db(read_timeout)), ErrorClass::Retriable);
        assert_eq!(classify(&ExecutionError::EmptyPlan), ErrorClass::Retriable);
        assert_eq!(classify(&db(DbError::Invalid)), ErrorClass::Fatal);
        assert_eq!(classify(&db(DbError::Unauthorized)), ErrorClass::Fatal);
        assert!(scylla_error("claim", &db(DbError::Overloaded)).is_retriable());
        assert!(!scylla_error("claim", &db(DbError::SyntaxError)).is_retriable());
    }

    #[test]
    fn a_key_repeated_in_a_batch_is_one_group_in_request_order() {
        let key = |id: &str| EventKey { scope: Arc::from("s"), id: id.as_bytes().to_vec() };
        let (a, b, c) = (key("a"), key("b"), key("c"));
        assert_eq!(group_by_key(&[&a, &b, &a, &c, &a, &b]), vec![vec![0, 2, 4], vec![1, 5], vec![3]]);
        assert!(group_by_key(&[]).is_empty());
    }

    #[test]
    fn opening_checks_the_tls_ca_file() {
        let mut c = config();
        c.tls = Some(crate::config::ScyllaTls { ca_file: Some("/nonexistent/ca.pem".into()) });
        let err = ScyllaStore::open(&c, &retention(60)).err().expect("a missing CA file is refused at open");
        assert!(err.to_string().contains("tls_ca_file"), "{err}");
        let dir = tempfile::tempdir().unwrap();
        let empty = dir.path().join("ca.pem");
        std::fs::write(&empty, "not a certificate\n").unwrap();
        c.tls = Some(crate::config::ScyllaTls { ca_file: Some(empty) });
        let err = ScyllaStore::open(&c, &retention(60)).err().expect("a CA file without certificates is refused");
        assert!(err.to_string().contains("no PEM certificate"), "{err}");
    }

    #[tokio::test]
    async fn a_cluster_that_is_down_is_a_retriable_error_and_no_schema_verdict() {
        let mut c = config();
        // A loopback port nothing listens on.
        c.contact_points = vec!["127.0.0.1:1".into()];
        c.connect_timeout = Duration::from_millis(200);
        let store = ScyllaStore::open(&c, &retention(60)).unwrap();
        let err = store.lookup(vec![request(1, at(0, 1)).key], NOW).await.unwrap_err();
        assert!(err.is_retriable(), "{err}");
        assert!(err.to_string().contains("contact_points"), "{err}");
        store.check_schema(None).await.expect("an unreachable cluster is waited for, not refused");
    }
}
