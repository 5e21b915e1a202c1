//! Error enums, one per stage. Each says what failed and what to check, and
//! `is_retriable()` decides between retry-with-backoff (the record waits, the
//! partition pauses) and giving up on that record (dead-letter, with reason).

use std::path::PathBuf;

use rdkafka::error::{KafkaError, RDKafkaErrorCode};

/// Loading or validating the configuration. Never retriable: fix the file.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config file {path}: {source}")]
    Read {
        /// The file asked for.
        path: PathBuf,
        /// Why the operating system refused it.
        source: std::io::Error,
    },
    /// The file is not TOML of the expected shape (unknown field, wrong type).
    #[error("config file {path} is not valid: {message}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// The TOML parser's message, with the line.
        message: String,
    },
    /// A value parsed but is not allowed (out of range, inconsistent with another).
    #[error("config {origin}: `{key}` {message}")]
    Invalid {
        /// Where the value came from: the file or the `KDEDUP_…` variable.
        origin: String,
        /// The dotted name of the setting, e.g. `sink.http.url`.
        key: String,
        /// What is wrong and what is allowed.
        message: String,
    },
}

/// Why a record cannot be handled at all. These never stop a partition: the
/// record is dead-lettered with `reason()` in its headers.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum RecordError {
    /// The configured header, key or JSON pointer is absent or empty; names which.
    #[error("record has no event ID: {0}")]
    MissingId(String),
    /// `[key] source = "json"` and the payload does not parse; the parser's message.
    #[error("payload is not valid JSON: {0}")]
    InvalidJson(String),
    /// The event ID is longer than `[key] max_bytes` and `on_oversize = "dead_letter"`.
    #[error("event ID is {len} bytes, over the {max}-byte limit")]
    OversizeId {
        /// The ID's length in bytes.
        len: usize,
        /// `[key] max_bytes`.
        max: usize,
    },
    /// The key was claimed first with another payload fingerprint.
    #[error("event ID reused with a different payload (fingerprint {stored} was stored first, by {first})")]
    Conflict {
        /// The first claim's fingerprint, hex.
        stored: String,
        /// Where and when the first claim was made (`topic/partition/offset, claimed at <time>`).
        first: String,
    },
    /// The sink refused the record for good (a permanent [`SinkError`]); its message.
    #[error("sink rejected the record: {0}")]
    SinkRejected(String),
    /// A header name is not UTF-8, so it cannot be passed on as it came; the description.
    #[error("record headers cannot be passed on as they came: {0}")]
    BadHeader(String),
}

impl RecordError {
    /// Stable, machine-readable reason code carried in the `kdedup-reason` header.
    pub fn reason(&self) -> &'static str {
        match self {
            RecordError::MissingId(_) => "missing_id",
            RecordError::InvalidJson(_) => "invalid_json",
            RecordError::OversizeId { .. } => "oversize_id",
            RecordError::Conflict { .. } => "conflict",
            RecordError::SinkRejected(_) => "sink_rejected",
            RecordError::BadHeader(_) => "bad_header",
        }
    }
}

/// A store call failed. Retriable errors pause the partition until the store
/// answers again; no offset moves meanwhile.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// The embedded (fjall) store failed on disk.
    #[error("embedded store at {path} failed: {message}; check disk space and permissions")]
    Embedded {
        /// The store's directory.
        path: String,
        /// The engine's message.
        message: String,
    },
    /// Another process has the embedded store open (it is for one process at a time).
    #[error("another kdedup process holds {path} (the embedded store serves one process: stop that one, or give this one its own [store] path)")]
    Locked {
        /// The store's directory.
        path: String,
    },
    /// A stored row does not decode; what was wrong with it.
    #[error("store row for a key is corrupt ({0}); run `kdedup forget` on the key or restore the store")]
    Corrupt(String),
    /// The blocking task that ran the store call was cancelled or panicked.
    #[error("store task was cancelled or panicked: {0}")]
    Task(String),
    /// A PostgreSQL call failed.
    #[error("PostgreSQL store: {message}; check [store] url and that the server is up")]
    Postgres {
        /// The driver's or server's message.
        message: String,
        /// Whether waiting can help (connection lost, serialization failure).
        retriable: bool,
    },
    /// A ScyllaDB call failed.
    #[error("ScyllaDB store: {message}; check [store] contact_points, local_datacenter and that the nodes are up")]
    Scylla {
        /// The driver's message.
        message: String,
        /// Whether waiting can help (timeouts, unavailable replicas).
        retriable: bool,
    },
    /// The store settings cannot work (a bad URL, a schema that does not match).
    #[error("store configuration: {0}")]
    Config(String),
}

impl StoreError {
    /// Whether waiting can help. The pipeline repeats a failed call with backoff either
    /// way, its partition paused (no record is skipped); a non-retriable error is logged
    /// as needing an operator.
    pub fn is_retriable(&self) -> bool {
        match self {
            // Disk errors on a local store are usually not transient, but retrying keeps
            // the partition paused (and offsets unmoved) instead of losing records;
            // an operator sees the error in logs and on /readyz.
            StoreError::Embedded { .. } | StoreError::Task(_) => true,
            StoreError::Postgres { retriable, .. } | StoreError::Scylla { retriable, .. } => *retriable,
            StoreError::Corrupt(_) | StoreError::Config(_) | StoreError::Locked { .. } => false,
        }
    }
}

/// The side effect failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SinkError {
    /// Producing to the output topic failed.
    #[error("producing to topic {topic} failed: {source}")]
    Kafka {
        /// The output topic.
        topic: String,
        /// librdkafka's error.
        source: KafkaError,
    },
    /// Writing to standard output failed.
    #[error("writing to stdout failed: {0}")]
    Stdout(#[from] std::io::Error),
    /// The HTTP sink retried the endpoint already (its retry budget): retriable
    /// here only when the answer could not be written to its results topic.
    #[error("HTTP sink: {0}")]
    Http(#[from] HttpError),
    /// A library user's own effect failed; see [`SinkError::retriable`] and [`SinkError::permanent`].
    #[error("{message}")]
    Custom {
        /// What failed; the dead letter's reason when not retriable.
        message: String,
        /// Whether kdedup should call again after a backoff.
        retriable: bool,
    },
}

impl SinkError {
    /// A failure worth waiting out (the service is down, a lock timed out):
    /// kdedup calls again for the record after a backoff, its partition waiting.
    pub fn retriable(message: impl Into<String>) -> SinkError {
        SinkError::Custom { message: message.into(), retriable: true }
    }

    /// A failure no retry fixes (the record is invalid for this effect): the
    /// claim is released and the record dead-lettered with `message` as its reason.
    pub fn permanent(message: impl Into<String>) -> SinkError {
        SinkError::Custom { message: message.into(), retriable: false }
    }
}

impl SinkError {
    /// Retriable failures are retried with backoff while the partition waits;
    /// the others dead-letter the record (with its claim released).
    pub fn is_retriable(&self) -> bool {
        if self.is_fatal() {
            return false;
        }
        match self {
            SinkError::Kafka { source, .. } => !matches!(
                source.rdkafka_error_code(),
                Some(
                    RDKafkaErrorCode::MessageSizeTooLarge
                        | RDKafkaErrorCode::InvalidMessage
                        | RDKafkaErrorCode::InvalidRecord
                        | RDKafkaErrorCode::TopicAuthorizationFailed
                        | RDKafkaErrorCode::InvalidMessageSize
                )
            ),
            SinkError::Stdout(_) => true,
            SinkError::Http(e) => e.is_retriable(),
            SinkError::Custom { retriable, .. } => *retriable,
        }
    }

    /// Whether the effect may have been applied although it failed (an HTTP
    /// attempt that timed out, broke after it was sent, or was answered 5xx):
    /// its claim is then kept, not released, so the next copy of the event is a
    /// takeover, marked `kdedup-possible-repeat`.
    pub fn may_have_landed(&self) -> bool {
        match self {
            SinkError::Http(e) => e.may_have_landed(),
            SinkError::Kafka { .. } | SinkError::Stdout(_) | SinkError::Custom { .. } => false,
        }
    }

    /// The `kind` label of `kdedup_sink_errors_total`: `fatal` (kdedup stops),
    /// `retriable` (retried with backoff) or `rejected` (not retriable).
    pub fn kind(&self) -> &'static str {
        if self.is_fatal() {
            "fatal"
        } else if self.is_retriable() {
            "retriable"
        } else {
            "rejected"
        }
    }

    /// The record is too large for the producer or the topic (it may fit truncated).
    pub fn is_size_refusal(&self) -> bool {
        match self {
            SinkError::Kafka { source, .. } => matches!(
                source.rdkafka_error_code(),
                Some(RDKafkaErrorCode::MessageSizeTooLarge | RDKafkaErrorCode::InvalidMessageSize)
            ),
            SinkError::Stdout(_) | SinkError::Http(_) | SinkError::Custom { .. } => false,
        }
    }

    /// The producer itself is broken (librdkafka's fatal errors: the idempotent
    /// producer's sequence cannot be recovered): no retry on this producer helps.
    pub fn is_fatal(&self) -> bool {
        match self {
            SinkError::Kafka { source, .. } => source.rdkafka_error_code() == Some(RDKafkaErrorCode::Fatal),
            SinkError::Stdout(_) | SinkError::Http(_) | SinkError::Custom { .. } => false,
        }
    }
}

/// Talking to Kafka as a consumer failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SourceError {
    /// librdkafka refused the consumer's settings.
    #[error("cannot create the Kafka consumer (check [kafka] brokers and [kafka.consumer]): {0}")]
    Create(KafkaError),
    /// TLS or SASL failed: the settings are wrong, waiting will not help.
    #[error("{0} (check security.protocol, ssl.* and sasl.* in [kafka.client] / [kafka.consumer])")]
    Connect(ProbeError),
    /// The subscription was refused.
    #[error("cannot subscribe to {topics:?}: {source}")]
    Subscribe {
        /// `[kafka] topics`.
        topics: Vec<String>,
        /// librdkafka's error.
        source: KafkaError,
    },
    /// The operating system would not start the thread that polls the consumer.
    #[error("cannot start the consumer thread: {0}")]
    Thread(std::io::Error),
}

/// Why the HTTP sink gave up on a record; the record is dead-lettered with this as its reason.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum HttpError {
    /// The URL template or a header value cannot make a valid request for this record.
    #[error("cannot build the request: {0}")]
    Request(String),
    /// The answer's outcome is `conflict` (422 by default).
    #[error("HTTP {status}: the endpoint reports a conflict (key reused with other parameters); body: {excerpt:?}{}", kept(*may_have_landed))]
    Conflict {
        /// The HTTP status.
        status: u16,
        /// The start of the body (bounded), lossily decoded.
        excerpt: String,
        /// An earlier attempt may have been applied (see [`HttpError::may_have_landed`]).
        may_have_landed: bool,
    },
    /// The answer's outcome is `dead_letter` (4xx other than 409, 422 and 429 by default).
    #[error("HTTP {status}: refused; body: {excerpt:?}{}", kept(*may_have_landed))]
    Refused {
        /// The HTTP status.
        status: u16,
        /// The start of the body (bounded), lossily decoded.
        excerpt: String,
        /// An earlier attempt may have been applied (see [`HttpError::may_have_landed`]).
        may_have_landed: bool,
    },
    /// Retries took the whole `retry_budget_ms` (or a `Retry-After` would pass it).
    #[error("gave up after {attempts} attempts in {elapsed_ms} ms (the retry budget): last {last}{}", kept(*may_have_landed))]
    GaveUp {
        /// Requests sent.
        attempts: u32,
        /// Milliseconds from the first request to giving up.
        elapsed_ms: u64,
        /// The last answer or failure, for humans.
        last: String,
        /// An attempt may have been applied (see [`HttpError::may_have_landed`]).
        may_have_landed: bool,
    },
    /// The effect is done, but its answer did not reach `[sink.http] results_topic`:
    /// retried (the same key again; the endpoint answers from its store).
    #[error("the answer could not be written to results topic {topic}: {message}")]
    Results {
        /// `[sink.http] results_topic`.
        topic: String,
        /// The producer's error.
        message: String,
    },
    /// The partition began to stop while the effect waited to retry: retriable, so
    /// the core leaves it unfinished (claim held, offset uncommitted) for the next owner.
    #[error("stopped while waiting to retry after {attempts} attempts (the partition is draining): last {last}")]
    Stopping {
        /// Requests sent.
        attempts: u32,
        /// The last answer or failure, for humans.
        last: String,
    },
}

impl HttpError {
    pub(crate) fn is_retriable(&self) -> bool {
        matches!(self, HttpError::Results { .. } | HttpError::Stopping { .. })
    }

    /// Whether the endpoint may have applied one of the attempts before the
    /// effect was given up: an attempt that timed out, broke after it was sent
    /// (a reset), or was answered 5xx. Such an effect's claim is kept, not
    /// released (it lapses after the lease), so the next copy of the event is a
    /// takeover, sent marked `kdedup-possible-repeat`: never an unmarked
    /// attempt after one that may have landed.
    pub fn may_have_landed(&self) -> bool {
        match self {
            HttpError::Conflict { may_have_landed, .. }
            | HttpError::Refused { may_have_landed, .. }
            | HttpError::GaveUp { may_have_landed, .. } => *may_have_landed,
            HttpError::Request(_) | HttpError::Results { .. } | HttpError::Stopping { .. } => false,
        }
    }
}

/// The words a give-up adds when an attempt may have landed.
fn kept(may_have_landed: bool) -> &'static str {
    if may_have_landed {
        "; an attempt may have been applied: the claim is kept until its lease lapses and the next copy is sent \
         marked kdedup-possible-repeat"
    } else {
        ""
    }
}

/// A probe failed; the message names the brokers and what librdkafka reported.
#[derive(Debug, thiserror::Error)]
#[error("cannot reach Kafka at {brokers}: {cause}")]
pub struct ProbeError {
    /// `[kafka] brokers`, as given.
    pub brokers: String,
    /// librdkafka's error, for a person.
    pub cause: String,
    /// A TLS or SASL failure: retrying with the same settings cannot succeed.
    pub security: bool,
}
