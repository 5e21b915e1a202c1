//! The source: one Kafka consumer in a consumer group, its rebalances, and
//! its commits.
//!
//! The consumer's main queue is polled on a dedicated thread, so rebalance
//! callbacks may block there (draining revoked partitions) without stalling
//! the async workers. Each assigned partition's messages are split into their
//! own queue *before* the assignment is applied, so no message of an assigned
//! partition can reach the main queue, and a [`PartitionHandler`] runs one task
//! per partition.
//!
//! Commits: every `commit_interval`, and synchronously on revoke and shutdown,
//! the [`CommitBook`] is asked for finished watermarks (after the store's
//! durability barrier) and they are committed. Auto-commit and the offset
//! store are off: nothing else moves an offset.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::Duration;

use rdkafka::client::ClientContext;
use rdkafka::consumer::stream_consumer::StreamPartitionQueue;
use rdkafka::consumer::MessageStream;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance, StreamConsumer};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};
use tracing::{debug, error, info, warn};

use crate::config::KafkaConfig;
use crate::error::SourceError;
use crate::kafka_client::{self, KafkaClients};
use crate::metrics::Metrics;
use crate::offsets::{CommitBook, LogMarks, Ready, TopicPartition};

type Kafka = StreamConsumer<SourceContext>;

/// One partition's own queue, split off the group consumer: its records come in offset order.
pub struct PartitionQueue {
    queue: StreamPartitionQueue<SourceContext>,
    consumer: Weak<Kafka>,
    tp: TopicPartition,
}

impl PartitionQueue {
    /// The partition's records, in offset order (read by one task only).
    pub fn stream(&self) -> MessageStream<'_, SourceContext> {
        self.queue.stream()
    }

    /// The consumer's position here: the next offset it hands out. Polling the stream moves it
    /// past records the application never sees (transaction markers, and the aborted
    /// records a `read_committed` consumer drops), so, read by the queue's one reader with
    /// everything it took begun, every offset below it is either taken or no record.
    pub fn position(&self) -> Option<i64> {
        let consumer = self.consumer.upgrade()?;
        let positions = consumer.position().ok()?;
        match positions.find_partition(&self.tp.0, self.tp.1)?.offset() {
            Offset::Offset(next) => Some(next),
            _ => None,
        }
    }
}

/// How long `start` waits for the brokers' first answer.
const PROBE_TIMEOUT: Duration = Duration::from_secs(5);

/// How often the source says it is still waiting to join its group.
const JOIN_LOG_EVERY: Duration = Duration::from_secs(5);

/// What the group remembers of a partition when it is assigned.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Resume {
    /// The committed offset: where consumption starts.
    pub committed: Option<i64>,
    /// Where the output and dead-letter topics stood at that commit (from its metadata).
    pub logs: LogMarks,
}

/// Moves one assigned partition's fetch position back, so its queue delivers
/// again from there (what was queued after it is dropped by librdkafka).
#[derive(Clone)]
pub struct Rewind {
    consumer: Weak<Kafka>,
    tp: TopicPartition,
}

impl Rewind {
    /// Fetches again from `offset` (from the log start when `None`). Blocking (up to 10 s).
    pub fn to(&self, offset: Option<i64>) -> Result<(), rdkafka::error::KafkaError> {
        let consumer = self.consumer.upgrade().ok_or(rdkafka::error::KafkaError::Canceled)?;
        let at = offset.map_or(Offset::Beginning, Offset::Offset);
        consumer.seek(&self.tp.0, self.tp.1, at, Duration::from_secs(10))
    }
}

/// Receives partitions as they are assigned and revoked.
pub trait PartitionHandler: Send + Sync + 'static {
    /// Start work on a newly assigned partition; `rewind` moves its fetch position back.
    fn assigned(&self, tp: TopicPartition, queue: PartitionQueue, resume: Resume, rewind: Rewind);
    /// Stop work on these partitions: no new batches; in-flight batches may
    /// finish within the drain timeout. Returns when they have stopped.
    fn revoked(&self, partitions: &[TopicPartition]);
    /// Partitions currently running.
    fn all(&self) -> Vec<TopicPartition>;
}

/// How the source ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum StopMode {
    /// Finish in-flight batches (bounded), commit, leave the group.
    Drain,
    /// Stop taking records and leave the group without committing anything
    /// more, as a member that dies would (tests use it: everything after the
    /// last commit is redelivered to the next owner).
    Abandon,
}

/// The group consumer's callbacks: hands assigned and revoked partitions to the handler and
/// commits what the [`CommitBook`] says is finished.
pub struct SourceContext {
    consumer: OnceLock<Weak<Kafka>>,
    handler: Arc<dyn PartitionHandler>,
    book: Arc<CommitBook>,
    metrics: Metrics,
    abandon: AtomicBool,
    /// Interned topic names, so records share one allocation per topic.
    topics: HashMap<String, Arc<str>>,
    /// Partitions of the subscribed topics, when known (for the single-instance check).
    total_partitions: Option<usize>,
    single_instance_store: bool,
    assigned: Mutex<HashSet<TopicPartition>>,
    /// The group assigned this member its partitions (perhaps none) at least once.
    joined: AtomicBool,
}

impl ClientContext for SourceContext {}

impl ConsumerContext for SourceContext {
    fn pre_rebalance(&self, base: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        match rebalance {
            Rebalance::Assign(tpl) => self.on_assign(base, tpl),
            Rebalance::Revoke(tpl) => self.on_revoke(base, tpl),
            Rebalance::Error(e) => warn!(error = %e, "rebalance error"),
        }
    }
}

impl SourceContext {
    fn tp_list(&self, tpl: &TopicPartitionList) -> Vec<TopicPartition> {
        tpl.elements()
            .iter()
            .map(|e| {
                let topic = self.topics.get(e.topic()).cloned().unwrap_or_else(|| Arc::from(e.topic()));
                (topic, e.partition())
            })
            .collect()
    }

    fn on_assign(&self, base: &BaseConsumer<Self>, tpl: &TopicPartitionList) {
        let Some(consumer) = self.consumer.get().and_then(Weak::upgrade) else {
            error!("assignment arrived before the consumer was ready; it will be redelivered on the next rebalance");
            return;
        };
        let partitions = self.tp_list(tpl);
        info!(partitions = ?partitions.iter().map(|(t, p)| format!("{t}/{p}")).collect::<Vec<_>>(), "partitions assigned");
        self.metrics.rebalance("assign");
        let resumes = self.resumes(base, tpl);
        for tp in partitions {
            match consumer.split_partition_queue(&tp.0, tp.1) {
                Some(queue) => {
                    let queue = PartitionQueue { queue, consumer: Arc::downgrade(&consumer), tp: tp.clone() };
                    let resume = resumes.get(&tp).copied().unwrap_or_default();
                    self.book.open(tp.clone(), resume.committed, resume.logs);
                    if let Some(committed) = resume.committed {
                        self.metrics
                            .committed_offset
                            .with_label_values(&[tp.0.to_string(), tp.1.to_string()])
                            .set(committed);
                    }
                    self.assigned.lock().unwrap_or_else(|p| p.into_inner()).insert(tp.clone());
                    let rewind = Rewind { consumer: Arc::downgrade(&consumer), tp: tp.clone() };
                    self.handler.assigned(tp, queue, resume, rewind);
                }
                None => {
                    error!(topic = %tp.0, partition = tp.1, "cannot split the partition's queue; it is not processed")
                }
            }
        }
        self.metrics.set_ready(true);
        self.joined.store(true, Ordering::SeqCst);
        let owned = self.assigned.lock().unwrap_or_else(|p| p.into_inner()).len();
        self.embedded_store_ownership(owned);
        if let Some(total) = self.total_partitions {
            if self.single_instance_store && owned < total {
                warn!(
                    owned,
                    total,
                    "the embedded store is correct for one instance only, but this process owns only part of the \
                     topic: another process in the group decides the other partitions against its own store, so \
                     duplicates across instances are not caught; run one instance or use a shared store"
                );
            }
        }
    }

    /// Committed offsets and their metadata for newly assigned partitions. Without
    /// them (the coordinator does not answer in time) partitions start with no
    /// output mark, and reconciliation reads the output from its beginning.
    fn resumes(&self, base: &BaseConsumer<Self>, tpl: &TopicPartitionList) -> HashMap<TopicPartition, Resume> {
        match base.committed_offsets(tpl.clone(), Duration::from_secs(10)) {
            Ok(committed) => committed
                .elements()
                .iter()
                .map(|e| {
                    let topic = self.topics.get(e.topic()).cloned().unwrap_or_else(|| Arc::from(e.topic()));
                    let committed = match e.offset() {
                        Offset::Offset(o) => Some(o),
                        _ => None,
                    };
                    ((topic, e.partition()), Resume { committed, logs: LogMarks::from_metadata(e.metadata()) })
                })
                .collect(),
            Err(e) => {
                warn!(error = %e, "cannot read committed offsets for the new assignment");
                HashMap::new()
            }
        }
    }

    fn on_revoke(&self, base: &BaseConsumer<Self>, tpl: &TopicPartitionList) {
        let partitions = self.tp_list(tpl);
        let abandon = self.abandon.load(Ordering::SeqCst);
        info!(partitions = partitions.len(), abandon, lost = base.assignment_lost(), "partitions revoked; draining");
        self.metrics.rebalance(if base.assignment_lost() { "lost" } else { "revoke" });
        self.handler.revoked(&partitions);
        if !abandon {
            commit(base, &self.book, &self.metrics, Some(&partitions));
        }
        let mut assigned = self.assigned.lock().unwrap_or_else(|p| p.into_inner());
        for tp in &partitions {
            self.book.close(tp);
            assigned.remove(tp);
        }
        let owned = assigned.len();
        drop(assigned);
        // Not while leaving the group: it is being given up, not split.
        if !abandon && owned > 0 {
            self.embedded_store_ownership(owned);
        }
    }

    /// Tells the metrics how much of the topics this process owns, when it keeps its
    /// claims in an embedded store (the gauge, the status page and `/readyz` say a split).
    fn embedded_store_ownership(&self, owned: usize) {
        if let (true, Some(total)) = (self.single_instance_store, self.total_partitions) {
            self.metrics.embedded_store_ownership(owned, total);
        }
    }
}

/// Commits what the book says is finished and durable.
fn commit<C: Consumer<SourceContext>>(
    consumer: &C,
    book: &CommitBook,
    metrics: &Metrics,
    only: Option<&[TopicPartition]>,
) {
    let ready = match book.prepare(only) {
        Ok(r) => r,
        Err(e) => {
            warn!(error = %e, "store durability barrier failed; offsets not committed this time");
            return;
        }
    };
    if ready.is_empty() {
        return;
    }
    metrics.fsyncs.inc();
    let mut tpl = TopicPartitionList::new();
    for Ready { tp: (topic, partition), offset, logs } in &ready {
        let mut elem = tpl.add_partition(topic, *partition);
        if let Err(e) = elem.set_offset(Offset::Offset(*offset)) {
            error!(%topic, partition, error = %e, "cannot build the commit list");
            return;
        }
        if !logs.is_empty() {
            elem.set_metadata(logs.to_metadata());
        }
    }
    match consumer.commit(&tpl, CommitMode::Sync) {
        Ok(()) => {
            book.committed(&ready);
            metrics.commits.inc();
            for Ready { tp: (topic, partition), offset, .. } in &ready {
                metrics.committed_offset.with_label_values(&[topic.to_string(), partition.to_string()]).set(*offset);
            }
            debug!(partitions = ready.len(), "offsets committed");
        }
        Err(e) => warn!(error = %e, "offset commit failed; will retry with the next commit"),
    }
}

/// The running source; dropping it without `stop` abandons it.
pub struct Source {
    stop: Option<tokio::sync::oneshot::Sender<StopMode>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

/// The group consumer's properties (built in [`crate::kafka_client`], with
/// `[kafka.client]` and `[kafka.consumer]`; the commit-related ones are checked at config validation).
/// `partitions`: the input topics' partitions, among which `[kafka] prefetch_mib` is shared.
pub fn consumer_config(kafka: &KafkaConfig, partitions: Option<usize>) -> ClientConfig {
    KafkaClients::from(kafka).group_consumer(&kafka.group_id, partitions)
}

impl Source {
    /// Subscribes to `[kafka] topics` and starts the thread that polls the consumer; partitions
    /// go to `handler` as they are assigned, and their finished offsets are committed every
    /// `commit_interval` (after the `book`'s barrier). `single_instance_store`: warn when this
    /// process owns only part of the topics (the embedded store is correct for one instance only).
    pub fn start(
        kafka: &KafkaConfig,
        handler: Arc<dyn PartitionHandler>,
        book: Arc<CommitBook>,
        metrics: Metrics,
        commit_interval: Duration,
        single_instance_store: bool,
    ) -> Result<Source, SourceError> {
        let topics: HashMap<String, Arc<str>> =
            kafka.topics.iter().map(|t| (t.clone(), Arc::from(t.as_str()))).collect();
        // Learn the topics' sizes first (for the single-instance check); not fatal if the
        // brokers are merely unreachable (they may come up), fatal when TLS or SASL fails:
        // those settings will not start working by waiting.
        let total_partitions = match kafka_client::probe(&KafkaClients::from(kafka), &kafka.topics, PROBE_TIMEOUT) {
            Ok(probe) => probe.topics.values().try_fold(0usize, |sum, n| Some(sum + (*n)?)),
            Err(e) if e.security => return Err(SourceError::Connect(e)),
            Err(e) => {
                warn!(error = %e, "cannot learn the input topics' partitions yet; consuming anyway");
                None
            }
        };
        let context = SourceContext {
            consumer: OnceLock::new(),
            handler: handler.clone(),
            book: book.clone(),
            metrics: metrics.clone(),
            abandon: AtomicBool::new(false),
            topics,
            total_partitions,
            single_instance_store,
            assigned: Mutex::new(HashSet::new()),
            joined: AtomicBool::new(false),
        };
        let consumer: Arc<Kafka> =
            Arc::new(consumer_config(kafka, total_partitions).create_with_context(context).map_err(SourceError::Create)?);
        consumer.context().consumer.set(Arc::downgrade(&consumer)).ok();
        let names: Vec<&str> = kafka.topics.iter().map(String::as_str).collect();
        consumer.subscribe(&names).map_err(|source| SourceError::Subscribe { topics: kafka.topics.clone(), source })?;

        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel();
        let group = kafka.group_id.clone();
        let thread = std::thread::Builder::new()
            .name("kdedup-source".into())
            .spawn(move || poll_loop(consumer, handler, book, metrics, commit_interval, &group, stop_rx))
            .map_err(SourceError::Thread)?;
        Ok(Source { stop: Some(stop_tx), thread: Some(thread) })
    }

    /// Stops the source and waits for it (blocking: call from a blocking context).
    pub fn stop(mut self, mode: StopMode) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(mode);
        }
        if let Some(t) = self.thread.take() {
            if t.join().is_err() {
                error!("source thread panicked");
            }
        }
    }
}

impl Drop for Source {
    fn drop(&mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(StopMode::Abandon);
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn poll_loop(
    consumer: Arc<Kafka>,
    handler: Arc<dyn PartitionHandler>,
    book: Arc<CommitBook>,
    metrics: Metrics,
    commit_interval: Duration,
    group: &str,
    mut stop: tokio::sync::oneshot::Receiver<StopMode>,
) {
    let runtime = match tokio::runtime::Builder::new_current_thread().enable_time().build() {
        Ok(rt) => rt,
        Err(e) => {
            error!(error = %e, "cannot start the source thread's runtime");
            return;
        }
    };
    let mode = runtime.block_on(async {
        let mut tick = tokio::time::interval(commit_interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // Until the group assigns partitions, say so every few seconds: a join can take the
        // group's initial rebalance delay, or a session timeout when an earlier member of
        // the group left without saying so, and nothing else is logged meanwhile.
        let subscribed = std::time::Instant::now();
        let mut joining =
            tokio::time::interval_at(tokio::time::Instant::now() + JOIN_LOG_EVERY, JOIN_LOG_EVERY);
        joining.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut seen_joined = false;
        loop {
            tokio::select! {
                mode = &mut stop => break mode.unwrap_or(StopMode::Abandon),
                _ = joining.tick(), if !seen_joined => {
                    if consumer.context().joined.load(Ordering::SeqCst) {
                        seen_joined = true;
                    } else {
                        let waited_secs = subscribed.elapsed().as_secs();
                        info!(group, waited_secs, "waiting to join the consumer group: the group has given this member nothing yet (its coordinator waits for the members to join; one that left without saying so is waited for up to its session timeout)");
                    }
                }
                _ = tick.tick() => {
                    commit(&*consumer, &book, &metrics, None);
                    metrics.sample_lag(&*consumer);
                }
                message = consumer.recv() => match message {
                    // Partition queues are split before assignment, so this is not expected.
                    // Hold that partition's commits below this record: it is redelivered
                    // to whoever owns the partition next, never skipped.
                    Ok(m) => {
                        use rdkafka::Message;
                        error!(topic = m.topic(), partition = m.partition(), offset = m.offset(), "record arrived on the main queue; holding its partition's commits below it");
                        let tp: TopicPartition = (Arc::from(m.topic()), m.partition());
                        book.hold(&tp, m.offset());
                    }
                    Err(e) => warn!(error = %e, "consumer error"),
                },
            }
        }
    });
    metrics.set_ready(false);
    match mode {
        StopMode::Drain => {
            let all = handler.all();
            info!(partitions = all.len(), "shutting down: draining partitions");
            handler.revoked(&all);
            commit(&*consumer, &book, &metrics, None);
        }
        StopMode::Abandon => {
            consumer.context().abandon.store(true, Ordering::SeqCst);
            handler.revoked(&handler.all());
        }
    }
    // Closing the consumer leaves the group now (a revoke callback runs here and
    // finds nothing left to drain); the last partition queues went with their tasks.
    drop(runtime);
    debug!(holders = Arc::strong_count(&consumer), "closing the consumer");
    drop(consumer);
    info!("consumer closed");
}
