//! Reconciliation over the real Kafka protocol: kdedup's headers are its
//! own and unambiguous (inbound copies dropped, the last occurrence read, the
//! scope checked), and a reconciliation past its bounds says so.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use kdedup::event::Position;
use kdedup::mock::{self, Consumed, MockKafka, Produce};
use kdedup::reconcile::{Limits, Log, Reconciler};
use kdedup::sink::kafka::headers;
use kdedup::source::StopMode;
use kdedup::testkit::Faults;

use crate::utils::*;

/// A first life in small batches that crashes after the effects of the batch
/// holding `victim` (before completing them); returns once it stopped.
async fn first_life_crashing_after_effect(kafka: &MockKafka, group: &str, dir: &std::path::Path, victim: Position) {
    let faults = Faults::default();
    *faults.crash_after_effect.lock().unwrap() = Some(victim);
    let first = start(config(kafka, group, dir, &[("KDEDUP_PIPELINE__BATCH_MAX", "50")]), faults.clone());
    tokio::time::timeout(Duration::from_secs(60), faults.fired.notified()).await.expect("the fault fired");
    first.stop(StopMode::Drain).await;
}

/// A second life to the end of the input; returns its metrics.
async fn second_life(kafka: &MockKafka, group: &str, dir: &std::path::Path) -> kdedup::metrics::Metrics {
    let second = start(config(kafka, group, dir, &[]), Faults::default());
    wait_all_committed(kafka, &second.metrics).await;
    let metrics = second.metrics.clone();
    second.stop(StopMode::Drain).await;
    metrics
}

/// Every value of header `name` on `record`, in order.
fn all_values<'r>(record: &'r Consumed, name: &str) -> Vec<&'r [u8]> {
    record.headers.iter().filter(|(k, _)| k == name).map(|(_, v)| v.as_slice()).collect()
}

/// The one value of `name`; panics when the header is missing or repeated.
fn only_value<'r>(record: &'r Consumed, name: &str) -> &'r str {
    match all_values(record, name)[..] {
        [v] => std::str::from_utf8(v).unwrap(),
        ref other => panic!("output record {}: {name} occurs {} times", record.offset, other.len()),
    }
}

/// Per (scope, event ID), how often it appears; the ID is read from the record
/// key (the input's key is the event ID), not from kdedup's headers.
fn counts_by_scope(output: &[Consumed]) -> HashMap<(String, String), usize> {
    let mut counts = HashMap::new();
    for r in output {
        let id = String::from_utf8(r.key.clone().expect("output records carry the key")).unwrap();
        *counts.entry((only_value(r, headers::SCOPE).to_string(), id)).or_insert(0) += 1;
    }
    counts
}

/// Per event ID (the record key), how often it appears, whatever the headers say.
fn counts_by_key(output: &[Consumed]) -> HashMap<(String, String), usize> {
    let mut counts = HashMap::new();
    for r in output {
        let id = String::from_utf8(r.key.clone().expect("output records carry the key")).unwrap();
        *counts.entry((String::new(), id)).or_insert(0) += 1;
    }
    counts
}

fn assert_each_once(counts: &HashMap<(String, String), usize>, scope: &str, ids: &[String]) {
    let missing: Vec<&String> =
        ids.iter().filter(|id| !counts.contains_key(&(scope.to_string(), (*id).clone()))).collect();
    let twice: Vec<_> = counts.iter().filter(|((s, _), n)| s == scope && **n > 1).collect();
    assert!(
        missing.is_empty(),
        "scope {scope}: {} events lost, e.g. {:?}",
        missing.len(),
        &missing[..missing.len().min(5)]
    );
    assert!(
        twice.is_empty(),
        "scope {scope}: {} events emitted twice, e.g. {:?}",
        twice.len(),
        &twice[..twice.len().min(5)]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inbound_kdedup_headers_neither_reach_the_output_nor_mislead_reconciliation() {
    let kafka = cluster(2);
    let (mut records, ids) = events(2_000, 0, 2, 11);
    // As a chained kdedup stage (or a replayed dead letter) delivers them: kdedup's
    // own header names already present, with an upstream stage's values.
    for r in &mut records {
        r.headers.extend([
            (headers::SOURCE_TOPIC.into(), b"upstream".to_vec()),
            (headers::SOURCE_PARTITION.into(), b"7".to_vec()),
            (headers::SOURCE_OFFSET.into(), b"12345".to_vec()),
            (headers::SCOPE.into(), b"upstream-scope".to_vec()),
            (headers::EVENT_ID.into(), b"upstream-id".to_vec()),
            (headers::POSSIBLE_REPEAT.into(), b"true".to_vec()),
            ("trace-id".into(), b"t-1".to_vec()),
        ]);
    }
    mock::produce_all(kafka.bootstrap(), INPUT, &records).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let group = unique("chained");
    let victim = Position { topic: Arc::from(INPUT), partition: 1, offset: 700 };
    first_life_crashing_after_effect(&kafka, &group, dir.path(), victim).await;
    let victim_id =
        String::from_utf8(records.iter().filter(|r| r.partition == 1).nth(700).unwrap().key.clone().unwrap()).unwrap();
    let before = counts_by_key(&mock::read_all(kafka.bootstrap(), OUTPUT).unwrap());
    assert_eq!(before.get(&(String::new(), victim_id)), Some(&1), "the victim's effect ran before the crash");

    let metrics = second_life(&kafka, &group, dir.path()).await;
    let output = mock::read_all(kafka.bootstrap(), OUTPUT).unwrap();
    assert_each_once(&counts_by_key(&output), "", &ids);
    assert_eq!(output.len(), ids.len(), "nothing else was emitted");
    assert!(metrics.reconciled.get() >= 1, "the victim's batch was found in the output");
    assert_each_once(&counts_by_scope(&output), &group, &ids);
    for r in &output {
        // kdedup's headers occur once each and carry this pipeline's values.
        assert_eq!(only_value(r, headers::SOURCE_TOPIC), INPUT);
        assert_eq!(only_value(r, headers::SOURCE_PARTITION), r.partition.to_string());
        assert_eq!(only_value(r, headers::EVENT_ID).as_bytes(), r.key.as_deref().unwrap());
        assert!(all_values(r, headers::POSSIBLE_REPEAT).len() <= 1);
        assert_eq!(all_values(r, "trace-id"), [b"t-1".as_slice()], "other inbound headers are kept");
    }
    assert_outcomes_sum(&metrics);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_scopes_on_one_output_partition_never_take_each_others_writes_for_their_own() {
    let kafka = cluster(2);
    let (records, ids) = events(2_000, 100, 2, 12);
    mock::produce_all(kafka.bootstrap(), INPUT, &records).await.unwrap();
    // Two pipelines (scope = group) read the same input and write the same
    // output partitions: the same source positions, written twice.
    let (dir_a, dir_b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let (a, b) = (unique("scope-a"), unique("scope-b"));
    let victim = |offset| Position { topic: Arc::from(INPUT), partition: 0, offset };
    first_life_crashing_after_effect(&kafka, &a, dir_a.path(), victim(300)).await;
    first_life_crashing_after_effect(&kafka, &b, dir_b.path(), victim(600)).await;
    // Each second life reads an output holding the other's writes for the
    // positions it must still handle.
    let metrics_a = second_life(&kafka, &a, dir_a.path()).await;
    let metrics_b = second_life(&kafka, &b, dir_b.path()).await;

    let counts = counts_by_scope(&mock::read_all(kafka.bootstrap(), OUTPUT).unwrap());
    assert_each_once(&counts, &a, &ids);
    assert_each_once(&counts, &b, &ids);
    assert_eq!(counts.len(), 2 * ids.len(), "nothing else was emitted");
    for m in [&metrics_a, &metrics_b] {
        assert!(m.reconciled.get() >= 1, "each found its own crashed batch");
        assert_outcomes_sum(m);
    }
}

/// An earlier owner's output for `offset` of `INPUT` partition `partition`, in
/// `scope`, on the output partition of the same number.
fn earlier_write(scope: &str, partition: i32, offset: i64) -> Produce {
    Produce {
        partition,
        key: Some(format!("evt-{offset}").into_bytes()),
        payload: Some(b"{}".to_vec()),
        headers: vec![
            (headers::SOURCE_TOPIC.into(), INPUT.as_bytes().to_vec()),
            (headers::SOURCE_PARTITION.into(), partition.to_string().into_bytes()),
            (headers::SOURCE_OFFSET.into(), offset.to_string().into_bytes()),
            (headers::SCOPE.into(), scope.as_bytes().to_vec()),
            (headers::EVENT_ID.into(), format!("evt-{offset}").into_bytes()),
        ],
    }
}

/// A header set with a name that is not UTF-8, as any producer may write.
fn headers_with_binary_name() -> rdkafka::message::OwnedHeaders {
    let h = rdkafka::message::OwnedHeaders::new();
    let name = [0xffu8, 0xfe, b'x'];
    // SAFETY: `BorrowedHeaders` is the native `rd_kafka_headers_t` (rdkafka hands
    // out `&BorrowedHeaders` by casting that pointer); the header set is owned by
    // `h`, alive here, and `rd_kafka_header_add` copies name and value.
    unsafe {
        let native = h.as_borrowed() as *const rdkafka::message::BorrowedHeaders as *mut rdkafka_sys::RDKafkaHeaders;
        rdkafka_sys::rd_kafka_header_add(native, name.as_ptr().cast(), name.len() as isize, b"v".as_ptr().cast(), 1);
    }
    h
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconciliation_past_its_bounds_is_incomplete_and_keeps_only_real_writes() {
    let kafka = MockKafka::start(1).unwrap();
    kafka.create_topic(OUTPUT, 1).unwrap();
    kafka.create_topic(DLQ, 1).unwrap();
    let scope = "bounded";
    // Output partition 0 as a previous owner of in/0 left it: 200 of its writes,
    // interleaved with another scope's writes for the same positions.
    let log: Vec<Produce> =
        (0..200).flat_map(|o| [earlier_write("other", 0, o + 1000), earlier_write(scope, 0, o)]).collect();
    mock::produce_all(kafka.bootstrap(), OUTPUT, &log).await.unwrap();
    // Another producer's record whose header name is not UTF-8.
    {
        use rdkafka::producer::{FutureProducer, FutureRecord};
        let producer: FutureProducer =
            rdkafka::ClientConfig::new().set("bootstrap.servers", kafka.bootstrap()).create().unwrap();
        let record: FutureRecord<'_, [u8], [u8]> =
            FutureRecord::to(OUTPUT).partition(0).payload(b"x".as_slice()).headers(headers_with_binary_name());
        producer.send(record, Duration::from_secs(10)).await.map_err(|(e, _)| e).unwrap();
    }
    let source = (Arc::from(INPUT), 0);
    let logs = || {
        (
            Some(Log { topic: OUTPUT.into(), partition: 0, mark: None }),
            Log { topic: DLQ.into(), partition: 0, mark: None },
        )
    };
    // One process, two partitions reconciling at once: the bound is the process's, not each one's.
    let mut shared = Reconciler::new(kafka.bootstrap(), scope);
    shared.limits = Limits { max_found: 200, ..Limits::default() };
    let find = move |limits: Limits| {
        let mut reconciler = Reconciler::new(kafka.bootstrap(), scope);
        reconciler.limits = limits;
        let (output, dead_letter) = logs();
        let source = (Arc::clone(&source.0), source.1);
        move || reconciler.find(&source, 50, output, dead_letter).unwrap()
    };
    let in_process = move || {
        let (output, dead_letter) = logs();
        let first = shared.find(&(Arc::from(INPUT), 0), 50, output, dead_letter).unwrap();
        let (output, dead_letter) = logs();
        let second = shared.find(&(Arc::from(INPUT), 0), 50, output, dead_letter).unwrap();
        drop((first.share, second.share));
        let (output, dead_letter) = logs();
        let after = shared.find(&(Arc::from(INPUT), 0), 50, output, dead_letter).unwrap();
        (first.complete, second.complete, second.emitted.len(), after.complete)
    };
    let (all, bounded, late, in_process) = tokio::task::spawn_blocking(move || {
        let all = find(Limits::default())();
        let bounded = find(Limits { max_found: 20, ..Limits::default() })();
        let late = find(Limits { deadline: Duration::ZERO, ..Limits::default() })();
        (all, bounded, late, in_process())
    })
    .await
    .unwrap();
    let (first, second, second_found, after) = in_process;
    assert!(first, "150 writes fit in a budget of 200");
    assert!(!second, "a second partition holding its writes at the same time gets only what is left");
    assert_eq!(second_found, 50, "200 - 150");
    assert!(after, "the budget is given back once the writes found are let go");

    let ours: HashSet<i64> = (50..200).collect();
    let offsets = |found: &kdedup::reconcile::Found| found.emitted.keys().copied().collect::<HashSet<i64>>();
    assert!(all.complete, "within the limits the whole log is read");
    assert_eq!(offsets(&all), ours, "exactly our scope's writes at or after the committed offset");
    assert_eq!(all.emitted[&60], kdedup::reconcile::event_identity(b"evt-60"), "with the event each was for");
    assert!(all.dead_lettered.is_empty());

    assert!(!bounded.complete, "more writes than the bound: incomplete");
    assert_eq!(bounded.emitted.len(), 20, "the found set stops at its bound");
    assert!(offsets(&bounded).is_subset(&ours), "what was found is real: {:?}", bounded.emitted);

    // The deadline is checked on every record, not only when the log runs dry.
    assert!(!late.complete, "past the deadline: incomplete");
    assert!(offsets(&late).is_subset(&ours));
}

/// Every record of `topic`/`partition` the log still holds (from its low watermark).
fn read_partition(brokers: &str, topic: &str, partition: i32) -> (i64, Vec<Consumed>) {
    use rdkafka::consumer::{BaseConsumer, Consumer};
    use rdkafka::message::{Headers, Message};
    let c: BaseConsumer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", "test-reader")
        .set("enable.auto.commit", "false")
        .create()
        .unwrap();
    let (low, high) = c.fetch_watermarks(topic, partition, Duration::from_secs(10)).unwrap();
    let mut tpl = rdkafka::TopicPartitionList::new();
    tpl.add_partition_offset(topic, partition, rdkafka::Offset::Offset(low)).unwrap();
    c.assign(&tpl).unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let (mut out, mut position) = (Vec::new(), low);
    while position < high {
        assert!(std::time::Instant::now() < deadline, "reading {topic}/{partition}: at {position} of {high}");
        let Some(m) = c.poll(Duration::from_millis(200)) else { continue };
        let m = m.unwrap();
        position = m.offset() + 1;
        let headers = m
            .headers()
            .map(|hs| hs.iter().map(|h| (h.key.to_string(), h.value.unwrap_or_default().to_vec())).collect())
            .unwrap_or_default();
        out.push(Consumed {
            partition,
            offset: m.offset(),
            key: m.key().map(<[u8]>::to_vec),
            payload: m.payload().map(<[u8]>::to_vec),
            headers,
        });
    }
    (low, out)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_log_reconciliation_cannot_read_whole_lets_the_repeat_through_marked() {
    let kafka = cluster(2);
    let (records, _) = events(2_000, 0, 2, 13);
    mock::produce_all(kafka.bootstrap(), INPUT, &records).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let group = unique("retention");
    let victim = Position { topic: Arc::from(INPUT), partition: 1, offset: 700 };
    first_life_crashing_after_effect(&kafka, &group, dir.path(), victim).await;
    let committed = mock::committed_offsets(kafka.bootstrap(), &group, INPUT).unwrap()[&1];
    // Written after the last commit: the crashed batch, which the next owner must not repeat unmarked.
    let (_, before) = read_partition(kafka.bootstrap(), OUTPUT, 1);
    let uncommitted: Vec<String> = before
        .iter()
        .filter(|r| only_value(r, headers::SOURCE_OFFSET).parse::<i64>().unwrap() >= committed)
        .map(|r| String::from_utf8(r.key.clone().unwrap()).unwrap())
        .collect();
    assert!(!uncommitted.is_empty() && committed <= 700, "the crashed batch was written after the last commit");
    let last_written = before.last().unwrap().offset;

    // Retention deletes them before the next owner reads: the mock keeps 5 MiB
    // per partition, so 6 MiB of incompressible filler pushes them out.
    use rand::{Rng, SeedableRng};
    let mut rng = rand::rngs::StdRng::seed_from_u64(13);
    let filler: Vec<Produce> = (0..6_000)
        .map(|_| Produce {
            partition: 1,
            key: None,
            payload: Some((0..1024).map(|_| rng.random::<u8>()).collect()),
            headers: Vec::new(),
        })
        .collect();
    mock::produce_all(kafka.bootstrap(), OUTPUT, &filler).await.unwrap();
    let (low, _) = read_partition(kafka.bootstrap(), OUTPUT, 1);
    assert!(low > last_written, "retention dropped the crashed batch's writes (low watermark {low})");

    let metrics = second_life(&kafka, &group, dir.path()).await;
    assert!(metrics.claims_resumed.get() >= uncommitted.len() as u64, "the crashed batch's claims resumed");
    let (_, after) = read_partition(kafka.bootstrap(), OUTPUT, 1);
    let again: HashMap<String, &Consumed> = after
        .iter()
        .filter(|r| r.key.is_some())
        .map(|r| (String::from_utf8(r.key.clone().unwrap()).unwrap(), r))
        .collect();
    for id in &uncommitted {
        let r = again.get(id).unwrap_or_else(|| panic!("{id} was emitted again (its claim never completed)"));
        assert_eq!(
            only_value(r, headers::POSSIBLE_REPEAT),
            "true",
            "{id}: a repeat reconciliation could not rule out is marked"
        );
    }
}

/// A position reused by a new event (a topic deleted and recreated, offsets
/// reset past a truncation): the output still holds what an earlier
/// incarnation of in/0 wrote at offsets 0..10 under this scope, and the group
/// has no commit. The new events at those positions are emitted. Failed
/// before: reconciliation matched by position only, so they were completed
/// without their effect and committed (counted only in kdedup_reconciled_total).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn new_events_at_reused_positions_are_emitted() {
    let kafka = cluster(1);
    let group = unique("reused");
    let written_for = |offset: i64, payload: &str, id: Option<String>| Produce {
        partition: 0,
        key: Some(format!("old-{offset}").into_bytes()),
        payload: Some(payload.as_bytes().to_vec()),
        headers: [
            (headers::SOURCE_TOPIC.into(), INPUT.as_bytes().to_vec()),
            (headers::SOURCE_PARTITION.into(), b"0".to_vec()),
            (headers::SOURCE_OFFSET.into(), offset.to_string().into_bytes()),
            (headers::SCOPE.into(), group.as_bytes().to_vec()),
        ]
        .into_iter()
        .chain(id.map(|id| (headers::EVENT_ID.to_string(), id.into_bytes())))
        .collect(),
    };
    let earlier: Vec<Produce> = (0..10).map(|o| written_for(o, "{}", Some(format!("old-{o}")))).collect();
    mock::produce_all(kafka.bootstrap(), OUTPUT, &earlier).await.unwrap();
    // ...and a dead letter for offset 10, a bad record of its own.
    mock::produce_all(kafka.bootstrap(), DLQ, &[written_for(10, "an old bad record", None)]).await.unwrap();
    let (mut records, ids) = events(10, 0, 1, 11);
    records.push(Produce { partition: 0, key: None, payload: Some(b"a new bad record".to_vec()), headers: vec![] });
    mock::produce_all(kafka.bootstrap(), INPUT, &records).await.unwrap();

    let dir = tempfile::tempdir().unwrap();
    let metrics = second_life(&kafka, &group, dir.path()).await;
    let dead = mock::read_all(kafka.bootstrap(), DLQ).unwrap();
    let payloads: Vec<&[u8]> = dead.iter().filter_map(|d| d.payload.as_deref()).collect();
    assert_eq!(payloads, [b"an old bad record".as_slice(), b"a new bad record"], "the new bad record is dead-lettered");
    let output = mock::read_all(kafka.bootstrap(), OUTPUT).unwrap();
    let new: Vec<Consumed> = output
        .into_iter()
        .filter(|r| !r.header_str(headers::EVENT_ID).is_some_and(|id| id.starts_with("old-")))
        .collect();
    assert_exactly_once(&new, &ids);
    assert_eq!(metrics.reconciled.get(), 0, "nothing found was this incarnation's");
    assert_eq!(metrics.outcome("new"), 10);
    assert_eq!(metrics.outcome("dead_letter"), 1);
}

/// The same on the test broker, with a topic really deleted and recreated:
/// a first group emits ten events; the input topic is deleted and created
/// again, and ten new events land at the same positions; a group with the same
/// scope and no commit (the group's offsets went with the topic) emits all ten.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn new_events_in_a_recreated_topic_are_emitted_on_the_test_broker() {
    use rdkafka::admin::{AdminClient, AdminOptions};
    let Ok(brokers) = std::env::var("KDEDUP_TEST_BROKER") else {
        eprintln!("skipped: KDEDUP_TEST_BROKER is not set");
        return;
    };
    let (input, output, dlq) = (unique("in"), unique("out"), unique("dlq"));
    mock::create_topics(brokers.as_str(), &[(&input, 1), (&output, 1), (&dlq, 1)]).await.unwrap();
    let topics = [input.as_str(), output.as_str(), dlq.as_str()];
    let scope = unique("recreated");
    let event = |id: String| Produce {
        partition: 0,
        key: None,
        payload: Some(format!(r#"{{"id":"{id}"}}"#).into_bytes()),
        headers: vec![("event-id".into(), id.into_bytes())],
    };
    let read = || tokio::task::block_in_place(|| mock::read_all(brokers.as_str(), &output).unwrap());
    let emitted = |prefix: &'static str| {
        move |out: &[Consumed]| {
            out.iter().filter(|r| r.header_str(headers::EVENT_ID).is_some_and(|id| id.starts_with(prefix))).count()
        }
    };
    let dir = tempfile::tempdir().unwrap();
    let env = [("KDEDUP_KEY__SCOPE", scope.as_str())];
    let run_until = |group: String, prefix: &'static str| {
        let (config, count) = (config_for(&brokers, topics, &group, dir.path(), &env), emitted(prefix));
        async move {
            let running = start(config, Faults::default());
            wait_for("ten events emitted", Duration::from_secs(60), || {
                let n = count(&read());
                async move { n >= 10 }
            })
            .await;
            let metrics = running.metrics.clone();
            running.stop(StopMode::Drain).await;
            metrics
        }
    };

    mock::produce_all(brokers.as_str(), &input, &(0..10).map(|i| event(format!("first-{i}"))).collect::<Vec<_>>())
        .await
        .unwrap();
    run_until(unique("g1"), "first-").await;

    let admin: AdminClient<rdkafka::client::DefaultClientContext> =
        kdedup::kafka_client::KafkaClients::from(brokers.as_str()).producer().create().unwrap();
    let options = AdminOptions::new().operation_timeout(Some(Duration::from_secs(10)));
    for result in admin.delete_topics(&[&input], &options).await.unwrap() {
        result.map_err(|(topic, e)| format!("{topic}: {e}")).unwrap();
    }
    // A deletion completes in the background: create again until the broker takes it.
    wait_for("the input topic recreated", Duration::from_secs(60), || {
        let created = {
            let (brokers, input) = (brokers.clone(), input.clone());
            async move { mock::create_topics(brokers.as_str(), &[(&input, 1)]).await.is_ok() }
        };
        created
    })
    .await;
    mock::produce_all(brokers.as_str(), &input, &(0..10).map(|i| event(format!("second-{i}"))).collect::<Vec<_>>())
        .await
        .unwrap();
    let metrics = run_until(unique("g2"), "second-").await;

    let output = read();
    let ids: Vec<String> = (0..10).map(|i| format!("second-{i}")).collect();
    let second: Vec<Consumed> = output
        .into_iter()
        .filter(|r| r.header_str(headers::EVENT_ID).is_some_and(|id| id.starts_with("second-")))
        .collect();
    assert_exactly_once(&second, &ids);
    assert_eq!(metrics.reconciled.get(), 0, "nothing of the first incarnation was taken for the second's");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partitions_assigned_at_once_share_one_client_for_their_log_ends() {
    // 64 partitions reconciling at once, as at a rebalance: one client asks
    // every log's ends, and only a log with writes after its mark gets a reader
    // (a client per log made every partition wait seconds at 160 partitions).
    const PARTITIONS: i32 = 64;
    let kafka = MockKafka::start(1).unwrap();
    kafka.create_topic(OUTPUT, PARTITIONS).unwrap();
    kafka.create_topic(DLQ, PARTITIONS).unwrap();
    let scope = "many";
    let log: Vec<Produce> = (0..10).map(|o| earlier_write(scope, 7, o)).collect();
    mock::produce_all(kafka.bootstrap(), OUTPUT, &log).await.unwrap();
    let reconciler = Reconciler::new(kafka.bootstrap(), scope);
    let finds = (0..PARTITIONS).map(|p| {
        let reconciler = reconciler.clone();
        tokio::task::spawn_blocking(move || {
            let output = Some(Log { topic: OUTPUT.into(), partition: p, mark: None });
            let dead_letter = Log { topic: DLQ.into(), partition: p, mark: None };
            (p, reconciler.find(&(Arc::from(INPUT), p), 0, output, dead_letter).unwrap())
        })
    });
    for found in futures::future::join_all(finds).await {
        let (p, found) = found.unwrap();
        assert!(found.complete, "partition {p}");
        assert!(found.dead_lettered.is_empty(), "partition {p}");
        let expected: HashSet<i64> = if p == 7 { (0..10).collect() } else { HashSet::new() };
        assert_eq!(found.emitted.keys().copied().collect::<HashSet<_>>(), expected, "partition {p}");
    }
    assert_eq!(reconciler.clients_made(), 2, "one for the ends, one reader for the only log with writes");
}
