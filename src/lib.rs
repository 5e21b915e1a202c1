//! kdedup makes at-least-once Kafka streams safe for side effects.
//!
//! The path of one record (the modules are the crate's own; see [The public face](#the-public-face)):
//!
//! 1. `source`: a consumer in a group; each partition gets its own queue and task.
//! 2. `event`: the event ID (header, record key, JSON pointer or payload hash),
//!    its scope, and a payload fingerprint; records without one are dead-lettered.
//! 3. `filter`: a recent-key cache and an aging filter that only save store calls. The aging
//!    filter's table (`aging`, a cuckoo table whose keys age out) also lets the embedded store
//!    skip the read of a key it never wrote.
//! 4. `store`: the authority: atomic claim → `New | Duplicate | InFlight | Conflict`.
//! 5. `sink`: the side effect, only for `New`; dead letters and duplicates to side topics.
//! 6. complete: the claim turns `Done` and lives for the retention TTL.
//! 7. `offsets`: the contiguous watermark, committed only behind finished, durable work.
//!
//! `kafka_client` builds every librdkafka client's settings (TLS, SASL) in one place.
//! `reconcile` finds effects that ran after the last commit when a partition
//! changes owner. `decide` is the decision core; `pipeline` drives it per partition;
//! `service` assembles them from a [`Config`]; `cli` is the command line; `check` asks every
//! dependency of a config whether `run` would work. `window` says whether the TTL is long
//! enough for the duplicates seen (`kdedup stats`). `serve` is the same store and claim
//! semantics at an API's edge: a reverse proxy that runs each `Idempotency-Key` once.
//!
//! The bottom of the crate imports nothing above it (`scripts/imports` checks, in CI):
//! [`error`], [`config`], and the leaves they share with the stages: `values` (what a
//! sink, the store, the core and the commit book exchange), [`config::url_template`] (parsed once
//! into the config) and [`config::filter_plan`] (the filter's size, bounded by config validation).
//!
//! # The public face
//!
//! A library user sees [`config`] and [`error`], and at the top: [`run`] with its
//! [`RunOptions`] (and the [`Metrics`] it counts into), the effect ([`Sink`],
//! [`CustomSink`], [`Effect`], [`Delivered`], [`Stopping`]; the HTTP sink's
//! [`idempotency_key`]), the store ([`DedupStore`],
//! [`Store`], [`Claim`] and the rest of its answers), the [`Decision`] and [`StopMode`];
//! plus the types those name. Every other module is `pub(crate)`.
//!
//! **The test kit.** kdedup's own tests, benches and examples reach further (the mock
//! cluster, the Kafka client settings, the metrics, the event and store internals). The
//! `testkit` cargo feature, which only the crate's dev-dependency on itself turns on,
//! makes the modules they use public (hidden from these docs) and adds
//! `kdedup::testkit` (fault points around a sink). A build without it, as every user
//! and the release binary have, cannot reach them: the modules are declared with
//! `testkit_visible!` in `lib.rs`, which picks `pub` or `pub(crate)` by the feature.
//! Modules no test needs (`backoff`, `bench`, `check`, `demo`, `decide`, `pipeline`)
//! are private in every build.
//!
//! # Your own effect
//!
//! Implement [`Sink`] (an `async fn` over a batch of new events, one
//! result per event: done, [`SinkError::retriable`] or
//! [`SinkError::permanent`]), set `[sink] kind = "custom"`, and run:
//!
//! ```no_run
//! # struct Ledger;
//! # impl kdedup::Sink for Ledger {
//! #     fn kind(&self) -> &'static str { "ledger" }
//! #     async fn deliver(&self, b: &[kdedup::Effect<'_>], _: &kdedup::Stopping) -> Vec<Result<kdedup::Delivered, kdedup::SinkError>> {
//! #         b.iter().map(|_| Ok(kdedup::Delivered::done())).collect()
//! #     }
//! # }
//! use kdedup::{Config, CustomSink, RunOptions, StopMode};
//!
//! #[tokio::main]
//! async fn main() -> anyhow::Result<()> {
//!     let config = Config::load("kdedup.toml".as_ref())?; // [sink] kind = "custom"
//!     let options = RunOptions { sink: Some(CustomSink::new(Ledger)), ..RunOptions::default() };
//!     let shutdown = async { tokio::signal::ctrl_c().await.ok(); StopMode::Drain };
//!     kdedup::run(&config, options, shutdown).await
//! }
//! ```
//!
//! `examples/pg_outbox.rs` is a whole one: a PostgreSQL ledger written in the
//! same transaction as its outbox row, idempotent for the event ID.

#![warn(missing_docs, unreachable_pub, unnameable_types)]

// The public face: the config and its errors, the command line (for src/main.rs), and
// the re-exports below. Everything else is the crate's own ("The test kit", above).
pub mod config;
pub mod error;
// The binary's argument parser, public only for src/main.rs: clap turns its doc
// comments into `--help` text, so they are written for the command line, not rustdoc.
#[doc(hidden)]
pub mod cli;

/// Declares modules that are `pub(crate)` in a build of kdedup and public (hidden
/// from the docs) with the `testkit` cargo feature. Their `pub` items are what the
/// crate's own tests, benches and examples reach; without the feature nothing outside
/// the crate can, so `unreachable_pub` has nothing to say about them, and what only
/// the tests use (or re-export) is not dead code. A build with the feature (every
/// `cargo test` and `cargo clippy --all-targets`) still lints them in full.
macro_rules! testkit_visible {
    ($($(#[$attr:meta])* mod $name:ident;)*) => {$(
        $(#[$attr])*
        #[cfg(feature = "testkit")]
        #[doc(hidden)]
        pub mod $name;
        $(#[$attr])*
        #[cfg(not(feature = "testkit"))]
        #[allow(unreachable_pub, dead_code, unused_imports)]
        pub(crate) mod $name;
    )*};
}

testkit_visible! {
    mod aging;
    mod event;
    mod filter;
    mod kafka_client;
    mod metrics;
    // librdkafka's in-process mock cluster: the demo, the bench and the tests.
    mod mock;
    mod offsets;
    mod reconcile;
    mod replay;
    mod serve;
    mod service;
    mod sink;
    mod source;
    mod store;
    mod values;
    mod window;
}

// The hot path keeps `pub` inside crate-private modules (its items are not
// reachable from outside; narrowing them to `pub(crate)` is one `cargo fix`).
#[allow(unreachable_pub)]
mod decide;
#[allow(unreachable_pub)]
mod pipeline;

mod backoff;
mod bench;
mod check;
mod demo;
#[cfg(feature = "testkit")]
#[doc(hidden)]
pub mod testkit;

// What a library user needs: the config, run and its options (with the counts it
// keeps), the effect (`Sink`) and the store (`DedupStore`) with their answers, and
// the decision.
pub use config::Config;
pub use decide::Decision;
pub use error::SinkError;
pub use metrics::Metrics;
pub use service::{run, RunOptions};
pub use sink::http::idempotency_key;
pub use sink::{CustomSink, Delivered, Effect, Sink, Stopping};
pub use source::StopMode;
pub use store::{Claim, ClaimRequest, ClaimState, DedupStore, Store};

// What those name in their fields and signatures (`unnameable_types` says when one is missing).
pub use event::{Envelope, EventKey, Fingerprint, Position, Record};
pub use metrics::{StoreBatchMetrics, StoreOpMetrics, Summed};
pub use sink::Observed;
pub use store::{Acquired, Census, ClaimRow, EmbeddedStore, PostgresStore, Released, ScyllaStore, StoreStats};
pub use values::{EffectResponse, OutputMark};
pub use window::{First, Origin};
