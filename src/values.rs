//! Value types shared across a line that should hold: sinks and the store both use
//! [`EffectResponse`] and [`now_ms`] (a sink does not import the store); the core and the
//! consumer group's commit book both use [`OutputMark`] and [`TopicPartition`] (the core
//! does not import the commit marks). A leaf: it imports only `error`.

use std::sync::Arc;

use crate::error::StoreError;

/// A partition: (topic, partition number).
pub type TopicPartition = (Arc<str>, i32);

/// A position in a topic kdedup writes to: every record of a partition below
/// the committed offset was written below `offset` of `partition`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OutputMark {
    /// The partition written to.
    pub partition: i32,
    /// Writes for records below the committed offset all lie below this one:
    /// reconciliation reads the log from here.
    pub offset: i64,
}

impl OutputMark {
    /// Moves the mark past a record that landed at `landed` (same partition only
    /// moves forward; a new partition replaces it).
    pub fn advance(mark: &mut Option<OutputMark>, landed: OutputMark) {
        let next = OutputMark { partition: landed.partition, offset: landed.offset + 1 };
        if mark.is_none_or(|m| m.partition != next.partition || m.offset < next.offset) {
            *mark = Some(next);
        }
    }
}

impl OutputMark {
    /// Keeps the mark at or before `write`, a write the commit does not cover
    /// yet: reading from the mark must find it (a mark on another partition is
    /// replaced, as [`OutputMark::advance`] would).
    pub fn hold_at(mark: &mut Option<OutputMark>, write: OutputMark) {
        if mark.is_none_or(|m| m.partition != write.partition || m.offset > write.offset) {
            *mark = Some(write);
        }
    }
}

/// What an effect answered, kept on its claim row once the effect is done
/// (`kdedup inspect` shows it): the seeds' "return the stored result". Only
/// sinks that get an answer (HTTP) record one.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct EffectResponse {
    /// The HTTP status of the answer that settled the effect.
    pub status: u16,
    /// SHA-256 (hex) of the body as read, at most the sink's response limit.
    pub body_sha256: String,
    /// Bytes of the body read (the hash covers these).
    pub body_bytes: u64,
    /// The body's first bytes as UTF-8 (invalid sequences replaced), bounded.
    pub excerpt: String,
    /// When the answer came (ms since the epoch).
    pub at_ms: u64,
    /// Requests it took, the settling one included.
    pub attempts: u32,
    /// Response headers kept for replay by `kdedup serve` (lower-case names); empty for sinks.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub headers: Vec<(String, String)>,
    /// The whole body (base64) when `kdedup serve` kept it: answers up to its
    /// `record_body_bytes`; `None` for larger ones (their hash is kept) and for sinks.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub body_base64: Option<String>,
}

impl EffectResponse {
    /// Stored form (JSON; the stores keep it as text or bytes).
    pub fn encode(&self) -> String {
        serde_json::to_string(self).expect("a struct of strings and numbers serializes")
    }

    /// The inverse of [`EffectResponse::encode`]; a row that does not parse is corrupt.
    pub fn decode(text: &str) -> Result<EffectResponse, StoreError> {
        serde_json::from_str(text).map_err(|e| StoreError::Corrupt(format!("recorded response: {e}")))
    }
}

/// Milliseconds since the Unix epoch, the store's clock.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

/// Milliseconds since the Unix epoch as a person reads them: RFC 3339 in UTC, and how far
/// from now ("2026-12-05T01:02:03.456Z, 3 min ago").
pub fn human_time(ms: u64) -> String {
    let Some(at) = chrono::DateTime::from_timestamp_millis(ms as i64) else {
        return format!("{ms} ms since the epoch");
    };
    let now = now_ms();
    let (secs, dir) = if ms <= now { ((now - ms) / 1000, "ago") } else { ((ms - now) / 1000, "from now") };
    let span = match secs {
        s if s < 120 => format!("{s} s"),
        s if s < 7200 => format!("{} min", s / 60),
        s if s < 172_800 => format!("{} h", s / 3600),
        s => format!("{} days", s / 86_400),
    };
    format!("{}, {span} {dir}", at.to_rfc3339_opts(chrono::SecondsFormat::Millis, true))
}
