//! What an operator sees, proven: the alert rules under promtool, the compose
//! file under docker-compose, and a real Prometheus scraping a real `kdedup run`
//! under load, answering every query of every dashboard panel and every alert
//! expression; and another scraping a real `kdedup serve` in front of a small
//! upstream, answering every query of the serve dashboard, with its upstream
//! alert pending on a failing upstream and its store alert quiet.
//!
//! The programs come from scripts/services (Debian's `prometheus`, `chromium`),
//! named by KDEDUP_TEST_PROMTOOL, KDEDUP_TEST_PROMETHEUS, KDEDUP_TEST_CHROMIUM
//! and KDEDUP_TEST_DOCKER_COMPOSE (`docker-compose`, also installed by `up`); a test
//! without its program says "skipped".

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
/// `kdedup serve`'s panels, apart: every panel of DASHBOARD must return data from `kdedup run`.
const SERVE_DASHBOARD: &str = "deploy/grafana/kdedup-serve.json";

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

/// Known series, as promtool's unit tests feed them: on topic `orders` (3
/// partitions), instance a owns partition 0, stalled since second 120; instance
/// b owns partition 1, progressing; nobody owns partition 2. Every record is
/// dead-lettered as missing_id, one a second.
const ON_CALL_SERIES: [(&str, &str); 9] = [
    (r#"kdedup_partition_stalled_since_seconds{job="kdedup",instance="a",topic="orders",partition="0"}"#, "0 0 120x8"),
    (r#"kdedup_partition_stalled_since_seconds{job="kdedup",instance="b",topic="orders",partition="1"}"#, "0x10"),
    (r#"kdedup_assigned_partitions{job="kdedup",instance="a"}"#, "1x10"),
    (r#"kdedup_assigned_partitions{job="kdedup",instance="b"}"#, "1x10"),
    (r#"kdedup_topic_partitions{job="kdedup",instance="a",topic="orders"}"#, "3x10"),
    (r#"kdedup_records_consumed_total{job="kdedup",instance="a",topic="orders"}"#, "0+60x10"),
    (r#"kdedup_records_total{job="kdedup",instance="a",topic="orders",outcome="dead_letter"}"#, "0+60x10"),
    (r#"kdedup_dead_letters_total{job="kdedup",instance="a",topic="orders",reason="missing_id"}"#, "0+60x10"),
    (r#"kdedup_dead_letters_total{job="kdedup",instance="a",topic="orders",reason="invalid_json"}"#, "0x10"),
];

#[test]
fn the_on_call_panels_say_which_partition_stalled_since_when_and_a_whole_dead_lettered_topic_under_promtool() {
    let Some(promtool) = program("KDEDUP_TEST_PROMTOOL") else { return };
    let panels = dashboard_panels(DASHBOARD);
    let expr = |title: &str, i: usize| {
        let panel = panels.iter().find(|p| p["title"] == title).unwrap_or_else(|| panic!("no panel {title:?}"));
        substitute_with(panel["targets"][i]["expr"].as_str().unwrap(), "5m")
    };
    let table = "Stalled partitions: which and since when";
    let owned = "Instances and partitions owned";
    // At 5 minutes (time() = 300): (expression, expected samples as (labels, value)).
    let cases: Vec<(String, Vec<(&str, f64)>)> = vec![
        // Since when, in ms for Grafana's date unit; 0 reads "progressing".
        (
            expr(table, 0),
            vec![
                (r#"{topic="orders",partition="0",instance="a"}"#, 120_000.0),
                (r#"{topic="orders",partition="1",instance="b"}"#, 0.0),
            ],
        ),
        // For how long: 300 - 120 seconds.
        (
            expr(table, 1),
            vec![
                (r#"{topic="orders",partition="0",instance="a"}"#, 180.0),
                (r#"{topic="orders",partition="1",instance="b"}"#, 0.0),
            ],
        ),
        (expr("Stalled partitions", 0), vec![("{}", 1.0)]),
        (expr("Instances", 0), vec![("{}", 2.0)]),
        // Each instance owns one partition of a topic that has three.
        (expr(owned, 0), vec![(r#"{instance="a",topic="orders"}"#, 1.0), (r#"{instance="b",topic="orders"}"#, 1.0)]),
        (expr(owned, 1), vec![(r#"{topic="orders"}"#, 3.0)]),
        // Everything dead-lettered reads 100%, by reason.
        (expr("Dead-letter share", 0), vec![("{}", 1.0)]),
        (
            expr("Dead letters as a share of consumed, by reason", 0),
            vec![(r#"{topic="orders",reason="missing_id"}"#, 1.0), (r#"{topic="orders",reason="invalid_json"}"#, 0.0)],
        ),
    ];
    let mut yaml =
        String::from("rule_files: []\nevaluation_interval: 1m\ntests:\n  - interval: 1m\n    input_series:\n");
    for (series, values) in ON_CALL_SERIES {
        yaml += &format!("      - series: '{series}'\n        values: '{values}'\n");
    }
    yaml += "    promql_expr_test:\n";
    for (expr, samples) in &cases {
        yaml += &format!(
            "      - expr: {}\n        eval_time: 5m\n        exp_samples:\n",
            serde_json::to_string(expr).unwrap()
        );
        for (labels, value) in samples {
            yaml += &format!("          - labels: '{labels}'\n            value: {value}\n");
        }
    }
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("on_call_test.yml");
    std::fs::write(&path, &yaml).unwrap();
    let out = Command::new(&promtool).args(["test", "rules"]).arg(&path).output().unwrap();
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "{text}\n{yaml}");
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

/// Every panel of a dashboard, rows and the panels of collapsed rows included, in order.
fn dashboard_panels(path: &str) -> Vec<Value> {
    let dashboard: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let mut panels = Vec::new();
    for p in dashboard["panels"].as_array().expect("panels") {
        panels.push(p.clone());
        panels.extend(p["panels"].as_array().into_iter().flatten().cloned()); // collapsed rows hold their panels
    }
    panels
}

/// The queries of the panel titled `title`, template variables filled in.
fn panel_queries(path: &str, title: &str) -> Vec<String> {
    let panel = dashboard_panels(path).into_iter().find(|p| p["title"] == title);
    let panel = panel.unwrap_or_else(|| panic!("{path} has no panel {title:?}"));
    panel["targets"].as_array().unwrap().iter().map(|t| substitute(t["expr"].as_str().unwrap())).collect()
}

/// Every query of every panel of a dashboard: (panel title, expression).
fn dashboard_queries(path: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for p in dashboard_panels(path).iter().filter(|p| p["type"] != "row") {
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
    substitute_with(expr, "5s")
}

/// As [`substitute`], with rates over `rate_interval`.
fn substitute_with(expr: &str, rate_interval: &str) -> String {
    let mut e = expr.to_string();
    for (var, value) in [("$__rate_interval", rate_interval), ("$job", ".*"), ("$instance", ".*"), ("$topic", ".*")] {
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

/// A Prometheus of this test's own: loopback, a free port, a temporary store in
/// `dir`, scraping 127.0.0.1:`target` every second as `job` and evaluating the
/// shipped alert rules. Its port; the process joins `children`.
fn start_prometheus(program: &str, dir: &Path, job: &str, target: u16, children: &mut Children) -> u16 {
    let port = free_port();
    let alerts = std::fs::canonicalize(ALERTS).unwrap();
    let config = dir.join("prometheus.yml");
    std::fs::write(
        &config,
        format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nrule_files:\n  - {}\nscrape_configs:\n  - job_name: {job}\n    static_configs:\n      - targets: ['127.0.0.1:{target}']\n",
            alerts.display()
        ),
    )
    .unwrap();
    let log = std::fs::File::create(dir.join("prometheus.log")).unwrap();
    children.0.push(
        Command::new(program)
            .arg(format!("--config.file={}", config.display()))
            .arg(format!("--storage.tsdb.path={}", dir.join("tsdb").display()))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .arg("--log.level=warn")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap(),
    );
    port
}

/// Waits until Prometheus answers and has scraped `job` once.
async fn wait_scraped(prom_port: u16, job: &str, logs: &dyn Fn() -> String) {
    let up = format!(r#"up{{job="{job}"}} == 1"#);
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let answered = match get(prom_port, "/-/ready".into()).await {
            Some((200, _)) => query(prom_port, &up).await["data"]["result"].as_array().is_some_and(|r| !r.is_empty()),
            _ => false,
        };
        if answered {
            return;
        }
        assert!(Instant::now() < deadline, "Prometheus never scraped {job}\n{}", logs());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Every query returns data. A query Prometheus rejects fails at once; one that
/// stays empty (a metric the process does not export, a label it does not set)
/// fails at the deadline.
async fn every_query_returns_data(prom_port: u16, queries: &[(String, String)], logs: &dyn Fn() -> String) {
    for (title, expr) in queries {
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
}

/// Every alert rule is loaded and healthy, and its expression parses; the rules as
/// Prometheus's rules API lists them (with their `state`).
async fn healthy_rules(prom_port: u16) -> Vec<Value> {
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
    rules
}

/// The values of an instant query: (labels, value) per series.
async fn values(prom_port: u16, expr: &str) -> Vec<(Value, f64)> {
    let answer = query(prom_port, expr).await;
    assert_eq!(answer["status"], "success", "{expr}: {answer}");
    let result = answer["data"]["result"].as_array().cloned().unwrap_or_default();
    result
        .iter()
        .map(|r| (r["metric"].clone(), r["value"][1].as_str().unwrap().parse::<f64>().unwrap_or(f64::NAN)))
        .collect()
}

/// The run dashboard's shape for the questions asked at night (issue: "the
/// dashboard answers on-call questions at a glance"): a first row of single
/// numbers, stalled partitions by name and time, dead letters as a share, the
/// duplicate age on a log axis, CPU and memory apart, instances and ownership.
fn dashboard_answers_on_call_questions() {
    let panels = dashboard_panels(DASHBOARD);
    assert_eq!(panels[0]["type"], "row");
    assert_eq!(panels[0]["title"], "Right now");
    let first_row: Vec<&Value> = panels[1..].iter().take_while(|p| p["type"] != "row").collect();
    let titles: Vec<&str> = first_row.iter().map(|p| p["title"].as_str().unwrap()).collect();
    assert_eq!(
        titles,
        ["Events in /s", "Emitted /s", "Duplicate share", "Dead-letter share", "Stalled partitions", "Instances"],
        "the Right now row"
    );
    assert!(first_row.iter().all(|p| p["type"] == "stat"), "single numbers: {titles:?}");
    let panel = |title: &str| {
        panels.iter().find(|p| p["title"] == title).unwrap_or_else(|| panic!("no panel {title:?}")).clone()
    };
    let stalled = panel("Stalled partitions: which and since when");
    assert_eq!(stalled["type"], "table");
    let exprs: Vec<&str> = stalled["targets"].as_array().unwrap().iter().map(|t| t["expr"].as_str().unwrap()).collect();
    assert!(exprs
        .iter()
        .all(|e| e.contains("kdedup_partition_stalled_since_seconds") && e.contains("topic, partition")));
    let dead = panel("Dead letters as a share of consumed, by reason");
    assert_eq!(dead["fieldConfig"]["defaults"]["unit"], "percentunit");
    let dead_expr = dead["targets"][0]["expr"].as_str().unwrap();
    assert!(dead_expr.contains("by (topic, reason)") && dead_expr.contains("/ on (topic) group_left"), "{dead_expr}");
    assert!(dead_expr.contains("kdedup_records_consumed_total"), "{dead_expr}");
    let age = panel("Duplicate age vs TTL (log scale)");
    assert_eq!(age["fieldConfig"]["defaults"]["custom"]["scaleDistribution"]["type"], "log");
    for p in &panels {
        let text = p["targets"].to_string();
        assert!(
            !(text.contains("process_cpu_seconds_total") && text.contains("process_resident_memory_bytes")),
            "CPU cores and bytes share panel {:?}",
            p["title"]
        );
    }
    let owned = panel("Instances and partitions owned");
    assert!(owned["targets"].to_string().contains("kdedup_topic_partitions"));
}

/// Under load from one `kdedup run` owning both partitions of `in`: the Right
/// now numbers, the stalled table and the ownership panel say so.
async fn on_call_panels_answer(prom_port: u16) {
    let one = |v: Vec<(Value, f64)>, what: &str| {
        assert_eq!(v.len(), 1, "{what}: one series: {v:?}");
        v[0].1
    };
    let instances = panel_queries(DASHBOARD, "Instances");
    assert_eq!(one(values(prom_port, &instances[0]).await, "Instances"), 1.0);
    let stalled = panel_queries(DASHBOARD, "Stalled partitions");
    assert_eq!(one(values(prom_port, &stalled[0]).await, "Stalled partitions"), 0.0);
    // The table: both owned partitions by name, neither stalled (since 0, for 0 s).
    for expr in panel_queries(DASHBOARD, "Stalled partitions: which and since when") {
        let rows = values(prom_port, &expr).await;
        let mut partitions: Vec<String> = rows
            .iter()
            .map(|(m, _)| format!("{}/{}", m["topic"].as_str().unwrap(), m["partition"].as_str().unwrap()))
            .collect();
        partitions.sort();
        assert_eq!(partitions, ["in/0", "in/1"], "{expr}: {rows:?}");
        assert!(rows.iter().all(|(_, v)| *v == 0.0), "nothing stalled: {expr}: {rows:?}");
    }
    let owned = panel_queries(DASHBOARD, "Instances and partitions owned");
    let by_instance = values(prom_port, &owned[0]).await;
    assert_eq!(by_instance.len(), 1, "one instance owns partitions of one topic: {by_instance:?}");
    assert_eq!((by_instance[0].0["topic"].as_str(), by_instance[0].1), (Some("in"), 2.0), "{by_instance:?}");
    let topic = values(prom_port, &owned[1]).await;
    assert_eq!(topic.len(), 1, "{topic:?}");
    assert_eq!((topic[0].0["topic"].as_str(), topic[0].1), (Some("in"), 2.0), "the topic has 2 partitions: {topic:?}");
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

    let prom_port = start_prometheus(&prometheus, dir.path(), "kdedup", port, &mut children);

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
    wait_scraped(prom_port, "kdedup", &logs).await;

    // Every panel query returns data (every_query_returns_data).
    let queries = dashboard_queries(DASHBOARD);
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
        "kdedup_partition_stalled_since_seconds",
        "kdedup_topic_partitions",
        "kdedup_assigned_partitions",
    ] {
        assert!(queries.iter().any(|(_, e)| e.contains(metric)), "no dashboard panel queries {metric}");
    }
    assert!(alert_names().contains("KdedupWindowTooShort"), "an alert for a too-short window");
    dashboard_answers_on_call_questions();
    every_query_returns_data(prom_port, &queries, &logs).await;
    on_call_panels_answer(prom_port).await;

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
    let rules = healthy_rules(prom_port).await;
    // One instance owns both partitions of `in`: none is unowned.
    let unowned = rules.iter().find(|r| r["name"] == "KdedupPartitionsUnowned").expect("the unowned-partitions rule");
    let unowned = values(prom_port, unowned["query"].as_str().unwrap()).await;
    assert!(unowned.is_empty(), "no partition of `in` is unowned: {unowned:?}");

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

/// A small upstream on loopback for `kdedup serve`: `/fail` answers 503, any
/// other path 201; `x-test-delay-ms` makes it wait first. It counts its calls
/// per `Idempotency-Key`.
struct Upstream {
    addr: std::net::SocketAddr,
    calls: Arc<std::sync::Mutex<std::collections::HashMap<String, usize>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Upstream {
    async fn start() -> Upstream {
        use hyper::service::service_fn;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let calls = Arc::new(std::sync::Mutex::new(std::collections::HashMap::new()));
        let seen = calls.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else { continue };
                let seen = seen.clone();
                let service = service_fn(move |request: hyper::Request<hyper::body::Incoming>| {
                    let seen = seen.clone();
                    async move {
                        let header = |name: &str| {
                            request.headers().get(name).map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
                        };
                        let key = header("idempotency-key").unwrap_or_default();
                        let delay = header("x-test-delay-ms").map_or(0, |d| d.parse::<u64>().unwrap());
                        *seen.lock().unwrap().entry(key).or_insert(0) += 1;
                        tokio::time::sleep(Duration::from_millis(delay)).await;
                        let status = if request.uri().path() == "/fail" { 503 } else { 201 };
                        let response = hyper::Response::builder()
                            .status(status)
                            .header("content-type", "application/json")
                            .body(http_body_util::Full::new(bytes::Bytes::from_static(br#"{"ok":true}"#)))
                            .unwrap();
                        Ok::<_, std::convert::Infallible>(response)
                    }
                });
                tokio::spawn(async move {
                    let io = hyper_util::rt::TokioIo::new(stream);
                    let _ = hyper::server::conn::http1::Builder::new().serve_connection(io, service).await;
                });
            }
        });
        Upstream { addr, calls, task }
    }

    fn calls(&self, key: &str) -> usize {
        self.calls.lock().unwrap().get(key).copied().unwrap_or(0)
    }
}

impl Drop for Upstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// One round of traffic through `kdedup serve`, every outcome but upstream_error
/// once; returns the requests sent by the outcome serve must count for each.
async fn serve_round(
    client: &reqwest::Client,
    serve: &str,
    upstream: &Upstream,
    round: usize,
) -> [(&'static str, u64); 7] {
    let post = |path: &str, key: Option<String>, body: &'static str| {
        let mut request = client.post(format!("{serve}{path}")).body(body);
        if let Some(key) = key {
            request = request.header("Idempotency-Key", key);
        }
        request
    };
    let status = |r: reqwest::Response| r.status().as_u16();
    let key = format!("k-{round}");
    assert_eq!(status(post("/pay", Some(key.clone()), "a").send().await.unwrap()), 201, "first");
    let again = post("/pay", Some(key.clone()), "a").send().await.unwrap();
    assert_eq!(again.headers().get("idempotent-replayed").map(|v| v.as_bytes()), Some(&b"true"[..]), "replayed");
    assert_eq!(status(post("/pay", Some(key), "b").send().await.unwrap()), 422, "the key with another body");
    assert_eq!(status(post("/pay", None, "c").send().await.unwrap()), 201, "no key: passed through");
    assert_eq!(status(post("/fail", Some(format!("f-{round}")), "d").send().await.unwrap()), 503, "a 5xx, recorded");
    let long = "x".repeat(300); // over max_key_bytes
    assert_eq!(status(post("/pay", Some(long), "e").send().await.unwrap()), 400, "refused");
    // A key in progress: the first waits 2 s upstream, the second gives up after wait_ms.
    let slow = format!("s-{round}");
    let first = post("/pay", Some(slow.clone()), "f").header("x-test-delay-ms", "2000").send();
    let first = tokio::spawn(first);
    while upstream.calls(&slow) == 0 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert_eq!(status(post("/pay", Some(slow), "f").send().await.unwrap()), 409, "in progress");
    assert_eq!(status(first.await.unwrap().unwrap()), 201);
    [
        ("first", 3),
        ("replayed", 1),
        ("conflict", 1),
        ("passed_through", 1),
        ("refused", 1),
        ("in_progress", 1),
        ("upstream_error", 0),
    ]
}

/// `kdedup serve` in front of `upstream` with this `[store]` section, wait_ms 20,
/// metrics on a port of its own, logging to `dir/serve.log`; once /readyz answers
/// 200 (a request to the proxy would count as traffic): (pid, proxy port, metrics port).
async fn spawn_serve(
    dir: &Path,
    upstream: std::net::SocketAddr,
    store: &str,
    children: &mut Children,
    logs: &dyn Fn() -> String,
) -> (u32, u16, u16) {
    let (serve_port, metrics_port) = (free_port(), free_port());
    let config = dir.join("serve.toml");
    std::fs::write(
        &config,
        format!(
            "[serve]\nlisten = \"127.0.0.1:{serve_port}\"\nupstream = \"http://{upstream}\"\nscope = \"observe\"\n\
             wait_ms = 20\n{store}[metrics]\nlisten = \"127.0.0.1:{metrics_port}\"\n",
        ),
    )
    .unwrap();
    let log = std::fs::File::create(dir.join("serve.log")).unwrap();
    let serve = Command::new(BIN)
        .args(["serve", "--config"])
        .arg(&config)
        .env("KDEDUP_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap();
    let pid = serve.id();
    children.0.push(serve);
    let deadline = Instant::now() + Duration::from_secs(30);
    while get(metrics_port, "/readyz".into()).await.map(|r| r.0) != Some(200) {
        assert!(Instant::now() < deadline, "kdedup serve never became ready\n{}", logs());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    (pid, serve_port, metrics_port)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_real_prometheus_scraping_kdedup_serve_answers_every_serve_panel_and_its_upstream_alert_goes_pending() {
    let Some(prometheus) = program("KDEDUP_TEST_PROMETHEUS") else { return };
    let upstream = Upstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let store = format!("[store]\npath = \"{}\"\n", dir.path().join("store").display());
    let mut children = Children(Vec::new());
    let logs = || {
        let read = |f: &str| std::fs::read_to_string(dir.path().join(f)).unwrap_or_default();
        format!("serve log:\n{}\nprometheus log:\n{}", read("serve.log"), read("prometheus.log"))
    };
    let (serve_pid, serve_port, metrics_port) =
        spawn_serve(dir.path(), upstream.addr, &store, &mut children, &logs).await;
    let prom_port = start_prometheus(&prometheus, dir.path(), "kdedup-serve", metrics_port, &mut children);

    // Traffic while Prometheus watches: every outcome, a quarter of the upstream calls 5xx.
    let sending = Arc::new(AtomicBool::new(true));
    let traffic = {
        let (sending, url, upstream) = (sending.clone(), format!("http://127.0.0.1:{serve_port}"), Arc::new(upstream));
        tokio::spawn(async move {
            let client = reqwest::Client::new();
            let mut sent: std::collections::BTreeMap<&'static str, u64> = Default::default();
            let mut round = 0;
            while sending.load(Ordering::Relaxed) {
                for (outcome, n) in serve_round(&client, &url, &upstream, round).await {
                    *sent.entry(outcome).or_default() += n;
                }
                round += 1;
            }
            (sent, round)
        })
    };
    wait_scraped(prom_port, "kdedup-serve", &logs).await;

    let queries = dashboard_queries(SERVE_DASHBOARD);
    for metric in [
        "kdedup_serve_requests_total",
        "kdedup_serve_added_seconds_bucket",
        "kdedup_serve_upstream_seconds_bucket",
        "kdedup_serve_upstream_responses_total",
        "kdedup_serve_store_errors_total",
    ] {
        assert!(queries.iter().any(|(_, e)| e.contains(metric)), "no serve panel queries {metric}");
    }
    assert!(
        !dashboard_queries(DASHBOARD).iter().any(|(_, e)| e.contains("kdedup_serve_")),
        "serve panels live on their own dashboard: the run dashboard's must all answer from kdedup run"
    );
    every_query_returns_data(prom_port, &queries, &logs).await;
    let instances = panel_queries(SERVE_DASHBOARD, "Instances");
    assert_eq!(values(prom_port, &instances[0]).await.iter().map(|v| v.1).collect::<Vec<_>>(), [1.0]);
    // Every outcome the traffic makes is a series of Requests by outcome (rates may be 0 at a moment).
    let by_outcome = &panel_queries(SERVE_DASHBOARD, "Requests by outcome")[0];
    let outcomes: BTreeSet<String> =
        values(prom_port, by_outcome).await.iter().map(|(m, _)| m["outcome"].as_str().unwrap().to_string()).collect();
    let expected: BTreeSet<String> = kdedup::metrics::SERVE_OUTCOMES.iter().map(|o| o.to_string()).collect();
    assert_eq!(outcomes, expected);

    // The rules: all healthy. The upstream alert's expression holds (a quarter
    // of the calls answer 503): pending, its `for` not yet run out. The store
    // alert stays quiet: the embedded store answers every call.
    healthy_rules(prom_port).await;
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let rules = healthy_rules(prom_port).await;
        let state = |name: &str| {
            let rule = rules.iter().find(|r| r["name"] == name).unwrap_or_else(|| panic!("no rule {name}"));
            rule["state"].as_str().unwrap().to_string()
        };
        assert_eq!(state("KdedupServeStoreErrors"), "inactive");
        if state("KdedupServeUpstreamErrors") != "inactive" {
            break;
        }
        assert!(Instant::now() < deadline, "KdedupServeUpstreamErrors never pending: {rules:#?}\n{}", logs());
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let store_errors = values(prom_port, "sum(kdedup_serve_store_errors_total)").await;
    assert_eq!(store_errors.iter().map(|v| v.1).collect::<Vec<_>>(), [0.0], "no store call failed");

    // Traffic stops; serve's counts are exactly what was sent.
    sending.store(false, Ordering::Relaxed);
    let (sent, rounds) = traffic.await.unwrap();
    let (_, body) = get(metrics_port, "/metrics".into()).await.expect("serve's /metrics");
    for (outcome, n) in &sent {
        let series = format!(r#"kdedup_serve_requests_total{{outcome="{outcome}"}}"#);
        assert_eq!(sample(&body, &series), Some(*n as f64), "{outcome} after {rounds} rounds:\n{body}");
    }
    let class = |c: &str| sample(&body, &format!(r#"kdedup_serve_upstream_responses_total{{class="{c}"}}"#));
    // Upstream calls per round: the first of k-, the passed-through, the 503 of f-, the slow s-.
    assert_eq!(class("2xx"), Some(3.0 * rounds as f64), "{body}");
    assert_eq!(class("5xx"), Some(rounds as f64), "{body}");
    assert_eq!(class("unreachable"), Some(0.0), "{body}");

    // SIGTERM: serve drains and exits 0.
    assert_eq!(unsafe { libc::kill(serve_pid as i32, libc::SIGTERM) }, 0);
    let mut serve = children.0.remove(0);
    let status = tokio::task::spawn_blocking(move || serve.wait().unwrap()).await.unwrap();
    assert!(status.success(), "serve exit {status:?}\n{}", logs());
    drop(children);
}

/// The state of one alert rule in Prometheus's rules API, and its alerts.
async fn rule_state(prom_port: u16, name: &str) -> (String, Vec<Value>) {
    let rules = healthy_rules(prom_port).await;
    let rule = rules.iter().find(|r| r["name"] == name).unwrap_or_else(|| panic!("no rule {name}"));
    (rule["state"].as_str().unwrap().to_string(), rule["alerts"].as_array().cloned().unwrap_or_default())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kdedup_serve_on_postgres_whose_table_is_dropped_answers_503_and_its_store_alert_goes_pending() {
    let Some(prometheus) = program("KDEDUP_TEST_PROMETHEUS") else { return };
    let Ok(url) = std::env::var("KDEDUP_TEST_POSTGRES") else {
        eprintln!("skipped: KDEDUP_TEST_POSTGRES is not set (scripts/services env prints it)");
        return;
    };
    // A schema of this test's own on the shared server: dropping its table breaks nobody else.
    let schema = unique("observe_serve").replace('-', "_");
    let (admin, connection) = tokio_postgres::connect(&url, tokio_postgres::NoTls).await.unwrap();
    tokio::spawn(connection);
    let sql = include_str!("../../schemas/postgres.sql");
    admin.batch_execute(&format!("CREATE SCHEMA {schema}; SET search_path TO {schema}; {sql}")).await.unwrap();
    let separator = if url.contains('?') { '&' } else { '?' };
    let store = format!(
        "[store]\nkind = \"postgres\"\nurl = \"{url}{separator}options=-c%20search_path%3D{schema}\"\npool_size = 2\n"
    );

    let upstream = Upstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let mut children = Children(Vec::new());
    let logs = || {
        let read = |f: &str| std::fs::read_to_string(dir.path().join(f)).unwrap_or_default();
        format!("serve log:\n{}\nprometheus log:\n{}", read("serve.log"), read("prometheus.log"))
    };
    let (_, serve_port, metrics_port) = spawn_serve(dir.path(), upstream.addr, &store, &mut children, &logs).await;
    let prom_port = start_prometheus(&prometheus, dir.path(), "kdedup-serve", metrics_port, &mut children);
    wait_scraped(prom_port, "kdedup-serve", &logs).await;
    let client = reqwest::Client::new();
    let pay = |key: String| client.post(format!("http://127.0.0.1:{serve_port}/pay")).header("Idempotency-Key", key);
    let answer = pay("before".into()).body("a").send().await.unwrap();
    assert_eq!(answer.status().as_u16(), 201, "the store answers: {}", logs());
    assert_eq!(rule_state(prom_port, "KdedupServeStoreErrors").await.0, "inactive");

    // The table goes: every claim fails, answered 503 and counted, and the alert goes pending.
    admin.batch_execute(&format!("DROP TABLE {schema}.kdedup_claims")).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut sent = 0;
    let alerts = loop {
        let answer = pay(format!("after-{sent}")).body("a").send().await.unwrap();
        sent += 1;
        assert_eq!(answer.status().as_u16(), 503, "a failed claim is 503");
        assert_eq!(answer.headers().get("retry-after").map(|v| v.as_bytes()), Some(&b"1"[..]));
        let (state, alerts) = rule_state(prom_port, "KdedupServeStoreErrors").await;
        if state != "inactive" {
            break alerts;
        }
        assert!(Instant::now() < deadline, "KdedupServeStoreErrors never pending\n{}", logs());
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(alerts.len(), 1, "{alerts:?}");
    assert_eq!(alerts[0]["labels"]["op"], "claim", "{alerts:?}");
    let by_op = &panel_queries(SERVE_DASHBOARD, "Store errors by op")[0];
    let claim = values(prom_port, by_op).await.into_iter().find(|(m, _)| m["op"] == "claim");
    assert!(claim.is_some_and(|(_, rate)| rate > 0.0), "the panel shows failing claims");
    let (_, body) = get(metrics_port, "/metrics".into()).await.expect("serve's /metrics");
    let failed = sample(&body, r#"kdedup_serve_store_errors_total{op="claim"}"#).unwrap();
    assert_eq!(failed, sent as f64, "each failed claim counted once:\n{body}");
    assert_eq!(upstream.calls("before"), 1);
    assert_eq!(upstream.calls.lock().unwrap().len(), 1, "no request ran without its claim");
    drop(children);
    admin.batch_execute(&format!("DROP SCHEMA {schema} CASCADE")).await.unwrap();
}
