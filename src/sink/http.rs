//! The HTTP sink: each new event becomes one request to an endpoint that
//! dedups by an idempotency key (Stripe's contract: a repeated key is
//! answered with the stored response, not run again).
//!
//! - The key ([`idempotency_key`]) is a function of (scope, event ID) only,
//!   never of the position: a retry, a replay, a resumed claim after a crash
//!   or another member all send the same key, so the endpoint's own dedup
//!   closes the window kdedup leaves (a crash between the call and the
//!   completion repeats the call, with the same key).
//! - Retries happen here, not in the pipeline: an answer the outcome classes
//!   ([`HttpSinkConfig::outcome`]) call `retry`, a timeout or a broken
//!   connection is tried again after an exponential backoff with jitter (or
//!   the `Retry-After` the endpoint asked for, if longer), until the retry
//!   budget is spent; then the record is dead-lettered with the last answer.
//!   The claim's lease is renewed meanwhile by the partition's heartbeat. A
//!   wait ends when the partition stops ([`super::stopping`]): the effect is
//!   then left unfinished for the next owner, not dead-lettered.
//! - Requests of one partition run up to `max_in_flight` at once; effects of
//!   one key run one after another, in input order.
//! - Records that cannot become a request (a URL template header missing or
//!   not UTF-8, a payload over `max_request_bytes`, an invalid content type)
//!   are dead-lettered with that reason: hostile input never panics.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use futures::StreamExt;
use rdkafka::message::Header;
use reqwest::header::{HeaderMap, HeaderName, HeaderValue, CONTENT_TYPE};
use sha2::{Digest, Sha256};
use tracing::warn;

use crate::backoff::Backoff;
use crate::config::{HttpOutcome, HttpSinkConfig};
use crate::error::{HttpError, SinkError};
use crate::event::{hex, EventKey};
use crate::metrics::Metrics;
use crate::values::{now_ms, EffectResponse};

use super::kafka::{headers, source_headers, OutRecord};
use super::{Delivered, Effect, KafkaWriter, Stopping};

/// Bytes of a response body kept as its excerpt (on the claim row, in dead letters).
pub const EXCERPT_BYTES: usize = 512;
/// Bytes of a response body read and hashed; the rest is not read.
pub const MAX_RESPONSE_BYTES: usize = 1 << 20;
/// The longest `Retry-After` honoured; a longer one is capped (the budget still applies).
const MAX_RETRY_AFTER: Duration = Duration::from_secs(3_600);

/// The `Idempotency-Key` of an event: `kdedup-` and the SHA-256 (hex) of the
/// length-prefixed scope and the event ID. Stable across processes, restarts
/// and replays; two scopes never share a key; 71 ASCII characters, within
/// Stripe's 255.
///
/// ```
/// use kdedup::{idempotency_key, EventKey};
///
/// let key = EventKey { scope: "payments".into(), id: b"evt-1".to_vec() };
/// assert_eq!(idempotency_key(&key), idempotency_key(&key.clone()));
/// assert!(idempotency_key(&key).starts_with("kdedup-"));
/// let other = EventKey { scope: "refunds".into(), id: b"evt-1".to_vec() };
/// assert_ne!(idempotency_key(&key), idempotency_key(&other));
/// ```
pub fn idempotency_key(key: &EventKey) -> String {
    let mut h = Sha256::new();
    h.update((key.scope.len() as u32).to_be_bytes());
    h.update(key.scope.as_bytes());
    h.update(&key.id);
    format!("kdedup-{}", hex(&h.finalize()))
}

/// One attempt's result, as the retry loop sees it.
enum Attempt {
    Answered {
        status: u16,
        retry_after: Option<Duration>,
        body: Body,
    },
    /// No usable answer; `may_have_landed`: the request may have reached the
    /// endpoint (anything but a failure to connect).
    Failed {
        why: String,
        may_have_landed: bool,
    },
}

/// The answer that settled an effect, for `results_topic`: `done`,
/// `conflict`, `dead_letter`, or `gave_up` (the last answer before the budget ran out).
struct Answer {
    outcome: &'static str,
    response: EffectResponse,
}

/// A response body as read: bounded.
struct Body {
    sha256: String,
    bytes: u64,
    excerpt: String,
}

/// What a record's request is, once built (the URL and headers checked).
struct Prepared {
    url: reqwest::Url,
    headers: HeaderMap,
    body: Vec<u8>,
}

/// The endpoint, with the request shape and the outcome classes.
pub struct HttpSink {
    /// `kdedup_http_requests_total`, by answer.
    requests: prometheus::IntCounterVec,
    /// `[sink.http] results_topic`, its partition count, and the producer that writes it.
    results: Option<(KafkaWriter, String, i32)>,
    client: reqwest::Client,
    config: HttpSinkConfig,
    method: reqwest::Method,
    static_headers: HeaderMap,
    idempotency_header: HeaderName,
}

impl HttpSink {
    /// Builds the client (rustls with the system's roots; no redirects followed:
    /// a redirected POST would lose its body or repeat it elsewhere).
    pub fn new(config: &HttpSinkConfig, metrics: &Metrics) -> Result<HttpSink, SinkError> {
        let bad = |m: String| SinkError::Http(HttpError::Request(m));
        let method = reqwest::Method::from_bytes(config.method.as_bytes())
            .map_err(|_| bad(format!("[sink.http] method {} is not a method", config.method)))?;
        let mut static_headers = HeaderMap::new();
        for (name, value) in &config.headers {
            let name = HeaderName::from_bytes(name.as_bytes())
                .map_err(|_| bad(format!("[sink.http.headers] {name} is not a header name")))?;
            // Never the value in the message: it may be a credential.
            let mut value = HeaderValue::from_str(value.expose())
                .map_err(|_| bad(format!("[sink.http.headers] {name} has a value that is not a header value")))?;
            value.set_sensitive(true);
            static_headers.append(name, value);
        }
        let idempotency_header = HeaderName::from_bytes(config.idempotency_header.as_bytes()).map_err(|_| {
            bad(format!("[sink.http] idempotency_header {} is not a header name", config.idempotency_header))
        })?;
        let client = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .connect_timeout(config.timeout)
            .build()
            .map_err(|e| bad(format!("cannot build the HTTP client: {e}")))?;
        Ok(HttpSink {
            requests: metrics.http_requests.clone(),
            results: None,
            client,
            config: config.clone(),
            method,
            static_headers,
            idempotency_header,
        })
    }

    /// Writes every answer to `[sink.http] results_topic`, when one is configured;
    /// `partitions`: that topic's partition count.
    pub fn with_results(mut self, writer: KafkaWriter, partitions: i32) -> HttpSink {
        self.results = self.config.results_topic.clone().map(|topic| (writer, topic, partitions.max(1)));
        self
    }

    /// The results topic and the partition of it an input partition's answers go to
    /// (`p mod N`, as the Kafka sink's `partitioning = "source"`), so that its next
    /// owner can read them back ([`crate::reconcile`]); `None` without a results topic.
    pub fn results_log(&self, input_partition: i32) -> Option<(&str, i32)> {
        self.results.as_ref().map(|(_, topic, n)| (topic.as_str(), input_partition.rem_euclid(*n)))
    }

    /// One record per answer, keyed by event ID, the source position and the
    /// outcome in headers, the answer as JSON, on the input partition's own
    /// partition of the topic. A write that fails turns its effect's result
    /// into a retriable error: the effect is asked again (the same key; the
    /// endpoint answers from its store), so every done effect's answer is in
    /// the topic before its offset is committed. A done effect's result carries
    /// where its answer landed: the commit's mark for reconciliation.
    async fn write_results(
        &self,
        batch: &[Effect<'_>],
        results: &mut [Result<Delivered, SinkError>],
        answers: &[Option<Answer>],
    ) {
        let Some((writer, topic, partitions)) = &self.results else { return };
        let (index, payloads): (Vec<usize>, Vec<Vec<u8>>) = answers
            .iter()
            .enumerate()
            .filter_map(|(i, a)| {
                a.as_ref().map(|a| {
                    let json = serde_json::json!({
                        "outcome": a.outcome,
                        "event_id": batch[i].envelope.key.display_id(),
                        "idempotency_key": idempotency_key(&batch[i].envelope.key),
                        "response": &a.response,
                    });
                    (i, serde_json::to_vec(&json).expect("JSON of strings and numbers"))
                })
            })
            .unzip();
        if index.is_empty() {
            return;
        }
        let out = index
            .iter()
            .zip(&payloads)
            .map(|(&i, payload)| {
                let e = batch[i].envelope;
                let outcome = answers[i].as_ref().map_or("", |a| a.outcome);
                OutRecord {
                    partition: Some(e.record.position.partition.rem_euclid(*partitions)),
                    source: &e.record.position,
                    key: Some(&e.key.id),
                    payload: Some(payload),
                    headers: source_headers(&e.record, &e.key.scope)
                        .insert(Header { key: headers::EVENT_ID, value: Some(e.key.id.as_slice()) })
                        .insert(Header { key: headers::OUTCOME, value: Some(outcome.as_bytes()) }),
                }
            })
            .collect();
        for (&i, written) in index.iter().zip(writer.write_all(topic, out).await) {
            match (written, &mut results[i]) {
                (Ok(landed), Ok(delivered)) => delivered.mark = Some(landed),
                (Ok(_), Err(_)) => {}
                (Err(e), result) => {
                    *result = Err(SinkError::Http(HttpError::Results { topic: topic.clone(), message: e.to_string() }))
                }
            }
        }
    }
}

impl super::Sink for HttpSink {
    fn kind(&self) -> &'static str {
        "http"
    }

    /// Runs each effect through its request and retries; one result per effect, in order.
    async fn deliver(&self, batch: &[Effect<'_>], stop: &Stopping) -> Vec<Result<Delivered, SinkError>> {
        // Effects of one key run in order, in one chain; chains run up to max_in_flight at once.
        let mut chains: Vec<Vec<usize>> = Vec::new();
        let mut chain_of: HashMap<u128, usize> = HashMap::new();
        for (i, e) in batch.iter().enumerate() {
            let c = *chain_of.entry(e.envelope.digest).or_insert_with(|| {
                chains.push(Vec::new());
                chains.len() - 1
            });
            chains[c].push(i);
        }
        let mut results: Vec<Option<Result<Delivered, SinkError>>> = (0..batch.len()).map(|_| None).collect();
        let mut answers: Vec<Option<Answer>> = (0..batch.len()).map(|_| None).collect();
        let mut runs = futures::stream::iter(chains.into_iter().map(|chain| async move {
            let mut out = Vec::with_capacity(chain.len());
            for i in chain {
                out.push((i, self.deliver_one(&batch[i], stop).await));
            }
            out
        }))
        .buffer_unordered(self.config.max_in_flight.get());
        while let Some(done) = runs.next().await {
            for (i, (result, answer)) in done {
                results[i] = Some(result);
                answers[i] = answer;
            }
        }
        drop(runs);
        let mut results: Vec<Result<Delivered, SinkError>> =
            results.into_iter().map(|r| r.expect("every effect is in exactly one chain")).collect();
        self.write_results(batch, &mut results, &answers).await;
        results
    }
}

/// An answer that settles the effect (`outcome` is not a retry): done, a conflict, or
/// refused; with the answer, for `results_topic`.
fn settled(
    outcome: HttpOutcome,
    response: EffectResponse,
    may_have_landed: bool,
) -> (Result<Delivered, SinkError>, Option<Answer>) {
    let (status, excerpt) = (response.status, response.excerpt.clone());
    let (name, result) = match outcome {
        HttpOutcome::Done => ("done", Ok(Delivered { mark: None, response: Some(response.clone()) })),
        HttpOutcome::Conflict => {
            ("conflict", Err(SinkError::Http(HttpError::Conflict { status, excerpt, may_have_landed })))
        }
        _ => ("dead_letter", Err(SinkError::Http(HttpError::Refused { status, excerpt, may_have_landed }))),
    };
    (result, Some(Answer { outcome: name, response }))
}

impl HttpSink {
    /// One effect through its attempts: the result, and the answer that settled
    /// it (for `results_topic`), with its outcome's name.
    async fn deliver_one(
        &self,
        effect: &Effect<'_>,
        stop: &Stopping,
    ) -> (Result<Delivered, SinkError>, Option<Answer>) {
        let mut prepared = match self.prepare(effect) {
            Ok(p) => p,
            Err(m) => return (Err(SinkError::Http(HttpError::Request(m))), None),
        };
        let started = Instant::now();
        let mut backoff = Backoff::new(self.config.backoff_initial, self.config.backoff_max);
        let mut attempts = 0u32;
        let mut last_answer = None;
        // Once an attempt may have been applied, every later one is marked.
        let mut may_have_landed = false;
        loop {
            attempts += 1;
            if may_have_landed {
                prepared
                    .headers
                    .insert(HeaderName::from_static(headers::POSSIBLE_REPEAT), HeaderValue::from_static("true"));
            }
            let (last, retry_after) = match self.attempt(&prepared).await {
                Attempt::Answered { status, retry_after, body } => {
                    let response = EffectResponse {
                        status,
                        body_sha256: body.sha256,
                        body_bytes: body.bytes,
                        excerpt: body.excerpt,
                        at_ms: now_ms(),
                        attempts,
                        headers: Vec::new(),
                        body_base64: None,
                    };
                    // A 5xx may come after the work was done; a 409 or 429 says it was not.
                    may_have_landed |= status >= 500;
                    let outcome = self.config.outcome(status);
                    if outcome == HttpOutcome::Retry {
                        let last = format!("HTTP {status}, body: {:?}", response.excerpt);
                        last_answer = Some(Answer { outcome: "gave_up", response });
                        (last, retry_after)
                    } else {
                        return settled(outcome, response, may_have_landed);
                    }
                }
                Attempt::Failed { why, may_have_landed: landed } => {
                    may_have_landed |= landed;
                    (why, None)
                }
            };
            // Equal jitter, so retries of many records do not arrive at the endpoint in step.
            let jittered = backoff.wait();
            let wait = retry_after.map_or(jittered, |r| r.min(MAX_RETRY_AFTER).max(jittered));
            let elapsed = started.elapsed();
            if elapsed + wait > self.config.retry_budget {
                let gave_up =
                    HttpError::GaveUp { attempts, elapsed_ms: elapsed.as_millis() as u64, last, may_have_landed };
                return (Err(SinkError::Http(gave_up)), last_answer);
            }
            warn!(position = %effect.envelope.record.position, attempts, wait_ms = wait.as_millis() as u64, last = %last, "HTTP effect not done; retrying with the same idempotency key");
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                // A drain must not wait out a long Retry-After: the effect is left to the next owner.
                _ = stop.stopped() => return (Err(SinkError::Http(HttpError::Stopping { attempts, last })), None),
            }
        }
    }

    /// The request for one record, or why there can be none.
    fn prepare(&self, effect: &Effect<'_>) -> Result<Prepared, String> {
        let record = &effect.envelope.record;
        let body = record.payload.as_deref().unwrap_or_default();
        if body.len() > self.config.max_request_bytes {
            return Err(format!(
                "the payload is {} bytes, over [sink.http] max_request_bytes ({})",
                body.len(),
                self.config.max_request_bytes
            ));
        }
        let filled =
            self.config.url_template.fill(&record.position.topic, record.position.partition, &record.headers)?;
        let url =
            reqwest::Url::parse(&filled).map_err(|e| format!("the URL filled from the template is not valid: {e}"))?;
        let mut h = self.static_headers.clone();
        let key = HeaderValue::from_str(&idempotency_key(&effect.envelope.key)).expect("hex and a prefix are ASCII");
        h.insert(self.idempotency_header.clone(), key);
        let own_type = record.headers.iter().find(|(k, _)| k.eq_ignore_ascii_case("content-type"));
        let content_type = match own_type.and_then(|(_, v)| v.as_deref()) {
            Some(v) => HeaderValue::from_bytes(v)
                .map_err(|_| "the record's content-type header is not a valid HTTP header value".to_string())?,
            None => HeaderValue::from_str(&self.config.content_type).expect("checked when the config was loaded"),
        };
        h.insert(CONTENT_TYPE, content_type);
        let p = &record.position;
        for (name, value) in [
            (headers::SOURCE_TOPIC, p.topic.to_string()),
            (headers::SOURCE_PARTITION, p.partition.to_string()),
            (headers::SOURCE_OFFSET, p.offset.to_string()),
        ] {
            if let Ok(v) = HeaderValue::from_str(&value) {
                h.insert(HeaderName::from_static(name), v);
            }
        }
        if effect.possible_repeat {
            h.insert(HeaderName::from_static(headers::POSSIBLE_REPEAT), HeaderValue::from_static("true"));
        }
        if let Some(job) = effect.replay.and_then(|j| HeaderValue::from_str(j).ok()) {
            h.insert(HeaderName::from_static(headers::REPLAY), job);
        }
        Ok(Prepared { url, headers: h, body: body.to_vec() })
    }

    async fn attempt(&self, p: &Prepared) -> Attempt {
        let sent = self
            .client
            .request(self.method.clone(), p.url.clone())
            .headers(p.headers.clone())
            .body(p.body.clone())
            .timeout(self.config.timeout)
            .send()
            .await;
        let mut response = match sent {
            Ok(r) => r,
            Err(e) => {
                let answer = if e.is_timeout() {
                    "timeout"
                } else if e.is_connect() {
                    "connect"
                } else {
                    "error"
                };
                self.requests.with_label_values(&[answer]).inc();
                // Only a failed connect is known not to have sent anything.
                let may_have_landed = !e.is_connect();
                return Attempt::Failed { why: describe(e, self.config.timeout), may_have_landed };
            }
        };
        let status = response.status().as_u16();
        let class = ["1xx", "2xx", "3xx", "4xx", "5xx"].get(usize::from(status / 100).saturating_sub(1));
        self.requests.with_label_values(&[class.copied().unwrap_or("error")]).inc();
        let retry_after = response
            .headers()
            .get(reqwest::header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| retry_after(v, now_ms()));
        let mut hasher = Sha256::new();
        let (mut read, mut excerpt) = (0usize, Vec::new());
        loop {
            match response.chunk().await {
                Ok(Some(chunk)) => {
                    let take = chunk.len().min(MAX_RESPONSE_BYTES - read);
                    hasher.update(&chunk[..take]);
                    let keep = take.min(EXCERPT_BYTES - excerpt.len().min(EXCERPT_BYTES));
                    excerpt.extend_from_slice(&chunk[..keep]);
                    read += take;
                    if read >= MAX_RESPONSE_BYTES {
                        break;
                    }
                }
                Ok(None) => break,
                // The status came; a body cut short (a reset mid-body, the timeout)
                // is a failed attempt when the status asks for a retry anyway, and
                // otherwise still the endpoint's answer.
                Err(e) if self.config.outcome(status) == HttpOutcome::Done => {
                    return Attempt::Failed {
                        why: format!("HTTP {status}, but its body failed: {}", describe(e, self.config.timeout)),
                        may_have_landed: true,
                    }
                }
                Err(_) => break,
            }
        }
        let body = Body {
            sha256: hex(&hasher.finalize()),
            bytes: read as u64,
            excerpt: String::from_utf8_lossy(&excerpt).into_owned(),
        };
        Attempt::Answered { status, retry_after, body }
    }
}

/// `Retry-After` as delay-seconds or an HTTP date (IMF-fixdate, RFC 9110
/// 5.6.7: `Sun, 06 Nov 1994 08:49:37 GMT`), as a wait from `now_ms`; a date
/// in the past is no wait; anything else is ignored (the backoff applies).
fn retry_after(value: &str, now_ms: u64) -> Option<Duration> {
    let value = value.trim();
    if let Ok(secs) = value.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    // "Sun, 06 Nov 1994 08:49:37 GMT"
    let (_, rest) = value.split_once(", ")?;
    let mut parts = rest.split(' ');
    let (day, month, year, time, zone) = (parts.next()?, parts.next()?, parts.next()?, parts.next()?, parts.next()?);
    if zone != "GMT" || parts.next().is_some() {
        return None;
    }
    const MONTHS: [&str; 12] = ["Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"];
    let month = MONTHS.iter().position(|m| *m == month)? as i64 + 1;
    let (day, year): (i64, i64) = (day.parse().ok()?, year.parse().ok()?);
    let mut hms = time.split(':').map(|t| t.parse::<i64>().ok());
    let (h, m, sec) = (hms.next()??, hms.next()??, hms.next()??);
    if !(1..=31).contains(&day) || !(0..24).contains(&h) || !(0..60).contains(&m) || !(0..61).contains(&sec) {
        return None;
    }
    // Days from the civil date (Howard Hinnant's algorithm), proleptic Gregorian.
    let (y, mo) = if month <= 2 { (year - 1, month + 9) } else { (year, month - 3) };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * mo + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    let at_ms = (days * 86_400 + h * 3_600 + m * 60 + sec) * 1_000;
    Some(Duration::from_millis(u64::try_from(at_ms).ok()?.saturating_sub(now_ms)))
}

/// A transport failure in words: what happened and, for a timeout, after how long.
/// Never the URL (reqwest's text carries it, and tokens live in URLs): these
/// words go to logs and to dead letters' `kdedup-error`.
fn describe(e: reqwest::Error, timeout: Duration) -> String {
    let e = e.without_url();
    let mut chain = Vec::new();
    let mut source: Option<&dyn std::error::Error> = Some(&e);
    while let Some(err) = source {
        chain.push(err.to_string());
        source = err.source();
    }
    if e.is_timeout() {
        format!("no answer within [sink.http] timeout_ms ({} ms)", timeout.as_millis())
    } else if e.is_connect() {
        format!("cannot connect: {}", chain.join(": "))
    } else {
        format!("request failed: {}", chain.join(": "))
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    #[test]
    fn retry_after_reads_seconds_and_http_dates() {
        assert_eq!(retry_after(" 7 ", 0), Some(Duration::from_secs(7)));
        // 1994-11-06T08:49:37Z is 784111777 s after the epoch.
        let at = 784_111_777_000;
        assert_eq!(retry_after("Sun, 06 Nov 1994 08:49:37 GMT", at - 5_000), Some(Duration::from_secs(5)));
        assert_eq!(retry_after("Sun, 06 Nov 1994 08:49:37 GMT", at + 5_000), Some(Duration::ZERO), "past: no wait");
        assert_eq!(retry_after("Thu, 29 Feb 2024 00:00:00 GMT", 1_709_164_800_000), Some(Duration::ZERO));
        for bad in ["soon", "-1", "Sun, 06 Nov 1994 08:49:37 PST", "Sun, 06 Foo 1994 08:49:37 GMT", ""] {
            assert_eq!(retry_after(bad, 0), None, "{bad}");
        }
    }

    #[test]
    fn the_key_depends_on_scope_and_id_only() {
        let a = EventKey { scope: Arc::from("s"), id: b"x".to_vec() };
        // Length-prefixed: ("s", "x") and ("sx", "") do not collide.
        let b = EventKey { scope: Arc::from("sx"), id: Vec::new() };
        assert_ne!(idempotency_key(&a), idempotency_key(&b));
        assert_eq!(idempotency_key(&a).len(), 7 + 64);
    }
}
