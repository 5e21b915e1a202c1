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
//! [`config::Config`]; [`cli`] is the command line; [`demo`] and [`mock`] run the
//! whole path in-process; [`bench`] measures it against a plain passthrough; [`check`] asks every
//! dependency of a config whether `run` would work. [`window`] says whether the TTL is long
//! enough for the duplicates seen (`kdedup stats`).

pub mod bench;
pub mod check;
pub mod cli;
pub mod config;
pub mod decide;
pub mod demo;
pub mod error;
pub mod event;
pub mod filter;
pub mod kafka_client;
pub mod metrics;
pub mod mock;
pub mod offsets;
pub mod pipeline;
pub mod reconcile;
pub mod replay;
pub mod service;
pub mod sink;
pub mod source;
pub mod store;
pub mod window;
