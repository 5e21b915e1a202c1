//! The key stage: a consumed record becomes an [`Envelope`] carrying its
//! dedup key `(scope, event_id)` and a payload fingerprint, or a
//! [`RecordError`] saying why it cannot be handled (it is then dead-lettered).
//!
//! Event IDs are bytes, not strings: non-UTF-8 IDs are fine. IDs over
//! `max_bytes` are replaced by `sha256:<hex>` of the ID (or dead-lettered, by
//! policy), so the store never holds unbounded keys.

use std::fmt;
use std::sync::Arc;

use rdkafka::message::{BorrowedMessage, Headers, Message};
use sha2::{Digest, Sha256};
use xxhash_rust::xxh3::xxh3_128;

use crate::config::{KeyConfig, KeySource, OnOversize};
use crate::error::RecordError;

/// Where a record sits in Kafka.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Position {
    pub topic: Arc<str>,
    pub partition: i32,
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
    pub position: Position,
    pub key: Option<Vec<u8>>,
    pub payload: Option<Vec<u8>>,
    pub headers: Vec<(String, Option<Vec<u8>>)>,
    /// Producer or broker timestamp, milliseconds since the epoch.
    pub timestamp_ms: Option<i64>,
}

impl Record {
    pub fn from_message(message: &BorrowedMessage<'_>, topic: &Arc<str>) -> Record {
        let headers = message
            .headers()
            .map(|hs| hs.iter().map(|h| (h.key.to_string(), h.value.map(<[u8]>::to_vec))).collect())
            .unwrap_or_default();
        Record {
            position: Position { topic: topic.clone(), partition: message.partition(), offset: message.offset() },
            key: message.key().map(<[u8]>::to_vec),
            payload: message.payload().map(<[u8]>::to_vec),
            headers,
            timestamp_ms: message.timestamp().to_millis(),
        }
    }

    pub fn header(&self, name: &str) -> Option<&[u8]> {
        self.headers.iter().find(|(k, _)| k == name).and_then(|(_, v)| v.as_deref())
    }
}

/// The dedup key: two pipelines with different scopes never suppress each other.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct EventKey {
    pub scope: Arc<str>,
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

    pub fn decode(bytes: &[u8]) -> Option<EventKey> {
        let len = u16::from_be_bytes(bytes.get(..2)?.try_into().ok()?) as usize;
        let scope = std::str::from_utf8(bytes.get(2..2 + len)?).ok()?;
        Some(EventKey { scope: Arc::from(scope), id: bytes[2 + len..].to_vec() })
    }

    /// 128-bit digest used by the in-process filters (never by the store).
    pub fn digest(&self) -> u128 {
        xxh3_128(&self.encode())
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
    pub record: Record,
    pub key: EventKey,
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
    fn key_encoding_round_trips_and_separates_scopes() {
        let k = EventKey { scope: Arc::from("ab"), id: b"c".to_vec() };
        let other = EventKey { scope: Arc::from("a"), id: b"bc".to_vec() };
        assert_ne!(k.encode(), other.encode());
        assert_eq!(EventKey::decode(&k.encode()), Some(k));
    }
}
