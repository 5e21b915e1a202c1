//! Every librdkafka client kdedup makes is configured here, so security is set once.
//!
//! Layers, later wins: kdedup's defaults for the role, then `[kafka.client]` (applies to every
//! client: TLS, SASL, timeouts), then the role's own section. The group consumer takes all of
//! `[kafka.consumer]`, the producer all of `[kafka.producer]`. Readers that never join the group
//! (reconciliation, `check`'s probes) take only the *connection* properties of `[kafka.consumer]`
//! (`security.protocol`, `ssl.*`, `sasl.*`, `socket.*`, …): TLS configured the old way, per
//! section, still reaches them, while group settings such as `group.instance.id` do not.
//!
//! [`probe`] asks a broker for metadata with a client whose `error` callback keeps what
//! librdkafka reported (a refused connection, a failed TLS handshake, a failed SASL
//! authentication), so a failure names the broker and the cause rather than "timed out".

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use rdkafka::client::ClientContext;
use rdkafka::config::RDKafkaLogLevel;
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext};
use rdkafka::error::KafkaError;
use rdkafka::error::KafkaResult;
use rdkafka::metadata::Metadata;
use rdkafka::producer::{BaseProducer, DeliveryResult, Producer, ProducerContext};
use rdkafka::ClientConfig;

use crate::config::{Config, KafkaConfig, SinkConfig};
use crate::error::ProbeError;

/// The settings every client is built from: brokers and the three property sections.
#[derive(Clone, Default)]
pub struct KafkaClients {
    brokers: String,
    client: BTreeMap<String, String>,
    consumer: BTreeMap<String, String>,
    producer: BTreeMap<String, String>,
    /// `[kafka] prefetch_mib` in bytes: what the group consumer may prefetch, all partitions
    /// together (`None`: [`crate::config::DEFAULT_PREFETCH_BYTES`]).
    prefetch_bytes: Option<u64>,
}

/// The prefetch one partition gets, whatever the budget: a few batches' worth.
const MIN_PARTITION_PREFETCH_BYTES: u64 = 256 << 10;

/// ...and at most, however few partitions share the budget (librdkafka's own default is 64 MiB).
const MAX_PARTITION_PREFETCH_BYTES: u64 = 16 << 20;

/// What librdkafka holds per queued record beyond the bytes it counts: its op and message
/// structs and a share of the fetch buffer the record points into. Measured with 100-byte
/// payloads (`kdedup bench`, glibc's heap over 160 partitions' queues): ~800 bytes a record.
const QUEUED_RECORD_BYTES: u64 = 1024;

/// The group consumer's prefetch per partition, `(queued.max.messages.kbytes,
/// queued.min.messages)`: `budget` divided among `partitions` (every partition of the input
/// topics, so a process of a group that owns a share of them stays further below it),
/// within [`MIN_PARTITION_PREFETCH_BYTES`] and [`MAX_PARTITION_PREFETCH_BYTES`]. librdkafka
/// counts `kbytes` in payload bytes and stops fetching a partition at either bound, so the
/// record count bounds small records, whose overhead dwarfs their payload.
pub fn partition_prefetch(budget: u64, partitions: Option<usize>) -> (u64, u64) {
    let per_partition = match partitions {
        Some(n) if n > 0 => budget / n as u64,
        // Unknown at start (brokers not reachable yet): as if the budget were one partition's.
        _ => budget,
    };
    let bytes = per_partition.clamp(MIN_PARTITION_PREFETCH_BYTES, MAX_PARTITION_PREFETCH_BYTES);
    (bytes / 1024, bytes / QUEUED_RECORD_BYTES)
}

/// Never prints a secret property's value.
impl std::fmt::Debug for KafkaClients {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KafkaClients")
            .field("brokers", &self.brokers)
            .field("client", &crate::config::redacted(&self.client))
            .field("consumer", &crate::config::redacted(&self.consumer))
            .field("producer", &crate::config::redacted(&self.producer))
            .finish()
    }
}

impl From<&KafkaConfig> for KafkaClients {
    fn from(kafka: &KafkaConfig) -> Self {
        KafkaClients {
            brokers: kafka.brokers.clone(),
            client: kafka.client.clone(),
            consumer: kafka.consumer.clone(),
            producer: kafka.producer.clone(),
            prefetch_bytes: Some(kafka.prefetch_bytes),
        }
    }
}

/// Plaintext brokers with no properties (tests, the in-process mock cluster).
impl From<&str> for KafkaClients {
    fn from(brokers: &str) -> Self {
        KafkaClients { brokers: brokers.to_string(), ..KafkaClients::default() }
    }
}

impl From<&String> for KafkaClients {
    fn from(brokers: &String) -> Self {
        KafkaClients::from(brokers.as_str())
    }
}

impl From<&KafkaClients> for KafkaClients {
    fn from(clients: &KafkaClients) -> Self {
        clients.clone()
    }
}

impl KafkaClients {
    /// Plaintext `brokers` with `[kafka.client]`-style properties for every client (tests, tools).
    pub fn with_client_properties(brokers: &str, client: BTreeMap<String, String>) -> Self {
        KafkaClients { brokers: brokers.to_string(), client, ..KafkaClients::default() }
    }
}

/// Properties of how a client reaches and authenticates to brokers (not what it does there).
pub fn is_connection_property(name: &str) -> bool {
    const PREFIXES: &[&str] = &["ssl.", "ssl_", "sasl.", "socket.", "broker.", "reconnect.backoff", "metadata."];
    const NAMES: &[&str] = &[
        "security.protocol",
        "enable.ssl.certificate.verification",
        "client.dns.lookup",
        "client.id",
        "client.rack",
        "connections.max.idle.ms",
        "api.version.request",
        "api.version.request.timeout.ms",
        "topic.metadata.refresh.interval.ms",
        "debug",
    ];
    NAMES.contains(&name) || PREFIXES.iter().any(|p| name.starts_with(p))
}

impl KafkaClients {
    /// `[kafka] brokers`, as given.
    pub fn brokers(&self) -> &str {
        &self.brokers
    }

    /// Properties every client starts from: brokers, then `[kafka.client]`.
    fn base(&self) -> ClientConfig {
        let mut c = ClientConfig::new();
        c.set("bootstrap.servers", &self.brokers);
        c
    }

    fn layer(c: &mut ClientConfig, props: &BTreeMap<String, String>, only_connection: bool) {
        for (k, v) in props {
            if !only_connection || is_connection_property(k) {
                c.set(k, v);
            }
        }
    }

    /// The group consumer of `kdedup run`: kdedup's commit discipline, its prefetch (the
    /// `[kafka] prefetch_mib` budget divided among `partitions`, the input topics' partition
    /// count when known), then `[kafka.client]`, then `[kafka.consumer]` (its commit keys are
    /// checked at validation).
    pub fn group_consumer(&self, group_id: &str, partitions: Option<usize>) -> ClientConfig {
        let mut c = self.base();
        // librdkafka prefetches up to 100,000 records / 64 MiB *per partition* by default
        // (per partition queue, and kdedup splits one off for every partition): with many
        // partitions and a pipeline slower than the fetch, that is the whole backlog in
        // memory (6 GiB peak RSS at 10M events on 160 partitions, `kdedup bench`). So the
        // process has one budget, and each partition a share of it.
        let (kbytes, records) =
            partition_prefetch(self.prefetch_bytes.unwrap_or(crate::config::DEFAULT_PREFETCH_BYTES), partitions);
        c.set("group.id", group_id)
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            .set("auto.offset.reset", "earliest")
            .set("enable.partition.eof", "false")
            // librdkafka's default, said aloud: aborted transactions are never processed
            // (config validation refuses read_uncommitted).
            .set("isolation.level", "read_committed")
            .set("queued.min.messages", records.to_string())
            .set("queued.max.messages.kbytes", kbytes.to_string())
            // ...and once a queue is full, look again soon (default: 1 s idle).
            .set("fetch.queue.backoff.ms", "10");
        Self::layer(&mut c, &self.client, false);
        Self::layer(&mut c, &self.consumer, false);
        no_topic_creation(&mut c);
        c
    }

    /// The output producer: idempotent, then `[kafka.client]`, then `[kafka.producer]`.
    pub fn producer(&self) -> ClientConfig {
        let mut c = self.base();
        c.set("enable.idempotence", "true").set("linger.ms", "5").set("message.timeout.ms", "30000");
        Self::layer(&mut c, &self.client, false);
        Self::layer(&mut c, &self.producer, false);
        no_topic_creation(&mut c);
        c
    }

    /// A consumer that only `assign`s and reads (reconciliation, checks): it never joins
    /// or commits; `group_id` only satisfies librdkafka's `assign()`.
    pub fn reader(&self, group_id: &str) -> ClientConfig {
        let mut c = self.base();
        c.set("group.id", group_id).set("enable.auto.commit", "false").set("enable.partition.eof", "false");
        Self::layer(&mut c, &self.client, false);
        Self::layer(&mut c, &self.consumer, true);
        no_topic_creation(&mut c);
        c
    }
}

/// kdedup creates no topics: a metadata request (a producer's first write to a topic,
/// `partition_count`, a probe) must never ask the broker to create the topic it names, or a
/// mistyped `[sink] topic` is created with the broker's default partition count and receives
/// the stream. librdkafka's producer asks for creation by default; the config refuses `true`
/// in any section (config.rs), and this is set last so no layer can turn it back on.
fn no_topic_creation(c: &mut ClientConfig) {
    c.set("allow.auto.create.topics", "false");
}

/// Every topic `kdedup run` reads or writes, each once: the inputs and [`written_topics`].
pub fn required_topics(config: &Config) -> Vec<String> {
    let mut topics: Vec<String> = config.kafka.topics.clone();
    topics.extend(written_topics(config));
    let mut seen = std::collections::BTreeSet::new();
    topics.retain(|t| seen.insert(t.clone()));
    topics
}

/// The topics `kdedup run` writes: the output (a Kafka sink) or the HTTP sink's results
/// topic, the dead-letter and the duplicates topics.
pub fn written_topics(config: &Config) -> Vec<String> {
    let mut topics = Vec::new();
    match &config.sink {
        SinkConfig::Kafka { topic, .. } => topics.push(topic.clone()),
        SinkConfig::Http(h) => topics.extend(h.results_topic.clone()),
        SinkConfig::Stdout | SinkConfig::Custom => {}
    }
    topics.push(config.dead_letter_topic.clone());
    topics.extend(config.duplicates_topic.clone());
    topics
}

/// The refusal for topics a probe did not find (`None` when every one exists): the same words
/// in `check`, `run` and `replay`.
pub fn missing_topics(found: &BTreeMap<String, Option<usize>>) -> Option<String> {
    let missing: Vec<&str> = found.iter().filter(|(_, n)| n.is_none()).map(|(t, _)| t.as_str()).collect();
    let seen = found_topics(found);
    (!missing.is_empty()).then(|| {
        format!(
            "missing: {} (kdedup creates no topics: create them, e.g. `kafka-topics.sh --create --topic NAME \
             --partitions N`); found: {}",
            missing.join(", "),
            if seen.is_empty() { "none".to_string() } else { seen.join(", ") }
        )
    })
}

/// The topics a probe found, each with its partition count: "orders (3 partitions)".
pub fn found_topics(found: &BTreeMap<String, Option<usize>>) -> Vec<String> {
    found
        .iter()
        .filter_map(|(t, n)| n.map(|n| format!("{t} ({n} partition{})", if n == 1 { "" } else { "s" })))
        .collect()
}

/// Why `kdedup run` or `replay` will not start on these brokers.
#[derive(Debug, thiserror::Error)]
pub enum PreflightError {
    /// The brokers did not answer, or refused the connection settings.
    #[error(transparent)]
    Unreachable(#[from] ProbeError),
    /// A topic kdedup reads or writes does not exist.
    #[error("{0}")]
    MissingTopics(String),
}

/// What a probe learnt: each asked-for topic's partition count (`None`: the broker does not know it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Probe {
    /// Brokers the cluster's metadata lists.
    pub brokers: usize,
    /// Each asked-for topic's partition count.
    pub topics: BTreeMap<String, Option<usize>>,
}

/// Keeps what librdkafka reports while probing (it says *why* metadata timed out): its
/// error events and its warning-or-worse log lines (a consumer's error events lose their
/// reason text, its log lines keep it: "ssl://host:port/bootstrap: SSL handshake failed: …").
#[derive(Default)]
pub struct ProbeContext {
    reports: Mutex<Vec<Report>>,
}

struct Report {
    code: Option<rdkafka::types::RDKafkaErrorCode>,
    text: String,
}

impl ProbeContext {
    fn keep(&self, code: Option<rdkafka::types::RDKafkaErrorCode>, text: String) {
        let mut reports = self.reports.lock().unwrap_or_else(|p| p.into_inner());
        if reports.len() < 32 && !reports.iter().any(|r| r.text == text) {
            reports.push(Report { code, text });
        }
    }
}

impl ClientContext for ProbeContext {
    fn log(&self, level: RDKafkaLogLevel, fac: &str, message: &str) {
        tracing::debug!(target: "librdkafka", fac, "{message}");
        use RDKafkaLogLevel as L;
        if matches!(level, L::Emerg | L::Alert | L::Critical | L::Error | L::Warning) {
            self.keep(None, message.to_string());
        }
    }

    fn error(&self, error: KafkaError, reason: &str) {
        tracing::debug!(%error, reason, "librdkafka reported an error while probing");
        let text = if reason.is_empty() { error.to_string() } else { reason.to_string() };
        self.keep(error.rdkafka_error_code(), text);
    }
}

impl ConsumerContext for ProbeContext {}

impl Report {
    fn is_security_failure(&self) -> bool {
        use rdkafka::types::RDKafkaErrorCode as C;
        matches!(
            self.code,
            Some(C::SSL | C::Authentication | C::SaslAuthenticationFailed | C::UnsupportedSASLMechanism)
        ) || self.text.contains("SSL handshake failed")
            || (self.text.contains("SASL") && self.text.contains("failed"))
            || self.text.contains("Authentication failed")
    }
}

/// Before `kdedup run` or `replay` builds its clients: the brokers answer (with the readers'
/// settings, and the producer's when they differ) and every topic in `topics` exists, asked
/// with clients that cannot create topics. Fails once, with librdkafka's reason ("cannot reach
/// Kafka at ADDRESS: …"), instead of leaving the clients to log their retries for ever.
pub fn preflight(kafka: &KafkaConfig, topics: &[String]) -> Result<Probe, PreflightError> {
    let clients = KafkaClients::from(kafka);
    let probe = probe_as(&clients, ProbeAs::Consumer, topics, PREFLIGHT_TIMEOUT)?;
    if clients.producer_connects_differently() {
        probe_as(&clients, ProbeAs::Producer, &[], PREFLIGHT_TIMEOUT)?;
    }
    match missing_topics(&probe.topics) {
        Some(refusal) => Err(PreflightError::MissingTopics(refusal)),
        None => Ok(probe),
    }
}

/// How long [`preflight`] waits for the brokers.
const PREFLIGHT_TIMEOUT: Duration = Duration::from_secs(10);

/// One metadata request of a probe waits at most this long before the probe looks at what
/// librdkafka reported.
const ROUND: Duration = Duration::from_millis(1000);

/// Which client's settings a probe connects with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum ProbeAs {
    /// The readers' settings: `[kafka.client]` and `[kafka.consumer]`'s connection properties.
    Consumer,
    /// The producer's: `[kafka.client]` and `[kafka.producer]`.
    Producer,
}

enum ProbeClient {
    Consumer(BaseConsumer<ProbeContext>),
    Producer(BaseProducer<ProbeContext>),
}

impl ProducerContext for ProbeContext {
    type DeliveryOpaque = ();
    fn delivery(&self, _: &DeliveryResult<'_>, _: ()) {}
}

impl ProbeClient {
    fn context(&self) -> &ProbeContext {
        match self {
            ProbeClient::Consumer(c) => c.context(),
            ProbeClient::Producer(p) => p.context(),
        }
    }

    fn fetch_metadata(&self, topic: Option<&str>, timeout: Duration) -> KafkaResult<Metadata> {
        match self {
            ProbeClient::Consumer(c) => c.fetch_metadata(topic, timeout),
            ProbeClient::Producer(p) => p.client().fetch_metadata(topic, timeout),
        }
    }

    /// Serves librdkafka's queued events, so its logs and errors reach the context.
    fn serve(&self) {
        // A consumer's `poll` answers `None` both for an empty queue and for an event it
        // handled itself (a log line, an error): no way to tell them apart, so drain a bounded number.
        for _ in 0..2000 {
            match self {
                ProbeClient::Consumer(c) => drop(c.poll(Duration::ZERO)),
                ProbeClient::Producer(p) => p.poll(Duration::ZERO),
            }
        }
    }

    /// The telling reports and whether one was a TLS/SASL failure (then only those: a failed
    /// handshake, not the disconnects that follow it).
    fn reported(&self) -> (String, bool) {
        let reports = self.context().reports.lock().unwrap_or_else(|p| p.into_inner());
        let security = reports.iter().any(Report::is_security_failure);
        let texts: Vec<&str> =
            reports.iter().filter(|r| !security || r.is_security_failure()).map(|r| r.text.as_str()).collect();
        (texts.join("; "), security)
    }
}

impl KafkaClients {
    /// Connection properties a client with this role ends up with.
    fn connection(&self, role: ProbeAs) -> BTreeMap<&str, &str> {
        let own = match role {
            ProbeAs::Consumer => &self.consumer,
            ProbeAs::Producer => &self.producer,
        };
        self.client
            .iter()
            .chain(own)
            .filter(|(k, _)| is_connection_property(k))
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect()
    }

    /// Whether the producer connects with other settings than the readers (then both need probing).
    pub fn producer_connects_differently(&self) -> bool {
        self.connection(ProbeAs::Consumer) != self.connection(ProbeAs::Producer)
    }
}

/// Fetches metadata for `topics` (all topics when empty) within `timeout`, with the
/// readers' settings. Errors carry librdkafka's own reason, e.g. "ssl://127.0.0.1:9093/bootstrap:
/// SSL handshake failed: … certificate verify failed".
pub fn probe(clients: &KafkaClients, topics: &[String], timeout: Duration) -> Result<Probe, ProbeError> {
    probe_as(clients, ProbeAs::Consumer, topics, timeout)
}

/// [`probe`] with the settings of `role`.
pub fn probe_as(
    clients: &KafkaClients,
    role: ProbeAs,
    topics: &[String],
    timeout: Duration,
) -> Result<Probe, ProbeError> {
    let fail = |cause: String, security: bool| ProbeError { brokers: clients.brokers.clone(), cause, security };
    let invalid = |e: KafkaError| fail(format!("invalid client settings: {e}"), false);
    let client = match role {
        ProbeAs::Consumer => ProbeClient::Consumer(
            clients.reader("kdedup-probe").create_with_context(ProbeContext::default()).map_err(invalid)?,
        ),
        ProbeAs::Producer => {
            ProbeClient::Producer(clients.producer().create_with_context(ProbeContext::default()).map_err(invalid)?)
        }
    };
    // librdkafka queues its logs and errors until the client is polled, and a failed TLS
    // handshake only shows as a metadata timeout: ask in short rounds, serve the queue between
    // them, and stop as soon as a security failure was reported (waiting will not fix it).
    let deadline = Instant::now() + timeout;
    let one = (topics.len() == 1).then(|| topics[0].as_str());
    let metadata = loop {
        let round = deadline.saturating_duration_since(Instant::now()).clamp(Duration::from_millis(100), ROUND);
        let answer = client.fetch_metadata(one, round);
        client.serve();
        match answer {
            Ok(m) => break m,
            Err(e) => {
                let (reasons, security) = client.reported();
                if security || Instant::now() >= deadline {
                    let cause = if reasons.is_empty() { format!("{e} after {timeout:?}") } else { reasons };
                    return Err(fail(cause, security));
                }
            }
        }
    };
    // A failed TLS handshake on one bootstrap address may still leave another working:
    // metadata answered, so it is only worth a warning.
    let (reasons, _) = client.reported();
    if !reasons.is_empty() {
        tracing::warn!(brokers = %clients.brokers, reasons, "Kafka answered, but some connections failed");
    }
    let mut found = BTreeMap::new();
    for name in topics {
        let t = metadata.topics().iter().find(|t| t.name() == name);
        let partitions = t.filter(|t| t.error().is_none() && !t.partitions().is_empty()).map(|t| t.partitions().len());
        found.insert(name.clone(), partitions);
    }
    Ok(Probe { brokers: metadata.brokers().len(), topics: found })
}

/// Under the KIP-848 group protocol the session and heartbeat interval are the broker's:
/// `group.consumer.session.timeout.ms` and `group.consumer.heartbeat.interval.ms` of the first
/// broker the metadata lists, or `None` when it does not answer or may not be asked (ACLs).
pub fn broker_group_session(clients: &KafkaClients) -> Option<(Duration, Duration)> {
    use rdkafka::admin::{AdminClient, AdminOptions, ResourceSpecifier};
    use rdkafka::client::DefaultClientContext;
    let timeout = Duration::from_secs(5);
    let admin: AdminClient<DefaultClientContext> = clients.producer().create().ok()?;
    let broker = admin.inner().fetch_metadata(None, timeout).ok()?.brokers().first()?.id();
    let options = AdminOptions::new().request_timeout(Some(timeout));
    let answer = futures::executor::block_on(admin.describe_configs(&[ResourceSpecifier::Broker(broker)], &options));
    let config = answer.ok()?.into_iter().next()?.ok()?;
    let ms = |name: &str| {
        let value = config.get(name)?.value.as_deref()?.parse().ok()?;
        Some(Duration::from_millis(value))
    };
    Some((ms("group.consumer.session.timeout.ms")?, ms("group.consumer.heartbeat.interval.ms")?))
}

/// The partitions of `list` that carry an actual offset, with it (a committed
/// offset, or the answer to a time lookup); logical ones (none committed, no
/// record at or after the time) are left out.
pub fn known_offsets(list: &rdkafka::TopicPartitionList) -> impl Iterator<Item = (i32, i64)> + '_ {
    list.elements().into_iter().filter_map(|e| match e.offset() {
        rdkafka::Offset::Offset(o) => Some((e.partition(), o)),
        _ => None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn clients() -> KafkaClients {
        let map = |pairs: &[(&str, &str)]| pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        KafkaClients {
            brokers: "b1:9093".into(),
            client: map(&[
                ("security.protocol", "SASL_SSL"),
                ("sasl.mechanism", "SCRAM-SHA-512"),
                ("sasl.username", "kdedup"),
                ("sasl.password", "client-secret"),
            ]),
            consumer: map(&[("ssl.ca.location", "/ca.pem"), ("group.instance.id", "pod-1"), ("fetch.min.bytes", "1")]),
            producer: map(&[("sasl.password", "producer-secret"), ("linger.ms", "20")]),
            prefetch_bytes: None,
        }
    }

    fn get(c: &ClientConfig, k: &str) -> Option<String> {
        c.get(k).map(str::to_string)
    }

    #[test]
    fn the_shared_section_reaches_every_client() {
        let c = clients();
        for (name, config) in
            [("consumer", c.group_consumer("g", None)), ("producer", c.producer()), ("reader", c.reader("kdedup-reconcile"))]
        {
            assert_eq!(get(&config, "bootstrap.servers").as_deref(), Some("b1:9093"), "{name}");
            assert_eq!(get(&config, "security.protocol").as_deref(), Some("SASL_SSL"), "{name}");
            assert_eq!(get(&config, "sasl.mechanism").as_deref(), Some("SCRAM-SHA-512"), "{name}");
            assert_eq!(get(&config, "sasl.username").as_deref(), Some("kdedup"), "{name}");
        }
    }

    #[test]
    fn role_sections_override_the_shared_one_and_stay_in_their_role() {
        let c = clients();
        let producer = c.producer();
        assert_eq!(get(&producer, "sasl.password").as_deref(), Some("producer-secret"));
        assert_eq!(get(&producer, "linger.ms").as_deref(), Some("20"));
        assert_eq!(get(&producer, "ssl.ca.location"), None, "consumer TLS settings stay out of the producer");
        let consumer = c.group_consumer("g", None);
        assert_eq!(get(&consumer, "sasl.password").as_deref(), Some("client-secret"));
        assert_eq!(get(&consumer, "ssl.ca.location").as_deref(), Some("/ca.pem"));
        assert_eq!(get(&consumer, "group.instance.id").as_deref(), Some("pod-1"));
        assert_eq!(get(&consumer, "enable.auto.commit").as_deref(), Some("false"));
        assert_eq!(get(&consumer, "isolation.level").as_deref(), Some("read_committed"));
    }

    #[test]
    fn the_prefetch_budget_is_shared_among_partitions_within_bounds() {
        let mib = 1 << 20;
        assert_eq!(partition_prefetch(128 * mib, Some(160)), (819, 819), "a share of the budget");
        assert_eq!(partition_prefetch(128 * mib, Some(16)), (8192, 8192));
        assert_eq!(partition_prefetch(128 * mib, Some(1)), (16384, 16384), "at most 16 MiB a partition");
        assert_eq!(partition_prefetch(128 * mib, Some(10_000)), (256, 256), "at least 256 KiB a partition");
        assert_eq!(partition_prefetch(128 * mib, None), (16384, 16384), "unknown: as one partition");
        let consumer = KafkaClients::from("b:9092").group_consumer("g", Some(160));
        assert_eq!(get(&consumer, "queued.max.messages.kbytes").as_deref(), Some("819"));
        assert_eq!(get(&consumer, "queued.min.messages").as_deref(), Some("819"));
        // A user's [kafka.consumer] setting wins over the share.
        let mut c = clients();
        c.consumer.insert("queued.min.messages".into(), "5".into());
        assert_eq!(get(&c.group_consumer("g", Some(160)), "queued.min.messages").as_deref(), Some("5"));
    }

    #[test]
    fn readers_take_only_the_consumers_connection_settings() {
        let reader = clients().reader("kdedup-reconcile");
        assert_eq!(get(&reader, "ssl.ca.location").as_deref(), Some("/ca.pem"), "TLS given per section reaches it");
        assert_eq!(get(&reader, "group.id").as_deref(), Some("kdedup-reconcile"));
        assert_eq!(get(&reader, "group.instance.id"), None, "a reader must not take the member's static identity");
        assert_eq!(get(&reader, "fetch.min.bytes"), None);
    }

    #[test]
    fn debug_output_never_shows_a_secret() {
        let text = format!("{:?}", clients());
        assert!(!text.contains("client-secret") && !text.contains("producer-secret"), "{text}");
        assert!(text.contains("sasl.username") && text.contains("kdedup"), "{text}");
    }

    #[test]
    fn every_client_librdkafka_builds_accepts_sasl_and_tls_settings() {
        // librdkafka rejects unknown properties and mechanisms it was built without at create():
        // this proves the build has SSL and SASL/SCRAM, and the layering yields valid configs.
        let mut c = clients();
        c.consumer.remove("ssl.ca.location"); // librdkafka would load it at create()
        let _: BaseConsumer = c.group_consumer("g", None).create().expect("consumer with SASL_SSL");
        let _: BaseConsumer = c.reader("r").create().expect("reader with SASL_SSL");
        let _: rdkafka::producer::BaseProducer = c.producer().create().expect("producer with SASL_SSL");
    }
}
