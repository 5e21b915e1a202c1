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
//!
//! With the HTTP sink, its `[sink.http] results_topic` is the output log: each
//! answer is written there (on the input partition's own partition of it)
//! before its offset is committed, so a new owner completes an effect whose
//! `done` answer it finds instead of calling the endpoint again. Without a
//! results topic a resumed HTTP claim calls again, with the same key.
//!
//! A write counts as ours only if its *last* `kdedup-source-*` headers name
//! the partition and its *last* `kdedup-scope` is our scope: kdedup drops
//! inbound copies of its own header names, and another pipeline (another
//! scope) may write the same output partition for the same source positions.
//!
//! A position names a record only as long as it is not reused: a topic
//! deleted and recreated, an unclean leader election, or offsets reset past a
//! truncation put new records at old positions. So what is found is the
//! position *and* what the write was for ([`Identity`]): the event ID
//! (`kdedup-event-id`) of an output or a result, the payload of a dead letter
//! (which has no event ID when the record had none). A record whose position
//! matches but whose identity does not is not the one written for: its effect
//! runs, its dead letter is written.
//!
//! Bounds ([`Limits`]): without commit metadata (offsets set by
//! `kafka-consumer-groups`) a log is read from its start, and nothing in it
//! proves an unread record irrelevant (sources interleave; watermarks are not
//! trusted, see DESIGN.md on tansu). So the read stops at a deadline, checked
//! on every record, and when the *process's* budget of found writes is spent
//! ([`Limits::max_found`], shared by every partition reconciling or holding
//! what it found at once: a rebalance that assigns many partitions without
//! commit metadata cannot multiply it); a log whose marked start was already
//! deleted by retention cannot be read whole either. A partition gives its
//! share back as its records pass the writes found.
//! Past any of these, [`Found::complete`] is `false`, logged as an error: what
//! was found is still skipped, and a resumed claim whose effect was not found
//! runs again marked `kdedup-possible-repeat: true` (every resumed claim is),
//! so a repeat past the bound is marked, never unmarked.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use anyhow::Context;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{BorrowedMessage, Message};
use rdkafka::{Offset, TopicPartitionList};
use tracing::error;

use crate::kafka_client::KafkaClients;
use crate::offsets::{OutputMark, TopicPartition};
use crate::sink::kafka::headers;

/// Reads the topics kdedup writes back.
#[derive(Clone)]
pub struct Reconciler {
    /// Every client setting (TLS, SASL) the readers need.
    pub kafka: KafkaClients,
    /// The pipeline's dedup scope: only writes carrying it as `kdedup-scope` are ours.
    pub scope: String,
    /// How far one reconciliation reads.
    pub limits: Limits,
    /// Found writes held in this process now, shared by the reconciler's clones.
    pub held: Arc<AtomicUsize>,
    /// One client asks every partition's log ends, made at the first
    /// reconciliation and kept while it answers. A client per reconciliation
    /// (two per partition) took 0.2 to 5 s each at 160 partitions assigned at
    /// once, and no partition starts before its reconciliation ends; a log
    /// with nothing after its mark, the usual case, now costs one offsets
    /// request. A reader is made only for a log that has something to read.
    ends: Arc<Mutex<Option<Arc<BaseConsumer>>>>,
    /// Clients made, shared by the clones (see [`Reconciler::clients_made`]).
    clients: Arc<AtomicUsize>,
}

/// How far one reconciliation reads before it gives up as incomplete.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// For the whole [`Reconciler::find`] (both logs), checked on every record read.
    pub deadline: Duration,
    /// Found writes held at once by the whole process (every partition and
    /// log); an entry costs up to about 64 bytes (a position and an
    /// [`Identity`] in a hash map), so the default 2^20 is at most 64 MiB.
    pub max_found: usize,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits { deadline: Duration::from_secs(120), max_found: 1 << 20 }
    }
}

/// Which of the logs is read: what a write's identity is taken from.
#[derive(Debug, Clone, Copy)]
enum Kind {
    Output,
    DeadLetter,
}

/// A topic partition that one input partition writes to, and where to start reading it.
#[derive(Debug, Clone)]
pub struct Log {
    /// The topic kdedup writes to (output or dead letters).
    pub topic: String,
    /// The partition of it this input partition writes to.
    pub partition: i32,
    /// The commit's mark for this log: reading starts there (at the log start when `None`).
    pub mark: Option<OutputMark>,
}

pub use crate::sink::{event_identity, is_dead_letter_of, Identity};

/// What reconciliation found for one input partition.
#[derive(Debug)]
pub struct Found {
    /// Source offsets whose effect is in the output, with the event each was for.
    pub emitted: HashMap<i64, Identity>,
    /// Source offsets already dead-lettered, with the payload each was for.
    pub dead_lettered: HashMap<i64, Identity>,
    /// Every log was read to its end within [`Limits`]. When `false`, the sets
    /// hold only part of what was written (all of it real writes); the rest is
    /// unknown and resumed claims run again marked as possible repeats.
    pub complete: bool,
    /// This partition's share of the process's budget; given back when dropped.
    pub share: Share,
}

/// Found writes counted against the process's [`Limits::max_found`]; given back on drop.
#[derive(Debug, Default)]
pub struct Share {
    n: usize,
    held: Option<Arc<AtomicUsize>>,
}

impl Share {
    fn new(held: &Arc<AtomicUsize>) -> Share {
        Share { n: 0, held: Some(held.clone()) }
    }

    /// Takes one more entry if the process holds fewer than `max`.
    fn take(&mut self, max: usize) -> bool {
        let Some(held) = &self.held else { return false };
        let taken = held.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |h| (h < max).then_some(h + 1)).is_ok();
        self.n += usize::from(taken);
        taken
    }

    fn absorb(&mut self, mut other: Share) {
        self.n += std::mem::take(&mut other.n);
    }
}

impl Drop for Share {
    fn drop(&mut self) {
        if let Some(held) = &self.held {
            held.fetch_sub(self.n, Ordering::SeqCst);
        }
    }
}

/// Writes found in one log.
struct Written {
    found: HashMap<i64, Identity>,
    complete: bool,
    share: Share,
}

impl Reconciler {
    /// A reconciler with the default [`Limits`].
    /// `kafka`: the config's `&KafkaConfig` (its TLS and SASL settings), or plaintext brokers as `&str`.
    pub fn new(kafka: impl Into<KafkaClients>, scope: &str) -> Reconciler {
        Reconciler {
            kafka: kafka.into(),
            scope: scope.to_string(),
            limits: Limits::default(),
            held: Arc::new(AtomicUsize::new(0)),
            ends: Arc::default(),
            clients: Arc::default(),
        }
    }

    /// Kafka clients this reconciler and its clones have made (for tests).
    pub fn clients_made(&self) -> usize {
        self.clients.load(Ordering::Relaxed)
    }

    fn client(&self) -> anyhow::Result<BaseConsumer> {
        self.clients.fetch_add(1, Ordering::Relaxed);
        // librdkafka wants a group for assign(); this reader never joins or commits.
        self.kafka.reader("kdedup-reconcile").create().context("cannot create the reconciliation reader")
    }

    /// The low and high watermarks of `topic`'s `partition`, from the shared
    /// client (see [`Reconciler::ends`]). A client that fails is dropped, so the
    /// retry asks a new one.
    fn watermarks(&self, topic: &str, partition: i32) -> anyhow::Result<(i64, i64)> {
        let client = {
            let mut ends = self.ends.lock().unwrap_or_else(PoisonError::into_inner);
            match &*ends {
                Some(client) => client.clone(),
                None => ends.insert(Arc::new(self.client()?)).clone(),
            }
        };
        client.fetch_watermarks(topic, partition, Duration::from_secs(10)).map_err(|e| {
            let mut ends = self.ends.lock().unwrap_or_else(PoisonError::into_inner);
            if ends.as_ref().is_some_and(|c| Arc::ptr_eq(c, &client)) {
                *ends = None;
            }
            anyhow::Error::new(e).context(format!("cannot read the offsets of {topic}"))
        })
    }

    /// Reads the output (if fixed) and dead-letter logs of `source` from its marks.
    /// Blocking: run it on the blocking pool.
    pub fn find(
        &self,
        source: &TopicPartition,
        from_offset: i64,
        output: Option<Log>,
        dead_letter: Log,
    ) -> anyhow::Result<Found> {
        let deadline = Instant::now() + self.limits.deadline;
        let emitted = match output {
            Some(log) => self.written_since(source, from_offset, &log, deadline, Kind::Output)?,
            None => Written { found: HashMap::new(), complete: true, share: Share::default() },
        };
        let dead_lettered = self.written_since(source, from_offset, &dead_letter, deadline, Kind::DeadLetter)?;
        let mut share = emitted.share;
        share.absorb(dead_lettered.share);
        Ok(Found {
            complete: emitted.complete && dead_lettered.complete,
            emitted: emitted.found,
            dead_lettered: dead_lettered.found,
            share,
        })
    }

    /// Source offsets of `source` at or after `from_offset` found in `log`,
    /// reading from its mark (or the log start) to the current end, within the limits.
    fn written_since(
        &self,
        source: &TopicPartition,
        from_offset: i64,
        log: &Log,
        deadline: Instant,
        kind: Kind,
    ) -> anyhow::Result<Written> {
        let (topic, output_partition, mark) = (&log.topic, log.partition, log.mark);
        let (low, high) = self.watermarks(topic, output_partition)?;
        let mark = mark.filter(|m| m.partition == output_partition).map(|m| m.offset);
        let start = mark.map_or(low, |m| m.max(low));
        let mut found = Written { found: HashMap::new(), complete: true, share: Share::new(&self.held) };
        let incomplete = |found: &mut Written, why: &str, position: i64| {
            found.complete = false;
            error!(
                topic = %source.0, partition = source.1, log = %topic, log_partition = output_partition,
                start, position, end = high, found = found.found.len(), why,
                "reconciliation incomplete; resumed claims not found run again marked kdedup-possible-repeat"
            );
        };
        if mark.is_some_and(|m| m < low) {
            // Writes after the last commit were deleted by retention before anyone read them.
            incomplete(&mut found, "the log no longer holds its marked start (retention)", low);
        }
        if start >= high {
            return Ok(found);
        }
        let consumer = self.client()?;
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition_offset(topic, output_partition, Offset::Offset(start))?;
        consumer.assign(&tpl)?;
        let (source_partition, scope) = (source.1.to_string(), self.scope.as_bytes());
        let mut position = start;
        loop {
            if Instant::now() > deadline {
                incomplete(&mut found, "deadline passed", position);
                return Ok(found);
            }
            // Past the high watermark, take only what has already arrived: a broker
            // that reports the watermark at the start of its last batch (tansu does)
            // still delivers that whole batch in the same fetch.
            let wait = if position < high { Duration::from_millis(200) } else { Duration::from_millis(50) };
            let Some(message) = consumer.poll(wait) else {
                if position >= high {
                    break;
                }
                continue;
            };
            let message = message.with_context(|| format!("reading {topic}"))?;
            position = message.offset() + 1;
            let written = written_for(&message, source, &source_partition, scope, kind);
            if let Some((offset, identity)) = written.filter(|&(offset, _)| offset >= from_offset) {
                if !found.found.contains_key(&offset) && !found.share.take(self.limits.max_found) {
                    incomplete(
                        &mut found,
                        "the process holds as many found writes as it may (Limits::max_found)",
                        message.offset(),
                    );
                    return Ok(found);
                }
                found.found.insert(offset, identity);
            }
        }
        Ok(found)
    }
}

/// The source offset and identity of a write of `source` (in `scope`), read from its
/// headers; `None` for another's write, or one that does not say what it was for.
fn written_for(
    message: &BorrowedMessage<'_>,
    source: &TopicPartition,
    source_partition: &str,
    scope: &[u8],
    kind: Kind,
) -> Option<(i64, Identity)> {
    // Names as bytes: any producer may write a non-UTF-8 name into these topics.
    let pairs = crate::event::header_pairs(message);
    let last = |name: &str| pairs.iter().rev().find(|(k, _)| *k == name.as_bytes()).and_then(|(_, v)| *v);
    // An HTTP answer counts only when it settled the effect as done: a conflict's or a
    // refusal's record is dead-lettered after it, by the dead-letter log's reconciliation.
    let ours = last(headers::SCOPE) == Some(scope)
        && last(headers::SOURCE_TOPIC) == Some(source.0.as_bytes())
        && last(headers::SOURCE_PARTITION) == Some(source_partition.as_bytes())
        && last(headers::OUTCOME).is_none_or(|o| o == b"done");
    if !ours {
        return None;
    }
    let offset =
        last(headers::SOURCE_OFFSET).and_then(|o| std::str::from_utf8(o).ok()).and_then(|o| o.parse::<i64>().ok())?;
    // What the write was for; a write that does not say is not matched to any record.
    let identity = match kind {
        Kind::Output => last(headers::EVENT_ID).map(event_identity),
        Kind::DeadLetter => Some(xxhash_rust::xxh3::xxh3_128(message.payload().unwrap_or_default())),
    }?;
    Some((offset, identity))
}
