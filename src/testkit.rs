//! kdedup's own test hooks, behind the `testkit` cargo feature (which only the
//! crate's tests turn on): [`Faults`], armed around the configured sink
//! (`sink::faulty`), and [`run`], a run with them. The decision core and the
//! partition tasks hold no hook: a run without the feature cannot build one.

use std::future::Future;

use crate::config::Config;
use crate::service::RunOptions;
pub use crate::sink::faulty::Faults;
pub use crate::sink::faulty::FaultySink;
use crate::sink::AnySink;
use crate::source::StopMode;

/// [`crate::service::run`] with `faults` around the configured sink.
pub async fn run(
    config: &Config,
    options: RunOptions,
    faults: Faults,
    shutdown: impl Future<Output = StopMode>,
) -> anyhow::Result<()> {
    let decorate = move |inner| AnySink::Faulty(Box::new(FaultySink { inner, faults }));
    crate::service::run_decorated(config, options, shutdown, decorate).await
}
