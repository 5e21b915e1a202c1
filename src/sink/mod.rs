//! The sink stage: the side effect, run only for `New` events, and the side
//! topics for records that are not effects.
//!
//! - [`Sink`]: the trait of an effect, public so library users bring their own.
//! - [`AnySink`]: the configured effect, one of [`KafkaSink`] (output topic,
//!   idempotent producer, event ID and source position as headers),
//!   [`HttpSink`] (a request per event with an `Idempotency-Key`, its answer
//!   recorded on the claim row), [`StdoutSink`] (JSON lines) or a
//!   [`CustomSink`] (a library user's).
//! - [`SideTopics`]: the dead-letter topic (reason in headers) and the
//!   optional duplicates topic.
//!
//! Sinks must be idempotent for the event ID: a crash between the effect and
//! its completion runs the effect again on redelivery.

#[cfg(feature = "testkit")]
pub(crate) mod faulty;
pub mod http;
pub mod kafka;
pub mod stdout;

use std::future::Future;
use std::sync::Arc;

use rdkafka::message::{Header, OwnedHeaders};
use sha2::Digest;

pub use http::HttpSink;
pub use kafka::{KafkaSink, KafkaWriter};
pub use stdout::StdoutSink;

use crate::error::{RecordError, SinkError};
use crate::event::{Envelope, Record};
use crate::values::{EffectResponse, OutputMark};
use kafka::{headers, headers_with_source, own_headers, with_source, OutRecord};

/// One effect to run: a new event.
pub struct Effect<'a> {
    /// The record, its event key (scope and ID) and its payload fingerprint.
    pub envelope: &'a Envelope,
    /// The effect may have run before (a resumed claim whose earlier attempt
    /// could not be ruled out): travels as the `kdedup-possible-repeat` header.
    pub possible_repeat: bool,
    /// Observe mode's verdict, stamped on the output; `None` in enforce mode.
    pub observed: Option<Observed>,
    /// The replay job that runs it, if any: travels as the `kdedup-replay` header.
    pub replay: Option<&'a str>,
}

/// What observe mode (`[pipeline] mode = "observe"`) stamps on a forwarded
/// record: `kdedup-duplicate: true|false`, `kdedup-conflict: true` for a
/// conflict, and a duplicate's first occurrence when known
/// (`kdedup-first-topic`, `-partition`, `-offset`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Observed {
    /// The key was done earlier (same fingerprint).
    pub duplicate: bool,
    /// The key was first claimed with another fingerprint.
    pub conflict: bool,
    /// A duplicate's first occurrence, when known.
    pub first: Option<crate::window::Origin>,
}

impl Observed {
    fn stamp(&self, h: OwnedHeaders) -> OwnedHeaders {
        let flag = |b: bool| if b { b"true".as_slice() } else { b"false".as_slice() };
        let mut h = h.insert(Header { key: headers::DUPLICATE, value: Some(flag(self.duplicate)) });
        if self.conflict {
            h = h.insert(Header { key: headers::CONFLICT, value: Some(flag(true)) });
        }
        if let Some(first) = self.first {
            let (partition, offset) = (first.partition.to_string(), first.offset.to_string());
            h = h
                .insert(Header { key: headers::FIRST_TOPIC, value: Some(first.topic.as_bytes()) })
                .insert(Header { key: headers::FIRST_PARTITION, value: Some(partition.as_bytes()) })
                .insert(Header { key: headers::FIRST_OFFSET, value: Some(offset.as_bytes()) });
        }
        h
    }
}

/// One record to dead-letter.
#[derive(Clone, Copy)]
pub struct DeadLetter<'a> {
    /// The record as consumed.
    pub record: &'a Record,
    /// Why it cannot be handled; its reason goes in `kdedup-reason`.
    pub error: &'a RecordError,
    /// An earlier owner of the partition may have dead-lettered it too (it had
    /// reached this record): travels as `kdedup-possible-repeat: true`.
    pub possible_repeat: bool,
}

/// What a delivered effect left behind.
#[derive(Debug, Default)]
pub struct Delivered {
    /// Where it landed in the sink's log, the topic reconciliation reads back on a change
    /// of owner: the output topic (Kafka sink) or the results topic (HTTP sink).
    pub mark: Option<OutputMark>,
    /// What the endpoint answered (the HTTP sink): kept on the claim row.
    pub response: Option<EffectResponse>,
}

impl Delivered {
    /// Done, with nothing to record (most effects).
    pub fn done() -> Delivered {
        Delivered::default()
    }
}

/// A side effect, run only for new events. Implement it to give kdedup your
/// own effect (see `examples/pg_outbox.rs`); the Kafka, HTTP and stdout sinks
/// are implementations too, with nothing private to them.
///
/// The contract:
/// - `deliver` gets a batch of one partition's new events, in offset order,
///   and answers one result per event, in the same order (another count is a
///   bug in the sink: no event of the batch completes, and kdedup stops with an
///   error, so the next run resumes them marked as possible repeats). Batches of one
///   partition never overlap; batches of different partitions may run at once.
/// - `Ok` completes the event's claim (its offset may then be committed).
///   [`SinkError::retriable`] makes kdedup call again for that event after a
///   backoff, the partition waiting meanwhile; [`SinkError::permanent`]
///   releases the claim and dead-letters the record with the error as reason.
/// - Be idempotent for the event ID ([`Effect::envelope`]`.key`): a crash
///   between the effect and its completion runs it again, with
///   [`Effect::possible_repeat`] set. So does a revoke or shutdown that
///   outlasts `[pipeline] drain_timeout_ms`: the `deliver` future is then
///   dropped where it stands, and the partition's next owner repeats it.
///
/// ```
/// use std::sync::Mutex;
/// use kdedup::SinkError;
/// use kdedup::{Delivered, Effect, Sink, Stopping};
///
/// /// Remembers event IDs; refuses empty payloads for good.
/// #[derive(Default)]
/// struct Ledger(Mutex<Vec<Vec<u8>>>);
///
/// impl Sink for Ledger {
///     fn kind(&self) -> &'static str {
///         "ledger"
///     }
///
///     async fn deliver(&self, batch: &[Effect<'_>], _stop: &Stopping) -> Vec<Result<Delivered, SinkError>> {
///         let mut seen = self.0.lock().unwrap();
///         batch
///             .iter()
///             .map(|e| match e.envelope.record.payload.as_deref() {
///                 None | Some([]) => Err(SinkError::permanent("empty payload")),
///                 Some(_) => {
///                     seen.push(e.envelope.key.id.clone());
///                     Ok(Delivered::done())
///                 }
///             })
///             .collect()
///     }
/// }
///
/// // Give it to a run: `RunOptions { sink: Some(CustomSink::new(Ledger::default())), .. }`
/// // with `[sink] kind = "custom"` in the config.
/// let sink = kdedup::CustomSink::new(Ledger::default());
/// assert_eq!(sink.kind(), "ledger");
/// ```
pub trait Sink: Send + Sync + 'static {
    /// A short name for logs and metrics labels: `kafka`, `http`, …
    fn kind(&self) -> &'static str;

    /// Runs the effect of each event; one result per event, in order. `stop`
    /// completes when the partition starts to stop: see [`Stopping`].
    fn deliver(
        &self,
        batch: &[Effect<'_>],
        stop: &Stopping,
    ) -> impl Future<Output = Vec<Result<Delivered, SinkError>>> + Send;
}

type BoxFuture<'a, T> = std::pin::Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// [`Sink`] behind a pointer: its future boxed.
trait DynSink: Send + Sync {
    fn dyn_kind(&self) -> &'static str;
    fn deliver_boxed<'a, 'b: 'a>(
        &'a self,
        batch: &'a [Effect<'b>],
        stop: &'a Stopping,
    ) -> BoxFuture<'a, Vec<Result<Delivered, SinkError>>>;
}

impl<S: Sink> DynSink for S {
    fn dyn_kind(&self) -> &'static str {
        Sink::kind(self)
    }
    fn deliver_boxed<'a, 'b: 'a>(
        &'a self,
        batch: &'a [Effect<'b>],
        stop: &'a Stopping,
    ) -> BoxFuture<'a, Vec<Result<Delivered, SinkError>>> {
        Box::pin(self.deliver(batch, stop))
    }
}

/// The stop signal of the partition (or replay) whose effects a [`Sink::deliver`]
/// runs: [`Stopping::stopped`] completes when it starts to stop (a revoke, a
/// shutdown, a replay interrupted), at once when it already has.
///
/// A sink that waits of its own accord (a backoff, a `Retry-After`) should race the
/// wait against it and, when it completes first, answer [`SinkError::retriable`]:
/// kdedup then leaves the batch unfinished, its claims neither completed nor released
/// and its offsets uncommitted, and the partition's next owner (or the next run)
/// resumes those effects, marked as possible repeats. A request already sent may be
/// let finish: the drain waits for it up to `[pipeline] drain_timeout_ms`.
///
/// ```
/// use std::time::Duration;
/// use kdedup::SinkError;
/// use kdedup::Stopping;
///
/// async fn back_off(wait: Duration, stop: &Stopping) -> Result<(), SinkError> {
///     tokio::select! {
///         _ = tokio::time::sleep(wait) => Ok(()),
///         _ = stop.stopped() => Err(SinkError::retriable("stopping; left to the next owner")),
///     }
/// }
/// ```
#[derive(Debug, Clone)]
pub struct Stopping(Option<tokio::sync::watch::Receiver<bool>>);

impl Stopping {
    /// A signal that never fires: for a sink called outside a run (a test).
    pub fn never() -> Stopping {
        Stopping(None)
    }

    /// Fires once `stop` turns true (or its sender is dropped: the driver is gone).
    pub fn on(stop: tokio::sync::watch::Receiver<bool>) -> Stopping {
        Stopping(Some(stop))
    }

    /// Completes when the partition starts to stop; at once when it already has.
    pub async fn stopped(&self) {
        match &self.0 {
            // A dropped sender means the partition task is gone: stopping too.
            Some(stop) => drop(stop.clone().wait_for(|stopping| *stopping).await),
            None => std::future::pending().await,
        }
    }
}

/// A library user's [`Sink`], for [`crate::service::RunOptions::sink`].
#[derive(Clone)]
pub struct CustomSink(Arc<dyn DynSink>);

impl CustomSink {
    /// Wraps `sink` for [`crate::service::RunOptions::sink`].
    pub fn new(sink: impl Sink) -> CustomSink {
        CustomSink(Arc::new(sink))
    }

    /// The wrapped sink's [`Sink::kind`].
    pub fn kind(&self) -> &'static str {
        self.0.dyn_kind()
    }
}

/// The configured effect: one of kdedup's sinks, or a library user's.
#[non_exhaustive]
pub enum AnySink {
    /// `[sink] kind = "kafka"`.
    Kafka(KafkaSink),
    /// `[sink] kind = "stdout"`.
    Stdout(StdoutSink),
    /// `[sink] kind = "http"`.
    Http(Box<HttpSink>),
    /// `[sink] kind = "custom"`: the caller's own.
    Custom(CustomSink),
    /// Another sink with kdedup's own test hooks around it.
    #[cfg(feature = "testkit")]
    #[doc(hidden)]
    Faulty(Box<faulty::FaultySink>),
}

impl AnySink {
    /// The `sink` label of metrics and logs: the sink's [`Sink::kind`].
    pub fn kind(&self) -> &'static str {
        match self {
            AnySink::Kafka(s) => Sink::kind(s),
            AnySink::Stdout(s) => Sink::kind(s),
            AnySink::Http(s) => Sink::kind(&**s),
            AnySink::Custom(s) => s.kind(),
            #[cfg(feature = "testkit")]
            AnySink::Faulty(s) => s.inner().kind(),
        }
    }

    /// The configured sink itself, without test decorations.
    pub fn undecorated(&self) -> &AnySink {
        match self {
            #[cfg(feature = "testkit")]
            AnySink::Faulty(s) => s.inner().undecorated(),
            _ => self,
        }
    }

    /// Runs the effect for each event, in order; one result per event, with
    /// where it landed in the output topic when the sink is Kafka, and the
    /// endpoint's answer when it is HTTP.
    pub async fn deliver(&self, batch: &[Effect<'_>], stop: &Stopping) -> Vec<Result<Delivered, SinkError>> {
        if batch.is_empty() {
            return Vec::new();
        }
        match self {
            AnySink::Kafka(s) => Sink::deliver(s, batch, stop).await,
            AnySink::Stdout(s) => Sink::deliver(s, batch, stop).await,
            AnySink::Http(s) => Sink::deliver(&**s, batch, stop).await,
            AnySink::Custom(s) => s.0.deliver_boxed(batch, stop).await,
            #[cfg(feature = "testkit")]
            AnySink::Faulty(s) => s.deliver(batch, stop).await,
        }
    }
}

/// How much of a payload (and of a key) a truncated dead letter keeps.
pub const TRUNCATED_PAYLOAD_BYTES: usize = 64 * 1024;

/// What a write was made for: a digest of the event ID (outputs, results) or
/// of the payload (dead letters), compared with the record now at its position.
pub type Identity = u128;

/// The identity of an output or a result written for event `id`.
pub fn event_identity(id: &[u8]) -> Identity {
    xxhash_rust::xxh3::xxh3_128(id)
}

/// Whether a dead letter with identity `found` was written for a record with this payload:
/// whole, or cut to [`TRUNCATED_PAYLOAD_BYTES`] (a truncated dead letter).
pub fn is_dead_letter_of(found: Identity, payload: Option<&[u8]>) -> bool {
    let payload = payload.unwrap_or_default();
    let cut = &payload[..payload.len().min(TRUNCATED_PAYLOAD_BYTES)];
    xxhash_rust::xxh3::xxh3_128(payload) == found || xxhash_rust::xxh3::xxh3_128(cut) == found
}

/// How much of the record's own headers (names and values) a truncated dead
/// letter keeps: the headers that fit, in order; only those that do not are dropped.
pub const TRUNCATED_HEADER_BYTES: usize = 16 * 1024;

fn mark(h: OwnedHeaders, possible_repeat: bool, replay: Option<&str>) -> OwnedHeaders {
    let h = if possible_repeat {
        h.insert(Header { key: headers::POSSIBLE_REPEAT, value: Some(b"true".as_slice()) })
    } else {
        h
    };
    match replay {
        Some(job) => h.insert(Header { key: headers::REPLAY, value: Some(job.as_bytes()) }),
        None => h,
    }
}

fn truncated(bytes: &[u8]) -> &[u8] {
    &bytes[..bytes.len().min(TRUNCATED_PAYLOAD_BYTES)]
}

/// Where records go that are not effects.
#[derive(Clone)]
pub struct SideTopics {
    /// The producer the side topics are written with.
    pub writer: KafkaWriter,
    /// `[dead_letter] topic`.
    pub dead_letter: String,
    /// Partitions of the dead-letter topic: an input partition's dead letters
    /// all go to one of them, so the next owner can find them (reconciliation).
    pub dead_letter_partitions: i32,
    /// `[duplicates] topic`, when set.
    pub duplicates: Option<String>,
    /// The pipeline's dedup scope, written as `kdedup-scope` on dead letters
    /// and duplicates: reconciliation takes only its own scope's writes.
    pub scope: Arc<str>,
    /// A replay's job, written as `kdedup-replay` on its dead letters (`None` for `kdedup run`).
    pub replay: Option<Arc<str>>,
}

impl SideTopics {
    /// The dead-letter partition an input partition writes to.
    pub fn dead_letter_partition(&self, input_partition: i32) -> i32 {
        input_partition.rem_euclid(self.dead_letter_partitions.max(1))
    }

    /// Dead-letters records with their reasons; one result per record, with where it landed.
    ///
    /// A record the dead-letter topic refuses for its size (larger than the
    /// producer's `message.max.bytes` or the topic's limit, with kdedup's
    /// headers added) is written again truncated, so it is never lost in
    /// silence: kdedup's headers and the reason, the first
    /// [`TRUNCATED_PAYLOAD_BYTES`] of the payload and of the key, the record's
    /// own headers that fit in [`TRUNCATED_HEADER_BYTES`], the whole payload's
    /// SHA-256 and length, and how many of its own headers were left out
    /// (`kdedup-truncated: true`). The original stays in the input topic,
    /// at the position the headers name, for as long as its retention keeps it.
    pub async fn dead_letter(&self, records: Vec<DeadLetter<'_>>) -> Vec<Result<OutputMark, SinkError>> {
        let out = records
            .iter()
            .map(|&DeadLetter { record, error, possible_repeat }| {
                let message = error.to_string();
                OutRecord {
                    partition: Some(self.dead_letter_partition(record.position.partition)),
                    source: &record.position,
                    key: record.key.as_deref(),
                    payload: record.payload.as_deref(),
                    headers: mark(
                        headers_with_source(record, &self.scope)
                            .insert(Header { key: headers::REASON, value: Some(error.reason().as_bytes()) })
                            .insert(Header { key: headers::ERROR, value: Some(message.as_bytes()) }),
                        possible_repeat,
                        self.replay.as_deref(),
                    ),
                }
            })
            .collect();
        let mut results = self.writer.write_all(&self.dead_letter, out).await;
        let too_large: Vec<usize> =
            (0..results.len()).filter(|&i| matches!(&results[i], Err(e) if e.is_size_refusal())).collect();
        if too_large.is_empty() {
            return results;
        }
        let digests: Vec<(String, String)> = too_large
            .iter()
            .map(|&i| {
                let payload = records[i].record.payload.as_deref().unwrap_or_default();
                (crate::event::hex(&sha2::Sha256::digest(payload)), payload.len().to_string())
            })
            .collect();
        let truncated: Vec<OutRecord<'_>> = too_large
            .iter()
            .zip(&digests)
            .map(|(&i, (sha256, bytes))| {
                let DeadLetter { record, error, possible_repeat } = records[i];
                let (own, dropped) = own_headers(record, TRUNCATED_HEADER_BYTES);
                OutRecord {
                    partition: Some(self.dead_letter_partition(record.position.partition)),
                    source: &record.position,
                    key: record.key.as_deref().map(truncated),
                    payload: record.payload.as_deref().map(truncated),
                    headers: mark(with_source(own, record, &self.scope), possible_repeat, self.replay.as_deref())
                        .insert(Header { key: headers::REASON, value: Some(error.reason().as_bytes()) })
                        .insert(Header { key: headers::ERROR, value: Some(error.to_string().as_bytes()) })
                        .insert(Header { key: headers::TRUNCATED, value: Some(b"true".as_slice()) })
                        .insert(Header { key: headers::PAYLOAD_SHA256, value: Some(sha256.as_bytes()) })
                        .insert(Header { key: headers::PAYLOAD_BYTES, value: Some(bytes.as_bytes()) })
                        .insert(Header { key: headers::HEADERS_DROPPED, value: Some(dropped.to_string().as_bytes()) }),
                }
            })
            .collect();
        for (i, result) in too_large.into_iter().zip(self.writer.write_all(&self.dead_letter, truncated).await) {
            results[i] = result;
        }
        results
    }

    /// Copies duplicates to the audit topic, when one is configured (else writes nothing).
    pub async fn duplicates(&self, envelopes: Vec<&Envelope>) -> Vec<Result<OutputMark, SinkError>> {
        let Some(topic) = &self.duplicates else {
            return Vec::new();
        };
        let out = envelopes
            .iter()
            .map(|e| OutRecord {
                partition: None,
                source: &e.record.position,
                key: e.record.key.as_deref().or(Some(&e.key.id)),
                payload: e.record.payload.as_deref(),
                headers: headers_with_source(&e.record, &e.key.scope)
                    .insert(Header { key: headers::EVENT_ID, value: Some(e.key.id.as_slice()) }),
            })
            .collect();
        self.writer.write_all(topic, out).await
    }
}
