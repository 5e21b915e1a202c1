//! `kdedup serve`: the API edge. A reverse proxy in front of an HTTP API that
//! runs each request carrying an `Idempotency-Key` once, on the same store and
//! claim semantics as the Kafka path, and answers retries with the stored response.
//!
//! - `key`: the stored key (hashed; scoped per client) and the request's fingerprint.
//! - `proxy`: one request's path: bounds, claim, forward, record, complete; replay,
//!   422 for a reused key, wait then 409 for a key in progress elsewhere.
//! - here: the listener with its bounds on heads and slow clients, sweeps, and the
//!   drain on shutdown.
//!
//! Failures never run a request twice unknowingly: a request that certainly did
//! not reach the upstream (connection refused) releases its claim; one whose
//! outcome is unknown (a timeout after sending) keeps it until its lease lapses,
//! and the attempt that takes it over is forwarded with `Idempotency-Possible-Repeat: true`.
//! An answered 5xx is recorded like any answer by default (Stripe's rule: a 5xx
//! does not say the work did not happen), or released with `on_5xx = "release"`.

pub mod key;
mod proxy;

use std::convert::Infallible;
use std::future::Future;
use std::sync::Arc;

use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;

pub use proxy::{BODY_OMITTED, POSSIBLE_REPEAT, REPLAYED};

use crate::config::ServeConfig;
use crate::metrics::ServeMetrics;
use crate::store::{now_ms, DedupStore, Store};

/// Serves `listener` until `shutdown` resolves, then stops accepting, lets
/// requests in progress finish (up to `drain_timeout`), and syncs the store.
/// `/readyz` (on the metrics endpoint) answers 200 from the first accept until the drain.
pub async fn run(
    config: ServeConfig,
    store: Store,
    metrics: ServeMetrics,
    listener: TcpListener,
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<()> {
    let config = Arc::new(config);
    let proxy = Arc::new(proxy::Proxy::new(config.clone(), store.clone(), metrics.clone())?);
    let sweeper = (!store.expires_by_itself()).then(|| {
        let (store, every, metrics) = (store.clone(), config.retention.sweep_interval, metrics.clone());
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(every).await;
                if let Err(e) = store.sweep(now_ms()).await {
                    metrics.store_error("sweep");
                    tracing::warn!(error = %e, "sweeping expired keys failed; retrying at the next interval");
                }
            }
        })
    });
    let graceful = GracefulShutdown::new();
    let mut shutdown = std::pin::pin!(shutdown);
    metrics.set_ready(true);
    tracing::info!(listen = %listener.local_addr()?, upstream = %config.upstream, store = store.kind(), "serving");
    loop {
        let (stream, _) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    // Out of file descriptors, most likely: pause rather than spin.
                    tracing::warn!(error = %e, "accept failed; pausing 50 ms");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        let _ = stream.set_nodelay(true);
        let proxy = proxy.clone();
        let service = service_fn(move |request| {
            let proxy = proxy.clone();
            async move { Ok::<_, Infallible>(proxy.handle(request).await) }
        });
        // Bounds on the head: its size (431 past it) and the time to send it
        // (the connection is closed), so slow or huge heads cost a bounded buffer.
        let connection = http1::Builder::new()
            .timer(TokioTimer::new())
            .header_read_timeout(config.client_timeout)
            .max_buf_size(config.max_header_bytes)
            .serve_connection(TokioIo::new(stream), service);
        let connection = graceful.watch(connection);
        tokio::spawn(async move {
            let _ = connection.await;
        });
    }
    metrics.set_ready(false);
    drop(listener);
    tracing::info!(drain_timeout_ms = config.drain_timeout.as_millis() as u64, "draining requests in progress");
    if tokio::time::timeout(config.drain_timeout, graceful.shutdown()).await.is_err() {
        tracing::warn!(
            "requests still in progress at the drain timeout; their keys stay claimed until their leases lapse"
        );
    }
    if let Some(sweeper) = sweeper {
        sweeper.abort();
    }
    store.sync()?;
    Ok(())
}
