//! `kdedup check`: is this config deployable here? Validates the config, shows the effective
//! settings with secrets redacted, then asks each dependency, in the order `kdedup run` needs
//! them, and says what is wrong in words an operator can act on. A check that depends on a
//! failed one is skipped, not guessed.
//!
//! Statuses: `ok`, `warn` (works, but something an operator should know, e.g. reconciliation
//! limited by the partitioning), `fail` (`kdedup run` would not start or not work), `skip`.
//! The exit code is non-zero when any check fails.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use serde::Serialize;
use serde_json::json;

use crate::config::{
    redact_url, redacted, Config, Partitioning, PostgresTls, Retention, ServeConfig, SinkConfig, StoreConfig,
};
use crate::kafka_client::{self, KafkaClients};
use crate::store::Store;

/// How long the broker probe waits for metadata.
const BROKER_TIMEOUT: Duration = Duration::from_secs(10);

/// The verdict of one check.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
#[non_exhaustive]
pub(crate) enum Status {
    /// It works.
    Ok,
    /// It works, but something is likely wrong (e.g. a topic with fewer partitions than expected).
    Warn,
    /// `run` would fail.
    Fail,
    /// Not tried, because an earlier check failed or the config does not use it.
    Skip,
}

/// One question asked of a dependency.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct Check {
    /// What was checked, e.g. `broker` or `store`.
    pub name: &'static str,
    /// The verdict.
    pub status: Status,
    /// What was found, for a person.
    pub detail: String,
}

/// What `kdedup check` prints: every check and whether `run` would work.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct Report {
    /// The config file checked.
    pub config: String,
    /// No check failed (warnings allowed).
    pub ok: bool,
    /// The effective settings, secrets redacted; `null` when the config is invalid.
    pub settings: serde_json::Value,
    /// In the order they ran.
    pub checks: Vec<Check>,
}

fn check(name: &'static str, status: Status, detail: impl Into<String>) -> Check {
    Check { name, status, detail: detail.into() }
}

/// Runs every check against the config at `path`.
pub(crate) async fn run(path: &Path) -> Report {
    let mut checks = Vec::new();
    let config = match Config::load(path) {
        Ok(c) => {
            checks.push(check("config", Status::Ok, "valid"));
            c
        }
        Err(e) => {
            checks.push(check("config", Status::Fail, e.to_string()));
            return finish(path, serde_json::Value::Null, checks);
        }
    };
    let settings = settings(&config);
    checks.extend(offset_reset_check(&config));
    let clients_check = clients_check(&config);
    let clients_ok = clients_check.status == Status::Ok;
    checks.push(clients_check);
    if !clients_ok {
        checks.push(check("broker", Status::Skip, "needs client settings librdkafka accepts"));
        checks.push(store_check(&config.store, &config.retention, path).await);
        checks.push(metrics_check(&config));
        return finish(path, settings, checks);
    }

    let clients = KafkaClients::from(&config.kafka);
    let topics = kafka_client::required_topics(&config);
    let probe = {
        let (clients, topics) = (clients.clone(), topics.clone());
        tokio::task::spawn_blocking(move || kafka_client::probe(&clients, &topics, BROKER_TIMEOUT)).await
    };
    let protocol = config
        .kafka
        .consumer
        .get("security.protocol")
        .or_else(|| config.kafka.client.get("security.protocol"))
        .map_or("PLAINTEXT", String::as_str)
        .to_string();
    match probe {
        Ok(Ok(probe)) => {
            checks.push(check(
                "broker",
                Status::Ok,
                format!("{} answered over {protocol}: {} broker(s) in the cluster", clients.brokers(), probe.brokers),
            ));
            if clients.producer_connects_differently() {
                checks.push(producer_check(&clients).await);
            }
            let topics = topic_checks(&config, &probe.topics);
            let all_found = topics.iter().all(|c| c.status != Status::Fail);
            checks.extend(topics);
            if all_found {
                let (config, clients) = (config.clone(), clients.clone());
                let samples =
                    tokio::task::spawn_blocking(move || event_id_checks(&config, &clients, SAMPLE_TIMEOUT)).await;
                match samples {
                    Ok(samples) => checks.extend(samples),
                    Err(e) => {
                        checks.push(check("event ids", Status::Fail, format!("the sample read did not finish: {e}")))
                    }
                }
            }
        }
        Ok(Err(e)) => {
            let hint = if e.security {
                " (check security.protocol, ssl.* and sasl.* in [kafka.client], [kafka.consumer], [kafka.producer])"
            } else {
                " (check [kafka] brokers, and that this host may reach them)"
            };
            checks.push(check("broker", Status::Fail, format!("{e}{hint}")));
            checks.push(check("topics", Status::Skip, "needs the broker"));
            checks.push(check("partitioning", Status::Skip, "needs the broker"));
        }
        Err(e) => checks.push(check("broker", Status::Fail, format!("the probe did not finish: {e}"))),
    }

    checks.push(store_check(&config.store, &config.retention, path).await);
    checks.push(metrics_check(&config));
    finish(path, settings, checks)
}

/// How many records of each input partition `check` reads through the key extractor.
const SAMPLE_PER_PARTITION: i64 = 20;
/// How long the sample read may take, over all input topics.
const SAMPLE_TIMEOUT: Duration = Duration::from_secs(10);

/// Builds every client `kdedup run` builds, as librdkafka will: an unknown or misspelled
/// property (`sesion.timeout.ms`) or a bad value fails here, as it would fail `run`.
fn clients_check(config: &Config) -> Check {
    use rdkafka::consumer::BaseConsumer;
    use rdkafka::producer::BaseProducer;
    let clients = KafkaClients::from(&config.kafka);
    let built = [
        (
            "consumer ([kafka.client] + [kafka.consumer])",
            clients.group_consumer(&config.kafka.group_id, None).create::<BaseConsumer>().err(),
        ),
        ("producer ([kafka.client] + [kafka.producer])", clients.producer().create::<BaseProducer>().err()),
        (
            "reader ([kafka.client] + [kafka.consumer]'s connection settings)",
            clients.reader("kdedup-check").create::<BaseConsumer>().err(),
        ),
    ];
    let failed: Vec<String> = built.into_iter().filter_map(|(role, e)| e.map(|e| format!("the {role}: {e}"))).collect();
    if failed.is_empty() {
        check("kafka clients", Status::Ok, "librdkafka accepts every client's settings")
    } else {
        check("kafka clients", Status::Fail, format!("librdkafka refuses {}", failed.join("; ")))
    }
}

/// Reads the last few records of each input partition through the key extractor: a
/// `[key]` that does not match the data (the sample config's header on JSON events) would
/// dead-letter every record as it arrives.
fn event_id_checks(config: &Config, clients: &KafkaClients, timeout: Duration) -> Vec<Check> {
    use rdkafka::consumer::{BaseConsumer, Consumer};
    use rdkafka::{Offset, TopicPartitionList};
    let extractor = crate::event::KeyExtractor::new(config.key.clone());
    let deadline = std::time::Instant::now() + timeout;
    let mut out = Vec::new();
    for topic in &config.kafka.topics {
        let reader: BaseConsumer = match clients.reader("kdedup-check").create() {
            Ok(r) => r,
            Err(e) => {
                out.push(check("event ids", Status::Fail, format!("{topic}: cannot create a reader: {e}")));
                continue;
            }
        };
        let partitions = match reader.fetch_metadata(Some(topic), Duration::from_secs(5)) {
            Ok(md) => md.topics().iter().flat_map(|t| t.partitions().iter().map(|p| p.id())).collect::<Vec<_>>(),
            Err(e) => {
                out.push(check("event ids", Status::Warn, format!("{topic}: cannot read its metadata: {e}")));
                continue;
            }
        };
        let mut tpl = TopicPartitionList::new();
        let mut wanted = 0i64;
        for p in partitions {
            let Ok((low, high)) = reader.fetch_watermarks(topic, p, Duration::from_secs(5)) else { continue };
            let from = low.max(high - SAMPLE_PER_PARTITION);
            if from < high {
                wanted += high - from;
                let _ = tpl.add_partition_offset(topic, p, Offset::Offset(from));
            }
        }
        if wanted == 0 {
            out.push(check("event ids", Status::Ok, format!("{topic}: empty, nothing to sample")));
            continue;
        }
        if let Err(e) = reader.assign(&tpl) {
            out.push(check("event ids", Status::Warn, format!("{topic}: cannot read a sample: {e}")));
            continue;
        }
        let (mut read, mut with_id, mut first_reason) = (0i64, 0i64, None);
        while read < wanted && std::time::Instant::now() < deadline {
            let Some(Ok(m)) = reader.poll(Duration::from_millis(200)) else { continue };
            read += 1;
            match extractor.extract(crate::event::Record::from_message(&m, &std::sync::Arc::from(topic.as_str()))) {
                Ok(_) => with_id += 1,
                Err((record, e)) => {
                    first_reason.get_or_insert_with(|| format!("{} at {}: {e}", e.reason(), record.position));
                }
            }
        }
        let (status, detail) = match (read, first_reason) {
            (0, _) => (Status::Warn, format!("{topic}: no record could be read within {timeout:?}")),
            (_, None) => (Status::Ok, format!("{topic}: {with_id} of {read} records have an event ID")),
            (_, Some(reason)) => (
                if with_id == 0 { Status::Fail } else { Status::Warn },
                format!(
                    "{topic}: {with_id} of {read} records have an event ID ({}); the others are dead-lettered, the first \
                     because {reason}: check [key] source",
                    key_source(&config.key.source)
                ),
            ),
        };
        out.push(check("event ids", status, detail));
    }
    out
}

/// Where `[key]` takes the event ID from, for a person.
fn key_source(source: &crate::config::KeySource) -> String {
    use crate::config::KeySource;
    match source {
        KeySource::Header(h) => format!("the header {h:?}"),
        KeySource::RecordKey => "the record key".to_string(),
        KeySource::Json(p) => format!("the JSON pointer {p:?} in the payload"),
        KeySource::PayloadHash => "a hash of the payload".to_string(),
    }
}

/// `auto.offset.reset` set to the end (`latest`, or librdkafka's synonyms `largest`
/// and `end`, read as librdkafka does: trimmed, any case): a new group, or a
/// partition whose committed offset is gone, starts at the end and never sees the
/// backlog. It works as configured, so a warning, not a failure.
fn offset_reset_check(config: &Config) -> Option<Check> {
    let (section, value) = [("consumer", &config.kafka.consumer), ("client", &config.kafka.client)]
        .into_iter()
        .find_map(|(section, map)| map.get("auto.offset.reset").map(|v| (section, v)))?;
    let end = ["latest", "largest", "end"].iter().any(|s| value.trim().eq_ignore_ascii_case(s));
    end.then(|| {
        check(
            "offset reset",
            Status::Warn,
            format!(
                "[kafka.{section}] auto.offset.reset = {value:?}: a new group (or a partition without a committed \
                 offset) starts at the end and skips the backlog; kdedup's default is \"earliest\""
            ),
        )
    })
}

/// `[kafka.producer]` connects with other settings (its own TLS or SASL): ask with those too.
async fn producer_check(clients: &KafkaClients) -> Check {
    let clients = clients.clone();
    let probe = tokio::task::spawn_blocking(move || {
        kafka_client::probe_as(&clients, kafka_client::ProbeAs::Producer, &[], BROKER_TIMEOUT)
    })
    .await;
    match probe {
        Ok(Ok(_)) => check("producer", Status::Ok, "answered with [kafka.producer]'s own connection settings"),
        Ok(Err(e)) => check("producer", Status::Fail, format!("with [kafka.producer]'s settings: {e}")),
        Err(e) => check("producer", Status::Fail, format!("the probe did not finish: {e}")),
    }
}

fn finish(path: &Path, settings: serde_json::Value, checks: Vec<Check>) -> Report {
    let ok = checks.iter().all(|c| c.status != Status::Fail);
    Report { config: path.display().to_string(), ok, settings, checks }
}

/// Topics exist, with their partition counts; then whether reconciliation can find a
/// partition's writes (DESIGN.md §1, src/reconcile.rs).
fn topic_checks(config: &Config, found: &BTreeMap<String, Option<usize>>) -> Vec<Check> {
    let mut out = Vec::new();
    if let Some(refusal) = kafka_client::missing_topics(found) {
        out.push(check("topics", Status::Fail, refusal));
        out.push(check("partitioning", Status::Skip, "needs every topic"));
        return out;
    }
    out.push(check("topics", Status::Ok, kafka_client::found_topics(found).join(", ")));
    let input_max = config.kafka.topics.iter().filter_map(|t| found[t]).max().unwrap_or(0);
    let dlq = found[&config.dead_letter_topic].unwrap_or(0);
    let mut notes = Vec::new();
    let mut status = Status::Ok;
    match &config.sink {
        SinkConfig::Kafka { topic, partitioning: Partitioning::Source } => {
            let out_n = found[topic].unwrap_or(0);
            if out_n < input_max {
                status = Status::Warn;
                notes.push(format!(
                    "output {topic} has {out_n} partitions for up to {input_max} input partitions: inputs share \
                     output partitions, so reconciliation reads other partitions' writes too (correct, slower)"
                ));
            } else {
                notes.push(format!(
                    "output {topic}: input partition p writes output partition p ({out_n} >= {input_max})"
                ));
            }
        }
        SinkConfig::Kafka { topic, partitioning: Partitioning::Key } => {
            status = Status::Warn;
            notes.push(format!(
                "output {topic} is partitioned by key: a new owner cannot find a partition's writes, so every \
                 resumed claim is emitted again marked kdedup-possible-repeat; set [sink] partitioning = \"source\""
            ));
        }
        SinkConfig::Stdout => notes.push("stdout sink: nothing to reconcile in Kafka".into()),
        SinkConfig::Custom => notes.push("custom sink (library use): nothing to reconcile in Kafka".into()),
        SinkConfig::Http(h) => notes.push(format!(
            "http sink to {}: nothing to reconcile in Kafka; a resumed claim repeats its request with the same \
             {} (the endpoint dedups it)",
            redact_url(h.url.expose()),
            h.idempotency_header
        )),
    }
    // A shared dead-letter partition is the usual layout (dead letters are rare): a note only.
    notes.push(format!("dead-letter {}: input partition p writes partition p mod {dlq}", config.dead_letter_topic));
    out.push(check("partitioning", status, notes.join("; ")));
    out
}

/// `file` is the config file given, named in what to run next.
async fn store_check(config: &StoreConfig, retention: &Retention, file: &Path) -> Check {
    if let StoreConfig::Embedded { path } = config {
        // Opening would create it: say what `run` will do instead of doing it.
        if !path.exists() {
            let parent = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
            return match std::fs::metadata(parent) {
                Ok(m) if m.is_dir() && !m.permissions().readonly() => check(
                    "store",
                    Status::Ok,
                    format!("embedded store {} does not exist yet: `kdedup run` creates it", path.display()),
                ),
                _ => check(
                    "store",
                    Status::Fail,
                    format!(
                        "embedded store {}: its directory {} is missing or not writable ([store] path)",
                        path.display(),
                        parent.display()
                    ),
                ),
            };
        }
    }
    let store = match Store::open(config, retention) {
        Ok(s) => s,
        Err(e) => {
            let hint = match config {
                StoreConfig::Embedded { path } => {
                    format!(" (is `kdedup run` already using {}? it holds the store's lock)", path.display())
                }
                _ => String::new(),
            };
            return check("store", Status::Fail, format!("cannot open the {} store: {e}{hint}", kind(config)));
        }
    };
    // `check_schema` lets a server that does not answer pass (`run` waits for it): ask first.
    if let Store::Postgres(pg) = &store {
        match tokio::time::timeout(Duration::from_secs(15), pg.probe()).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return check("store", Status::Fail, e.to_string()),
            Err(_) => return check("store", Status::Fail, "postgres store did not answer within 15 s"),
        }
    }
    match tokio::time::timeout(Duration::from_secs(15), store.check_schema(Some(file))).await {
        Ok(Ok(())) => check("store", Status::Ok, format!("{} store reachable, schema applied", store.kind())),
        Ok(Err(e)) => check("store", Status::Fail, format!("{} store: {e}", store.kind())),
        Err(_) => check("store", Status::Fail, format!("{} store did not answer within 15 s", store.kind())),
    }
}

fn kind(config: &StoreConfig) -> &'static str {
    match config {
        StoreConfig::Embedded { .. } => "embedded",
        StoreConfig::Postgres { .. } => "postgres",
        StoreConfig::Scylla(_) => "scylla",
    }
}

fn metrics_check(config: &Config) -> Check {
    listen_check("metrics", config.metrics_listen, "[metrics] listen")
}

fn listen_check(name: &'static str, addr: Option<std::net::SocketAddr>, key: &str) -> Check {
    let Some(addr) = addr else {
        return check(name, Status::Ok, format!("disabled ({key} = \"\")"));
    };
    match std::net::TcpListener::bind(addr) {
        Ok(listener) => {
            drop(listener);
            check(name, Status::Ok, format!("{addr} is free"))
        }
        Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => check(
            name,
            Status::Fail,
            format!("{addr} is in use (another kdedup, or another process, listens there): choose {key}"),
        ),
        Err(e) => check(name, Status::Fail, format!("cannot listen on {addr}: {e}")),
    }
}

/// Whether the file at `path` is a `kdedup serve` config (it has a `[serve]` table).
pub(crate) fn is_serve_config(path: &Path) -> bool {
    std::fs::read_to_string(path)
        .ok()
        .and_then(|text| text.parse::<toml::Table>().ok())
        .is_some_and(|table| table.contains_key("serve"))
}

/// `kdedup check` of a `kdedup serve` config: valid, store reachable with its
/// schema, the upstream accepting connections, both listen addresses free.
pub(crate) async fn run_serve(path: &Path) -> Report {
    let mut checks = Vec::new();
    let config = match ServeConfig::load(path) {
        Ok(c) => {
            checks.push(check("config", Status::Ok, "valid serve config"));
            c
        }
        Err(e) => {
            checks.push(check("config", Status::Fail, e.to_string()));
            return finish(path, serde_json::Value::Null, checks);
        }
    };
    let settings = json!({
        "listen": config.listen.to_string(),
        "upstream": redact_url(&config.upstream),
        "scope": config.scope,
        "methods": config.methods,
        "key_header": config.key_header,
        "client_header": config.client_header,
        "fingerprint_headers": config.fingerprint_headers,
        "missing_key": format!("{:?}", config.missing_key).to_lowercase(),
        "on_5xx": format!("{:?}", config.on_5xx).to_lowercase(),
        "wait_ms": config.wait.as_millis() as u64,
        "ttl_secs": config.retention.ttl.as_secs(),
        "lease_secs": config.retention.lease.as_secs(),
        "store": kind(&config.store),
    });
    checks.push(store_check(&config.store, &config.retention, path).await);
    let host = config.upstream.trim_start_matches("http://").to_string();
    let upstream = tokio::time::timeout(Duration::from_secs(5), tokio::net::TcpStream::connect(host.as_str())).await;
    checks.push(match upstream {
        Ok(Ok(_)) => check("upstream", Status::Ok, format!("{host} accepts connections")),
        Ok(Err(e)) => check("upstream", Status::Warn, format!("{host}: {e} (requests get 502 until it answers)")),
        Err(_) => check("upstream", Status::Warn, format!("{host} did not accept a connection within 5 s")),
    });
    checks.push(listen_check("listen", Some(config.listen), "[serve] listen"));
    checks.push(listen_check("metrics", config.metrics_listen, "[metrics] listen"));
    finish(path, settings, checks)
}

/// The settings `kdedup run` would use, secrets redacted.
fn settings(c: &Config) -> serde_json::Value {
    let store = store_settings(&c.store);
    let sink = sink_settings(&c.sink);
    json!({
        "kafka": {
            "brokers": c.kafka.brokers,
            "group_id": c.kafka.group_id,
            "topics": c.kafka.topics,
            "client": redacted(&c.kafka.client),
            "consumer": redacted(&c.kafka.consumer),
            "producer": redacted(&c.kafka.producer),
        },
        "key": {
            "source": key_source(&c.key.source),
            "scope": c.key.scope,
            "max_bytes": c.key.max_bytes.get(),
            "on_oversize": match c.key.on_oversize {
                crate::config::OnOversize::Hash => "hash",
                crate::config::OnOversize::DeadLetter => "dead_letter",
            },
            "fingerprint_fields": if c.key.fingerprint_fields.is_empty() {
                "the whole payload".to_string()
            } else {
                c.key.fingerprint_fields.join(", ")
            },
        },
        "filter": {
            "expected_keys": c.filter.expected_keys.get(),
            "false_positive_rate": c.filter.false_positive_rate,
            "recent_keys": c.filter.recent_keys,
            "expired_keys": c.filter.expired_keys,
        },
        "pipeline": {
            "batch_max": c.pipeline.batch_max.get(),
            "commit_interval_ms": c.pipeline.commit_interval.as_millis() as u64,
            "drain_timeout_ms": c.pipeline.drain_timeout.as_millis() as u64,
            "on_conflict": match c.pipeline.on_conflict {
                crate::config::OnConflict::DeadLetter => "dead_letter",
                crate::config::OnConflict::Drop => "drop",
            },
        },
        "store": store,
        "ttl_secs": c.retention.ttl.as_secs(),
        "lease_secs": c.retention.lease.as_secs(),
        "sink": sink,
        "dead_letter_topic": c.dead_letter_topic,
        "duplicates_topic": c.duplicates_topic,
        "metrics_listen": c.metrics_listen.map(|a| a.to_string()),
        // Observe mode forwards duplicates: say so where the settings are checked.
        "mode": match c.pipeline.mode {
            crate::config::Mode::Enforce => "enforce",
            crate::config::Mode::Observe => "observe (every record forwarded, stamped kdedup-duplicate)",
        },
    })
}

/// `[store]`, its password and the URL's redacted.
fn store_settings(store: &StoreConfig) -> serde_json::Value {
    match store {
        StoreConfig::Embedded { path } => json!({ "kind": "embedded", "path": path.display().to_string() }),
        StoreConfig::Postgres { url, pool_size, tls } => {
            let (mode, ca_file) = match tls {
                PostgresTls::Prefer => ("prefer (TLS if offered, not verified)", None),
                PostgresTls::Disable => ("disable", None),
                PostgresTls::Require => ("require (encrypted, not verified)", None),
                PostgresTls::VerifyFull { ca_file } => {
                    ("verify-full", ca_file.as_ref().map(|p| p.display().to_string()))
                }
            };
            json!({ "kind": "postgres", "url": redact_url(url.expose()), "pool_size": pool_size, "tls": mode, "tls_ca_file": ca_file })
        }
        StoreConfig::Scylla(s) => json!({
            "kind": "scylla",
            "contact_points": s.contact_points,
            "local_datacenter": s.local_datacenter,
            "keyspace": s.keyspace,
            "tls": s.tls.is_some(),
            "username": s.credentials.as_ref().map(|(u, _)| u.clone()),
            "password": s.credentials.as_ref().map(|_| "<redacted>"),
        }),
    }
}

/// `[sink]`, its header values and the URL's password redacted.
fn sink_settings(sink: &SinkConfig) -> serde_json::Value {
    match sink {
        SinkConfig::Kafka { topic, partitioning } => json!({
            "kind": "kafka",
            "topic": topic,
            "partitioning": match partitioning { Partitioning::Source => "source", Partitioning::Key => "key" },
        }),
        SinkConfig::Stdout => json!({ "kind": "stdout" }),
        SinkConfig::Custom => json!({ "kind": "custom" }),
        SinkConfig::Http(h) => json!({
            "kind": "http",
            "url": redact_url(h.url.expose()),
            "method": h.method,
            "idempotency_header": h.idempotency_header,
            "headers": h.headers.iter().map(|(k, _)| (k.clone(), "<redacted>")).collect::<std::collections::BTreeMap<_, _>>(),
            "timeout_ms": h.timeout.as_millis() as u64,
            "max_in_flight": h.max_in_flight.get(),
            "retry_budget_ms": h.retry_budget.as_millis() as u64,
            "results_topic": h.results_topic,
        }),
    }
}

/// Prints the report for a person.
pub(crate) fn print(report: &Report) {
    println!("kdedup check: {}", report.config);
    if !report.settings.is_null() {
        println!("\neffective settings (secrets redacted):");
        print_value(&report.settings, 1);
    }
    println!("\nchecks:");
    for c in &report.checks {
        let tag = match c.status {
            Status::Ok => " ok ",
            Status::Warn => "warn",
            Status::Fail => "FAIL",
            Status::Skip => "skip",
        };
        println!("  [{tag}] {:<13} {}", c.name, c.detail);
    }
    println!(
        "\n{}",
        if report.ok { "OK: every check passed" } else { "FAILED: fix the checks marked FAIL, then run again" }
    );
}

fn print_value(v: &serde_json::Value, depth: usize) {
    let pad = "  ".repeat(depth);
    if let serde_json::Value::Object(map) = v {
        for (k, v) in map {
            match v {
                serde_json::Value::Object(inner) if inner.is_empty() => println!("{pad}{k}: {{}}"),
                serde_json::Value::Object(_) => {
                    println!("{pad}{k}:");
                    print_value(v, depth + 1);
                }
                serde_json::Value::String(s) => println!("{pad}{k}: {s}"),
                other => println!("{pad}{k}: {other}"),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_lose_their_userinfo_and_queries() {
        assert_eq!(redact_url("postgres://u:pw@db:5432/k"), "postgres://<redacted>@db:5432/k");
        assert_eq!(redact_url("postgres://u@db/k?password=pw"), "postgres://<redacted>@db/k?<redacted>");
        assert_eq!(redact_url("postgres://db/k"), "postgres://db/k");
        assert_eq!(redact_url("host=db password=pw"), "<redacted>");
        // An `@` in the path is not userinfo; a fragment goes with the query.
        assert_eq!(redact_url("https://h/a@b#tok"), "https://h/a@b?<redacted>");
        assert_eq!(redact_url("https://tok@h?x=1/y"), "https://<redacted>@h?<redacted>");
    }
}
