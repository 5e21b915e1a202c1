//! An open-loop load for `kdedup serve` (`scripts/bench-serve` with `RATE=`): many
//! keep-alive connections, each sending POSTs with an `Idempotency-Key` on a fixed
//! schedule, whatever the answers' speed. A closed loop (wrk) with 10,000
//! connections measures throughput: every connection waits for its answer, so the
//! latency is the connection count over the rate the machine can serve. An API's
//! clients do not wait for each other; here the latency of each request is taken
//! from the moment it was due, so a slow answer delays and counts against the
//! requests queued behind it (no coordinated omission).
//!
//! ```text
//! cargo run --release --example serve_load -- ADDR PATH CONNECTIONS RATE SECONDS [RETRY_SHARE] [PREFIX]
//! ```
//!
//! A share of the requests (default 0.2) repeat a key sent in the last moments by
//! any connection, often while its first request is still in progress. Prints one
//! `RESULT` line: requests sent and answered, statuses, latency quantiles from the
//! due time, and how late the load itself sent (if that is large, the machine
//! could not offer the rate and the figures say little).

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

struct Args {
    addr: String,
    path: String,
    connections: usize,
    rate: f64,
    seconds: f64,
    retry_share: f64,
    prefix: String,
}

#[derive(Default)]
struct Tally {
    latencies_us: Vec<u64>,
    send_lag_us: Vec<u64>,
    statuses: std::collections::BTreeMap<u16, u64>,
    errors: std::collections::BTreeMap<String, u64>,
}

fn args() -> Result<Args, String> {
    let a: Vec<String> = std::env::args().skip(1).collect();
    if a.len() < 5 {
        return Err("usage: serve_load ADDR PATH CONNECTIONS RATE SECONDS [RETRY_SHARE] [PREFIX]".into());
    }
    let number = |i: usize, name: &str| a[i].parse::<f64>().map_err(|e| format!("{name} `{}`: {e}", a[i]));
    Ok(Args {
        addr: a[0].clone(),
        path: a[1].clone(),
        connections: number(2, "CONNECTIONS")? as usize,
        rate: number(3, "RATE")?,
        seconds: number(4, "SECONDS")?,
        retry_share: if a.len() > 5 { number(5, "RETRY_SHARE")? } else { 0.2 },
        prefix: a.get(6).cloned().unwrap_or_else(|| format!("load-{}", std::process::id())),
    })
}

fn main() {
    let args = match args() {
        Ok(a) => Arc::new(a),
        Err(e) => {
            eprintln!("{e}");
            std::process::exit(2);
        }
    };
    let threads = std::env::var("LOAD_THREADS").ok().and_then(|t| t.parse().ok()).unwrap_or(1);
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(threads).enable_all().build().unwrap();
    let tally = runtime.block_on(drive(args.clone()));
    report(&args, tally);
}

async fn drive(args: Arc<Args>) -> Tally {
    // Each connection opens just before its first request: opened all at once
    // first, the early ones would sit idle past the server's head timeout
    // (serve's client_timeout_ms) while the rest connect.
    let recent: Arc<Mutex<VecDeque<String>>> = Arc::new(Mutex::new(VecDeque::with_capacity(1024)));
    let interval = Duration::from_secs_f64(args.connections as f64 / args.rate);
    let start = Instant::now() + Duration::from_millis(200);
    let end = start + Duration::from_secs_f64(args.seconds);
    let tasks: Vec<_> = (0..args.connections)
        .map(|i| {
            let first = start + interval.mul_f64(i as f64 / args.connections as f64);
            tokio::spawn(connection(args.clone(), i, first, interval, end, recent.clone()))
        })
        .collect();
    let mut tally = Tally::default();
    for task in tasks {
        let t = task.await.unwrap();
        tally.latencies_us.extend(t.latencies_us);
        tally.send_lag_us.extend(t.send_lag_us);
        for (status, n) in t.statuses {
            *tally.statuses.entry(status).or_default() += n;
        }
        for (kind, n) in t.errors {
            *tally.errors.entry(kind).or_default() += n;
        }
    }
    tally
}

async fn connection(
    args: Arc<Args>,
    index: usize,
    first: Instant,
    interval: Duration,
    end: Instant,
    recent: Arc<Mutex<VecDeque<String>>>,
) -> Tally {
    let mut tally = Tally::default();
    tokio::time::sleep_until(first.checked_sub(Duration::from_millis(50)).unwrap_or(first).into()).await;
    let mut stream = match TcpStream::connect(args.addr.clone()).await {
        Ok(stream) => stream,
        Err(e) => {
            *tally.errors.entry(format!("connect {:?}", e.kind())).or_default() += 1;
            return tally;
        }
    };
    let _ = stream.set_nodelay(true);
    let mut buffer = Vec::with_capacity(4096);
    let mut due = first;
    let mut sent = 0u64;
    while due < end {
        tokio::time::sleep_until(due.into()).await;
        let key = {
            let mut recent = recent.lock().unwrap();
            if !recent.is_empty() && rand::random::<f64>() < args.retry_share {
                recent[rand::random_range(0..recent.len())].clone()
            } else {
                let key = format!("{}-{index}-{sent}", args.prefix);
                if recent.len() == recent.capacity() {
                    recent.pop_front();
                }
                recent.push_back(key.clone());
                key
            }
        };
        sent += 1;
        tally.send_lag_us.push(due.elapsed().as_micros() as u64);
        let body = r#"{"amount":100,"currency":"eur"}"#;
        let request = format!(
            "POST {} HTTP/1.1\r\nHost: {}\r\nIdempotency-Key: {key}\r\nContent-Type: application/json\r\n\
             Content-Length: {}\r\n\r\n{body}",
            args.path,
            args.addr,
            body.len()
        );
        match exchange(&mut stream, request.as_bytes(), &mut buffer).await {
            Ok(status) => {
                *tally.statuses.entry(status).or_default() += 1;
                tally.latencies_us.push(due.elapsed().as_micros() as u64);
            }
            Err(e) => {
                *tally.errors.entry(format!("{:?}", e.kind())).or_default() += 1;
                match TcpStream::connect(args.addr.clone()).await {
                    Ok(s) => stream = s,
                    Err(_) => break,
                }
            }
        }
        due += interval;
    }
    tally
}

/// Writes one request and reads one answer (status line, headers, a body of
/// `Content-Length` bytes); returns the status.
async fn exchange(stream: &mut TcpStream, request: &[u8], buffer: &mut Vec<u8>) -> std::io::Result<u16> {
    stream.write_all(request).await?;
    buffer.clear();
    let invalid = |what: &str| std::io::Error::new(std::io::ErrorKind::InvalidData, what.to_string());
    loop {
        if let Some(head_end) = buffer.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = std::str::from_utf8(&buffer[..head_end]).map_err(|_| invalid("head"))?;
            let status = head.get(9..12).and_then(|s| s.parse().ok()).ok_or_else(|| invalid("status"))?;
            let length: usize = head
                .lines()
                .find_map(|l| {
                    let (name, value) = l.split_once(':')?;
                    name.eq_ignore_ascii_case("content-length").then(|| value.trim().parse().ok())?
                })
                .unwrap_or(0);
            while buffer.len() < head_end + 4 + length {
                read_more(stream, buffer).await?;
            }
            return Ok(status);
        }
        read_more(stream, buffer).await?;
    }
}

async fn read_more(stream: &mut TcpStream, buffer: &mut Vec<u8>) -> std::io::Result<()> {
    let mut chunk = [0u8; 4096];
    let n = stream.read(&mut chunk).await?;
    if n == 0 {
        return Err(std::io::ErrorKind::UnexpectedEof.into());
    }
    buffer.extend_from_slice(&chunk[..n]);
    Ok(())
}

fn report(args: &Args, mut tally: Tally) {
    tally.latencies_us.sort_unstable();
    tally.send_lag_us.sort_unstable();
    let q = |v: &[u64], p: f64| v.get(((v.len() as f64 * p) as usize).min(v.len().saturating_sub(1))).copied();
    let ms = |v: Option<u64>| v.map_or("-".to_string(), |us| format!("{:.2}", us as f64 / 1000.0));
    let answered = tally.latencies_us.len();
    let statuses: Vec<String> = tally.statuses.iter().map(|(s, n)| format!("{s}:{n}")).collect();
    let errors: Vec<String> = tally.errors.iter().map(|(kind, n)| format!("{kind}:{n}")).collect();
    println!(
        "RESULT connections={} offered_rps={:.0} answered_rps={:.0} answered={answered} errors={} statuses={} \
         p50_ms={} p99_ms={} p999_ms={} max_ms={} send_lag_p99_ms={}",
        args.connections,
        args.rate,
        answered as f64 / args.seconds,
        if errors.is_empty() { "0".to_string() } else { errors.join(",") },
        statuses.join(","),
        ms(q(&tally.latencies_us, 0.50)),
        ms(q(&tally.latencies_us, 0.99)),
        ms(q(&tally.latencies_us, 0.999)),
        ms(tally.latencies_us.last().copied()),
        ms(q(&tally.send_lag_us, 0.99)),
    );
}
