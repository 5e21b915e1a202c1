//! `kdedup serve` against a real upstream on loopback (a small HTTP server
//! below that counts its calls per key) and real stores: the embedded store in
//! process and across a restart of the binary, PostgreSQL shared by two processes.

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use kdedup::config::ServeConfig;
use kdedup::metrics::ServeMetrics;
use kdedup::store::{DedupStore, Store};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::utils::{unique, BIN};

/// What the test upstream saw: calls per key, and each call's possible-repeat header.
#[derive(Default)]
struct Seen {
    calls: HashMap<String, usize>,
    repeats: Vec<(String, Option<String>)>,
}

/// A real HTTP server on loopback. `/pay` answers 201 with the call's number and
/// its key; `x-test-delay-ms` makes it wait first. `/hang` never answers the first
/// call of a key (the request was received: its outcome is unknown to the caller)
/// and answers later ones.
struct Upstream {
    addr: SocketAddr,
    seen: Arc<Mutex<Seen>>,
    task: tokio::task::JoinHandle<()>,
}

impl Upstream {
    async fn start() -> Upstream {
        Upstream::on(TcpListener::bind("127.0.0.1:0").await.unwrap()).await
    }

    async fn on(listener: TcpListener) -> Upstream {
        let addr = listener.local_addr().unwrap();
        let seen = Arc::new(Mutex::new(Seen::default()));
        let shared = seen.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else { continue };
                let seen = shared.clone();
                let service = service_fn(move |request: Request<hyper::body::Incoming>| {
                    let seen = seen.clone();
                    async move {
                        let key = request
                            .headers()
                            .get("idempotency-key")
                            .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
                            .unwrap_or_default();
                        let repeat = request
                            .headers()
                            .get("idempotency-possible-repeat")
                            .map(|v| v.to_str().unwrap().to_string());
                        let delay = request
                            .headers()
                            .get("x-test-delay-ms")
                            .map(|v| v.to_str().unwrap().parse::<u64>().unwrap())
                            .unwrap_or(0);
                        let path = request.uri().path().to_string();
                        let body = request.into_body().collect().await.unwrap().to_bytes();
                        let n = {
                            let mut seen = seen.lock().unwrap();
                            seen.repeats.push((key.clone(), repeat));
                            let n = seen.calls.entry(key.clone()).or_default();
                            *n += 1;
                            *n
                        };
                        if path == "/hang" && n == 1 {
                            std::future::pending::<()>().await;
                        }
                        tokio::time::sleep(Duration::from_millis(delay)).await;
                        let answer = format!(r#"{{"call":{n},"key":{key:?},"bytes":{}}}"#, body.len());
                        let response = Response::builder()
                            .status(201)
                            .header("content-type", "application/json")
                            .header("location", format!("/pay/{n}"))
                            .body(Full::new(Bytes::from(answer)))
                            .unwrap();
                        Ok::<_, Infallible>(response)
                    }
                });
                tokio::spawn(async move {
                    let _ = http1::Builder::new().serve_connection(TokioIo::new(stream), service).await;
                });
            }
        });
        Upstream { addr, seen, task }
    }

    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    fn calls(&self, key: &str) -> usize {
        self.seen.lock().unwrap().calls.get(key).copied().unwrap_or(0)
    }

    fn total_calls(&self) -> usize {
        self.seen.lock().unwrap().calls.values().sum()
    }

    fn repeat_headers(&self, key: &str) -> Vec<Option<String>> {
        self.seen.lock().unwrap().repeats.iter().filter(|(k, _)| k == key).map(|(_, r)| r.clone()).collect()
    }
}

impl Drop for Upstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The serve config of these tests: `[store]` embedded in `dir` unless `extra` says otherwise.
fn serve_config(upstream: &str, dir: &Path, extra: &str) -> ServeConfig {
    let text = format!(
        "[serve]\nlisten = \"127.0.0.1:0\"\nupstream = \"{upstream}\"\nscope = \"{}\"\n{extra}\n\
         [store]\npath = \"{}\"\n[metrics]\nlisten = \"\"\n",
        unique("serve"),
        dir.join("store").display()
    );
    ServeConfig::from_toml_with_env(&text, "test", Vec::<(String, String)>::new()).unwrap()
}

/// `kdedup serve` in this process, stopped (drained) on drop.
struct Serving {
    addr: SocketAddr,
    metrics: ServeMetrics,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<anyhow::Result<()>>>,
    _dir: tempfile::TempDir,
}

impl Serving {
    async fn start(upstream: &str, extra: &str) -> Serving {
        let dir = tempfile::tempdir().unwrap();
        let config = serve_config(upstream, dir.path(), extra);
        let store = Store::open(&config.store, &config.retention).unwrap();
        let listener = TcpListener::bind(config.listen).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let metrics = ServeMetrics::new();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(kdedup::serve::run(config, store, metrics.clone(), listener, async {
            let _ = stopped.await;
        }));
        Serving { addr, metrics, stop: Some(stop), task: Some(task), _dir: dir }
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    async fn stop(mut self) {
        let _ = self.stop.take().unwrap().send(());
        self.task.take().unwrap().await.unwrap().unwrap();
    }
}

/// A POST with a key; (status, headers, body).
async fn post(client: &reqwest::Client, url: &str, key: &str, body: &str) -> (u16, reqwest::header::HeaderMap, String) {
    let r = client.post(url).header("Idempotency-Key", key).body(body.to_string()).send().await.unwrap();
    let (status, headers) = (r.status().as_u16(), r.headers().clone());
    (status, headers, r.text().await.unwrap())
}

fn replayed(headers: &reqwest::header::HeaderMap) -> bool {
    headers.get("idempotent-replayed").is_some_and(|v| v == "true")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_hundred_concurrent_requests_with_one_key_call_the_upstream_once_and_get_one_answer() {
    let upstream = Upstream::start().await;
    let serve = Serving::start(&upstream.url(), "").await;
    let client = reqwest::Client::new();
    let mut requests = Vec::new();
    for _ in 0..100 {
        let (client, url) = (client.clone(), serve.url("/pay"));
        requests.push(tokio::spawn(async move {
            let r = client
                .post(url)
                .header("Idempotency-Key", "order-1")
                .header("x-test-delay-ms", "300")
                .body(r#"{"amount":10}"#)
                .send()
                .await
                .unwrap();
            let (status, location, replayed) =
                (r.status().as_u16(), r.headers().get("location").cloned(), replayed(r.headers()));
            (status, location, replayed, r.text().await.unwrap())
        }));
    }
    let mut answers = Vec::new();
    for r in requests {
        answers.push(r.await.unwrap());
    }
    assert_eq!(upstream.calls("order-1"), 1, "one upstream call for one key");
    let first = &answers[0];
    for (status, location, _, body) in &answers {
        assert_eq!((*status, location, body), (201, &first.1, &first.3), "every client gets the same answer");
    }
    assert_eq!(first.3, r#"{"call":1,"key":"order-1","bytes":13}"#);
    assert_eq!(answers.iter().filter(|a| !a.2).count(), 1, "exactly one answer is not a replay");
    assert_eq!(serve.metrics.outcome("first"), 1);
    assert_eq!(serve.metrics.outcome("replayed"), 99);
    assert_eq!(serve.metrics.requests.get(), 100, "outcomes sum to requests");
    serve.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_reused_with_another_request_is_422_problem_json() {
    let upstream = Upstream::start().await;
    let serve = Serving::start(&upstream.url(), "").await;
    let client = reqwest::Client::new();
    let (status, _, _) = post(&client, &serve.url("/pay"), "k-422", r#"{"amount":10}"#).await;
    assert_eq!(status, 201);
    let r = client
        .post(serve.url("/pay"))
        .header("Idempotency-Key", "k-422")
        .body(r#"{"amount":99}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 422);
    assert_eq!(r.headers()["content-type"], "application/problem+json");
    let problem: serde_json::Value = serde_json::from_str(&r.text().await.unwrap()).unwrap();
    assert_eq!((problem["status"].as_u64(), problem["code"].as_str()), (Some(422), Some("key_reused")));
    // Another path under the same key is another request too.
    let (status, _, _) = post(&client, &serve.url("/refund"), "k-422", r#"{"amount":10}"#).await;
    assert_eq!(status, 422);
    assert_eq!(upstream.calls("k-422"), 1);
    assert_eq!(serve.metrics.outcome("conflict"), 2);
    serve.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_runs_again_once_its_ttl_has_passed() {
    let upstream = Upstream::start().await;
    // A tiny TTL (2 s, the least with a 1 s lease), awaited by retrying.
    let dir = tempfile::tempdir().unwrap();
    let mut config = serve_config(&upstream.url(), dir.path(), "");
    config.retention.ttl = Duration::from_secs(2);
    config.retention.lease = Duration::from_secs(1);
    let store = Store::open(&config.store, &config.retention).unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/pay", listener.local_addr().unwrap());
    let metrics = ServeMetrics::new();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(kdedup::serve::run(config, store, metrics.clone(), listener, async {
        let _ = stopped.await;
    }));
    let client = reqwest::Client::new();
    let (status, headers, first) = post(&client, &url, "k-ttl", "{}").await;
    assert_eq!((status, replayed(&headers)), (201, false));
    let started = Instant::now();
    loop {
        let (status, headers, body) = post(&client, &url, "k-ttl", "{}").await;
        assert_eq!(status, 201);
        if !replayed(&headers) {
            assert_ne!(body, first, "a new run after expiry");
            break;
        }
        assert_eq!(body, first, "replayed until the TTL passes");
        assert!(started.elapsed() < Duration::from_secs(20), "the key never expired");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(started.elapsed() >= Duration::from_millis(1500), "not before the TTL");
    assert_eq!(upstream.calls("k-ttl"), 2);
    let _ = stop.send(());
    task.await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_timeout_after_receiving_keeps_the_key_and_marks_the_next_attempt() {
    let upstream = Upstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let mut config = serve_config(&upstream.url(), dir.path(), "upstream_timeout_ms = 300\nwait_ms = 0");
    config.retention.lease = Duration::from_secs(1);
    let store = Store::open(&config.store, &config.retention).unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/hang", listener.local_addr().unwrap());
    let metrics = ServeMetrics::new();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(kdedup::serve::run(config, store, metrics.clone(), listener, async {
        let _ = stopped.await;
    }));
    let client = reqwest::Client::new();
    let (status, _, body) = post(&client, &url, "k-hang", "{}").await;
    assert_eq!(status, 504, "{body}");
    assert!(body.contains("outcome_unknown"), "{body}");
    // Right after, the key is still claimed: the upstream is not called again unknowingly.
    let r = client.post(&url).header("Idempotency-Key", "k-hang").body("{}").send().await.unwrap();
    assert_eq!(r.status().as_u16(), 409);
    assert!(r.headers().get("retry-after").is_some());
    assert_eq!(upstream.calls("k-hang"), 1);
    // Once the lease (and its grace) lapse, the next attempt runs, marked.
    let started = Instant::now();
    let answer = loop {
        let (status, headers, body) = post(&client, &url, "k-hang", "{}").await;
        if status != 409 {
            break (status, headers, body);
        }
        assert!(started.elapsed() < Duration::from_secs(20), "the unknown claim was never taken over");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(answer.0, 201, "{}", answer.2);
    assert_eq!(upstream.calls("k-hang"), 2);
    assert_eq!(upstream.repeat_headers("k-hang"), vec![None, Some("true".to_string())]);
    assert_eq!(metrics.outcome("upstream_error"), 1);
    let _ = stop.send(());
    task.await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_refusing_connections_releases_the_key_and_a_retry_reaches_it() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    drop(listener);
    let serve = Serving::start(&format!("http://{addr}"), "").await;
    let client = reqwest::Client::new();
    let (status, _, body) = post(&client, &serve.url("/pay"), "k-refused", "{}").await;
    assert_eq!(status, 502, "{body}");
    assert!(body.contains("upstream_unreachable"), "{body}");
    let upstream = Upstream::on(TcpListener::bind(addr).await.unwrap()).await;
    let (status, headers, body) = post(&client, &serve.url("/pay"), "k-refused", "{}").await;
    assert_eq!((status, replayed(&headers)), (201, false), "{body}");
    assert_eq!(upstream.calls("k-refused"), 1);
    assert_eq!(upstream.repeat_headers("k-refused"), vec![None], "a released key is no possible repeat");
    serve.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_requests_get_bounded_answers_and_never_reach_the_upstream() {
    let upstream = Upstream::start().await;
    let serve = Serving::start(&upstream.url(), "max_body_bytes = 65536\nclient_timeout_ms = 500").await;
    let client = reqwest::Client::new();
    // Huge headers: refused before parsing (431).
    let r = client
        .post(serve.url("/pay"))
        .header("Idempotency-Key", "k")
        .header("x-filler", "a".repeat(100_000))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 431);
    // A 10,000-character key.
    let (status, _, body) = post(&client, &serve.url("/pay"), &"k".repeat(10_000), "{}").await;
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("invalid_key"));
    // A body over the bound, announced: 413 before it is sent.
    let answer =
        raw(serve.addr, b"POST /pay HTTP/1.1\r\nHost: x\r\nIdempotency-Key: big\r\nContent-Length: 10000000\r\n\r\n")
            .await;
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
    // A body over the bound, chunked: 413 once it passes the bound.
    let big = client.post(serve.url("/pay")).header("Idempotency-Key", "big2").body(vec![b'x'; 100_000]).send().await;
    if let Ok(r) = big {
        assert_eq!(r.status().as_u16(), 413);
    }
    // Key bytes that are not UTF-8 are keys like any other.
    let key_a = b"POST /pay HTTP/1.1\r\nHost: x\r\nIdempotency-Key: \xff\xfe-a\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{}";
    let key_b = b"POST /pay HTTP/1.1\r\nHost: x\r\nIdempotency-Key: \xff\xfd-b\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{}";
    let first = raw(serve.addr, key_a).await;
    assert!(first.starts_with("HTTP/1.1 201") && !first.contains("idempotent-replayed"), "{first}");
    let again = raw(serve.addr, key_a).await;
    assert!(again.starts_with("HTTP/1.1 201") && again.contains("idempotent-replayed: true"), "{again}");
    let other = raw(serve.addr, key_b).await;
    assert!(other.starts_with("HTTP/1.1 201") && !other.contains("idempotent-replayed"), "{other}");
    // A slow client: a head that never ends is cut off; a body that stalls gets 408.
    let mut slow = TcpStream::connect(serve.addr).await.unwrap();
    slow.write_all(b"POST /pay HTTP/1.1\r\nHost: x\r\nIdempotency-Key: slow\r\n").await.unwrap();
    let mut rest = Vec::new();
    let closed = tokio::time::timeout(Duration::from_secs(20), slow.read_to_end(&mut rest)).await;
    assert!(closed.is_ok(), "a slow head was never cut off");
    let stalled = raw_stalled(serve.addr).await;
    assert!(stalled.starts_with("HTTP/1.1 408"), "{stalled}");
    assert_eq!(upstream.total_calls(), 2, "only the two well-formed keyed requests ran");
    assert_eq!(serve.metrics.outcome("first"), 2);
    serve.stop().await;
}

/// Sends `request` on a fresh connection and reads the answer's head and body.
async fn raw(addr: SocketAddr, request: &[u8]) -> String {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    stream.write_all(request).await.unwrap();
    let mut answer = vec![0u8; 65536];
    let mut n = 0;
    let read = tokio::time::timeout(Duration::from_secs(20), async {
        loop {
            match stream.read(&mut answer[n..]).await {
                Ok(0) | Err(_) => break,
                Ok(k) => n += k,
            }
            if n > 0 && !request.windows(17).any(|w| w.eq_ignore_ascii_case(b"connection: close")) {
                // Keep-alive: the head and a small body arrive together.
                break;
            }
        }
    });
    read.await.expect("an answer within 20 s");
    String::from_utf8_lossy(&answer[..n]).to_ascii_lowercase().replacen("http/1.1", "HTTP/1.1", 1)
}

/// A keyed request whose body stops after 10 of its 100 bytes.
async fn raw_stalled(addr: SocketAddr) -> String {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    stream
        .write_all(b"POST /pay HTTP/1.1\r\nHost: x\r\nIdempotency-Key: stall\r\nContent-Length: 100\r\n\r\n0123456789")
        .await
        .unwrap();
    let mut answer = vec![0u8; 4096];
    let n = tokio::time::timeout(Duration::from_secs(20), stream.read(&mut answer)).await.unwrap().unwrap();
    String::from_utf8_lossy(&answer[..n]).into_owned()
}

/// A `kdedup serve` process with its config in `dir`, logs in `dir/serve-N.log`.
struct Process {
    child: std::process::Child,
    addr: SocketAddr,
}

impl Process {
    async fn spawn(dir: &Path, n: usize, config: &str) -> Process {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        drop(listener);
        let path = dir.join(format!("serve-{n}.toml"));
        std::fs::write(&path, config.replace("LISTEN", &addr.to_string())).unwrap();
        let log = std::fs::File::create(dir.join(format!("serve-{n}.log"))).unwrap();
        let child = std::process::Command::new(BIN)
            .args(["serve", "--config"])
            .arg(&path)
            .env("KDEDUP_LOG", "kdedup=debug")
            .stdout(std::process::Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        let started = Instant::now();
        while TcpStream::connect(addr).await.is_err() {
            assert!(started.elapsed() < Duration::from_secs(30), "serve {n} never listened");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Process { child, addr }
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// SIGTERM: a graceful drain; the exit status.
    fn terminate(mut self) -> std::process::ExitStatus {
        // SAFETY: kill(2) on our own child, not yet reaped.
        assert_eq!(unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) }, 0);
        self.child.wait().unwrap()
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stored_answer_survives_a_restart_of_serve_and_neither_keys_nor_bodies_are_logged() {
    let upstream = Upstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let config = format!(
        "[serve]\nlisten = \"LISTEN\"\nupstream = \"{}\"\n[store]\npath = \"{}\"\n[metrics]\nlisten = \"\"\n",
        upstream.url(),
        dir.path().join("store").display()
    );
    let client = reqwest::Client::new();
    let serve = Process::spawn(dir.path(), 1, &config).await;
    let (status, _, first) = post(&client, &serve.url("/pay"), "secret-key-1", "secret-body-1").await;
    assert_eq!(status, 201);
    assert!(serve.terminate().success(), "SIGTERM drains and exits 0");
    let serve = Process::spawn(dir.path(), 2, &config).await;
    let (status, headers, again) = post(&client, &serve.url("/pay"), "secret-key-1", "secret-body-1").await;
    assert_eq!((status, replayed(&headers), &again), (201, true, &first));
    assert_eq!(headers["location"], "/pay/1", "recorded headers are replayed");
    assert_eq!(upstream.calls("secret-key-1"), 1);
    drop(serve);
    for n in [1, 2] {
        let log = std::fs::read_to_string(dir.path().join(format!("serve-{n}.log"))).unwrap();
        assert!(log.contains("serving"), "{log}");
        assert!(!log.contains("secret-key") && !log.contains("secret-body"), "{log}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_serve_processes_sharing_postgres_call_the_upstream_once_for_one_key() {
    let Ok(url) = std::env::var("KDEDUP_TEST_POSTGRES") else {
        eprintln!("skipped: set KDEDUP_TEST_POSTGRES (scripts/services env) to run serve on PostgreSQL");
        return;
    };
    let upstream = Upstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let config = format!(
        "[serve]\nlisten = \"LISTEN\"\nupstream = \"{}\"\nscope = \"{}\"\n[store]\nkind = \"postgres\"\nurl = \"{url}\"\n\
         [metrics]\nlisten = \"\"\n",
        upstream.url(),
        unique("serve-pg")
    );
    let parsed = ServeConfig::from_toml_with_env(&config.replace("LISTEN", "127.0.0.1:0"), "test", Vec::new()).unwrap();
    let store = Store::open(&parsed.store, &parsed.retention).unwrap();
    store.apply_schema().await.unwrap();
    store.sync().unwrap();
    let a = Process::spawn(dir.path(), 1, &config).await;
    let b = Process::spawn(dir.path(), 2, &config).await;
    let client = reqwest::Client::new();
    let mut requests = Vec::new();
    for i in 0..40 {
        let url = if i % 2 == 0 { a.url("/pay") } else { b.url("/pay") };
        let client = client.clone();
        requests.push(tokio::spawn(async move {
            let r = client
                .post(url)
                .header("Idempotency-Key", "shared-1")
                .header("x-test-delay-ms", "300")
                .body("{}")
                .send()
                .await
                .unwrap();
            (r.status().as_u16(), r.text().await.unwrap())
        }));
    }
    let mut answers = Vec::new();
    for r in requests {
        answers.push(r.await.unwrap());
    }
    assert_eq!(upstream.calls("shared-1"), 1, "one upstream call across both processes");
    for answer in &answers {
        assert_eq!(answer, &answers[0], "every client of either process gets the same answer");
    }
    assert_eq!(answers[0].0, 201);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_readiness_metrics_check_and_a_sigterm_that_lets_the_request_in_progress_finish() {
    let upstream = Upstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let metrics_port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let config = format!(
        "[serve]\nlisten = \"LISTEN\"\nupstream = \"{}\"\n[store]\npath = \"{}\"\n[metrics]\nlisten = \"127.0.0.1:{metrics_port}\"\n",
        upstream.url(),
        dir.path().join("store").display()
    );
    // `kdedup check` knows a serve config, and refuses a broken one.
    let path = dir.path().join("check.toml");
    std::fs::write(&path, config.replace("LISTEN", "127.0.0.1:0")).unwrap();
    let out = std::process::Command::new(BIN).args(["check", "--config"]).arg(&path).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success() && text.contains("valid serve config"), "{text}");
    std::fs::write(&path, config.replace("LISTEN", "127.0.0.1:0").replace("[serve]", "[serve]\non_5xx = \"retry\""))
        .unwrap();
    let out = std::process::Command::new(BIN).args(["check", "--config"]).arg(&path).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(!out.status.success() && text.contains("serve.on_5xx"), "{text}");

    let serve = Process::spawn(dir.path(), 1, &config).await;
    assert_eq!(crate::utils::http_get(metrics_port, "/healthz").map(|a| a.0), Some(200));
    // The port listens (bound at start-up) a moment before serving begins and readiness turns true.
    let started = Instant::now();
    while crate::utils::http_get(metrics_port, "/readyz").map(|a| a.0) != Some(200) {
        assert!(started.elapsed() < Duration::from_secs(30), "serve never became ready");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let client = reqwest::Client::new();
    let (status, _, _) = post(&client, &serve.url("/pay"), "m-1", "{}").await;
    assert_eq!(status, 201);
    let (status, _, _) = post(&client, &serve.url("/pay"), "m-1", "{}").await;
    assert_eq!(status, 201);
    let (_, text) = crate::utils::http_get(metrics_port, "/metrics").unwrap();
    for line in [
        "kdedup_serve_requests_total{outcome=\"first\"} 1",
        "kdedup_serve_requests_total{outcome=\"replayed\"} 1",
        "kdedup_serve_upstream_seconds_count 1",
        "kdedup_serve_added_seconds_count{outcome=\"replayed\"} 1",
    ] {
        assert!(text.contains(line), "{line} in\n{text}");
    }
    // A request in progress when SIGTERM comes is answered, then the process exits 0.
    let slow = {
        let (client, url) = (client.clone(), serve.url("/pay"));
        tokio::spawn(async move {
            let r = client
                .post(url)
                .header("Idempotency-Key", "m-2")
                .header("x-test-delay-ms", "1000")
                .body("{}")
                .send()
                .await
                .unwrap();
            r.status().as_u16()
        })
    };
    let started = Instant::now();
    while upstream.calls("m-2") == 0 {
        assert!(started.elapsed() < Duration::from_secs(20), "the slow request never reached the upstream");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let exit = tokio::task::spawn_blocking(move || serve.terminate()).await.unwrap();
    assert_eq!(slow.await.unwrap(), 201, "the request in progress finished during the drain");
    assert!(exit.success(), "{exit:?}");
}
