//! Every metric in one place, plus the HTTP endpoint (`/` a status page,
//! `/metrics`, `/healthz`, `/readyz`). Each pipeline owns its own registry, so tests (and the demo)
//! can run several pipelines in one process and read exact counts.
//!
//! Labels are bounded: outcome, reason, kind, op, result, store, tier, topic, partition. Never an event ID.
//!
//! Lag is sampled by the source thread every commit interval ([`Metrics::sample_lag`]):
//! in records from librdkafka's cached high watermark (no broker request), and
//! in seconds from the timestamps of the records taken but not yet committed.
//!
//! A store that talks to its server statement by statement (ScyllaDB) keeps
//! [`StoreOpMetrics`] of its own, since one store serves every pipeline of a
//! process; the service registers them into the pipeline's registry.

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use prometheus::core::Collector;
use prometheus::{
    Counter, Encoder, Gauge, GaugeVec, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};
use rdkafka::consumer::{Consumer, ConsumerContext};

use crate::event::Record;

/// Fine buckets for per-record latency, 0.5 ms to about 35 s in steps of 25%
/// (so quantiles read from them are within a few percent).
pub fn record_buckets() -> Vec<f64> {
    prometheus::exponential_buckets(0.0005, 1.25, 51).expect("static bucket layout")
}

/// Outcomes of a record; per topic, they sum to the records consumed.
pub const OUTCOMES: [&str; 4] = ["new", "duplicate", "conflict", "dead_letter"];

/// The `reason` label of `kdedup_dead_letters_total`: every [`crate::error::RecordError::reason`].
pub const DEAD_LETTER_REASONS: [&str; 5] = ["missing_id", "invalid_json", "oversize_id", "conflict", "sink_rejected"];

/// The `kind` label of `kdedup_rebalances_total`.
pub const REBALANCE_KINDS: [&str; 3] = ["assign", "revoke", "lost"];

/// The `kind` label of `kdedup_sink_errors_total`: [`crate::error::SinkError::kind`].
pub const SINK_ERROR_KINDS: [&str; 3] = ["retriable", "rejected", "fatal"];

/// The (`tier`, `result`) labels of `kdedup_filter_checks_total`: the recent
/// cache is checked first; its misses go on to the aging filter.
pub const FILTER_CHECKS: [(&str, &str); 4] =
    [("recent", "hit"), ("recent", "miss"), ("aging", "hit"), ("aging", "miss")];

/// Buckets of `kdedup_duplicate_age_seconds`: 1 ms to about 17 years, doubling
/// (TTLs run from seconds to years); how close to the TTL is the separate
/// counter's job (`kdedup_duplicates_near_expiry_total`).
pub fn duplicate_age_buckets() -> Vec<f64> {
    prometheus::exponential_buckets(0.001, 2.0, 40).expect("static bucket layout")
}

/// A counter vector with `N` labels whose `get()` is the sum over all its
/// series, so callers that count totals (tests, the demo) need not know the
/// labels; [`Summed::at`] checks the number of label values when it compiles.
#[derive(Clone)]
pub struct Summed<const N: usize>(IntCounterVec);

impl<const N: usize> Summed<N> {
    /// The counter of these label values, in the order the metric declares them.
    pub fn at(&self, labels: [&str; N]) -> IntCounter {
        self.0.with_label_values(&labels)
    }

    /// The sum over every label value seen.
    pub fn get(&self) -> u64 {
        self.sum_where(|_| true)
    }

    /// The sum over the series whose labels pass `keep` (name, value pairs).
    fn sum_where(&self, keep: impl Fn(&[(&str, &str)]) -> bool) -> u64 {
        let mut sum = 0.0;
        for family in self.0.collect() {
            for m in family.get_metric() {
                let labels: Vec<(&str, &str)> = m.get_label().iter().map(|l| (l.name(), l.value())).collect();
                if keep(&labels) {
                    sum += m.get_counter().get_value();
                }
            }
        }
        sum as u64
    }
}

/// Every metric of one pipeline and its health, registered on its own [`Registry`]; cheap to
/// clone (the handles are shared). Names, labels and meanings are in each field's doc.
#[derive(Clone)]
pub struct Metrics {
    /// The registry every metric here is registered on; `/metrics` renders it.
    pub registry: Registry,
    /// `kdedup_records_consumed_total{topic}`; `consumed.get()` sums over topics.
    pub consumed: Summed<1>,
    /// `kdedup_records_total{topic,outcome}`; see [`Metrics::outcome`].
    pub records: Summed<2>,
    /// `kdedup_dead_letters_total{topic,reason}`.
    pub dead_letters: Summed<2>,
    /// `kdedup_rebalances_total{kind}`: assign, revoke, lost.
    pub rebalances: IntCounterVec,
    /// `kdedup_consumer_lag_records{topic,partition}`: high watermark minus committed offset.
    pub lag_records: IntGaugeVec,
    /// `kdedup_consumer_lag_seconds{topic,partition}`: age of the oldest uncommitted record.
    pub lag_seconds: GaugeVec,
    /// `kdedup_filter_bytes`: memory the filters hold.
    pub filter_bytes: IntGauge,
    /// `kdedup_filter_checks_total{tier,result}`; see `FILTER_CHECKS`.
    pub filter: IntCounterVec,
    /// `kdedup_bloom_false_positives_total`: aging-filter hits whose store read found no row.
    pub bloom_false_positives: IntCounter,
    /// `kdedup_store_seconds{op,result}`: store call latency (one call carries a batch).
    pub store_seconds: HistogramVec,
    /// `kdedup_store_errors_total`: failed store calls, retried with backoff.
    pub store_errors: IntCounter,
    /// `kdedup_sink_seconds`: time for a batch's effects to be acknowledged.
    pub sink_seconds: Histogram,
    /// `kdedup_record_seconds`: time kdedup adds per record, arrival to completed claim.
    pub record_seconds: Histogram,
    /// `kdedup_sink_errors_total{kind}`; see `SINK_ERROR_KINDS`.
    pub sink_errors: Summed<1>,
    /// `kdedup_duplicate_age_seconds{topic}`: now − the first claim, per duplicate.
    pub duplicate_age: HistogramVec,
    /// `kdedup_duplicates_near_expiry_total{topic}`: duplicates older than 90% of the TTL.
    pub near_expiry: Summed<1>,
    /// `kdedup_expired_key_hits_total{topic}`: `new` events whose key expired within a TTL.
    pub expired_key_hits: Summed<1>,
    /// `kdedup_ttl_seconds`: the configured `ttl_secs`.
    pub ttl_seconds: Gauge,
    /// `kdedup_store_unavailable_seconds_total`: time some partition was
    /// stalled on a failing store call (readiness false because of the store).
    pub store_unavailable: Counter,
    /// `kdedup_claim_waits_total`: claims answered in-flight (another owner's live lease).
    pub claim_waits: IntCounter,
    /// `kdedup_claims_resumed_total`: claims resumed at their own position after a crash.
    pub claims_resumed: IntCounter,
    /// `kdedup_drain_released_total`: claims a stop released because their effects had not started.
    pub drain_released: IntCounter,
    /// `kdedup_claims_lost_total`: completions refused because the claim was taken over.
    pub claims_lost: IntCounter,
    /// `kdedup_reconciled_total`: new claims whose effect was found already written: completed, not re-run.
    pub reconciled: IntCounter,
    /// `kdedup_commits_total`: offset commits sent to Kafka.
    pub commits: IntCounter,
    /// `kdedup_store_syncs_total`: store durability barriers run before commits.
    pub fsyncs: IntCounter,
    /// `kdedup_store_writes_total`: keys the store wrote (rows, index entries,
    /// deletions), for backends that count them (the embedded store); brought
    /// up to date at each commit's durability barrier.
    pub store_writes: IntCounter,
    /// `kdedup_store_memory_bytes`: what the store holds in this process
    /// (the embedded store's memtables and block cache); updated at each commit.
    pub store_memory_bytes: IntGauge,
    /// `kdedup_committed_offset{topic,partition}`: the last offset committed (next to read).
    pub committed_offset: IntGaugeVec,
    /// `kdedup_assigned_partitions`: partitions this process owns.
    pub assigned_partitions: IntGauge,
    /// `kdedup_topic_partitions{topic}`: partitions each input topic had at start, so that a
    /// dashboard can set the partitions each instance owns against the topic's.
    pub topic_partitions: IntGaugeVec,
    /// `kdedup_embedded_store_partial`: 1 while this process keeps its claims in an embedded
    /// (single-instance) store and owns only part of its input topics' partitions; see
    /// [`Metrics::embedded_store_ownership`].
    pub embedded_store_partial: IntGauge,
    /// `kdedup_lease_takeovers_total`: claims taken over from a lapsed lease (emitted as possible repeats).
    pub lease_takeovers: IntCounter,
    /// `kdedup_leases_lost_total`: lease renewals refused because another owner took the claim.
    pub leases_lost: IntCounter,
    /// `kdedup_reconciliations_incomplete_total`: reconciliations that could not read the whole log back.
    pub reconciliations_incomplete: IntCounter,
    /// `kdedup_possible_repeats_total`: effects emitted with `kdedup-possible-repeat: true`.
    pub possible_repeats: IntCounter,
    /// `kdedup_partition_panics_total`: partition tasks that panicked.
    pub partition_panics: IntCounter,
    /// `kdedup_side_refusals_total{side}`: side-topic writes refused for good.
    pub side_refusals: IntCounterVec,
    /// HTTP sink attempts by answer: `2xx`…`5xx`, `timeout`, `connect`, `error`.
    pub http_requests: IntCounterVec,
    /// `kdedup_ownership_checks_total`: batches that waited for the group's word after a freeze.
    pub ownership_checks: IntCounter,
    /// `kdedup_zombie_batches_dropped_total`: batches not written because their partition was revoked.
    pub zombie_batches_dropped: IntCounter,
    /// `kdedup_partition_stalled_since_seconds{topic,partition}`: Unix seconds a partition stalled at; 0 while it progresses.
    pub partition_stalled_since: IntGaugeVec,
    /// `kdedup_partition_dead_letter_share{topic,partition}`: the share of the partition's last
    /// records dead-lettered for their most common reason (a `[key]` that does not match the data).
    pub partition_dead_letter_share: GaugeVec,
    /// `kdedup_partition_errors_total{topic,reason}`: errors a partition's queue reported
    /// (`decode`, `offset_reset`, `authorization`, `other`) and gaps they left (`skipped`).
    pub partition_errors: IntCounterVec,
    health: Arc<Health>,
}

/// Readiness: the source is in its group, and no assigned partition is stalled
/// (retrying a store call, an effect, a dead letter, or its reconciliation).
#[derive(Default)]
struct Health {
    source_ready: AtomicBool,
    /// Stalled partitions: since when (seconds since the epoch) and why.
    stalled: Mutex<HashMap<(String, i32), (i64, String)>>,
    /// Per partition, batches taken but not yet committed: (last offset, oldest
    /// record timestamp in ms), in offset order; for `kdedup_consumer_lag_seconds`.
    taken: Mutex<HashMap<(String, i32), Taken>>,
    /// (when, duplicates, records finished), sampled with the lag, for the status
    /// page's recent duplicate rate; [`HISTORY`] long.
    history: Mutex<VecDeque<(std::time::Instant, u64, u64)>>,
    store_down: Mutex<StoreDown>,
    /// The TTL in ms, for the near-expiry threshold (0 until [`Metrics::set_ttl`]).
    ttl_ms: AtomicU64,
    /// (owned, total) partitions while an embedded store owns only part of the topics.
    partial: Mutex<Option<(usize, usize)>>,
}

/// Partitions whose last store call failed, and since when at least one has.
type StoreDown = (std::collections::HashSet<(String, i32)>, Option<std::time::Instant>);

/// How far back the status page's samples reach; its recent rate spans one minute.
const HISTORY: std::time::Duration = std::time::Duration::from_secs(300);
const RECENT: std::time::Duration = std::time::Duration::from_secs(60);

/// A partition's records taken and not yet committed, for the lag in seconds.
#[derive(Default)]
struct Taken {
    /// Batches in offset order: (last offset, oldest and newest record timestamp in ms).
    batches: VecDeque<(i64, i64, i64)>,
    /// The newest timestamp among the records committed so far.
    committed_ms: Option<i64>,
}

impl Taken {
    fn push(&mut self, last: i64, oldest_ms: i64, newest_ms: i64) {
        let full = self.batches.len() >= TAKEN_BATCHES_MAX;
        match self.batches.back_mut() {
            Some(back) if full => *back = (back.0.max(last), back.1, back.2.max(newest_ms)),
            _ => self.batches.push_back((last, oldest_ms, newest_ms)),
        }
    }

    /// Forgets the batches below the committed offset `done` (next to read) and
    /// returns the lag in seconds: the age of the oldest record taken and not
    /// committed; with none taken but the partition `behind` (records fetched
    /// and queued, or not fetched yet), the age of the newest committed record,
    /// which the next one is no older than; else 0.
    fn age(&mut self, done: Option<i64>, behind: bool, now_ms: i64) -> f64 {
        if let Some(done) = done {
            while let Some(&(_, _, newest)) = self.batches.front().filter(|b| b.0 < done) {
                self.committed_ms = Some(self.committed_ms.map_or(newest, |c| c.max(newest)));
                self.batches.pop_front();
            }
        }
        let oldest = match self.batches.front() {
            Some(&(_, oldest, _)) => Some(oldest),
            None if behind => self.committed_ms,
            None => None,
        };
        oldest.map_or(0.0, |t| (now_ms - t).max(0) as f64 / 1000.0)
    }
}

/// Batches remembered per partition for the lag in seconds; past this, later
/// batches widen the last entry (the oldest one, which the gauge reads, stays exact).
const TAKEN_BATCHES_MAX: usize = 1024;

/// Text made safe for HTML.
fn esc(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('"', "&quot;")
}

/// A share as a percentage with one decimal, or a dash.
fn pct(r: Option<f64>) -> String {
    r.map_or("–".to_string(), |r| format!("{:.1}%", r * 100.0))
}

fn now_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0)
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

/// Builds [`Metrics`] onto one registry, a family at a time: each helper registers
/// what it makes and hands back its handle.
struct Reg<'a>(&'a Registry);

impl Reg<'_> {
    fn add<C: Collector + Clone + 'static>(&self, c: C) -> C {
        self.0.register(Box::new(c.clone())).expect("each metric is registered once");
        c
    }

    fn counter(&self, name: &str, help: &str) -> IntCounter {
        self.add(IntCounter::new(name, help).expect("metric names are static and valid"))
    }

    fn counter_vec(&self, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
        self.add(IntCounterVec::new(Opts::new(name, help), labels).expect("metric names are static and valid"))
    }

    fn gauge(&self, name: &str, help: &str) -> IntGauge {
        self.add(IntGauge::new(name, help).expect("static metric"))
    }

    fn gauge_vec(&self, name: &str, help: &str, labels: &[&str]) -> IntGaugeVec {
        self.add(IntGaugeVec::new(Opts::new(name, help), labels).expect("static metric"))
    }

    fn float_gauge_vec(&self, name: &str, help: &str, labels: &[&str]) -> GaugeVec {
        self.add(GaugeVec::new(Opts::new(name, help), labels).expect("static metric"))
    }

    fn histogram(&self, name: &str, help: &str, buckets: Vec<f64>) -> Histogram {
        self.add(Histogram::with_opts(HistogramOpts::new(name, help).buckets(buckets)).expect("static metric"))
    }

    fn histogram_vec(&self, name: &str, help: &str, buckets: Vec<f64>, labels: &[&str]) -> HistogramVec {
        self.add(HistogramVec::new(HistogramOpts::new(name, help).buckets(buckets), labels).expect("static metric"))
    }

    /// `kdedup_build_info`, and the process's CPU seconds, resident memory, open and
    /// maximum fds, threads and start time (from /proc).
    fn build_and_process(&self) {
        let build_info =
            self.gauge_vec("kdedup_build_info", "Always 1; the version label names the running build.", &["version"]);
        build_info.with_label_values(&[env!("CARGO_PKG_VERSION")]).set(1);
        let process = prometheus::process_collector::ProcessCollector::for_self();
        self.0.register(Box::new(process)).expect("registered once");
    }

    /// What became of the records: consumed, finished by outcome, dead-lettered, and the
    /// effects and side-topic writes that failed.
    fn outcomes(&self) -> (Summed<1>, Summed<2>, Summed<2>, Summed<1>, IntCounterVec, IntCounterVec) {
        let consumed =
            Summed(self.counter_vec("kdedup_records_consumed_total", "Records taken from Kafka, by topic.", &["topic"]));
        let records = Summed(self.counter_vec(
            "kdedup_records_total",
            "Records finished, by topic and outcome: new (effect ran), duplicate, conflict, dead_letter; per topic they \
             sum to kdedup_records_consumed_total.",
            &["topic", "outcome"],
        ));
        let dead_letters = Summed(self.counter_vec(
            "kdedup_dead_letters_total",
            "Records written to the dead-letter topic, by input topic and reason (the kdedup-reason header).",
            &["topic", "reason"],
        ));
        let sink_errors = Summed(self.counter_vec(
            "kdedup_sink_errors_total",
            "Failed effects and side-topic writes, by kind: retriable (retried), rejected (dead-lettered, or a \
             side-topic refusal), fatal (kdedup stops).",
            &["kind"],
        ));
        for kind in SINK_ERROR_KINDS {
            sink_errors.at([kind]);
        }
        let side_refusals = self.counter_vec(
            "kdedup_side_refusals_total",
            "Side-topic writes refused for good, by side (a refused dead letter stalls its partition).",
            &["side"],
        );
        let http_requests = self.counter_vec(
            "kdedup_http_requests_total",
            "HTTP sink requests, retries included, by answer: 2xx, 3xx, 4xx, 5xx, or timeout, connect, error \
             when none came.",
            &["answer"],
        );
        (consumed, records, dead_letters, sink_errors, side_refusals, http_requests)
    }

    /// How long a store call, a batch's effects and a record take.
    fn latencies(&self) -> (HistogramVec, Histogram, Histogram) {
        // 100 µs .. ~6.5 s
        let buckets = prometheus::exponential_buckets(0.0001, 2.0, 17).expect("static bucket layout");
        let store_seconds = self.histogram_vec(
            "kdedup_store_seconds",
            "Store call latency by operation and result (ok, error; one call carries a batch); its _count is \
             the calls.",
            buckets.clone(),
            &["op", "result"],
        );
        let sink_seconds =
            self.histogram("kdedup_sink_seconds", "Time for a batch's effects to be acknowledged by the sink.", buckets);
        let record_seconds = self.histogram(
            "kdedup_record_seconds",
            "Time kdedup adds per record: from its batch's arrival in the partition task to its effect delivered and its claim completed.",
            record_buckets(),
        );
        (store_seconds, sink_seconds, record_seconds)
    }

    /// Whether the TTL is long enough: duplicates' ages against it, and keys that expired.
    fn window(&self) -> (HistogramVec, Summed<1>, Summed<1>, Gauge) {
        let duplicate_age = self.histogram_vec(
            "kdedup_duplicate_age_seconds",
            "Age of each duplicate: now minus its key's first claim (from the store row or the recent cache).",
            duplicate_age_buckets(),
            &["topic"],
        );
        let near_expiry = Summed(self.counter_vec(
            "kdedup_duplicates_near_expiry_total",
            "Duplicates older than 90% of ttl_secs: the window barely caught them.",
            &["topic"],
        ));
        let expired_key_hits = Summed(self.counter_vec(
            "kdedup_expired_key_hits_total",
            "New events whose key expired within the last TTL: most likely duplicates the window was too short \
             to catch (an estimate, per process; see [filter] expired_keys).",
            &["topic"],
        ));
        let ttl_seconds = self.add(
            Gauge::new("kdedup_ttl_seconds", "The configured store.ttl_secs: how long a key suppresses its duplicates.")
                .expect("static metric"),
        );
        (duplicate_age, near_expiry, expired_key_hits, ttl_seconds)
    }

    /// The filter's memory, its checks by tier and result, and its false positives.
    fn filter(&self) -> (IntGauge, IntCounterVec, IntCounter) {
        let filter_bytes = self.gauge(
            "kdedup_filter_bytes",
            "Memory held by the filter (aging table plus the recent-key cache, estimated from its capacity).",
        );
        let filter = self.counter_vec(
            "kdedup_filter_checks_total",
            "Filter checks by tier and result: recent hit (a duplicate, no store call) or miss (on to the aging \
             filter); aging hit (suspected duplicate: store read first) or miss (claimed directly).",
            &["tier", "result"],
        );
        for (tier, result) in FILTER_CHECKS {
            filter.with_label_values(&[tier, result]);
        }
        let bloom_false_positives =
            self.counter("kdedup_bloom_false_positives_total", "Bloom hits whose store read found no row.");
        (filter_bytes, filter, bloom_false_positives)
    }

    /// The store's failures and outages, its memory and writes, and the commits its
    /// durability barriers come before.
    fn store(&self) -> (IntCounter, Counter, IntGauge, IntCounter, IntCounter, IntCounter) {
        let store_errors = self.counter("kdedup_store_errors_total", "Failed store calls (retried with backoff).");
        let store_unavailable = self.add(
            Counter::new(
                "kdedup_store_unavailable_seconds_total",
                "Seconds during which at least one partition was stalled on a failing store call (readiness false \
                 because of the store).",
            )
            .expect("static metric"),
        );
        let store_memory_bytes = self.gauge(
            "kdedup_store_memory_bytes",
            "Bytes the store holds in this process (the embedded store's memtables and block cache); updated at each commit.",
        );
        let store_writes = self.counter(
            "kdedup_store_writes_total",
            "Keys the store wrote (rows, index entries, deletions), embedded store only; updated at each commit.",
        );
        let fsyncs = self.counter("kdedup_store_syncs_total", "Store durability barriers (fsyncs) run before commits.");
        let commits = self.counter("kdedup_commits_total", "Offset commits sent to Kafka.");
        (store_errors, store_unavailable, store_memory_bytes, store_writes, fsyncs, commits)
    }

    /// Claims that waited, resumed, were released, lost or reconciled; and leases taken
    /// over or lost, with the possible repeats they emit.
    #[allow(clippy::type_complexity)] // two tuples of counters, named where new() takes them apart
    fn claims(
        &self,
    ) -> ((IntCounter, IntCounter, IntCounter, IntCounter, IntCounter), (IntCounter, IntCounter, IntCounter, IntCounter))
    {
        let claim_waits =
            self.counter("kdedup_claim_waits_total", "Claims answered in-flight (another owner's live lease).");
        let claims_resumed =
            self.counter("kdedup_claims_resumed_total", "Claims resumed at their own position after a crash.");
        let drain_released = self.counter(
            "kdedup_drain_released_total",
            "Claims a stop (shutdown, revoke) released because their effects had not started: claimed fresh by \
             the next owner, not resumed as a crash's.",
        );
        let claims_lost = self.counter(
            "kdedup_claims_lost_total",
            "Completions refused because the claim was taken over (the effect may run twice).",
        );
        let reconciled = self.counter(
            "kdedup_reconciled_total",
            "New claims whose effect was found already in the output (a crash after the effect): completed, not re-run.",
        );
        let lease_takeovers = self.counter(
            "kdedup_lease_takeovers_total",
            "Claims taken over from another position whose lease lapsed (its owner died or froze); emitted as possible repeats.",
        );
        let leases_lost = self.counter(
            "kdedup_leases_lost_total",
            "Lease renewals refused: another owner took the claim over while this one held it.",
        );
        let reconciliations_incomplete = self.counter(
            "kdedup_reconciliations_incomplete_total",
            "Reconciliations that could not read the whole log back (a bound, or retention): resumed claims there run again, marked.",
        );
        let possible_repeats = self.counter(
            "kdedup_possible_repeats_total",
            "Effects emitted with kdedup-possible-repeat: true (resumed, taken over, or retried after a failed delivery).",
        );
        (
            (claim_waits, claims_resumed, drain_released, claims_lost, reconciled),
            (lease_takeovers, leases_lost, reconciliations_incomplete, possible_repeats),
        )
    }

    /// The group: rebalances, the partitions owned against the topics', and an embedded
    /// store that sees only part of them.
    fn group(&self) -> (IntCounterVec, IntGauge, IntGaugeVec, IntGauge) {
        let rebalances = self.counter_vec(
            "kdedup_rebalances_total",
            "Group rebalances seen by this process, by kind: assign, revoke (partitions handed back), lost \
             (revoked without a hand-back: the group expelled this member).",
            &["kind"],
        );
        for kind in REBALANCE_KINDS {
            rebalances.with_label_values(&[kind]);
        }
        let assigned_partitions = self.gauge("kdedup_assigned_partitions", "Partitions this process owns.");
        let topic_partitions = self.gauge_vec(
            "kdedup_topic_partitions",
            "Partitions each input topic had when kdedup started (from the start-up metadata check): the \
             partitions a job's instances own together (kdedup_assigned_partitions) should add up to it.",
            &["topic"],
        );
        let embedded_store_partial = self.gauge(
            "kdedup_embedded_store_partial",
            "1 while this process keeps its claims in an embedded (single-instance) store but owns only part of \
             its input topics' partitions: another member of the group decides the rest against a store of its \
             own, so duplicates across partitions of different members are not caught. Run one instance, or use \
             a shared store (postgres, scylla).",
        );
        (rebalances, assigned_partitions, topic_partitions, embedded_store_partial)
    }

    /// A frozen process's batches checked or dropped, and partition tasks that panicked.
    fn freezes(&self) -> (IntCounter, IntCounter, IntCounter) {
        let ownership_checks = self.counter(
            "kdedup_ownership_checks_total",
            "Batches that waited for the group's word before writing, after this process was frozen.",
        );
        let zombie_batches_dropped = self.counter(
            "kdedup_zombie_batches_dropped_total",
            "Batches not written because their partition was revoked after a freeze (the next owner writes them).",
        );
        let partition_panics =
            self.counter("kdedup_partition_panics_total", "Partition tasks that panicked (kdedup then exits non-zero).");
        (ownership_checks, zombie_batches_dropped, partition_panics)
    }

    /// Per partition: records and seconds behind, and the offset committed.
    fn lag(&self) -> (IntGaugeVec, GaugeVec, IntGaugeVec) {
        let lag_records = self.gauge_vec(
            "kdedup_consumer_lag_records",
            "Records behind, per partition: the high watermark last seen by the consumer minus the committed offset \
             (minus the low watermark, or 0, before the first commit). Sampled every commit interval.",
            &["topic", "partition"],
        );
        let lag_seconds = self.float_gauge_vec(
            "kdedup_consumer_lag_seconds",
            "Age of the oldest record of this partition not yet committed, from Kafka record timestamps: of \
             the records taken, the oldest; with none taken but records behind, the newest committed record's \
             age (an upper bound); 0 when nothing is behind. Sampled every commit interval.",
            &["topic", "partition"],
        );
        let committed_offset = self.gauge_vec(
            "kdedup_committed_offset",
            "Last offset committed (next to read), per partition.",
            &["topic", "partition"],
        );
        (lag_records, lag_seconds, committed_offset)
    }

    /// Per partition: since when it stalls, its share of dead letters, and its queue's errors.
    fn partition_health(&self) -> (IntGaugeVec, GaugeVec, IntCounterVec) {
        let partition_stalled_since = self.gauge_vec(
            "kdedup_partition_stalled_since_seconds",
            "When the partition stalled (Unix seconds; 0 while it progresses): it is retrying a store call, an effect, a dead letter or its reconciliation, or its queue reported an error and delivered nothing since.",
            &["topic", "partition"],
        );
        let partition_dead_letter_share = self.float_gauge_vec(
            "kdedup_partition_dead_letter_share",
            "Share (0 to 1) of the partition's last records (a window of a few hundred) dead-lettered for \
             their most common reason: near 1, nearly every record is dead-lettered alike (typically a \
             [key] that does not match the data: missing_id).",
            &["topic", "partition"],
        );
        let partition_errors = self.counter_vec(
            "kdedup_partition_errors_total",
            "Errors a partition's queue reported, by reason: decode (a batch the client cannot decode), \
             offset_reset, authorization, other; skipped: records not delivered after an error (the partition \
             stops there). A partition with an error and no progress since is stalled.",
            &["topic", "reason"],
        );
        (partition_stalled_since, partition_dead_letter_share, partition_errors)
    }
}

impl Metrics {
    /// Every metric at zero, registered on a fresh registry.
    pub fn new() -> Metrics {
        let registry = Registry::new();
        let r = Reg(&registry);
        r.build_and_process();
        let (consumed, records, dead_letters, sink_errors, side_refusals, http_requests) = r.outcomes();
        let (store_seconds, sink_seconds, record_seconds) = r.latencies();
        let (duplicate_age, near_expiry, expired_key_hits, ttl_seconds) = r.window();
        let (filter_bytes, filter, bloom_false_positives) = r.filter();
        let (store_errors, store_unavailable, store_memory_bytes, store_writes, fsyncs, commits) = r.store();
        let claims = r.claims();
        let (claim_waits, claims_resumed, drain_released, claims_lost, reconciled) = claims.0;
        let (lease_takeovers, leases_lost, reconciliations_incomplete, possible_repeats) = claims.1;
        let (rebalances, assigned_partitions, topic_partitions, embedded_store_partial) = r.group();
        let (ownership_checks, zombie_batches_dropped, partition_panics) = r.freezes();
        let (lag_records, lag_seconds, committed_offset) = r.lag();
        let (partition_stalled_since, partition_dead_letter_share, partition_errors) = r.partition_health();
        Metrics {
            consumed,
            records,
            dead_letters,
            rebalances,
            lag_records,
            lag_seconds,
            filter_bytes,
            store_memory_bytes,
            filter,
            bloom_false_positives,
            store_seconds,
            store_errors,
            sink_seconds,
            record_seconds,
            sink_errors,
            duplicate_age,
            near_expiry,
            expired_key_hits,
            ttl_seconds,
            store_unavailable,
            claim_waits,
            claims_resumed,
            drain_released,
            claims_lost,
            reconciled,
            commits,
            fsyncs,
            store_writes,
            committed_offset,
            assigned_partitions,
            topic_partitions,
            embedded_store_partial,
            lease_takeovers,
            leases_lost,
            reconciliations_incomplete,
            possible_repeats,
            partition_panics,
            side_refusals,
            http_requests,
            ownership_checks,
            zombie_batches_dropped,
            partition_errors,
            partition_stalled_since,
            partition_dead_letter_share,
            registry,
            health: Arc::default(),
        }
    }

    /// Records finished with this outcome, over every topic.
    pub fn outcome(&self, outcome: &str) -> u64 {
        self.records.sum_where(|labels| labels.contains(&("outcome", outcome)))
    }

    /// Records consumed, over every topic.
    pub fn consumed_total(&self) -> u64 {
        self.consumed.get()
    }

    /// Dead letters written for this reason, over every topic.
    pub fn dead_letters_for(&self, reason: &str) -> u64 {
        self.dead_letters.sum_where(|labels| labels.contains(&("reason", reason)))
    }

    /// Creates every topic's series at zero, so that rates and sums over them
    /// exist from the first scrape (not only after the first record).
    pub fn topics(&self, topics: &[String]) {
        // A `^regex` subscription names no topic: its series appear with their first records.
        for topic in topics.iter().filter(|t| !t.starts_with('^')) {
            self.consumed.at([topic]);
            for outcome in OUTCOMES {
                self.records.at([topic, outcome]);
            }
            for reason in DEAD_LETTER_REASONS {
                self.dead_letters.at([topic, reason]);
            }
            self.near_expiry.at([topic]);
            self.expired_key_hits.at([topic]);
        }
    }

    /// The configured TTL: exported, and the near-expiry threshold.
    pub fn set_ttl(&self, ttl: std::time::Duration) {
        self.ttl_seconds.set(ttl.as_secs_f64());
        self.health.ttl_ms.store(ttl.as_millis() as u64, Ordering::Relaxed);
    }

    /// Each input topic's partition count, as the start-up metadata check found it
    /// (`None`: not found; a `^regex` subscription names no topic and sets nothing).
    pub fn set_topic_partitions<'a>(&self, topics: impl IntoIterator<Item = (&'a str, Option<usize>)>) {
        for (topic, partitions) in topics {
            if let Some(n) = partitions {
                self.topic_partitions.with_label_values(&[topic]).set(n as i64);
            }
        }
    }

    /// A duplicate of a key first claimed at `claimed_at_ms`, decided at `now_ms`.
    pub fn duplicate_seen(&self, topic: &str, claimed_at_ms: u64, now_ms: u64) {
        let age_ms = now_ms.saturating_sub(claimed_at_ms);
        self.duplicate_age.with_label_values(&[topic]).observe(age_ms as f64 / 1000.0);
        let ttl_ms = self.health.ttl_ms.load(Ordering::Relaxed);
        if ttl_ms > 0 && age_ms.saturating_mul(10) > ttl_ms.saturating_mul(9) {
            self.near_expiry.at([topic]).inc();
        }
    }

    /// `new` events standing for `n` whose key had expired within the last TTL.
    pub fn expired_key_hits(&self, topic: &str, n: u64) {
        if n > 0 {
            self.expired_key_hits.at([topic]).inc_by(n);
        }
    }

    /// A store call of this kind ended (`ok` or not) after `seconds`.
    pub fn store_call(&self, op: &str, ok: bool, seconds: f64) {
        self.store_seconds.with_label_values(&[op, if ok { "ok" } else { "error" }]).observe(seconds);
    }

    /// Store calls of this kind that answered.
    pub fn store_calls_ok(&self, op: &str) -> u64 {
        self.store_seconds.with_label_values(&[op, "ok"]).get_sample_count()
    }

    /// The filter checked `n` keys in `tier` with `result` (see `FILTER_CHECKS`).
    pub fn filter_checked(&self, tier: &str, result: &str, n: usize) {
        self.filter.with_label_values(&[tier, result]).inc_by(n as u64);
    }

    /// Filter checks with this tier and result, over every partition.
    pub fn filter_checks(&self, tier: &str, result: &str) -> u64 {
        self.filter.with_label_values(&[tier, result]).get()
    }

    /// A sink or side-topic write failed with this error.
    pub fn sink_error(&self, error: &crate::error::SinkError) {
        self.sink_errors.at([error.kind()]).inc();
    }

    /// A store call of this partition failed (`false`) or answered (`true`):
    /// `kdedup_store_unavailable_seconds_total` runs while any partition's last call failed.
    pub fn store_answered(&self, tp: &(Arc<str>, i32), answered: bool) {
        let mut down = self.health.store_down.lock().unwrap_or_else(|p| p.into_inner());
        let key = (tp.0.to_string(), tp.1);
        let changed = if answered { down.0.remove(&key) } else { down.0.insert(key) };
        if !changed {
            return;
        }
        let now = std::time::Instant::now();
        match (down.0.is_empty(), down.1) {
            (false, None) => down.1 = Some(now),
            (true, Some(since)) => {
                self.store_unavailable.inc_by(now.duration_since(since).as_secs_f64());
                down.1 = None;
            }
            _ => {}
        }
    }

    /// Adds an ongoing store outage's time so far to the counter (before a scrape).
    fn flush_store_unavailable(&self) {
        let mut down = self.health.store_down.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(since) = down.1 {
            let now = std::time::Instant::now();
            self.store_unavailable.inc_by(now.duration_since(since).as_secs_f64());
            down.1 = Some(now);
        }
    }

    /// A batch was taken from a partition queue: counts it, and remembers its
    /// oldest timestamp until its offsets are committed (the lag in seconds).
    pub fn taken(&self, tp: &(Arc<str>, i32), records: &[Record]) {
        self.consumed.at([&*tp.0]).inc_by(records.len() as u64);
        let Some(last) = records.last().map(|r| r.position.offset) else { return };
        let stamps = || records.iter().filter_map(|r| r.timestamp_ms).filter(|&t| t > 0);
        let (oldest, newest) = match (stamps().min(), stamps().max()) {
            (Some(oldest), Some(newest)) => (oldest, newest),
            _ => (now_ms(), now_ms()),
        };
        let mut taken = self.health.taken.lock().unwrap_or_else(|p| p.into_inner());
        taken.entry((tp.0.to_string(), tp.1)).or_default().push(last, oldest, newest);
    }

    /// Dead letters written for these reasons.
    pub fn dead_lettered<'a>(&self, topic: &str, reasons: impl IntoIterator<Item = &'a str>) {
        for reason in reasons {
            self.dead_letters.at([topic, reason]).inc();
        }
    }

    /// A rebalance callback ran: `assign`, `revoke` or `lost`.
    pub fn rebalance(&self, kind: &str) {
        self.rebalances.with_label_values(&[kind]).inc();
    }

    fn sample_history(&self) {
        let now = std::time::Instant::now();
        let mut history = self.health.history.lock().unwrap_or_else(|p| p.into_inner());
        history.push_back((now, self.outcome("duplicate"), self.records.get()));
        while history.front().is_some_and(|&(at, _, _)| now.duration_since(at) > HISTORY) {
            history.pop_front();
        }
    }

    /// Duplicates among the records finished over about the last minute, if any finished.
    fn recent_duplicate_rate(&self) -> Option<f64> {
        let history = self.health.history.lock().unwrap_or_else(|p| p.into_inner());
        let &(now, dup, done) = history.back()?;
        let &(_, dup0, done0) = history.iter().find(|&&(at, _, _)| now.duration_since(at) <= RECENT)?;
        (done > done0).then(|| (dup - dup0) as f64 / (done - done0) as f64)
    }

    /// The status page: a small HTML page, no external assets, rendered from the
    /// same registry as `/metrics` and refreshed by the browser every 5 s.
    pub fn status_page(&self) -> String {
        use std::fmt::Write;
        let ready = self.is_ready();
        let mut html = String::new();
        let _ = write!(
            html,
            r#"<!doctype html><html lang="en"><head><meta charset="utf-8"><meta http-equiv="refresh" content="5">
<title>kdedup status</title><style>
body{{font:14px system-ui,sans-serif;margin:2em;color:#222;background:#fafafa}}
h1{{font-size:20px}} h2{{font-size:16px;margin-top:1.5em}}
table{{border-collapse:collapse;background:#fff}} th,td{{border:1px solid #ddd;padding:4px 10px;text-align:right}}
th{{background:#f0f0f0}} td:first-child,th:first-child{{text-align:left}}
.ok{{color:#fff;background:#2a7;padding:2px 8px;border-radius:4px}} .bad{{color:#fff;background:#c33;padding:2px 8px;border-radius:4px}}
.muted{{color:#777}}
</style></head><body>
<h1>kdedup <span class="muted" id="version">{version}</span> <span id="ready" class="{class}">{state}</span></h1>
{warning}<p>Duplicate rate over the last minute: <b id="recent-duplicate-rate">{recent}</b>
<span class="muted">(all figures since this process started unless said; the page reloads every 5 s; raw numbers on <a href="/metrics">/metrics</a>)</span></p>
<h2>Records by topic</h2><table id="records"><tr><th>topic</th><th>consumed</th>"#,
            version = env!("CARGO_PKG_VERSION"),
            class = if ready { "ok" } else { "bad" },
            state = if ready { "ready" } else { "not ready" },
            recent = pct(self.recent_duplicate_rate()),
            warning = self.partial_ownership_warning().map_or(String::new(), |w| format!(
                "<p id=\"warning\"><span class=\"bad\">warning</span> {}</p>\n",
                esc(&w)
            )),
        );
        self.records_table(&mut html);
        self.partitions_table(&mut html);
        // Window adequacy: the same line `kdedup stats` prints, from these same counters.
        let window = crate::window::Window::from_metrics(&self.render());
        let _ =
            write!(html, "<h2>Window adequacy</h2><p id=\"window\">{}</p>\n</body></html>\n", esc(&window.advice()));
        html
    }

    /// The status page's records by topic and outcome (the table's first cells are open).
    fn records_table(&self, html: &mut String) {
        use std::fmt::Write;
        let mut topics: std::collections::BTreeMap<String, [u64; OUTCOMES.len() + 1]> = Default::default();
        for (labels, v) in series(&self.consumed.0) {
            topics.entry(labels.get("topic").cloned().unwrap_or_default()).or_default()[0] = v as u64;
        }
        for (labels, v) in series(&self.records.0) {
            let (Some(topic), Some(outcome)) = (labels.get("topic"), labels.get("outcome")) else { continue };
            if let Some(i) = OUTCOMES.iter().position(|o| o == outcome) {
                topics.entry(topic.clone()).or_default()[i + 1] = v as u64;
            }
        }
        for o in OUTCOMES {
            let _ = write!(html, "<th>{o}</th>");
        }
        html.push_str("<th>duplicate rate</th></tr>\n");
        for (topic, counts) in &topics {
            let finished: u64 = counts[1..].iter().sum();
            let _ = write!(
                html,
                r#"<tr data-topic="{t}"><td>{t}</td><td data-k="consumed">{}</td>"#,
                counts[0],
                t = esc(topic)
            );
            for (o, n) in OUTCOMES.iter().zip(&counts[1..]) {
                let _ = write!(html, r#"<td data-k="{o}">{n}</td>"#);
            }
            let rate = (finished > 0).then(|| counts[2] as f64 / finished as f64);
            let _ = writeln!(html, r#"<td data-k="duplicate_rate">{}</td></tr>"#, pct(rate));
        }
        html.push_str("</table>\n");
    }

    /// The status page's table of partitions: committed offset, lag, and stalls with their reasons.
    fn partitions_table(&self, html: &mut String) {
        use std::fmt::Write;
        html.push_str(
            "<h2>Partitions</h2><table id=\"partitions\"><tr><th>topic</th><th>partition</th>\
             <th>committed offset</th><th>lag (records)</th><th>lag (seconds)</th><th>state</th></tr>\n",
        );
        let mut partitions: std::collections::BTreeMap<(String, i32), [Option<f64>; 3]> = Default::default();
        for (i, family) in [series(&self.committed_offset), series(&self.lag_records), series(&self.lag_seconds)]
            .into_iter()
            .enumerate()
        {
            for (labels, v) in family {
                let (Some(t), Some(p)) = (labels.get("topic"), labels.get("partition").and_then(|p| p.parse().ok()))
                else {
                    continue;
                };
                partitions.entry((t.clone(), p)).or_default()[i] = Some(v);
            }
        }
        let stalled = self.health.stalled.lock().unwrap_or_else(|p| p.into_inner()).clone();
        for ((topic, partition), [committed, lag, lag_secs]) in &partitions {
            let show = |v: &Option<f64>| v.map_or("–".to_string(), |v| format!("{v}"));
            let state = match stalled.get(&(topic.clone(), *partition)) {
                Some((since, why)) => format!(
                    r#"<span class="bad">stalled since {}</span>: {}"#,
                    crate::values::human_time((*since).max(0) as u64 * 1000),
                    esc(why)
                ),
                None => "progressing".to_string(),
            };
            let _ = writeln!(
                html,
                r#"<tr data-partition="{t}/{partition}"><td>{t}</td><td>{partition}</td><td data-k="committed">{}</td><td data-k="lag_records">{}</td><td data-k="lag_seconds">{}</td><td>{state}</td></tr>"#,
                show(committed),
                show(lag),
                lag_secs.map_or("–".to_string(), |v| format!("{v:.1}")),
                t = esc(topic),
            );
        }
        html.push_str("</table>\n");
    }

    /// Committed offsets as last set on `kdedup_committed_offset`.
    fn committed_offsets(&self) -> HashMap<(String, i32), i64> {
        let mut out = HashMap::new();
        for family in self.committed_offset.collect() {
            for m in family.get_metric() {
                let label = |name: &str| m.get_label().iter().find(|l| l.name() == name).map(|l| l.value().to_string());
                if let (Some(topic), Some(partition)) = (label("topic"), label("partition")) {
                    if let Ok(partition) = partition.parse() {
                        out.insert((topic, partition), m.get_gauge().get_value() as i64);
                    }
                }
            }
        }
        out
    }

    /// Updates both lag gauges for the consumer's current assignment; the
    /// source thread calls it after each periodic commit. Reads librdkafka's
    /// cached watermarks (updated by every fetch response), so it sends nothing.
    pub fn sample_lag<C: Consumer<X>, X: ConsumerContext>(&self, consumer: &C) {
        self.sample_history();
        let Ok(assignment) = consumer.assignment() else { return };
        let committed = self.committed_offsets();
        let now = now_ms();
        let mut taken = self.health.taken.lock().unwrap_or_else(|p| p.into_inner());
        for e in assignment.elements() {
            let key = (e.topic().to_string(), e.partition());
            let labels = [key.0.clone(), key.1.to_string()];
            let done = committed.get(&key).copied();
            let mut behind = false;
            if let Some((low, high)) = cached_watermarks(consumer, e.topic(), e.partition()) {
                let records = (high - done.unwrap_or(low.max(0))).max(0);
                self.lag_records.with_label_values(&labels).set(records);
                behind = records > 0;
            }
            let age = taken.get_mut(&key).map_or(0.0, |t| t.age(done, behind, now));
            self.lag_seconds.with_label_values(&labels).set(age);
            // Every owned partition has a stalled gauge (0 while it progresses), so that
            // "how many are stalled" is a number, not an absent series.
            self.partition_stalled_since.with_label_values(&labels);
        }
    }

    /// After each assignment change of a process on the embedded store: it owns `owned` of the
    /// input topics' `total` partitions. Owning fewer is said by the gauge
    /// `kdedup_embedded_store_partial`, on the status page and in `/readyz`'s body.
    ///
    /// Readiness stays as it was: every member of such a group sees the same, so failing
    /// readiness would take all of them out of service at once (and a restart does not fix
    /// it), while each goes on deciding its own partitions correctly. The fix is a change
    /// of deployment (one instance, or a shared store), which the alert on the gauge asks for.
    pub fn embedded_store_ownership(&self, owned: usize, total: usize) {
        let partial = owned < total;
        self.embedded_store_partial.set(i64::from(partial));
        *self.health.partial.lock().unwrap_or_else(|p| p.into_inner()) = partial.then_some((owned, total));
    }

    /// The warning for an embedded store that owns only part of the topics, if it does.
    pub fn partial_ownership_warning(&self) -> Option<String> {
        let (owned, total) = (*self.health.partial.lock().unwrap_or_else(|p| p.into_inner()))?;
        Some(format!(
            "this process owns {owned} of {total} partitions but keeps its claims in an embedded store: another \
             instance decides the other partitions against a store of its own, so duplicates across instances are \
             not caught; run one instance or use a shared store (postgres, scylla)"
        ))
    }

    /// `/readyz`'s body: `ready` or `not ready`, then any warning that does not change
    /// readiness (an embedded store owning only part of the topics).
    pub fn readiness_text(&self) -> String {
        let mut text = if self.is_ready() { "ready\n" } else { "not ready\n" }.to_string();
        if let Some(warning) = self.partial_ownership_warning() {
            text.push_str(&format!("warning: {warning}\n"));
        }
        text
    }

    /// The source joined its group (true) or is leaving it (false).
    pub fn set_ready(&self, ready: bool) {
        self.health.source_ready.store(ready, Ordering::Relaxed);
    }

    /// Ready: in the group, and every assigned partition progressing or idle.
    pub fn is_ready(&self) -> bool {
        self.health.source_ready.load(Ordering::Relaxed) && self.stalled_partitions() == 0
    }

    /// Partitions currently stalled on a retry (store, effect, dead letter, reconciliation).
    pub fn stalled_partitions(&self) -> usize {
        self.health.stalled.lock().unwrap_or_else(|p| p.into_inner()).len()
    }

    /// A partition is retrying a store call, an effect or a dead letter and cannot move on
    /// (the decision core's stalls); the first call sets the time and the reason.
    pub fn partition_stalled(&self, tp: &(Arc<str>, i32)) {
        let store_failing =
            self.health.store_down.lock().unwrap_or_else(|p| p.into_inner()).0.contains(&(tp.0.to_string(), tp.1));
        self.partition_stalled_because(
            tp,
            if store_failing {
                "a store call fails; retrying (the log says why)"
            } else {
                "an effect or a dead-letter write fails; retrying (the log says which)"
            },
        );
    }

    /// A partition cannot move on, for `reason` (shown on the status page); the first call
    /// sets the time and the reason.
    pub fn partition_stalled_because(&self, tp: &(Arc<str>, i32), reason: &str) {
        let mut stalled = self.health.stalled.lock().unwrap_or_else(|p| p.into_inner());
        if let std::collections::hash_map::Entry::Vacant(slot) = stalled.entry((tp.0.to_string(), tp.1)) {
            let since = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs() as i64)
                .unwrap_or(1);
            slot.insert((since, reason.to_string()));
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
        self.health.taken.lock().unwrap_or_else(|p| p.into_inner()).remove(&(tp.0.to_string(), tp.1));
        self.store_answered(tp, true);
        let labels = [tp.0.to_string(), tp.1.to_string()];
        let _ = self.partition_stalled_since.remove_label_values(&labels);
        let _ = self.partition_dead_letter_share.remove_label_values(&labels);
        let _ = self.lag_records.remove_label_values(&labels);
        let _ = self.lag_seconds.remove_label_values(&labels);
    }

    /// The registry in Prometheus text format, as `/metrics` serves it.
    pub fn render(&self) -> String {
        self.flush_store_unavailable();
        let mut buf = Vec::new();
        TextEncoder::new().encode(&self.registry.gather(), &mut buf).expect("encoding to a Vec cannot fail");
        String::from_utf8(buf).expect("the text format is UTF-8")
    }
}

/// Every series of a collector: its labels and value (counter or gauge).
fn series(collector: &dyn Collector) -> Vec<(HashMap<String, String>, f64)> {
    let mut out = Vec::new();
    for family in collector.collect() {
        let counter = family.get_field_type() == prometheus::proto::MetricType::COUNTER;
        for m in family.get_metric() {
            let labels = m.get_label().iter().map(|l| (l.name().to_string(), l.value().to_string())).collect();
            let value = if counter { m.get_counter().get_value() } else { m.get_gauge().get_value() };
            out.push((labels, value));
        }
    }
    out
}

/// librdkafka's last known (low, high) watermarks of a partition, without a
/// broker request; None while it has none (no fetch response yet). The high
/// one moves with every fetch response; the low one only with statistics on.
fn cached_watermarks<C: Consumer<X>, X: ConsumerContext>(
    consumer: &C,
    topic: &str,
    partition: i32,
) -> Option<(i64, i64)> {
    let topic = std::ffi::CString::new(topic).ok()?;
    let (mut low, mut high) = (-1i64, -1i64);
    // SAFETY: the client handle lives as long as `consumer`; the topic is a valid
    // C string for the call; librdkafka only writes the two out-parameters.
    let err = unsafe {
        rdkafka_sys::rd_kafka_get_watermark_offsets(
            consumer.client().native_ptr(),
            topic.as_ptr(),
            partition,
            &mut low,
            &mut high,
        )
    };
    (err == rdkafka_sys::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_NO_ERROR && high >= 0).then_some((low, high))
}

/// Results of one store statement, the `result` label of `kdedup_store_ops_total`.
pub const STORE_OP_RESULTS: [&str; 5] = ["applied", "not_applied", "ok", "timeout", "error"];

/// Per-statement metrics of a store (one store call may run many statements):
/// `kdedup_store_ops_total{store,op,result}` and `kdedup_store_op_seconds{store,op}`.
/// `op` names the statement kind (for ScyllaDB: `insert`, `takeover`, `resume`,
/// `complete`, `release`, `forget`, `sweep_delete` are lightweight transactions;
/// `read`, `serial_read`, `scan` are reads), so lookups on the Bloom route and
/// Paxos claims are counted apart; `result` is one of `STORE_OP_RESULTS`.
#[derive(Clone)]
pub struct StoreOpMetrics {
    /// `kdedup_store_ops_total{store,op,result}`.
    pub ops: IntCounterVec,
    /// `kdedup_store_op_seconds{store,op}`.
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

    /// Counts one statement and its latency in seconds.
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

/// Keys carried by each statement of a store that batches them (PostgreSQL:
/// one `claim`, `complete`, `renew`, `release`, `record` or `lookup`
/// statement per store call, unnested from arrays):
/// `kdedup_store_statement_keys{store,op}`. Its `_count` is the statements
/// (round trips), `_sum / _count` the keys per round trip.
#[derive(Clone)]
pub struct StoreBatchMetrics {
    /// `kdedup_store_statement_keys{store,op}`.
    pub keys: HistogramVec,
}

impl Default for StoreBatchMetrics {
    fn default() -> Self {
        StoreBatchMetrics::new()
    }
}

impl StoreBatchMetrics {
    /// Unregistered; see [`Metrics::register_store_batches`].
    pub fn new() -> StoreBatchMetrics {
        // 1 .. 65,536 keys
        let buckets = prometheus::exponential_buckets(1.0, 4.0, 9).expect("static bucket layout");
        let keys = HistogramVec::new(
            HistogramOpts::new(
                "kdedup_store_statement_keys",
                "Keys carried by one batched store statement (one round trip), by kind.",
            )
            .buckets(buckets),
            &["store", "op"],
        )
        .expect("static metric");
        StoreBatchMetrics { keys }
    }

    /// Counts one statement of `store`'s `op` that carried `keys` keys.
    pub fn observe(&self, store: &str, op: &str, keys: usize) {
        self.keys.with_label_values(&[store, op]).observe(keys as f64);
    }

    /// Statements of this kind and the keys they carried.
    pub fn totals(&self, store: &str, op: &str) -> (u64, u64) {
        let h = self.keys.with_label_values(&[store, op]);
        (h.get_sample_count(), h.get_sample_sum() as u64)
    }
}

impl Metrics {
    /// Exposes a store's keys-per-statement histogram on this registry (once; again is a no-op).
    pub fn register_store_batches(&self, batches: &StoreBatchMetrics) {
        match self.registry.register(Box::new(batches.keys.clone())) {
            Ok(()) | Err(prometheus::Error::AlreadyReg) => {}
            Err(e) => tracing::warn!(error = %e, "cannot register the store's statement metrics"),
        }
    }

    /// Statements of `op` on `store` and the keys they carried, as registered by
    /// [`Metrics::register_store_batches`]; `(0, 0)` when none were.
    pub fn store_statement_keys(&self, store: &str, op: &str) -> (u64, u64) {
        let family = self.registry.gather().into_iter().find(|f| f.name() == "kdedup_store_statement_keys");
        let Some(family) = family else { return (0, 0) };
        let labelled = |m: &prometheus::proto::Metric, name: &str, value: &str| {
            m.get_label().iter().any(|l| l.name() == name && l.value() == value)
        };
        family.get_metric().iter().find(|m| labelled(m, "store", store) && labelled(m, "op", op)).map_or((0, 0), |m| {
            let h = m.get_histogram();
            (h.get_sample_count(), h.get_sample_sum() as u64)
        })
    }

    /// Calls of store `op` that answered, and the seconds they took in all.
    pub fn store_call_seconds(&self, op: &str) -> (u64, f64) {
        let h = self.store_seconds.with_label_values(&[op, "ok"]);
        (h.get_sample_count(), h.get_sample_sum())
    }
}

/// The metrics endpoint, served from its own thread until dropped.
pub struct MetricsServer {
    server: Arc<tiny_http::Server>,
    thread: Option<JoinHandle<()>>,
    /// The address it listens on (the port resolved when 0 was asked).
    pub addr: SocketAddr,
}

impl MetricsServer {
    /// Listens on `addr` and serves `/metrics`, `/healthz` and `/readyz` from a thread.
    pub fn start(addr: SocketAddr, metrics: Metrics) -> anyhow::Result<MetricsServer> {
        MetricsServer::start_with(addr, move |path| match path {
            "/" => (200, metrics.status_page(), "text/html; charset=utf-8"),
            "/metrics" => (200, metrics.render(), "text/plain; version=0.0.4"),
            "/healthz" => (200, "ok\n".to_string(), "text/plain"),
            "/readyz" => (if metrics.is_ready() { 200 } else { 503 }, metrics.readiness_text(), "text/plain"),
            _ => (404, "try /, /metrics, /healthz or /readyz\n".to_string(), "text/plain"),
        })
    }

    /// `kdedup serve`'s endpoint: `/metrics`, `/healthz` (the process answers) and
    /// `/readyz` (the store answered and the proxy is not draining).
    pub fn start_serve(addr: SocketAddr, metrics: ServeMetrics) -> anyhow::Result<MetricsServer> {
        MetricsServer::start_with(addr, move |path| match path {
            "/metrics" => (200, metrics.render(), "text/plain; version=0.0.4"),
            "/healthz" => (200, "ok\n".to_string(), "text/plain"),
            "/readyz" if metrics.is_ready() => (200, "ready\n".to_string(), "text/plain"),
            "/readyz" => (503, "not ready\n".to_string(), "text/plain"),
            _ => (404, "try /metrics, /healthz or /readyz\n".to_string(), "text/plain"),
        })
    }

    /// Serves `respond(path)` = (status, body, content type) from a thread.
    fn start_with(
        addr: SocketAddr,
        respond: impl Fn(&str) -> (u16, String, &'static str) + Send + 'static,
    ) -> anyhow::Result<MetricsServer> {
        let server = tiny_http::Server::http(addr)
            .map_err(|e| anyhow::anyhow!("cannot listen for metrics on {addr}: {e} (set [metrics] listen)"))?;
        let addr = server.server_addr().to_ip().unwrap_or(addr);
        let server = Arc::new(server);
        let serving = server.clone();
        let thread = std::thread::Builder::new().name("kdedup-metrics".into()).spawn(move || {
            for request in serving.incoming_requests() {
                let (status, body, content_type) = respond(request.url());
                let header =
                    tiny_http::Header::from_bytes("Content-Type", content_type).expect("static header is valid");
                let _ = request
                    .respond(tiny_http::Response::from_string(body).with_status_code(status).with_header(header));
            }
        })?;
        Ok(MetricsServer { server, thread: Some(thread), addr })
    }
}

/// Outcomes of a request through `kdedup serve` (`kdedup_serve_requests_total{outcome}`):
/// `first` ran upstream under a new claim; `replayed` answered a stored response;
/// `conflict` the key was used with another request (422); `in_progress` the key
/// stayed in flight elsewhere past the wait (409); `passed_through` no key, or a
/// method serve does not guard; `upstream_error` the upstream could not answer;
/// `refused` the request broke a bound (400, 408, 413) or the store failed (503).
pub const SERVE_OUTCOMES: [&str; 7] =
    ["first", "replayed", "conflict", "in_progress", "passed_through", "upstream_error", "refused"];

/// Metrics of `kdedup serve`, on a registry of their own.
#[derive(Clone)]
pub struct ServeMetrics {
    registry: Registry,
    /// `kdedup_serve_requests_total{outcome}`, outcomes from [`SERVE_OUTCOMES`].
    pub requests: Summed<1>,
    /// `kdedup_serve_added_seconds{outcome}`: the time serve adds to a request
    /// (store calls, waits, copying), its upstream call excluded.
    pub added_seconds: HistogramVec,
    /// `kdedup_serve_upstream_seconds`: the upstream's own time, per call.
    pub upstream_seconds: Histogram,
    /// `kdedup_serve_upstream_responses_total{class}`: upstream calls by answer, classes from
    /// [`SERVE_UPSTREAM_CLASSES`].
    pub upstream_responses: Summed<1>,
    /// `kdedup_serve_store_errors_total{op}`: store calls that failed, ops from [`SERVE_STORE_OPS`].
    pub store_errors: Summed<1>,
    ready: Arc<AtomicBool>,
}

/// How an upstream call ended (`kdedup_serve_upstream_responses_total{class}`): its
/// status class; `unreachable` it certainly did not get the request (connection
/// refused); `unknown` no answer after sending (a timeout or a reset: it may have run).
pub const SERVE_UPSTREAM_CLASSES: [&str; 6] = ["2xx", "3xx", "4xx", "5xx", "unreachable", "unknown"];

/// Store calls of `kdedup serve` (`kdedup_serve_store_errors_total{op}`): `claim` (a failed
/// claim answers 503), `response` (reading a stored answer to replay), `record` (keeping the
/// upstream's answer and completing the claim), `release`, `renew` (the lease while the
/// upstream works) and `sweep` (removing expired keys).
pub const SERVE_STORE_OPS: [&str; 6] = ["claim", "response", "record", "release", "renew", "sweep"];

impl Default for ServeMetrics {
    fn default() -> Self {
        ServeMetrics::new()
    }
}

impl ServeMetrics {
    /// Every metric at zero, on a fresh registry.
    pub fn new() -> ServeMetrics {
        let registry = Registry::new();
        let requests = IntCounterVec::new(
            Opts::new("kdedup_serve_requests_total", "Requests through kdedup serve, by outcome."),
            &["outcome"],
        )
        .expect("static metric");
        for outcome in SERVE_OUTCOMES {
            requests.with_label_values(&[outcome]);
        }
        let added_seconds = HistogramVec::new(
            HistogramOpts::new(
                "kdedup_serve_added_seconds",
                "Time kdedup serve adds to a request (store, waits, copying), the upstream call excluded.",
            )
            .buckets(record_buckets()),
            &["outcome"],
        )
        .expect("static metric");
        let upstream_seconds = Histogram::with_opts(
            HistogramOpts::new("kdedup_serve_upstream_seconds", "The upstream's own time per call from kdedup serve.")
                .buckets(record_buckets()),
        )
        .expect("static metric");
        let upstream_responses = IntCounterVec::new(
            Opts::new(
                "kdedup_serve_upstream_responses_total",
                "Upstream calls from kdedup serve by answer: 2xx, 3xx, 4xx, 5xx; unreachable (the request certainly \
                 did not reach it); unknown (no answer after sending: it may have run).",
            ),
            &["class"],
        )
        .expect("static metric");
        let store_errors = IntCounterVec::new(
            Opts::new(
                "kdedup_serve_store_errors_total",
                "Store calls of kdedup serve that failed, by op: claim (answered 503), response (a replay), record \
                 (keeping an answer), release, renew (a lease), sweep.",
            ),
            &["op"],
        )
        .expect("static metric");
        // Every series from the first scrape, so that rates and shares over them exist at zero.
        for class in SERVE_UPSTREAM_CLASSES {
            upstream_responses.with_label_values(&[class]);
        }
        for op in SERVE_STORE_OPS {
            store_errors.with_label_values(&[op]);
        }
        let build_info = IntGaugeVec::new(
            Opts::new(
                "kdedup_serve_build_info",
                "Always 1; the version label names the running build of kdedup serve.",
            ),
            &["version"],
        )
        .expect("static metric");
        build_info.with_label_values(&[env!("CARGO_PKG_VERSION")]).set(1);
        registry.register(Box::new(requests.clone())).expect("registered once");
        registry.register(Box::new(added_seconds.clone())).expect("registered once");
        registry.register(Box::new(upstream_seconds.clone())).expect("registered once");
        registry.register(Box::new(upstream_responses.clone())).expect("registered once");
        registry.register(Box::new(store_errors.clone())).expect("registered once");
        registry.register(Box::new(build_info)).expect("registered once");
        // CPU seconds, resident memory, open fds (from /proc), as `kdedup run` exports them.
        registry
            .register(Box::new(prometheus::process_collector::ProcessCollector::for_self()))
            .expect("registered once");
        ServeMetrics {
            registry,
            requests: Summed(requests),
            added_seconds,
            upstream_seconds,
            upstream_responses: Summed(upstream_responses),
            store_errors: Summed(store_errors),
            ready: Arc::new(AtomicBool::new(false)),
        }
    }

    /// Counts one request: its outcome and the time serve added to it.
    pub fn request(&self, outcome: &'static str, added_seconds: f64) {
        self.requests.at([outcome]).inc();
        self.added_seconds.with_label_values(&[outcome]).observe(added_seconds);
    }

    /// Requests of one outcome so far.
    pub fn outcome(&self, outcome: &str) -> u64 {
        self.requests.at([outcome]).get()
    }

    /// An upstream call ended with an answer of this status (`Ok`), or without one
    /// (`Err(true)`: certainly not sent; `Err(false)`: it may have run).
    pub fn upstream_answered(&self, answer: Result<u16, bool>) {
        let class = match answer {
            Ok(status) if status < 300 => "2xx",
            Ok(status) if status < 400 => "3xx",
            Ok(status) if status < 500 => "4xx",
            Ok(_) => "5xx",
            Err(true) => "unreachable",
            Err(false) => "unknown",
        };
        self.upstream_responses.at([class]).inc();
    }

    /// A store call failed; `op` is one of [`SERVE_STORE_OPS`].
    pub fn store_error(&self, op: &'static str) {
        self.store_errors.at([op]).inc();
    }

    /// `/readyz` answers 200 while set.
    pub fn set_ready(&self, ready: bool) {
        self.ready.store(ready, Ordering::Relaxed);
    }

    /// Whether `/readyz` answers 200.
    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Relaxed)
    }

    /// The registry in Prometheus text format.
    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        TextEncoder::new().encode(&self.registry.gather(), &mut buf).expect("encoding to a Vec cannot fail");
        String::from_utf8(buf).expect("the text format is UTF-8")
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::RecordError;
    use crate::event::Position;

    fn record(topic: &Arc<str>, offset: i64, timestamp_ms: i64) -> Record {
        Record {
            position: Position { topic: topic.clone(), partition: 0, offset },
            bad_header: None,
            key: None,
            payload: None,
            headers: Vec::new(),
            timestamp_ms: Some(timestamp_ms),
        }
    }

    #[test]
    fn outcomes_by_topic_sum_to_consumed() {
        let m = Metrics::new();
        m.topics(&["a".to_string(), "b".to_string()]);
        let (a, b): (Arc<str>, Arc<str>) = (Arc::from("a"), Arc::from("b"));
        m.taken(&(a.clone(), 0), &[record(&a, 0, 1), record(&a, 1, 1), record(&a, 2, 1)]);
        m.taken(&(b.clone(), 0), &[record(&b, 0, 1), record(&b, 1, 1)]);
        m.records.at(["a", "new"]).inc_by(2);
        m.records.at(["a", "duplicate"]).inc();
        m.records.at(["b", "new"]).inc();
        m.records.at(["b", "dead_letter"]).inc();
        assert_eq!(m.outcome("new"), 3, "new summed over both topics");
        assert_eq!(m.outcome("duplicate"), 1);
        assert_eq!(m.consumed.get(), 5);
        assert_eq!(m.consumed_total(), 5);
        let sum: u64 = OUTCOMES.iter().map(|o| m.outcome(o)).sum();
        assert_eq!(sum, m.consumed_total());
        let text = m.render();
        assert!(text.contains(r#"kdedup_records_total{outcome="new",topic="a"} 2"#), "{text}");
        assert!(text.contains(r#"kdedup_records_consumed_total{topic="b"} 2"#), "{text}");
        assert!(text.contains(r#"kdedup_records_total{outcome="conflict",topic="b"} 0"#), "pre-created: {text}");
    }

    #[test]
    fn dead_letter_reasons_are_every_record_error_reason() {
        let errors = [
            RecordError::MissingId(String::new()),
            RecordError::InvalidJson(String::new()),
            RecordError::OversizeId { len: 1, max: 0 },
            RecordError::Conflict { stored: String::new(), first: String::new() },
            RecordError::SinkRejected(String::new()),
        ];
        let reasons: Vec<&str> = errors.iter().map(RecordError::reason).collect();
        assert_eq!(reasons, DEAD_LETTER_REASONS);
        let m = Metrics::new();
        m.dead_lettered("t", ["invalid_json", "invalid_json", "missing_id"]);
        assert_eq!(m.dead_letters_for("invalid_json"), 2);
        assert_eq!(m.dead_letters_for("missing_id"), 1);
        assert_eq!(m.dead_letters.get(), 3);
    }

    #[test]
    fn lag_seconds_is_the_age_of_the_oldest_uncommitted_batch() {
        let mut t = Taken::default();
        t.push(9, 1_000, 2_000);
        t.push(19, 5_000, 6_000);
        t.push(29, 7_000, 8_000);
        assert_eq!(t.age(None, true, 11_000), 10.0, "nothing committed yet");
        assert_eq!(t.age(Some(10), true, 11_000), 6.0, "offsets 0..=9 committed");
        assert_eq!(t.age(Some(15), true, 11_000), 6.0, "a batch half committed still counts");
        assert_eq!(t.age(Some(30), false, 11_000), 0.0, "everything taken is committed, nothing behind");
        assert!(t.batches.is_empty());
        assert_eq!(t.age(Some(30), true, 11_000), 3.0, "behind with nothing taken: the newest committed record's age");
        t.push(39, 10_000, 10_500);
        assert_eq!(t.age(Some(30), true, 11_000), 1.0, "taken again: the oldest uncommitted record");
    }

    #[test]
    fn taken_batches_stay_bounded_and_keep_the_oldest() {
        let m = Metrics::new();
        let t: Arc<str> = Arc::from("t");
        for i in 0..(TAKEN_BATCHES_MAX as i64 + 10) {
            m.taken(&(t.clone(), 0), &[record(&t, i, 1_000 + i)]);
        }
        let mut taken = m.health.taken.lock().unwrap();
        let batches = &taken.get_mut(&("t".to_string(), 0)).unwrap().batches;
        assert_eq!(batches.len(), TAKEN_BATCHES_MAX);
        assert_eq!(batches.front(), Some(&(0, 1_000, 1_000)));
        assert_eq!(batches.back().map(|b| b.0), Some(TAKEN_BATCHES_MAX as i64 + 9), "the last entry widened");
    }

    #[test]
    fn an_embedded_store_owning_part_of_the_topics_is_said_on_the_page_readyz_and_a_gauge() {
        let m = Metrics::new();
        m.set_ready(true);
        m.embedded_store_ownership(4, 4);
        assert_eq!(m.readiness_text(), "ready\n");
        assert!(!m.status_page().contains(r#"id="warning""#));
        assert!(m.render().contains("kdedup_embedded_store_partial 0"));
        m.embedded_store_ownership(2, 4);
        assert!(m.is_ready(), "readiness is unchanged: each member decides its own partitions correctly");
        let said = "this process owns 2 of 4 partitions but keeps its claims in an embedded store";
        let text = m.readiness_text();
        assert!(text.starts_with("ready\nwarning: ") && text.matches(said).count() == 1, "{text}");
        assert_eq!(m.status_page().matches(said).count(), 1);
        assert!(m.render().contains("kdedup_embedded_store_partial 1"));
        m.embedded_store_ownership(4, 4);
        assert_eq!(m.readiness_text(), "ready\n", "the warning goes when this process owns everything again");
    }

    #[test]
    fn the_status_page_shows_counts_partitions_and_readiness_escaped() {
        let m = Metrics::new();
        let t: Arc<str> = Arc::from("a<b");
        m.topics(&["a<b".to_string()]);
        m.taken(&(t.clone(), 3), &[record(&t, 0, 1), record(&t, 1, 1), record(&t, 2, 1), record(&t, 3, 1)]);
        m.records.at(["a<b", "new"]).inc_by(3);
        m.records.at(["a<b", "duplicate"]).inc();
        m.committed_offset.with_label_values(&["a<b", "3"]).set(4);
        m.store_answered(&(t.clone(), 3), false);
        m.partition_stalled(&(t.clone(), 3));
        let page = m.status_page();
        assert!(page.contains(r#"<tr data-topic="a&lt;b"><td>a&lt;b</td><td data-k="consumed">4</td>"#), "{page}");
        assert!(page.contains(r#"<td data-k="new">3</td><td data-k="duplicate">1</td>"#), "{page}");
        assert!(page.contains(r#"<td data-k="duplicate_rate">25.0%</td>"#), "{page}");
        assert!(page.contains(r#"<td data-k="committed">4</td>"#), "{page}");
        let stalled = page.lines().find(|l| l.contains("stalled since")).unwrap_or_else(|| panic!("{page}"));
        // A date and how long ago, then the reason; never raw epoch seconds.
        assert!(stalled.contains("stalled since 20") && stalled.contains("Z, "), "{stalled}");
        assert!(stalled.contains(" s ago</span>: a store call fails; retrying"), "{stalled}");
        assert!(page.contains(r#"id="ready" class="bad">not ready<"#), "not in a group yet: {page}");
        assert!(!page.contains("a<b"), "topic names are escaped");
        assert!(!page.contains("http://") && !page.contains("https://"), "no external assets");
    }

    #[test]
    fn duplicate_ages_and_the_near_expiry_count_follow_the_ttl() {
        let m = Metrics::new();
        m.topics(&["t".to_string()]);
        m.set_ttl(std::time::Duration::from_secs(100));
        m.duplicate_seen("t", 1_000, 2_000); // 1 s
        m.duplicate_seen("t", 1_000, 91_000); // 90 s: not over 90%
        m.duplicate_seen("t", 1_000, 92_000); // 91 s: over
        m.expired_key_hits("t", 3);
        m.expired_key_hits("t", 0);
        assert_eq!(m.near_expiry.get(), 1);
        assert_eq!(m.expired_key_hits.get(), 3);
        let h = m.duplicate_age.with_label_values(&["t"]);
        assert_eq!(h.get_sample_count(), 3);
        assert!((h.get_sample_sum() - 182.0).abs() < 1e-9);
        let text = m.render();
        assert!(text.contains("kdedup_ttl_seconds 100"), "{text}");
        assert!(text.contains(r#"kdedup_duplicates_near_expiry_total{topic="t"} 1"#), "{text}");
        assert!(text.contains(r#"kdedup_expired_key_hits_total{topic="t"} 3"#), "{text}");
    }

    #[test]
    fn store_unavailable_seconds_run_while_any_partition_fails_on_the_store() {
        let m = Metrics::new();
        let (a, b) = ((Arc::from("t"), 0), (Arc::from("t"), 1));
        m.store_answered(&a, true);
        assert_eq!(m.store_unavailable.get(), 0.0, "answers alone cost nothing");
        m.store_answered(&a, false);
        m.store_answered(&b, false);
        std::thread::sleep(std::time::Duration::from_millis(30));
        m.store_answered(&a, true);
        let _ = m.render(); // a scrape adds the ongoing outage so far
        let during = m.store_unavailable.get();
        assert!(during >= 0.03, "{during}");
        m.store_answered(&b, true);
        let after = m.store_unavailable.get();
        assert!(after >= during && after < 1.0, "counted once, not per partition: {after}");
        std::thread::sleep(std::time::Duration::from_millis(20));
        assert_eq!(m.store_unavailable.get(), after, "stopped with the outage");
    }

    #[test]
    fn sink_errors_by_kind_store_calls_by_result_and_filter_checks_by_tier() {
        let m = Metrics::new();
        let text = m.render();
        for kind in SINK_ERROR_KINDS {
            assert!(text.contains(&format!("kdedup_sink_errors_total{{kind=\"{kind}\"}} 0")), "{text}");
        }
        for (tier, result) in FILTER_CHECKS {
            let line = format!("kdedup_filter_checks_total{{result=\"{result}\",tier=\"{tier}\"}} 0");
            assert!(text.contains(&line), "{line}: {text}");
        }
        m.sink_error(&crate::error::SinkError::Stdout(std::io::Error::other("x")));
        assert_eq!(m.sink_errors.at(["retriable"]).get(), 1);
        m.store_call("claim", false, 0.1);
        m.store_call("claim", true, 0.1);
        let text = m.render();
        assert!(text.contains(r#"kdedup_store_seconds_count{op="claim",result="error"} 1"#), "{text}");
        assert_eq!(m.store_calls_ok("claim"), 1);
    }

    #[test]
    fn build_info_rebalances_and_process_metrics_are_exported() {
        let m = Metrics::new();
        m.rebalance("assign");
        let text = m.render();
        assert!(text.contains(&format!("kdedup_build_info{{version=\"{}\"}} 1", env!("CARGO_PKG_VERSION"))), "{text}");
        assert!(text.contains(r#"kdedup_rebalances_total{kind="assign"} 1"#), "{text}");
        assert!(text.contains(r#"kdedup_rebalances_total{kind="lost"} 0"#), "{text}");
        assert!(text.contains("process_resident_memory_bytes"), "{text}");
        assert!(text.contains("process_open_fds"), "{text}");
        assert!(text.contains("process_cpu_seconds_total"), "{text}");
    }

    #[test]
    fn topic_partitions_are_set_for_the_topics_found_only() {
        let m = Metrics::new();
        m.set_topic_partitions([("orders", Some(12)), ("missing", None)]);
        let text = m.render();
        assert!(text.contains(r#"kdedup_topic_partitions{topic="orders"} 12"#), "{text}");
        assert!(!text.contains(r#"topic="missing""#), "{text}");
    }

    #[test]
    fn serve_counts_upstream_answers_by_class_and_store_errors_by_op_from_zero() {
        let m = ServeMetrics::new();
        let text = m.render();
        for class in SERVE_UPSTREAM_CLASSES {
            let line = format!("kdedup_serve_upstream_responses_total{{class=\"{class}\"}} 0");
            assert!(text.contains(&line), "{line}: {text}");
        }
        for op in SERVE_STORE_OPS {
            let line = format!("kdedup_serve_store_errors_total{{op=\"{op}\"}} 0");
            assert!(text.contains(&line), "{line}: {text}");
        }
        assert!(text.contains(&format!("kdedup_serve_build_info{{version=\"{}\"}} 1", env!("CARGO_PKG_VERSION"))));
        assert!(text.contains("process_cpu_seconds_total"), "{text}");
        for (answer, class) in [
            (Ok(200), "2xx"),
            (Ok(201), "2xx"),
            (Ok(302), "3xx"),
            (Ok(422), "4xx"),
            (Ok(503), "5xx"),
            (Err(true), "unreachable"),
            (Err(false), "unknown"),
        ] {
            let before = m.upstream_responses.at([class]).get();
            m.upstream_answered(answer);
            assert_eq!(m.upstream_responses.at([class]).get(), before + 1, "{answer:?} is {class}");
        }
        assert_eq!(m.upstream_responses.get(), 7);
        m.store_error("claim");
        assert_eq!(m.store_errors.at(["claim"]).get(), 1);
        assert_eq!(m.store_errors.get(), 1);
    }
}
