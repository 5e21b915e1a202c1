//! Is the window long enough, and what would dedup do: the window-adequacy
//! metrics under duplicates that arrive early, near the TTL and after it (read
//! back from `/metrics` over HTTP and by `kdedup stats`), and observe mode's
//! output read back by an independent consumer.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use kdedup::mock::{self, Produce};
use kdedup::sink::kafka::headers;
use kdedup::source::StopMode;
use kdedup::testkit::Faults;

use crate::utils::*;

fn record(id: &str, partition: i32, payload: &str) -> Produce {
    Produce {
        partition,
        key: Some(id.as_bytes().to_vec()),
        payload: Some(payload.as_bytes().to_vec()),
        headers: vec![("event-id".into(), id.as_bytes().to_vec())],
    }
}

fn ids(range: std::ops::Range<usize>) -> Vec<Produce> {
    range.map(|i| record(&format!("w-{i:04}"), (i % 2) as i32, &format!(r#"{{"n":{i}}}"#))).collect()
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// `/metrics` as a scraper sees it.
async fn scrape(port: u16) -> String {
    let (status, body) =
        tokio::task::spawn_blocking(move || http_get(port, "/metrics")).await.unwrap().expect("kdedup serves /metrics");
    assert_eq!(status, 200);
    body
}

/// One sample line's value, 0 when absent.
fn value(body: &str, series: &str) -> f64 {
    body.lines().find_map(|l| l.strip_prefix(series).and_then(|v| v.trim().parse().ok())).unwrap_or(0.0)
}

/// The cumulative count of the duplicate-age histogram's largest bucket at or below `secs`.
fn ages_at_most(body: &str, secs: f64) -> f64 {
    body.lines()
        .filter(|l| l.starts_with("kdedup_duplicate_age_seconds_bucket{") && l.contains(r#"topic="in""#))
        .filter_map(|l| {
            let le: f64 = l.split_once(r#"le=""#)?.1.split_once('"')?.0.parse().ok()?;
            (le <= secs).then(|| l.rsplit_once(' ')?.1.parse::<f64>().ok())?
        })
        .fold(0.0, f64::max)
}

async fn sleep_until(at: Instant) {
    tokio::time::sleep_until(tokio::time::Instant::from_std(at)).await;
}

/// Duplicates early in the window, near its end, and after it, against a 24 s
/// TTL. Counters read back over HTTP must say: 100 duplicates, 50 of them
/// older than 90% of the TTL, and 50 `new` events that were duplicates of
/// keys that had just expired (while 20 never-seen keys count nothing).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn duplicates_near_and_after_the_ttl_are_measured_and_stats_advises() {
    const TTL_SECS: u64 = 24;
    let kafka = cluster(2);
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let ttl = TTL_SECS.to_string();
    let config = config(
        &kafka,
        &unique("window"),
        dir.path(),
        &[("KDEDUP_STORE__TTL_SECS", &ttl), ("KDEDUP_STORE__LEASE_SECS", "5"), ("KDEDUP_METRICS__LISTEN", &listen)],
    );
    let running = start_serving(config);
    let metrics = running.metrics.clone();
    let finished = |n: u64| {
        let m = metrics.clone();
        move || {
            let done = m.records.get() >= n;
            async move { done }
        }
    };

    // In the group first, so that the originals' claims are made close together.
    let m = metrics.clone();
    wait_for("both partitions assigned", Duration::from_secs(30), move || {
        let assigned = m.assigned_partitions.get() == 2;
        async move { assigned }
    })
    .await;
    // 150 originals; every claim is made between t0 and t1.
    let t0 = Instant::now();
    mock::produce_all(kafka.bootstrap(), INPUT, &ids(0..150)).await.unwrap();
    wait_all_committed(&kafka, &metrics).await;
    let t1 = Instant::now();
    assert!(
        t1 - t0 < Duration::from_millis(1500),
        "the originals took {:?} to finish: too slow for the timing this test relies on",
        t1 - t0
    );

    // Early duplicates of 0..50: young.
    mock::produce_all(kafka.bootstrap(), INPUT, &ids(0..50)).await.unwrap();
    wait_for("the early duplicates", Duration::from_secs(30), finished(200)).await;
    let body = scrape(port).await;
    assert_eq!(value(&body, r#"kdedup_records_total{outcome="duplicate",topic="in"}"#), 50.0);
    assert_eq!(value(&body, r#"kdedup_duplicates_near_expiry_total{topic="in"}"#), 0.0, "young duplicates");
    assert_eq!(value(&body, "kdedup_ttl_seconds"), TTL_SECS as f64);

    // Near the end of the window: past 90% of the TTL since the latest claim
    // (t1), before the TTL since the earliest (t0).
    let near = t1 + Duration::from_millis(TTL_SECS * 1000 * 9 / 10 + 200);
    sleep_until(near).await;
    mock::produce_all(kafka.bootstrap(), INPUT, &ids(50..100)).await.unwrap();
    wait_for("the late duplicates", Duration::from_secs(30), finished(250)).await;
    assert!(
        Instant::now() < t0 + Duration::from_secs(TTL_SECS),
        "the late duplicates were decided after the TTL: the machine is too slow for this test's timing"
    );
    let body = scrape(port).await;
    assert_eq!(value(&body, r#"kdedup_records_total{outcome="duplicate",topic="in"}"#), 100.0);
    assert_eq!(value(&body, r#"kdedup_duplicates_near_expiry_total{topic="in"}"#), 50.0, "{body}");
    assert_eq!(value(&body, r#"kdedup_duplicate_age_seconds_count{topic="in"}"#), 100.0);
    assert_eq!(ages_at_most(&body, 16.5), 50.0, "the early ones are young, the late ones over 16 s:\n{body}");
    assert_eq!(value(&body, r#"kdedup_expired_key_hits_total{topic="in"}"#), 0.0);

    // After the TTL: copies of 100..150 are new again (the store no longer
    // sees them), and counted as expired-key hits; 20 never-seen keys are not.
    sleep_until(t1 + Duration::from_millis(TTL_SECS * 1000 + 500)).await;
    let mut late = ids(100..150);
    late.extend(ids(1000..1020));
    mock::produce_all(kafka.bootstrap(), INPUT, &late).await.unwrap();
    wait_for("the expired ones", Duration::from_secs(30), finished(320)).await;
    let body = scrape(port).await;
    assert_eq!(value(&body, r#"kdedup_records_total{outcome="new",topic="in"}"#), 220.0);
    assert_eq!(value(&body, r#"kdedup_records_total{outcome="duplicate",topic="in"}"#), 100.0);
    assert_eq!(value(&body, r#"kdedup_expired_key_hits_total{topic="in"}"#), 50.0, "{body}");

    // `kdedup stats` reads the same endpoint and says what it means.
    let out = std::process::Command::new(BIN).args(["stats", "--url", &format!("http://{listen}")]).output().unwrap();
    let line = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(out.status.success(), "{line}{}", String::from_utf8_lossy(&out.stderr));
    assert!(
        line.starts_with(
            "ttl_secs covers 66.7% of duplicates seen; 50.0% arrived within 10% of expiry; raise ttl_secs (now 24)"
        ),
        "{line}"
    );
    let out = std::process::Command::new(BIN).args(["stats", "--url", &listen, "--json"]).output().unwrap();
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!((json["duplicates"].as_f64(), json["expired_key_hits"].as_f64()), (Some(100.0), Some(50.0)), "{json}");
    // The status page shows the same advice.
    let (_, page) = tokio::task::spawn_blocking(move || http_get(port, "/")).await.unwrap().unwrap();
    assert!(page.contains("covers 66.7% of duplicates seen"), "{page}");
    running.stop(StopMode::Drain).await;
}

/// What observe mode should stamp on a record: new, a duplicate of the
/// record at (partition, offset), or a conflict.
#[derive(Clone, Copy)]
enum Stamp {
    New,
    Duplicate(i32, i64),
    Conflict,
}

/// Observe mode on a stream with duplicates, conflicts and bad records: an
/// independent consumer finds every keyed input record in the output once,
/// stamped kdedup-duplicate true|false with the first occurrence's position;
/// offsets are committed to the end as in enforce mode; and the claims it made
/// are real: enforce mode on the same store afterwards emits nothing again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn observe_mode_forwards_every_record_stamped_and_its_claims_hold_for_enforce() {
    let kafka = cluster(2);
    let (mut records, _) = events(300, 100, 2, 12);
    // Conflicts: an early ID again with other content, on its own partition.
    for (n, i) in [3usize, 40, 77, 150, 299].into_iter().enumerate() {
        let id = format!("evt-{i:06}");
        records.push(record(&id, (i % 2) as i32, &format!(r#"{{"other":{n}}}"#)));
    }
    // Bad records (no ID): dead-lettered in both modes.
    for p in [0, 1, 0] {
        records.push(Produce { partition: p, key: None, payload: Some(b"{}".to_vec()), headers: vec![] });
    }
    mock::produce_all(kafka.bootstrap(), INPUT, &records).await.unwrap();

    let dir = tempfile::tempdir().unwrap();
    let group = unique("observe-mode");
    // One dedup scope for both runs below (it defaults to the group ID).
    let scope = ("KDEDUP_KEY__SCOPE", "orders");
    let running =
        start(config(&kafka, &group, dir.path(), &[("KDEDUP_PIPELINE__MODE", "observe"), scope]), Faults::default());
    wait_all_committed(&kafka, &running.metrics).await;
    let metrics = running.metrics.clone();
    running.stop(StopMode::Drain).await;

    // Offsets: committed to the end, behind the forwarded records, as in enforce mode.
    let ends = mock::end_offsets(kafka.bootstrap(), INPUT).unwrap();
    assert_eq!(mock::committed_offsets(kafka.bootstrap(), &group, INPUT).unwrap(), ends);
    assert_eq!(metrics.outcome("new"), 300);
    assert_eq!(metrics.outcome("duplicate"), 100);
    assert_eq!(metrics.outcome("conflict"), 5);
    assert_eq!(metrics.outcome("dead_letter"), 3);
    assert_outcomes_sum(&metrics);

    // The expected stamp of every keyed input record, from the input itself:
    // per ID, the first record (by offset; copies share a partition) is new,
    // later ones with the same payload are duplicates of it, others conflicts.
    let input = mock::read_all(kafka.bootstrap(), INPUT).unwrap();
    let mut first: HashMap<String, (i32, i64, Vec<u8>)> = HashMap::new();
    let mut expected: HashMap<(i32, i64), Stamp> = HashMap::new();
    let mut sorted: Vec<_> = input.iter().collect();
    sorted.sort_by_key(|r| (r.partition, r.offset));
    for r in sorted {
        let Some(id) = r.header_str("event-id") else { continue };
        let payload = r.payload.clone().unwrap_or_default();
        let stamp = match first.get(id) {
            None => {
                first.insert(id.to_string(), (r.partition, r.offset, payload));
                Stamp::New
            }
            Some((p, o, original)) if *original == payload => Stamp::Duplicate(*p, *o),
            Some(_) => Stamp::Conflict,
        };
        expected.insert((r.partition, r.offset), stamp);
    }
    assert_eq!(expected.len(), 405);

    let output = mock::read_all(kafka.bootstrap(), OUTPUT).unwrap();
    assert_eq!(output.len(), 405, "every keyed input record is forwarded once");
    let mut seen = std::collections::HashSet::new();
    for r in &output {
        let h = |name| r.header_str(name);
        let source: (i32, i64) = (
            h(headers::SOURCE_PARTITION).unwrap().parse().unwrap(),
            h(headers::SOURCE_OFFSET).unwrap().parse().unwrap(),
        );
        assert!(seen.insert(source), "{source:?} forwarded twice");
        let stamp = expected[&source];
        let duplicate = h(headers::DUPLICATE);
        let conflict = h(headers::CONFLICT);
        let at = h(headers::FIRST_PARTITION)
            .map(|p| (p.parse::<i32>().unwrap(), h(headers::FIRST_OFFSET).unwrap().parse::<i64>().unwrap()));
        match stamp {
            Stamp::New => assert_eq!((duplicate, conflict, at), (Some("false"), None, None), "{source:?}"),
            Stamp::Duplicate(p, o) => {
                assert_eq!((duplicate, conflict), (Some("true"), None), "{source:?}");
                assert_eq!(at, Some((p, o)), "{source:?}: the first occurrence's position");
                assert_eq!(h(headers::FIRST_TOPIC), Some(INPUT));
            }
            Stamp::Conflict => assert_eq!((duplicate, conflict), (Some("false"), Some("true")), "{source:?}"),
        }
        assert_eq!(h(headers::POSSIBLE_REPEAT), None, "a clean run repeats nothing");
    }
    let dead = mock::read_all(kafka.bootstrap(), DLQ).unwrap();
    assert_eq!(dead.len(), 3, "records without an ID are dead-lettered, as in enforce mode");

    // Switching to enforce on the same store: the claims observe mode made
    // hold, so a fresh group reading the same input from the start emits nothing.
    let group = unique("enforce-after");
    let running = start(config(&kafka, &group, dir.path(), &[scope]), Faults::default());
    wait_all_committed(&kafka, &running.metrics).await;
    let metrics = running.metrics.clone();
    running.stop(StopMode::Drain).await;
    assert_eq!(metrics.outcome("new"), 0);
    assert_eq!(metrics.outcome("duplicate"), 400);
    assert_eq!(metrics.outcome("conflict"), 5);
    assert_eq!(mock::read_all(kafka.bootstrap(), OUTPUT).unwrap().len(), 405, "nothing new in the output");
}
