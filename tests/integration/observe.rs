//! What an operator sees, proven: the alert rules under promtool, the compose
//! file under docker-compose, and a real Prometheus scraping a real `kdedup run`
//! under load, answering every query of every dashboard panel and every alert
//! expression.
//!
//! The programs come from scripts/services (Debian's `prometheus`, `chromium`),
//! named by KDEDUP_TEST_PROMTOOL, KDEDUP_TEST_PROMETHEUS, KDEDUP_TEST_CHROMIUM
//! and KDEDUP_TEST_DOCKER_COMPOSE; a test without its program says "skipped".

use std::collections::BTreeSet;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use kdedup::mock::{self, Produce};
use serde_json::Value;

use crate::utils::*;

const BIN: &str = env!("CARGO_BIN_EXE_kdedup");
const ALERTS: &str = "deploy/prometheus/alerts.yml";
const ALERT_TESTS: &str = "deploy/prometheus/alerts_test.yml";
const DASHBOARD: &str = "deploy/grafana/kdedup.json";

/// The program named by `var`, or None after saying the test is skipped.
fn program(var: &str) -> Option<String> {
    match std::env::var(var) {
        Ok(p) if !p.is_empty() => Some(p),
        _ => {
            eprintln!("skipped: {var} is not set (scripts/test sets it from scripts/services)");
            None
        }
    }
}

fn run_ok(program: &str, args: &[&str]) -> String {
    let out = Command::new(program).args(args).output().unwrap_or_else(|e| panic!("cannot run {program}: {e}"));
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "{program} {args:?} failed:\n{text}");
    text
}

/// Alert names declared in alerts.yml (`- alert: Name` lines).
fn alert_names() -> BTreeSet<String> {
    let text = std::fs::read_to_string(ALERTS).unwrap();
    text.lines().filter_map(|l| l.trim().strip_prefix("- alert:")).map(|n| n.trim().to_string()).collect()
}

#[test]
fn promtool_accepts_the_config_and_rules_and_every_alert_is_unit_tested_firing_and_quiet() {
    let Some(promtool) = program("KDEDUP_TEST_PROMTOOL") else { return };
    run_ok(&promtool, &["check", "config", "deploy/prometheus/prometheus.yml"]);
    let rules = run_ok(&promtool, &["check", "rules", ALERTS]);
    let names = alert_names();
    assert!(rules.contains(&format!("SUCCESS: {} rules found", names.len())), "{rules}");
    run_ok(&promtool, &["test", "rules", ALERT_TESTS]);

    // Each alert has a case where it fires and one where it stays quiet.
    let tests = std::fs::read_to_string(ALERT_TESTS).unwrap();
    let lines: Vec<&str> = tests.lines().map(str::trim).filter(|l| !l.is_empty() && !l.starts_with('#')).collect();
    let (mut firing, mut quiet) = (BTreeSet::new(), BTreeSet::new());
    for (i, line) in lines.iter().enumerate() {
        let Some(name) = line.strip_prefix("alertname:") else { continue };
        let name = name.trim().to_string();
        match lines.get(i + 1).copied() {
            Some("exp_alerts: []") => quiet.insert(name),
            Some("exp_alerts:") => firing.insert(name),
            other => panic!("alertname {name} is not followed by exp_alerts: {other:?}"),
        };
    }
    assert_eq!(firing, names, "every alert has a firing case, and no test names an alert that does not exist");
    assert_eq!(quiet, names, "every alert has a quiet case");
}

#[test]
fn the_compose_file_with_prometheus_and_grafana_is_valid() {
    let Some(compose) = program("KDEDUP_TEST_DOCKER_COMPOSE") else { return };
    run_ok(&compose, &["-f", "deploy/compose.yaml", "config", "-q"]);
    let services = run_ok(&compose, &["-f", "deploy/compose.yaml", "config", "--services"]);
    for service in ["kdedup", "kafka", "postgres", "prometheus", "grafana"] {
        assert!(services.lines().any(|l| l == service), "{service} missing:\n{services}");
    }
    // The store this project proves, not one it cannot start here.
    assert!(!services.lines().any(|l| l == "scylla"), "{services}");
}

/// Children this test started, killed (by their own handle) when it ends.
struct Children(Vec<Child>);

impl Drop for Children {
    fn drop(&mut self) {
        for child in &mut self.0 {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

async fn get(port: u16, path: String) -> Option<(u16, String)> {
    tokio::task::spawn_blocking(move || http_get(port, &path)).await.unwrap()
}

fn url_encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// An instant query through Prometheus's HTTP API: its JSON answer.
async fn query(port: u16, expr: &str) -> Value {
    let (_, body) =
        get(port, format!("/api/v1/query?query={}", url_encode(expr))).await.expect("Prometheus answers queries");
    serde_json::from_str(&body).unwrap_or_else(|e| panic!("query {expr}: not JSON ({e}): {body}"))
}

/// Every query of every panel of the dashboard: (panel title, expression).
fn dashboard_queries() -> Vec<(String, String)> {
    let dashboard: Value = serde_json::from_str(&std::fs::read_to_string(DASHBOARD).unwrap()).unwrap();
    let mut panels: Vec<&Value> = Vec::new();
    for p in dashboard["panels"].as_array().expect("panels") {
        panels.push(p);
        panels.extend(p["panels"].as_array().into_iter().flatten()); // collapsed rows hold their panels
    }
    let mut out = Vec::new();
    for p in panels.into_iter().filter(|p| p["type"] != "row") {
        let title = p["title"].as_str().unwrap_or("?").to_string();
        let targets = p["targets"].as_array().filter(|t| !t.is_empty());
        let targets = targets.unwrap_or_else(|| panic!("panel {title:?} has no query"));
        for t in targets {
            let expr = t["expr"].as_str().unwrap_or_else(|| panic!("panel {title:?}: a target without expr"));
            out.push((title.clone(), expr.to_string()));
        }
    }
    out
}

/// Grafana's template variables as a scrape of one job would fill them in.
fn substitute(expr: &str) -> String {
    let mut e = expr.to_string();
    for (var, value) in [("$__rate_interval", "5s"), ("$job", ".*"), ("$instance", ".*"), ("$topic", ".*")] {
        e = e.replace(&format!("${{{}}}", &var[1..]), value).replace(var, value);
    }
    e
}

fn bad(partition: i32) -> Produce {
    // No event-id header: dead-lettered as missing_id.
    Produce { partition, key: None, payload: Some(br#"{"no":"id"}"#.to_vec()), headers: vec![] }
}

fn load_event(i: usize) -> Produce {
    let id = format!("load-{i:08}");
    Produce {
        partition: (i % 2) as i32,
        key: Some(id.clone().into_bytes()),
        payload: Some(format!(r#"{{"id":"{id}"}}"#).into_bytes()),
        headers: vec![("event-id".into(), id.into_bytes())],
    }
}

/// Headless Chromium on a page of this test's kdedup: its stdout.
fn chromium(program: &str, profile: &std::path::Path, args: &[&str]) -> String {
    let mut all = vec![
        "--headless".to_string(),
        "--no-sandbox".to_string(), // tests may run as root
        "--disable-gpu".to_string(),
        "--hide-scrollbars".to_string(),
        "--no-first-run".to_string(),
        format!("--user-data-dir={}", profile.display()),
    ];
    all.extend(args.iter().map(|a| a.to_string()));
    let all: Vec<&str> = all.iter().map(String::as_str).collect();
    run_ok(program, &all)
}

/// The text of the cell `data-k="key"` in the row whose attribute is `row` (e.g. `data-topic="in"`).
fn cell(dom: &str, row: &str, key: &str) -> Option<String> {
    let row = &dom[dom.find(&format!("<tr {row}>"))?..];
    let row = &row[..row.find("</tr>")?];
    let at = row.find(&format!(r#"data-k="{key}">"#))? + key.len() + 10;
    Some(row[at..at + row[at..].find('<')?].to_string())
}

/// The value of one sample line in Prometheus text.
fn sample(body: &str, series: &str) -> Option<f64> {
    body.lines().find_map(|l| l.strip_prefix(series).and_then(|v| v.trim().parse().ok()))
}

/// The sum of every sample of a metric (all label values) in Prometheus text.
fn sum_of(body: &str, name: &str) -> f64 {
    body.lines()
        .filter(|l| l.strip_prefix(name).is_some_and(|rest| rest.starts_with('{') || rest.starts_with(' ')))
        .filter_map(|l| l.rsplit_once(' ').and_then(|(_, v)| v.parse::<f64>().ok()))
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_real_prometheus_scraping_kdedup_under_load_answers_every_dashboard_query_and_alert_expression() {
    let Some(prometheus) = program("KDEDUP_TEST_PROMETHEUS") else { return };
    let kafka = cluster(2);
    const BAD: usize = 6;
    let (mut records, _) = events(10_000, 2_000, 2, 21);
    for i in 0..BAD {
        records.insert(i * 1_000 + 7, bad((i % 2) as i32));
    }
    mock::produce_all(kafka.bootstrap(), INPUT, &records).await.unwrap();

    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let kdedup_log = std::fs::File::create(dir.path().join("kdedup.log")).unwrap();
    let env = [
        ("KDEDUP_KAFKA__BROKERS", kafka.bootstrap().to_string()),
        ("KDEDUP_KAFKA__GROUP_ID", unique("observe")),
        ("KDEDUP_KAFKA__TOPICS", INPUT.to_string()),
        ("KDEDUP_SINK__TOPIC", OUTPUT.to_string()),
        ("KDEDUP_DEAD_LETTER__TOPIC", DLQ.to_string()),
        ("KDEDUP_STORE__PATH", dir.path().join("store").display().to_string()),
        ("KDEDUP_FILTER__EXPECTED_KEYS", "200000".to_string()),
        ("KDEDUP_METRICS__LISTEN", format!("127.0.0.1:{port}")),
        ("KDEDUP_PIPELINE__COMMIT_INTERVAL_MS", "200".to_string()),
        ("KDEDUP_KAFKA__CONSUMER__SESSION_TIMEOUT_MS", "3000".to_string()),
        ("KDEDUP_KAFKA__CONSUMER__HEARTBEAT_INTERVAL_MS", "500".to_string()),
    ];
    let kdedup = Command::new(BIN)
        .args(["run", "--config", "config/kdedup.toml"])
        .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
        .env("KDEDUP_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(kdedup_log)
        .spawn()
        .unwrap();
    let kdedup_pid = kdedup.id();
    let mut children = Children(vec![kdedup]);

    // A Prometheus of this test's own: loopback, a free port, a temporary store,
    // scraping every second and evaluating the shipped alert rules.
    let prom_port = free_port();
    let alerts = std::fs::canonicalize(ALERTS).unwrap();
    let prom_config = dir.path().join("prometheus.yml");
    std::fs::write(
        &prom_config,
        format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nrule_files:\n  - {}\nscrape_configs:\n  - job_name: kdedup\n    static_configs:\n      - targets: ['127.0.0.1:{port}']\n",
            alerts.display()
        ),
    )
    .unwrap();
    let prom_log = std::fs::File::create(dir.path().join("prometheus.log")).unwrap();
    children.0.push(
        Command::new(&prometheus)
            .arg(format!("--config.file={}", prom_config.display()))
            .arg(format!("--storage.tsdb.path={}", dir.path().join("tsdb").display()))
            .arg(format!("--web.listen-address=127.0.0.1:{prom_port}"))
            .arg("--log.level=warn")
            .stdout(Stdio::null())
            .stderr(prom_log)
            .spawn()
            .unwrap(),
    );

    // Load while Prometheus watches: new events with duplicates, continuously.
    let loading = Arc::new(AtomicBool::new(true));
    let load = {
        let (brokers, loading) = (kafka.bootstrap().to_string(), loading.clone());
        tokio::spawn(async move {
            let mut next = 0;
            let mut pace = tokio::time::interval(Duration::from_millis(100));
            while loading.load(Ordering::Relaxed) {
                pace.tick().await;
                let mut batch: Vec<Produce> = (next..next + 400).map(load_event).collect();
                batch.extend((next..next + 100).map(load_event)); // a fifth are duplicates
                next += 400;
                mock::produce_all(&brokers, INPUT, &batch).await.unwrap();
            }
            next
        })
    };

    let logs = || {
        let read = |f: &str| std::fs::read_to_string(dir.path().join(f)).unwrap_or_default();
        format!("kdedup log:\n{}\nprometheus log:\n{}", read("kdedup.log"), read("prometheus.log"))
    };
    let up = r#"up{job="kdedup"} == 1"#;
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let answered = match get(prom_port, "/-/ready".into()).await {
            Some((200, _)) => query(prom_port, up).await["data"]["result"].as_array().is_some_and(|r| !r.is_empty()),
            _ => false,
        };
        if answered {
            break;
        }
        assert!(Instant::now() < deadline, "Prometheus never scraped kdedup\n{}", logs());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // Every panel query returns data. A query Prometheus rejects fails at once;
    // one that stays empty (a metric kdedup does not export, a label it does not
    // set) fails at the deadline.
    let queries = dashboard_queries();
    assert!(queries.len() >= 20, "the dashboard has its panels: {queries:?}");
    // Window adequacy, store availability, sink errors by kind and filter checks
    // by tier have their panels (each must return data below, like every other).
    for metric in [
        "kdedup_duplicate_age_seconds_bucket",
        "kdedup_ttl_seconds",
        "kdedup_duplicates_near_expiry_total",
        "kdedup_expired_key_hits_total",
        "kdedup_store_unavailable_seconds_total",
        "sum by (kind) (rate(kdedup_sink_errors_total",
        "kdedup_filter_checks_total",
    ] {
        assert!(queries.iter().any(|(_, e)| e.contains(metric)), "no dashboard panel queries {metric}");
    }
    assert!(alert_names().contains("KdedupWindowTooShort"), "an alert for a too-short window");
    for (title, expr) in &queries {
        assert!(
            !expr.contains("vector(") && !expr.contains("absent("),
            "panel {title:?} would return data whatever kdedup exports: {expr}"
        );
    }
    let control = query(prom_port, "kdedup_no_such_metric_total").await;
    assert_eq!(control["data"]["result"], Value::Array(vec![]), "an unknown metric returns nothing: {control}");
    let mut pending: Vec<(String, String)> = queries.iter().map(|(t, e)| (t.clone(), substitute(e))).collect();
    let mut last = Value::Null;
    let deadline = Instant::now() + Duration::from_secs(90);
    while !pending.is_empty() && Instant::now() < deadline {
        let mut still = Vec::new();
        for (title, expr) in pending {
            assert!(!expr.contains('$'), "panel {title:?}: a template variable left unsubstituted: {expr}");
            let answer = query(prom_port, &expr).await;
            assert_eq!(answer["status"], "success", "panel {title:?}: Prometheus rejects {expr}: {answer}");
            if answer["data"]["result"].as_array().is_none_or(|r| r.is_empty()) {
                last = answer;
                still.push((title, expr));
            }
        }
        pending = still;
        if !pending.is_empty() {
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }
    assert!(pending.is_empty(), "panels without data: {pending:#?}\nlast answer: {last}\n{}", logs());

    // The status page, under load, in a real browser: a screenshot for the README.
    let browser = program("KDEDUP_TEST_CHROMIUM");
    let page = format!("http://127.0.0.1:{port}/");
    if let Some(browser) = &browser {
        let shot = Path::new(env!("CARGO_TARGET_TMPDIR")).join("status-page.png");
        let _ = std::fs::remove_file(&shot);
        let arg = format!("--screenshot={}", shot.display());
        chromium(browser, &dir.path().join("chromium"), &[&arg, "--window-size=1100,560", &page]);
        let png = std::fs::read(&shot).unwrap_or_else(|e| panic!("no screenshot at {}: {e}", shot.display()));
        assert!(png.starts_with(b"\x89PNG") && png.len() > 10_000, "a real PNG: {} bytes", png.len());
        eprintln!("status page screenshot: {}", shot.display());
    }

    // Every alert rule is loaded, evaluates without error, and its expression parses.
    let deadline = Instant::now() + Duration::from_secs(30);
    let rules = loop {
        let (_, body) = get(prom_port, "/api/v1/rules?type=alert".into()).await.expect("rules API");
        let answer: Value = serde_json::from_str(&body).unwrap();
        let rules: Vec<Value> = answer["data"]["groups"]
            .as_array()
            .into_iter()
            .flatten()
            .flat_map(|g| g["rules"].as_array().cloned().unwrap_or_default())
            .collect();
        if !rules.is_empty() && rules.iter().all(|r| r["health"] == "ok") {
            break rules;
        }
        assert!(Instant::now() < deadline, "alert rules not all healthy: {answer}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let loaded: BTreeSet<String> = rules.iter().map(|r| r["name"].as_str().unwrap().to_string()).collect();
    assert_eq!(loaded, alert_names(), "Prometheus loaded every alert of {ALERTS}");
    for rule in &rules {
        let expr = rule["query"].as_str().unwrap();
        let answer = query(prom_port, expr).await;
        assert_eq!(answer["status"], "success", "alert {}: {expr}: {answer}", rule["name"]);
    }

    // Stop the load; kdedup finishes and commits everything, and its counts add up.
    loading.store(false, Ordering::Relaxed);
    let loaded_events = load.await.unwrap();
    let total = records.len() + loaded_events / 400 * 500;
    let deadline = Instant::now() + Duration::from_secs(60);
    let body = loop {
        let (_, body) = get(port, "/metrics".into()).await.expect("kdedup serves /metrics");
        if sum_of(&body, "kdedup_records_total") == total as f64 {
            break body;
        }
        assert!(Instant::now() < deadline, "kdedup did not finish {total} records:\n{body}\n{}", logs());
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let series = |name: &str| sample(&body, name).unwrap_or_else(|| panic!("{name} missing:\n{body}"));
    assert_eq!(series(r#"kdedup_records_consumed_total{topic="in"}"#), total as f64, "outcomes sum to consumed");
    assert_eq!(series(r#"kdedup_records_total{outcome="dead_letter",topic="in"}"#), BAD as f64);
    assert_eq!(series(r#"kdedup_dead_letters_total{reason="missing_id",topic="in"}"#), BAD as f64);
    assert_eq!(sum_of(&body, "kdedup_dead_letters_total"), BAD as f64, "no other reason");
    assert_eq!(series(r#"kdedup_records_total{outcome="duplicate",topic="in"}"#), (2_000 + loaded_events / 4) as f64);
    assert!(series(r#"kdedup_rebalances_total{kind="assign"}"#) >= 1.0);
    assert_eq!(series(&format!("kdedup_build_info{{version=\"{}\"}}", env!("CARGO_PKG_VERSION"))), 1.0);

    // Once every offset is committed, the status page shows what /metrics says.
    let ends = mock::end_offsets(kafka.bootstrap(), INPUT).unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    let body = loop {
        let (_, body) = get(port, "/metrics".into()).await.expect("kdedup serves /metrics");
        let committed = |p: &i32| sample(&body, &format!(r#"kdedup_committed_offset{{partition="{p}",topic="in"}}"#));
        if ends.iter().all(|(p, end)| committed(p) == Some(*end as f64)) {
            break body;
        }
        assert!(Instant::now() < deadline, "offsets {ends:?} not all committed:\n{body}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let (status, html) = get(port, "/".into()).await.unwrap();
    assert_eq!(status, 200);
    assert!(!html.contains("http://") && !html.contains("https://") && !html.contains("<script src"), "self-contained");
    match &browser {
        Some(browser) => {
            let dom = chromium(browser, &dir.path().join("chromium"), &["--dump-dom", &page]);
            let topic = r#"data-topic="in""#;
            let shown = |key: &str| cell(&dom, topic, key).unwrap_or_else(|| panic!("no {key} cell:\n{dom}"));
            assert_eq!(shown("consumed"), format!("{}", series(r#"kdedup_records_consumed_total{topic="in"}"#)));
            for outcome in kdedup::metrics::OUTCOMES {
                let expected = series(&format!(r#"kdedup_records_total{{outcome="{outcome}",topic="in"}}"#));
                assert_eq!(shown(outcome), format!("{expected}"), "{outcome} on the page");
            }
            let dup = series(r#"kdedup_records_total{outcome="duplicate",topic="in"}"#) / total as f64;
            assert_eq!(shown("duplicate_rate"), format!("{:.1}%", dup * 100.0));
            for (p, end) in &ends {
                let row = format!(r#"data-partition="in/{p}""#);
                assert_eq!(cell(&dom, &row, "committed"), Some(end.to_string()), "partition {p}:\n{dom}");
                let lag = sample(&body, &format!(r#"kdedup_consumer_lag_records{{partition="{p}",topic="in"}}"#));
                let lag = lag.unwrap_or_else(|| panic!("an owned partition has a lag gauge:\n{body}"));
                assert_eq!(cell(&dom, &row, "lag_records"), Some(lag.to_string()), "partition {p}:\n{dom}");
            }
            assert!(dom.contains(r#"id="ready" class="ok">ready<"#), "ready on the page:\n{dom}");
            // Window adequacy: the line `kdedup stats` would print from this same scrape.
            let advice = kdedup::window::Window::from_metrics(&body).advice();
            assert!(dom.contains(&format!(r#"<p id="window">{advice}</p>"#)), "{advice} on the page:\n{dom}");
        }
        None => assert!(html.contains(r#"<tr data-topic="in">"#), "{html}"),
    }

    // SIGTERM: kdedup drains and exits 0.
    assert_eq!(unsafe { libc::kill(kdedup_pid as i32, libc::SIGTERM) }, 0);
    let mut kdedup = children.0.remove(0);
    let status = tokio::task::spawn_blocking(move || kdedup.wait().unwrap()).await.unwrap();
    assert!(status.success(), "kdedup exit {status:?}\n{}", logs());
}
