//! Configuration: a TOML file, then `KDEDUP_<SECTION>__<KEY>` environment
//! overrides, then validation into richer types. Parsing never guesses: unknown
//! keys are errors, and every error names where the value came from (the file with
//! its line and column, or the environment variable), the key, and what is allowed.
//!
//! The file's shape is plain serde types: choices are enums (serde's own error lists
//! the allowed values), each section has its defaults in one `Default`. `validate`
//! turns that shape into the richer types the crate uses, checking bounds and the rules
//! that tie keys together.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::fmt::Display;
use std::net::SocketAddr;
use std::num::{NonZeroU32, NonZeroU64, NonZeroUsize};
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Deserializer};
use toml::de::{DeTable, DeValue};
use toml::Spanned;

use crate::error::ConfigError;

// Two leaves of the config's own, each importing nothing: the parsed `[sink.http] url`
// and the filter's sizing plan (which `filter` shares, so the two cannot disagree).
pub mod filter_plan;
pub mod url_template;

use url_template::UrlTemplate;

/// Prefix of environment overrides: `KDEDUP_KAFKA__BROKERS=…` sets `[kafka] brokers`.
pub const ENV_PREFIX: &str = "KDEDUP_";

// Bounds of numeric keys. Each keeps a value that would fail only at run time
// (a stalled partition, a panic, an abort on allocation) out of a valid config.

/// `store.ttl_secs`: 20 years. ScyllaDB refuses larger TTLs on every write, which
/// would pause partitions at run time rather than fail at load.
pub const MAX_TTL_SECS: u64 = 630_720_000;
/// `store.lease_secs`: an hour. A crashed owner's claims wait out the lease before
/// a redelivery takes them over, and a live owner renews its lease while it works.
pub const MAX_LEASE_SECS: u64 = 3_600;
/// `store.sweep_interval_secs`: a day.
pub const MAX_SWEEP_INTERVAL_SECS: u64 = 86_400;
/// `[filter] expected_keys` and `false_positive_rate` together: the aging
/// filter's planned table, allocated (and zeroed) whole at start.
pub const MAX_FILTER_BYTES: u64 = 64 << 30;
/// `filter.recent_keys`: about 80 bytes each once filled.
pub const MAX_RECENT_KEYS: usize = 100_000_000;
/// `filter.expired_keys`: about 34 bytes each once filled.
pub const MAX_EXPIRED_KEYS: usize = 100_000_000;
/// `key.max_bytes`: a stored key is `2 + scope + ID` bytes, and a PostgreSQL
/// primary key holds about 2,700 (the embedded store 65,536). Longer IDs are
/// hashed (`on_oversize = "hash"`) to 71 bytes.
pub const MAX_ID_BYTES: usize = 2_048;
/// `key.scope` (which defaults to `kafka.group_id`), in bytes; see [`MAX_ID_BYTES`].
pub const MAX_SCOPE_BYTES: usize = 256;
/// `[kafka] prefetch_mib`'s default, in bytes: what the group consumer may
/// prefetch, all partitions together.
pub const DEFAULT_PREFETCH_BYTES: u64 = 128 << 20;
/// `pipeline.batch_max`: each partition holds up to this many records at once.
pub const MAX_BATCH: usize = 100_000;
/// `kafka.prefetch_mib`: the group consumer's prefetch, all partitions together (64 GiB).
pub const MAX_PREFETCH_MIB: u64 = 65_536;
/// `pipeline.commit_interval_ms`: a day.
pub const MAX_COMMIT_INTERVAL_MS: u64 = 86_400_000;
/// `pipeline.drain_timeout_ms`: an hour.
pub const MAX_DRAIN_TIMEOUT_MS: u64 = 3_600_000;
/// `store.request_timeout_ms` and `store.connect_timeout_ms`: ten minutes.
pub const MAX_STORE_TIMEOUT_MS: u64 = 600_000;
/// `store.pool_size`: PostgreSQL connections.
pub const MAX_POOL_SIZE: usize = 1_024;
/// `store.max_in_flight`: CQL stream IDs per connection.
pub const MAX_IN_FLIGHT: usize = 32_768;
/// `[sink.http] timeout_ms`, `backoff_*_ms` and `retry_budget_ms`: a day.
pub const MAX_HTTP_MS: u64 = 86_400_000;
/// `[sink.http] max_in_flight`: requests per partition at once.
pub const MAX_HTTP_IN_FLIGHT: usize = 1_024;
/// `serve.max_key_bytes`: the header value is hashed into the stored key, so
/// this bounds only what a client may send.
pub const MAX_SERVE_KEY_BYTES: usize = 8_192;
/// `serve.max_body_bytes` and `serve.max_response_bytes`: 1 GiB, held in memory per request.
pub const MAX_SERVE_BODY_BYTES: usize = 1 << 30;
/// `serve.record_body_bytes`: each recorded body is kept on its claim row (base64).
pub const MAX_SERVE_RECORD_BYTES: usize = 16 << 20;

// ---------------------------------------------------------------------------
// The file as written
// ---------------------------------------------------------------------------

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    kafka: KafkaSection,
    #[serde(default)]
    key: KeySection,
    #[serde(default)]
    store: StoreSection,
    #[serde(default)]
    filter: FilterConfig,
    sink: SinkSection,
    dead_letter: TopicSection,
    #[serde(default)]
    duplicates: TopicSection,
    #[serde(default)]
    metrics: MetricsSection,
    #[serde(default)]
    pipeline: PipelineSection,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct KafkaSection {
    #[serde(deserialize_with = "lenient_string")]
    brokers: String,
    #[serde(deserialize_with = "lenient_string")]
    group_id: String,
    #[serde(deserialize_with = "string_list")]
    topics: Vec<String>,
    /// librdkafka properties for every client kdedup makes (TLS, SASL).
    #[serde(default)]
    client: BTreeMap<String, toml::Value>,
    #[serde(default)]
    consumer: BTreeMap<String, toml::Value>,
    #[serde(default)]
    producer: BTreeMap<String, toml::Value>,
    /// What the group consumer may prefetch, all partitions together, in MiB.
    #[serde(default = "default_prefetch_mib")]
    prefetch_mib: u64,
}

fn default_prefetch_mib() -> u64 {
    DEFAULT_PREFETCH_BYTES >> 20
}

#[derive(Deserialize)]
#[serde(default, deny_unknown_fields)]
struct KeySection {
    source: KeyKind,
    #[serde(deserialize_with = "lenient_string")]
    header: String,
    json_pointer: String,
    /// Empty: the group ID.
    #[serde(deserialize_with = "lenient_string")]
    scope: String,
    max_bytes: usize,
    on_oversize: OnOversize,
    #[serde(deserialize_with = "string_list")]
    fingerprint_fields: Vec<String>,
}

impl Default for KeySection {
    fn default() -> Self {
        KeySection {
            source: KeyKind::Header,
            header: "event-id".into(),
            json_pointer: "/id".into(),
            scope: String::new(),
            max_bytes: 512,
            on_oversize: OnOversize::Hash,
            fingerprint_fields: Vec::new(),
        }
    }
}

/// `[key] source`.
#[derive(Deserialize)]
#[serde(rename_all = "snake_case")]
enum KeyKind {
    Header,
    Key,
    Json,
    PayloadHash,
}

#[derive(Deserialize)]
#[serde(default, deny_unknown_fields)]
struct StoreSection {
    kind: StoreKind,
    path: PathBuf,
    ttl_secs: u64,
    lease_secs: u64,
    sweep_interval_secs: u64,
    /// PostgreSQL URL, when kind = "postgres" (may carry the password: set it from the environment).
    url: String,
    pool_size: usize,
    // ScyllaDB, when kind = "scylla".
    #[serde(deserialize_with = "string_list")]
    contact_points: Vec<String>,
    #[serde(deserialize_with = "lenient_string")]
    local_datacenter: String,
    #[serde(deserialize_with = "lenient_string")]
    keyspace: String,
    /// Datacenter name -> replication factor; empty = 3 in local_datacenter.
    replication: BTreeMap<String, toml::Value>,
    consistency: ScyllaConsistency,
    serial_consistency: ScyllaSerialConsistency,
    request_timeout_ms: u64,
    connect_timeout_ms: u64,
    max_in_flight: usize,
    /// ScyllaDB: `true`/`false`; PostgreSQL: also "disable", "require", "verify-full".
    tls: Option<TlsMode>,
    tls_ca_file: Option<PathBuf>,
    #[serde(deserialize_with = "lenient_string")]
    username: String,
    /// Set it from the environment (KDEDUP_STORE__PASSWORD) or a file, never in the file.
    #[serde(deserialize_with = "lenient_string")]
    password: String,
}

impl Default for StoreSection {
    fn default() -> Self {
        StoreSection {
            kind: StoreKind::Embedded,
            path: PathBuf::from("./kdedup-data"),
            ttl_secs: 86_400,
            lease_secs: 60,
            sweep_interval_secs: 60,
            url: String::new(),
            pool_size: 16,
            contact_points: Vec::new(),
            local_datacenter: String::new(),
            keyspace: "kdedup".into(),
            replication: BTreeMap::new(),
            consistency: ScyllaConsistency::LocalQuorum,
            serial_consistency: ScyllaSerialConsistency::LocalSerial,
            request_timeout_ms: 5_000,
            connect_timeout_ms: 5_000,
            max_in_flight: 256,
            tls: None,
            tls_ca_file: None,
            username: String::new(),
            password: String::new(),
        }
    }
}

/// `[store] kind`.
#[derive(Deserialize)]
#[serde(rename_all = "snake_case")]
enum StoreKind {
    Embedded,
    Postgres,
    Scylla,
}

/// `[store] tls`: how the store connection is encrypted. `true` means
/// `verify-full`, `false` means `disable`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum TlsMode {
    /// Plain TCP.
    Disable,
    /// Encrypted, but the server's certificate is not checked: protects against
    /// eavesdropping, not against a server impersonated on the path.
    Require,
    /// Encrypted; the certificate chain is checked against `tls_ca_file` (or the
    /// system's roots) and must name the host or IP address the URL connects to.
    VerifyFull,
}

impl<'de> Deserialize<'de> for TlsMode {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<TlsMode, D::Error> {
        match toml::Value::deserialize(d)? {
            toml::Value::Boolean(true) => Ok(TlsMode::VerifyFull),
            toml::Value::Boolean(false) => Ok(TlsMode::Disable),
            toml::Value::String(s) => match s.as_str() {
                "disable" | "false" => Ok(TlsMode::Disable),
                "require" => Ok(TlsMode::Require),
                "verify-full" | "true" => Ok(TlsMode::VerifyFull),
                other => Err(serde::de::Error::custom(format!(
                    "is \"{other}\"; allowed: \"disable\", \"require\", \"verify-full\" (or true / false)"
                ))),
            },
            other => Err(serde::de::Error::custom(format!(
                "is {other}; allowed: \"disable\", \"require\", \"verify-full\" (or true / false)"
            ))),
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SinkSection {
    kind: SinkKind,
    #[serde(default, deserialize_with = "lenient_string")]
    topic: String,
    #[serde(default)]
    partitioning: Partitioning,
    /// `kind = "http"`: the endpoint and how its answers are read.
    #[serde(default)]
    http: Option<HttpSection>,
}

/// `[sink] kind`.
#[derive(Deserialize)]
#[serde(rename_all = "snake_case")]
enum SinkKind {
    Kafka,
    Stdout,
    Http,
    Custom,
}

#[derive(Deserialize)]
#[serde(default, deny_unknown_fields)]
struct HttpSection {
    #[serde(deserialize_with = "lenient_string")]
    url: String,
    method: String,
    idempotency_header: String,
    content_type: Option<String>,
    /// Static headers; `NAME.file = PATH` reads the value from a file and
    /// `NAME.env = VAR` from the environment (resolved before parsing).
    headers: BTreeMap<String, String>,
    timeout_ms: u64,
    max_in_flight: usize,
    retry_budget_ms: u64,
    backoff_initial_ms: u64,
    backoff_max_ms: u64,
    max_request_bytes: usize,
    /// Status code (`"409"`) or class (`"4xx"`) → what it means.
    outcomes: BTreeMap<String, HttpOutcome>,
    #[serde(deserialize_with = "lenient_string")]
    results_topic: String,
}

impl Default for HttpSection {
    fn default() -> Self {
        HttpSection {
            url: String::new(),
            method: "POST".into(),
            idempotency_header: "Idempotency-Key".into(),
            content_type: None,
            headers: BTreeMap::new(),
            timeout_ms: 10_000,
            max_in_flight: 8,
            retry_budget_ms: 300_000,
            backoff_initial_ms: 200,
            backoff_max_ms: 30_000,
            max_request_bytes: 10 << 20,
            outcomes: BTreeMap::new(),
            results_topic: String::new(),
        }
    }
}

/// `[dead_letter]` and `[duplicates]`.
#[derive(Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct TopicSection {
    #[serde(default, deserialize_with = "lenient_string")]
    topic: String,
}

#[derive(Deserialize)]
#[serde(default, deny_unknown_fields)]
struct MetricsSection {
    listen: String,
}

impl Default for MetricsSection {
    fn default() -> Self {
        MetricsSection { listen: "127.0.0.1:9464".into() }
    }
}

#[derive(Deserialize)]
#[serde(default, deny_unknown_fields)]
struct PipelineSection {
    batch_max: usize,
    commit_interval_ms: u64,
    drain_timeout_ms: u64,
    on_conflict: OnConflict,
    mode: Mode,
}

impl Default for PipelineSection {
    fn default() -> Self {
        PipelineSection {
            batch_max: 1000,
            commit_interval_ms: 1000,
            drain_timeout_ms: 10_000,
            on_conflict: OnConflict::DeadLetter,
            mode: Mode::Enforce,
        }
    }
}

/// A URL as it may be shown (check's settings, `Debug`, logs, dead-letter
/// headers): userinfo and query (and fragment) redacted, since tokens and
/// passwords live there; scheme, host, port and path kept. Text that is not a
/// `scheme://` URL (a `key=value` connection string) is redacted whole.
///
/// ```
/// use kdedup::config::redact_url;
/// assert_eq!(redact_url("https://user:pw@h:8443/v1/hook?token=s3cret#x"), "https://<redacted>@h:8443/v1/hook?<redacted>");
/// assert_eq!(redact_url("postgres://db/k"), "postgres://db/k");
/// assert_eq!(redact_url("host=db password=pw"), "<redacted>");
/// ```
pub fn redact_url(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else { return "<redacted>".into() };
    let (before, after_query) = match rest.find(['?', '#']) {
        Some(at) => (&rest[..at], "?<redacted>"),
        None => (rest, ""),
    };
    let authority_end = before.find('/').unwrap_or(before.len());
    let (authority, path) = before.split_at(authority_end);
    let host = match authority.rsplit_once('@') {
        Some((_, host)) => format!("<redacted>@{host}"),
        None => authority.to_string(),
    };
    format!("{scheme}://{host}{path}{after_query}")
}

/// A librdkafka boolean property's value as librdkafka's own parser reads it
/// (`rdkafka_conf.c`, `_RK_C_BOOL`): `true` / `t` and `false` / `f` in any case,
/// `1` and `0`; no trimming, nothing else (librdkafka refuses anything else).
pub fn librdkafka_bool(value: &str) -> Option<bool> {
    if value.eq_ignore_ascii_case("true") || value.eq_ignore_ascii_case("t") || value == "1" {
        Some(true)
    } else if value.eq_ignore_ascii_case("false") || value.eq_ignore_ascii_case("f") || value == "0" {
        Some(false)
    } else {
        None
    }
}

/// Accepts a string, or a number/bool written where a string was meant (an
/// environment override `KDEDUP_KAFKA__GROUP_ID=42` arrives as an integer).
fn lenient_string<'de, D: Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    let value = toml::Value::deserialize(d)?;
    scalar_to_string(&value).ok_or_else(|| serde::de::Error::custom("expected a string"))
}

/// Accepts a list of strings, or one comma-separated string (handy from the environment).
fn string_list<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    let bad = || serde::de::Error::custom("expected a list of strings");
    match toml::Value::deserialize(d)? {
        toml::Value::Array(items) => items.iter().map(|v| scalar_to_string(v).ok_or_else(bad)).collect(),
        other => {
            let s = scalar_to_string(&other).ok_or_else(bad)?;
            Ok(s.split(',').map(str::trim).filter(|s| !s.is_empty()).map(String::from).collect())
        }
    }
}

fn scalar_to_string(value: &toml::Value) -> Option<String> {
    match value {
        toml::Value::String(s) => Some(s.clone()),
        toml::Value::Integer(i) => Some(i.to_string()),
        toml::Value::Float(f) => Some(f.to_string()),
        toml::Value::Boolean(b) => Some(b.to_string()),
        _ => None,
    }
}

// ---------------------------------------------------------------------------
// The validated configuration the rest of the crate uses
// ---------------------------------------------------------------------------

/// A value that must never be printed (a password, a URL with credentials, a header
/// holding a token): `Debug` shows it as [`redact_url`] does, `<redacted>` unless it
/// is a `scheme://` URL, whose host and path stay.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// The value itself, for the one place that needs it (a connection, a request).
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&redact_url(&self.0))
    }
}

impl From<String> for Secret {
    fn from(value: String) -> Secret {
        Secret(value)
    }
}

impl From<&str> for Secret {
    fn from(value: &str) -> Secret {
        Secret(value.to_string())
    }
}

/// Where the event ID comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum KeySource {
    /// The named header's value (any bytes).
    Header(String),
    /// The record's Kafka key.
    RecordKey,
    /// RFC 6901 pointer into a JSON payload.
    Json(String),
    /// A hash of the whole payload: content dedup, for producers that send no ID.
    PayloadHash,
}

/// `[key] on_oversize`: what an event ID longer than `max_bytes` becomes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum OnOversize {
    /// Replaced by `sha256:<hex>` of the ID (still one key per ID).
    Hash,
    /// The record is dead-lettered (`oversize_id`).
    DeadLetter,
}

/// `[key]`: how each record's dedup key and fingerprint are made.
#[derive(Debug, Clone)]
pub struct KeyConfig {
    /// Where the event ID comes from.
    pub source: KeySource,
    /// The key's namespace: (scope, ID) is the dedup key; defaults to `kafka.group_id`.
    pub scope: String,
    /// Longest event ID kept as it is, in bytes (at most 2048).
    pub max_bytes: NonZeroUsize,
    /// What a longer ID becomes.
    pub on_oversize: OnOversize,
    /// JSON pointers whose values make the fingerprint; empty = the whole payload.
    pub fingerprint_fields: Vec<String>,
}

/// `[store]`: which store holds the claims, the authority on what is new.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub enum StoreConfig {
    /// The embedded (fjall) store on local disk (`kind = "embedded"`): one consumer instance.
    Embedded {
        /// The store's directory.
        path: PathBuf,
    },
    /// PostgreSQL (`kind = "postgres"`): a shared SQL store.
    Postgres {
        /// `postgres://…` connection URL; may hold a password.
        url: Secret,
        /// Most connections in the pool.
        pool_size: usize,
        /// TLS to the server.
        tls: PostgresTls,
    },
    /// ScyllaDB (`kind = "scylla"`): for consumer groups across machines.
    Scylla(Box<ScyllaConfig>),
}

/// TLS to PostgreSQL, from `[store] tls` and `tls_ca_file` (or the URL's `sslmode`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum PostgresTls {
    /// Neither `tls` nor `sslmode` given, or `sslmode=prefer`: TLS without
    /// verification when the server offers it, else plain (tokio-postgres' and libpq's default).
    #[default]
    Prefer,
    /// Plain TCP (`tls = "disable"` or `sslmode=disable`).
    Disable,
    /// Encrypted, certificate not verified.
    Require,
    /// Chain checked against `ca_file` (the system's roots when `None`), and the
    /// certificate must name the URL's host or IP address.
    VerifyFull {
        /// The CA bundle (PEM) to trust; the system's roots when `None`.
        ca_file: Option<PathBuf>,
    },
}

/// Consistency of the commit (learn) phase of a lightweight transaction and
/// of plain reads: `LOCAL_QUORUM` stays inside the local datacenter.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum ScyllaConsistency {
    /// `LOCAL_QUORUM`: a quorum of the local datacenter's replicas.
    LocalQuorum,
    /// `QUORUM`: a quorum of all replicas, across datacenters.
    Quorum,
}

/// Consistency of the Paxos round of a lightweight transaction (and of the
/// SERIAL reads that settle ambiguous outcomes). `LocalSerial` is linearizable
/// within one datacenter only: every kdedup process of one scope must then
/// use the same datacenter.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum ScyllaSerialConsistency {
    /// `LOCAL_SERIAL`: Paxos among the local datacenter's replicas.
    LocalSerial,
    /// `SERIAL`: Paxos across every datacenter.
    Serial,
}

/// `[store] kind = "scylla"`: the ScyllaDB cluster and how to talk to it.
#[derive(Debug, Clone)]
pub struct ScyllaConfig {
    /// host:port of a few nodes; the driver discovers the rest.
    pub contact_points: Vec<String>,
    /// The datacenter this process talks to; LOCAL_* consistencies mean this one.
    pub local_datacenter: String,
    /// Keyspace holding the `kdedup_claims` table.
    pub keyspace: String,
    /// Datacenter -> replication factor (NetworkTopologyStrategy).
    pub replication: BTreeMap<String, NonZeroU32>,
    /// Of the commit phase of claims and of plain reads.
    pub consistency: ScyllaConsistency,
    /// Of the Paxos phase of claims, completions and takeovers.
    pub serial_consistency: ScyllaSerialConsistency,
    /// Per statement, as the driver's request timeout.
    pub request_timeout: Duration,
    /// Per connection attempt to a node.
    pub connect_timeout: Duration,
    /// Statements one store call keeps in flight at once.
    pub max_in_flight: NonZeroUsize,
    /// `Some` when TLS is on.
    pub tls: Option<ScyllaTls>,
    /// (username, password) for PasswordAuthenticator.
    pub credentials: Option<(String, Secret)>,
}

/// `[store] tls = true` for ScyllaDB: how the nodes' certificates are checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScyllaTls {
    /// The CA bundle (PEM) to trust; the system's roots when `None`.
    pub ca_file: Option<PathBuf>,
}

/// `[store] ttl_secs`, `lease_secs` and `sweep_interval_secs`: how long claims live.
#[derive(Debug, Clone)]
pub struct Retention {
    /// How long a completed key suppresses its duplicates.
    pub ttl: Duration,
    /// How long an in-flight claim is honoured before another owner may take it over.
    pub lease: Duration,
    /// How often expired rows are removed from disk.
    pub sweep_interval: Duration,
}

/// `[filter]`: sizes of the in-process tiers in front of the store. Read as written;
/// the bounds are checked at validation.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct FilterConfig {
    /// Keys expected within one TTL window; sizes the aging filter (about 2.5 bytes a key).
    pub expected_keys: NonZeroU64,
    /// The aging filter's target false-positive rate (a false positive costs one store read).
    pub false_positive_rate: f64,
    /// Capacity of the exact cache of keys this process completed; 0 disables it.
    pub recent_keys: usize,
    /// Most keys kept past their expiry to count `kdedup_expired_key_hits_total`
    /// (a sample beyond); 0 disables the estimate.
    pub expired_keys: usize,
}

impl Default for FilterConfig {
    fn default() -> Self {
        FilterConfig {
            expected_keys: NonZeroU64::new(10_000_000).expect("not zero"),
            false_positive_rate: 0.001,
            recent_keys: 100_000,
            expired_keys: 1_000_000,
        }
    }
}

/// `[sink] partitioning`: which output partition a record goes to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum Partitioning {
    /// Output partition = input partition (modulo the output's partition count):
    /// each input partition's order is kept in the output.
    #[default]
    Source,
    /// The librdkafka partitioner hashes the record key.
    Key,
}

/// `[sink]`: the side effect run for each new event.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum SinkConfig {
    /// Produce to an output topic (`kind = "kafka"`), the event ID in headers.
    Kafka {
        /// The output topic; exists and differs from the inputs.
        topic: String,
        /// Which output partition each record goes to.
        partitioning: Partitioning,
    },
    /// One JSON line per new event on standard output.
    Stdout,
    /// One HTTP request per new event, with an `Idempotency-Key` header.
    Http(Box<HttpSinkConfig>),
    /// The effect is given in code ([`crate::service::RunOptions::sink`]): library use.
    Custom,
}

/// What an HTTP answer means for the record (`[sink.http.outcomes]`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum HttpOutcome {
    /// The effect happened: complete the claim, record the response.
    Done,
    /// Try again with the same `Idempotency-Key`, within the retry budget.
    Retry,
    /// The endpoint says the key was used with other parameters: dead-lettered as a conflict.
    Conflict,
    /// The endpoint refuses the request for good: dead-lettered with the status and an excerpt.
    DeadLetter,
}

/// `[sink] kind = "http"` with `[sink.http]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpSinkConfig {
    /// May hold `{topic}`, `{partition}` and `{header.NAME}` (percent-encoded when filled in);
    /// shown redacted, since tokens live in URLs.
    pub url: Secret,
    /// `url` parsed, once: the sink fills it per record.
    pub url_template: UrlTemplate,
    /// The HTTP method, upper case (`POST` by default).
    pub method: String,
    /// Name of the header carrying `kdedup-<sha256(scope, event ID)>`.
    pub idempotency_header: String,
    /// Used when the record has no `content-type` header of its own.
    pub content_type: String,
    /// Static headers, in order; values may be credentials.
    pub headers: Vec<(String, Secret)>,
    /// Per request, connection to last body byte.
    pub timeout: Duration,
    /// Requests in flight per partition at once; one key's effects stay in order.
    pub max_in_flight: NonZeroUsize,
    /// Total time spent retrying one record before it is dead-lettered.
    pub retry_budget: Duration,
    /// First retry's backoff; doubled per retry up to `backoff_max`, with jitter.
    pub backoff_initial: Duration,
    /// Longest backoff; a longer `Retry-After` is still honoured, within the budget.
    pub backoff_max: Duration,
    /// Largest payload sent, in bytes; larger records are dead-lettered.
    pub max_request_bytes: usize,
    /// Exact status codes first, then classes (`4` for 4xx); see [`HttpSinkConfig::outcome`].
    pub outcomes_by_code: BTreeMap<u16, HttpOutcome>,
    /// Outcomes by status class (`4` for 4xx), after `outcomes_by_code`.
    pub outcomes_by_class: BTreeMap<u16, HttpOutcome>,
    /// Topic every answer is written to (JSON, keyed by event ID, source position in headers).
    pub results_topic: Option<String>,
}

impl HttpSinkConfig {
    /// What a status means: the configured code, then the configured class, then
    /// the defaults (2xx done; 409 retry; 422 conflict; 429 and 5xx retry; the rest dead-lettered).
    pub fn outcome(&self, status: u16) -> HttpOutcome {
        if let Some(o) = self.outcomes_by_code.get(&status).or_else(|| self.outcomes_by_class.get(&(status / 100))) {
            return *o;
        }
        match status {
            200..=299 => HttpOutcome::Done,
            409 | 429 | 500..=599 => HttpOutcome::Retry,
            422 => HttpOutcome::Conflict,
            _ => HttpOutcome::DeadLetter,
        }
    }
}

/// `[pipeline] mode`: what the decision is used for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum Mode {
    /// Effects run for new events only (the default).
    #[default]
    Enforce,
    /// Every keyed record is forwarded to the sink, duplicates and conflicts
    /// included, stamped `kdedup-duplicate: true|false`; claims, completions,
    /// commits and metrics as in `Enforce`. For measuring before enforcing.
    Observe,
}

/// `[pipeline] on_conflict`: what becomes of a reused ID with another payload.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum OnConflict {
    /// Dead-lettered with reason `conflict` (the default).
    DeadLetter,
    /// Treat a reused ID with another payload as a plain duplicate (still counted).
    Drop,
}

/// `[pipeline]`: batching, commits and draining of each partition.
#[derive(Debug, Clone)]
pub struct PipelineConfig {
    /// Most records one partition takes in one batch.
    pub batch_max: NonZeroUsize,
    /// How often finished offsets are committed (after one store fsync).
    pub commit_interval: Duration,
    /// On revoke or shutdown, how long in-flight batches may take to finish.
    pub drain_timeout: Duration,
    /// What a conflict becomes.
    pub on_conflict: OnConflict,
    /// Enforce (effects for new events only) or observe (everything forwarded, stamped).
    pub mode: Mode,
}

/// `[kafka]`: the cluster, the group, the input topics, and raw librdkafka properties.
#[derive(Clone)]
pub struct KafkaConfig {
    /// `bootstrap.servers`: comma-separated host:port.
    pub brokers: String,
    /// The consumer group; also the default key scope.
    pub group_id: String,
    /// Input topics the group subscribes to.
    pub topics: Vec<String>,
    /// Raw librdkafka properties, passed through as given: `client` to every client
    /// (see `kafka_client`), then `consumer` or `producer` by role.
    pub client: BTreeMap<String, String>,
    /// Raw properties for the consumer only, after `client`.
    pub consumer: BTreeMap<String, String>,
    /// Raw properties for the producers only (output, dead letters, duplicates), after `client`.
    pub producer: BTreeMap<String, String>,
    /// `prefetch_mib` in bytes: what the group consumer may prefetch, all partitions together
    /// (each gets a share; `queued.*` in `consumer` override it).
    pub prefetch_bytes: u64,
}

/// Never prints a secret property's value (see [`is_secret_property`]).
impl std::fmt::Debug for KafkaConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KafkaConfig")
            .field("brokers", &self.brokers)
            .field("group_id", &self.group_id)
            .field("topics", &self.topics)
            .field("client", &redacted(&self.client))
            .field("consumer", &redacted(&self.consumer))
            .field("producer", &redacted(&self.producer))
            .field("prefetch_bytes", &self.prefetch_bytes)
            .finish()
    }
}

/// A whole, validated configuration: what [`crate::service::run`] runs. Load one with
/// [`Config::load`] (a file plus `KDEDUP_…` overrides).
#[derive(Debug, Clone)]
pub struct Config {
    /// `[kafka]`.
    pub kafka: KafkaConfig,
    /// `[key]`.
    pub key: KeyConfig,
    /// `[store]`.
    pub store: StoreConfig,
    /// `[store] ttl_secs`, `lease_secs`, `sweep_interval_secs`.
    pub retention: Retention,
    /// `[filter]`.
    pub filter: FilterConfig,
    /// `[sink]`.
    pub sink: SinkConfig,
    /// `[dead_letter] topic`: records that cannot be handled, the reason in headers.
    pub dead_letter_topic: String,
    /// `[duplicates] topic`: an optional audit topic for duplicates; `None` drops them (counted).
    pub duplicates_topic: Option<String>,
    /// `None` when `[metrics] listen = ""`.
    pub metrics_listen: Option<SocketAddr>,
    /// `[pipeline]`.
    pub pipeline: PipelineConfig,
    /// The file it was read from ([`Config::load`]); `None` when it came from text.
    pub file: Option<PathBuf>,
}

impl Config {
    /// Reads `path`, applies `KDEDUP_…` overrides from the process environment, validates.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let config = Config::from_toml_with_env(&read_file(path)?, &path.display().to_string(), std::env::vars())?;
        Ok(Config { file: Some(path.to_path_buf()), ..config })
    }

    /// Parses TOML text with the given environment; `origin` names the source in errors.
    ///
    /// ```
    /// use kdedup::config::{Config, SinkConfig};
    ///
    /// let toml = r#"
    ///     [kafka]
    ///     brokers = "127.0.0.1:9092"
    ///     group_id = "payments"
    ///     topics = ["payments"]
    ///     [sink]
    ///     kind = "custom"
    ///     [dead_letter]
    ///     topic = "payments.dlq"
    /// "#;
    /// let env = [("KDEDUP_STORE__TTL_SECS".to_string(), "172800".to_string())];
    /// let config = Config::from_toml_with_env(toml, "inline", env)?;
    /// assert_eq!(config.key.scope, "payments"); // the group by default
    /// assert_eq!(config.retention.ttl.as_secs(), 2 * 86_400);
    /// assert_eq!(config.sink, SinkConfig::Custom);
    /// # Ok::<(), kdedup::error::ConfigError>(())
    /// ```
    pub fn from_toml_with_env(
        text: &str,
        origin: &str,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Config, ConfigError> {
        validate(layered::<FileConfig>(text, origin, env)?, &Ctx(origin))
    }
}

// ---------------------------------------------------------------------------
// Layering: the file, then the environment, then secret files; errors located
// ---------------------------------------------------------------------------

/// The command that creates or updates the store's schema with the config read from
/// `file`, as messages about a missing schema tell a person to run it.
pub fn schema_apply_command(file: Option<&Path>) -> String {
    match file {
        Some(file) => format!("kdedup schema apply --config {}", file.display()),
        None => "kdedup schema apply".to_string(),
    }
}

/// A config file's text, or an error naming the file.
fn read_file(path: &Path) -> Result<String, ConfigError> {
    std::fs::read_to_string(path).map_err(|source| ConfigError::Read { path: path.to_path_buf(), source })
}

/// One `KDEDUP_…` variable that sets a key.
struct Override<'e> {
    var: &'e str,
    path: Vec<String>,
    raw: &'e str,
}

/// TOML text with the environment's `KDEDUP_…` overrides and secret files layered on,
/// deserialized as `T` (a file's shape, before validation). The layering happens on
/// toml's spanned document, so a shape error still knows where its value came from:
/// a span in the text gives the line and column; each override gets a span past the
/// text's end, which names its variable.
///
/// Why not figment: its errors name the key and the provider (file or variable) but
/// not the line and column, since its TOML provider keeps no spans; and the parts that
/// are ours anyway (librdkafka's dotted names from `FETCH_MIN_BYTES`, `NAME.file` and
/// `NAME.env` secrets, messages that list what is allowed) would stay beside it.
fn layered<T: serde::de::DeserializeOwned>(
    text: &str,
    origin: &str,
    env: impl IntoIterator<Item = (String, String)>,
) -> Result<T, ConfigError> {
    let env: Vec<(String, String)> = env.into_iter().collect();
    let overrides = env_overrides(&env)?;
    let mut doc = DeTable::parse(text)
        .map_err(|e| ConfigError::Parse { path: PathBuf::from(origin), message: e.to_string().trim().to_string() })?;
    for (i, o) in overrides.iter().enumerate() {
        let span = text.len() + 1 + i..text.len() + 2 + i;
        let value = match DeValue::parse(o.raw) {
            Ok(v) => respan(v, &span),
            Err(_) => Spanned::new(span.clone(), DeValue::String(Cow::Borrowed(o.raw))),
        };
        if !insert(doc.get_mut(), &o.path, value, &span) {
            return Err(ConfigError::Invalid {
                origin: format!("environment variable {}", o.var),
                key: o.path.join("."),
                message: format!("cannot be set: [{}] is not a table in the file", o.path[0]),
            });
        }
    }
    resolve_secret_files(doc.get_mut(), &Ctx(origin), &env)?;
    let snapshot = doc.clone();
    T::deserialize(toml::de::Deserializer::from(doc)).map_err(|e| shape_error(&e, text, origin, &snapshot, &overrides))
}

/// `KDEDUP_SECTION__KEY=value` (and `KDEDUP_KAFKA__CONSUMER__FETCH_MIN_BYTES` for raw
/// librdkafka properties, underscores becoming dots). Values are read as TOML when they
/// parse as a TOML value (numbers, booleans, arrays), else as strings.
fn env_overrides(env: &[(String, String)]) -> Result<Vec<Override<'_>>, ConfigError> {
    let mut out = Vec::new();
    for (var, raw) in env {
        let Some(rest) = var.strip_prefix(ENV_PREFIX) else { continue };
        let parts: Vec<String> = rest.split("__").map(str::to_ascii_lowercase).collect();
        let path = match parts.as_slice() {
            [_, _] => parts,
            [kafka, sub, prop] if kafka == "kafka" && matches!(sub.as_str(), "client" | "consumer" | "producer") => {
                vec![kafka.clone(), sub.clone(), prop.replace('_', ".")]
            }
            // KDEDUP_SINK__HTTP__URL sets [sink.http] url.
            [sink, http, _] if sink == "sink" && http == "http" => parts,
            // KDEDUP_LOG and friends are run-time flags, not config keys.
            [_] => continue,
            _ => {
                return Err(ConfigError::Invalid {
                    origin: format!("environment variable {var}"),
                    key: rest.to_string(),
                    message: "must look like KDEDUP_<SECTION>__<KEY>".into(),
                })
            }
        };
        out.push(Override { var, path, raw });
    }
    Ok(out)
}

/// `value` and everything in it, spanned at `span`.
fn respan<'i>(value: Spanned<DeValue<'i>>, span: &Range<usize>) -> Spanned<DeValue<'i>> {
    let value = match value.into_inner() {
        DeValue::Array(items) => DeValue::Array(items.into_iter().map(|v| respan(v, span)).collect()),
        DeValue::Table(t) => DeValue::Table(
            t.into_iter().map(|(k, v)| (Spanned::new(span.clone(), k.into_inner()), respan(v, span))).collect(),
        ),
        other => other,
    };
    Spanned::new(span.clone(), value)
}

/// Sets `path` in `table`, making the tables on the way; false if one is not a table.
fn insert<'i>(table: &mut DeTable<'i>, path: &[String], value: Spanned<DeValue<'i>>, span: &Range<usize>) -> bool {
    let Some((last, parents)) = path.split_last() else { return false };
    let mut node = table;
    for segment in parents {
        if !node.contains_key(segment.as_str()) {
            let key = Spanned::new(span.clone(), Cow::Owned(segment.clone()));
            node.insert(key, Spanned::new(span.clone(), DeValue::Table(DeTable::new())));
        }
        node = match node.get_mut(segment.as_str()).map(Spanned::get_mut) {
            Some(DeValue::Table(t)) => t,
            _ => return false,
        };
    }
    node.remove(last.as_str());
    node.insert(Spanned::new(span.clone(), Cow::Owned(last.clone())), value);
    true
}

fn table_mut<'a, 'i>(mut table: &'a mut DeTable<'i>, path: &[&str]) -> Option<&'a mut DeTable<'i>> {
    for segment in path {
        table = match table.get_mut(*segment).map(Spanned::get_mut) {
            Some(DeValue::Table(t)) => t,
            _ => return None,
        };
    }
    Some(table)
}

/// The dotted key whose key or value sits at `span` (the deepest), if any.
fn locate(table: &DeTable<'_>, span: &Range<usize>, prefix: &str) -> Option<String> {
    for (k, v) in table.iter() {
        let path = if prefix.is_empty() { k.get_ref().to_string() } else { format!("{prefix}.{}", k.get_ref()) };
        if let DeValue::Table(t) = v.get_ref() {
            if let Some(found) = locate(t, span, &path) {
                return Some(found);
            }
        }
        let within = |s: Range<usize>| s.start <= span.start && span.end <= s.end;
        if k.span() == *span || within(v.span()) {
            return Some(path);
        }
    }
    None
}

/// What each required section needs, for the error that says it is missing.
fn needs(section: &str) -> &'static str {
    match section {
        "kafka" => "brokers = \"host:9092\", group_id = \"…\" and topics = [\"…\"]",
        "sink" => "kind = \"kafka\" (and topic = \"…\"), \"stdout\", \"http\" (and [sink.http] url) or \"custom\"",
        "dead_letter" => "topic = \"…\": where records that cannot be handled go, never silently dropped",
        "serve" => "listen = \"host:port\" and upstream = \"http://host:port\"",
        _ => "it",
    }
}

/// A serde error from the layered document, said as the person who wrote it needs it:
/// where (file line and column, or the environment variable), which key, what is allowed.
fn shape_error(
    e: &toml::de::Error,
    text: &str,
    origin: &str,
    doc: &Spanned<DeTable<'_>>,
    overrides: &[Override<'_>],
) -> ConfigError {
    let span = e.span().unwrap_or(0..0);
    let from_env = span.start.checked_sub(text.len() + 1).and_then(|i| overrides.get(i));
    let before = text.get(..span.start).unwrap_or(text);
    let line = before.matches('\n').count() + 1;
    let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    let at_line = format!("{origin}:{line}:{column}");
    let message = e.message().trim().replace('`', "\"");
    let named: Vec<&str> = e.message().split('`').skip(1).step_by(2).collect();
    let quoted = |names: &[&str]| names.iter().map(|n| format!("\"{n}\"")).collect::<Vec<_>>().join(", ");
    let key = match from_env {
        Some(o) => Some(o.path.join(".")),
        None if span == doc.span() => Some(String::new()),
        None => locate(doc.get_ref(), &span, ""),
    };
    let key = key.unwrap_or_default();
    let invalid = |origin: String, key: String, message: String| ConfigError::Invalid { origin, key, message };
    if message.starts_with("unknown field") {
        let (name, allowed) = named.split_first().map_or(("", &[][..]), |(n, rest)| (*n, rest));
        let (place, key) = match from_env {
            Some(o) => {
                let end = o.path.iter().position(|p| p == name).map_or(o.path.len(), |i| i + 1);
                (format!("environment variable {}", o.var), o.path[..end].join("."))
            }
            None => (at_line, key),
        };
        let what = key.rsplit_once('.').map_or("a config section".to_string(), |(s, _)| format!("a key of [{s}]"));
        return invalid(place, key, format!("is not {what}; allowed: {}", quoted(allowed)));
    }
    let env_note = from_env.map(|o| format!(" (set by environment variable {})", o.var)).unwrap_or_default();
    let place = if from_env.is_some() { origin.to_string() } else { at_line };
    if message.starts_with("unknown variant") {
        let (value, allowed) = named.split_first().map_or(("", &[][..]), |(n, rest)| (*n, rest));
        return invalid(place, key, format!("is \"{value}\"{env_note}; allowed: {}", quoted(allowed)));
    }
    if message.starts_with("is ") {
        return invalid(place, key, format!("{message}{env_note}"));
    }
    if message.starts_with("missing field") {
        let name = named.first().copied().unwrap_or_default();
        return if key.is_empty() {
            invalid(
                origin.to_string(),
                name.to_string(),
                format!("section is missing: add [{name}] with {}", needs(name)),
            )
        } else {
            invalid(place, format!("{key}.{name}"), format!("is missing from [{key}]; it is required"))
        };
    }
    let key = if key.is_empty() { String::new() } else { format!("`{key}`{env_note}: ") };
    let line = if from_env.is_some() { String::new() } else { format!("line {line}, column {column}: ") };
    ConfigError::Parse { path: PathBuf::from(origin), message: format!("{line}{key}{message}") }
}

// ---------------------------------------------------------------------------
// Validation: bounds, and the rules that tie keys together
// ---------------------------------------------------------------------------

/// Where the values being validated came from, for errors.
struct Ctx<'a>(&'a str);

impl Ctx<'_> {
    fn err(&self, key: &str, message: impl Into<String>) -> ConfigError {
        ConfigError::Invalid { origin: self.0.to_string(), key: key.to_string(), message: message.into() }
    }

    /// `value` if within `min..=max`, else an error naming the key, the value, the range and `why`.
    fn within<T: PartialOrd + Display>(
        &self,
        key: &str,
        value: T,
        min: T,
        max: T,
        why: &str,
    ) -> Result<T, ConfigError> {
        if value >= min && value <= max {
            Ok(value)
        } else {
            Err(self.err(key, format!("is {value}; allowed: {min} to {max}{why}")))
        }
    }

    fn socket(&self, key: &str, text: &str) -> Result<Option<SocketAddr>, ConfigError> {
        if text.is_empty() {
            return Ok(None);
        }
        let e = text.parse::<SocketAddr>().map_err(|e| {
            self.err(key, format!("is \"{text}\": {e}; write host:port, e.g. 127.0.0.1:9464, or \"\" to disable"))
        })?;
        Ok(Some(e))
    }
}

fn non_zero(n: usize) -> NonZeroUsize {
    NonZeroUsize::new(n).expect("checked to be at least 1 above")
}

fn validate(file: FileConfig, ctx: &Ctx<'_>) -> Result<Config, ConfigError> {
    let kafka = validate_kafka(file.kafka, ctx)?;
    let key = validate_key(file.key, &kafka.group_id, ctx)?;
    let (store, retention) = validate_store(&file.store, ctx)?;
    let filter = validate_filter(file.filter, ctx)?;
    let topics = &kafka.topics;
    let s = file.sink;
    let sink = match s.kind {
        SinkKind::Kafka if s.topic.is_empty() => {
            return Err(ctx.err("sink.topic", "must name the output topic when sink.kind = \"kafka\""))
        }
        SinkKind::Kafka if topics.contains(&s.topic) => {
            return Err(ctx.err("sink.topic", "must differ from the input topics (it would loop)"))
        }
        SinkKind::Kafka => SinkConfig::Kafka { topic: s.topic, partitioning: s.partitioning },
        SinkKind::Stdout => SinkConfig::Stdout,
        SinkKind::Http => match &s.http {
            Some(h) => SinkConfig::Http(Box::new(validate_http(h, topics, ctx)?)),
            None => return Err(ctx.err("sink.http", "must be given ([sink.http] url = …) when sink.kind = \"http\"")),
        },
        SinkKind::Custom => SinkConfig::Custom,
    };
    if s.http.is_some() && !matches!(sink, SinkConfig::Http(_)) {
        return Err(ctx.err("sink.http", "is set but sink.kind is not \"http\""));
    }
    let dead_letter_topic = file.dead_letter.topic;
    if dead_letter_topic.is_empty() {
        let why = "must name a topic: records that cannot be handled go there, never silently dropped";
        return Err(ctx.err("dead_letter.topic", why));
    }
    if topics.contains(&dead_letter_topic) {
        return Err(ctx.err("dead_letter.topic", "must differ from the input topics"));
    }
    let p = file.pipeline;
    if p.mode == Mode::Observe && matches!(sink, SinkConfig::Http(_)) {
        // Observe mode forwards duplicates too: with an HTTP sink that is a request per duplicate.
        return Err(ctx.err(
            "pipeline.mode",
            "is \"observe\", which forwards every record, duplicates included: with sink.kind = \"http\" each \
             would become a request; observe with a Kafka or stdout sink",
        ));
    }
    let pipeline = PipelineConfig {
        batch_max: non_zero(ctx.within("pipeline.batch_max", p.batch_max, 1, MAX_BATCH, "")?),
        commit_interval: Duration::from_millis(ctx.within(
            "pipeline.commit_interval_ms",
            p.commit_interval_ms,
            1,
            MAX_COMMIT_INTERVAL_MS,
            " (a day)",
        )?),
        drain_timeout: Duration::from_millis(ctx.within(
            "pipeline.drain_timeout_ms",
            p.drain_timeout_ms,
            0,
            MAX_DRAIN_TIMEOUT_MS,
            " (an hour)",
        )?),
        on_conflict: p.on_conflict,
        mode: p.mode,
    };
    Ok(Config {
        kafka,
        key,
        store,
        retention,
        filter,
        sink,
        dead_letter_topic,
        duplicates_topic: Some(file.duplicates.topic).filter(|t| !t.is_empty()),
        metrics_listen: ctx.socket("metrics.listen", &file.metrics.listen)?,
        pipeline,
        file: None,
    })
}

/// `[kafka]`: the raw librdkafka properties as strings, and the settings kdedup cannot run with.
fn validate_kafka(k: KafkaSection, ctx: &Ctx<'_>) -> Result<KafkaConfig, ConfigError> {
    if k.brokers.trim().is_empty() {
        return Err(ctx.err("kafka.brokers", "must list at least one host:port"));
    }
    if k.group_id.trim().is_empty() {
        return Err(ctx.err("kafka.group_id", "must not be empty"));
    }
    if k.topics.is_empty() {
        return Err(ctx.err("kafka.topics", "must name at least one input topic"));
    }
    let props = |section: &str, map: BTreeMap<String, toml::Value>| {
        map.into_iter()
            .map(|(key, v)| match scalar_to_string(&v) {
                Some(s) => Ok((key, s)),
                None => Err(ctx.err(&format!("kafka.{section}.{key}"), "must be a string, number or boolean")),
            })
            .collect::<Result<BTreeMap<_, _>, _>>()
    };
    let prefetch_mib = ctx.within(
        "kafka.prefetch_mib",
        k.prefetch_mib,
        1,
        MAX_PREFETCH_MIB,
        " (MiB the consumer may prefetch, all partitions together)",
    )?;
    let c = KafkaConfig {
        prefetch_bytes: prefetch_mib << 20,
        client: props("client", k.client)?,
        consumer: props("consumer", k.consumer)?,
        producer: props("producer", k.producer)?,
        brokers: k.brokers,
        group_id: k.group_id,
        topics: k.topics,
    };
    let sections = [("client", &c.client), ("consumer", &c.consumer)];
    // Both sections reach the group consumer (and `[kafka.client]` every reader):
    // auto-commit in any spelling librdkafka reads as true would commit offsets
    // ahead of finished work. `auto.commit.enable` is librdkafka's legacy alias.
    for key in ["enable.auto.commit", "enable.auto.offset.store", "auto.commit.enable"] {
        for (section, map) in sections {
            let Some(value) = map.get(key) else { continue };
            let why = match librdkafka_bool(value) {
                Some(false) => continue,
                Some(true) => {
                    "which librdkafka reads as true; it must be false (or absent): kdedup commits \
                               offsets itself, only behind finished work"
                }
                None => {
                    "not a boolean librdkafka reads; allowed: false, f or 0 (any case); kdedup commits \
                         offsets itself"
                }
            };
            return Err(ctx.err(&format!("kafka.{section}.{key}"), format!("is {value:?}, {why}")));
        }
    }
    for (section, map) in sections {
        if map.get("isolation.level").is_some_and(|v| v.eq_ignore_ascii_case("read_uncommitted")) {
            return Err(ctx.err(
                &format!("kafka.{section}.isolation.level"),
                "cannot be read_uncommitted: records of aborted transactions would be processed",
            ));
        }
    }
    // Under the KIP-848 protocol the broker owns these; librdkafka would refuse them only at start.
    let protocol = c.consumer.get("group.protocol").or(c.client.get("group.protocol"));
    if protocol.is_some_and(|p| p.eq_ignore_ascii_case("consumer")) {
        for key in ["partition.assignment.strategy", "session.timeout.ms", "heartbeat.interval.ms"] {
            if let Some((section, _)) = sections.iter().find(|(_, map)| map.contains_key(key)) {
                return Err(ctx.err(
                    &format!("kafka.{section}.{key}"),
                    "cannot be set with group.protocol = \"consumer\" (KIP-848): the broker owns it \
                     (group.consumer.* broker settings; choose the assignor with group.remote.assignor)",
                ));
            }
        }
    }
    // kdedup creates no topics (kafka_client.rs sets this false on every client): a mistyped
    // topic must fail at start, not be created and receive the stream.
    for (section, map) in [("client", &c.client), ("consumer", &c.consumer), ("producer", &c.producer)] {
        if let Some(value) = map.get("allow.auto.create.topics").filter(|v| librdkafka_bool(v) != Some(false)) {
            return Err(ctx.err(
                &format!("kafka.{section}.allow.auto.create.topics"),
                format!("is {value:?}; it must be false (or absent): kdedup creates no topics, so a mistyped topic fails at start instead of receiving the stream"),
            ));
        }
    }
    Ok(c)
}

/// `[key]`; the scope defaults to the group ID, whose length is then bounded too.
fn validate_key(k: KeySection, group_id: &str, ctx: &Ctx<'_>) -> Result<KeyConfig, ConfigError> {
    let source = match k.source {
        KeyKind::Header if k.header.is_empty() => {
            return Err(ctx.err("key.header", "must name a header when key.source = \"header\""))
        }
        KeyKind::Header => KeySource::Header(k.header),
        KeyKind::Key => KeySource::RecordKey,
        KeyKind::Json => {
            check_pointer(&k.json_pointer).map_err(|m| ctx.err("key.json_pointer", m))?;
            KeySource::Json(k.json_pointer)
        }
        KeyKind::PayloadHash => KeySource::PayloadHash,
    };
    for pointer in &k.fingerprint_fields {
        check_pointer(pointer).map_err(|m| ctx.err("key.fingerprint_fields", m))?;
    }
    let max_bytes = ctx.within(
        "key.max_bytes",
        k.max_bytes,
        1,
        MAX_ID_BYTES,
        " (the stores' keys are bounded; longer IDs are hashed with key.on_oversize = \"hash\")",
    )?;
    let (scope, from) =
        if k.scope.is_empty() { (group_id.to_string(), "kafka.group_id") } else { (k.scope, "key.scope") };
    if scope.len() > MAX_SCOPE_BYTES {
        return Err(ctx.err(
            from,
            format!(
                "is {} bytes; the dedup scope (key.scope, by default kafka.group_id) may hold at most \
                 {MAX_SCOPE_BYTES}: set a shorter key.scope",
                scope.len()
            ),
        ));
    }
    Ok(KeyConfig {
        source,
        scope,
        max_bytes: non_zero(max_bytes),
        on_oversize: k.on_oversize,
        fingerprint_fields: k.fingerprint_fields,
    })
}

/// `[filter]`: the planned table must fit, and the caches are bounded.
fn validate_filter(f: FilterConfig, ctx: &Ctx<'_>) -> Result<FilterConfig, ConfigError> {
    if !(f.false_positive_rate > 0.0 && f.false_positive_rate < 0.5) {
        return Err(ctx.err("filter.false_positive_rate", "must be between 0 and 0.5 (e.g. 0.001)"));
    }
    let planned = filter_plan::planned_bytes(f.expected_keys.get(), f.false_positive_rate);
    if planned.is_none_or(|bytes| bytes as u64 > MAX_FILTER_BYTES) {
        let planned = planned.map_or("more than this machine can address".to_string(), |b| format!("{b} bytes"));
        return Err(ctx.err(
            "filter.expected_keys",
            format!(
                "is {} at filter.false_positive_rate {}: the filter would take {planned}, over the \
                 {MAX_FILTER_BYTES}-byte (64 GiB) limit; about 2.5 bytes per key at rates of 0.001 and above",
                f.expected_keys, f.false_positive_rate
            ),
        ));
    }
    if f.recent_keys > MAX_RECENT_KEYS {
        let why = format!("is {}; allowed: 0 (no cache) to {MAX_RECENT_KEYS} (about 80 bytes per key)", f.recent_keys);
        return Err(ctx.err("filter.recent_keys", why));
    }
    if f.expired_keys > MAX_EXPIRED_KEYS {
        return Err(ctx.err(
            "filter.expired_keys",
            format!(
                "is {}; allowed: 0 (no expired-key estimate) to {MAX_EXPIRED_KEYS} (about 34 bytes per key)",
                f.expired_keys
            ),
        ));
    }
    Ok(f)
}

/// `[store]` into the backend and its retention; shared by `kdedup run` and `kdedup serve` files.
fn validate_store(s: &StoreSection, ctx: &Ctx<'_>) -> Result<(StoreConfig, Retention), ConfigError> {
    let store = match s.kind {
        StoreKind::Embedded => StoreConfig::Embedded { path: s.path.clone() },
        StoreKind::Postgres => {
            if !(s.url.starts_with("postgres://") || s.url.starts_with("postgresql://")) {
                return Err(ctx.err(
                    "store.url",
                    "must be a PostgreSQL URL (postgres://user@host:port/db) when store.kind = \"postgres\"; \
                     set it from the environment (KDEDUP_STORE__URL) when it holds a password",
                ));
            }
            let pool_size = ctx.within("store.pool_size", s.pool_size, 1, MAX_POOL_SIZE, "")?;
            StoreConfig::Postgres { url: s.url.clone().into(), pool_size, tls: validate_postgres_tls(s, ctx)? }
        }
        StoreKind::Scylla => StoreConfig::Scylla(Box::new(validate_scylla(s, ctx)?)),
    };
    let why = " (20 years; ScyllaDB refuses longer TTLs on every write)";
    let ttl = ctx.within("store.ttl_secs", s.ttl_secs, 1, MAX_TTL_SECS, why)?;
    if s.lease_secs == 0 || s.lease_secs >= ttl || s.lease_secs > MAX_LEASE_SECS {
        return Err(ctx.err(
            "store.lease_secs",
            format!(
                "is {}; allowed: 1 to {MAX_LEASE_SECS} (an hour) and below store.ttl_secs ({ttl}); a crashed owner's \
                 claims wait this long before they are taken over",
                s.lease_secs
            ),
        ));
    }
    let sweep =
        ctx.within("store.sweep_interval_secs", s.sweep_interval_secs, 1, MAX_SWEEP_INTERVAL_SECS, " (a day)")?;
    let retention = Retention {
        ttl: Duration::from_secs(ttl),
        lease: Duration::from_secs(s.lease_secs),
        sweep_interval: Duration::from_secs(sweep),
    };
    Ok((store, retention))
}

// ---------------------------------------------------------------------------
// Secrets: files instead of values, and redaction
// ---------------------------------------------------------------------------

/// librdkafka properties whose values are secrets: never printed, logged or put in errors.
pub fn is_secret_property(name: &str) -> bool {
    name.contains("password")
        || name.contains("secret")
        || matches!(name, "ssl.key.pem" | "ssl_key" | "sasl.oauthbearer.config" | "ssl.keystore.location.pem")
}

/// `props` with every secret value replaced by `<redacted>`, for display.
pub fn redacted(props: &BTreeMap<String, String>) -> BTreeMap<String, String> {
    props
        .iter()
        .map(|(k, v)| (k.clone(), if is_secret_property(k) { "<redacted>".to_string() } else { v.clone() }))
        .collect()
}

/// Replaces secrets given as files by their contents (trailing newline trimmed), after the
/// environment overrides so a file can be named from there too:
/// `[kafka.client|consumer|producer] PROP.file = "/run/secrets/…"` sets PROP (e.g.
/// `sasl.password.file`, `ssl.key.password.file`), `[store] url_file` sets `url`,
/// `[store] password_file` sets `password`, `[sink.http.headers] NAME.file` sets the
/// header NAME, and `NAME.env = "VAR"` sets it from the environment variable VAR.
/// Errors name the key and the file or variable, never the content.
fn resolve_secret_files(doc: &mut DeTable<'_>, ctx: &Ctx<'_>, env: &[(String, String)]) -> Result<(), ConfigError> {
    let mut moves: Vec<(Vec<&str>, String, String)> = Vec::new();
    let mut find = |path: Vec<&'static str>, strip: &dyn Fn(&str) -> Option<String>| {
        if let Some(t) = table_mut(doc, &path) {
            for k in t.keys() {
                if let Some(key) = strip(k.get_ref()) {
                    moves.push((path.clone(), k.get_ref().to_string(), key));
                }
            }
        }
    };
    for section in ["client", "consumer", "producer"] {
        find(vec!["kafka", section], &|k| k.strip_suffix(".file").map(String::from));
    }
    find(vec!["sink", "http", "headers"], &|k| {
        k.strip_suffix(".file").or_else(|| k.strip_suffix(".env")).map(String::from)
    });
    find(vec!["store"], &|k| k.strip_suffix("_file").filter(|k| matches!(*k, "url" | "password")).map(String::from));
    for (path, file_key, key) in moves {
        let node = table_mut(doc, &path).expect("found above");
        let dotted = format!("{}.{file_key}", path.join("."));
        if node.contains_key(key.as_str()) {
            return Err(ctx.err(&dotted, format!("and `{key}` are both set; give the secret one way only")));
        }
        let (k, v) = node.remove_entry(file_key.as_str()).expect("found above");
        let span = v.span();
        let value = if file_key.ends_with(".env") {
            let var = v.get_ref().as_str().ok_or_else(|| ctx.err(&dotted, "must name an environment variable"))?;
            let value = env.iter().rev().find(|(k, _)| k == var).map(|(_, v)| v.clone());
            value.ok_or_else(|| ctx.err(&dotted, format!("names the environment variable {var}, which is not set")))?
        } else {
            let path = v
                .get_ref()
                .as_str()
                .ok_or_else(|| ctx.err(&dotted, "must be the path of a file holding the secret"))?;
            let text =
                std::fs::read_to_string(path).map_err(|e| ctx.err(&dotted, format!("cannot read {path}: {e}")))?;
            let trimmed = text.strip_suffix('\n').map(|t| t.strip_suffix('\r').unwrap_or(t));
            trimmed.unwrap_or(&text).to_string()
        };
        node.insert(Spanned::new(k.span(), Cow::Owned(key)), Spanned::new(span, DeValue::String(Cow::Owned(value))));
    }
    Ok(())
}

/// `[sink.http]`; errors name the key.
fn validate_http(h: &HttpSection, inputs: &[String], ctx: &Ctx<'_>) -> Result<HttpSinkConfig, ConfigError> {
    let err = |key: &str, message: String| ctx.err(&format!("sink.http.{key}"), message);
    if !(h.url.starts_with("http://") || h.url.starts_with("https://")) {
        return Err(err("url", format!("is \"{}\"; must start with http:// or https://", redact_url(&h.url))));
    }
    let url_template = UrlTemplate::parse(&h.url).map_err(|m| err("url", m))?;
    let method = h.method.to_ascii_uppercase();
    if method.is_empty() || !method.bytes().all(|b| b.is_ascii_alphabetic()) {
        return Err(err("method", format!("is \"{}\"; write an HTTP method such as POST or PUT", h.method)));
    }
    let is_token =
        |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b));
    if !is_token(&h.idempotency_header) {
        return Err(err("idempotency_header", format!("\"{}\" is not a header name", h.idempotency_header)));
    }
    let mut headers = Vec::new();
    for (name, value) in &h.headers {
        if !is_token(name) {
            return Err(err("headers", format!("\"{name}\" is not a header name")));
        }
        if name.eq_ignore_ascii_case(&h.idempotency_header) {
            return Err(err("headers", format!("\"{name}\" is the idempotency header kdedup sets itself")));
        }
        // The value is never repeated in the message: it may be a credential.
        if value.bytes().any(|b| b.is_ascii_control() && b != b'\t') {
            return Err(err("headers", format!("the value of \"{name}\" holds control characters (a stray newline?)")));
        }
        headers.push((name.clone(), Secret(value.clone())));
    }
    let content_type = h.content_type.clone().unwrap_or_else(|| "application/octet-stream".into());
    if content_type.is_empty() || content_type.bytes().any(|b| b.is_ascii_control()) {
        return Err(err("content_type", format!("\"{content_type}\" is not a media type")));
    }
    let ms = |key: &str, v: u64, min: u64| {
        ctx.within(&format!("sink.http.{key}"), v, min, MAX_HTTP_MS, " (a day)").map(Duration::from_millis)
    };
    let max_in_flight = ctx.within("sink.http.max_in_flight", h.max_in_flight, 1, MAX_HTTP_IN_FLIGHT, "")?;
    if h.max_request_bytes == 0 {
        return Err(err("max_request_bytes", "must be at least 1".into()));
    }
    let (mut outcomes_by_code, mut outcomes_by_class) = (BTreeMap::new(), BTreeMap::new());
    for (status, &outcome) in &h.outcomes {
        let bad =
            || err("outcomes", format!("\"{status}\" is not a status (\"409\") or a class (\"4xx\") from 100 to 599"));
        match status.as_bytes() {
            [c @ b'1'..=b'5', b'x' | b'X', b'x' | b'X'] => {
                outcomes_by_class.insert(u16::from(c - b'0'), outcome);
            }
            _ => {
                let code = status.parse::<u16>().ok().filter(|c| (100..=599).contains(c)).ok_or_else(bad)?;
                outcomes_by_code.insert(code, outcome);
            }
        }
    }
    let results_topic = Some(h.results_topic.clone()).filter(|t| !t.is_empty());
    if results_topic.as_ref().is_some_and(|t| inputs.contains(t)) {
        return Err(err("results_topic", "must differ from the input topics (it would loop)".into()));
    }
    Ok(HttpSinkConfig {
        url: Secret(h.url.clone()),
        url_template,
        method,
        idempotency_header: h.idempotency_header.clone(),
        content_type,
        headers,
        timeout: ms("timeout_ms", h.timeout_ms, 1)?,
        max_in_flight: non_zero(max_in_flight),
        retry_budget: ms("retry_budget_ms", h.retry_budget_ms, 0)?,
        backoff_initial: ms("backoff_initial_ms", h.backoff_initial_ms, 1)?,
        backoff_max: ms("backoff_max_ms", h.backoff_max_ms, h.backoff_initial_ms)?,
        max_request_bytes: h.max_request_bytes,
        outcomes_by_code,
        outcomes_by_class,
        results_topic,
    })
}

/// The `[store]` keys of kind = "scylla"; errors name the key.
fn validate_scylla(s: &StoreSection, ctx: &Ctx<'_>) -> Result<ScyllaConfig, ConfigError> {
    validate_contact_points(&s.contact_points, ctx)?;
    let dc = &s.local_datacenter;
    if dc.trim().is_empty() {
        return Err(ctx.err(
            "store.local_datacenter",
            "must name the ScyllaDB datacenter this process talks to (the `Datacenter:` line of `nodetool status`, \
             e.g. \"datacenter1\") when store.kind = \"scylla\"",
        ));
    }
    if !is_cql_identifier(&s.keyspace) {
        let why = "allowed: a lowercase letter, then up to 47 lowercase letters, digits or '_'";
        return Err(ctx.err("store.keyspace", format!("is \"{}\"; {why}", s.keyspace)));
    }
    let replication = scylla_replication(&s.replication, dc, ctx)?;
    let tls = scylla_tls(s, ctx)?;
    let credentials = scylla_credentials(s, ctx)?;
    let timeout =
        |key: &str, ms: u64| ctx.within(key, ms, 1, MAX_STORE_TIMEOUT_MS, " (ten minutes)").map(Duration::from_millis);
    Ok(ScyllaConfig {
        contact_points: s.contact_points.clone(),
        local_datacenter: dc.clone(),
        keyspace: s.keyspace.clone(),
        replication,
        consistency: s.consistency,
        serial_consistency: s.serial_consistency,
        request_timeout: timeout("store.request_timeout_ms", s.request_timeout_ms)?,
        connect_timeout: timeout("store.connect_timeout_ms", s.connect_timeout_ms)?,
        max_in_flight: non_zero(ctx.within("store.max_in_flight", s.max_in_flight, 1, MAX_IN_FLIGHT, "")?),
        tls,
        credentials,
    })
}

/// `store.contact_points`: at least one, each host:port.
fn validate_contact_points(contact_points: &[String], ctx: &Ctx<'_>) -> Result<(), ConfigError> {
    if contact_points.is_empty() {
        return Err(ctx.err(
            "store.contact_points",
            "must list at least one node as host:port, e.g. [\"10.0.0.5:9042\"], when store.kind = \"scylla\"",
        ));
    }
    for point in contact_points {
        let port = point.rsplit_once(':').map(|(_, p)| p);
        if !port.is_some_and(|p| p.parse::<u16>().is_ok_and(|p| p > 0)) {
            let why = format!("\"{point}\" is not host:port; write e.g. \"10.0.0.5:9042\" (the CQL port)");
            return Err(ctx.err("store.contact_points", why));
        }
    }
    Ok(())
}

/// `store.replication`: a factor of at least 1 per datacenter (3 in the local one when
/// empty), which must include the local datacenter `dc`.
fn scylla_replication(
    given: &BTreeMap<String, toml::Value>,
    dc: &str,
    ctx: &Ctx<'_>,
) -> Result<BTreeMap<String, NonZeroU32>, ConfigError> {
    let mut replication = BTreeMap::new();
    for (name, rf) in given {
        if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.')) {
            let why = format!("datacenter name \"{name}\" may hold only letters, digits, '_', '-', '.'");
            return Err(ctx.err("store.replication", why));
        }
        let why = format!("{name} = {rf}: the replication factor must be a whole number of at least 1");
        let rf = rf.as_integer().and_then(|n| u32::try_from(n).ok()).and_then(NonZeroU32::new);
        replication.insert(name.clone(), rf.ok_or_else(|| ctx.err("store.replication", why))?);
    }
    if replication.is_empty() {
        replication.insert(dc.to_string(), NonZeroU32::new(3).expect("3 is not zero"));
    }
    if !replication.contains_key(dc) {
        let why =
            format!("has no replicas in store.local_datacenter \"{dc}\": LOCAL_QUORUM there could never be reached");
        return Err(ctx.err("store.replication", why));
    }
    Ok(replication)
}

/// `store.tls` and `store.tls_ca_file` of ScyllaDB, which always verifies.
fn scylla_tls(s: &StoreSection, ctx: &Ctx<'_>) -> Result<Option<ScyllaTls>, ConfigError> {
    Ok(match (s.tls, &s.tls_ca_file) {
        (Some(TlsMode::VerifyFull), ca) => Some(ScyllaTls { ca_file: ca.clone() }),
        (Some(TlsMode::Require), _) => {
            return Err(
                ctx.err("store.tls", "is \"require\"; ScyllaDB's TLS always verifies the certificate: set tls = true")
            )
        }
        (None | Some(TlsMode::Disable), None) => None,
        (None | Some(TlsMode::Disable), Some(_)) => {
            return Err(ctx.err("store.tls_ca_file", "is set but store.tls is false; set tls = true to use it"))
        }
    })
}

/// `store.username` and `store.password`: both or neither.
fn scylla_credentials(s: &StoreSection, ctx: &Ctx<'_>) -> Result<Option<(String, Secret)>, ConfigError> {
    Ok(match (s.username.is_empty(), s.password.is_empty()) {
        (true, true) => None,
        (false, false) => Some((s.username.clone(), Secret(s.password.clone()))),
        (true, false) => {
            return Err(ctx.err("store.username", "must be set when store.password is (KDEDUP_STORE__USERNAME)"))
        }
        (false, true) => {
            return Err(ctx.err(
                "store.password",
                "must be set when store.username is; set it from the environment (KDEDUP_STORE__PASSWORD)",
            ))
        }
    })
}

/// The `[store]` TLS keys of kind = "postgres", against the URL's own `sslmode`
/// (tokio-postgres knows disable, prefer and require; it cannot verify, so
/// `verify-full` lives in `[store] tls`). The CA file is read and parsed here,
/// so a bad one fails at load, not at the first connection.
fn validate_postgres_tls(s: &StoreSection, ctx: &Ctx<'_>) -> Result<PostgresTls, ConfigError> {
    use tokio_postgres::config::SslMode;
    let parsed = s.url.parse::<tokio_postgres::Config>().map_err(|e| {
        let hint = if s.url.contains("sslmode=verify") {
            "; tokio-postgres' sslmode allows only disable, prefer, require: for certificate verification remove \
             sslmode from the URL and set [store] tls = \"verify-full\" (and tls_ca_file)"
        } else {
            ""
        };
        // The error names the option, never its value: the URL may hold a password.
        ctx.err("store.url", format!("is not a URL tokio-postgres accepts: {e}{hint}"))
    })?;
    let url_mode = s.url.contains("sslmode=").then(|| match parsed.get_ssl_mode() {
        SslMode::Disable => "disable",
        SslMode::Require => "require",
        _ => "prefer",
    });
    let tls = match (s.tls, url_mode) {
        (None, Some("disable")) => PostgresTls::Disable,
        (None, Some("require")) => PostgresTls::Require,
        (None, _) => PostgresTls::Prefer,
        (Some(TlsMode::Disable), None | Some("disable")) => PostgresTls::Disable,
        (Some(TlsMode::Require), None | Some("require")) => PostgresTls::Require,
        (Some(TlsMode::VerifyFull), None) => PostgresTls::VerifyFull { ca_file: s.tls_ca_file.clone() },
        (Some(mode), Some(url)) => {
            let mode = match mode {
                TlsMode::Disable => "disable",
                TlsMode::Require => "require",
                TlsMode::VerifyFull => "verify-full",
            };
            let why = format!(
                "is \"{mode}\" but store.url says sslmode={url}; say it once: remove sslmode from the URL (or the tls key)"
            );
            return Err(ctx.err("store.tls", why));
        }
    };
    match (&tls, &s.tls_ca_file) {
        (PostgresTls::VerifyFull { .. }, Some(path)) => {
            let shown = path.display();
            let pem =
                std::fs::read(path).map_err(|e| ctx.err("store.tls_ca_file", format!("cannot read {shown}: {e}")))?;
            match openssl::x509::X509::stack_from_pem(&pem) {
                Ok(certs) if !certs.is_empty() => {}
                Ok(_) => return Err(ctx.err("store.tls_ca_file", format!("{shown} holds no PEM certificate"))),
                Err(e) => return Err(ctx.err("store.tls_ca_file", format!("{shown} is not a PEM certificate: {e}"))),
            }
        }
        (PostgresTls::VerifyFull { .. }, None) | (_, None) => {}
        (_, Some(_)) => {
            return Err(ctx.err(
                "store.tls_ca_file",
                "is set but store.tls is not \"verify-full\": only verify-full checks the certificate; set \
                 tls = \"verify-full\"",
            ))
        }
    }
    Ok(tls)
}

/// An unquoted CQL name that means itself (CQL folds unquoted names to lowercase).
fn is_cql_identifier(name: &str) -> bool {
    let mut chars = name.chars();
    chars.next().is_some_and(|c| c.is_ascii_lowercase())
        && name.len() <= 48
        && chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
}

fn check_pointer(pointer: &str) -> Result<(), String> {
    if pointer.is_empty() || pointer.starts_with('/') {
        Ok(())
    } else {
        Err(format!("\"{pointer}\" is not a JSON pointer (RFC 6901): it must start with '/', e.g. \"/payment/id\""))
    }
}

// ---------------------------------------------------------------------------
// `kdedup serve`: a file of its own ([serve], [store], [metrics]; no Kafka)
// ---------------------------------------------------------------------------

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ServeFile {
    serve: ServeSection,
    #[serde(default)]
    store: StoreSection,
    #[serde(default)]
    metrics: MetricsSection,
}

#[derive(Deserialize)]
#[serde(default, deny_unknown_fields)]
struct ServeSection {
    #[serde(deserialize_with = "lenient_string")]
    listen: String,
    #[serde(deserialize_with = "lenient_string")]
    upstream: String,
    #[serde(deserialize_with = "lenient_string")]
    scope: String,
    #[serde(deserialize_with = "string_list")]
    methods: Vec<String>,
    #[serde(deserialize_with = "lenient_string")]
    key_header: String,
    #[serde(deserialize_with = "lenient_string")]
    client_header: String,
    #[serde(deserialize_with = "string_list")]
    fingerprint_headers: Vec<String>,
    #[serde(deserialize_with = "string_list")]
    recorded_headers: Vec<String>,
    missing_key: MissingKey,
    max_key_bytes: usize,
    max_header_bytes: usize,
    max_body_bytes: usize,
    max_response_bytes: usize,
    record_body_bytes: usize,
    wait_ms: u64,
    upstream_timeout_ms: u64,
    client_timeout_ms: u64,
    on_5xx: On5xx,
    drain_timeout_ms: u64,
}

impl Default for ServeSection {
    fn default() -> Self {
        ServeSection {
            listen: String::new(),
            upstream: String::new(),
            scope: "serve".into(),
            methods: vec!["POST".into(), "PATCH".into()],
            key_header: "Idempotency-Key".into(),
            client_header: String::new(),
            fingerprint_headers: Vec::new(),
            recorded_headers: vec!["Location".into()],
            missing_key: MissingKey::Pass,
            max_key_bytes: 255,
            max_header_bytes: 16_384,
            max_body_bytes: 1 << 20,
            max_response_bytes: 8 << 20,
            record_body_bytes: 64 << 10,
            wait_ms: 5_000,
            upstream_timeout_ms: 30_000,
            client_timeout_ms: 10_000,
            on_5xx: On5xx::Record,
            drain_timeout_ms: 10_000,
        }
    }
}

/// `serve.missing_key`: a request on a configured method without the key header.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum MissingKey {
    /// Forward it as a plain proxy would (counted as `passed_through`).
    Pass,
    /// Answer 400 problem+json; the upstream is not called.
    Refuse,
}

/// `serve.on_5xx`: what an answered 5xx does to its key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum On5xx {
    /// Kept like any answer and replayed to retries (Stripe's rule; the default):
    /// a 5xx from the upstream does not say its effect did not run, so running
    /// the request again on retry could do it twice.
    Record,
    /// The claim is released, so a retry runs the request again: for upstreams
    /// whose 5xx are known to mean "nothing happened".
    Release,
}

/// A validated `kdedup serve` file: `[serve]`, `[store]`, `[metrics]`.
#[derive(Debug, Clone)]
pub struct ServeConfig {
    /// `serve.listen`: where clients connect.
    pub listen: SocketAddr,
    /// `serve.upstream`: the API's base URL (`http://host:port`), without a trailing slash.
    pub upstream: String,
    /// `serve.scope`: the keys' namespace in the store (default `serve`).
    pub scope: String,
    /// `serve.methods`, upper case (default POST, PATCH).
    pub methods: Vec<String>,
    /// `serve.key_header`, lower case (default `idempotency-key`).
    pub key_header: String,
    /// `serve.client_header`, lower case: keys are scoped per value of it. `None`: one client.
    pub client_header: Option<String>,
    /// `serve.fingerprint_headers`, lower case: headers the fingerprint covers besides
    /// method, path and query, and body.
    pub fingerprint_headers: Vec<String>,
    /// `serve.recorded_headers`, lower case: response headers kept and replayed
    /// (default `location`; `content-type` always is).
    pub recorded_headers: Vec<String>,
    /// `serve.missing_key`.
    pub missing_key: MissingKey,
    /// `serve.max_key_bytes` (default 255): longer keys get 400.
    pub max_key_bytes: usize,
    /// `serve.max_header_bytes` (default 16 KiB, at least 8 KiB): a request head
    /// past it is refused (431) before it is parsed.
    pub max_header_bytes: usize,
    /// `serve.max_body_bytes` (default 1 MiB): larger request bodies get 413.
    pub max_body_bytes: usize,
    /// `serve.max_response_bytes` (default 8 MiB): the upstream's answers are read up to this.
    pub max_response_bytes: usize,
    /// `serve.record_body_bytes` (default 64 KiB): answers up to this are kept
    /// whole; a larger one keeps status, headers and the body's SHA-256 only.
    pub record_body_bytes: usize,
    /// `serve.wait_ms` (default 5 s): how long a request waits for the same key in progress elsewhere.
    pub wait: Duration,
    /// `serve.upstream_timeout_ms` (default 30 s).
    pub upstream_timeout: Duration,
    /// `serve.client_timeout_ms` (default 10 s): to send the head and the body.
    pub client_timeout: Duration,
    /// `serve.on_5xx` (default `record`).
    pub on_5xx: On5xx,
    /// `serve.drain_timeout_ms` (default 10 s): how long SIGTERM waits for requests in progress.
    pub drain_timeout: Duration,
    /// `[store]`.
    pub store: StoreConfig,
    /// `[store]` ttl, lease, sweep.
    pub retention: Retention,
    /// `[metrics] listen`: `/metrics`, `/healthz`, `/readyz`; `None` when `""`.
    pub metrics_listen: Option<SocketAddr>,
}

impl ServeConfig {
    /// Reads `path`, applies `KDEDUP_…` overrides (`KDEDUP_SERVE__UPSTREAM`), validates.
    pub fn load(path: &Path) -> Result<ServeConfig, ConfigError> {
        ServeConfig::from_toml_with_env(&read_file(path)?, &path.display().to_string(), std::env::vars())
    }

    /// Parses TOML text with the given environment; `origin` names the source in errors.
    pub fn from_toml_with_env(
        text: &str,
        origin: &str,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<ServeConfig, ConfigError> {
        validate_serve(layered::<ServeFile>(text, origin, env)?, &Ctx(origin))
    }
}

fn validate_serve(file: ServeFile, ctx: &Ctx<'_>) -> Result<ServeConfig, ConfigError> {
    let s = file.serve;
    let listen = s.listen.parse::<SocketAddr>();
    let listen = listen.map_err(|e| ctx.err("serve.listen", format!("is \"{}\": {e}; write host:port", s.listen)))?;
    let upstream = s.upstream.trim_end_matches('/').to_string();
    let rest = upstream.strip_prefix("http://").unwrap_or("");
    if rest.is_empty() || rest.contains('/') || rest.contains('?') {
        return Err(ctx.err(
            "serve.upstream",
            format!("is \"{}\"; write the API's origin, http://host:port (paths pass through unchanged)", s.upstream),
        ));
    }
    if s.scope.is_empty() || s.scope.len() > MAX_SCOPE_BYTES {
        return Err(ctx.err("serve.scope", format!("must be 1 to {MAX_SCOPE_BYTES} bytes")));
    }
    let mut methods = Vec::new();
    for m in &s.methods {
        let upper = m.to_ascii_uppercase();
        if upper.is_empty() || !upper.bytes().all(|b| b.is_ascii_uppercase()) {
            return Err(ctx.err("serve.methods", format!("holds \"{m}\"; write HTTP methods such as POST, PATCH")));
        }
        methods.push(upper);
    }
    let header = |key: &str, name: &str| -> Result<String, ConfigError> {
        let lower = name.to_ascii_lowercase();
        hyper::http::HeaderName::from_bytes(lower.as_bytes())
            .map(|_| lower)
            .map_err(|_| ctx.err(key, format!("holds \"{name}\", which is not an HTTP header name")))
    };
    let headers = |key: &str, names: &[String]| names.iter().map(|h| header(key, h)).collect::<Result<_, _>>();
    let ms = |key: &str, value: u64, min: u64| {
        ctx.within(key, value, min, MAX_DRAIN_TIMEOUT_MS, " (an hour)").map(Duration::from_millis)
    };
    let (store, retention) = validate_store(&file.store, ctx)?;
    Ok(ServeConfig {
        listen,
        upstream,
        scope: s.scope.clone(),
        methods,
        key_header: header("serve.key_header", &s.key_header)?,
        client_header: (!s.client_header.is_empty())
            .then(|| header("serve.client_header", &s.client_header))
            .transpose()?,
        fingerprint_headers: headers("serve.fingerprint_headers", &s.fingerprint_headers)?,
        recorded_headers: headers("serve.recorded_headers", &s.recorded_headers)?,
        missing_key: s.missing_key,
        max_key_bytes: ctx.within("serve.max_key_bytes", s.max_key_bytes, 1, MAX_SERVE_KEY_BYTES, "")?,
        max_header_bytes: ctx.within("serve.max_header_bytes", s.max_header_bytes, 8_192, 1 << 20, "")?,
        max_body_bytes: ctx.within("serve.max_body_bytes", s.max_body_bytes, 0, MAX_SERVE_BODY_BYTES, "")?,
        max_response_bytes: ctx.within(
            "serve.max_response_bytes",
            s.max_response_bytes,
            0,
            MAX_SERVE_BODY_BYTES,
            "",
        )?,
        record_body_bytes: ctx.within("serve.record_body_bytes", s.record_body_bytes, 0, MAX_SERVE_RECORD_BYTES, "")?,
        wait: ms("serve.wait_ms", s.wait_ms, 0)?,
        upstream_timeout: ms("serve.upstream_timeout_ms", s.upstream_timeout_ms, 1)?,
        client_timeout: ms("serve.client_timeout_ms", s.client_timeout_ms, 1)?,
        on_5xx: s.on_5xx,
        drain_timeout: ms("serve.drain_timeout_ms", s.drain_timeout_ms, 0)?,
        store,
        retention,
        metrics_listen: ctx.socket("metrics.listen", &file.metrics.listen)?,
    })
}

#[cfg(test)]
mod serve_tests {
    use super::*;

    fn load(text: &str) -> Result<ServeConfig, ConfigError> {
        ServeConfig::from_toml_with_env(text, "inline", Vec::<(String, String)>::new())
    }

    #[test]
    fn serve_defaults_follow_the_issue() {
        let c = load("[serve]\nlisten = \"127.0.0.1:8080\"\nupstream = \"http://127.0.0.1:9000/\"\n").unwrap();
        assert_eq!(c.methods, ["POST", "PATCH"]);
        assert_eq!(c.key_header, "idempotency-key");
        assert_eq!(c.upstream, "http://127.0.0.1:9000");
        assert_eq!(c.retention.ttl, Duration::from_secs(86_400));
        assert_eq!(c.on_5xx, On5xx::Record);
        assert_eq!(c.missing_key, MissingKey::Pass);
    }

    #[test]
    fn serve_refuses_what_would_fail_later() {
        let base = "[serve]\nlisten = \"127.0.0.1:8080\"\n";
        for (extra, key) in [
            ("upstream = \"https://x:1\"", "serve.upstream"),
            ("upstream = \"http://x:1/api\"", "serve.upstream"),
            ("upstream = \"http://x:1\"\nkey_header = \"bad header\"", "serve.key_header"),
            ("upstream = \"http://x:1\"\nmissing_key = \"drop\"", "serve.missing_key"),
            ("upstream = \"http://x:1\"\non_5xx = \"retry\"", "serve.on_5xx"),
            ("upstream = \"http://x:1\"\nmax_key_bytes = 0", "serve.max_key_bytes"),
            ("upstream = \"http://x:1\"\nmax_header_bytes = 100", "serve.max_header_bytes"),
        ] {
            match load(&format!("{base}{extra}\n")) {
                Err(ConfigError::Invalid { key: k, .. }) => assert_eq!(k, key, "{extra}"),
                other => panic!("{extra}: {other:?}"),
            }
        }
    }
}

/// Body of the `config` fuzz target (`fuzz/`), here so the ordinary test
/// suite runs it too. Panics only when an invariant breaks.
#[doc(hidden)]
pub mod fuzzing {
    use super::*;

    /// Fuzz input: TOML text, then after the first NUL byte, `KDEDUP_…=value`
    /// environment lines. Any input gives a validated config within every
    /// bound, or an error naming where it came from; never a panic.
    pub fn config(data: &[u8]) {
        let (text, env) = match data.iter().position(|b| *b == 0) {
            Some(at) => (&data[..at], &data[at + 1..]),
            None => (data, &[][..]),
        };
        let text = String::from_utf8_lossy(text);
        let env: Vec<(String, String)> = String::from_utf8_lossy(env)
            .lines()
            .filter_map(|l| l.split_once('='))
            .map(|(k, v)| (format!("{ENV_PREFIX}{k}"), v.to_string()))
            .collect();
        match Config::from_toml_with_env(&text, "fuzz.toml", env) {
            Ok(c) => check_bounds(&c),
            Err(e) => {
                let shown = e.to_string();
                assert!(shown.contains("fuzz.toml") || shown.contains("environment variable"), "{shown}");
            }
        }
    }

    /// What a valid config promises the rest of kdedup.
    pub fn check_bounds(c: &Config) {
        let r = &c.retention;
        assert!(r.ttl >= Duration::from_secs(1) && r.ttl <= Duration::from_secs(MAX_TTL_SECS), "{:?}", r.ttl);
        assert!(r.lease >= Duration::from_secs(1) && r.lease < r.ttl, "{:?}", r.lease);
        assert!(r.lease <= Duration::from_secs(MAX_LEASE_SECS));
        assert!(r.sweep_interval >= Duration::from_secs(1));
        assert!(r.sweep_interval <= Duration::from_secs(MAX_SWEEP_INTERVAL_SECS));
        let planned = filter_plan::planned_bytes(c.filter.expected_keys.get(), c.filter.false_positive_rate)
            .expect("a valid filter plan fits in memory addresses");
        assert!(planned as u64 <= MAX_FILTER_BYTES);
        assert!(c.filter.recent_keys <= MAX_RECENT_KEYS);
        assert!(c.key.max_bytes.get() <= MAX_ID_BYTES);
        assert!(!c.key.scope.is_empty() && c.key.scope.len() <= MAX_SCOPE_BYTES);
        assert!(c.pipeline.batch_max.get() <= MAX_BATCH);
        assert!(c.pipeline.commit_interval >= Duration::from_millis(1));
        assert!(c.pipeline.commit_interval <= Duration::from_millis(MAX_COMMIT_INTERVAL_MS));
        assert!(c.pipeline.drain_timeout <= Duration::from_millis(MAX_DRAIN_TIMEOUT_MS));
        match &c.store {
            StoreConfig::Postgres { pool_size, .. } => assert!((1..=MAX_POOL_SIZE).contains(pool_size)),
            StoreConfig::Scylla(s) => {
                assert!(s.max_in_flight.get() <= MAX_IN_FLIGHT);
                for t in [s.request_timeout, s.connect_timeout] {
                    assert!(t >= Duration::from_millis(1) && t <= Duration::from_millis(MAX_STORE_TIMEOUT_MS));
                }
            }
            StoreConfig::Embedded { .. } => {}
        }
        assert!(!c.kafka.topics.is_empty() && !c.dead_letter_topic.is_empty());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(super) const MINIMAL: &str = r#"
        [kafka]
        brokers = "127.0.0.1:9092"
        group_id = "g"
        topics = ["orders"]
        [sink]
        kind = "kafka"
        topic = "orders.deduped"
        [dead_letter]
        topic = "orders.dlq"
    "#;

    pub(super) fn load(text: &str, env: &[(&str, &str)]) -> Result<Config, ConfigError> {
        Config::from_toml_with_env(text, "test.toml", env.iter().map(|(k, v)| (k.to_string(), v.to_string())))
    }

    #[test]
    fn minimal_file_gets_documented_defaults() {
        let c = load(MINIMAL, &[]).unwrap();
        assert_eq!(c.key.source, KeySource::Header("event-id".into()));
        assert_eq!(c.key.scope, "g", "scope defaults to group_id");
        assert_eq!(c.retention.ttl, Duration::from_secs(86_400));
        assert_eq!(c.duplicates_topic, None);
        assert_eq!(c.pipeline.on_conflict, OnConflict::DeadLetter);
    }

    #[test]
    fn env_overrides_win_and_keep_types() {
        let c = load(
            MINIMAL,
            &[
                ("KDEDUP_KAFKA__BROKERS", "10.0.0.1:9092"),
                ("KDEDUP_KAFKA__GROUP_ID", "42"),
                ("KDEDUP_STORE__TTL_SECS", "7200"),
                ("KDEDUP_KAFKA__TOPICS", "a,b"),
                ("KDEDUP_KAFKA__CONSUMER__FETCH_MIN_BYTES", "1024"),
                ("KDEDUP_LOG", "debug"),
                ("OTHER", "x"),
            ],
        )
        .unwrap();
        assert_eq!(c.kafka.brokers, "10.0.0.1:9092");
        assert_eq!(c.kafka.group_id, "42");
        assert_eq!(c.retention.ttl, Duration::from_secs(7200));
        assert_eq!(c.kafka.topics, vec!["a", "b"]);
        assert_eq!(c.kafka.consumer.get("fetch.min.bytes").map(String::as_str), Some("1024"));
    }

    #[test]
    fn unknown_key_is_an_error_naming_it_and_the_file() {
        let err = load(&format!("{MINIMAL}\n[store]\nttl = 5\n"), &[]).unwrap_err().to_string();
        assert!(err.contains("test.toml") && err.contains("ttl"), "{err}");
    }

    #[test]
    fn a_type_error_names_its_line_and_column() {
        let text = format!("{MINIMAL}\n[store]\nttl_secs = \"a day\"\n");
        let line = text.lines().position(|l| l.starts_with("ttl_secs")).unwrap() + 1;
        match load(&text, &[]) {
            Err(ConfigError::Parse { path, message }) => {
                assert_eq!(path, PathBuf::from("test.toml"));
                let at = format!("line {line}, column 12: `store.ttl_secs`: invalid type: string \"a day\"");
                assert!(message.starts_with(&at), "{message}");
            }
            other => panic!("a type error: {other:?}"),
        }
        let text = format!("{MINIMAL}\n[key]\nsource = \"xml\"\n");
        let line = text.lines().position(|l| l.starts_with("source")).unwrap() + 1;
        let e = load(&text, &[]).unwrap_err().to_string();
        assert!(e.starts_with(&format!("config test.toml:{line}:10: `key.source` is \"xml\"; allowed:")), "{e}");
    }

    #[test]
    fn a_missing_section_is_named_with_what_it_needs() {
        let text = MINIMAL.replace("[dead_letter]", "").replace("topic = \"orders.dlq\"", "");
        match load(&text, &[]) {
            Err(ConfigError::Invalid { origin, key, message }) => {
                assert_eq!((origin.as_str(), key.as_str()), ("test.toml", "dead_letter"));
                assert!(message.contains("add [dead_letter] with topic = ") && message.contains("cannot be handled"));
            }
            other => panic!("a missing section: {other:?}"),
        }
        let text = MINIMAL.replace("group_id = \"g\"", "");
        let e = load(&text, &[]).unwrap_err().to_string();
        assert!(e.contains("`kafka.group_id` is missing from [kafka]") && !e.contains("missing field"), "{e}");
    }

    #[test]
    fn an_environment_typo_is_blamed_on_the_variable_with_the_keys_allowed() {
        match load(MINIMAL, &[("KDEDUP_STORE__TTL_SEC", "5")]) {
            Err(ConfigError::Invalid { origin, key, message }) => {
                assert_eq!(origin, "environment variable KDEDUP_STORE__TTL_SEC");
                assert_eq!(key, "store.ttl_sec");
                assert!(message.contains("not a key of [store]") && message.contains("\"ttl_secs\""), "{message}");
            }
            other => panic!("an unknown key from the environment: {other:?}"),
        }
        let e = load(MINIMAL, &[("KDEDUP_STOR__TTL_SECS", "5")]).unwrap_err().to_string();
        assert!(e.contains("KDEDUP_STOR__TTL_SECS") && e.contains("`stor`") && e.contains("\"store\""), "{e}");
        // A bad value from the environment names the variable, not a line of the file.
        let e = load(MINIMAL, &[("KDEDUP_STORE__TTL_SECS", "soon")]).unwrap_err().to_string();
        assert!(e.contains("`store.ttl_secs` (set by environment variable KDEDUP_STORE__TTL_SECS)"), "{e}");
        assert!(!e.contains("line "), "{e}");
    }

    #[test]
    fn a_loaded_config_names_its_own_file_in_the_schema_command() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("orders.toml");
        std::fs::write(&path, MINIMAL).unwrap();
        let c = Config::load(&path).unwrap();
        let command = schema_apply_command(c.file.as_deref());
        assert_eq!(command, format!("kdedup schema apply --config {}", path.display()));
        assert_eq!(load(MINIMAL, &[]).unwrap().file, None, "text has no file");
        assert_eq!(schema_apply_command(None), "kdedup schema apply");
    }

    #[test]
    fn bad_values_say_what_is_allowed() {
        let err = load(&format!("{MINIMAL}\n[key]\nsource = \"xml\"\n"), &[]).unwrap_err().to_string();
        assert!(err.contains("key.source") && err.contains("\"json\""), "{err}");
        let err = load(&format!("{MINIMAL}\n[key]\nsource = \"json\"\njson_pointer = \"id\"\n"), &[])
            .unwrap_err()
            .to_string();
        assert!(err.contains("RFC 6901"), "{err}");
        let err = load(MINIMAL, &[("KDEDUP_STORE__LEASE_SECS", "999999")]).unwrap_err().to_string();
        assert!(err.contains("store.lease_secs"), "{err}");
        let err = load(MINIMAL, &[("KDEDUP_SINK__TOPIC", "orders")]).unwrap_err().to_string();
        assert!(err.contains("loop"), "{err}");
        let err = load(MINIMAL, &[("KDEDUP_KAFKA__CONSUMER__ENABLE_AUTO_COMMIT", "true")]).unwrap_err().to_string();
        assert!(err.contains("enable.auto.commit"), "{err}");
    }

    const SCYLLA: &str = r#"
        [store]
        kind = "scylla"
        contact_points = ["10.0.0.5:9042", "scylla-2:9042"]
        local_datacenter = "dc1"
    "#;

    fn scylla(extra: &str, env: &[(&str, &str)]) -> Result<ScyllaConfig, ConfigError> {
        let c = load(&format!("{MINIMAL}{SCYLLA}{extra}"), env)?;
        match c.store {
            StoreConfig::Scylla(c) => Ok(*c),
            other => panic!("not a scylla store: {other:?}"),
        }
    }

    #[test]
    fn scylla_store_gets_documented_defaults() {
        let c = scylla("", &[]).unwrap();
        assert_eq!(c.contact_points, vec!["10.0.0.5:9042", "scylla-2:9042"]);
        assert_eq!(c.keyspace, "kdedup");
        assert_eq!(c.replication.get("dc1").map(|rf| rf.get()), Some(3), "3 replicas in the local DC by default");
        assert_eq!(c.consistency, ScyllaConsistency::LocalQuorum);
        assert_eq!(c.serial_consistency, ScyllaSerialConsistency::LocalSerial);
        assert_eq!(c.request_timeout, Duration::from_secs(5));
        assert_eq!(c.max_in_flight.get(), 256);
        assert!(c.tls.is_none() && c.credentials.is_none());
    }

    #[test]
    fn scylla_settings_come_from_the_environment_too() {
        let c = scylla(
            "replication = { dc1 = 3, dc2 = 3 }\n",
            &[
                ("KDEDUP_STORE__CONTACT_POINTS", "127.0.0.1:9042"),
                ("KDEDUP_STORE__CONSISTENCY", "quorum"),
                ("KDEDUP_STORE__SERIAL_CONSISTENCY", "serial"),
                ("KDEDUP_STORE__TLS", "true"),
                ("KDEDUP_STORE__USERNAME", "kdedup"),
                ("KDEDUP_STORE__PASSWORD", "s3cret"),
            ],
        )
        .unwrap();
        assert_eq!(c.contact_points, vec!["127.0.0.1:9042"]);
        assert_eq!(c.replication.len(), 2);
        assert_eq!((c.consistency, c.serial_consistency), (ScyllaConsistency::Quorum, ScyllaSerialConsistency::Serial));
        assert_eq!(c.tls, Some(ScyllaTls { ca_file: None }), "TLS with the system's roots");
        assert_eq!(c.credentials, Some(("kdedup".into(), "s3cret".into())));
        let shown = format!("{:?}", StoreConfig::Scylla(Box::new(c)));
        assert!(!shown.contains("s3cret") && shown.contains("kdedup"), "{shown}");
    }

    #[test]
    fn scylla_errors_name_the_key_and_what_is_allowed() {
        let err = |extra: &str, env: &[(&str, &str)]| scylla(extra, env).unwrap_err().to_string();
        let e = err("", &[("KDEDUP_STORE__CONTACT_POINTS", "10.0.0.5")]);
        assert!(e.contains("store.contact_points") && e.contains("host:port"), "{e}");
        let e = err("", &[("KDEDUP_STORE__LOCAL_DATACENTER", "")]);
        assert!(e.contains("store.local_datacenter") && e.contains("nodetool status"), "{e}");
        let e = err("", &[("KDEDUP_STORE__CONSISTENCY", "one")]);
        assert!(e.contains("store.consistency") && e.contains("\"local_quorum\", \"quorum\""), "{e}");
        let e = err("", &[("KDEDUP_STORE__SERIAL_CONSISTENCY", "quorum")]);
        assert!(e.contains("store.serial_consistency") && e.contains("\"local_serial\""), "{e}");
        let e = err("", &[("KDEDUP_STORE__KEYSPACE", "Dedup-1")]);
        assert!(e.contains("store.keyspace"), "{e}");
        let e = err("replication = { dc2 = 3 }\n", &[]);
        assert!(e.contains("store.replication") && e.contains("dc1"), "{e}");
        let e = err("replication = { dc1 = 0 }\n", &[]);
        assert!(e.contains("store.replication"), "{e}");
        let e = err("replication = { \"dc1'\" = 3 }\n", &[]);
        assert!(e.contains("store.replication"), "{e}");
        let e = err("", &[("KDEDUP_STORE__TLS_CA_FILE", "/ca.pem")]);
        assert!(e.contains("store.tls_ca_file"), "{e}");
        let e = err("", &[("KDEDUP_STORE__USERNAME", "kdedup")]);
        assert!(e.contains("store.password") && e.contains("KDEDUP_STORE__PASSWORD"), "{e}");
        let e = err("", &[("KDEDUP_STORE__MAX_IN_FLIGHT", "0")]);
        assert!(e.contains("store.max_in_flight"), "{e}");
        let e = load(&format!("{MINIMAL}\n[store]\nkind = \"cassandra\"\n"), &[]).unwrap_err().to_string();
        assert!(e.contains("\"scylla\""), "{e}");
    }

    #[test]
    fn the_shipped_scylla_example_is_valid_once_uncommented() {
        let text = include_str!("../config/kdedup.toml");
        let start = text.find("# kind = \"scylla\"").expect("the example file carries a commented scylla store");
        let store: String = text[start..]
            .lines()
            .take_while(|l| l.starts_with('#'))
            .filter(|l| !l.starts_with("# #"))
            .map(|l| format!("{}\n", l.trim_start_matches('#').trim()))
            .collect();
        match load(&format!("{MINIMAL}\n[store]\n{store}"), &[]).unwrap().store {
            StoreConfig::Scylla(c) => assert_eq!(c.local_datacenter, "datacenter1"),
            other => panic!("not a scylla store: {other:?}"),
        }
    }

    fn invalid_key(env: &[(&str, &str)]) -> String {
        match load(MINIMAL, env) {
            Err(ConfigError::Invalid { origin, key, message }) => {
                assert_eq!(origin, "test.toml", "the error names the file");
                format!("{key}: {message}")
            }
            other => panic!("{env:?} should be invalid, got {other:?}"),
        }
    }

    #[test]
    fn ttl_is_bounded_by_what_scylla_accepts() {
        assert_eq!(
            load(MINIMAL, &[("KDEDUP_STORE__TTL_SECS", "630720000")]).unwrap().retention.ttl.as_secs(),
            MAX_TTL_SECS
        );
        for bad in ["630720001", "0", "9223372036854775807"] {
            let e = invalid_key(&[("KDEDUP_STORE__TTL_SECS", bad)]);
            assert!(e.starts_with("store.ttl_secs:") && e.contains("630720000") && e.contains("ScyllaDB"), "{e}");
        }
    }

    #[test]
    fn lease_is_at_least_a_second_at_most_an_hour_and_below_the_ttl() {
        assert_eq!(load(MINIMAL, &[("KDEDUP_STORE__LEASE_SECS", "3600")]).unwrap().retention.lease.as_secs(), 3600);
        for (lease, ttl) in [("0", "86400"), ("3601", "86400"), ("100", "100"), ("18446744073709551615", "86400")] {
            let env = [("KDEDUP_STORE__LEASE_SECS", lease), ("KDEDUP_STORE__TTL_SECS", ttl)];
            match load(MINIMAL, &env) {
                // u64::MAX is not a TOML integer: it is read as a string and refused by type.
                Err(ConfigError::Parse { message, .. }) => assert!(message.contains("lease_secs"), "{message}"),
                Err(ConfigError::Invalid { key, message, .. }) => {
                    assert_eq!(key, "store.lease_secs");
                    assert!(message.contains("1 to 3600") && message.contains(&format!("({ttl})")), "{message}");
                }
                other => panic!("lease {lease} / ttl {ttl} should be refused: {other:?}"),
            }
        }
    }

    #[test]
    fn sweep_interval_is_bounded() {
        for bad in ["0", "86401"] {
            let e = invalid_key(&[("KDEDUP_STORE__SWEEP_INTERVAL_SECS", bad)]);
            assert!(e.starts_with("store.sweep_interval_secs:") && e.contains("1 to 86400"), "{e}");
        }
    }

    #[test]
    fn a_filter_too_large_to_allocate_is_refused_with_its_planned_size() {
        // 10M keys: ~25 MB, well inside.
        let planned = filter_plan::planned_bytes(10_000_000, 0.001).unwrap();
        assert!((20_000_000..30_000_000).contains(&planned), "{planned}");
        // 64 GiB holds ~27 billion keys at 0.001; 30 billion is over.
        let e = invalid_key(&[("KDEDUP_FILTER__EXPECTED_KEYS", "30000000000")]);
        let bytes = filter_plan::planned_bytes(30_000_000_000, 0.001).unwrap();
        assert!(e.starts_with("filter.expected_keys:") && e.contains(&format!("{bytes} bytes")), "{e}");
        assert!(e.contains("64 GiB"), "{e}");
        // The largest TOML integer: planned, refused, no overflow.
        let e = invalid_key(&[("KDEDUP_FILTER__EXPECTED_KEYS", "9223372036854775807")]);
        assert!(e.starts_with("filter.expected_keys:") && e.contains("64 GiB"), "{e}");
        // A low rate lowers the load: more memory for the same keys.
        let e = invalid_key(&[
            ("KDEDUP_FILTER__EXPECTED_KEYS", "10000000000"),
            ("KDEDUP_FILTER__FALSE_POSITIVE_RATE", "1e-9"),
        ]);
        assert!(e.starts_with("filter.expected_keys:") && e.contains("false_positive_rate 0.000000001"), "{e}");
        for bad in ["0.0", "0.5", "nan", "-1.0", "inf"] {
            let e = invalid_key(&[("KDEDUP_FILTER__FALSE_POSITIVE_RATE", bad)]);
            assert!(e.starts_with("filter.false_positive_rate:"), "{bad}: {e}");
        }
        let e = invalid_key(&[("KDEDUP_FILTER__RECENT_KEYS", "100000001")]);
        assert!(e.starts_with("filter.recent_keys:") && e.contains("100000000"), "{e}");
        assert_eq!(load(MINIMAL, &[("KDEDUP_FILTER__RECENT_KEYS", "0")]).unwrap().filter.recent_keys, 0);
    }

    #[test]
    fn key_sizes_are_bounded_by_what_the_stores_can_key() {
        assert_eq!(load(MINIMAL, &[("KDEDUP_KEY__MAX_BYTES", "2048")]).unwrap().key.max_bytes.get(), 2048);
        for bad in ["0", "2049", "100000"] {
            let e = invalid_key(&[("KDEDUP_KEY__MAX_BYTES", bad)]);
            assert!(e.starts_with("key.max_bytes:") && e.contains("1 to 2048") && e.contains("hash"), "{e}");
        }
        let long = "s".repeat(257);
        let e = invalid_key(&[("KDEDUP_KEY__SCOPE", &long)]);
        assert!(e.starts_with("key.scope:") && e.contains("257 bytes") && e.contains("256"), "{e}");
        let e = invalid_key(&[("KDEDUP_KAFKA__GROUP_ID", &long)]);
        assert!(e.starts_with("kafka.group_id:") && e.contains("key.scope"), "the default scope names its source: {e}");
        let c = load(MINIMAL, &[("KDEDUP_KAFKA__GROUP_ID", &long), ("KDEDUP_KEY__SCOPE", "short")]).unwrap();
        assert_eq!(c.key.scope, "short", "a long group ID is fine with a short scope");
    }

    #[test]
    fn pipeline_numbers_are_bounded() {
        for (var, bad, key, allowed) in [
            ("KDEDUP_PIPELINE__BATCH_MAX", "0", "pipeline.batch_max", "1 to 100000"),
            ("KDEDUP_PIPELINE__BATCH_MAX", "100001", "pipeline.batch_max", "1 to 100000"),
            ("KDEDUP_PIPELINE__COMMIT_INTERVAL_MS", "0", "pipeline.commit_interval_ms", "1 to 86400000"),
            ("KDEDUP_PIPELINE__COMMIT_INTERVAL_MS", "86400001", "pipeline.commit_interval_ms", "1 to 86400000"),
            ("KDEDUP_PIPELINE__DRAIN_TIMEOUT_MS", "3600001", "pipeline.drain_timeout_ms", "0 to 3600000"),
            ("KDEDUP_PIPELINE__MODE", "dry-run", "pipeline.mode", "\"enforce\", \"observe\""),
            (
                "KDEDUP_FILTER__EXPIRED_KEYS",
                "100000001",
                "filter.expired_keys",
                "0 (no expired-key estimate) to 100000000",
            ),
        ] {
            let e = invalid_key(&[(var, bad)]);
            assert!(e.starts_with(&format!("{key}:")) && e.contains(allowed), "{var}={bad}: {e}");
        }
        let c = load(MINIMAL, &[("KDEDUP_PIPELINE__DRAIN_TIMEOUT_MS", "0"), ("KDEDUP_PIPELINE__BATCH_MAX", "100000")]);
        assert_eq!(c.unwrap().pipeline.drain_timeout, Duration::ZERO, "a zero drain abandons at once, by choice");
        let c = load(MINIMAL, &[]).unwrap();
        assert_eq!((c.pipeline.mode, c.filter.expired_keys), (Mode::Enforce, 1_000_000), "the defaults");
        let c = load(MINIMAL, &[("KDEDUP_PIPELINE__MODE", "observe"), ("KDEDUP_FILTER__EXPIRED_KEYS", "0")]).unwrap();
        assert_eq!((c.pipeline.mode, c.filter.expired_keys), (Mode::Observe, 0));
    }

    #[test]
    fn the_prefetch_budget_is_in_mib_and_bounded() {
        assert_eq!(load(MINIMAL, &[]).unwrap().kafka.prefetch_bytes, 128 << 20, "the default");
        let c = load(MINIMAL, &[("KDEDUP_KAFKA__PREFETCH_MIB", "512")]).unwrap();
        assert_eq!(c.kafka.prefetch_bytes, 512 << 20);
        for bad in ["0", "65537"] {
            let e = invalid_key(&[("KDEDUP_KAFKA__PREFETCH_MIB", bad)]);
            assert!(e.starts_with("kafka.prefetch_mib:") && e.contains("1 to 65536"), "{bad}: {e}");
        }
    }

    #[test]
    fn postgres_tls_comes_from_the_tls_key_or_the_urls_sslmode_never_both() {
        fn pg(url: &str, extra: &[(&str, &str)]) -> Result<PostgresTls, ConfigError> {
            let mut env = vec![("KDEDUP_STORE__KIND", "postgres"), ("KDEDUP_STORE__URL", url)];
            env.extend_from_slice(extra);
            load(MINIMAL, &env).map(|c| match c.store {
                StoreConfig::Postgres { tls, .. } => tls,
                other => panic!("not postgres: {other:?}"),
            })
        }
        let ok = |url: &str, extra: &[(&str, &str)]| pg(url, extra).unwrap();
        let err = |url: &str, extra: &[(&str, &str)]| pg(url, extra).unwrap_err().to_string();
        assert_eq!(ok("postgres://u@h/db", &[]), PostgresTls::Prefer, "today's default: tokio-postgres' prefer");
        assert_eq!(ok("postgres://u@h/db?sslmode=require", &[]), PostgresTls::Require);
        assert_eq!(ok("postgres://u@h/db?sslmode=disable", &[]), PostgresTls::Disable);
        assert_eq!(ok("postgres://u@h/db", &[("KDEDUP_STORE__TLS", "require")]), PostgresTls::Require);
        assert_eq!(ok("postgres://u@h/db", &[("KDEDUP_STORE__TLS", "false")]), PostgresTls::Disable);
        assert_eq!(
            ok("postgres://u@h/db", &[("KDEDUP_STORE__TLS", "true")]),
            PostgresTls::VerifyFull { ca_file: None },
            "true is verify-full against the system's roots"
        );
        assert_eq!(ok("postgres://u@h/db?sslmode=require", &[("KDEDUP_STORE__TLS", "require")]), PostgresTls::Require);

        let e = err("postgres://u@h/db?sslmode=require", &[("KDEDUP_STORE__TLS", "verify-full")]);
        assert!(e.contains("store.tls") && e.contains("sslmode=require") && e.contains("say it once"), "{e}");
        let e = err("postgres://u:pw-secret@h/db?sslmode=verify-full", &[]);
        assert!(e.contains("store.url") && e.contains("tls = \"verify-full\""), "{e}");
        assert!(!e.contains("pw-secret"), "{e}");
        let e = err("postgres://u@h/db", &[("KDEDUP_STORE__TLS", "verify-ca")]);
        assert!(e.contains("\"disable\", \"require\", \"verify-full\""), "{e}");
        let e = err("postgres://u@h/db", &[("KDEDUP_STORE__TLS", "require"), ("KDEDUP_STORE__TLS_CA_FILE", "/x.pem")]);
        assert!(e.contains("store.tls_ca_file") && e.contains("verify-full"), "{e}");

        let dir = tempfile::tempdir().unwrap();
        let not_pem = dir.path().join("ca.pem");
        std::fs::write(&not_pem, "not a certificate\n").unwrap();
        let not_pem = not_pem.display().to_string();
        for (file, says) in [("/nonexistent/ca.pem", "cannot read"), (not_pem.as_str(), "PEM")] {
            let e =
                err("postgres://u@h/db", &[("KDEDUP_STORE__TLS", "verify-full"), ("KDEDUP_STORE__TLS_CA_FILE", file)]);
            assert!(e.contains("store.tls_ca_file") && e.contains(file) && e.contains(says), "{e}");
        }
        // ScyllaDB's TLS always verifies: "require" would promise less than it does.
        let e = scylla("tls = \"require\"\n", &[]).unwrap_err().to_string();
        assert!(e.contains("store.tls") && e.contains("tls = true"), "{e}");
        assert!(scylla("tls = \"verify-full\"\n", &[]).unwrap().tls.is_some());
    }

    #[test]
    fn store_connection_numbers_are_bounded() {
        let pg = [("KDEDUP_STORE__KIND", "postgres"), ("KDEDUP_STORE__URL", "postgres://u@h/db")];
        for bad in ["0", "1025"] {
            let e = invalid_key(&[pg[0], pg[1], ("KDEDUP_STORE__POOL_SIZE", bad)]);
            assert!(e.starts_with("store.pool_size:") && e.contains("1 to 1024"), "{e}");
        }
        let e = |env: &[(&str, &str)]| scylla("", env).unwrap_err().to_string();
        for bad in ["0", "600001"] {
            let m = e(&[("KDEDUP_STORE__REQUEST_TIMEOUT_MS", bad)]);
            assert!(m.contains("store.request_timeout_ms") && m.contains("1 to 600000"), "{m}");
            let m = e(&[("KDEDUP_STORE__CONNECT_TIMEOUT_MS", bad)]);
            assert!(m.contains("store.connect_timeout_ms") && m.contains("1 to 600000"), "{m}");
        }
        let m = e(&[("KDEDUP_STORE__MAX_IN_FLIGHT", "32769")]);
        assert!(m.contains("store.max_in_flight") && m.contains("1 to 32768"), "{m}");
    }

    #[test]
    fn deeply_nested_toml_is_a_parse_error_not_a_stack_overflow() {
        for text in [format!("a = {}", "[".repeat(100_000)), format!("a = {}", "{b=".repeat(50_000))] {
            match load(&text, &[]) {
                Err(ConfigError::Parse { path, .. }) => assert_eq!(path, PathBuf::from("test.toml")),
                other => panic!("should be a parse error: {other:?}"),
            }
        }
    }

    mod fuzz_body {
        use proptest::prelude::*;

        use super::super::fuzzing;

        const KEYS: &[&str] = &[
            "STORE__TTL_SECS",
            "STORE__LEASE_SECS",
            "STORE__SWEEP_INTERVAL_SECS",
            "STORE__POOL_SIZE",
            "STORE__KIND",
            "STORE__URL",
            "STORE__CONTACT_POINTS",
            "STORE__LOCAL_DATACENTER",
            "STORE__MAX_IN_FLIGHT",
            "STORE__REQUEST_TIMEOUT_MS",
            "STORE__CONNECT_TIMEOUT_MS",
            "FILTER__EXPECTED_KEYS",
            "FILTER__FALSE_POSITIVE_RATE",
            "FILTER__RECENT_KEYS",
            "KEY__MAX_BYTES",
            "KEY__SCOPE",
            "KEY__SOURCE",
            "KEY__JSON_POINTER",
            "PIPELINE__BATCH_MAX",
            "PIPELINE__COMMIT_INTERVAL_MS",
            "PIPELINE__DRAIN_TIMEOUT_MS",
            "METRICS__LISTEN",
            "KAFKA__CONSUMER__FETCH_MIN_BYTES",
        ];

        fn value() -> impl Strategy<Value = String> {
            prop_oneof![
                any::<u64>().prop_map(|n| n.to_string()),
                (0u64..100_000_000_000).prop_map(|n| n.to_string()),
                any::<i64>().prop_map(|n| n.to_string()),
                any::<f64>().prop_map(|f| f.to_string()),
                "[a-z0-9:/.,\\[\\]\"=-]{0,20}",
                Just("postgres://u@h/db".to_string()),
                Just("scylla".to_string()),
            ]
        }

        #[test]
        fn seed_corpus_passes() {
            let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus/config");
            let entries = std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("seed corpus {}: {e}", dir.display()));
            let mut n = 0;
            for entry in entries {
                fuzzing::config(&std::fs::read(entry.unwrap().path()).unwrap());
                n += 1;
            }
            assert!(n > 0, "no seeds in {}", dir.display());
        }

        proptest! {
            #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

            #[test]
            fn any_overrides_of_a_valid_file_give_a_bounded_config_or_a_named_error(
                overrides in proptest::collection::vec((proptest::sample::select(KEYS), value()), 0..6)
            ) {
                let mut data = include_bytes!("../config/kdedup.toml").to_vec();
                data.push(0);
                for (k, v) in overrides {
                    data.extend_from_slice(format!("{k}={v}\n").as_bytes());
                }
                fuzzing::config(&data);
            }

            #[test]
            fn any_bytes_are_a_config_or_an_error(data in proptest::collection::vec(any::<u8>(), 0..300)) {
                fuzzing::config(&data);
            }
        }
    }

    #[test]
    fn the_shipped_example_config_is_valid() {
        let text = include_str!("../config/kdedup.toml");
        load(text, &[]).unwrap();
    }
}

#[cfg(test)]
mod secret_tests {
    use super::tests::{load, MINIMAL as BASE};
    use super::*;

    fn secret_file(dir: &tempfile::TempDir, name: &str, content: &str) -> String {
        let path = dir.path().join(name);
        std::fs::write(&path, content).unwrap();
        path.display().to_string()
    }

    #[test]
    fn secrets_come_from_files_with_the_trailing_newline_trimmed() {
        let dir = tempfile::tempdir().unwrap();
        let sasl = secret_file(&dir, "sasl", "s3cr3t-sasl\n");
        let key = secret_file(&dir, "key", "s3cr3t-key\r\n");
        let url = secret_file(&dir, "url", "postgres://u:s3cr3t-pg@db:5432/k\n");
        let text = format!(
            "{BASE}\n[kafka.client]\n\"sasl.password.file\" = \"{sasl}\"\n[kafka.producer]\n\
             \"ssl.key.password.file\" = \"{key}\"\n[store]\nkind = \"postgres\"\nurl_file = \"{url}\"\n"
        );
        let c = load(&text, &[]).unwrap();
        assert_eq!(c.kafka.client.get("sasl.password").map(String::as_str), Some("s3cr3t-sasl"));
        assert!(!c.kafka.client.contains_key("sasl.password.file"), "the indirection itself never reaches librdkafka");
        assert_eq!(c.kafka.producer.get("ssl.key.password").map(String::as_str), Some("s3cr3t-key"));
        match &c.store {
            StoreConfig::Postgres { url, .. } => assert_eq!(url.expose(), "postgres://u:s3cr3t-pg@db:5432/k"),
            other => panic!("not postgres: {other:?}"),
        }
        let shown = format!("{c:?}");
        assert!(!shown.contains("s3cr3t"), "Debug shows a secret: {shown}");
    }

    #[test]
    fn the_scylla_password_comes_from_a_file() {
        let dir = tempfile::tempdir().unwrap();
        let password = secret_file(&dir, "scylla", "s3cr3t-scylla\n");
        let text = format!(
            "{BASE}\n[store]\nkind = \"scylla\"\ncontact_points = [\"10.0.0.5:9042\"]\n\
             local_datacenter = \"dc1\"\nusername = \"kdedup\"\npassword_file = \"{password}\"\n"
        );
        let c = load(&text, &[]).unwrap();
        match &c.store {
            StoreConfig::Scylla(s) => {
                assert_eq!(s.credentials, Some(("kdedup".to_string(), "s3cr3t-scylla".into())))
            }
            other => panic!("not scylla: {other:?}"),
        }
        assert!(!format!("{c:?}").contains("s3cr3t"));
    }

    #[test]
    fn a_secret_file_can_be_named_from_the_environment() {
        let dir = tempfile::tempdir().unwrap();
        let sasl = secret_file(&dir, "sasl", "from-env-file");
        let c = load(BASE, &[("KDEDUP_KAFKA__CLIENT__SASL_PASSWORD_FILE", &sasl)]).unwrap();
        assert_eq!(c.kafka.client.get("sasl.password").map(String::as_str), Some("from-env-file"));
        let c = load(BASE, &[("KDEDUP_KAFKA__CLIENT__SASL_PASSWORD", "plain-env")]).unwrap();
        assert_eq!(c.kafka.client.get("sasl.password").map(String::as_str), Some("plain-env"));
    }

    #[test]
    fn a_missing_secret_file_or_a_double_secret_is_an_error_naming_the_key_not_the_value() {
        let text = format!("{BASE}\n[kafka.consumer]\n\"sasl.password.file\" = \"/nonexistent/kdedup-secret\"\n");
        let e = load(&text, &[]).unwrap_err().to_string();
        assert!(e.contains("kafka.consumer.sasl.password.file") && e.contains("/nonexistent/kdedup-secret"), "{e}");
        let dir = tempfile::tempdir().unwrap();
        let sasl = secret_file(&dir, "sasl", "hidden-value");
        let text = format!(
            "{BASE}\n[kafka.consumer]\n\"sasl.password.file\" = \"{sasl}\"\n\"sasl.password\" = \"inline-value\"\n"
        );
        let e = load(&text, &[]).unwrap_err().to_string();
        assert!(e.contains("both set"), "{e}");
        assert!(!e.contains("hidden-value") && !e.contains("inline-value"), "{e}");
    }

    #[test]
    fn auto_commit_is_refused_in_every_spelling_librdkafka_reads_as_true() {
        let keys = ["enable.auto.commit", "enable.auto.offset.store", "auto.commit.enable"];
        for section in ["client", "consumer"] {
            for key in keys {
                for value in ["true", "1", "\"1\"", "\"True\"", "\"t\"", "\"TRUE\"", "\"T\"", "\"tRuE\""] {
                    let text = format!("{BASE}\n[kafka.{section}]\n\"{key}\" = {value}\n");
                    let e = load(&text, &[]).expect_err(&text).to_string();
                    assert!(e.contains(&format!("kafka.{section}.{key}")) && e.contains("reads as true"), "{e}");
                }
                for value in ["false", "0", "\"0\"", "\"False\"", "\"f\"", "\"F\"", "\"FALSE\""] {
                    let text = format!("{BASE}\n[kafka.{section}]\n\"{key}\" = {value}\n");
                    load(&text, &[]).expect(&text);
                }
                // What librdkafka itself would refuse is refused here, with what is allowed.
                for value in ["2", "\"yes\"", "\"on\"", "\" true\"", "\"\"", "1.5"] {
                    let text = format!("{BASE}\n[kafka.{section}]\n\"{key}\" = {value}\n");
                    let e = load(&text, &[]).expect_err(&text).to_string();
                    assert!(e.contains("allowed: false, f or 0"), "{e}");
                }
            }
        }
        // From the environment too (an integer there).
        let e = load(BASE, &[("KDEDUP_KAFKA__CONSUMER__ENABLE_AUTO_COMMIT", "1")]).unwrap_err().to_string();
        assert!(e.contains("enable.auto.commit"), "{e}");
        assert_eq!(librdkafka_bool("t"), Some(true));
        assert_eq!(librdkafka_bool("yes"), None, "librdkafka's parser takes no yes/no");
    }

    #[test]
    fn the_kip_848_protocol_refuses_the_keys_it_moves_to_the_broker() {
        let kip848 = ("KDEDUP_KAFKA__CONSUMER__GROUP_PROTOCOL", "consumer");
        let c = load(BASE, &[kip848, ("KDEDUP_KAFKA__CONSUMER__GROUP_REMOTE_ASSIGNOR", "range")]).unwrap();
        assert_eq!(c.kafka.consumer.get("group.protocol").map(String::as_str), Some("consumer"));
        for (var, key) in [
            ("KDEDUP_KAFKA__CONSUMER__SESSION_TIMEOUT_MS", "kafka.consumer.session.timeout.ms"),
            ("KDEDUP_KAFKA__CONSUMER__HEARTBEAT_INTERVAL_MS", "kafka.consumer.heartbeat.interval.ms"),
            ("KDEDUP_KAFKA__CLIENT__PARTITION_ASSIGNMENT_STRATEGY", "kafka.client.partition.assignment.strategy"),
        ] {
            let e = load(BASE, &[kip848, (var, "1000")]).unwrap_err().to_string();
            assert!(e.contains(key) && e.contains("group.protocol") && e.contains("test.toml"), "{e}");
            load(BASE, &[(var, "1000")]).expect("the classic protocol takes it");
        }
        let e = load(BASE, &[("KDEDUP_KAFKA__CONSUMER__ISOLATION_LEVEL", "read_uncommitted")]).unwrap_err().to_string();
        assert!(e.contains("kafka.consumer.isolation.level") && e.contains("aborted"), "{e}");
    }

    #[test]
    fn the_shared_client_section_is_checked_like_the_consumers() {
        let text = format!("{BASE}\n[kafka.client]\n\"enable.auto.commit\" = true\n");
        let e = load(&text, &[]).unwrap_err().to_string();
        assert!(e.contains("kafka.client.enable.auto.commit"), "{e}");
        let c = load(BASE, &[("KDEDUP_KAFKA__CLIENT__SECURITY_PROTOCOL", "SSL")]).unwrap();
        assert_eq!(c.kafka.client.get("security.protocol").map(String::as_str), Some("SSL"));
    }

    #[test]
    fn redaction_covers_librdkafkas_secret_properties() {
        for k in ["sasl.password", "ssl.key.password", "ssl.keystore.password", "sasl.oauthbearer.client.secret"] {
            assert!(is_secret_property(k), "{k}");
        }
        for k in ["sasl.username", "ssl.ca.location", "security.protocol"] {
            assert!(!is_secret_property(k), "{k}");
        }
    }

    const HTTP: &str = r#"
        [kafka]
        brokers = "127.0.0.1:9092"
        group_id = "g"
        topics = ["orders"]
        [sink]
        kind = "http"
        [sink.http]
        url = "https://api.example.com/v1/customers/{header.customer}/charges"
        [dead_letter]
        topic = "orders.dlq"
    "#;

    fn http(c: &Config) -> &HttpSinkConfig {
        match &c.sink {
            SinkConfig::Http(h) => h,
            other => panic!("not an HTTP sink: {other:?}"),
        }
    }

    #[test]
    fn the_shipped_http_example_is_valid_once_uncommented() {
        let text = include_str!("../config/kdedup.toml");
        let start = text.find("# [sink.http]").expect("the example file carries a commented HTTP sink");
        let sink: String = text[start..]
            .lines()
            .take_while(|l| l.starts_with('#'))
            .filter(|l| !l.starts_with("# #"))
            .map(|l| format!("{}\n", l.strip_prefix("# ").unwrap_or(l)))
            .collect();
        let base = HTTP.split("[sink]").next().unwrap();
        let c = load(
            &format!("{base}\n[sink]\nkind = \"http\"\n{sink}\n[dead_letter]\ntopic = \"dlq\"\n"),
            &[("API_KEY", "k")],
        );
        let e = c.unwrap_err().to_string();
        // The example names a secret file that does not exist here: everything before it parsed.
        assert!(
            e.contains("sink.http.headers.Authorization.file") && e.contains("/run/secrets/api-authorization"),
            "{e}"
        );
        let without_file: String = sink.lines().filter(|l| !l.contains(".file")).map(|l| format!("{l}\n")).collect();
        let c = load(
            &format!("{base}\n[sink]\nkind = \"http\"\n{without_file}\n[dead_letter]\ntopic = \"dlq\"\n"),
            &[("API_KEY", "k")],
        )
        .unwrap();
        let h = http(&c);
        assert_eq!(h.outcome(409), HttpOutcome::Retry);
        assert_eq!(h.outcome(422), HttpOutcome::Conflict);
        assert_eq!(h.headers.iter().find(|(k, _)| k == "X-Api-Key").map(|(_, v)| v.expose()), Some("k"));
    }

    #[test]
    fn observe_mode_refuses_the_http_sink() {
        let e = load(HTTP, &[("KDEDUP_PIPELINE__MODE", "observe")]).unwrap_err().to_string();
        assert!(e.contains("pipeline.mode") && e.contains("http"), "{e}");
    }

    #[test]
    fn the_http_sink_gets_the_issues_outcome_defaults() {
        let c = load(HTTP, &[]).unwrap();
        let h = http(&c);
        assert_eq!((h.method.as_str(), h.idempotency_header.as_str()), ("POST", "Idempotency-Key"));
        assert_eq!(h.timeout, Duration::from_secs(10));
        assert_eq!(h.max_in_flight.get(), 8);
        for (status, outcome) in [
            (200, HttpOutcome::Done),
            (201, HttpOutcome::Done),
            (409, HttpOutcome::Retry),
            (422, HttpOutcome::Conflict),
            (429, HttpOutcome::Retry),
            (500, HttpOutcome::Retry),
            (503, HttpOutcome::Retry),
            (400, HttpOutcome::DeadLetter),
            (404, HttpOutcome::DeadLetter),
            (301, HttpOutcome::DeadLetter),
        ] {
            assert_eq!(h.outcome(status), outcome, "{status}");
        }
    }

    #[test]
    fn http_outcomes_are_configured_by_code_then_class() {
        let text =
            format!("{HTTP}\n[sink.http.outcomes]\n\"409\" = \"conflict\"\n\"4xx\" = \"retry\"\n\"404\" = \"done\"\n");
        let c = load(&text, &[]).unwrap();
        let h = http(&c);
        assert_eq!(h.outcome(409), HttpOutcome::Conflict);
        assert_eq!(h.outcome(404), HttpOutcome::Done);
        assert_eq!(h.outcome(400), HttpOutcome::Retry, "the class");
        assert_eq!(h.outcome(422), HttpOutcome::Retry, "the class wins over a default");
        assert_eq!(h.outcome(500), HttpOutcome::Retry);
        let bad = load(&format!("{HTTP}\n[sink.http.outcomes]\n\"4xx\" = \"ignore\"\n"), &[]).unwrap_err().to_string();
        assert!(bad.contains("sink.http.outcomes") && bad.contains("dead_letter"), "{bad}");
        let bad = load(&format!("{HTTP}\n[sink.http.outcomes]\n\"700\" = \"done\"\n"), &[]).unwrap_err().to_string();
        assert!(bad.contains("\"700\""), "{bad}");
    }

    #[test]
    fn http_header_secrets_come_from_files_or_the_environment_and_never_show() {
        let dir = tempfile::tempdir().unwrap();
        let key = secret_file(&dir, "stripe", "Bearer sk_live_from_file\n");
        let text = format!(
            "{HTTP}\n[sink.http.headers]\n\"Authorization.file\" = \"{key}\"\n\"X-Api-Key.env\" = \"API_KEY\"\n\"Stripe-Version\" = \"2024-06-20\"\n"
        );
        let c = load(&text, &[("API_KEY", "from-env-secret")]).unwrap();
        let h = http(&c);
        let get = |name: &str| h.headers.iter().find(|(k, _)| k == name).map(|(_, v)| v.expose());
        assert_eq!(get("Authorization"), Some("Bearer sk_live_from_file"));
        assert_eq!(get("X-Api-Key"), Some("from-env-secret"));
        assert_eq!(get("Stripe-Version"), Some("2024-06-20"));
        let shown = format!("{c:?}");
        assert!(!shown.contains("sk_live") && !shown.contains("from-env-secret"), "{shown}");
        let missing = load(&text, &[]).unwrap_err().to_string();
        assert!(missing.contains("API_KEY") && !missing.contains("sk_live"), "{missing}");
    }

    #[test]
    fn http_settings_are_checked_with_the_key_named() {
        for (env, key) in [
            (("KDEDUP_SINK__HTTP__URL", "ftp://x"), "sink.http.url"),
            (("KDEDUP_SINK__HTTP__URL", "https://x/{event}"), "sink.http.url"),
            (("KDEDUP_SINK__HTTP__METHOD", "PO ST"), "sink.http.method"),
            (("KDEDUP_SINK__HTTP__MAX_IN_FLIGHT", "0"), "sink.http.max_in_flight"),
            (("KDEDUP_SINK__HTTP__TIMEOUT_MS", "0"), "sink.http.timeout_ms"),
            (("KDEDUP_SINK__HTTP__RESULTS_TOPIC", "orders"), "sink.http.results_topic"),
        ] {
            let e = load(HTTP, &[env]).unwrap_err().to_string();
            assert!(e.contains(key), "{env:?}: {e}");
        }
        let no_section = HTTP.replace("[sink.http]", "").replace("url = ", "# url = ");
        let e = load(&no_section, &[]).unwrap_err().to_string();
        assert!(e.contains("sink.http") && e.contains("url"), "{e}");
    }
}
