//! What real producers put on an input topic: batches in every codec from an
//! independent producer (PyPI confluent-kafka, its own librdkafka build), and
//! batches the client cannot decode, hand-built and appended with a raw
//! Produce request (the mock cluster stores a batch as it comes; a real broker
//! validates one and refuses it).

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use kdedup::metrics::Metrics;
use kdedup::mock::{self, Consumed, MockKafka, Produce};
use kdedup::source::StopMode;
use kdedup::testkit::Faults;

use crate::utils::*;

const CODECS: [&str; 5] = ["none", "gzip", "snappy", "lz4", "zstd"];

/// Runs the independent producer: `count` events compressed with `codec`, the first `duplicates` twice.
fn produce_with(python: &str, brokers: &str, topic: &str, codec: &str, count: usize, duplicates: usize) {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/integration/independent_producer.py");
    let out = std::process::Command::new(python)
        .args([script, brokers, topic, codec, &count.to_string(), &duplicates.to_string()])
        .output()
        .expect("the independent producer runs");
    assert!(out.status.success(), "independent producer ({codec}): {}", String::from_utf8_lossy(&out.stderr));
}

/// Every codec, written by the independent producer, read and deduplicated by kdedup:
/// every event emitted exactly once.
async fn every_codec_exactly_once(brokers: &str, topics: [&str; 3]) {
    let Ok(python) = std::env::var("KDEDUP_TEST_PRODUCER_PYTHON") else {
        eprintln!("skipped: KDEDUP_TEST_PRODUCER_PYTHON is not set (scripts/services up installs confluent-kafka; env prints it)");
        return;
    };
    let mut ids = Vec::new();
    for codec in CODECS {
        let (brokers, topic, python) = (brokers.to_string(), topics[0].to_string(), python.clone());
        tokio::task::spawn_blocking(move || produce_with(&python, &brokers, &topic, codec, 200, 40)).await.unwrap();
        ids.extend((0..200).map(|i| format!("{codec}-{i}")));
    }
    let dir = tempfile::tempdir().unwrap();
    let running = start(config_for(brokers, topics, &unique("codecs"), dir.path(), &[]), Faults::default());
    let read = || {
        let (brokers, output) = (brokers.to_string(), topics[1].to_string());
        tokio::task::block_in_place(move || mock::read_all(brokers.as_str(), &output).unwrap())
    };
    let wanted = ids.len();
    wait_for("every event of every codec to be emitted", Duration::from_secs(120), || {
        let emitted = emitted_counts(&read()).len();
        async move { emitted >= wanted }
    })
    .await;
    let metrics = running.metrics.clone();
    running.stop(StopMode::Drain).await;
    assert_exactly_once(&read(), &ids);
    assert_eq!(metrics.outcome("duplicate"), 5 * 40, "each codec's duplicates were caught");
    assert_eq!(metrics.partition_errors.with_label_values(&[topics[0], "decode"]).get(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_codec_from_an_independent_producer_is_emitted_exactly_once() {
    let kafka = cluster(2);
    every_codec_exactly_once(kafka.bootstrap(), [INPUT, OUTPUT, DLQ]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_codec_from_an_independent_producer_is_emitted_exactly_once_on_the_test_broker() {
    let Ok(brokers) = std::env::var("KDEDUP_TEST_BROKER") else {
        eprintln!("skipped: KDEDUP_TEST_BROKER is not set");
        return;
    };
    let (input, output, dlq) = (unique("in"), unique("out"), unique("dlq"));
    mock::create_topics(brokers.as_str(), &[(&input, 2), (&output, 2), (&dlq, 1)]).await.unwrap();
    every_codec_exactly_once(&brokers, [&input, &output, &dlq]).await;
}

/// Appends one hand-built record batch (v2) to `topic`/`partition` with a raw
/// Produce request (v3) to `broker` (the partition's leader); returns its base
/// offset, or the broker's error code when it refuses the batch.
/// `attributes`: the batch's (its low bits name the codec); `records`: the count
/// its header claims; `body`: the bytes after the header, as they are; `crc`: as given.
fn append_raw_batch(
    broker: &str,
    topic: &str,
    partition: i32,
    attributes: i16,
    records: i32,
    body: &[u8],
    crc: u32,
) -> Result<i64, i16> {
    let now = kdedup::store::now_ms() as i64;
    let mut batch = Vec::new();
    batch.extend(0i64.to_be_bytes()); // base offset: the broker assigns it
    batch.extend((49 + body.len() as i32).to_be_bytes()); // length after this field
    batch.extend((-1i32).to_be_bytes()); // partition leader epoch
    batch.push(2); // magic
    batch.extend(crc.to_be_bytes());
    batch.extend(attributes.to_be_bytes());
    batch.extend((records - 1).to_be_bytes()); // last offset delta
    batch.extend(now.to_be_bytes());
    batch.extend(now.to_be_bytes());
    batch.extend((-1i64).to_be_bytes()); // producer ID
    batch.extend((-1i16).to_be_bytes()); // producer epoch
    batch.extend((-1i32).to_be_bytes()); // base sequence
    batch.extend(records.to_be_bytes());
    batch.extend(body);

    let string = |out: &mut Vec<u8>, s: &str| {
        out.extend((s.len() as i16).to_be_bytes());
        out.extend(s.as_bytes());
    };
    let mut request = Vec::new();
    request.extend(0i16.to_be_bytes()); // Produce
    request.extend(3i16.to_be_bytes()); // v3
    request.extend(7i32.to_be_bytes()); // correlation ID
    string(&mut request, "kdedup-test");
    request.extend((-1i16).to_be_bytes()); // no transactional ID
    request.extend((-1i16).to_be_bytes()); // acks = all
    request.extend(10_000i32.to_be_bytes());
    request.extend(1i32.to_be_bytes());
    string(&mut request, topic);
    request.extend(1i32.to_be_bytes());
    request.extend(partition.to_be_bytes());
    request.extend((batch.len() as i32).to_be_bytes());
    request.extend(&batch);

    let mut socket = TcpStream::connect(broker).expect("the broker listens on loopback");
    socket.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    socket.write_all(&(request.len() as i32).to_be_bytes()).unwrap();
    socket.write_all(&request).unwrap();
    let mut size = [0u8; 4];
    socket.read_exact(&mut size).unwrap();
    let mut response = vec![0u8; i32::from_be_bytes(size) as usize];
    socket.read_exact(&mut response).unwrap();
    // correlation ID, topics (1), name, partitions (1), index, error code, base offset
    let at = 4 + 4 + 2 + topic.len() + 4 + 4;
    match i16::from_be_bytes([response[at], response[at + 1]]) {
        0 => Ok(i64::from_be_bytes(response[at + 2..at + 10].try_into().unwrap())),
        error => Err(error),
    }
}

fn event(id: &str) -> Produce {
    Produce {
        partition: 0,
        key: None,
        payload: Some(format!(r#"{{"id":"{id}"}}"#).into_bytes()),
        headers: vec![("event-id".into(), id.as_bytes().to_vec())],
    }
}

/// Not ready, with this one partition stalled.
fn stalled(metrics: &Metrics, input: &str) -> bool {
    !metrics.is_ready()
        && metrics.stalled_partitions() == 1
        && metrics.partition_stalled_since.with_label_values(&[input, "0"]).get() > 0
}

/// A bad batch between good ones.
struct BadBatch {
    attributes: i16,
    body: &'static [u8],
    crc: u32,
}

/// A batch whose gzip payload is not gzip: librdkafka cannot decompress it.
const NOT_GZIP: BadBatch = BadBatch { attributes: 1, body: b"this is not a gzip stream at all", crc: 0 };
/// An uncompressed batch with a wrong CRC, read with `check.crcs = true`.
const WRONG_CRC: BadBatch = BadBatch { attributes: 0, body: b"three records that fail their CRC", crc: 0xdead_beef };

/// Five good events, `bad`, five more on partition 0 of `input` at `broker`
/// (a one-broker cluster); then kdedup until the partition stopped at the bad
/// batch: returns the output, the metrics and the bad batch's offset, or `None`
/// when the broker refuses such a batch.
async fn stop_at(
    broker: &str,
    topics: [&str; 3],
    bad: BadBatch,
    stalls: &'static str,
) -> Option<(Vec<Consumed>, Metrics, i64)> {
    let [input, output, _] = topics;
    let first: Vec<Produce> = (0..5).map(|i| event(&format!("before-{i}"))).collect();
    mock::produce_all(broker, input, &first).await.unwrap();
    let offset = match append_raw_batch(broker, input, 0, bad.attributes, 3, bad.body, bad.crc) {
        Ok(offset) => offset,
        Err(code) => {
            eprintln!("skipped: the broker refuses the hand-built batch (error {code})");
            return None;
        }
    };
    let then: Vec<Produce> = (0..5).map(|i| event(&format!("after-{i}"))).collect();
    mock::produce_all(broker, input, &then).await.unwrap();

    let (dir, group) = (tempfile::tempdir().unwrap(), unique("bad-batch"));
    let env = [("KDEDUP_KAFKA__CONSUMER__CHECK_CRCS", "true")];
    let running = start(config_for(broker, topics, &group, dir.path(), &env), Faults::default());
    let m = running.metrics.clone();
    let input_name = input.to_string();
    wait_for(
        "the records before the bad batch committed, and the partition stalled on it",
        Duration::from_secs(60),
        || {
            let (m, input) = (m.clone(), input_name.clone());
            async move {
                m.committed_offset.with_label_values(&[input.as_str(), "0"]).get() == offset
                    && m.partition_errors.with_label_values(&[input.as_str(), stalls]).get() >= 1
                    && stalled(&m, &input)
            }
        },
    )
    .await;
    let read = mock::read_all(broker, output).unwrap();
    running.stop(StopMode::Drain).await;
    let committed = mock::committed_offsets(broker, &group, input).unwrap();
    assert_eq!(committed.get(&0).copied(), Some(offset), "nothing committed past the batch that was not delivered");
    let ids: Vec<String> = (0..5).map(|i| format!("before-{i}")).collect();
    assert_exactly_once(&read, &ids);
    Some((read, m, offset))
}

fn one_broker() -> MockKafka {
    let kafka = MockKafka::start(1).unwrap();
    for topic in [INPUT, OUTPUT, DLQ] {
        kafka.create_topic(topic, 1).unwrap();
    }
    kafka
}

/// librdkafka fetches a batch it cannot decompress again for ever. Failed
/// before: `/readyz` answered ready, no metric moved, only a warning was logged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_that_cannot_be_decompressed_stalls_its_partition_loudly() {
    let kafka = one_broker();
    let broker = kafka.bootstrap().to_string();
    stop_at(&broker, [INPUT, OUTPUT, DLQ], NOT_GZIP, "decode").await.expect("the mock cluster stores any batch");
}

/// The mock cluster answers a fetch with one batch, so librdkafka meets the
/// batch that fails its CRC alone, and fetches it again for ever: a stall, as
/// for a batch it cannot decompress. Failed before: ready, nothing counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_failing_its_crc_stalls_its_partition_loudly() {
    let kafka = one_broker();
    let broker = kafka.bootstrap().to_string();
    stop_at(&broker, [INPUT, OUTPUT, DLQ], WRONG_CRC, "decode").await.expect("the mock cluster stores any batch");
}

/// A refused fetch (an error on the partition's queue) before anything was
/// delivered or committed: the first record that comes after it cannot be
/// shown to be the start, so the partition is read again from the log start
/// (a seek), where it comes without an error and is taken. Every event is
/// emitted once, and the partition is ready again at the end.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_fetch_before_anything_is_known_reads_the_partition_again_from_the_start() {
    let kafka = one_broker();
    let records: Vec<Produce> = (0..10).map(|i| event(&format!("evt-{i}"))).collect();
    mock::produce_all(kafka.bootstrap(), INPUT, &records).await.unwrap();
    kafka.refuse_fetch(&[rdkafka_sys::types::RDKafkaRespErr::RD_KAFKA_RESP_ERR_INVALID_REQUEST]).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let running = start(config(&kafka, &unique("refused"), dir.path(), &[]), Faults::default());
    wait_all_committed(&kafka, &running.metrics).await;
    let m = running.metrics.clone();
    let ready = m.is_ready();
    running.stop(StopMode::Drain).await;

    let ids: Vec<String> = (0..10).map(|i| format!("evt-{i}")).collect();
    assert_exactly_once(&mock::read_all(kafka.bootstrap(), OUTPUT).unwrap(), &ids);
    assert!(m.partition_errors.with_label_values(&[INPUT, "other"]).get() >= 1, "the refused fetch was counted");
    assert_eq!(m.partition_errors.with_label_values(&[INPUT, "skipped"]).get(), 0);
    assert!(ready && m.stalled_partitions() == 0, "ready again once records came in order");
}
