//! One request's path through `kdedup serve`: bounds, key, fingerprint, claim,
//! then forward-record-complete (the first request), replay (a retry), or a
//! problem (another request under the key, or the key still in progress).
//!
//! Claim semantics are the store's ([`DedupStore::claim`] and [`crate::store::decide`]):
//! each request claims at a position of its own, so a concurrent request with
//! the same key sees `InFlight` and waits; a lapsed lease is taken over and
//! the upstream is told (`Idempotency-Possible-Repeat: true`), as the Kafka
//! path marks its possible repeats.

use std::collections::HashMap;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::Engine as _;
use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::http::request::Parts;
use hyper::http::{HeaderMap, HeaderName, HeaderValue, Response, StatusCode};
use hyper::Request;
use sha2::{Digest, Sha256};

use super::key::{self, hex};
use crate::config::{MissingKey, On5xx, ServeConfig};
use crate::event::{EventKey, Fingerprint, Position};
use crate::metrics::ServeMetrics;
use crate::store::{now_ms, Claim, ClaimRequest, DedupStore, EffectResponse, Store};

/// Sent on every replayed answer.
pub const REPLAYED: &str = "idempotent-replayed";
/// Sent to the upstream when an earlier attempt under the key may have run.
pub const POSSIBLE_REPEAT: &str = "idempotency-possible-repeat";
/// On an answer whose body was too large to keep: `sha256=<hex>; bytes=<n>` of the original.
pub const BODY_OMITTED: &str = "idempotent-body-omitted";

/// Headers that belong to one hop and are never forwarded.
const HOP_BY_HOP: [&str; 9] = [
    "connection",
    "keep-alive",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "host",
];

/// What serve answers and how it counts it.
struct Answer {
    outcome: &'static str,
    response: Response<Full<Bytes>>,
}

/// The upstream's answer, its body read (up to `max_response_bytes`).
struct Upstream {
    status: StatusCode,
    headers: HeaderMap,
    body: Bytes,
    /// SHA-256 and length of the whole body, when it was larger than what was kept in `body`.
    omitted: Option<(String, u64)>,
}

/// Why no answer came from the upstream.
enum Failed {
    /// The request certainly did not reach it (connection refused, DNS): safe to release.
    NotSent(String),
    /// It may have run (a timeout or a reset after sending): the key stays claimed.
    Unknown(String),
}

/// The shared state of every connection.
pub(crate) struct Proxy {
    config: Arc<ServeConfig>,
    store: Store,
    metrics: ServeMetrics,
    client: reqwest::Client,
    scope: Arc<str>,
    /// This process's claimant "topic"; each request takes the next offset of it.
    instance: Arc<str>,
    next: AtomicI64,
    /// Requests of this process waiting for a key in flight: woken when this
    /// process's own request under the key settles, instead of at their next poll
    /// (the poll stays, for owners in other processes).
    waiters: Mutex<HashMap<EventKey, Arc<tokio::sync::Notify>>>,
}

/// A waiter's registration, dropped from the map by the last waiter to leave.
struct Waiting<'a> {
    waiters: &'a Mutex<HashMap<EventKey, Arc<tokio::sync::Notify>>>,
    key: EventKey,
    notify: Arc<tokio::sync::Notify>,
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        let mut map = self.waiters.lock().unwrap_or_else(|e| e.into_inner());
        // Ours and the map's: nobody else waits, and no owner here has woken it yet.
        if map.get(&self.key).is_some_and(|n| Arc::ptr_eq(n, &self.notify) && Arc::strong_count(n) == 2) {
            map.remove(&self.key);
        }
    }
}

impl Proxy {
    pub(crate) fn new(config: Arc<ServeConfig>, store: Store, metrics: ServeMetrics) -> anyhow::Result<Proxy> {
        let client = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .timeout(config.upstream_timeout)
            .connect_timeout(config.upstream_timeout.min(Duration::from_secs(5)))
            .build()?;
        let instance = Arc::from(format!("kdedup-serve/{:016x}", rand::random::<u64>()));
        Ok(Proxy {
            scope: Arc::from(config.scope.as_str()),
            config,
            store,
            metrics,
            client,
            instance,
            next: AtomicI64::new(0),
            waiters: Mutex::default(),
        })
    }

    /// Answers one request, counting it and the time serve added to it.
    pub(crate) async fn handle(&self, request: Request<Incoming>) -> Response<Full<Bytes>> {
        let started = Instant::now();
        let mut upstream_time = Duration::ZERO;
        let answer = self.answer(request, &mut upstream_time).await;
        self.metrics.request(answer.outcome, started.elapsed().saturating_sub(upstream_time).as_secs_f64());
        answer.response
    }

    async fn answer(&self, request: Request<Incoming>, upstream_time: &mut Duration) -> Answer {
        let c = &self.config;
        let (parts, body) = request.into_parts();
        let too_large = || {
            let detail = format!("request bodies are limited to {} bytes", c.max_body_bytes);
            refused(StatusCode::PAYLOAD_TOO_LARGE, "body_too_large", &detail)
        };
        // A Content-Length past the bound is refused before a byte of the body is read.
        if hyper::body::Body::size_hint(&body).lower() > c.max_body_bytes as u64 {
            return too_large();
        }
        let body = match tokio::time::timeout(c.client_timeout, Limited::new(body, c.max_body_bytes).collect()).await {
            Ok(Ok(collected)) => collected.to_bytes(),
            Ok(Err(e)) if e.downcast_ref::<http_body_util::LengthLimitError>().is_some() => return too_large(),
            Ok(Err(_)) => return refused(StatusCode::BAD_REQUEST, "body_unreadable", "the request body broke off"),
            Err(_) => {
                let detail = format!("the body did not arrive within {} ms", c.client_timeout.as_millis());
                return refused(StatusCode::REQUEST_TIMEOUT, "body_timeout", &detail);
            }
        };
        if !c.methods.iter().any(|m| m == parts.method.as_str()) {
            return self.pass(parts, body, upstream_time).await;
        }
        let Some(value) = parts.headers.get(c.key_header.as_str()) else {
            return match c.missing_key {
                MissingKey::Pass => self.pass(parts, body, upstream_time).await,
                MissingKey::Refuse => {
                    let detail = format!("{} requests must carry the {} header", parts.method, c.key_header);
                    refused(StatusCode::BAD_REQUEST, "missing_key", &detail)
                }
            };
        };
        let raw = value.as_bytes();
        if raw.is_empty() || raw.len() > c.max_key_bytes {
            let detail = format!("the {} header must hold 1 to {} bytes", c.key_header, c.max_key_bytes);
            return refused(StatusCode::BAD_REQUEST, "invalid_key", &detail);
        }
        let client: &[u8] = match &c.client_header {
            None => b"",
            Some(h) => match parts.headers.get(h.as_str()) {
                Some(v) => v.as_bytes(),
                None => {
                    let detail = format!("keyed requests must carry the {h} header (keys are scoped per client)");
                    return refused(StatusCode::BAD_REQUEST, "missing_client", &detail);
                }
            },
        };
        let key = key::stored_key(&self.scope, client, raw);
        let fingerprint = key::fingerprint(&parts, &c.fingerprint_headers, &body);
        self.keyed(parts, body, key, fingerprint, upstream_time).await
    }

    /// A keyed request: claim, then run, replay, wait or refuse.
    async fn keyed(
        &self,
        parts: Parts,
        body: Bytes,
        key: EventKey,
        fingerprint: Fingerprint,
        upstream_time: &mut Duration,
    ) -> Answer {
        let position =
            Position { topic: self.instance.clone(), partition: 0, offset: self.next.fetch_add(1, Ordering::Relaxed) };
        let deadline = Instant::now() + self.config.wait;
        let mut pause = Duration::from_millis(1);
        let mut waiting: Option<Waiting<'_>> = None;
        loop {
            let request = ClaimRequest { key: key.clone(), fingerprint, position: position.clone() };
            // One instant for the claim and, on a duplicate, the read of its answer: read at a later one, a key
            // whose TTL ran out in between was a duplicate without an answer (a 502 at the TTL's edge).
            let now = now_ms();
            let claim = match self.store.claim(vec![request], now).await.map(|mut v| v.pop()) {
                Ok(Some(claim)) => claim,
                Ok(None) => return self.store_failed("claim", "the store answered no claim"),
                Err(e) => return self.store_failed("claim", &e.to_string()),
            };
            match claim {
                Claim::New(acquired) => {
                    drop(waiting);
                    let answer =
                        self.first(parts, body, key.clone(), position, acquired.may_repeat(), upstream_time).await;
                    if let Some(notify) = self.waiters.lock().unwrap_or_else(|e| e.into_inner()).remove(&key) {
                        notify.notify_waiters();
                    }
                    return answer;
                }
                Claim::Duplicate { .. } => return self.replay_recorded(key, now).await,
                Claim::Conflict { .. } => {
                    return problem(
                        "conflict",
                        StatusCode::UNPROCESSABLE_ENTITY,
                        "key_reused",
                        "this idempotency key was used with another request (method, path, body or headers differ)",
                    )
                }
                Claim::InFlight { lease_until_ms, .. } => {
                    if Instant::now() + pause > deadline {
                        return self.in_progress(lease_until_ms);
                    }
                    let waiting = waiting.get_or_insert_with(|| {
                        let mut map = self.waiters.lock().unwrap_or_else(|e| e.into_inner());
                        let notify = map.entry(key.clone()).or_default().clone();
                        Waiting { waiters: &self.waiters, key: key.clone(), notify }
                    });
                    let notified = waiting.notify.notified();
                    tokio::pin!(notified);
                    notified.as_mut().enable();
                    tokio::select! {
                        () = notified => {}
                        () = tokio::time::sleep(pause) => pause = (pause * 2).min(Duration::from_millis(50)),
                    }
                }
            }
        }
    }

    /// A duplicate: the first request's recorded answer, replayed; read as the key stood at `now`, its claim's instant.
    async fn replay_recorded(&self, key: EventKey, now: u64) -> Answer {
        match self.store.response(key, now).await {
            Ok(Some(recorded)) => Answer { outcome: "replayed", response: replay(&recorded) },
            Ok(None) => problem(
                "upstream_error",
                StatusCode::BAD_GATEWAY,
                "no_recorded_answer",
                "the key's first request completed, but its answer was not kept",
            ),
            Err(e) => self.store_failed("response", &e.to_string()),
        }
    }

    /// The wait for another request with the key ran out: 409 with a `Retry-After`.
    fn in_progress(&self, lease_until_ms: u64) -> Answer {
        // The owner is alive (it renews its lease) and usually done soon: suggest the
        // wait bound, never later than its lease could be taken over.
        let lease_left = lease_until_ms.saturating_sub(now_ms()).div_ceil(1000);
        let secs = (self.config.wait.as_millis() as u64).div_ceil(1000).min(lease_left).max(1);
        let mut answer = problem(
            "in_progress",
            StatusCode::CONFLICT,
            "in_progress",
            "a request with this idempotency key is still in progress; retry later",
        );
        answer.response.headers_mut().insert("retry-after", HeaderValue::from(secs));
        answer
    }

    /// The claim is ours: forward with the lease renewed, then record and complete,
    /// or release when the request certainly did not run.
    async fn first(
        &self,
        parts: Parts,
        body: Bytes,
        key: EventKey,
        position: Position,
        possible_repeat: bool,
        upstream_time: &mut Duration,
    ) -> Answer {
        let held = vec![(key.clone(), position.clone())];
        let heartbeat = {
            let (store, held, metrics) = (self.store.clone(), held.clone(), self.metrics.clone());
            let every = (self.config.retention.lease / 3).max(Duration::from_millis(100));
            tokio::spawn(async move {
                loop {
                    tokio::time::sleep(every).await;
                    if let Err(e) = store.renew(held.clone(), now_ms()).await {
                        metrics.store_error("renew");
                        tracing::warn!(error = %e, "lease renewal failed; retrying at the next beat");
                    }
                }
            })
        };
        let started = Instant::now();
        let result = self.forward(&parts, body, possible_repeat).await;
        *upstream_time = started.elapsed();
        self.metrics.upstream_seconds.observe(upstream_time.as_secs_f64());
        heartbeat.abort();
        let upstream = match result {
            Ok(upstream) => upstream,
            Err(Failed::NotSent(e)) => {
                if let Err(e) = self.store.release(held).await {
                    self.metrics.store_error("release");
                    tracing::warn!(error = %e, "releasing the claim of a request that never reached the upstream failed; it is taken over once its lease lapses");
                }
                tracing::warn!(error = %e, "the upstream could not be reached; claim released");
                return problem(
                    "upstream_error",
                    StatusCode::BAD_GATEWAY,
                    "upstream_unreachable",
                    "the upstream could not be reached; the request did not run and may be retried",
                );
            }
            Err(Failed::Unknown(e)) => {
                tracing::warn!(error = %e, "the upstream's outcome is unknown; the key stays claimed until its lease lapses, and the next attempt is marked as a possible repeat");
                return problem("upstream_error", StatusCode::GATEWAY_TIMEOUT, "outcome_unknown", "the upstream did not answer in time; the request may have run. A retry after the lease is forwarded marked Idempotency-Possible-Repeat");
            }
        };
        if upstream.status.is_server_error() && self.config.on_5xx == On5xx::Release {
            if let Err(e) = self.store.release(held).await {
                self.metrics.store_error("release");
                tracing::warn!(error = %e, "releasing the claim after an upstream 5xx failed; it is taken over once its lease lapses");
            }
            return Answer { outcome: "upstream_error", response: self.respond(&upstream) };
        }
        let recorded = self.recorded(&upstream);
        let settled = match self.store.record(vec![(key.clone(), position.clone(), recorded)]).await {
            Ok(kept) if kept.first() == Some(&true) => {
                self.store.complete(held, now_ms()).await.map(|done| done.first() == Some(&true))
            }
            Ok(_) => Ok(false),
            Err(e) => Err(e),
        };
        match settled {
            Ok(true) => {}
            Ok(false) => tracing::warn!(
                "the claim was lost while the upstream worked (its lease lapsed); the answer is not kept"
            ),
            Err(e) => {
                self.metrics.store_error("record");
                tracing::warn!(error = %e, "recording the upstream's answer failed; the key stays claimed and the next attempt after its lease is marked as a possible repeat")
            }
        }
        Answer { outcome: "first", response: self.respond(&upstream) }
    }

    /// No key, or a method serve does not guard: a plain proxy.
    async fn pass(&self, parts: Parts, body: Bytes, upstream_time: &mut Duration) -> Answer {
        let started = Instant::now();
        let result = self.forward(&parts, body, false).await;
        *upstream_time = started.elapsed();
        self.metrics.upstream_seconds.observe(upstream_time.as_secs_f64());
        match result {
            Ok(upstream) => Answer { outcome: "passed_through", response: self.respond(&upstream) },
            Err(Failed::NotSent(_)) => problem(
                "upstream_error",
                StatusCode::BAD_GATEWAY,
                "upstream_unreachable",
                "the upstream could not be reached",
            ),
            Err(Failed::Unknown(_)) => problem(
                "upstream_error",
                StatusCode::GATEWAY_TIMEOUT,
                "outcome_unknown",
                "the upstream did not answer in time",
            ),
        }
    }

    async fn forward(&self, parts: &Parts, body: Bytes, possible_repeat: bool) -> Result<Upstream, Failed> {
        let path = parts.uri.path_and_query().map(|p| p.as_str()).unwrap_or("/");
        let url = format!("{}{}", self.config.upstream, path);
        let mut headers = HeaderMap::new();
        for (name, value) in &parts.headers {
            if !is_hop_by_hop(name) && name != "content-length" {
                headers.append(name.clone(), value.clone());
            }
        }
        if possible_repeat {
            headers.insert(POSSIBLE_REPEAT, HeaderValue::from_static("true"));
        }
        let request = self.client.request(parts.method.clone(), url).headers(headers).body(body);
        let answered = self.read(request).await;
        self.metrics.upstream_answered(match &answered {
            Ok(upstream) => Ok(upstream.status.as_u16()),
            Err(failed) => Err(matches!(failed, Failed::NotSent(_))),
        });
        answered
    }

    /// Sends the request and reads its answer, up to `max_response_bytes` kept.
    async fn read(&self, request: reqwest::RequestBuilder) -> Result<Upstream, Failed> {
        let mut response = request.send().await.map_err(|e| {
            if e.is_connect() {
                Failed::NotSent(e.without_url().to_string())
            } else {
                Failed::Unknown(e.without_url().to_string())
            }
        })?;
        let (status, headers) = (response.status(), response.headers().clone());
        let limit = self.config.max_response_bytes;
        let (mut kept, mut hash, mut total) = (Vec::new(), Sha256::new(), 0u64);
        while let Some(chunk) = response.chunk().await.map_err(|e| Failed::Unknown(e.without_url().to_string()))? {
            hash.update(&chunk);
            total += chunk.len() as u64;
            if kept.len() + chunk.len() <= limit {
                kept.extend_from_slice(&chunk);
            }
        }
        let omitted = (total as usize > kept.len()).then(|| (hex(&hash.finalize()), total));
        let body = if omitted.is_some() { Bytes::new() } else { Bytes::from(kept) };
        Ok(Upstream { status, headers, body, omitted })
    }

    /// What the store keeps of an answer: status, `content-type` and the
    /// configured headers, and the body up to `record_body_bytes` (else its hash).
    fn recorded(&self, upstream: &Upstream) -> EffectResponse {
        let mut headers = Vec::new();
        for (name, value) in &upstream.headers {
            let wanted = name == "content-type" || self.config.recorded_headers.iter().any(|h| h == name.as_str());
            if let (true, Ok(value)) = (wanted, value.to_str()) {
                headers.push((name.as_str().to_string(), value.to_string()));
            }
        }
        let (body_sha256, body_bytes) = match &upstream.omitted {
            Some((sha, n)) => (sha.clone(), *n),
            None => (hex(&Sha256::digest(&upstream.body)), upstream.body.len() as u64),
        };
        let keep = upstream.omitted.is_none() && upstream.body.len() <= self.config.record_body_bytes;
        EffectResponse {
            status: upstream.status.as_u16(),
            body_sha256,
            body_bytes,
            excerpt: String::new(),
            at_ms: now_ms(),
            attempts: 1,
            headers,
            body_base64: keep.then(|| base64::engine::general_purpose::STANDARD.encode(&upstream.body)),
        }
    }

    /// The upstream's answer to the client that caused it: every end-to-end header.
    fn respond(&self, upstream: &Upstream) -> Response<Full<Bytes>> {
        let mut response = Response::new(Full::new(upstream.body.clone()));
        *response.status_mut() = upstream.status;
        for (name, value) in &upstream.headers {
            if !is_hop_by_hop(name) && name != "content-length" {
                response.headers_mut().append(name.clone(), value.clone());
            }
        }
        if let Some((sha, n)) = &upstream.omitted {
            if let Ok(v) = HeaderValue::from_str(&format!("sha256={sha}; bytes={n}")) {
                response.headers_mut().insert(BODY_OMITTED, v);
            }
        }
        response
    }
}

/// A stored answer, replayed: its status, kept headers and body, marked
/// `Idempotent-Replayed: true`. A body too large to keep is replayed empty with
/// `Idempotent-Body-Omitted: sha256=…; bytes=…` (the client fetches the resource
/// itself; the request is not run again).
fn replay(recorded: &EffectResponse) -> Response<Full<Bytes>> {
    let body = recorded
        .body_base64
        .as_deref()
        .and_then(|b| base64::engine::general_purpose::STANDARD.decode(b).ok())
        .map(Bytes::from);
    let omitted = body.is_none();
    let mut response = Response::new(Full::new(body.unwrap_or_default()));
    *response.status_mut() = StatusCode::from_u16(recorded.status).unwrap_or(StatusCode::BAD_GATEWAY);
    let headers = response.headers_mut();
    for (name, value) in &recorded.headers {
        if let (Ok(name), Ok(value)) = (HeaderName::from_bytes(name.as_bytes()), HeaderValue::from_str(value)) {
            headers.append(name, value);
        }
    }
    headers.insert(REPLAYED, HeaderValue::from_static("true"));
    if omitted {
        if let Ok(v) = HeaderValue::from_str(&format!("sha256={}; bytes={}", recorded.body_sha256, recorded.body_bytes))
        {
            headers.insert(BODY_OMITTED, v);
        }
    }
    response
}

fn is_hop_by_hop(name: &HeaderName) -> bool {
    HOP_BY_HOP.contains(&name.as_str())
}

/// An RFC 9457 problem (`application/problem+json`), with `code` naming the case.
fn problem(outcome: &'static str, status: StatusCode, code: &str, detail: &str) -> Answer {
    let body = serde_json::json!({
        "type": "about:blank",
        "title": status.canonical_reason().unwrap_or("Error"),
        "status": status.as_u16(),
        "code": code,
        "detail": detail,
    });
    let mut response = Response::new(Full::new(Bytes::from(body.to_string())));
    *response.status_mut() = status;
    response.headers_mut().insert("content-type", HeaderValue::from_static("application/problem+json"));
    Answer { outcome, response }
}

fn refused(status: StatusCode, code: &str, detail: &str) -> Answer {
    problem("refused", status, code, detail)
}

impl Proxy {
    /// A store call a request depends on failed: counted, and answered 503.
    fn store_failed(&self, op: &'static str, error: &str) -> Answer {
        self.metrics.store_error(op);
        store_failed(error)
    }
}

fn store_failed(error: &str) -> Answer {
    tracing::warn!(%error, "the store failed; answering 503");
    let mut answer = problem(
        "refused",
        StatusCode::SERVICE_UNAVAILABLE,
        "store_unavailable",
        "the idempotency store is unavailable; the request did not run",
    );
    answer.response.headers_mut().insert("retry-after", HeaderValue::from_static("1"));
    answer
}
