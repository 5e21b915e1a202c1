//! Kafka outputs: the deduplicated output topic (the effect), and the writer
//! that the dead-letter and duplicates topics share.
//!
//! Records of a batch are enqueued strictly in order (a full local queue is
//! waited out, never skipped), then all deliveries are awaited together: one
//! hand-off to librdkafka per batch, ordering kept by the idempotent producer.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{DeliveryFuture, FutureProducer, FutureRecord, Producer};
use tokio::sync::{oneshot, Notify};

use crate::config::Partitioning;
use crate::error::SinkError;
use crate::event::{Position, Record};
use crate::kafka_client::KafkaClients;
use crate::values::{OutputMark, TopicPartition};

use super::{Delivered, Effect};

/// Header names kdedup adds to what it writes (the contract in `schemas/headers.md`).
pub mod headers {
    /// The event ID, as [`crate::event::EventKey::display_id`] shows it.
    pub const EVENT_ID: &str = "kdedup-event-id";
    /// The pipeline's dedup scope; reconciliation takes only its own scope's writes.
    pub const SCOPE: &str = "kdedup-scope";
    /// The input record's topic.
    pub const SOURCE_TOPIC: &str = "kdedup-source-topic";
    /// The input record's partition (decimal).
    pub const SOURCE_PARTITION: &str = "kdedup-source-partition";
    /// The input record's offset (decimal).
    pub const SOURCE_OFFSET: &str = "kdedup-source-offset";
    /// On a dead letter: the machine-readable reason ([`crate::error::RecordError::reason`]).
    pub const REASON: &str = "kdedup-reason";
    /// On a dead letter: the error, for humans.
    pub const ERROR: &str = "kdedup-error";
    /// `true` when this effect may repeat an earlier one (resumed, taken over, or retried).
    pub const POSSIBLE_REPEAT: &str = "kdedup-possible-repeat";
    /// On a dead letter whose record was too large to copy whole: `true`.
    pub const TRUNCATED: &str = "kdedup-truncated";
    /// The whole original payload's SHA-256 (hex), on a truncated dead letter.
    pub const PAYLOAD_SHA256: &str = "kdedup-payload-sha256";
    /// The whole original payload's length in bytes, on a truncated dead letter.
    pub const PAYLOAD_BYTES: &str = "kdedup-payload-bytes";
    /// How many of the original record's headers a truncated dead letter left out.
    pub const HEADERS_DROPPED: &str = "kdedup-headers-dropped";
    /// Observe mode, on every forwarded record: `true` for a duplicate, else `false`.
    pub const DUPLICATE: &str = "kdedup-duplicate";
    /// Observe mode, on a forwarded conflict (same ID, other content): `true`.
    pub const CONFLICT: &str = "kdedup-conflict";
    /// Observe mode, on a duplicate: where its event first occurred, when known.
    pub const FIRST_TOPIC: &str = "kdedup-first-topic";
    /// Observe mode: the first occurrence's partition (decimal).
    pub const FIRST_PARTITION: &str = "kdedup-first-partition";
    /// Observe mode: the first occurrence's offset (decimal).
    pub const FIRST_OFFSET: &str = "kdedup-first-offset";
    /// The `kdedup replay` job that wrote the record.
    pub const REPLAY: &str = "kdedup-replay";
    /// On an HTTP results record: the outcome (`done`, `conflict`, `dead_letter`, `gave_up`);
    /// reconciliation takes only `done` ones as effects that ran.
    pub const OUTCOME: &str = "kdedup-outcome";

    /// Every name above. An inbound record's own copies of these (a chained
    /// kdedup stage, a dead letter replayed into the input) are dropped from
    /// what kdedup writes, so each name occurs once and means this kdedup's value.
    pub const ALL: [&str; 19] = [
        EVENT_ID,
        SCOPE,
        SOURCE_TOPIC,
        SOURCE_PARTITION,
        SOURCE_OFFSET,
        REASON,
        ERROR,
        POSSIBLE_REPEAT,
        TRUNCATED,
        PAYLOAD_SHA256,
        PAYLOAD_BYTES,
        HEADERS_DROPPED,
        DUPLICATE,
        CONFLICT,
        FIRST_TOPIC,
        FIRST_PARTITION,
        FIRST_OFFSET,
        REPLAY,
        OUTCOME,
    ];

    /// Whether `name` is one of kdedup's own header names.
    pub fn is_kdedup(name: &str) -> bool {
        ALL.contains(&name)
    }
}

/// One record to write.
pub struct OutRecord<'a> {
    /// The partition to write; the producer's partitioner when `None`.
    pub partition: Option<i32>,
    /// The input record this write is for: writes are counted per origin
    /// partition ([`KafkaWriter::settled`]).
    pub source: &'a Position,
    /// The Kafka key to write.
    pub key: Option<&'a [u8]>,
    /// The value to write.
    pub payload: Option<&'a [u8]>,
    /// The headers to write.
    pub headers: OwnedHeaders,
}

/// A shared idempotent producer.
#[derive(Clone)]
pub struct KafkaWriter {
    producer: FutureProducer,
    outstanding: Arc<Outstanding>,
}

/// Writes handed to librdkafka whose delivery has not resolved yet, per
/// (topic, partition) written and per origin input partition. A partition
/// task that is abandoned at the drain timeout leaves its writes queued in the
/// producer; they still land, later. Whoever reads a partition back to learn
/// what was written (reconciliation) waits for these first, or a write landing
/// after the read would be made a second time. Counting per origin lets the
/// new owner of one input partition wait for that partition's writes only:
/// other input partitions writing to the same output partition under
/// continuous load never let a shared count reach zero.
/// Only writes to an explicit partition are counted: those are the ones read back.
#[derive(Default)]
struct Outstanding {
    counts: Mutex<HashMap<Slot, usize>>,
    resolved: Notify,
}

/// (topic written, partition written, origin input partition).
type Slot = (String, i32, TopicPartition);

/// Within one `write_all` (one topic): (partition written, origin) -> writes.
type Slots = HashMap<(i32, TopicPartition), usize>;

impl Outstanding {
    fn add(&self, topic: &str, slots: &Slots) {
        let mut counts = self.counts.lock().unwrap_or_else(|p| p.into_inner());
        for ((p, origin), &n) in slots {
            *counts.entry((topic.to_string(), *p, origin.clone())).or_default() += n;
        }
    }

    fn remove(&self, topic: &str, slots: &Slots) {
        let mut counts = self.counts.lock().unwrap_or_else(|p| p.into_inner());
        for ((p, origin), &n) in slots {
            let key = (topic.to_string(), *p, origin.clone());
            if let Some(left) = counts.get_mut(&key) {
                *left -= n.min(*left);
                if *left == 0 {
                    counts.remove(&key);
                }
            }
        }
        drop(counts);
        self.resolved.notify_waiters();
    }

    fn any(&self, topic: &str, partition: i32, origin: &TopicPartition) -> bool {
        self.counts.lock().unwrap_or_else(|p| p.into_inner()).contains_key(&(
            topic.to_string(),
            partition,
            origin.clone(),
        ))
    }
}

type Landed = Result<OutputMark, KafkaError>;

/// One `write_all` call's enqueued writes, counted as outstanding from
/// before the first is handed over until all have resolved. Resolving runs
/// in a task of its own: started by `resolve`, or on drop if the caller was
/// cancelled first, so the count is always given back.
struct Deliveries {
    outstanding: Arc<Outstanding>,
    topic: String,
    slots: Slots,
    pending: Vec<Result<DeliveryFuture, KafkaError>>,
    started: bool,
}

impl Deliveries {
    fn new(outstanding: Arc<Outstanding>, topic: &str, records: &[OutRecord<'_>]) -> Deliveries {
        let mut slots = Slots::new();
        for r in records {
            if let Some(p) = r.partition {
                *slots.entry((p, (r.source.topic.clone(), r.source.partition))).or_default() += 1;
            }
        }
        outstanding.add(topic, &slots);
        Deliveries {
            outstanding,
            topic: topic.to_string(),
            slots,
            pending: Vec::with_capacity(records.len()),
            started: false,
        }
    }

    fn resolve(mut self) -> oneshot::Receiver<Vec<Landed>> {
        self.start()
    }

    fn start(&mut self) -> oneshot::Receiver<Vec<Landed>> {
        self.started = true;
        let (tx, rx) = oneshot::channel();
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            // No runtime left (shutting down): nobody will read these logs back here.
            self.outstanding.remove(&self.topic, &self.slots);
            return rx;
        };
        let (outstanding, topic, slots, pending) = (
            self.outstanding.clone(),
            std::mem::take(&mut self.topic),
            std::mem::take(&mut self.slots),
            std::mem::take(&mut self.pending),
        );
        runtime.spawn(async move {
            let mut results = Vec::with_capacity(pending.len());
            for p in pending {
                results.push(match p {
                    Ok(delivery) => match delivery.await {
                        Ok(Ok(d)) => Ok(OutputMark { partition: d.partition, offset: d.offset }),
                        Ok(Err((source, _))) => Err(source),
                        Err(_) => Err(KafkaError::Canceled),
                    },
                    Err(source) => Err(source),
                });
            }
            outstanding.remove(&topic, &slots);
            let _ = tx.send(results);
        });
        rx
    }
}

impl Drop for Deliveries {
    fn drop(&mut self) {
        if !self.started {
            // Cancelled before `resolve`: resolve anyway, for the count; nobody awaits the results.
            drop(self.start());
        }
    }
}

impl KafkaWriter {
    /// The output producer, built in [`crate::kafka_client`] (`[kafka.client]`, then `[kafka.producer]`).
    pub fn new(clients: &KafkaClients) -> Result<KafkaWriter, KafkaError> {
        Ok(KafkaWriter { producer: clients.producer().create()?, outstanding: Arc::default() })
    }

    /// Partition count of `topic`, from broker metadata.
    pub fn partition_count(&self, topic: &str, timeout: Duration) -> Result<i32, KafkaError> {
        let md = self.producer.client().fetch_metadata(Some(topic), timeout)?;
        let t = md.topics().iter().find(|t| t.name() == topic);
        match t {
            Some(t) if t.error().is_none() && !t.partitions().is_empty() => Ok(t.partitions().len() as i32),
            _ => Err(KafkaError::MetadataFetch(RDKafkaErrorCode::UnknownTopicOrPartition)),
        }
    }

    /// Writes records to `topic` in order; one result per record, in order:
    /// where it landed. Deliveries are awaited by a task of their own, so a
    /// caller cancelled at any await point leaves its writes counted as
    /// outstanding until they resolve.
    pub async fn write_all(&self, topic: &str, records: Vec<OutRecord<'_>>) -> Vec<Result<OutputMark, SinkError>> {
        let n = records.len();
        let mut deliveries = Deliveries::new(self.outstanding.clone(), topic, &records);
        for r in records {
            let mut record: FutureRecord<'_, [u8], [u8]> = FutureRecord::to(topic).headers(r.headers);
            if let Some(k) = r.key {
                record = record.key(k);
            }
            if let Some(p) = r.payload {
                record = record.payload(p);
            }
            if let Some(p) = r.partition {
                record = record.partition(p);
            }
            loop {
                match self.producer.send_result(record) {
                    Ok(delivery) => {
                        deliveries.pending.push(Ok(delivery));
                        break;
                    }
                    Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back)) => {
                        // librdkafka's local queue is full: wait for deliveries to drain it.
                        record = back;
                        tokio::time::sleep(Duration::from_millis(2)).await;
                    }
                    Err((source, _)) => {
                        deliveries.pending.push(Err(source));
                        break;
                    }
                }
            }
        }
        let results =
            deliveries.resolve().await.unwrap_or_else(|_| (0..n).map(|_| Err(KafkaError::Canceled)).collect());
        results.into_iter().map(|r| r.map_err(|source| SinkError::Kafka { topic: topic.to_string(), source })).collect()
    }

    /// Waits until every write this process made to `topic`/`partition` for
    /// records of input partition `origin` has resolved (landed or failed for
    /// good), so reading it back sees them all. Writes for other input
    /// partitions are not waited for: they may go on forever.
    pub async fn settled(&self, topic: &str, partition: i32, origin: &TopicPartition) {
        loop {
            let resolved = self.outstanding.resolved.notified();
            tokio::pin!(resolved);
            resolved.as_mut().enable();
            if !self.outstanding.any(topic, partition, origin) {
                return;
            }
            resolved.await;
        }
    }

    /// Waits until everything enqueued is delivered (shutdown).
    pub fn flush(&self, timeout: Duration) -> Result<(), KafkaError> {
        self.producer.flush(timeout)
    }
}

/// Copies a record's own headers, except inbound copies of kdedup's own names
/// ([`headers::ALL`]), and adds kdedup's position and scope headers.
pub fn headers_with_source(record: &Record, scope: &str) -> OwnedHeaders {
    with_source(own_headers(record, usize::MAX).0, record, scope)
}

/// The record's own headers as [`headers_with_source`] copies them, in order,
/// each one taken while its name and value fit in what is left of `budget`
/// bytes; and how many were left out.
pub fn own_headers(record: &Record, budget: usize) -> (OwnedHeaders, usize) {
    let mut h = OwnedHeaders::new_with_capacity(record.headers.len() + 12);
    let (mut left, mut dropped) = (budget, 0);
    for (k, v) in record.headers.iter().filter(|(k, _)| !headers::is_kdedup(k)) {
        let size = k.len() + v.as_ref().map_or(0, Vec::len);
        if size > left {
            dropped += 1;
            continue;
        }
        left -= size;
        h = h.insert(Header { key: k, value: v.as_deref() });
    }
    (h, dropped)
}

/// kdedup's position and scope headers alone, without the record's own.
pub fn source_headers(record: &Record, scope: &str) -> OwnedHeaders {
    with_source(OwnedHeaders::new_with_capacity(8), record, scope)
}

pub(crate) fn with_source(h: OwnedHeaders, record: &Record, scope: &str) -> OwnedHeaders {
    let p = &record.position;
    h.insert(Header { key: headers::SOURCE_TOPIC, value: Some(p.topic.as_bytes()) })
        .insert(Header { key: headers::SOURCE_PARTITION, value: Some(p.partition.to_string().as_bytes()) })
        .insert(Header { key: headers::SOURCE_OFFSET, value: Some(p.offset.to_string().as_bytes()) })
        .insert(Header { key: headers::SCOPE, value: Some(scope.as_bytes()) })
}

/// The output topic: the deduplicated stream.
pub struct KafkaSink {
    writer: KafkaWriter,
    topic: Arc<str>,
    partitioning: Partitioning,
    partitions: i32,
}

impl KafkaSink {
    /// A sink producing to `topic` (which must exist: its partition count is read here).
    pub fn new(writer: KafkaWriter, topic: &str, partitioning: Partitioning) -> Result<KafkaSink, SinkError> {
        let partitions = writer
            .partition_count(topic, Duration::from_secs(10))
            .map_err(|source| SinkError::Kafka { topic: topic.to_string(), source })?;
        Ok(KafkaSink { writer, topic: Arc::from(topic), partitioning, partitions })
    }

    /// The output partition an input partition's effects go to, when fixed
    /// (`partitioning = "source"`); `None` when the key decides.
    pub fn output_partition(&self, input_partition: i32) -> Option<i32> {
        match self.partitioning {
            Partitioning::Source => Some(input_partition.rem_euclid(self.partitions)),
            Partitioning::Key => None,
        }
    }

    /// The output topic.
    pub fn topic(&self) -> &str {
        &self.topic
    }
}

impl super::Sink for KafkaSink {
    fn kind(&self) -> &'static str {
        "kafka"
    }

    async fn deliver(&self, batch: &[Effect<'_>], _stop: &super::Stopping) -> Vec<Result<Delivered, SinkError>> {
        let out = batch
            .iter()
            .map(|Effect { envelope: e, possible_repeat, observed, replay }| {
                let mut h = headers_with_source(&e.record, &e.key.scope)
                    .insert(Header { key: headers::EVENT_ID, value: Some(e.key.id.as_slice()) });
                if *possible_repeat {
                    h = h.insert(Header { key: headers::POSSIBLE_REPEAT, value: Some(b"true".as_slice()) });
                }
                if let Some(o) = observed {
                    h = o.stamp(h);
                }
                if let Some(job) = replay {
                    h = h.insert(Header { key: headers::REPLAY, value: Some(job.as_bytes()) });
                }
                OutRecord {
                    partition: self.output_partition(e.record.position.partition),
                    source: &e.record.position,
                    key: e.record.key.as_deref().or(Some(&e.key.id)),
                    payload: e.record.payload.as_deref(),
                    headers: h,
                }
            })
            .collect();
        let written = self.writer.write_all(&self.topic, out).await;
        written.into_iter().map(|r| r.map(|mark| Delivered { mark: Some(mark), response: None })).collect()
    }
}

#[cfg(test)]
mod tests {
    use futures::FutureExt;

    use super::*;
    use crate::mock::MockKafka;

    fn position(partition: i32, offset: i64) -> Position {
        Position { topic: Arc::from("in"), partition, offset }
    }

    fn record(source: &Position) -> OutRecord<'_> {
        OutRecord { partition: Some(0), source, key: None, payload: Some(b"x"), headers: OwnedHeaders::new() }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn settling_one_origin_does_not_wait_for_other_origins_writing_the_same_partition() {
        let kafka = MockKafka::start(1).unwrap();
        kafka.create_topic("out", 1).unwrap();
        let writer = KafkaWriter::new(&KafkaClients::from(kafka.bootstrap())).unwrap();
        let (mine, other) = ((Arc::from("in"), 0), (Arc::from("in"), 1));

        // Input partition 1 keeps writing to out/0: one write of it is always
        // outstanding (held here), and real ones go on in the background.
        let held: Slots = [((0, other.clone()), 1)].into();
        writer.outstanding.add("out", &held);
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let load = tokio::spawn({
            let (writer, stop) = (writer.clone(), stop.clone());
            async move {
                let mut offset = 0;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let sources: Vec<Position> = (offset..offset + 20).map(|o| position(1, o)).collect();
                    for r in writer.write_all("out", sources.iter().map(record).collect()).await {
                        r.expect("load write lands");
                    }
                    offset += 20;
                }
                offset
            }
        });

        // Input partition 0's own writes land; settling it returns while 1 still writes.
        let sources = [position(0, 0), position(0, 1)];
        for r in writer.write_all("out", sources.iter().map(record).collect()).await {
            r.expect("write lands");
        }
        tokio::time::timeout(Duration::from_secs(10), writer.settled("out", 0, &mine))
            .await
            .expect("settling input partition 0 does not wait for input partition 1's writes");

        // Input partition 1 itself is not settled while its write is outstanding...
        assert!(writer.settled("out", 0, &other).now_or_never().is_none(), "an outstanding write is waited for");
        // ...and is once it resolves.
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        assert!(load.await.unwrap() > 0, "the other partition wrote meanwhile");
        writer.outstanding.remove("out", &held);
        tokio::time::timeout(Duration::from_secs(10), writer.settled("out", 0, &other))
            .await
            .expect("settled once its writes resolved");
    }

    #[test]
    fn inbound_copies_of_kdedup_headers_are_dropped_and_others_kept() {
        use rdkafka::message::Headers;
        let record = Record {
            position: position(3, 42),
            bad_header: None,
            key: None,
            payload: None,
            headers: vec![
                (headers::SOURCE_TOPIC.into(), Some(b"upstream".to_vec())),
                ("trace-id".into(), Some(b"t".to_vec())),
                (headers::SCOPE.into(), Some(b"upstream-scope".to_vec())),
                (headers::POSSIBLE_REPEAT.into(), Some(b"true".to_vec())),
                ("kdedup-custom".into(), None),
            ],
            timestamp_ms: None,
        };
        let h = headers_with_source(&record, "mine");
        let pairs: Vec<(&str, Option<&[u8]>)> = h.iter().map(|h| (h.key, h.value)).collect();
        assert_eq!(
            pairs,
            [
                ("trace-id", Some(b"t".as_slice())),
                ("kdedup-custom", None),
                (headers::SOURCE_TOPIC, Some(b"in".as_slice())),
                (headers::SOURCE_PARTITION, Some(b"3".as_slice())),
                (headers::SOURCE_OFFSET, Some(b"42".as_slice())),
                (headers::SCOPE, Some(b"mine".as_slice())),
            ]
        );
    }
}
