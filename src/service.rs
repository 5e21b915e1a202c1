//! `kdedup run`: assembles the stages from a [`Config`] and runs them until
//! the shutdown future says how to stop. Tests and the demo call [`run`]
//! directly with their own shutdown future, so nothing needs a signal.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tracing::{debug, info, warn};

use crate::config::{Config, SinkConfig};
use crate::decide::{Claimant, Core, Fatal};
use crate::kafka_client::KafkaClients;
use crate::metrics::{Metrics, MetricsServer};
use crate::offsets::CommitBook;
use crate::pipeline::{Liveness, Stages, Workers};
use crate::reconcile::Reconciler;
use crate::sink::{AnySink, CustomSink, HttpSink, KafkaSink, KafkaWriter, SideTopics, StdoutSink};
use crate::source::{Source, StopMode};
use crate::store::{now_ms, DedupStore, Store};

/// What a caller can bring to a run besides the config.
#[derive(Default, Clone)]
pub struct RunOptions {
    /// Shared with the caller, who may read counts while the run goes on.
    pub metrics: Metrics,
    /// Serve `[metrics] listen`; off for in-process runs (demo, tests).
    pub serve_metrics: bool,
    /// The effect, when it is the caller's own: needs `[sink] kind = "custom"`.
    pub sink: Option<CustomSink>,
}

/// Runs `config`'s pipeline until `shutdown` completes (or a fatal error), then stops the way
/// its [`StopMode`] says: `Drain` finishes in-flight batches within `[pipeline] drain_timeout_ms`,
/// commits and leaves the group; `Abandon` leaves without committing more, as a crash would.
///
/// Errors when the store, the brokers or the sink cannot be set up, or when a fatal error
/// stopped the run (an effect no retry fixes, a panicking partition task).
///
/// ```no_run
/// use kdedup::{Config, RunOptions, StopMode};
///
/// # async fn example() -> anyhow::Result<()> {
/// let config = Config::load("config/kdedup.toml".as_ref())?;
/// let options = RunOptions { serve_metrics: true, ..RunOptions::default() };
/// let counts = options.metrics.clone(); // readable while it runs
/// kdedup::run(&config, options, async {
///     tokio::signal::ctrl_c().await.ok();
///     StopMode::Drain
/// })
/// .await?;
/// println!("{} records consumed", counts.consumed.get());
/// # Ok(())
/// # }
/// ```
pub async fn run(config: &Config, options: RunOptions, shutdown: impl Future<Output = StopMode>) -> anyhow::Result<()> {
    run_decorated(config, options, shutdown, |sink| sink).await
}

/// [`run`], with `decorate` applied to the configured sink (`kdedup::testkit`'s fault points).
pub(crate) async fn run_decorated(
    config: &Config,
    options: RunOptions,
    shutdown: impl Future<Output = StopMode>,
    decorate: impl FnOnce(AnySink) -> AnySink,
) -> anyhow::Result<()> {
    let metrics = options.metrics;
    let _server = match (options.serve_metrics, config.metrics_listen) {
        (true, Some(addr)) => {
            let server = MetricsServer::start(addr, metrics.clone())?;
            info!(addr = %server.addr, "serving /metrics, /healthz and /readyz");
            Some(server)
        }
        _ => None,
    };

    let store = open_store(config, &metrics).await?;
    metrics.topics(&config.kafka.topics);
    metrics.set_ttl(config.retention.ttl);
    let probe = preflight(config).await?;
    metrics
        .set_topic_partitions(config.kafka.topics.iter().map(|t| (t.as_str(), probe.topics.get(t).copied().flatten())));
    let writer = KafkaWriter::new(&(&config.kafka).into()).context("cannot create the Kafka producer")?;
    let sink = decorate(configured_sink(config, &writer, options.sink, &metrics)?);
    let side = side_topics(config, &writer)?;

    let liveness = Arc::new(liveness(config).await);
    let fatal = Fatal::default();
    let book = Arc::new(commit_book(&store, &metrics));
    let mut core = Core::new(config, store.clone(), sink, side, metrics.clone(), Claimant::Position)?;
    core.fatal = fatal.clone();
    let stages = Arc::new(Stages {
        core,
        book: book.clone(),
        reconciler: Reconciler::new(&config.kafka, &config.key.scope),
        liveness: liveness.clone(),
    });
    let watcher = tokio::spawn(liveness.watch());
    let workers = Arc::new(Workers::new(stages, tokio::runtime::Handle::current()));
    let source = Source::start(
        &config.kafka,
        workers,
        book,
        metrics.clone(),
        config.pipeline.commit_interval,
        store.is_single_instance(),
    )?;
    info!(topics = ?config.kafka.topics, group = %config.kafka.group_id, store = store.kind(), "kdedup running");

    let sweeper = tokio::spawn(sweep(store.clone(), config.retention.sweep_interval));

    let (mode, fatal) = tokio::select! {
        mode = shutdown => (mode, None),
        why = fatal.raised() => (StopMode::Drain, Some(why)),
    };
    let how = match mode {
        StopMode::Drain => "finishing in-flight work, then committing",
        StopMode::Abandon => "abandoning in-flight work, as a crash would",
    };
    info!(how, "stopping");
    tokio::task::spawn_blocking(move || source.stop(mode)).await.context("source thread")?;
    for task in [sweeper, watcher] {
        task.abort();
        let _ = task.await;
    }
    if mode == StopMode::Drain {
        writer.flush(Duration::from_secs(30)).context("flushing the producer")?;
    }
    if let Some(why) = fatal {
        return Err(anyhow::anyhow!(
            "{why}; stopped after committing the finished work, exit non-zero so that it is restarted"
        ));
    }
    info!("stopped");
    Ok(())
}

/// The configured store, its schema checked and its own metrics registered on `metrics`.
async fn open_store(config: &Config, metrics: &Metrics) -> anyhow::Result<Store> {
    let store = Store::open(&config.store, &config.retention).context("cannot open the store ([store])")?;
    store.check_schema(config.file.as_deref()).await?;
    if let Some(ops) = store.op_metrics() {
        metrics.register_store_ops(ops);
    }
    if let Some(batches) = store.batch_metrics() {
        metrics.register_store_batches(batches);
    }
    Ok(store)
}

/// The commit book, whose durability barrier syncs the store before each commit and
/// brings the store's write and memory metrics up to date.
fn commit_book(store: &Store, metrics: &Metrics) -> CommitBook {
    let (barrier_store, barrier_metrics) = (store.clone(), metrics.clone());
    CommitBook::new(Box::new(move || {
        barrier_store.sync()?;
        let (stats, m) = (barrier_store.stats(), &barrier_metrics);
        if let Some(total) = stats.writes {
            m.store_writes.inc_by(total.saturating_sub(m.store_writes.get()));
        }
        if let Some(bytes) = stats.memory_bytes {
            m.store_memory_bytes.set(bytes as i64);
        }
        Ok(())
    }))
}

/// Removes expired keys every `interval`, for stores that do not expire rows themselves.
async fn sweep(store: Store, interval: Duration) {
    if store.expires_by_itself() {
        // ScyllaDB's TTL removes rows; a sweep there would scan the whole table.
        return;
    }
    let mut tick = tokio::time::interval(interval);
    loop {
        tick.tick().await;
        match store.sweep(now_ms()).await {
            Ok(0) => {}
            Ok(n) => debug!(removed = n, "expired keys swept"),
            Err(e) => warn!(error = %e, "sweeping expired keys failed; will retry"),
        }
    }
}

/// Before any client that could ask for a topic's metadata: the brokers answer and every topic
/// kdedup reads or writes exists (asked without creating it). `run` and `replay` refuse here.
pub(crate) async fn preflight(config: &Config) -> anyhow::Result<crate::kafka_client::Probe> {
    use crate::kafka_client::{self, PreflightError};
    let (kafka, topics) = (config.kafka.clone(), kafka_client::required_topics(config));
    match tokio::task::spawn_blocking(move || kafka_client::preflight(&kafka, &topics)).await? {
        Ok(probe) => Ok(probe),
        Err(PreflightError::Unreachable(e)) if e.security => Err(anyhow::anyhow!(
            "{e} (check security.protocol, ssl.* and sasl.* in [kafka.client] / [kafka.consumer] / [kafka.producer])"
        )),
        Err(PreflightError::Unreachable(e)) => {
            Err(anyhow::anyhow!("{e} (check [kafka] brokers, and that this host may reach them)"))
        }
        Err(PreflightError::MissingTopics(refusal)) => Err(anyhow::anyhow!("topics {refusal}")),
    }
}

/// The `[sink]` effect, on `writer` when it is Kafka.
pub(crate) fn configured_sink(
    config: &Config,
    writer: &KafkaWriter,
    custom: Option<CustomSink>,
    metrics: &Metrics,
) -> anyhow::Result<AnySink> {
    Ok(match (&config.sink, custom) {
        (SinkConfig::Custom, Some(custom)) => AnySink::Custom(custom),
        (SinkConfig::Custom, None) => {
            anyhow::bail!(
                "[sink] kind = \"custom\" needs the effect from code (RunOptions::sink); `kdedup run` has none"
            )
        }
        (_, Some(custom)) => anyhow::bail!(
            "a {} sink was given in code (RunOptions::sink) but [sink] kind is not \"custom\"",
            custom.kind()
        ),
        (SinkConfig::Kafka { topic, partitioning }, None) => AnySink::Kafka(
            KafkaSink::new(writer.clone(), topic, *partitioning)
                .with_context(|| format!("output topic `{topic}` ([sink] topic) must exist"))?,
        ),
        (SinkConfig::Stdout, None) => AnySink::Stdout(StdoutSink),
        (SinkConfig::Http(http), None) => {
            let sink = HttpSink::new(http, metrics).context("cannot set up the HTTP sink ([sink.http])")?;
            let partitions = match &http.results_topic {
                Some(topic) => writer
                    .partition_count(topic, Duration::from_secs(10))
                    .with_context(|| format!("topic `{topic}` ([sink.http] results_topic) must exist"))?,
                None => 1,
            };
            AnySink::Http(Box::new(sink.with_results(writer.clone(), partitions)))
        }
    })
}

/// The dead-letter and duplicates topics, which must exist.
pub(crate) fn side_topics(config: &Config, writer: &KafkaWriter) -> anyhow::Result<SideTopics> {
    let partitions_of = |topic: &str| {
        writer
            .partition_count(topic, Duration::from_secs(10))
            .with_context(|| format!("topic `{topic}` ([dead_letter] / [duplicates]) must exist"))
    };
    let dead_letter_partitions = partitions_of(&config.dead_letter_topic)?;
    if let Some(topic) = &config.duplicates_topic {
        partitions_of(topic)?;
    }
    Ok(SideTopics {
        writer: writer.clone(),
        dead_letter: config.dead_letter_topic.clone(),
        dead_letter_partitions,
        duplicates: config.duplicates_topic.clone(),
        scope: Arc::from(config.key.scope.as_str()),
        replay: None,
    })
}

/// A duration property of the consumer, as librdkafka would read it (its default otherwise).
/// The zombie guard's timing: the consumer's session under the classic protocol; under KIP-848
/// (`group.protocol = "consumer"`) the broker's, read from its config (its defaults, 45 s and
/// 5 s, when the broker does not say).
async fn liveness(config: &Config) -> Liveness {
    let protocol = config.kafka.consumer.get("group.protocol").or(config.kafka.client.get("group.protocol"));
    if !protocol.is_some_and(|p| p.eq_ignore_ascii_case("consumer")) {
        return Liveness::new(
            consumer_ms(config, "session.timeout.ms", 45_000),
            consumer_ms(config, "heartbeat.interval.ms", 3_000),
        );
    }
    let clients: KafkaClients = (&config.kafka).into();
    let found = tokio::task::spawn_blocking(move || crate::kafka_client::broker_group_session(&clients)).await;
    let (session, heartbeat) = match found {
        Ok(Some(found)) => found,
        _ => {
            warn!("cannot read the broker's group.consumer.session.timeout.ms; taking its default, 45 s");
            (Duration::from_secs(45), Duration::from_secs(5))
        }
    };
    info!(
        session_ms = session.as_millis() as u64,
        heartbeat_ms = heartbeat.as_millis() as u64,
        "KIP-848 group session (the broker's)"
    );
    Liveness::new(session, heartbeat)
}

fn consumer_ms(config: &Config, key: &str, default_ms: u64) -> Duration {
    Duration::from_millis(config.kafka.consumer.get(key).and_then(|v| v.trim().parse().ok()).unwrap_or(default_ms))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kafka_client::KafkaClients;
    use crate::source;

    #[test]
    fn every_call_site_builds_from_the_shared_section() {
        // The consumer (source), the producer (sink), the reconciliation reader: from one config.
        let text = r#"
            [kafka]
            brokers = "b1:9093"
            group_id = "g"
            topics = ["orders"]
            [kafka.client]
            "security.protocol" = "SASL_SSL"
            "sasl.mechanism" = "SCRAM-SHA-256"
            "sasl.username" = "kdedup"
            [sink]
            kind = "kafka"
            topic = "orders.deduped"
            [dead_letter]
            topic = "orders.dlq"
        "#;
        let env = [("KDEDUP_KAFKA__CLIENT__SASL_PASSWORD".to_string(), "from-env".to_string())];
        let config = Config::from_toml_with_env(text, "t.toml", env).unwrap();
        let reconciler = Reconciler::new(&config.kafka, "s");
        for (name, c) in [
            ("source", source::consumer_config(&config.kafka, None)),
            ("sink", KafkaClients::from(&config.kafka).producer()),
            ("reconcile", reconciler.kafka.reader("kdedup-reconcile")),
        ] {
            assert_eq!(c.get("security.protocol"), Some("SASL_SSL"), "{name}");
            assert_eq!(c.get("sasl.mechanism"), Some("SCRAM-SHA-256"), "{name}");
            assert_eq!(c.get("sasl.password"), Some("from-env"), "{name}");
        }
        assert!(!format!("{config:?}").contains("from-env"));
    }
}
