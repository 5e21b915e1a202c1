//! The PostgreSQL store: a shared store for consumer groups across processes.
//!
//! - `claim` is one statement per batch: `INSERT … ON CONFLICT … DO UPDATE …
//!   WHERE <expired, lease lapsed, or our own position>`, with the batch's
//!   keys unnested from arrays. The same statement reads the rows as they
//!   were before it (all parts of a statement share one snapshot), so the
//!   answer for a key it did not win (`Duplicate | InFlight | Conflict`)
//!   needs no second round trip. Only the keys it may take go to the insert:
//!   a duplicate's row is read, never locked (see `CLAIM`). A key that another transaction inserted
//!   concurrently is neither won nor visible: it is asked again; one whose
//!   concurrent insert we won anyway (its lease had lapsed by our clock) is
//!   answered as taken over (`xmax = 0` on the returned row tells an insert
//!   from an update).
//! - `complete`, `release`, `lookup`, `forget` are one statement each, all
//!   conditional on the claimant's position where ownership matters.
//! - Every statement commits on its own, durably: `sync` has nothing to do.
//! - Rows are inserted in key order, so concurrent batches lock rows in the
//!   same order and cannot deadlock each other.
//! - The table leaves half of each page free (`fillfactor = 50` in
//!   schemas/postgres.sql), so a claim's completion is a heap-only update.
//!
//! - TLS goes through OpenSSL (`postgres-openssl`; the binary links Debian's
//!   libssl for rdkafka already). `verify-full` trusts only `[store]
//!   tls_ca_file` when given (the system's roots otherwise) and checks that
//!   the certificate names the URL's host or IP address; `require` and
//!   `prefer` encrypt without checking anything.
//!
//! Schema: `schemas/postgres.sql`.

use std::collections::HashMap;
use std::str::FromStr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod};
use openssl::ssl::{SslConnector, SslMethod, SslVerifyMode};
use postgres_openssl::MakeTlsConnector;
use tokio_postgres::config::SslMode;
use tokio_postgres::Row;

use super::{
    decide, Acquired, Claim, ClaimRequest, ClaimRow, ClaimState, DedupStore, EffectResponse, Released, StoreStats,
};
use crate::config::{PostgresTls, Retention};
use crate::error::StoreError;
use crate::event::{EventKey, Fingerprint, Position};
use crate::metrics::StoreBatchMetrics;

/// The `kdedup_claims` table and its indexes (`schemas/postgres.sql`; `kdedup schema` prints it).
pub const SCHEMA: &str = include_str!("../../schemas/postgres.sql");

/// How many expired rows one sweep statement deletes.
const SWEEP_CHUNK: i64 = 10_000;

/// Reads every key's row first (`old`, the statement's snapshot) and inserts
/// only the keys it may take: absent, expired, a lapsed lease, or our own
/// position. A key whose row it sees and may not take (done, or another
/// owner's live claim: every duplicate) is answered from that row and never
/// touched. `ON CONFLICT DO UPDATE` locks the conflicting row even when its
/// `WHERE` then declines, until the statement commits: the old statement, which
/// sent every key to the insert, held each duplicate's row for its whole batch
/// and its commit, and the key's owner completing it waited behind that (and
/// claims behind the owner): lock waits were the largest state of the
/// backends in `kdedup bench --store postgres`. The answer is the same either
/// way: it always came from the snapshot's row.
const CLAIM: &str = r#"
WITH req AS (
    SELECT * FROM unnest($1::text[], $2::bytea[], $3::bytea[], $4::text[], $5::int[], $6::bigint[])
        WITH ORDINALITY AS r(scope, event_id, fingerprint, topic, partition, "offset", ord)
),
old AS MATERIALIZED (
    SELECT r.ord, r.scope, r.event_id, r.fingerprint, r.topic, r.partition, r."offset",
           o.state AS o_state, o.fingerprint AS o_fingerprint, o.topic AS o_topic, o.partition AS o_partition,
           o."offset" AS o_offset, o.claimed_at AS o_claimed_at, o.lease_until AS o_lease_until,
           o.expires_at AS o_expires_at
    FROM req r
    LEFT JOIN kdedup_claims o ON o.scope = r.scope AND o.event_id = r.event_id
),
won AS (
    INSERT INTO kdedup_claims AS c
        (scope, event_id, state, fingerprint, topic, partition, "offset", claimed_at, lease_until, expires_at)
    SELECT scope, event_id, 1, fingerprint, topic, partition, "offset", $7::bigint, $7::bigint + $8::bigint, $7::bigint + $9::bigint
    FROM old
    -- the ON CONFLICT condition below, on the row as the snapshot shows it
    WHERE o_state IS NULL
       OR o_expires_at <= $7
       OR (o_state = 1 AND (o_lease_until + $8 <= $7
           OR (o_topic = topic AND o_partition = partition AND o_offset = "offset")))
    ORDER BY scope, event_id
    ON CONFLICT (scope, event_id) DO UPDATE SET
        state = 1,
        fingerprint = EXCLUDED.fingerprint,
        topic = EXCLUDED.topic,
        partition = EXCLUDED.partition,
        "offset" = EXCLUDED."offset",
        lease_until = EXCLUDED.lease_until,
        -- resuming our own claim keeps its clock: the TTL does not stretch
        claimed_at = CASE WHEN c.expires_at > $7 AND c.topic = EXCLUDED.topic AND c.partition = EXCLUDED.partition
                               AND c."offset" = EXCLUDED."offset" THEN c.claimed_at ELSE EXCLUDED.claimed_at END,
        expires_at = CASE WHEN c.expires_at > $7 AND c.topic = EXCLUDED.topic AND c.partition = EXCLUDED.partition
                               AND c."offset" = EXCLUDED."offset" THEN c.expires_at ELSE EXCLUDED.expires_at END,
        -- an earlier claim's recorded answer is not this one's; a resumed claim keeps its own
        response = CASE WHEN c.expires_at > $7 AND c.topic = EXCLUDED.topic AND c.partition = EXCLUDED.partition
                               AND c."offset" = EXCLUDED."offset" THEN c.response ELSE NULL END
    WHERE c.expires_at <= $7
       OR (c.state = 1 AND (c.lease_until + $8 <= $7
           OR (c.topic = EXCLUDED.topic AND c.partition = EXCLUDED.partition AND c."offset" = EXCLUDED."offset")))
    RETURNING c.scope, c.event_id, (c.xmax = 0) AS inserted
)
SELECT o.ord, w.event_id IS NOT NULL AS won,
       -- named as the table's columns: a column of the wrong type is reported by its name
       o.o_state AS state, o.o_fingerprint AS fingerprint, o.o_topic AS topic, o.o_partition AS partition,
       o.o_offset AS "offset", o.o_claimed_at AS claimed_at, o.o_lease_until AS lease_until,
       o.o_expires_at AS expires_at, w.inserted
FROM old o
LEFT JOIN won w ON w.scope = o.scope AND w.event_id = o.event_id
ORDER BY o.ord
"#;

/// Locks its rows in key order first (`ORDER BY … FOR UPDATE`: the sort runs
/// before the locks), the order `claim` inserts in, whatever plan the join
/// gets: a plain `UPDATE … FROM unnest(…)` locked them in its join's order,
/// and a completion crossing a claim over the same keys in the other order
/// deadlocked (3 per 500,000-event `kdedup bench --store postgres`, each a
/// 1 s `deadlock_timeout` wait). `MATERIALIZED` keeps the locking query one
/// step of its own (PostgreSQL 12+). The update repeats the conditions: a row
/// changed between the statement's snapshot and its lock is checked again.
/// It joins the locked rows alone, which carry the position they were locked
/// with: joining the request again and testing membership in the locked set
/// (a hash of it) cost a third more server CPU per completed key (5.2 against
/// 3.9 µs, in one backend completing 1000-key batches).
const COMPLETE: &str = r#"
WITH locked AS MATERIALIZED (
    SELECT c.scope, c.event_id, c.topic, c.partition, c."offset" FROM kdedup_claims c
    JOIN unnest($1::text[], $2::bytea[], $3::text[], $4::int[], $5::bigint[])
        AS r(scope, event_id, topic, partition, "offset")
      ON c.scope = r.scope AND c.event_id = r.event_id
    WHERE c.topic = r.topic AND c.partition = r.partition AND c."offset" = r."offset"
      AND c.expires_at > $6
    ORDER BY c.scope, c.event_id
    FOR UPDATE OF c
)
UPDATE kdedup_claims c SET state = 2, lease_until = 0
FROM locked l
WHERE c.scope = l.scope AND c.event_id = l.event_id
  AND c.topic = l.topic AND c.partition = l.partition AND c."offset" = l."offset"
  AND c.expires_at > $6
RETURNING c.scope, c.event_id
"#;

const RELEASE: &str = r#"
DELETE FROM kdedup_claims c
USING unnest($1::text[], $2::bytea[], $3::text[], $4::int[], $5::bigint[]) AS r(scope, event_id, topic, partition, "offset")
WHERE c.scope = r.scope AND c.event_id = r.event_id AND c.state = 1
  AND c.topic = r.topic AND c.partition = r.partition AND c."offset" = r."offset"
"#;

const RENEW: &str = r#"
UPDATE kdedup_claims c SET lease_until = GREATEST(c.lease_until, $6::bigint + $7::bigint)
FROM unnest($1::text[], $2::bytea[], $3::text[], $4::int[], $5::bigint[]) AS r(scope, event_id, topic, partition, "offset")
WHERE c.scope = r.scope AND c.event_id = r.event_id AND c.state = 1
  AND c.topic = r.topic AND c.partition = r.partition AND c."offset" = r."offset"
  AND c.expires_at > $6
RETURNING c.scope, c.event_id
"#;

const RECORD: &str = r#"
UPDATE kdedup_claims c SET response = r.response
FROM unnest($1::text[], $2::bytea[], $3::text[], $4::int[], $5::bigint[], $6::text[])
    AS r(scope, event_id, topic, partition, "offset", response)
WHERE c.scope = r.scope AND c.event_id = r.event_id
  AND c.topic = r.topic AND c.partition = r.partition AND c."offset" = r."offset"
RETURNING c.scope, c.event_id
"#;

const RESPONSE: &str = "SELECT response FROM kdedup_claims WHERE scope = $1 AND event_id = $2 AND expires_at > $3";

const LOOKUP: &str = r#"
SELECT c.scope, c.event_id, c.state, c.fingerprint, c.topic, c.partition, c."offset", c.claimed_at, c.lease_until, c.expires_at
FROM kdedup_claims c
JOIN unnest($1::text[], $2::bytea[]) AS r(scope, event_id) ON c.scope = r.scope AND c.event_id = r.event_id
WHERE c.expires_at > $3
"#;

const FORGET: &str = "DELETE FROM kdedup_claims WHERE scope = $1 AND event_id = $2";

/// A replay's release: [`super::kept_on_release`] as the delete's condition
/// (expired; or done, or in flight past lease and grace, and claimed before the
/// cut-off), so the check and the delete are one statement on the row.
/// values: scope, event_id, now, claimed_before, grace; returns whether the row was live.
const RELEASE_UNLESS_LIVE: &str = r#"
DELETE FROM kdedup_claims
WHERE scope = $1 AND event_id = $2
  AND (expires_at <= $3 OR (claimed_at < $4 AND (state = 2 OR lease_until + $5 <= $3)))
RETURNING expires_at > $3
"#;

// The outer `expires_at <= $1` is not redundant: a sweep that waited on the row
// lock of a claim taken over meanwhile (re-claimed with a new expires_at) goes on,
// under READ COMMITTED, with the row's new version, and a TID scan does not recheck
// its `ctid = ANY(…)`: only this condition keeps the fresh claim.
const SWEEP: &str = r#"
DELETE FROM kdedup_claims WHERE ctid = ANY(ARRAY(
    SELECT ctid FROM kdedup_claims WHERE expires_at <= $1 LIMIT $2
)) AND expires_at <= $1
"#;

/// The PostgreSQL store: claims as rows of `kdedup_claims`, a batch decided by one
/// `INSERT … ON CONFLICT` statement, on a connection pool. Cheap to clone.
#[derive(Clone)]
pub struct PostgresStore {
    pool: Pool,
    /// How connections are encrypted, to say what to check when one fails.
    tls: Arc<PostgresTls>,
    /// The server(s) of [store] url, `host:port`, named when a connection fails (never the URL).
    server: Arc<str>,
    ttl_ms: i64,
    lease_ms: i64,
    stats: Arc<Counters>,
    batches: StoreBatchMetrics,
}

#[derive(Default)]
struct Counters {
    round_trips: AtomicU64,
}

impl PostgresStore {
    /// One grouped count of `scope`'s live rows (see [`super::Store::census`]).
    pub async fn census(&self, scope: &str, now_ms: u64) -> Result<super::Census, StoreError> {
        let client = self.client().await?;
        let rows = client
            .query(
                "SELECT state, count(*), min(claimed_at) FROM kdedup_claims WHERE scope = $1 AND expires_at > $2 AND event_id <> '' GROUP BY state",
                &[&scope, &(now_ms as i64)],
            )
            .await
            .map_err(pg_error)?;
        let mut census = super::Census::default();
        for row in rows {
            let (state, count, oldest): (i16, i64, Option<i64>) = (row.get(0), row.get(1), row.get(2));
            match state {
                1 => census.in_flight = count as u64,
                _ => census.done += count as u64,
            }
            if let Some(o) = oldest {
                let o = o as u64;
                census.oldest_claimed_at_ms = Some(census.oldest_claimed_at_ms.map_or(o, |c| c.min(o)));
            }
        }
        let size = client.query_one("SELECT pg_total_relation_size('kdedup_claims')", &[]).await.map_err(pg_error)?;
        census.bytes = Some(size.get::<_, i64>(0) as u64);
        Ok(census)
    }

    /// Connects lazily: the pool opens connections on first use, so a store
    /// that is down at start makes the pipeline wait, not exit.
    pub fn open(
        url: &str,
        pool_size: usize,
        tls: &PostgresTls,
        retention: &Retention,
    ) -> Result<PostgresStore, StoreError> {
        let mut config = tokio_postgres::Config::from_str(url)
            .map_err(|e| StoreError::Config(format!("[store] url is not a PostgreSQL URL: {e}")))?;
        let server = server_of(&config);
        config.ssl_mode(match tls {
            PostgresTls::Disable => SslMode::Disable,
            PostgresTls::Prefer => SslMode::Prefer,
            PostgresTls::Require | PostgresTls::VerifyFull { .. } => SslMode::Require,
        });
        let manager = Manager::from_config(
            config,
            tls_connector(tls)?,
            ManagerConfig { recycling_method: RecyclingMethod::Fast },
        );
        let pool = Pool::builder(manager)
            .max_size(pool_size)
            .build()
            .map_err(|e| StoreError::Config(format!("cannot build the connection pool: {e}")))?;
        Ok(PostgresStore {
            pool,
            tls: Arc::new(tls.clone()),
            server: Arc::from(server),
            ttl_ms: retention.ttl.as_millis() as i64,
            lease_ms: retention.lease.as_millis() as i64,
            stats: Arc::new(Counters::default()),
            batches: StoreBatchMetrics::new(),
        })
    }

    /// Creates the table and index if missing. Concurrent `CREATE … IF NOT
    /// EXISTS` can still collide in PostgreSQL's catalog, so appliers take turns
    /// on an advisory lock.
    pub async fn apply_schema(&self) -> Result<(), StoreError> {
        let client = self.client().await?;
        let script = format!("BEGIN;\nSELECT pg_advisory_xact_lock(7270001);\n{SCHEMA}\nCOMMIT;");
        client.batch_execute(&script).await.map_err(pg_error)
    }

    /// Fails with a clear error when the table is missing; a server that does
    /// not answer is not an error here (the pipeline waits for it).
    pub async fn check_schema(&self, config_file: Option<&std::path::Path>) -> Result<(), StoreError> {
        let apply = crate::config::schema_apply_command(config_file);
        let client = match self.client().await {
            Ok(c) => c,
            Err(_) => return Ok(()),
        };
        match client.simple_query("SELECT response FROM kdedup_claims LIMIT 0").await {
            Err(e) if e.code() == Some(&tokio_postgres::error::SqlState::UNDEFINED_TABLE) => {
                Err(StoreError::Config(format!("table kdedup_claims does not exist: run `{apply}` first")))
            }
            Err(e) if e.code() == Some(&tokio_postgres::error::SqlState::UNDEFINED_COLUMN) => {
                Err(StoreError::Config(format!(
                "table kdedup_claims has no `response` column (made by an older kdedup): run `{apply}`, which adds it"
            )))
            }
            _ => Ok(()),
        }
    }

    /// Opens (or reuses) a connection and runs one statement: the TLS handshake and
    /// authentication included, so `kdedup check` can tell an operator what failed.
    pub async fn probe(&self) -> Result<(), StoreError> {
        self.client().await?.simple_query("SELECT 1").await.map(drop).map_err(pg_error)
    }

    /// Runs `sql` (one statement, simple protocol, no parameters) on a pooled
    /// connection and returns the first column of each row it answered. For
    /// administration around the store (`kdedup bench`'s database of its own),
    /// never for claims.
    pub async fn admin_query(&self, sql: &str) -> Result<Vec<Option<String>>, StoreError> {
        let messages = self.client().await?.simple_query(sql).await.map_err(pg_error)?;
        Ok(messages
            .iter()
            .filter_map(|m| match m {
                tokio_postgres::SimpleQueryMessage::Row(row) => Some(row.get(0).map(str::to_string)),
                _ => None,
            })
            .collect())
    }

    /// Keys per statement (`kdedup_store_statement_keys`).
    pub fn batch_metrics(&self) -> &StoreBatchMetrics {
        &self.batches
    }

    async fn client(&self) -> Result<deadpool_postgres::Object, StoreError> {
        self.stats.round_trips.fetch_add(1, Ordering::Relaxed);
        self.pool.get().await.map_err(|e| match connect_error(e, &self.tls) {
            StoreError::Postgres { message, retriable } => {
                StoreError::Postgres { message: format!("at {}: {message}", self.server), retriable }
            }
            other => other,
        })
    }

    /// Runs statement `op` (`sql`), which carries `keys` keys, on a pooled connection.
    async fn query(
        &self,
        op: &'static str,
        keys: usize,
        sql: &str,
        params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
    ) -> Result<Vec<Row>, StoreError> {
        self.batches.observe("postgres", op, keys);
        let client = self.client().await?;
        let statement = client.prepare_cached(sql).await.map_err(pg_error)?;
        client.query(&statement, params).await.map_err(pg_error)
    }

    async fn claim_round(&self, requests: &[ClaimRequest], now_ms: u64) -> Result<Vec<Option<Claim>>, StoreError> {
        let scopes: Vec<&str> = requests.iter().map(|r| &*r.key.scope).collect();
        let ids: Vec<&[u8]> = requests.iter().map(|r| r.key.id.as_slice()).collect();
        let fingerprints: Vec<[u8; 16]> = requests.iter().map(|r| r.fingerprint.0.to_be_bytes()).collect();
        let fps: Vec<&[u8]> = fingerprints.iter().map(|f| f.as_slice()).collect();
        let topics: Vec<&str> = requests.iter().map(|r| &*r.position.topic).collect();
        let partitions: Vec<i32> = requests.iter().map(|r| r.position.partition).collect();
        let offsets: Vec<i64> = requests.iter().map(|r| r.position.offset).collect();
        let now = now_ms as i64;
        let rows = self
            .query(
                "claim",
                requests.len(),
                CLAIM,
                &[&scopes, &ids, &fps, &topics, &partitions, &offsets, &now, &self.lease_ms, &self.ttl_ms],
            )
            .await?;
        let mut answers = vec![None; requests.len()];
        for row in rows {
            let ord: i64 = row.get(0);
            let i = (ord - 1) as usize;
            let won: bool = row.get(1);
            let old = row_at(&row, 2)?;
            let request = &requests[i];
            // `xmax = 0` on the row returned: the statement inserted it, not updated it.
            let inserted: Option<bool> = row.get(10);
            let claim = decide(old.as_ref(), request, now_ms, self.lease_ms as u64);
            answers[i] = match (won, claim) {
                // Won by updating a row our snapshot did not show: a concurrent
                // writer's claim whose lease had lapsed by our clock (its writer
                // froze between stamping and sending). Its effect may have run.
                (true, Claim::New(Acquired::Fresh)) if old.is_none() && inserted == Some(false) => {
                    Some(Claim::New(Acquired::TakenOver))
                }
                (true, claim @ Claim::New { .. }) => Some(claim),
                // Not won, yet the old row says we could have: another writer changed
                // it under us. Not won and no old row: another writer inserted it
                // concurrently. Either way the next round sees the settled row.
                (false, Claim::New { .. }) | (true, _) => None,
                (false, claim) => Some(claim),
            };
        }
        Ok(answers)
    }
}

/// The connector for `tls`. With `Disable` it is never asked to handshake.
fn tls_connector(tls: &PostgresTls) -> Result<MakeTlsConnector, StoreError> {
    let bad = |e: openssl::error::ErrorStack| StoreError::Config(format!("cannot set up TLS for PostgreSQL: {e}"));
    let mut builder = SslConnector::builder(SslMethod::tls_client()).map_err(bad)?;
    let verify = match tls {
        PostgresTls::VerifyFull { ca_file: Some(path) } => {
            // Only this CA: a store that replaces the system's default paths.
            let pem = std::fs::read(path)
                .map_err(|e| StoreError::Config(format!("[store] tls_ca_file: cannot read {}: {e}", path.display())))?;
            let certs = openssl::x509::X509::stack_from_pem(&pem).map_err(|e| {
                StoreError::Config(format!("[store] tls_ca_file {} is not a PEM certificate: {e}", path.display()))
            })?;
            let mut store = openssl::x509::store::X509StoreBuilder::new().map_err(bad)?;
            for cert in certs {
                store.add_cert(cert).map_err(bad)?;
            }
            builder.set_cert_store(store.build());
            true
        }
        // SslConnector::builder already trusts the system's default paths.
        PostgresTls::VerifyFull { ca_file: None } => true,
        PostgresTls::Prefer | PostgresTls::Disable | PostgresTls::Require => {
            builder.set_verify(SslVerifyMode::NONE);
            false
        }
    };
    let mut connector = MakeTlsConnector::new(builder.build());
    // verify-full: openssl checks the host name, or the IP address when the URL's host is one.
    connector.set_callback(move |config, _host| {
        config.set_verify_hostname(verify);
        Ok(())
    });
    Ok(connector)
}

/// `host:port` of each server a config names (tokio-postgres pairs ports with hosts; one
/// port for all, or 5432 by default).
fn server_of(config: &tokio_postgres::Config) -> String {
    let ports = config.get_ports();
    let servers: Vec<String> = config
        .get_hosts()
        .iter()
        .enumerate()
        .map(|(i, host)| {
            let port = ports.get(i).or(ports.first()).copied().unwrap_or(5432);
            match host {
                tokio_postgres::config::Host::Tcp(h) => format!("{h}:{port}"),
                tokio_postgres::config::Host::Unix(p) => format!("{}:{port}", p.display()),
            }
        })
        .collect();
    if servers.is_empty() {
        "localhost:5432".to_string()
    } else {
        servers.join(",")
    }
}

/// A connection that could not be made, in words that say what to fix: the TLS
/// handshake (certificate not verified, server without TLS) and the server's
/// refusal (pg_hba.conf) get their own hints. Never the URL: it may hold a password.
fn connect_error(e: deadpool_postgres::PoolError, tls: &PostgresTls) -> StoreError {
    let mut chain = Vec::new();
    let mut source: Option<&dyn std::error::Error> = Some(&e);
    while let Some(err) = source {
        chain.push(err.to_string());
        source = err.source();
    }
    let all = each_cause_once(&chain);
    // The innermost message, or for a failed verification the one that carries OpenSSL's
    // verify result too (postgres-openssl appends it: "…: unable to get local issuer certificate").
    let detail =
        chain.iter().find(|m| m.contains("certificate verify failed")).or(chain.last()).cloned().unwrap_or_default();
    let message = if all.contains("certificate verify failed") {
        let against = match tls {
            PostgresTls::VerifyFull { ca_file: Some(path) } => format!("[store] tls_ca_file {}", path.display()),
            _ => "the system's CA certificates ([store] tls_ca_file not set)".to_string(),
        };
        format!(
            "TLS handshake failed: the server's certificate could not be verified against {against} ({detail}); \
             check that this CA signed the server's certificate and that the certificate names the host or IP \
             address in [store] url"
        )
    } else if all.contains("server does not support TLS") {
        "the server does not offer TLS but [store] tls asks for it: enable ssl on the server, or set [store] \
         tls = \"disable\""
            .to_string()
    } else if all.contains("pg_hba.conf") && all.contains("no encryption") {
        format!(
            "the server refuses connections without TLS ({detail}); set [store] tls = \"verify-full\" and \
             tls_ca_file"
        )
    } else if all.contains("pg_hba.conf") {
        format!("the server refused the connection ({detail}); check pg_hba.conf and the user in [store] url")
    } else if all.contains("TLS") || all.contains("SSL") {
        format!("TLS handshake failed: {detail}; check [store] tls and tls_ca_file")
    } else {
        format!("no connection: {all}")
    };
    StoreError::Postgres { message, retriable: true }
}

/// An error chain joined with `: `, each cause said once: a cause the text already holds is
/// left out, and one that begins where the text ends ("…: error connecting to server" then
/// "error connecting to server: Connection refused") adds only what is new. The pool's
/// "Error occurred while creating a new object" says nothing a person can act on.
fn each_cause_once(chain: &[String]) -> String {
    let mut out = String::new();
    for text in chain {
        let text = text.strip_prefix("Error occurred while creating a new object: ").unwrap_or(text);
        if text.is_empty() || out.contains(text) {
            continue;
        }
        let overlap = (1..text.len()).rev().find(|&n| {
            text.is_char_boundary(n)
                && text[n..].starts_with(": ")
                && out.ends_with(&text[..n])
                && (out.len() == n || out[..out.len() - n].ends_with(": "))
        });
        match overlap {
            Some(n) => out.push_str(&text[n..]),
            None => {
                if !out.is_empty() {
                    out.push_str(": ");
                }
                out.push_str(text);
            }
        }
    }
    out
}

/// Reads a claim row from `row` starting at column `at` (state first); `None` if absent.
fn row_at(row: &Row, at: usize) -> Result<Option<ClaimRow>, StoreError> {
    let state: Option<i16> = column(row, at)?;
    let Some(state) = state else { return Ok(None) };
    let fingerprint: Vec<u8> = column(row, at + 1)?;
    let fingerprint: [u8; 16] =
        fingerprint.try_into().map_err(|_| StoreError::Corrupt("fingerprint is not 16 bytes".into()))?;
    let topic: String = column(row, at + 2)?;
    Ok(Some(ClaimRow {
        state: match state {
            1 => ClaimState::InFlight,
            2 => ClaimState::Done,
            other => return Err(StoreError::Corrupt(format!("unknown state {other}"))),
        },
        fingerprint: Fingerprint(u128::from_be_bytes(fingerprint)),
        position: Position { topic: Arc::from(topic), partition: column(row, at + 3)?, offset: column(row, at + 4)? },
        claimed_at_ms: column::<i64>(row, at + 5)? as u64,
        lease_until_ms: column::<i64>(row, at + 6)? as u64,
        expires_at_ms: column::<i64>(row, at + 7)? as u64,
    }))
}

/// Column `i` of `row`: a type (or NULL) that schemas/postgres.sql does not
/// allow is the table's fault, reported as such instead of a panic.
fn column<'r, T: tokio_postgres::types::FromSql<'r>>(row: &'r Row, i: usize) -> Result<T, StoreError> {
    row.try_get(i).map_err(|e| {
        let name = row.columns().get(i).map_or("?", |c| c.name());
        StoreError::Config(format!(
            "column `{name}` of kdedup_claims cannot be read ({e}): the table does not match \
             schemas/postgres.sql; check its schema (`kdedup schema print`) and run `kdedup schema apply` with kdedup's config"
        ))
    })
}

fn pg_error(e: tokio_postgres::Error) -> StoreError {
    use tokio_postgres::error::SqlState;
    let retriable = e.is_closed()
        || e.as_db_error().is_none()
        || e.code().is_some_and(|c| {
            [
                SqlState::T_R_SERIALIZATION_FAILURE,
                SqlState::T_R_DEADLOCK_DETECTED,
                SqlState::ADMIN_SHUTDOWN,
                SqlState::CANNOT_CONNECT_NOW,
                SqlState::CRASH_SHUTDOWN,
                SqlState::TOO_MANY_CONNECTIONS,
                SqlState::QUERY_CANCELED,
            ]
            .contains(c)
        });
    let message = match e.as_db_error() {
        Some(db) => format!("{} ({})", db.message(), db.code().code()),
        None => e.to_string(),
    };
    StoreError::Postgres { message, retriable }
}

/// For each requested key, whether a `RETURNING scope, event_id` statement returned it.
fn keys_returned(rows: &[Row], requested: &[(EventKey, Position)]) -> Vec<bool> {
    let returned: std::collections::HashSet<(String, Vec<u8>)> =
        rows.iter().map(|r| (r.get::<_, String>(0), r.get::<_, Vec<u8>>(1))).collect();
    requested.iter().map(|(k, _)| returned.contains(&(k.scope.to_string(), k.id.clone()))).collect()
}

type KeyRef<'a> = (&'a str, &'a [u8]);

/// Column arrays of (scope, id, topic, partition, offset), for unnest.
struct PositionArrays<'a> {
    scopes: Vec<&'a str>,
    ids: Vec<&'a [u8]>,
    topics: Vec<&'a str>,
    partitions: Vec<i32>,
    offsets: Vec<i64>,
}

/// In key order, as `claim` inserts: `complete`, `renew` and `release` then
/// usually lock their rows in that order too (unnest feeds the join in array
/// order), so two calls over overlapping keys rarely deadlock; when they do,
/// PostgreSQL aborts one with a retriable error and it is asked again.
fn position_arrays(items: &[(EventKey, Position)]) -> PositionArrays<'_> {
    let mut sorted: Vec<&(EventKey, Position)> = items.iter().collect();
    sorted.sort_unstable_by(|(a, _), (b, _)| (&*a.scope, &a.id).cmp(&(&*b.scope, &b.id)));
    PositionArrays {
        scopes: sorted.iter().map(|(k, _)| &*k.scope).collect(),
        ids: sorted.iter().map(|(k, _)| k.id.as_slice()).collect(),
        topics: sorted.iter().map(|(_, p)| &*p.topic).collect(),
        partitions: sorted.iter().map(|(_, p)| p.partition).collect(),
        offsets: sorted.iter().map(|(_, p)| p.offset).collect(),
    }
}

impl DedupStore for PostgresStore {
    async fn claim(&self, requests: Vec<ClaimRequest>, now_ms: u64) -> Result<Vec<Claim>, StoreError> {
        let mut answers: Vec<Option<Claim>> = vec![None; requests.len()];
        // ON CONFLICT cannot touch a row twice in one statement: a key repeated in
        // the batch waits for a later round, which then sees the earlier write.
        let mut pending: Vec<usize> = (0..requests.len()).collect();
        let mut rounds = 0;
        while !pending.is_empty() {
            rounds += 1;
            if rounds > 100 {
                return Err(StoreError::Postgres {
                    message: "claims kept racing; giving up this batch".into(),
                    retriable: true,
                });
            }
            let mut seen: HashMap<KeyRef<'_>, ()> = HashMap::new();
            let (this_round, later): (Vec<usize>, Vec<usize>) = pending
                .iter()
                .partition(|&&i| seen.insert((&*requests[i].key.scope, requests[i].key.id.as_slice()), ()).is_none());
            let batch: Vec<ClaimRequest> = this_round.iter().map(|&i| requests[i].clone()).collect();
            let results = self.claim_round(&batch, now_ms).await?;
            let mut retry = later;
            for (&i, answer) in this_round.iter().zip(results) {
                match answer {
                    Some(a) => answers[i] = Some(a),
                    None => retry.push(i),
                }
            }
            retry.sort_unstable();
            pending = retry;
        }
        Ok(answers.into_iter().map(|a| a.expect("every request answered before the loop ends")).collect())
    }

    async fn complete(&self, done: Vec<(EventKey, Position)>, now_ms: u64) -> Result<Vec<bool>, StoreError> {
        let PositionArrays { scopes, ids, topics, partitions, offsets } = position_arrays(&done);
        let now = now_ms as i64;
        let rows = self
            .query("complete", done.len(), COMPLETE, &[&scopes, &ids, &topics, &partitions, &offsets, &now])
            .await?;
        Ok(keys_returned(&rows, &done))
    }

    async fn renew(&self, held: Vec<(EventKey, Position)>, now_ms: u64) -> Result<Vec<bool>, StoreError> {
        let PositionArrays { scopes, ids, topics, partitions, offsets } = position_arrays(&held);
        let now = now_ms as i64;
        let rows = self
            .query("renew", held.len(), RENEW, &[&scopes, &ids, &topics, &partitions, &offsets, &now, &self.lease_ms])
            .await?;
        Ok(keys_returned(&rows, &held))
    }

    async fn release(&self, keys: Vec<(EventKey, Position)>) -> Result<(), StoreError> {
        let PositionArrays { scopes, ids, topics, partitions, offsets } = position_arrays(&keys);
        self.query("release", keys.len(), RELEASE, &[&scopes, &ids, &topics, &partitions, &offsets]).await.map(drop)
    }

    async fn record(&self, responses: Vec<(EventKey, Position, EffectResponse)>) -> Result<Vec<bool>, StoreError> {
        // In key order, as `position_arrays` orders the other statements' rows.
        let mut sorted: Vec<&(EventKey, Position, EffectResponse)> = responses.iter().collect();
        sorted.sort_unstable_by(|(a, ..), (b, ..)| (&*a.scope, &a.id).cmp(&(&*b.scope, &b.id)));
        let scopes: Vec<&str> = sorted.iter().map(|(k, ..)| &*k.scope).collect();
        let ids: Vec<&[u8]> = sorted.iter().map(|(k, ..)| k.id.as_slice()).collect();
        let topics: Vec<&str> = sorted.iter().map(|(_, p, _)| &*p.topic).collect();
        let partitions: Vec<i32> = sorted.iter().map(|(_, p, _)| p.partition).collect();
        let offsets: Vec<i64> = sorted.iter().map(|(_, p, _)| p.offset).collect();
        let texts: Vec<String> = sorted.iter().map(|(.., r)| r.encode()).collect();
        let rows =
            self.query("record", texts.len(), RECORD, &[&scopes, &ids, &topics, &partitions, &offsets, &texts]).await?;
        let keys: Vec<(EventKey, Position)> = responses.into_iter().map(|(k, p, _)| (k, p)).collect();
        Ok(keys_returned(&rows, &keys))
    }

    async fn response(&self, key: EventKey, now_ms: u64) -> Result<Option<EffectResponse>, StoreError> {
        let rows = self.query("response", 1, RESPONSE, &[&&*key.scope, &key.id, &(now_ms as i64)]).await?;
        match rows.first().map(|row| column::<Option<String>>(row, 0)).transpose()?.flatten() {
            Some(text) => EffectResponse::decode(&text).map(Some),
            None => Ok(None),
        }
    }

    async fn lookup(&self, keys: Vec<EventKey>, now_ms: u64) -> Result<Vec<Option<ClaimRow>>, StoreError> {
        let scopes: Vec<&str> = keys.iter().map(|k| &*k.scope).collect();
        let ids: Vec<&[u8]> = keys.iter().map(|k| k.id.as_slice()).collect();
        let now = now_ms as i64;
        let rows = self.query("lookup", keys.len(), LOOKUP, &[&scopes, &ids, &now]).await?;
        let mut found: HashMap<(String, Vec<u8>), ClaimRow> = HashMap::new();
        for row in &rows {
            if let Some(claim) = row_at(row, 2)? {
                found.insert((row.get(0), row.get(1)), claim);
            }
        }
        Ok(keys.iter().map(|k| found.get(&(k.scope.to_string(), k.id.clone())).cloned()).collect())
    }

    async fn forget(&self, key: EventKey) -> Result<bool, StoreError> {
        let client = self.client().await?;
        let n = client.execute(FORGET, &[&&*key.scope, &key.id]).await.map_err(pg_error)?;
        Ok(n > 0)
    }

    async fn release_unless_live(
        &self,
        key: EventKey,
        now_ms: u64,
        claimed_before_ms: u64,
    ) -> Result<Released, StoreError> {
        let (now, before) = (now_ms as i64, claimed_before_ms as i64);
        let deleted = {
            let client = self.client().await?;
            let values: [&(dyn tokio_postgres::types::ToSql + Sync); 5] =
                [&&*key.scope, &key.id, &now, &before, &self.lease_ms];
            client.query_opt(RELEASE_UNLESS_LIVE, &values).await.map_err(pg_error)?
        };
        if let Some(row) = deleted {
            return Ok(if row.get::<_, bool>(0) { Released::Deleted } else { Released::Absent });
        }
        // Kept, or absent: say which (the row may change meanwhile; this is for the report).
        let row = self.lookup(vec![key], now_ms).await?.pop().flatten();
        Ok(row
            .and_then(|row| super::kept_on_release(&row, now_ms, self.lease_ms as u64, claimed_before_ms))
            .unwrap_or(Released::Absent))
    }

    async fn sweep(&self, now_ms: u64) -> Result<usize, StoreError> {
        let client = self.client().await?;
        let statement = client.prepare_cached(SWEEP).await.map_err(pg_error)?;
        let mut removed = 0;
        loop {
            let n = client.execute(&statement, &[&(now_ms as i64), &SWEEP_CHUNK]).await.map_err(pg_error)?;
            removed += n as usize;
            if (n as i64) < SWEEP_CHUNK {
                return Ok(removed);
            }
        }
    }

    fn sync(&self) -> Result<(), StoreError> {
        Ok(())
    }

    fn stats(&self) -> StoreStats {
        StoreStats {
            round_trips: self.stats.round_trips.load(Ordering::Relaxed),
            writes: None,
            memory_bytes: None,
            syncs: 0,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use super::*;

    #[test]
    fn a_connection_error_says_each_cause_once() {
        let chain = [
            "Error occurred while creating a new object: error connecting to server",
            "error connecting to server: Connection refused (os error 111)",
            "Connection refused (os error 111)",
        ]
        .map(String::from);
        assert_eq!(each_cause_once(&chain), "error connecting to server: Connection refused (os error 111)");
        let plain = ["timed out".to_string(), "deadline elapsed".to_string()];
        assert_eq!(each_cause_once(&plain), "timed out: deadline elapsed");
    }

    /// The shared test server, or `None` (and why) when there is none.
    fn test_url(test: &str) -> Option<String> {
        let url = std::env::var("KDEDUP_TEST_POSTGRES").ok();
        if url.is_none() {
            eprintln!("{test}: skipped: KDEDUP_TEST_POSTGRES is not set (scripts/test sets it)");
        }
        url
    }

    /// A connection whose unqualified `kdedup_claims` is the one in `schema`:
    /// the sweep deletes every expired row, so tests keep to a schema of their own.
    async fn connect(url: &str, schema: &str) -> tokio_postgres::Client {
        let (client, connection) =
            tokio_postgres::connect(url, tokio_postgres::NoTls).await.expect("PostgreSQL answers");
        tokio::spawn(connection);
        client.batch_execute(&format!("SET search_path TO {schema}")).await.unwrap();
        client
    }

    /// A fresh schema holding kdedup's table; dropped by the caller.
    async fn private_schema(url: &str, name: &str) -> (tokio_postgres::Client, String) {
        let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos();
        let schema = format!("kdedup_{name}_{}_{nanos}", std::process::id());
        let admin = connect(url, "public").await;
        admin.batch_execute(&format!("CREATE SCHEMA {schema}; SET search_path TO {schema}; {SCHEMA}")).await.unwrap();
        (admin, schema)
    }

    /// The store, on one connection, over the table in `schema`, with `lease` and `ttl` in ms.
    fn store_in(url: &str, schema: &str, lease: i64, ttl: i64) -> PostgresStore {
        let store_url = format!("{url}?options=-c%20search_path%3D{schema}");
        let retention = Retention {
            ttl: Duration::from_millis(ttl as u64),
            lease: Duration::from_millis(lease as u64),
            sweep_interval: Duration::from_secs(3600),
        };
        PostgresStore::open(&store_url, 1, &PostgresTls::Disable, &retention).unwrap()
    }

    /// The claim statement for key ('s', 'k') at position in/`partition`@`offset`, on `client`.
    async fn raw_claim(client: &tokio_postgres::Client, (partition, offset): (i32, i64), times: [i64; 3]) -> Vec<Row> {
        let fp = [7u8; 16].to_vec();
        let [now, lease, ttl] = times;
        client
            .query(
                CLAIM,
                &[
                    &vec!["s"],
                    &vec![b"k".as_slice()],
                    &vec![fp.as_slice()],
                    &vec!["in"],
                    &vec![partition],
                    &vec![offset],
                    &now,
                    &lease,
                    &ttl,
                ],
            )
            .await
            .unwrap()
    }

    /// Awaits a backend matching `which` (a `pg_stat_activity` condition) waiting on a lock,
    /// failing if `task` ends first: it did not wait.
    async fn await_lock_wait<T>(admin: &tokio_postgres::Client, which: &str, task: &tokio::task::JoinHandle<T>) {
        let query =
            format!("SELECT coalesce(bool_or(wait_event_type = 'Lock'), false) FROM pg_stat_activity WHERE {which}");
        let deadline = Instant::now() + Duration::from_secs(30);
        while !admin.query_one(&query, &[]).await.unwrap().get::<_, bool>(0) {
            assert!(!task.is_finished(), "it did not wait on the row lock ({which})");
            assert!(Instant::now() < deadline, "it never waited on the row lock ({which})");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn sweep_that_waited_on_a_takeover_keeps_the_fresh_claim() {
        let Some(url) = test_url("sweep_that_waited_on_a_takeover_keeps_the_fresh_claim") else { return };
        let (admin, schema) = private_schema(&url, "sweep").await;
        let (a, b) = (connect(&url, &schema).await, connect(&url, &schema).await);
        let fp = [7u8; 16].to_vec();
        // A done row that expired at 1000.
        admin
            .execute("INSERT INTO kdedup_claims VALUES ('s', 'k', 2, $1, 'in', 0, 5, 0, 0, 1000)", &[&fp])
            .await
            .unwrap();

        // A takes it over at 2000 with the claim statement and holds the row lock.
        let (now, lease, ttl) = (2000i64, 60_000i64, 3_600_000i64);
        a.batch_execute("BEGIN").await.unwrap();
        let rows = raw_claim(&a, (1, 9), [now, lease, ttl]).await;
        assert!(rows[0].get::<_, bool>(1), "the expired row is taken over");

        // B sweeps at the same time: its snapshot still sees the expired version.
        let b_pid: i32 = b.query_one("SELECT pg_backend_pid()", &[]).await.unwrap().get(0);
        let sweep = tokio::spawn(async move { b.execute(SWEEP, &[&now, &SWEEP_CHUNK]).await });
        await_lock_wait(&admin, &format!("pid = {b_pid}"), &sweep).await;
        a.batch_execute("COMMIT").await.unwrap();
        let deleted = sweep.await.unwrap().unwrap();

        let row = admin
            .query_opt(
                "SELECT state, partition, expires_at FROM kdedup_claims WHERE scope = 's' AND event_id = 'k'",
                &[],
            )
            .await
            .unwrap();
        admin.batch_execute(&format!("DROP SCHEMA {schema} CASCADE")).await.unwrap();
        let row = row.expect("the fresh claim survived the sweep");
        assert_eq!((row.get::<_, i16>(0), row.get::<_, i32>(1)), (1, 1), "the row is the new claimant's");
        assert_eq!(row.get::<_, i64>(2), now + ttl);
        assert_eq!(deleted, 0);
    }

    /// A duplicate's claim reads the row it cannot take and never locks it: it
    /// is answered while the row's owner holds the row (completing it), and the
    /// owner is never held up by it. ON CONFLICT DO UPDATE locked such rows.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_duplicates_claim_neither_waits_for_nor_locks_the_row_it_cannot_take() {
        let test = "a_duplicates_claim_neither_waits_for_nor_locks_the_row_it_cannot_take";
        let Some(url) = test_url(test) else { return };
        let (admin, schema) = private_schema(&url, "nolock").await;
        let fp = [7u8; 16].to_vec();
        let (now, lease, ttl) = (2000i64, 60_000i64, 3_600_000i64);
        // 'done': completed by in/0@5; 'held': in flight at in/0@6 with a live lease.
        admin
            .execute(
                "INSERT INTO kdedup_claims VALUES ('s', 'done', 2, $1, 'in', 0, 5, 1000, 0, $2), \
                 ('s', 'held', 1, $1, 'in', 0, 6, 1000, $3, $2)",
                &[&fp, &(1000 + ttl), &(now + lease)],
            )
            .await
            .unwrap();
        // Their owner holds both rows, as a completion does while it commits.
        let owner = connect(&url, &schema).await;
        owner.batch_execute("BEGIN").await.unwrap();
        owner.batch_execute("SELECT 1 FROM kdedup_claims FOR UPDATE").await.unwrap();

        let store = store_in(&url, &schema, lease, ttl);
        let request = |id: &[u8]| ClaimRequest {
            key: EventKey { scope: Arc::from("s"), id: id.to_vec() },
            fingerprint: Fingerprint(u128::from_be_bytes([7u8; 16])),
            position: Position { topic: Arc::from("in"), partition: 1, offset: 9 },
        };
        let answers = tokio::time::timeout(
            Duration::from_secs(20),
            store.claim(vec![request(b"done"), request(b"held")], now as u64),
        )
        .await
        .expect("the claim is answered while the owner holds the rows")
        .unwrap();
        owner.batch_execute("COMMIT").await.unwrap();

        // The other way round: a duplicate's claim still uncommitted ('k' is done by
        // in/0@5; the claim comes from in/1@9) holds no lock its owner would wait on.
        admin
            .execute("INSERT INTO kdedup_claims VALUES ('s', 'k', 2, $1, 'in', 0, 5, 1000, 0, $2)", &[&fp, &(1000 + ttl)])
            .await
            .unwrap();
        let duplicate = connect(&url, &schema).await;
        duplicate.batch_execute("BEGIN").await.unwrap();
        let rows = raw_claim(&duplicate, (1, 9), [now, lease, ttl]).await;
        assert!(!rows[0].get::<_, bool>(1), "a done row is not taken");
        owner.batch_execute("SET lock_timeout = '5s'").await.unwrap();
        let updated = owner.execute("UPDATE kdedup_claims SET lease_until = 1 WHERE event_id = 'k'", &[]).await;
        duplicate.batch_execute("COMMIT").await.unwrap();
        admin.batch_execute(&format!("DROP SCHEMA {schema} CASCADE")).await.unwrap();
        let first = |offset| Position { topic: Arc::from("in"), partition: 0, offset };
        assert_eq!(
            answers,
            vec![
                Claim::Duplicate { first: first(5), claimed_at_ms: 1000 },
                Claim::InFlight { holder: first(6), lease_until_ms: (now + lease) as u64 },
            ]
        );
        assert_eq!(updated.expect("the owner does not wait on the duplicate's claim"), 1);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_concurrent_claim_that_lapsed_before_ours_is_answered_as_taken_over_not_fresh() {
        let test = "a_concurrent_claim_that_lapsed_before_ours_is_answered_as_taken_over_not_fresh";
        let Some(url) = test_url(test) else { return };
        let (admin, schema) = private_schema(&url, "race").await;
        let a = connect(&url, &schema).await;
        // A claims at 1000 with a 1 s lease (a writer that stamped its claim and
        // then froze) and holds its insert uncommitted.
        let (then, lease, ttl) = (1000i64, 1000i64, 3_600_000i64);
        a.batch_execute("BEGIN").await.unwrap();
        let rows = raw_claim(&a, (0, 5), [then, lease, ttl]).await;
        assert!(rows[0].get::<_, bool>(1), "A inserts the claim");

        // The store claims the key for another position at 5000: its snapshot has
        // no row, its insert waits on A's, and A's lease has lapsed (and its grace) by then.
        let store = store_in(&url, &schema, lease, ttl);
        let request = ClaimRequest {
            key: EventKey { scope: Arc::from("s"), id: b"k".to_vec() },
            fingerprint: Fingerprint(u128::from_be_bytes([7u8; 16])),
            position: Position { topic: Arc::from("in"), partition: 1, offset: 9 },
        };
        let claim = tokio::spawn(async move { store.claim_round(&[request], 5000).await });
        let inserting = "query LIKE '%INSERT INTO kdedup_claims%' AND pid <> pg_backend_pid()";
        await_lock_wait(&admin, inserting, &claim).await;
        a.batch_execute("COMMIT").await.unwrap();
        let answers = claim.await.unwrap().unwrap();
        admin.batch_execute(&format!("DROP SCHEMA {schema} CASCADE")).await.unwrap();
        assert_eq!(
            answers,
            vec![Some(Claim::New(Acquired::TakenOver))],
            "A's effect may have run: the claim over its row is a takeover, never fresh"
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn schema_apply_upgrades_an_older_table_and_a_reapply_takes_no_lock_live_claims_hold() {
        let test = "schema_apply_upgrades_an_older_table_and_a_reapply_takes_no_lock_live_claims_hold";
        let Some(url) = test_url(test) else { return };
        let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos();
        let schema = format!("kdedup_upgrade_{}_{nanos}", std::process::id());
        let admin = connect(&url, "public").await;
        // The table as an older kdedup made it: no response column, no fillfactor, no index.
        let table = &SCHEMA[SCHEMA.find("CREATE TABLE").unwrap()..SCHEMA.find("-- The changes below").unwrap()];
        admin.batch_execute(&format!("CREATE SCHEMA {schema}; SET search_path TO {schema}; {table}")).await.unwrap();
        let apply = |client: tokio_postgres::Client| async move {
            let result = client.batch_execute(SCHEMA).await;
            (client, result)
        };
        let (a, applied) = apply(connect(&url, &schema).await).await;
        applied.expect("the upgrade applies");
        let upgraded: (bool, bool, bool) = {
            let row = admin
                .query_one(
                    &format!(
                        "SELECT to_regclass('{schema}.kdedup_claims_expires_at') IS NOT NULL, \
                         (SELECT reloptions @> ARRAY['fillfactor=50'] FROM pg_class WHERE oid = '{schema}.kdedup_claims'::regclass), \
                         EXISTS (SELECT 1 FROM information_schema.columns WHERE table_schema = '{schema}' \
                                 AND table_name = 'kdedup_claims' AND column_name = 'response')"
                    ),
                    &[],
                )
                .await
                .unwrap();
            (row.get(0), row.get(1), row.get(2))
        };

        // A claim in flight holds its insert uncommitted; a re-apply (the next
        // deploy's `schema apply`) must not queue for the table behind it.
        a.batch_execute("BEGIN").await.unwrap();
        raw_claim(&a, (0, 5), [1000, 60_000, 3_600_000]).await;
        let b = connect(&url, &schema).await;
        b.batch_execute("SET lock_timeout = '5s'").await.unwrap();
        let (_b, reapplied) = apply(b).await;
        a.batch_execute("COMMIT").await.unwrap();
        admin.batch_execute(&format!("DROP SCHEMA {schema} CASCADE")).await.unwrap();
        assert_eq!(upgraded, (true, true, true), "index, fillfactor and response column after the upgrade");
        reapplied.expect("a re-apply beside a claim in flight takes no table lock");
    }

    #[tokio::test]
    async fn a_column_of_another_type_is_a_schema_error_naming_it_not_a_panic() {
        let Some(url) = test_url("a_column_of_another_type_is_a_schema_error_naming_it_not_a_panic") else { return };
        let client = connect(&url, "public").await;
        // `partition` as bigint where the schema says integer.
        let row = client
            .query_one(
                "SELECT 1::smallint AS state, '\\x00000000000000000000000000000000'::bytea AS fingerprint, \
                 'in'::text AS topic, 3::bigint AS partition, 4::bigint AS \"offset\", \
                 0::bigint AS claimed_at, 0::bigint AS lease_until, 0::bigint AS expires_at",
                &[],
            )
            .await
            .unwrap();
        let error = row_at(&row, 0).expect_err("a bigint partition cannot be read as i32");
        let message = error.to_string();
        assert!(matches!(error, StoreError::Config(_)), "{message}");
        assert!(!error.is_retriable());
        assert!(message.contains("`partition`") && message.contains("kdedup schema apply"), "{message}");
    }
}
