//! Reconciliation: which records of a partition already had their effect (or
//! their dead letter), though the claim was never completed or the offset
//! never committed (the owner died in between).
//!
//! Design choice: the output topic is the log of what was emitted. Each
//! output record carries its source position (`kdedup-source-*` headers),
//! and each offset commit carries, in its metadata, the output offset below
//! which everything before the committed offset lies ([`crate::offsets::LogMarks`]). A new
//! owner reads the output partition from that mark to its end and collects
//! the source offsets of its partition at or after the committed offset: those
//! effects ran, and are completed without running again. The dead-letter topic
//! is reconciled the same way, so a bad record is dead-lettered once.
//!
//! Why not Kafka transactions (outputs and offsets in one transaction,
//! KIP-447 fencing)? They close the window too, but they tie the effect to
//! Kafka (no other sink benefits), and the test broker (tansu) shows aborted
//! transactional records to `read_committed` readers, so such a design could
//! not be proven here.
//!
//! The window left: a member that is *alive* but has lost its partitions (a
//! zombie, e.g. paused past its session timeout) may still append after the
//! new owner has read the output. Resumed claims are therefore emitted with
//! `kdedup-possible-repeat: true`. A SIGKILLed member cannot append, so for
//! crashes the output is exactly once. Reconciliation needs a fixed output
//! partition per input partition (`[sink] partitioning = "source"`); with
//! `"key"` every resumed claim is only marked.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use anyhow::{anyhow, Context};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Headers, Message};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};

use crate::offsets::{OutputMark, TopicPartition};
use crate::sink::kafka::headers;

/// Reads the topics kdedup writes back.
#[derive(Clone)]
pub struct Reconciler {
    pub brokers: String,
}

/// A topic partition that one input partition writes to, and where to start reading it.
#[derive(Debug, Clone)]
pub struct Log {
    pub topic: String,
    pub partition: i32,
    pub mark: Option<OutputMark>,
}

/// What reconciliation found for one input partition.
#[derive(Debug, Default)]
pub struct Found {
    pub emitted: HashSet<i64>,
    pub dead_lettered: HashSet<i64>,
}

impl Reconciler {
    /// Reads the output (if fixed) and dead-letter logs of `source` from its marks.
    /// Blocking: run it on the blocking pool.
    pub fn find(
        &self,
        source: &TopicPartition,
        from_offset: i64,
        output: Option<Log>,
        dead_letter: Log,
    ) -> anyhow::Result<Found> {
        Ok(Found {
            emitted: match output {
                Some(log) => self.written_since(source, from_offset, &log)?,
                None => HashSet::new(),
            },
            dead_lettered: self.written_since(source, from_offset, &dead_letter)?,
        })
    }

    /// Source offsets of `source` at or after `from_offset` found in `log`,
    /// reading from its mark (or the log start) to the current end.
    fn written_since(&self, source: &TopicPartition, from_offset: i64, log: &Log) -> anyhow::Result<HashSet<i64>> {
        let (topic, output_partition, mark) = (&log.topic, log.partition, log.mark);
        let consumer: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", &self.brokers)
            // librdkafka wants a group for assign(); this reader never joins or commits.
            .set("group.id", "kdedup-reconcile")
            .set("enable.auto.commit", "false")
            .set("enable.partition.eof", "false")
            .create()
            .context("cannot create the reconciliation reader")?;
        let timeout = Duration::from_secs(10);
        let (low, high) = consumer
            .fetch_watermarks(topic, output_partition, timeout)
            .with_context(|| format!("cannot read the offsets of {topic}"))?;
        let start = mark.filter(|m| m.partition == output_partition).map_or(low, |m| m.offset.max(low));
        let mut found = HashSet::new();
        if start >= high {
            return Ok(found);
        }
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition_offset(topic, output_partition, Offset::Offset(start))?;
        consumer.assign(&tpl)?;
        let deadline = Instant::now() + Duration::from_secs(120);
        let mut position = start;
        loop {
            // Past the high watermark, take only what has already arrived: a broker
            // that reports the watermark at the start of its last batch (tansu does)
            // still delivers that whole batch in the same fetch.
            let wait = if position < high { Duration::from_millis(200) } else { Duration::from_millis(50) };
            let Some(message) = consumer.poll(wait) else {
                if position >= high {
                    break;
                }
                if Instant::now() > deadline {
                    return Err(anyhow!(
                        "reading {topic}/{output_partition} from {start} to {high} timed out at {position}"
                    ));
                }
                continue;
            };
            let message = message.with_context(|| format!("reading {topic}"))?;
            position = message.offset() + 1;
            let Some(hs) = message.headers() else { continue };
            let header = |name: &str| {
                hs.iter().find(|h| h.key == name).and_then(|h| h.value).and_then(|v| std::str::from_utf8(v).ok())
            };
            let same_source = header(headers::SOURCE_TOPIC) == Some(&*source.0)
                && header(headers::SOURCE_PARTITION).and_then(|p| p.parse::<i32>().ok()) == Some(source.1);
            if let (true, Some(offset)) =
                (same_source, header(headers::SOURCE_OFFSET).and_then(|o| o.parse::<i64>().ok()))
            {
                if offset >= from_offset {
                    found.insert(offset);
                }
            }
        }
        Ok(found)
    }
}
