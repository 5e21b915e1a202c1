//! kdedup makes at-least-once Kafka streams safe for side effects.
//!
//! The path of one record:
//!
//! 1. [`source`]: a consumer in a group; each partition gets its own queue and task.
//! 2. [`event`]: the event ID (header, record key, JSON pointer or payload hash),
//!    its scope, and a payload fingerprint; records without one are dead-lettered.
//! 3. [`filter`]: a recent-key cache and an aging filter (cuckoo table) that only save store calls.
//! 4. [`store`]: the authority: atomic claim → `New | Duplicate | InFlight | Conflict`.
//! 5. [`sink`]: the side effect, only for `New`; dead letters and duplicates to side topics.
//! 6. complete: the claim turns `Done` and lives for the retention TTL.
//! 7. [`offsets`]: the contiguous watermark, committed only behind finished, durable work.
//!
//! [`kafka_client`] builds every librdkafka client's settings (TLS, SASL) in one place.
//! [`reconcile`] finds effects that ran after the last commit when a partition
//! changes owner. [`pipeline`] chains the stages per partition; [`service`] assembles them from a
//! [`config::Config`]; [`cli`] is the command line; [`check`] asks every
//! dependency of a config whether `run` would work. [`window`] says whether the TTL is long
//! enough for the duplicates seen (`kdedup stats`). [`serve`] is the same store and claim
//! semantics at an API's edge: a reverse proxy that runs each `Idempotency-Key` once.
//!
//! The bottom of the crate imports nothing above it (`scripts/imports` checks, in CI):
//! [`error`], [`config`], and the leaves they share with the stages: [`values`] (what a
//! sink, the store, the core and the commit book exchange), [`config::url_template`] (parsed once
//! into the config) and [`config::filter_plan`] (the filter's size, bounded by config validation).
//!
//! # Your own effect
//!
//! Implement [`sink::Sink`] (an `async fn` over a batch of new events, one
//! result per event: done, [`error::SinkError::retriable`] or
//! [`error::SinkError::permanent`]), set `[sink] kind = "custom"`, and run:
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

#![warn(missing_docs, unreachable_pub)]

pub mod backoff;
// Hidden from the public docs: the command line's own work, not a library
// surface (their shapes change with the CLI; `bench` and `demo` need a mock cluster).
#[doc(hidden)]
pub mod bench;
pub mod check;
// The binary's argument parser, public only for src/main.rs: clap turns its doc
// comments into `--help` text, so they are written for the command line, not rustdoc.
#[doc(hidden)]
pub mod cli;
pub mod config;
pub mod decide;
#[doc(hidden)]
pub mod demo;
pub mod error;
pub mod event;
pub mod filter;
pub mod kafka_client;
pub mod metrics;
// Test kit (librdkafka's in-process mock cluster): kdedup's own tests, the demo
// and the bench use it; hidden, as it is no part of running kdedup.
#[doc(hidden)]
pub mod mock;
pub mod offsets;
pub mod pipeline;
pub mod reconcile;
pub mod replay;
pub mod serve;
pub mod service;
pub mod sink;
pub mod source;
pub mod store;
#[cfg(feature = "testkit")]
#[doc(hidden)]
pub mod testkit;
pub mod values;
pub mod window;

// What a library user needs, at the top: the config, run and its options, the effect
// (`Sink`) and the store (`DedupStore`) with their answers, and the decision.
pub use config::Config;
pub use decide::Decision;
pub use error::SinkError;
pub use service::{run, RunOptions};
pub use sink::{CustomSink, Delivered, Effect, Sink, Stopping};
pub use source::StopMode;
pub use store::{Claim, ClaimRequest, ClaimState, DedupStore, Store};
