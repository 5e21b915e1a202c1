//! The embedded store survives SIGKILL: a child process writes completions,
//! is killed mid-write, and the parent reopens the store.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use kdedup::config::{Retention, StoreConfig};
use kdedup::event::{EventKey, Fingerprint, Position};
use kdedup::store::{Claim, ClaimRequest, DedupStore, Store};

const CHILD_ENV: &str = "KDEDUP_TEST_STORE_CHILD";

fn retention() -> Retention {
    Retention {
        ttl: Duration::from_secs(3600),
        lease: Duration::from_secs(60),
        sweep_interval: Duration::from_secs(60),
    }
}

fn request(i: u64) -> ClaimRequest {
    ClaimRequest {
        key: EventKey { scope: Arc::from("crash"), id: format!("key-{i}").into_bytes() },
        fingerprint: Fingerprint(i as u128),
        position: Position { topic: Arc::from("t"), partition: 0, offset: i as i64 },
    }
}

/// Run by `store_survives_sigkill` in a child process; ignored in normal runs.
#[tokio::test]
#[ignore = "helper: the child half of store_survives_sigkill"]
async fn store_crash_child() {
    let path = std::env::var(CHILD_ENV).expect("run by store_survives_sigkill");
    let store = Store::open(&StoreConfig::Embedded { path: path.into() }, &retention()).unwrap();
    let mut next = 0u64;
    loop {
        let batch: Vec<ClaimRequest> = (next..next + 100).map(request).collect();
        let done = batch.iter().map(|r| (r.key.clone(), r.position.clone())).collect();
        store.claim(batch, 1).await.unwrap();
        store.complete(done, 1).await.unwrap();
        next += 100;
        if next == 1000 {
            store.sync().unwrap();
            println!("SYNCED {next}");
        } else {
            println!("WROTE {next}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn store_survives_sigkill() {
    let dir = tempfile::tempdir().unwrap();
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args(["store_crash::store_crash_child", "--exact", "--ignored", "--nocapture", "--test-threads=1"])
        .env(CHILD_ENV, dir.path())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut written = 0u64;
    let mut synced = false;
    // Kill it well after the sync, in the middle of unsynced writes.
    while written < 3000 {
        let line = lines.next().expect("child output").unwrap();
        if let Some(n) = line.strip_prefix("SYNCED ") {
            synced = true;
            written = n.parse().unwrap();
        } else if let Some(n) = line.strip_prefix("WROTE ") {
            written = n.parse().unwrap();
        }
    }
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    assert!(synced);

    let store =
        Store::open(&StoreConfig::Embedded { path: dir.path().into() }, &retention()).expect("reopens after SIGKILL");
    // Every completion the child reported (synced or only written to the OS) is still done.
    let answers = store
        .claim(
            (0..written)
                .map(|i| ClaimRequest { position: Position { offset: -1, ..request(i).position }, ..request(i) })
                .collect(),
            2,
        )
        .await
        .unwrap();
    let not_done: Vec<u64> =
        (0..written).filter(|i| !matches!(answers[*i as usize], Claim::Duplicate { .. })).collect();
    assert!(
        not_done.is_empty(),
        "{} of {written} completed keys lost, first {:?}",
        not_done.len(),
        &not_done[..not_done.len().min(5)]
    );
}
