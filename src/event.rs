//! The key stage: a consumed record becomes an [`Envelope`] carrying its
//! dedup key `(scope, event_id)` and a payload fingerprint, or a
//! [`RecordError`] saying why it cannot be handled (it is then dead-lettered).
//!
//! Event IDs are bytes, not strings: non-UTF-8 IDs are fine. IDs over
//! `max_bytes` are replaced by `sha256:<hex>` of the ID (or dead-lettered, by
//! policy), so the store never holds unbounded keys.
//!
//! Header names are bytes on the wire too, but the sinks carry them through
//! rdkafka's `&str`-keyed headers, and rdkafka's own header iteration panics
//! on a name that is not UTF-8. Headers are therefore read through the raw
//! API ([`header_pairs`]); a name that is not UTF-8 is kept as
//! `hex:<hex of its bytes>` (so the dead letter still carries it) and marks
//! the record ([`Record::bad_header`]): it is dead-lettered as `bad_header`,
//! never emitted under a name it was not sent with.

use std::ffi::CStr;
use std::fmt;
use std::sync::Arc;

use rdkafka::message::{BorrowedMessage, Message};
use rdkafka::types::RDKafkaRespErr;
use sha2::{Digest, Sha256};
use xxhash_rust::xxh3::{xxh3_128, xxh3_128_with_secret};

/// The per-process secret of [`EventKey::digest`]: 192 random bytes (XXH3's
/// default secret's size; at least 136 are needed).
fn digest_secret() -> &'static [u8; 192] {
    static SECRET: std::sync::OnceLock<[u8; 192]> = std::sync::OnceLock::new();
    SECRET.get_or_init(|| {
        let mut secret = [0u8; 192];
        rand::fill(&mut secret[..]);
        secret
    })
}

use crate::config::{KeyConfig, KeySource, OnOversize};
use crate::error::RecordError;

/// Where a record sits in Kafka.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Position {
    /// The topic's name, shared by all of its records.
    pub topic: Arc<str>,
    /// The partition within the topic.
    pub partition: i32,
    /// The record's offset within the partition.
    pub offset: i64,
}

impl fmt::Display for Position {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}@{}", self.topic, self.partition, self.offset)
    }
}

/// A consumed record, owned, so it can cross await points and threads.
#[derive(Debug, Clone)]
pub struct Record {
    /// Where it was read.
    pub position: Position,
    /// The Kafka record key, if any.
    pub key: Option<Vec<u8>>,
    /// The value, if any (`None` for a tombstone).
    pub payload: Option<Vec<u8>>,
    /// Header names as kdedup carries them: UTF-8 names as they are, others as
    /// `hex:<hex of the name bytes>` (see `decode_header_name`).
    pub headers: Vec<RecordHeader>,
    /// Producer or broker timestamp, milliseconds since the epoch.
    pub timestamp_ms: Option<i64>,
    /// Why the headers cannot be carried as they came (the first header name
    /// that is not UTF-8, or headers librdkafka could not parse), for humans.
    /// Such a record is dead-lettered as `bad_header`, never emitted.
    pub bad_header: Option<String>,
}

impl Record {
    /// Copies a consumed message out of librdkafka; `topic` is passed in so every record shares one name.
    pub fn from_message(message: &BorrowedMessage<'_>, topic: &Arc<str>) -> Record {
        let (headers, bad_header) = match try_header_pairs(message) {
            Ok(pairs) => decode_headers(pairs),
            Err(code) => (
                Vec::new(),
                Some(format!("librdkafka could not parse the record's headers ({code:?}); they were dropped")),
            ),
        };
        Record {
            position: Position { topic: topic.clone(), partition: message.partition(), offset: message.offset() },
            key: message.key().map(<[u8]>::to_vec),
            payload: message.payload().map(<[u8]>::to_vec),
            headers,
            timestamp_ms: message.timestamp().to_millis(),
            bad_header,
        }
    }

    /// The value of the first header called `name` (`None` when absent or null).
    pub fn header(&self, name: &str) -> Option<&[u8]> {
        self.headers.iter().find(|(k, _)| k == name).and_then(|(_, v)| v.as_deref())
    }
}

/// One header as librdkafka holds it: name bytes, value (`None` for a null value).
pub type RawHeader<'a> = (&'a [u8], Option<&'a [u8]>);

/// One header as a [`Record`] holds it (see [`decode_header_name`]).
pub type RecordHeader = (String, Option<Vec<u8>>);

/// A message's headers as raw `(name bytes, value)` pairs, in order, read
/// through librdkafka's C API: unlike rdkafka's `Headers::iter`/`get`, this
/// never panics on a name that is not UTF-8. Empty when the message has no
/// headers or librdkafka cannot parse them (see [`try_header_pairs`]).
///
/// A name holding a NUL byte ends at the NUL: librdkafka hands names out as
/// C strings.
pub fn header_pairs<'a>(message: &'a BorrowedMessage<'_>) -> Vec<RawHeader<'a>> {
    try_header_pairs(message).unwrap_or_default()
}

/// As [`header_pairs`], but an error code when librdkafka cannot parse the
/// message's headers (a message without headers gives `Ok` of nothing).
pub fn try_header_pairs<'a>(message: &'a BorrowedMessage<'_>) -> Result<Vec<RawHeader<'a>>, RDKafkaRespErr> {
    let mut hdrs: *mut rdkafka_sys::rd_kafka_headers_t = std::ptr::null_mut();
    // SAFETY: `message.ptr()` is the live rd_kafka_message_t this borrow keeps
    // alive; librdkafka parses the headers into storage owned by the message
    // (never freed before the message), and hands back a pointer to it.
    let err = unsafe { rdkafka_sys::rd_kafka_message_headers(message.ptr(), &mut hdrs) };
    match err {
        RDKafkaRespErr::RD_KAFKA_RESP_ERR_NO_ERROR if !hdrs.is_null() => {}
        RDKafkaRespErr::RD_KAFKA_RESP_ERR_NO_ERROR | RDKafkaRespErr::RD_KAFKA_RESP_ERR__NOENT => return Ok(Vec::new()),
        other => return Err(other),
    }
    // SAFETY: `hdrs` is the message's own header list (above).
    let count = unsafe { rdkafka_sys::rd_kafka_header_cnt(hdrs) };
    let mut pairs = Vec::with_capacity(count);
    for idx in 0..count {
        let mut name: *const std::ffi::c_char = std::ptr::null();
        let mut value: *const std::ffi::c_void = std::ptr::null();
        let mut size = 0usize;
        // SAFETY: `idx` is below the count; the out-pointers are valid locals.
        let err = unsafe { rdkafka_sys::rd_kafka_header_get_all(hdrs, idx, &mut name, &mut value, &mut size) };
        if err != RDKafkaRespErr::RD_KAFKA_RESP_ERR_NO_ERROR || name.is_null() {
            break;
        }
        // SAFETY: librdkafka stores each name NUL-terminated and each value as
        // `size` bytes (NULL for a null value), inside the message's header
        // list, which lives as long as the message borrowed for 'a.
        let (name, value) = unsafe {
            let name = CStr::from_ptr(name).to_bytes();
            let value = (!value.is_null()).then(|| std::slice::from_raw_parts(value.cast::<u8>(), size));
            (name, value)
        };
        pairs.push((name, value));
    }
    Ok(pairs)
}

/// A header name that is not UTF-8: kept as `hex:<hex>`, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BadHeaderName {
    /// The name as kdedup carries it: `hex:<hex of the name bytes>`.
    pub kept: String,
    /// For humans: what is wrong with the name.
    pub description: String,
}

/// A header name as kdedup carries it: UTF-8 names as they are; any other
/// bytes as `hex:<hex>`, with a description of the first invalid byte.
pub fn decode_header_name(name: &[u8]) -> Result<String, BadHeaderName> {
    match std::str::from_utf8(name) {
        Ok(s) => Ok(s.to_string()),
        Err(e) => {
            let at = e.valid_up_to();
            let kept = format!("hex:{}", hex(name));
            let description = format!(
                "header name is not UTF-8 (byte 0x{:02x} at {at} of {} bytes); kept as {}",
                name[at],
                name.len(),
                shorten(&kept, 80)
            );
            Err(BadHeaderName { kept, description })
        }
    }
}

/// Raw header pairs (from [`header_pairs`]) as a [`Record`] holds them, and
/// the description of the first bad name, if any. Pure: no librdkafka.
pub fn decode_headers<'a>(pairs: impl IntoIterator<Item = RawHeader<'a>>) -> (Vec<RecordHeader>, Option<String>) {
    let mut bad = None;
    let headers = pairs
        .into_iter()
        .enumerate()
        .map(|(i, (name, value))| {
            let name = decode_header_name(name).unwrap_or_else(|b| {
                bad.get_or_insert_with(|| format!("header #{i}: {}", b.description));
                b.kept
            });
            (name, value.map(<[u8]>::to_vec))
        })
        .collect();
    (headers, bad)
}

/// At most `max` bytes of `s` (on a char boundary), with `…` when cut.
fn shorten(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_string();
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &s[..end])
}

/// The dedup key: two pipelines with different scopes never suppress each other.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct EventKey {
    /// The namespace: `[key] scope` (the group ID by default).
    pub scope: Arc<str>,
    /// The event ID's bytes, as extracted (or `sha256:<hex>` of an oversize one).
    pub id: Vec<u8>,
}

impl EventKey {
    /// Store key bytes: `u16 scope length (BE) | scope | id`, unambiguous for any bytes.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(2 + self.scope.len() + self.id.len());
        out.extend_from_slice(&(self.scope.len() as u16).to_be_bytes());
        out.extend_from_slice(self.scope.as_bytes());
        out.extend_from_slice(&self.id);
        out
    }

    /// The inverse of [`EventKey::encode`]; `None` for bytes it did not make.
    pub fn decode(bytes: &[u8]) -> Option<EventKey> {
        let len = u16::from_be_bytes(bytes.get(..2)?.try_into().ok()?) as usize;
        let scope = std::str::from_utf8(bytes.get(2..2 + len)?).ok()?;
        Some(EventKey { scope: Arc::from(scope), id: bytes[2 + len..].to_vec() })
    }

    /// 128-bit digest used by the in-process filters, the in-batch leader map
    /// and the HTTP sink's chains (never by the store, never persisted): XXH3
    /// keyed with a secret drawn once per process, as the foldhash maps are
    /// seeded, so input chosen to collide under XXH3's public default secret
    /// collides nowhere else.
    pub fn digest(&self) -> u128 {
        EventKey::digest_encoded(&self.encode())
    }

    /// [`EventKey::digest`] of a key already [`EventKey::encode`]d.
    pub fn digest_encoded(encoded: &[u8]) -> u128 {
        xxh3_128_with_secret(encoded, digest_secret())
    }

    /// The ID for humans and headers: UTF-8 as is, other bytes as `hex:<…>`.
    pub fn display_id(&self) -> String {
        match std::str::from_utf8(&self.id) {
            Ok(s) => s.to_string(),
            Err(_) => format!("hex:{}", hex(&self.id)),
        }
    }
}

/// Hash of what the event says; the same ID with another fingerprint is a conflict.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Fingerprint(pub u128);

impl fmt::Display for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:032x}", self.0)
    }
}

/// A record with its key, ready for the dedup decision.
#[derive(Debug, Clone)]
pub struct Envelope {
    /// The record as consumed.
    pub record: Record,
    /// Its dedup key.
    pub key: EventKey,
    /// Its payload fingerprint (of the whole payload, or of `fingerprint_fields`).
    pub fingerprint: Fingerprint,
    /// `key.digest()`, computed once at extraction for the in-process filters.
    pub digest: u128,
}

/// The key stage.
#[derive(Debug, Clone)]
pub struct KeyExtractor {
    config: KeyConfig,
    scope: Arc<str>,
}

impl KeyExtractor {
    /// The key stage of `config`; the scope is interned once.
    pub fn new(config: KeyConfig) -> KeyExtractor {
        let scope = Arc::from(config.scope.as_str());
        KeyExtractor { config, scope }
    }

    /// The record comes back with the error, so it can be dead-lettered as it was.
    #[allow(clippy::result_large_err)]
    pub fn extract(&self, record: Record) -> Result<Envelope, (Record, RecordError)> {
        match self.key_and_fingerprint(&record) {
            Ok((id, fingerprint)) => {
                let key = EventKey { scope: self.scope.clone(), id };
                Ok(Envelope { digest: key.digest(), key, fingerprint, record })
            }
            Err(e) => Err((record, e)),
        }
    }

    fn key_and_fingerprint(&self, record: &Record) -> Result<(Vec<u8>, Fingerprint), RecordError> {
        // Before anything else: its headers could not be passed on as they came.
        if let Some(bad) = &record.bad_header {
            return Err(RecordError::BadHeader(bad.clone()));
        }
        let payload = record.payload.as_deref();
        // Parse JSON once when either the ID or the fingerprint needs it.
        let needs_json = matches!(self.config.source, KeySource::Json(_)) || !self.config.fingerprint_fields.is_empty();
        let json = if needs_json {
            let bytes =
                payload.ok_or_else(|| RecordError::MissingId("record has no payload to read JSON from".into()))?;
            Some(
                serde_json::from_slice::<serde_json::Value>(bytes)
                    .map_err(|e| RecordError::InvalidJson(e.to_string()))?,
            )
        } else {
            None
        };

        let id = match &self.config.source {
            KeySource::Header(name) => match record.header(name) {
                Some(v) if !v.is_empty() => v.to_vec(),
                _ => return Err(RecordError::MissingId(format!("no `{name}` header (key.source = \"header\")"))),
            },
            KeySource::RecordKey => match record.key.as_deref() {
                Some(k) if !k.is_empty() => k.to_vec(),
                _ => return Err(RecordError::MissingId("record has no key (key.source = \"key\")".into())),
            },
            KeySource::Json(pointer) => {
                let value = json.as_ref().and_then(|j| j.pointer(pointer));
                match value {
                    Some(serde_json::Value::String(s)) if !s.is_empty() => s.as_bytes().to_vec(),
                    Some(serde_json::Value::Number(n)) => n.to_string().into_bytes(),
                    Some(other) => {
                        return Err(RecordError::MissingId(format!(
                            "value at {pointer} is {}, not a non-empty string or a number",
                            json_kind(other)
                        )))
                    }
                    None => return Err(RecordError::MissingId(format!("no value at JSON pointer {pointer}"))),
                }
            }
            KeySource::PayloadHash => match payload {
                Some(p) => sha256_tag(p),
                None => {
                    return Err(RecordError::MissingId(
                        "record has no payload to hash (key.source = \"payload_hash\")".into(),
                    ))
                }
            },
        };

        let max = self.config.max_bytes.get();
        let id = if id.len() > max {
            match self.config.on_oversize {
                OnOversize::Hash => sha256_tag(&id),
                OnOversize::DeadLetter => return Err(RecordError::OversizeId { len: id.len(), max }),
            }
        } else {
            id
        };

        let fingerprint = match &json {
            Some(j) if !self.config.fingerprint_fields.is_empty() => {
                let mut buf = Vec::new();
                for pointer in &self.config.fingerprint_fields {
                    // Absent fields hash as JSON null: adding a field later is a conflict, on purpose.
                    let v = j.pointer(pointer).unwrap_or(&serde_json::Value::Null);
                    serde_json::to_writer(&mut buf, v).expect("serialising a serde_json::Value to a Vec cannot fail");
                    buf.push(0);
                }
                Fingerprint(xxh3_128(&buf))
            }
            _ => Fingerprint(xxh3_128(payload.unwrap_or_default())),
        };
        Ok((id, fingerprint))
    }
}

fn json_kind(v: &serde_json::Value) -> &'static str {
    match v {
        serde_json::Value::Null => "null",
        serde_json::Value::Bool(_) => "a boolean",
        serde_json::Value::Number(_) => "a number",
        serde_json::Value::String(_) => "an empty string",
        serde_json::Value::Array(_) => "an array",
        serde_json::Value::Object(_) => "an object",
    }
}

/// `sha256:<64 hex>`: collision-resistant, so hashed IDs cannot be forged to
/// suppress another event.
fn sha256_tag(bytes: &[u8]) -> Vec<u8> {
    format!("sha256:{}", hex(&Sha256::digest(bytes))).into_bytes()
}

/// Lower-case hexadecimal of `bytes`, two digits a byte.
pub fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(DIGITS[(b >> 4) as usize] as char);
        s.push(DIGITS[(b & 15) as usize] as char);
    }
    s
}

#[cfg(test)]
mod tests {
    use std::num::NonZeroUsize;

    use super::*;

    fn extractor(source: KeySource, max_bytes: usize, on_oversize: OnOversize, fields: &[&str]) -> KeyExtractor {
        KeyExtractor::new(KeyConfig {
            source,
            scope: "s".into(),
            max_bytes: NonZeroUsize::new(max_bytes).unwrap(),
            on_oversize,
            fingerprint_fields: fields.iter().map(|s| s.to_string()).collect(),
        })
    }

    fn record(key: Option<&[u8]>, payload: Option<&[u8]>, headers: &[(&str, &[u8])]) -> Record {
        Record {
            position: Position { topic: Arc::from("t"), partition: 0, offset: 7 },
            key: key.map(<[u8]>::to_vec),
            payload: payload.map(<[u8]>::to_vec),
            headers: headers.iter().map(|(k, v)| (k.to_string(), Some(v.to_vec()))).collect(),
            timestamp_ms: None,
            bad_header: None,
        }
    }

    #[test]
    fn header_source_takes_bytes_as_they_are() {
        let x = extractor(KeySource::Header("event-id".into()), 512, OnOversize::Hash, &[]);
        let e = x.extract(record(None, Some(b"p"), &[("event-id", &[0xff, 0x00, 0x41])])).unwrap();
        assert_eq!(e.key.id, vec![0xff, 0x00, 0x41]);
        assert_eq!(e.key.display_id(), "hex:ff0041");
        let (_, err) = x.extract(record(None, Some(b"p"), &[("other", b"1")])).unwrap_err();
        assert_eq!(err.reason(), "missing_id");
    }

    #[test]
    fn record_key_source() {
        let x = extractor(KeySource::RecordKey, 512, OnOversize::Hash, &[]);
        assert_eq!(x.extract(record(Some(b"k1"), None, &[])).unwrap().key.id, b"k1");
        assert_eq!(x.extract(record(None, None, &[])).unwrap_err().1.reason(), "missing_id");
    }

    #[test]
    fn json_source_reads_strings_and_numbers_and_rejects_the_rest() {
        let x = extractor(KeySource::Json("/payment/id".into()), 512, OnOversize::Hash, &[]);
        let id = |p: &str| x.extract(record(None, Some(p.as_bytes()), &[])).map(|e| e.key.id).map_err(|e| e.1);
        assert_eq!(id(r#"{"payment":{"id":"pay_1"}}"#).unwrap(), b"pay_1");
        assert_eq!(id(r#"{"payment":{"id":12}}"#).unwrap(), b"12");
        assert_eq!(id(r#"{"payment":{"id":{}}}"#).unwrap_err().reason(), "missing_id");
        assert_eq!(id(r#"{"payment":{}}"#).unwrap_err().reason(), "missing_id");
        assert_eq!(id("not json").unwrap_err().reason(), "invalid_json");
    }

    #[test]
    fn payload_hash_is_content_dedup() {
        let x = extractor(KeySource::PayloadHash, 512, OnOversize::Hash, &[]);
        let a = x.extract(record(None, Some(b"same"), &[])).unwrap();
        let b = x.extract(record(Some(b"other"), Some(b"same"), &[])).unwrap();
        assert_eq!(a.key, b.key);
        assert!(a.key.id.starts_with(b"sha256:"));
    }

    #[test]
    fn oversize_ids_are_hashed_or_dead_lettered() {
        let long = vec![b'x'; 600];
        let hashed = extractor(KeySource::Header("id".into()), 512, OnOversize::Hash, &[]);
        let e = hashed.extract(record(None, None, &[("id", &long)])).unwrap();
        assert_eq!(e.key.id.len(), "sha256:".len() + 64);
        let strict = extractor(KeySource::Header("id".into()), 512, OnOversize::DeadLetter, &[]);
        let (_, err) = strict.extract(record(None, None, &[("id", &long)])).unwrap_err();
        assert_eq!(err, RecordError::OversizeId { len: 600, max: 512 });
    }

    #[test]
    fn fingerprint_follows_configured_fields_only() {
        let x = extractor(KeySource::Json("/id".into()), 512, OnOversize::Hash, &["/amount"]);
        let fp = |p: &str| x.extract(record(None, Some(p.as_bytes()), &[])).unwrap().fingerprint;
        assert_eq!(fp(r#"{"id":"a","amount":5,"ts":1}"#), fp(r#"{"id":"a","amount":5,"ts":2}"#));
        assert_ne!(fp(r#"{"id":"a","amount":5}"#), fp(r#"{"id":"a","amount":6}"#));
    }

    #[test]
    fn header_names_that_are_not_utf8_are_kept_as_hex_and_described() {
        assert_eq!(decode_header_name(b"event-id"), Ok("event-id".to_string()));
        assert_eq!(decode_header_name(b""), Ok(String::new()));
        let bad = decode_header_name(&[b'a', 0xff, b'b']).unwrap_err();
        assert_eq!(bad.kept, "hex:61ff62");
        assert!(bad.description.contains("0xff at 1 of 3 bytes"), "{}", bad.description);
        let long = decode_header_name(&[0xc3; 500]).unwrap_err();
        assert_eq!(long.kept.len(), 4 + 1000, "the kept name is whole");
        assert!(long.description.len() < 200, "the description is short: {}", long.description);

        let (headers, bad) =
            decode_headers([(&b"ok"[..], Some(&b"1"[..])), (&[0xfe, 0x01][..], None), (&[0x80][..], Some(&b"3"[..]))]);
        assert_eq!(
            headers,
            vec![("ok".into(), Some(b"1".to_vec())), ("hex:fe01".into(), None), ("hex:80".into(), Some(b"3".to_vec()))]
        );
        let bad = bad.expect("a bad name marks the record");
        assert!(bad.starts_with("header #1: ") && bad.contains("hex:fe01"), "the first bad name is described: {bad}");
        assert_eq!(decode_headers([(&b"a"[..], None)]).1, None);
    }

    #[test]
    fn a_bad_header_name_dead_letters_the_record_whatever_the_key_source() {
        let mut r = record(Some(b"k"), Some(br#"{"id":"a"}"#), &[("event-id", b"e1")]);
        r.bad_header = Some("header #1: header name is not UTF-8".into());
        for source in [KeySource::Header("event-id".into()), KeySource::RecordKey, KeySource::Json("/id".into())] {
            let (back, err) = extractor(source, 512, OnOversize::Hash, &[]).extract(r.clone()).unwrap_err();
            assert_eq!(err.reason(), "bad_header");
            assert!(err.to_string().contains("not UTF-8"), "{err}");
            assert_eq!(back.headers, r.headers, "the dead letter carries the headers as kept");
        }
    }

    #[test]
    fn deeply_nested_json_is_invalid_json_not_a_stack_overflow() {
        let x = extractor(KeySource::Json("/id".into()), 512, OnOversize::Hash, &[]);
        for open in [b'[', b'{'] {
            let mut payload = vec![open; 100_000];
            if open == b'{' {
                // {"a":{"a":… : nested objects need keys.
                payload = br#"{"a":"#.repeat(20_000);
            }
            let (_, err) = x.extract(record(None, Some(&payload), &[])).unwrap_err();
            assert_eq!(err.reason(), "invalid_json", "{err}");
            assert!(err.to_string().contains("recursion limit"), "{err}");
        }
        // Nesting under the limit is fine.
        let ok = format!(r#"{{"id":"n","deep":{}{}}}"#, "[".repeat(100), "]".repeat(100));
        assert_eq!(x.extract(record(None, Some(ok.as_bytes()), &[])).unwrap().key.id, b"n");
    }

    /// The fuzz targets' bodies over random inputs and the committed seed corpus,
    /// so `cargo test` exercises them without nightly.
    mod fuzz_bodies {
        use proptest::prelude::*;

        use super::super::fuzzing;

        fn corpus(target: &str) -> Vec<Vec<u8>> {
            let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus").join(target);
            let entries = std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("seed corpus {}: {e}", dir.display()));
            let seeds: Vec<Vec<u8>> = entries.map(|e| std::fs::read(e.unwrap().path()).unwrap()).collect();
            assert!(!seeds.is_empty(), "no seeds in {}", dir.display());
            seeds
        }

        #[test]
        fn seed_corpus_passes() {
            corpus("extract").iter().for_each(|s| fuzzing::extract(s));
            corpus("header_name").iter().for_each(|s| fuzzing::header_name(s));
        }

        proptest! {
            #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

            #[test]
            fn extract_holds_for_any_bytes(data in proptest::collection::vec(any::<u8>(), 0..600)) {
                fuzzing::extract(&data);
            }

            #[test]
            fn extract_holds_for_json_like_payloads(
                flags in any::<u8>(),
                max in any::<u8>(),
                json in r#"[\[\]{}":,0-9a-z/~ \\-]{0,200}"#,
                name in proptest::collection::vec(any::<u8>(), 0..12),
            ) {
                // flags, max_bytes, an empty key, the payload, one header.
                let mut data = vec![flags & !2, max, 0, 0];
                data.extend_from_slice(&(json.len() as u16).to_be_bytes());
                data.extend_from_slice(json.as_bytes());
                data.extend_from_slice(&(name.len() as u16).to_be_bytes());
                data.extend_from_slice(&name);
                data.extend_from_slice(&[0, 2, b'i', b'd', 0]);
                fuzzing::extract(&data);
            }

            #[test]
            fn header_name_holds_for_any_bytes(data in proptest::collection::vec(any::<u8>(), 0..200)) {
                fuzzing::header_name(&data);
            }
        }
    }

    #[test]
    fn the_digest_is_keyed_per_process_not_by_xxh3s_public_secret() {
        let key = EventKey { scope: Arc::from("s"), id: b"evt-1".to_vec() };
        assert_eq!(key.digest(), key.clone().digest(), "stable within the process");
        assert_ne!(key.digest(), xxh3_128(&key.encode()), "not the public default secret's");
        assert_ne!(digest_secret(), &[0u8; 192]);
    }

    #[test]
    fn key_encoding_round_trips_and_separates_scopes() {
        let k = EventKey { scope: Arc::from("ab"), id: b"c".to_vec() };
        let other = EventKey { scope: Arc::from("a"), id: b"bc".to_vec() };
        assert_ne!(k.encode(), other.encode());
        assert_eq!(EventKey::decode(&k.encode()), Some(k));
    }
}

/// Bodies of the fuzz targets (`fuzz/`), here so the ordinary test suite runs
/// them too (`cargo test --lib fuzzing`), without nightly. Each takes arbitrary
/// bytes and panics only when an invariant of the code under test breaks.
#[doc(hidden)]
pub mod fuzzing {
    use std::num::NonZeroUsize;

    use super::*;

    /// Reads length-prefixed pieces off the front of fuzz input.
    struct Bytes<'a>(&'a [u8]);

    impl<'a> Bytes<'a> {
        fn byte(&mut self) -> u8 {
            let (first, rest) = self.0.split_first().map_or((0, &[][..]), |(f, r)| (*f, r));
            self.0 = rest;
            first
        }

        /// A piece of up to `u16` bytes (its length is clipped to what is left).
        fn piece(&mut self) -> &'a [u8] {
            let len = (usize::from(self.byte()) << 8 | usize::from(self.byte())).min(self.0.len());
            let (piece, rest) = self.0.split_at(len);
            self.0 = rest;
            piece
        }
    }

    /// A record from fuzz input: flags, key, payload, then headers (raw name
    /// bytes, so names need not be UTF-8) until the input ends. Also the
    /// `max_bytes` and oversize policy to extract with.
    fn record_from(data: &[u8]) -> (Record, usize, OnOversize) {
        let mut input = Bytes(data);
        let flags = input.byte();
        let max_bytes = match input.byte() {
            0 => 512,
            n => usize::from(n),
        };
        let key = input.piece();
        let payload = input.piece();
        let mut raw = Vec::new();
        while !input.0.is_empty() && raw.len() < 4096 {
            let name = input.piece();
            let value = input.piece();
            let null = input.byte() & 1 == 1;
            raw.push((name, (!null).then_some(value)));
        }
        let (headers, bad_header) = decode_headers(raw);
        let record = Record {
            position: Position { topic: Arc::from("fuzz"), partition: 0, offset: 0 },
            key: (flags & 1 == 0).then(|| key.to_vec()),
            payload: (flags & 2 == 0).then(|| payload.to_vec()),
            headers,
            timestamp_ms: None,
            bad_header,
        };
        let on_oversize = if flags & 4 == 0 { OnOversize::Hash } else { OnOversize::DeadLetter };
        (record, max_bytes, on_oversize)
    }

    /// Every key source over one arbitrary record: no panic, and each answer
    /// holds what extraction promises.
    pub fn extract(data: &[u8]) {
        let (record, max_bytes, on_oversize) = record_from(data);
        let mut sources = vec![
            KeySource::Header("event-id".into()),
            KeySource::RecordKey,
            KeySource::Json("/id".into()),
            KeySource::Json(String::new()),
            KeySource::Json("/payment/id".into()),
            KeySource::Json("/a~1b/0/~0".into()),
            KeySource::PayloadHash,
        ];
        if let Some((name, _)) = record.headers.first() {
            sources.push(KeySource::Header(name.clone()));
        }
        let field_sets: [&[&str]; 2] = [&[], &["/amount", "/x/~1y", "", "/0"]];
        for source in sources {
            for fields in field_sets {
                let x = KeyExtractor::new(KeyConfig {
                    source: source.clone(),
                    scope: "fuzz".into(),
                    max_bytes: NonZeroUsize::new(max_bytes).expect("max_bytes is 1..=512 by construction"),
                    on_oversize,
                    fingerprint_fields: fields.iter().map(|f| f.to_string()).collect(),
                });
                check_extraction(&x, &record, max_bytes, on_oversize);
            }
        }
    }

    fn check_extraction(x: &KeyExtractor, record: &Record, max_bytes: usize, on_oversize: OnOversize) {
        let first = x.extract(record.clone());
        let again = x.extract(record.clone());
        let back = match (&first, &again) {
            (Ok(a), Ok(b)) => {
                assert_eq!((&a.key, a.fingerprint), (&b.key, b.fingerprint), "extraction is deterministic");
                assert!(!a.key.id.is_empty(), "an event ID is never empty");
                let hashed = a.key.id.len() == 71 && a.key.id.starts_with(b"sha256:");
                assert!(a.key.id.len() <= max_bytes || hashed, "IDs over max_bytes are hashed");
                assert_eq!(a.digest, a.key.digest(), "the digest is the key's");
                assert_eq!(EventKey::decode(&a.key.encode()).as_ref(), Some(&a.key), "keys round-trip");
                assert!(record.bad_header.is_none(), "a record with a bad header name is never emitted");
                &a.record
            }
            (Err((r, e)), Err((_, e2))) => {
                assert_eq!(e, e2, "extraction is deterministic");
                let known = ["missing_id", "invalid_json", "oversize_id", "bad_header"];
                assert!(known.contains(&e.reason()), "unexpected reason {} for a key error", e.reason());
                assert!(!e.to_string().is_empty());
                if record.bad_header.is_some() {
                    assert_eq!(e.reason(), "bad_header", "a bad header name is reported as such");
                }
                if on_oversize == OnOversize::Hash {
                    assert_ne!(e.reason(), "oversize_id", "on_oversize = hash never dead-letters for size");
                }
                r
            }
            _ => panic!("extraction is deterministic: one Ok, one Err"),
        };
        assert_eq!(
            (&back.key, &back.payload, &back.headers, &back.bad_header),
            (&record.key, &record.payload, &record.headers, &record.bad_header),
            "the record comes back as it went in"
        );
    }

    /// Header-name decoding: UTF-8 kept as is, anything else as reversible
    /// `hex:`; a list of names is marked bad exactly when one name is.
    pub fn header_name(data: &[u8]) {
        match decode_header_name(data) {
            Ok(name) => assert_eq!(Some(name.as_str()), std::str::from_utf8(data).ok()),
            Err(bad) => {
                assert!(std::str::from_utf8(data).is_err(), "valid UTF-8 was refused");
                let digits = bad.kept.strip_prefix("hex:").expect("kept names start with hex:");
                assert_eq!(digits, hex(data), "the kept name is the hex of the bytes");
                assert!(bad.description.contains("not UTF-8"), "{}", bad.description);
            }
        }
        let names: Vec<&[u8]> = data.split(|b| *b == b'\n').collect();
        let (headers, bad) = decode_headers(names.iter().map(|n| (*n, Some(*n))));
        assert_eq!(headers.len(), names.len(), "no header is dropped");
        let any_bad = names.iter().any(|n| std::str::from_utf8(n).is_err());
        assert_eq!(bad.is_some(), any_bad, "bad_header is set exactly when a name is not UTF-8");
        for ((name, value), raw) in headers.iter().zip(&names) {
            assert_eq!(value.as_deref(), Some(*raw), "values are kept byte for byte");
            if let Ok(s) = std::str::from_utf8(raw) {
                assert_eq!(name, s);
            }
        }
    }
}
