//! Every metric in one place, plus the HTTP endpoint (`/metrics`, `/healthz`,
//! `/readyz`). Each pipeline owns its own registry, so tests (and the demo)
//! can run several pipelines in one process and read exact counts.
//!
//! Labels are bounded: outcome, op, result, store, topic, partition. Never an event ID.
//!
//! A store that talks to its server statement by statement (ScyllaDB) keeps
//! [`StoreOpMetrics`] of its own, since one store serves every pipeline of a
//! process; the service registers them into the pipeline's registry.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry,
    TextEncoder,
};

/// Fine buckets for per-record latency, 0.5 ms to about 35 s in steps of 25%
/// (so quantiles read from them are within a few percent).
pub fn record_buckets() -> Vec<f64> {
    prometheus::exponential_buckets(0.0005, 1.25, 51).expect("static bucket layout")
}

/// Outcomes of a record; they sum to the records consumed.
pub const OUTCOMES: [&str; 4] = ["new", "duplicate", "conflict", "dead_letter"];

#[derive(Clone)]
pub struct Metrics {
    pub registry: Registry,
    pub consumed: IntCounter,
    pub records: IntCounterVec,
    pub filter: IntCounterVec,
    pub bloom_false_positives: IntCounter,
    pub store_seconds: HistogramVec,
    pub store_errors: IntCounter,
    pub sink_seconds: Histogram,
    pub record_seconds: Histogram,
    pub sink_errors: IntCounter,
    pub claim_waits: IntCounter,
    pub claims_resumed: IntCounter,
    pub claims_lost: IntCounter,
    pub reconciled: IntCounter,
    pub commits: IntCounter,
    pub fsyncs: IntCounter,
    pub committed_offset: IntGaugeVec,
    pub assigned_partitions: IntGauge,
    pub lease_takeovers: IntCounter,
    pub leases_lost: IntCounter,
    pub claims_given_back: IntCounter,
    pub possible_repeats: IntCounter,
    pub partition_panics: IntCounter,
    pub side_refusals: IntCounterVec,
    pub ownership_checks: IntCounter,
    pub zombie_batches_dropped: IntCounter,
    pub partition_stalled_since: IntGaugeVec,
    health: Arc<Health>,
}

/// Readiness: the source is in its group, and no assigned partition is stalled
/// (retrying a store call, an effect, a dead letter, or its reconciliation).
#[derive(Default)]
struct Health {
    source_ready: AtomicBool,
    /// Stalled partitions and since when (seconds since the epoch).
    stalled: Mutex<HashMap<(String, i32), i64>>,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        let registry = Registry::new();
        let counter = |name: &str, help: &str| {
            let c = IntCounter::new(name, help).expect("metric names are static and valid");
            registry.register(Box::new(c.clone())).expect("each metric is registered once");
            c
        };
        let counter_vec = |name: &str, help: &str, labels: &[&str]| {
            let c = IntCounterVec::new(Opts::new(name, help), labels).expect("metric names are static and valid");
            registry.register(Box::new(c.clone())).expect("each metric is registered once");
            c
        };
        // 100 µs .. ~6.5 s
        let buckets = prometheus::exponential_buckets(0.0001, 2.0, 17).expect("static bucket layout");
        let store_seconds = HistogramVec::new(
            HistogramOpts::new("kdedup_store_seconds", "Store call latency by operation (one call carries a batch).")
                .buckets(buckets.clone()),
            &["op"],
        )
        .expect("static metric");
        registry.register(Box::new(store_seconds.clone())).expect("registered once");
        let sink_seconds = Histogram::with_opts(
            HistogramOpts::new("kdedup_sink_seconds", "Time for a batch's effects to be acknowledged by the sink.")
                .buckets(buckets),
        )
        .expect("static metric");
        registry.register(Box::new(sink_seconds.clone())).expect("registered once");
        let record_seconds = Histogram::with_opts(
            HistogramOpts::new(
                "kdedup_record_seconds",
                "Time kdedup adds per record: from its batch's arrival in the partition task to its effect delivered and its claim completed.",
            )
            .buckets(record_buckets()),
        )
        .expect("static metric");
        registry.register(Box::new(record_seconds.clone())).expect("registered once");
        let committed_offset = IntGaugeVec::new(
            Opts::new("kdedup_committed_offset", "Last offset committed (next to read), per partition."),
            &["topic", "partition"],
        )
        .expect("static metric");
        registry.register(Box::new(committed_offset.clone())).expect("registered once");
        let assigned_partitions =
            IntGauge::new("kdedup_assigned_partitions", "Partitions this process owns.").expect("static metric");
        registry.register(Box::new(assigned_partitions.clone())).expect("registered once");

        let records = counter_vec(
            "kdedup_records_total",
            "Records finished, by outcome: new (effect ran), duplicate, conflict, dead_letter.",
            &["outcome"],
        );
        for outcome in OUTCOMES {
            records.with_label_values(&[outcome]);
        }
        let filter = counter_vec(
            "kdedup_filter_total",
            "Filter answers: recent_hit (no store call), bloom_hit (store read first), bloom_miss (claim directly).",
            &["result"],
        );
        Metrics {
            consumed: counter("kdedup_records_consumed_total", "Records taken from Kafka."),
            records,
            filter,
            bloom_false_positives: counter(
                "kdedup_bloom_false_positives_total",
                "Bloom hits whose store read found no row.",
            ),
            store_seconds,
            store_errors: counter("kdedup_store_errors_total", "Failed store calls (retried with backoff)."),
            sink_seconds,
            record_seconds,
            sink_errors: counter("kdedup_sink_errors_total", "Failed effects (retried, or dead-lettered when not retriable)."),
            claim_waits: counter("kdedup_claim_waits_total", "Claims answered in-flight (another owner's live lease)."),
            claims_resumed: counter("kdedup_claims_resumed_total", "Claims resumed at their own position after a crash."),
            claims_lost: counter(
                "kdedup_claims_lost_total",
                "Completions refused because the claim was taken over (the effect may run twice).",
            ),
            reconciled: counter(
                "kdedup_reconciled_total",
                "New claims whose effect was found already in the output (a crash after the effect): completed, not re-run.",
            ),
            commits: counter("kdedup_commits_total", "Offset commits sent to Kafka."),
            fsyncs: counter("kdedup_store_syncs_total", "Store durability barriers (fsyncs) run before commits."),
            committed_offset,
            assigned_partitions,
            lease_takeovers: counter(
                "kdedup_lease_takeovers_total",
                "Claims taken over from another position whose lease lapsed (its owner died or froze); emitted as possible repeats.",
            ),
            leases_lost: counter(
                "kdedup_leases_lost_total",
                "Lease renewals refused: another owner took the claim over while this one held it.",
            ),
            claims_given_back: counter(
                "kdedup_claims_given_back_total",
                "Claims a waiting batch released so that batches sharing keys cannot wait on each other for ever.",
            ),
            possible_repeats: counter(
                "kdedup_possible_repeats_total",
                "Effects emitted with kdedup-possible-repeat: true (resumed, taken over, or retried after a failed delivery).",
            ),
            partition_panics: counter("kdedup_partition_panics_total", "Partition tasks that panicked (kdedup then exits non-zero)."),
            side_refusals: counter_vec(
                "kdedup_side_refusals_total",
                "Side-topic writes refused for good, by side (a refused dead letter stalls its partition).",
                &["side"],
            ),
            ownership_checks: counter(
                "kdedup_ownership_checks_total",
                "Batches that waited for the group's word before writing, after this process was frozen.",
            ),
            zombie_batches_dropped: counter(
                "kdedup_zombie_batches_dropped_total",
                "Batches not written because their partition was revoked after a freeze (the next owner writes them).",
            ),
            partition_stalled_since: {
                let g = IntGaugeVec::new(
                    Opts::new(
                        "kdedup_partition_stalled_since_seconds",
                        "When the partition stalled (Unix seconds; 0 while it progresses): it is retrying a store call, an effect, a dead letter or its reconciliation.",
                    ),
                    &["topic", "partition"],
                )
                .expect("static metric");
                registry.register(Box::new(g.clone())).expect("registered once");
                g
            },
            registry,
            health: Arc::default(),
        }
    }

    pub fn outcome(&self, outcome: &str) -> u64 {
        self.records.with_label_values(&[outcome]).get()
    }

    /// The source joined its group (true) or is leaving it (false).
    pub fn set_ready(&self, ready: bool) {
        self.health.source_ready.store(ready, Ordering::Relaxed);
    }

    /// Ready: in the group, and every assigned partition progressing or idle.
    pub fn is_ready(&self) -> bool {
        self.health.source_ready.load(Ordering::Relaxed) && self.stalled_partitions() == 0
    }

    pub fn stalled_partitions(&self) -> usize {
        self.health.stalled.lock().unwrap_or_else(|p| p.into_inner()).len()
    }

    /// A partition is retrying and cannot move on; the first call sets the time.
    pub fn partition_stalled(&self, tp: &(Arc<str>, i32)) {
        let mut stalled = self.health.stalled.lock().unwrap_or_else(|p| p.into_inner());
        if let std::collections::hash_map::Entry::Vacant(slot) = stalled.entry((tp.0.to_string(), tp.1)) {
            let since = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs() as i64)
                .unwrap_or(1);
            slot.insert(since);
            self.partition_stalled_since.with_label_values(&[tp.0.to_string(), tp.1.to_string()]).set(since);
        }
    }

    /// The partition moved on.
    pub fn partition_progressing(&self, tp: &(Arc<str>, i32)) {
        let mut stalled = self.health.stalled.lock().unwrap_or_else(|p| p.into_inner());
        if stalled.remove(&(tp.0.to_string(), tp.1)).is_some() {
            self.partition_stalled_since.with_label_values(&[tp.0.to_string(), tp.1.to_string()]).set(0);
        }
    }

    /// The partition left this process: it no longer counts for readiness.
    pub fn partition_gone(&self, tp: &(Arc<str>, i32)) {
        self.health.stalled.lock().unwrap_or_else(|p| p.into_inner()).remove(&(tp.0.to_string(), tp.1));
        let _ = self.partition_stalled_since.remove_label_values(&[tp.0.to_string(), tp.1.to_string()]);
    }

    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        TextEncoder::new().encode(&self.registry.gather(), &mut buf).expect("encoding to a Vec cannot fail");
        String::from_utf8(buf).expect("the text format is UTF-8")
    }
}

/// Results of one store statement, the `result` label of `kdedup_store_ops_total`.
pub const STORE_OP_RESULTS: [&str; 5] = ["applied", "not_applied", "ok", "timeout", "error"];

/// Per-statement metrics of a store (one store call may run many statements):
/// `kdedup_store_ops_total{store,op,result}` and `kdedup_store_op_seconds{store,op}`.
/// `op` names the statement kind (for ScyllaDB: `insert`, `takeover`, `resume`,
/// `complete`, `release`, `forget`, `sweep_delete` are lightweight transactions;
/// `read`, `serial_read`, `scan` are reads), so lookups on the Bloom route and
/// Paxos claims are counted apart; `result` is one of [`STORE_OP_RESULTS`].
#[derive(Clone)]
pub struct StoreOpMetrics {
    pub ops: IntCounterVec,
    pub seconds: HistogramVec,
}

impl Default for StoreOpMetrics {
    fn default() -> Self {
        StoreOpMetrics::new()
    }
}

impl StoreOpMetrics {
    /// Unregistered; see [`Metrics::register_store_ops`].
    pub fn new() -> StoreOpMetrics {
        let ops = IntCounterVec::new(
            Opts::new(
                "kdedup_store_ops_total",
                "Store statements by kind and result: applied / not_applied (lightweight transactions), ok (reads), \
                 timeout (outcome unknown at first; settled by a SERIAL read), error.",
            ),
            &["store", "op", "result"],
        )
        .expect("static metric");
        // 100 µs .. ~6.5 s, as kdedup_store_seconds
        let buckets = prometheus::exponential_buckets(0.0001, 2.0, 17).expect("static bucket layout");
        let seconds = HistogramVec::new(
            HistogramOpts::new("kdedup_store_op_seconds", "Latency of one store statement, by kind.").buckets(buckets),
            &["store", "op"],
        )
        .expect("static metric");
        StoreOpMetrics { ops, seconds }
    }

    pub fn observe(&self, store: &str, op: &str, result: &str, seconds: f64) {
        self.ops.with_label_values(&[store, op, result]).inc();
        self.seconds.with_label_values(&[store, op]).observe(seconds);
    }

    /// How many statements of this kind ended with this result.
    pub fn count(&self, store: &str, op: &str, result: &str) -> u64 {
        self.ops.with_label_values(&[store, op, result]).get()
    }
}

impl Metrics {
    /// Exposes a store's per-statement metrics on this registry (once; again is a no-op).
    pub fn register_store_ops(&self, ops: &StoreOpMetrics) {
        for collector in
            [Box::new(ops.ops.clone()) as Box<dyn prometheus::core::Collector>, Box::new(ops.seconds.clone())]
        {
            match self.registry.register(collector) {
                Ok(()) | Err(prometheus::Error::AlreadyReg) => {}
                Err(e) => tracing::warn!(error = %e, "cannot register the store's statement metrics"),
            }
        }
    }
}

/// The metrics endpoint, served from its own thread until dropped.
pub struct MetricsServer {
    server: Arc<tiny_http::Server>,
    thread: Option<JoinHandle<()>>,
    pub addr: SocketAddr,
}

impl MetricsServer {
    pub fn start(addr: SocketAddr, metrics: Metrics) -> anyhow::Result<MetricsServer> {
        let server = tiny_http::Server::http(addr)
            .map_err(|e| anyhow::anyhow!("cannot listen for metrics on {addr}: {e} (set [metrics] listen)"))?;
        let addr = server.server_addr().to_ip().unwrap_or(addr);
        let server = Arc::new(server);
        let serving = server.clone();
        let thread = std::thread::Builder::new().name("kdedup-metrics".into()).spawn(move || {
            for request in serving.incoming_requests() {
                let (status, body, content_type) = match request.url() {
                    "/metrics" => (200, metrics.render(), "text/plain; version=0.0.4"),
                    "/healthz" => (200, "ok\n".to_string(), "text/plain"),
                    "/readyz" if metrics.is_ready() => (200, "ready\n".to_string(), "text/plain"),
                    "/readyz" => (503, "not ready\n".to_string(), "text/plain"),
                    _ => (404, "try /metrics, /healthz or /readyz\n".to_string(), "text/plain"),
                };
                let header =
                    tiny_http::Header::from_bytes("Content-Type", content_type).expect("static header is valid");
                let _ = request
                    .respond(tiny_http::Response::from_string(body).with_status_code(status).with_header(header));
            }
        })?;
        Ok(MetricsServer { server, thread: Some(thread), addr })
    }
}

impl Drop for MetricsServer {
    fn drop(&mut self) {
        self.server.unblock();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
