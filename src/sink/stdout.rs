//! Writes each new event as one JSON line on standard output: handy for
//! trying a pipeline out and for piping into other tools.

use std::io::Write;

use super::{Delivered, Effect, Stopping};
use crate::error::SinkError;
use crate::event::hex;

/// JSON lines on standard output.
pub struct StdoutSink;

impl super::Sink for StdoutSink {
    fn kind(&self) -> &'static str {
        "stdout"
    }

    async fn deliver(&self, batch: &[Effect<'_>], _stop: &Stopping) -> Vec<Result<Delivered, SinkError>> {
        let mut buf = Vec::with_capacity(batch.len() * 128);
        for Effect { envelope: e, possible_repeat, observed, replay } in batch {
            let payload = e.record.payload.as_deref().unwrap_or_default();
            let mut line = serde_json::json!({
                "event_id": e.key.display_id(),
                "scope": &*e.key.scope,
                "topic": &*e.record.position.topic,
                "partition": e.record.position.partition,
                "offset": e.record.position.offset,
                "payload": std::str::from_utf8(payload).map(str::to_string).unwrap_or_else(|_| format!("hex:{}", hex(payload))),
                "possible_repeat": possible_repeat,
                "replay": replay,
            });
            if let Some(o) = observed {
                line["duplicate"] = o.duplicate.into();
                if o.conflict {
                    line["conflict"] = true.into();
                }
                if let Some(f) = o.first {
                    line["first"] = serde_json::json!({"topic": f.topic, "partition": f.partition, "offset": f.offset});
                }
            }
            serde_json::to_writer(&mut buf, &line).expect("writing JSON to a Vec cannot fail");
            buf.push(b'\n');
        }
        let result = tokio::task::spawn_blocking(move || {
            let mut out = std::io::stdout().lock();
            out.write_all(&buf).and_then(|()| out.flush())
        })
        .await
        .unwrap_or_else(|e| Err(std::io::Error::other(e)));
        match result {
            Ok(()) => batch.iter().map(|_| Ok(Delivered::done())).collect(),
            Err(e) => {
                batch.iter().map(|_| Err(SinkError::Stdout(std::io::Error::new(e.kind(), e.to_string())))).collect()
            }
        }
    }
}
