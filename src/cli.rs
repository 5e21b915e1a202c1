//! The command line: `run`, `serve`, `check`, `demo`, `bench`, `replay`, `stats`, `inspect`, `forget`, `schema`.

use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};

use crate::bench::{self, BenchOptions};
// Named by `Command::Bench` (clap's `--store` values).
pub use crate::bench::{BenchStore, HeapProbe};
use crate::config::{Config, ServeConfig, StoreConfig};
use crate::demo::{self, DemoOptions};
use crate::event::EventKey;
use crate::metrics::Metrics;
use crate::replay;
use crate::service::{self, RunOptions};
use crate::source::StopMode;
use crate::store::{now_ms, DedupStore, Store};

#[derive(Debug, Parser)]
#[command(
    name = "kdedup",
    version,
    about = "Exactly-once side effects over at-least-once Kafka streams",
    long_about = "kdedup reads Kafka topics in a consumer group, decides for every record whether its event \
                  was already handled (by event ID, in a store with a TTL), runs the side effect only for new \
                  events, and commits offsets only behind finished work.\n\n\
                  Try it with no setup:   kdedup demo\n\
                  Run it for real:        kdedup run --config config/kdedup.toml"
)]
pub struct Cli {
    /// Log format on stderr.
    #[arg(long, global = true, value_enum, default_value = "human", env = "KDEDUP_LOG_FORMAT")]
    pub log_format: LogFormat,
    /// Log filter, e.g. `info`, `kdedup=debug,rdkafka=warn`.
    #[arg(long, global = true, env = "KDEDUP_LOG")]
    pub log: Option<String>,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum LogFormat {
    Human,
    Json,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the service: consume, dedupe, run effects, commit. Stops cleanly on
    /// SIGTERM or Ctrl-C: in-flight batches finish, offsets are committed, exit 0.
    #[command(long_about = "Run the service: consume the [kafka] topics in the consumer group, decide each record \
        against the store, run the [sink] effect for new events, dead-letter what cannot be handled, and commit \
        offsets only behind finished work.\n\n\
        On SIGTERM or Ctrl-C it stops pulling records, lets in-flight batches finish (up to \
        [pipeline] drain_timeout_ms), commits, and exits 0. Anything unfinished is redelivered to the partition's \
        next owner and resumed, not lost.\n\n\
        It exits 2 without starting when the config is invalid or Kafka refuses its TLS or SASL settings \
        (a wrong password: the error names the mechanism and the listener; /readyz never says ready).\n\n\
        Every config key can be overridden from the environment as KDEDUP_<SECTION>__<KEY>, e.g. \
        KDEDUP_KAFKA__BROKERS=broker:9092. Health: /healthz, readiness: /readyz, metrics: /metrics on [metrics] listen.")]
    Run {
        /// The TOML config file (see config/kdedup.toml for every key, commented).
        #[arg(long, short, env = "KDEDUP_CONFIG")]
        config: PathBuf,
    },
    /// The whole path with no setup: in-process Kafka-protocol cluster, generated
    /// events with duplicates and malformed records, embedded store. Prints a
    /// summary; exits non-zero if any event was lost or emitted twice.
    Demo {
        /// How many records to produce.
        #[arg(long, default_value_t = 100_000)]
        events: u64,
        /// Share of records that repeat an earlier event (0 to 0.9).
        #[arg(long, default_value_t = 0.2)]
        duplicate_rate: f64,
        /// Share of the duplicates put on a random other partition than their original, under a random
        /// record key (0 to 1). Default 0.5: retries of one idempotent producer stay on their partition,
        /// but resends through another producer, re-keyed copies and keyless (sticky-partitioned)
        /// producers land anywhere; in a consumer group such a copy reaches another member, and only the
        /// shared store stops it. Half of each keeps both cases well covered.
        #[arg(long, default_value_t = 0.5)]
        cross_partition_rate: f64,
        /// Partitions of the input and output topics.
        #[arg(long, default_value_t = 4)]
        partitions: i32,
        /// Seed of the generated stream (same seed, same stream).
        #[arg(long, default_value_t = 1)]
        seed: u64,
        /// Print one JSON object instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Measure what deduplication costs: the same seeded dataset through a plain
    /// consume-produce-commit passthrough, then through kdedup; prints both and
    /// their ratio, and checks both outputs.
    #[command(long_about = "Measure what deduplication costs next to the consumer you already run.\n\n\
        One seeded dataset (default 1,000,000 events of 100 bytes, 20% duplicates: half right after their \
        original, half anywhere earlier; half of them on another partition than their original) is produced once; then, one after the other on that input: (a) a \
        passthrough that consumes, produces to an output topic and commits behind deliveries, with kdedup's own \
        client settings, batch size and commit interval; (b) kdedup's whole path. For each: events/s, CPU \
        seconds per event and peak RSS of this process, p50/p99 latency added per record (arrival in the batch \
        to output delivered); for kdedup also store round trips and fsyncs per 1000 events, filter hit rates and \
        the measured Bloom false-positive rate. Both outputs are read back and checked; exit 1 if either is wrong.\n\n\
        Without --brokers the cluster is librdkafka's mock cluster in a child process (it keeps 5 MiB per \
        partition: use more --partitions for more events). --store postgres|scylla take their connection from \
        the environment, e.g. KDEDUP_STORE__URL=postgres://... .")]
    Bench {
        /// Kafka bootstrap servers to run against (topics of their own are created); default: a mock cluster.
        #[arg(long)]
        brokers: Option<String>,
        /// Events in the dataset.
        #[arg(long, default_value_t = 1_000_000)]
        events: u64,
        /// Share of events that repeat an earlier one (0 to 0.9).
        #[arg(long, default_value_t = 0.2)]
        duplicate_rate: f64,
        /// Share of the duplicates put on a random other partition than their original, under a random
        /// record key (0 to 1). Default 0.5: retries of one idempotent producer stay on their partition,
        /// but resends through another producer, re-keyed copies and keyless (sticky-partitioned)
        /// producers land anywhere; in a consumer group such a copy reaches another member, and only the
        /// shared store stops it. Half of each keeps both cases well covered.
        #[arg(long, default_value_t = 0.5)]
        cross_partition_rate: f64,
        /// Payload size of each event, bytes.
        #[arg(long, default_value_t = 100)]
        payload_bytes: usize,
        /// Partitions of the input and output topics.
        #[arg(long, default_value_t = 16)]
        partitions: i32,
        /// The store kdedup runs against.
        #[arg(long, value_enum, default_value = "embedded")]
        store: BenchStore,
        /// Seed of the dataset (same seed, same data).
        #[arg(long, default_value_t = 1)]
        seed: u64,
        /// Pairs of runs (passthrough, then kdedup) over the one dataset, each pair into outputs, groups
        /// and a store of its own; past one, the medians and ranges follow the pairs' tables.
        #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=20))]
        runs: u32,
        /// Print one JSON object instead of a table (with `--runs` past 1: `runs`, each pair's object, and
        /// `summary`).
        #[arg(long)]
        json: bool,
    },
    /// Runs librdkafka's mock cluster, prints its address, serves until stdin closes (used by `bench`).
    #[command(hide = true)]
    MockCluster {
        /// Topics to create, as NAME:PARTITIONS.
        topics: Vec<String>,
    },
    /// Check a config before deploying it: validate it, print the effective settings (secrets
    /// redacted), then ask each dependency. Exit 0 when every check passes, 1 otherwise.
    #[command(long_about = "Check a config before deploying it, or when `kdedup run` will not start.\n\n\
        Validates the config (with its KDEDUP_… environment overrides and *.file secrets), prints the settings \
        `kdedup run` would use with every password and key redacted, then checks, in order: the brokers answer \
        (including the TLS handshake and SASL authentication; the error names the broker and what librdkafka \
        reported), the input, output, dead-letter and duplicates topics exist and their partition counts, the \
        output and dead-letter partitioning lets a partition's next owner reconcile its writes, the store is \
        reachable and its schema applied, and the metrics address is free.\n\n\
        Each line says ok, warn (works, but read it), FAIL (run would not start or not work) or skip (needs a \
        check that failed). Exit 0 when nothing failed, 1 otherwise; --json prints one object for scripts.")]
    /// Run the idempotency proxy in front of an HTTP API ([serve] in the config): requests with an
    /// Idempotency-Key run once; retries get the stored answer. Stops cleanly on SIGTERM or Ctrl-C.
    #[command(long_about = "Run `kdedup serve`: a reverse proxy in front of the HTTP API at [serve] upstream. \
        A request on [serve] methods (POST, PATCH) carrying [serve] key_header (Idempotency-Key) is claimed in the \
        store, forwarded once, and its answer recorded; a retry with the same request gets the stored answer with \
        Idempotent-Replayed: true, another request under the same key gets 422, and a retry while the first is \
        still running waits up to [serve] wait_ms, then gets 409 with Retry-After.\n\n\
        On SIGTERM or Ctrl-C it stops accepting, /readyz turns 503, requests in progress finish (up to [serve] \
        drain_timeout_ms), and it exits 0. Health: /healthz, readiness: /readyz, metrics: /metrics on [metrics] \
        listen. Check a config first with `kdedup check --config FILE`.")]
    Serve {
        /// The TOML config file ([serve], [store], [metrics]; see config/serve.toml).
        #[arg(long, short, env = "KDEDUP_CONFIG")]
        config: PathBuf,
    },
    Check {
        /// The TOML config file to check.
        #[arg(long, short, env = "KDEDUP_CONFIG")]
        config: PathBuf,
        /// Print one JSON object instead of the table.
        #[arg(long)]
        json: bool,
    },
    /// Re-read a partition range through the dedup decision (dry-run, apply, redrive, release),
    /// without joining the live group or moving its offsets.
    #[command(long_about = "Re-read a range of a topic's partitions through the dedup decision, without joining \
        the live consumer group or moving its offsets (the range is read by assign).\n\n\
        Modes:\n  \
        dry-run  (default) changes nothing: counts each record as new (no live row), duplicate (done with the \
        same fingerprint, or an earlier record of the range), conflict (other fingerprint), in_flight (another \
        owner's live claim) or bad (cannot be keyed); --show N lists the first N duplicates and conflicts with \
        where the event was first seen.\n  \
        apply    runs the range through the whole path: effects only for events not already done.\n  \
        redrive  runs the effect again for every event of the range and marks it done (needs --yes).\n  \
        release  forgets the keys of the range's events in the store (needs --yes).\n\n\
        Ranges: from is inclusive, to is exclusive. TIME is RFC 3339 (2026-12-01T10:00:00Z) or relative to now \
        (-30m, -2h, -1d), mapped with the broker's offsets for times. --from-committed starts at the live group's \
        committed offset. Claims of a replay are the job's (--job-id, generated when not given): they never \
        resume or take over the live group's claims, and every write carries kdedup-replay: <job-id>.\n\n\
        Exit codes: 0 done (also for an empty range), 2 bad arguments or config, 3 broker or store unreachable, \
        4 interrupted (Ctrl-C; a partial report is printed).")]
    Replay(ReplayArgs),
    /// Is the dedup window (store.ttl_secs) long enough? Reads a running instance's /metrics and
    /// prints one line of advice.
    #[command(long_about = "Is the dedup window long enough for the duplicates this stream carries?\n\n\
        Reads a running `kdedup run`'s /metrics (--url, or [metrics] listen of --config, else \
        127.0.0.1:9464) and prints one line: the share of duplicates the TTL caught (duplicates / \
        (duplicates + new events whose key had expired within one more TTL: kdedup_expired_key_hits_total)), \
        and the share that arrived within the last 10% of the TTL (kdedup_duplicates_near_expiry_total). \
        Counts are this instance's since it started; ask each instance of a group. --json prints the numbers.\n\n\
        With --config and --store: what the store holds for the config's scope instead (live keys in flight and \
        done, the oldest key's age, the store's size on disk), read from the store itself: the embedded store \
        only while `kdedup run` is stopped (one process holds it); not offered by the ScyllaDB store (it would \
        scan the whole table).")]
    Stats {
        /// The instance's metrics address, http://HOST:PORT (a path other than /metrics may follow).
        #[arg(long)]
        url: Option<String>,
        /// A config whose `[metrics] listen` names the instance (instead of --url).
        #[arg(long, short, conflicts_with = "url")]
        config: Option<PathBuf>,
        /// What the store holds for the config's scope, instead of the window advice (needs --config).
        #[arg(long, requires = "config")]
        store: bool,
        /// Print one JSON object instead of the line.
        #[arg(long)]
        json: bool,
    },
    /// Show what the store holds for an event ID.
    Inspect(KeyArgs),
    /// Delete an event ID from the store so its next delivery runs the effect again.
    /// The embedded store cannot be opened while `kdedup run` holds it: stop the service first.
    Forget(KeyArgs),
    /// Print or apply the store's schema (PostgreSQL, ScyllaDB; the embedded store needs none).
    Schema {
        #[command(subcommand)]
        action: SchemaAction,
    },
}

#[derive(Debug, Subcommand)]
pub enum SchemaAction {
    /// Print the schema of the configured store (or of --kind) to stdout. With a
    /// config, the ScyllaDB schema is rendered with its keyspace, replication and TTL.
    Print {
        #[arg(long, short, env = "KDEDUP_CONFIG", required_unless_present = "kind")]
        config: Option<PathBuf>,
        /// Store kind, instead of reading a config: postgres, or scylla (the
        /// template, with its {{…}} fields unfilled).
        #[arg(long, conflicts_with = "config")]
        kind: Option<String>,
    },
    /// Create the store's tables and indexes if missing (idempotent; safe to run on every deploy).
    Apply {
        #[arg(long, short, env = "KDEDUP_CONFIG")]
        config: PathBuf,
    },
}

/// What `kdedup replay` reads and does.
#[derive(Debug, clap::Args)]
#[command(group(clap::ArgGroup::new("from").required(true).args(["from_offset", "from_time", "from_committed"])))]
#[command(group(clap::ArgGroup::new("to").args(["to_offset", "to_time", "to_end"])))]
pub struct ReplayArgs {
    /// The TOML config file of the pipeline whose range is replayed.
    #[arg(long, short, env = "KDEDUP_CONFIG")]
    config: PathBuf,
    /// The topic (default: the config's only topic).
    #[arg(long)]
    topic: Option<String>,
    /// A partition to replay (repeatable; default: all).
    #[arg(long = "partition")]
    partitions: Vec<i32>,
    /// First offset of the range (inclusive).
    #[arg(long)]
    from_offset: Option<i64>,
    /// First record at or after TIME (RFC 3339 or relative, e.g. -2h).
    #[arg(long, value_name = "TIME", allow_hyphen_values = true)]
    from_time: Option<String>,
    /// Start at the live group's committed offset.
    #[arg(long)]
    from_committed: bool,
    /// End of the range (exclusive).
    #[arg(long)]
    to_offset: Option<i64>,
    /// End at the first record at or after TIME (exclusive).
    #[arg(long, value_name = "TIME", allow_hyphen_values = true)]
    to_time: Option<String>,
    /// End at the partition's end when the replay starts (the default).
    #[arg(long)]
    to_end: bool,
    #[arg(long, value_enum, default_value = "dry-run")]
    mode: replay::Mode,
    /// Send effects to this topic instead of the configured sink (staging).
    #[arg(long)]
    to_topic: Option<String>,
    /// At most this many records per second.
    #[arg(long)]
    max_rate: Option<u32>,
    /// The job's ID, stamped on every write as kdedup-replay (default: generated and printed).
    #[arg(long)]
    job_id: Option<String>,
    /// List the first N duplicates and conflicts (dry-run).
    #[arg(long, default_value_t = 10)]
    show: usize,
    /// Confirm a redrive or release.
    #[arg(long)]
    yes: bool,
    /// Print one JSON object at the end instead of the table.
    #[arg(long)]
    json: bool,
}

/// Names one key in the configured store.
#[derive(Debug, clap::Args)]
pub struct KeyArgs {
    #[arg(long, short, env = "KDEDUP_CONFIG")]
    config: PathBuf,
    /// The event ID as it appears in the record (UTF-8).
    #[arg(long)]
    id: String,
    /// Scope; defaults to [key] scope from the config.
    #[arg(long)]
    scope: Option<String>,
}

/// Runs a parsed command; returns the process exit code.
pub async fn run(cli: Cli) -> anyhow::Result<i32> {
    match cli.command {
        Command::Run { config: path } => {
            let shutdown = shutdown_signal();
            let config = Config::load(&path)?;
            let options = RunOptions { metrics: Metrics::new(), serve_metrics: true, ..RunOptions::default() };
            service::run(&config, options, shutdown).await?;
            Ok(0)
        }
        Command::Serve { config: path } => {
            let config = ServeConfig::load(&path)?;
            serve_command(config, &path).await?;
            Ok(0)
        }
        Command::Check { config, json } => check_command(config, json).await,
        Command::Demo { events, duplicate_rate, cross_partition_rate, partitions, seed, json } => {
            demo_command(events, duplicate_rate, cross_partition_rate, partitions, seed, json).await
        }
        Command::Bench {
            brokers,
            events,
            duplicate_rate,
            cross_partition_rate,
            payload_bytes,
            partitions,
            store,
            seed,
            runs,
            json,
        } => {
            let options = BenchOptions {
                brokers,
                events,
                duplicate_rate,
                cross_partition_rate,
                payload_bytes,
                partitions,
                store,
                seed,
                runs,
                progress: !json,
            };
            bench_command(options, json).await
        }
        Command::MockCluster { topics } => {
            tokio::task::spawn_blocking(move || bench::serve_mock_cluster(&topics)).await??;
            Ok(0)
        }
        Command::Schema { action: SchemaAction::Print { config, kind } } => schema_print(config, kind),
        Command::Schema { action: SchemaAction::Apply { config } } => schema_apply(config).await,
        Command::Replay(args) => replay_command(args).await,
        Command::Stats { config: Some(path), store: true, json, .. } => stats_store(path, json).await,
        Command::Stats { url, config, json, .. } => stats_window(url, config, json).await,
        Command::Inspect(args) => inspect_command(args).await,
        Command::Forget(args) => forget_command(args).await,
    }
}

/// `kdedup check`: the report as text or JSON; exits 1 when `run` would not work.
async fn check_command(config: PathBuf, json: bool) -> anyhow::Result<i32> {
    let report = if crate::check::is_serve_config(&config) {
        crate::check::run_serve(&config).await
    } else {
        crate::check::run(&config).await
    };
    if json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        crate::check::print(&report);
    }
    Ok(if report.ok { 0 } else { 1 })
}

/// `--duplicate-rate` and `--cross-partition-rate` of `demo` and `bench`.
fn check_rates(duplicate_rate: f64, cross_partition_rate: f64) -> anyhow::Result<()> {
    if !(0.0..=0.9).contains(&duplicate_rate) {
        anyhow::bail!("--duplicate-rate must be between 0 and 0.9, got {duplicate_rate}");
    }
    if !(0.0..=1.0).contains(&cross_partition_rate) {
        anyhow::bail!("--cross-partition-rate must be between 0 and 1, got {cross_partition_rate}");
    }
    Ok(())
}

/// `kdedup demo`: a run on the mock cluster; exits 1 when its counts do not add up.
async fn demo_command(
    events: u64,
    duplicate_rate: f64,
    cross_partition_rate: f64,
    partitions: i32,
    seed: u64,
    json: bool,
) -> anyhow::Result<i32> {
    check_rates(duplicate_rate, cross_partition_rate)?;
    if partitions < 1 {
        anyhow::bail!("--partitions must be at least 1");
    }
    let report =
        demo::run(&DemoOptions { events, duplicate_rate, cross_partition_rate, partitions, seed, progress: !json })
            .await?;
    if json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        print_report(&report);
    }
    Ok(if report.ok() { 0 } else { 1 })
}

/// `kdedup bench`: the measurement as a table or JSON; exits 1 when it did not verify.
async fn bench_command(options: BenchOptions, json: bool) -> anyhow::Result<i32> {
    check_rates(options.duplicate_rate, options.cross_partition_rate)?;
    if options.partitions < 1 || options.events < 1 {
        anyhow::bail!("--partitions and --events must be at least 1");
    }
    let reports = bench::run(&options).await?;
    let verified = reports.iter().all(|r| r.verified);
    match reports.as_slice() {
        [one] if json => println!("{}", serde_json::to_string(one)?),
        [one] => bench::print_table(one),
        many if json => {
            let summary = bench::RunsSummary::of(many);
            println!("{}", serde_json::json!({ "runs": many, "summary": summary }));
        }
        many => {
            for (i, r) in many.iter().enumerate() {
                println!("run {} of {}:", i + 1, many.len());
                bench::print_table(r);
            }
            bench::print_summary(&bench::RunsSummary::of(many));
        }
    }
    Ok(if verified { 0 } else { 1 })
}

/// `kdedup schema print`: the schema of `--kind`, or of the config's store.
fn schema_print(config: Option<PathBuf>, kind: Option<String>) -> anyhow::Result<i32> {
    let schema = match (config, kind.as_deref()) {
        (_, Some("postgres")) => Some(crate::store::postgres::SCHEMA.to_string()),
        (_, Some("scylla")) => Some(crate::store::scylla::SCHEMA_TEMPLATE.to_string()),
        (_, Some(other)) => anyhow::bail!("--kind {other}: allowed: postgres, scylla"),
        (Some(path), None) => {
            let config = Config::load(&path)?;
            match &config.store {
                StoreConfig::Postgres { .. } => Some(crate::store::postgres::SCHEMA.to_string()),
                StoreConfig::Scylla(scylla) => Some(crate::store::scylla::render_schema(scylla, &config.retention)),
                StoreConfig::Embedded { .. } => None,
            }
        }
        (None, None) => unreachable!("clap requires --config or --kind"),
    };
    match schema {
        Some(text) => print!("{text}"),
        None => println!("-- the embedded store needs no schema"),
    }
    Ok(0)
}

/// `kdedup schema apply`: the schema of a run's or a serve's config, applied to its store.
async fn schema_apply(config: PathBuf) -> anyhow::Result<i32> {
    let store = if crate::check::is_serve_config(&config) {
        let config = ServeConfig::load(&config)?;
        Store::open(&config.store, &config.retention)?
    } else {
        let config = Config::load(&config)?;
        Store::open(&config.store, &config.retention)?
    };
    store.apply_schema().await.context("applying the schema")?;
    println!("schema applied ({} store)", store.kind());
    Ok(0)
}

/// `kdedup stats --store`: what the store holds for the config's scope.
async fn stats_store(path: PathBuf, json: bool) -> anyhow::Result<i32> {
    let config = Config::load(&path)?;
    let store = Store::open(&config.store, &config.retention).context("cannot open the store ([store])")?;
    let now = now_ms();
    let census = store.census(&config.key.scope, now).await?;
    let age_secs = census.oldest_claimed_at_ms.map(|t| now.saturating_sub(t) as f64 / 1000.0);
    if json {
        let mut v = serde_json::to_value(census)?;
        v["scope"] = config.key.scope.clone().into();
        v["oldest_age_secs"] = age_secs.into();
        v["ttl_secs"] = config.retention.ttl.as_secs().into();
        println!("{v}");
    } else {
        let age = age_secs.map_or("no keys".to_string(), |a| format!("oldest key {a:.0}s old"));
        let size = census.bytes.map_or(String::new(), |b| format!("; store {:.1} MiB on disk", b as f64 / 1048576.0));
        println!(
            "scope {}: {} keys done, {} in flight; {age} (ttl_secs {}){size}",
            config.key.scope,
            census.done,
            census.in_flight,
            config.retention.ttl.as_secs()
        );
    }
    Ok(0)
}

/// `kdedup stats`: the window advice from a running instance's metrics.
async fn stats_window(url: Option<String>, config: Option<PathBuf>, json: bool) -> anyhow::Result<i32> {
    let url = match (url, config) {
        (Some(url), _) => url,
        (None, Some(path)) => match Config::load(&path)?.metrics_listen {
            Some(addr) => format!("http://{addr}/metrics"),
            None => {
                anyhow::bail!("{}: [metrics] listen is \"\": no metrics to read; pass --url", path.display())
            }
        },
        (None, None) => "http://127.0.0.1:9464/metrics".to_string(),
    };
    let text = tokio::task::spawn_blocking({
        let url = url.clone();
        move || crate::window::fetch_metrics(&url)
    })
    .await??;
    let window = crate::window::Window::from_metrics(&text);
    if json {
        let mut v = serde_json::to_value(&window)?;
        v["coverage"] = window.coverage().into();
        v["near_expiry_share"] = window.near_expiry_share().into();
        v["advice"] = window.advice().into();
        v["can_judge"] = window.can_judge().into();
        println!("{v}");
    } else {
        println!("{}", window.advice());
    }
    Ok(0)
}

/// `kdedup inspect`: one key's row (and its recorded response); exits 1 when absent.
async fn inspect_command(args: KeyArgs) -> anyhow::Result<i32> {
    let (store, key) = open_for_key(args)?;
    let Some(row) = store.lookup(vec![key.clone()], now_ms()).await?.pop().flatten() else {
        println!("{}: not in the store (never seen, expired, or forgotten)", key.display_id());
        return Ok(1);
    };
    println!(
        "{}\nstate: {}\nfingerprint: {}\nclaimed by: {}\nclaimed at: {}\nlease until: {}\nexpires at: {}",
        key.display_id(),
        match row.state {
            crate::store::ClaimState::InFlight => "in flight (claimed, its effect not yet known to be done)",
            crate::store::ClaimState::Done => "done (its effect ran; later copies are duplicates)",
        },
        row.fingerprint,
        replay::claimant_display(&row.position),
        human_time(row.claimed_at_ms),
        // A done row holds no lease (its lease time is 0: not a date to show).
        match row.state {
            crate::store::ClaimState::Done => "none (done)".to_string(),
            crate::store::ClaimState::InFlight => human_time(row.lease_until_ms),
        },
        human_time(row.expires_at_ms)
    );
    if let Some(r) = store.response(key, now_ms()).await? {
        println!(
            "response: HTTP {} after {} attempt(s), at {}\nresponse body: {} bytes, sha256 {}\nresponse excerpt: {:?}",
            r.status,
            r.attempts,
            human_time(r.at_ms),
            r.body_bytes,
            r.body_sha256,
            r.excerpt
        );
    }
    Ok(0)
}

/// `kdedup forget`: deletes one key's row, so its next copy runs again.
async fn forget_command(args: KeyArgs) -> anyhow::Result<i32> {
    let (store, key) = open_for_key(args)?;
    let existed = store.forget(key.clone()).await?;
    store.sync()?;
    if existed {
        // Live processes' recent caches must stop vouching for it.
        crate::store::mark_released(&store, &key.scope, crate::store::now_ms()).await?;
    }
    println!("{}: {}", key.display_id(), if existed { "forgotten" } else { "was not in the store" });
    Ok(0)
}

async fn replay_command(args: ReplayArgs) -> anyhow::Result<i32> {
    let usage = |message: String| {
        eprintln!("error: {message}");
        Ok(2)
    };
    if matches!(args.mode, replay::Mode::Redrive | replay::Mode::Release) && !args.yes {
        return usage(format!(
            "--mode {} changes the store{}: add --yes to confirm (try --mode dry-run first)",
            if args.mode == replay::Mode::Redrive { "redrive" } else { "release" },
            if args.mode == replay::Mode::Redrive { " and runs every effect again" } else { "" }
        ));
    }
    let config = match Config::load(&args.config) {
        Ok(c) => c,
        Err(e) => return usage(e.to_string()),
    };
    let now = now_ms() as i64;
    let from = match (args.from_offset, &args.from_time) {
        (Some(n), _) => replay::From::Offset(n),
        (None, Some(t)) => match replay::parse_time(t, now) {
            Ok(ms) => replay::From::Time(ms),
            Err(e) => return usage(format!("--from-time {e}")),
        },
        (None, None) => replay::From::Committed,
    };
    let to = match (args.to_offset, &args.to_time) {
        (Some(n), _) => replay::To::Offset(n),
        (None, Some(t)) => match replay::parse_time(t, now) {
            Ok(ms) => replay::To::Time(ms),
            Err(e) => return usage(format!("--to-time {e}")),
        },
        (None, None) => replay::To::End,
    };
    let job_id = args.job_id.unwrap_or_else(|| format!("replay-{now}"));
    if !args.json {
        eprintln!("replay job {job_id}, mode {}", args.mode);
    }
    if args.show > 0 && args.mode != replay::Mode::DryRun {
        eprintln!("note: --show lists what a dry-run finds; it is ignored with --mode {}", args.mode);
    }
    let options = replay::ReplayOptions {
        topic: args.topic,
        partitions: args.partitions,
        from,
        to,
        mode: args.mode,
        to_topic: args.to_topic,
        max_rate: args.max_rate,
        job_id,
        show: args.show,
        progress: !args.json,
    };
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let ctrl_c = tokio::spawn(async move {
        if tokio::signal::ctrl_c().await.is_ok() {
            let _ = stop_tx.send(true);
        }
    });
    let result = replay::run(&config, &options, stop_rx).await;
    ctrl_c.abort();
    let report = match result {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: {e}");
            return Ok(e.exit_code());
        }
    };
    if args.json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        print_replay(&report);
    }
    Ok(if report.interrupted { 4 } else { 0 })
}

/// The async runtime's blocking threads, at most: four per core, 8 to 64. The embedded
/// store's calls run there, one per partition task at a time: with the runtime's default
/// (512) a process on 160 partitions kept ~180 threads, each with its own allocator heap,
/// for 2 cores to serve (`kdedup bench --partitions 160`: 1.3 GiB peak RSS and 14 CPU
/// µs/event, against 0.9 GiB and 11 µs with 8). Work beyond this waits its turn; the one
/// blocking task that waits on others (the source's stop) leaves the rest to them.
pub fn max_blocking_threads() -> usize {
    let cores = std::thread::available_parallelism().map_or(2, std::num::NonZeroUsize::get);
    (cores * 4).clamp(8, 64)
}

/// Tells `kdedup bench` how to ask the global allocator what it holds committed, and to give back
/// what it holds free (the binary chooses the allocator; src/main.rs registers mimalloc's).
pub fn set_heap_probe(probe: HeapProbe) {
    bench::set_heap_probe(probe);
}

/// The log filter: `asked` (`--log` / `KDEDUP_LOG`) or the command's default level, with the
/// storage engine's targets (fjall, lsm_tree) at `warn` unless the filter names them: their
/// INFO lines (a journal recovered, a tree opened) say nothing to a person running
/// `kdedup inspect`, and nine of them buried its one line of answer.
pub fn log_filter(asked: Option<&str>, default_level: &str) -> String {
    let filter = asked.unwrap_or(default_level);
    if filter.contains("fjall") || filter.contains("lsm_tree") {
        return filter.to_string();
    }
    format!("{filter},fjall=warn,lsm_tree=warn")
}

pub use crate::values::human_time;

/// An error and its causes, each said once: a cause whose text the message already
/// carries (an error that prints its source, then the source itself) is left out.
pub fn error_chain(e: &anyhow::Error) -> String {
    let mut out = String::new();
    for cause in e.chain() {
        let text = cause.to_string();
        if out.contains(&text) {
            continue;
        }
        if !out.is_empty() {
            out.push_str(": ");
        }
        out.push_str(&text);
    }
    out
}

fn print_replay(r: &replay::Report) {
    if r.counts.records == 0 {
        println!(
            "nothing to replay: the range holds no records (topic {}, {} partitions)",
            r.topic,
            r.partitions.len()
        );
    }
    println!("{} of {} (job {}){}", r.mode, r.topic, r.job_id, if r.interrupted { ", interrupted" } else { "" });
    let row = |name: String, from: String, to: String, c: &replay::Counts| {
        println!(
            "  {name:>9} {from:>12} {to:>12} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9}",
            c.records, c.new, c.duplicate, c.conflict, c.in_flight, c.bad, c.emitted
        )
    };
    println!(
        "  {:>9} {:>12} {:>12} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9}",
        "partition", "from", "to", "records", "new", "duplicate", "conflict", "in_flight", "bad", "emitted"
    );
    for p in &r.partitions {
        row(p.partition.to_string(), p.from.to_string(), p.to.to_string(), &p.counts);
    }
    row("all".into(), String::new(), String::new(), &r.counts);
    if r.mode == replay::Mode::Release {
        println!("  released {} keys", r.counts.released);
    }
    for s in &r.shown {
        println!("  {} {} at {} (first seen at {})", s.outcome, s.event_id, s.position, s.first);
    }
    if r.counts.done > 0 {
        println!(
            "  {} records were already handled here, at their own positions (done: not duplicates, not run again)",
            r.counts.done
        );
    }
    println!("  {:.2}s", r.elapsed_secs);
}

fn open_for_key(KeyArgs { config, id, scope }: KeyArgs) -> anyhow::Result<(Store, EventKey)> {
    let config = Config::load(&config)?;
    let store = Store::open(&config.store, &config.retention).with_context(|| match &config.store {
        StoreConfig::Embedded { path } => {
            format!("cannot open the store at {} (is `kdedup run` using it?)", path.display())
        }
        StoreConfig::Postgres { .. } => "cannot open the PostgreSQL store".to_string(),
        StoreConfig::Scylla(_) => "cannot open the ScyllaDB store".to_string(),
    })?;
    let scope = scope.unwrap_or(config.key.scope);
    Ok((store, EventKey { scope: scope.as_str().into(), id: id.into_bytes() }))
}

fn print_report(r: &demo::DemoReport) {
    println!();
    println!("  records in           {:>10}", r.records_in);
    println!("    unique events      {:>10}", r.unique_events);
    println!("    duplicates         {:>10}", r.duplicates_in);
    println!("    malformed          {:>10}", r.malformed_in);
    println!("  emitted              {:>10}", r.emitted);
    println!("  duplicates dropped   {:>10}", r.duplicates_dropped);
    println!("  dead-lettered        {:>10}", r.dead_lettered);
    println!("  lost                 {:>10}", r.lost);
    println!("  duplicated effects   {:>10}", r.duplicated_effects);
    println!("  out of order         {:>10}", r.out_of_order);
    println!("  commits / fsyncs     {:>10}", format!("{} / {}", r.commits, r.store_syncs));
    println!("  elapsed              {:>9.2}s", r.elapsed_secs);
    println!("  throughput           {:>8.0}/s", r.events_per_sec);
    println!();
    println!(
        "{}",
        if r.ok() { "OK: every unique event emitted exactly once" } else { "FAILED: events lost or emitted twice" }
    );
}

/// `kdedup serve`: opens the store (its schema must be applied), listens, and
/// serves until SIGTERM or Ctrl-C, then drains.
async fn serve_command(config: ServeConfig, path: &std::path::Path) -> anyhow::Result<()> {
    let shutdown = shutdown_signal();
    let store = Store::open(&config.store, &config.retention).context("cannot open the store ([store])")?;
    store.check_schema(Some(path)).await.context("the store's schema")?;
    let metrics = crate::metrics::ServeMetrics::new();
    let _endpoint = match config.metrics_listen {
        Some(addr) => Some(crate::metrics::MetricsServer::start_serve(addr, metrics.clone())?),
        None => None,
    };
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("cannot listen on {} ([serve] listen)", config.listen))?;
    crate::serve::run(config, store, metrics, listener, async {
        shutdown.await;
    })
    .await
}

/// Resolves on SIGTERM or Ctrl-C: drain and stop. The handlers are installed when this is
/// called, not when the future is first polled, so a SIGTERM during start-up (opening the
/// store, asking the brokers) stops the run cleanly as soon as it can look, instead of
/// killing the process by the signal's default action.
fn shutdown_signal() -> impl std::future::Future<Output = StopMode> {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        let handlers = signal(SignalKind::terminate()).and_then(|t| Ok((t, signal(SignalKind::interrupt())?)));
        async move {
            match handlers {
                Ok((mut term, mut int)) => {
                    tokio::select! {
                        _ = term.recv() => {}
                        _ = int.recv() => {}
                    }
                }
                Err(_) => drop(tokio::signal::ctrl_c().await),
            }
            StopMode::Drain
        }
    }
    #[cfg(not(unix))]
    async {
        let _ = tokio::signal::ctrl_c().await;
        StopMode::Drain
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_error_chain_says_each_cause_once() {
        let io = std::io::Error::from(std::io::ErrorKind::NotFound);
        let text = io.to_string();
        // An error whose message already carries its source's text.
        let e = anyhow::Error::new(io).context(text.clone()).context("cannot open the store");
        assert_eq!(error_chain(&e), format!("cannot open the store: {text}"));
    }

    #[test]
    fn the_storage_engine_logs_warnings_only_unless_asked() {
        assert_eq!(log_filter(None, "info"), "info,fjall=warn,lsm_tree=warn");
        assert_eq!(log_filter(Some("debug"), "info"), "debug,fjall=warn,lsm_tree=warn");
        assert_eq!(log_filter(Some("info,fjall=debug"), "info"), "info,fjall=debug");
    }

    #[test]
    fn times_read_as_dates_not_epoch_milliseconds() {
        let text = human_time(1_796_426_556_000);
        assert!(text.starts_with("2026-12-04T23:22:36.000Z, "), "{text}");
        assert!(text.ends_with(" ago") || text.ends_with(" from now"), "{text}");
        assert!(human_time(now_ms() + 90_000).ends_with("s from now"));
    }
}
