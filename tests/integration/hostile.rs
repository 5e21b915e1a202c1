//! Hostile records through the real binary: `kdedup run` as a child process
//! over librdkafka's mock cluster, with a JSON-pointer key source. Each record
//! is emitted once or dead-lettered once with its reason, the good records
//! after the hostile ones are emitted (the partition kept going), and the
//! group's committed offset reaches the end of the input.
//!
//! The input is produced and checked with this file's own producer, since a
//! header name that is not UTF-8 can only be written through librdkafka's C
//! API (rdkafka's `OwnedHeaders` takes `&str`), and rdkafka's header iteration
//! (which `mock::read_all` uses) panics on one: the input topic is never read
//! back here, only the output and dead-letter topics kdedup wrote.

use std::collections::BTreeMap;
use std::io::Read;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use kdedup::event::hex;
use kdedup::mock::{self, Consumed, MockKafka};
use kdedup::sink::kafka::headers;
use rdkafka::message::{BorrowedHeaders, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::ClientConfig;
use sha2::{Digest, Sha256};

use crate::utils::*;

const BIN: &str = env!("CARGO_BIN_EXE_kdedup");

/// A record to produce; header names are raw bytes.
struct Hostile {
    what: &'static str,
    key: Option<Vec<u8>>,
    payload: Option<Vec<u8>>,
    headers: Vec<(Vec<u8>, Option<Vec<u8>>)>,
    expect: Expect,
}

#[derive(Debug, Clone, PartialEq)]
enum Expect {
    /// Emitted once with this `kdedup-event-id`.
    Emitted(Vec<u8>),
    /// Dead-lettered once with this `kdedup-reason`.
    DeadLettered(String),
}

fn json(what: &'static str, payload: impl Into<Vec<u8>>, expect: Expect) -> Hostile {
    Hostile { what, key: None, payload: Some(payload.into()), headers: Vec::new(), expect }
}

fn dead_lettered(reason: &str) -> Expect {
    Expect::DeadLettered(reason.to_string())
}

fn emitted(id: &str) -> Expect {
    Expect::Emitted(id.as_bytes().to_vec())
}

/// Headers from raw name bytes, through librdkafka's C API.
fn raw_headers(list: &[(Vec<u8>, Option<Vec<u8>>)]) -> OwnedHeaders {
    let owned = OwnedHeaders::new_with_capacity(list.len());
    // `as_borrowed` is a view of the same rd_kafka_headers_t that `owned` owns;
    // rdkafka keeps the pointer itself private.
    let native = owned.as_borrowed() as *const BorrowedHeaders as *mut rdkafka_sys::rd_kafka_headers_t;
    for (name, value) in list {
        let (value_ptr, value_len) = match value {
            Some(v) => (v.as_ptr().cast(), v.len() as isize),
            None => (std::ptr::null(), 0),
        };
        // SAFETY: `native` is the live header list of `owned`; librdkafka copies
        // the name and the value, whose pointers and lengths describe live slices.
        let err = unsafe {
            rdkafka_sys::rd_kafka_header_add(native, name.as_ptr().cast(), name.len() as isize, value_ptr, value_len)
        };
        assert_eq!(err, rdkafka_sys::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_NO_ERROR, "adding header {name:?}");
    }
    owned
}

/// Produces in order to partition 0 of the input; the offset each record got.
async fn produce(kafka: &MockKafka, records: &[Hostile]) -> Vec<i64> {
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", kafka.bootstrap())
        .set("enable.idempotence", "true")
        .set("linger.ms", "5")
        .create()
        .expect("test producer");
    let mut offsets = Vec::with_capacity(records.len());
    for r in records {
        let mut record: FutureRecord<'_, [u8], [u8]> =
            FutureRecord::to(INPUT).partition(0).headers(raw_headers(&r.headers));
        if let Some(k) = &r.key {
            record = record.key(k);
        }
        if let Some(p) = &r.payload {
            record = record.payload(p);
        }
        let delivery = producer.send(record, Duration::from_secs(30)).await;
        let delivery = delivery.unwrap_or_else(|(e, _)| panic!("producing the {} record failed: {e}", r.what));
        assert_eq!(delivery.partition, 0);
        offsets.push(delivery.offset);
    }
    offsets
}

/// `kdedup run` with a config file for the test topics and a JSON-pointer key source.
struct Kdedup {
    child: Child,
    logs: Option<std::thread::JoinHandle<String>>,
    group: String,
}

impl Kdedup {
    fn start(kafka: &MockKafka, dir: &Path, producer_extra: &str) -> Kdedup {
        let group = unique("hostile");
        let config = dir.join("kdedup.toml");
        let text = format!(
            r#"
[kafka]
brokers = "{brokers}"
group_id = "{group}"
topics = ["{INPUT}"]
[kafka.consumer]
"session.timeout.ms" = 3000
"heartbeat.interval.ms" = 500
[kafka.producer]
{producer_extra}
[key]
source = "json"
json_pointer = "/id"
[store]
path = "{store}"
[filter]
expected_keys = 100000
[sink]
kind = "kafka"
topic = "{OUTPUT}"
[dead_letter]
topic = "{DLQ}"
[metrics]
listen = ""
[pipeline]
commit_interval_ms = 100
"#,
            brokers = kafka.bootstrap(),
            store = dir.join("store").display(),
        );
        std::fs::write(&config, text).expect("writing the test config");
        let mut child = Command::new(BIN)
            .args(["run", "--config", config.to_str().expect("temp paths are UTF-8")])
            .env("KDEDUP_LOG", "info")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("the kdedup binary starts");
        let mut stderr = child.stderr.take().expect("stderr is piped");
        let logs = std::thread::spawn(move || {
            let mut all = String::new();
            let _ = stderr.read_to_string(&mut all);
            all
        });
        Kdedup { child, logs: Some(logs), group }
    }

    /// Fails the test with the logs if the process has exited.
    fn assert_alive(&mut self) {
        if let Some(status) = self.child.try_wait().expect("try_wait") {
            let logs = self.logs.take().map(|l| l.join().unwrap_or_default()).unwrap_or_default();
            panic!("kdedup run exited early with {status}; its logs:\n{logs}");
        }
    }

    /// Awaits the group's committed offset of input partition 0 reaching `end`.
    async fn await_committed(&mut self, kafka: &MockKafka, end: i64) {
        let deadline = std::time::Instant::now() + Duration::from_secs(90);
        loop {
            self.assert_alive();
            let committed = mock::committed_offsets(kafka.bootstrap(), &self.group, INPUT).expect("committed offsets");
            if committed.get(&0) == Some(&end) {
                return;
            }
            assert!(
                committed.get(&0).is_none_or(|c| *c < end),
                "committed {committed:?} beyond the end {end} of the input"
            );
            if std::time::Instant::now() > deadline {
                let _ = self.child.kill();
                let _ = self.child.wait();
                let logs = self.logs.take().map(|l| l.join().unwrap_or_default()).unwrap_or_default();
                panic!(
                    "timed out after 90 s waiting for group {} to commit input offset {end}: committed {committed:?}. \
                     A record that nothing accepts pauses its partition; kdedup's logs:\n{logs}",
                    self.group
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// SIGTERM, and the exit status must be success.
    fn stop(mut self) {
        // SAFETY: signalling our own child process by its id.
        assert_eq!(unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) }, 0);
        let status = self.child.wait().expect("wait for kdedup");
        let logs = self.logs.take().map(|l| l.join().unwrap_or_default()).unwrap_or_default();
        assert!(status.success(), "kdedup run exited with {status} on SIGTERM; logs:\n{logs}");
    }
}

impl Drop for Kdedup {
    fn drop(&mut self) {
        if self.logs.is_some() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

fn source_offset(r: &Consumed) -> i64 {
    r.header_str(headers::SOURCE_OFFSET)
        .and_then(|o| o.parse().ok())
        .unwrap_or_else(|| panic!("{} missing on a record kdedup wrote: {r:?}", headers::SOURCE_OFFSET))
}

/// Every record's outcome, by the source offset kdedup wrote on it.
fn outcomes(output: &[Consumed], dead: &[Consumed]) -> BTreeMap<i64, Vec<Expect>> {
    let mut seen: BTreeMap<i64, Vec<Expect>> = BTreeMap::new();
    for r in output {
        let id = r.header(headers::EVENT_ID).expect("the output carries the event ID").to_vec();
        seen.entry(source_offset(r)).or_default().push(Expect::Emitted(id));
    }
    for r in dead {
        let reason = r.header_str(headers::REASON).expect("a dead letter carries its reason").to_string();
        seen.entry(source_offset(r)).or_default().push(Expect::DeadLettered(reason));
    }
    seen
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_records_are_emitted_or_dead_lettered_once_and_the_partition_keeps_going() {
    let kafka = cluster(1);
    let big_id = "i".repeat(100_000);
    let hashed_id = format!("sha256:{}", hex(&Sha256::digest(big_id.as_bytes())));
    let pad = "p".repeat(600_000);
    let bad_name = vec![b'x', 0xff, 0xfe];
    let records = vec![
        json("good before", r#"{"id":"good-1"}"#, emitted("good-1")),
        json("malformed JSON", "{\"id\": \"m\", oops", dead_lettered("invalid_json")),
        json("100k-deep nesting", "[".repeat(100_000), dead_lettered("invalid_json")),
        json("empty payload", "", dead_lettered("invalid_json")),
        Hostile {
            what: "tombstone",
            key: Some(b"tomb".to_vec()),
            payload: None,
            headers: Vec::new(),
            expect: dead_lettered("missing_id"),
        },
        json("non-UTF-8 payload", b"{\"id\":\"u\xff\xfe\"}".to_vec(), dead_lettered("invalid_json")),
        Hostile {
            what: "non-UTF-8 key",
            key: Some(vec![0xff, 0x00, 0xfe]),
            payload: Some(br#"{"id":"bin-key"}"#.to_vec()),
            headers: Vec::new(),
            expect: emitted("bin-key"),
        },
        Hostile {
            what: "non-UTF-8 header value",
            key: None,
            payload: Some(br#"{"id":"bin-value"}"#.to_vec()),
            headers: vec![(b"trace".to_vec(), Some(vec![0xff, 0xfe, 0x00])), (b"nothing".to_vec(), None)],
            expect: emitted("bin-value"),
        },
        Hostile {
            what: "non-UTF-8 header name",
            key: None,
            payload: Some(br#"{"id":"bad-name"}"#.to_vec()),
            headers: vec![(b"fine".to_vec(), Some(b"1".to_vec())), (bad_name.clone(), Some(b"v".to_vec()))],
            expect: dead_lettered("bad_header"),
        },
        json("600 KB payload", format!(r#"{{"id":"big-payload","pad":"{pad}"}}"#), emitted("big-payload")),
        json("100 KB ID", format!(r#"{{"id":"{big_id}"}}"#), emitted(&hashed_id)),
        Hostile {
            what: "2,000 headers",
            key: None,
            payload: Some(br#"{"id":"many-headers"}"#.to_vec()),
            headers: (0..2000).map(|i| (format!("h-{i}").into_bytes(), Some(i.to_string().into_bytes()))).collect(),
            expect: emitted("many-headers"),
        },
        Hostile {
            what: "200 KB header value",
            key: None,
            payload: Some(br#"{"id":"big-header"}"#.to_vec()),
            headers: vec![(b"blob".to_vec(), Some(vec![b'b'; 200_000]))],
            expect: emitted("big-header"),
        },
        json("good after", r#"{"id":"good-2"}"#, emitted("good-2")),
        json("good after, again", r#"{"id":"good-3"}"#, emitted("good-3")),
    ];
    let offsets = produce(&kafka, &records).await;
    let end = offsets.last().expect("records were produced") + 1;

    let dir = tempfile::tempdir().unwrap();
    let mut kdedup = Kdedup::start(&kafka, dir.path(), "");
    kdedup.await_committed(&kafka, end).await;
    kdedup.stop();

    let output = mock::read_all(kafka.bootstrap(), OUTPUT).unwrap();
    let dead = mock::read_all(kafka.bootstrap(), DLQ).unwrap();
    let seen = outcomes(&output, &dead);
    for (r, offset) in records.iter().zip(&offsets) {
        assert_eq!(
            seen.get(offset).map(Vec::as_slice),
            Some(std::slice::from_ref(&r.expect)),
            "the {} record (offset {offset}) should have exactly one outcome",
            r.what
        );
    }
    assert_eq!(seen.len(), records.len(), "outcomes for offsets that were never produced: {:?}", seen.keys());

    // What travelled, byte for byte.
    let out = |id: &str| {
        output.iter().find(|r| r.header(headers::EVENT_ID) == Some(id.as_bytes())).expect("emitted, checked above")
    };
    assert_eq!(out("bin-key").key.as_deref(), Some(&[0xff, 0x00, 0xfe][..]), "a binary key passes through");
    assert_eq!(out("bin-value").header("trace"), Some(&[0xff, 0xfe, 0x00][..]), "a binary header value too");
    let big = out("big-payload").payload.as_deref().map(<[u8]>::len);
    assert_eq!(big, records[9].payload.as_deref().map(<[u8]>::len), "the 600 KB payload arrives whole");
    let many = out("many-headers");
    assert!(many.headers.len() >= 2000 && many.header("h-1999") == Some(b"1999".as_slice()), "all 2,000 headers");
    assert_eq!(out("big-header").header("blob").map(<[u8]>::len), Some(200_000));
    let named = dead.iter().find(|r| r.header_str(headers::REASON) == Some("bad_header")).expect("checked above");
    assert_eq!(named.header("fine"), Some(b"1".as_slice()), "the other headers are kept");
    assert_eq!(
        named.header(&format!("hex:{}", hex(&bad_name))),
        Some(b"v".as_slice()),
        "the bad name travels as hex:<bytes> with its value: {:?}",
        named.headers.iter().map(|(k, _)| k).collect::<Vec<_>>()
    );
    let error = named.header_str(headers::ERROR).unwrap_or_default();
    assert!(error.contains("not UTF-8") && error.contains("hex:78fffe"), "the error says what was wrong: {error}");
    // Order kept: the good records after the hostile ones come last.
    let last: Vec<&[u8]> = output.iter().rev().take(2).filter_map(|r| r.header(headers::EVENT_ID)).collect();
    assert_eq!(last, vec![b"good-3".as_slice(), b"good-2".as_slice()]);
}

/// Expected behaviour being built right now (a colleague's change): a record
/// the output producer refuses as too large is not committed in silence nor
/// paused on forever; it is dead-lettered as a truncated dead letter. Fails
/// until that change is merged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn record_over_the_producer_limit_is_dead_lettered_truncated() {
    let kafka = cluster(1);
    let original = format!(r#"{{"id":"too-big","pad":"{}"}}"#, "q".repeat(400_000)).into_bytes();
    let records = vec![
        json("good before", r#"{"id":"good-1"}"#, emitted("good-1")),
        json("400 KB over a 300 KB producer limit", original.clone(), dead_lettered("sink_rejected")),
        json("good after", r#"{"id":"good-2"}"#, emitted("good-2")),
    ];
    let offsets = produce(&kafka, &records).await;
    let dir = tempfile::tempdir().unwrap();
    let mut kdedup = Kdedup::start(&kafka, dir.path(), r#""message.max.bytes" = 300000"#);
    kdedup.await_committed(&kafka, offsets[2] + 1).await;
    kdedup.stop();

    let output = mock::read_all(kafka.bootstrap(), OUTPUT).unwrap();
    let ids: Vec<&[u8]> = output.iter().filter_map(|r| r.header(headers::EVENT_ID)).collect();
    assert_eq!(ids, vec![b"good-1".as_slice(), b"good-2".as_slice()], "the good records are emitted, once each");
    let dead = mock::read_all(kafka.bootstrap(), DLQ).unwrap();
    assert_eq!(dead.len(), 1, "exactly one dead letter: {:?}", dead.iter().map(|d| &d.headers).collect::<Vec<_>>());
    let d = &dead[0];
    assert_eq!(source_offset(d), offsets[1]);
    assert!(d.header_str(headers::REASON).is_some_and(|r| !r.is_empty()), "a reason: {:?}", d.headers);
    assert_eq!(d.header_str("kdedup-truncated"), Some("true"));
    assert_eq!(d.header_str("kdedup-payload-sha256"), Some(hex(&Sha256::digest(&original)).as_str()));
    assert_eq!(d.header_str("kdedup-payload-bytes"), Some(original.len().to_string().as_str()));
    let prefix = d.payload.as_deref().unwrap_or_default();
    assert!(prefix.len() < original.len() && original.starts_with(prefix), "the payload is a prefix of the original");
}

/// A truncated dead letter keeps the record's own headers that fit and drops
/// only the one that does not: an event ID carried in a header survives the
/// truncation. Failed before: every own header was dropped (`kdedup-headers-dropped: 3`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_truncated_dead_letter_keeps_the_headers_that_fit() {
    let kafka = cluster(1);
    let original = format!(r#"{{"id":"too-big","pad":"{}"}}"#, "q".repeat(400_000)).into_bytes();
    let mut big = json("400 KB over a 300 KB producer limit, with headers", original, dead_lettered("sink_rejected"));
    big.headers = vec![
        (b"event-id".to_vec(), Some(b"evt-16-bytes-long".to_vec())),
        (b"blob".to_vec(), Some(vec![b'b'; 100_000])),
        (b"tenant".to_vec(), Some(b"acme".to_vec())),
    ];
    let records = vec![big, json("good after", r#"{"id":"good-2"}"#, emitted("good-2"))];
    let offsets = produce(&kafka, &records).await;
    let dir = tempfile::tempdir().unwrap();
    let mut kdedup = Kdedup::start(&kafka, dir.path(), r#""message.max.bytes" = 300000"#);
    kdedup.await_committed(&kafka, offsets[1] + 1).await;
    kdedup.stop();

    let dead = mock::read_all(kafka.bootstrap(), DLQ).unwrap();
    assert_eq!(dead.len(), 1, "exactly one dead letter");
    let d = &dead[0];
    assert_eq!(d.header_str("kdedup-truncated"), Some("true"));
    assert_eq!(d.header_str("event-id"), Some("evt-16-bytes-long"), "the small header is kept: {:?}", d.headers);
    assert_eq!(d.header_str("tenant"), Some("acme"), "so is the one after the dropped one");
    assert_eq!(d.header("blob"), None, "the 100 KB header does not fit");
    assert_eq!(d.header_str("kdedup-headers-dropped"), Some("1"));
}
