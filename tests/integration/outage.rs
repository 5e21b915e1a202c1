//! The shared store goes away mid-stream and comes back: the pipeline pauses
//! (not ready, no offsets move), retries, and resumes by itself with nothing
//! lost or duplicated. Uses a private PostgreSQL server, so stopping it does
//! not disturb other tests.

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use kdedup::mock;
use kdedup::pipeline::Faults;
use kdedup::source::StopMode;
use kdedup::store::Store;

use crate::utils::*;

/// A throwaway PostgreSQL server on a free loopback port.
struct PrivatePostgres {
    bin: PathBuf,
    data: tempfile::TempDir,
    port: u16,
}

impl PrivatePostgres {
    fn start() -> Option<PrivatePostgres> {
        let bin = std::fs::read_dir("/usr/lib/postgresql")
            .ok()?
            .filter_map(|e| e.ok())
            .map(|e| e.path().join("bin"))
            .max()?;
        let data = tempfile::tempdir().ok()?;
        let root = unsafe { libc::geteuid() } == 0;
        if root {
            // The server refuses to run as root: it runs as the `postgres` user.
            Command::new("chown").args(["-R", "postgres"]).arg(data.path()).status().ok()?;
        }
        let port = std::net::TcpListener::bind("127.0.0.1:0").ok()?.local_addr().ok()?.port();
        let pg = PrivatePostgres { bin, data, port };
        assert!(pg.run("initdb", &["-D", &pg.dir(), "-U", "kdedup", "--auth=trust"]), "initdb failed");
        pg.up();
        Some(pg)
    }

    fn dir(&self) -> String {
        self.data.path().join("pgdata").display().to_string()
    }

    fn run(&self, tool: &str, args: &[&str]) -> bool {
        let exe = self.bin.join(tool);
        let mut cmd = if unsafe { libc::geteuid() } == 0 {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(&exe);
            c
        } else {
            Command::new(&exe)
        };
        cmd.args(args).stdout(std::process::Stdio::null()).stderr(std::process::Stdio::null());
        cmd.status().map(|s| s.success()).unwrap_or(false)
    }

    fn up(&self) {
        let options =
            format!("-c listen_addresses=127.0.0.1 -p {} -c unix_socket_directories={}", self.port, self.dir());
        assert!(self.run("pg_ctl", &["-D", &self.dir(), "-w", "-o", &options, "start"]), "pg_ctl start failed");
    }

    fn down(&self) {
        assert!(self.run("pg_ctl", &["-D", &self.dir(), "-m", "immediate", "-w", "stop"]), "pg_ctl stop failed");
    }

    fn url(&self) -> String {
        format!("postgres://kdedup@127.0.0.1:{}/postgres", self.port)
    }
}

impl Drop for PrivatePostgres {
    fn drop(&mut self) {
        self.run("pg_ctl", &["-D", &self.dir(), "-m", "immediate", "stop"]);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_outage_pauses_the_pipeline_which_resumes_by_itself_losing_nothing() {
    if std::env::var("KDEDUP_TEST_POSTGRES").is_err() {
        eprintln!("postgres outage test skipped: KDEDUP_TEST_POSTGRES is not set (scripts/test sets it)");
        return;
    }
    let pg = PrivatePostgres::start().expect("a private PostgreSQL starts");
    let kafka = cluster(4);
    let (records, ids) = events(10_000, 2_000, 4, 8);
    let (first_half, second_half) = records.split_at(records.len() / 2);
    mock::produce_all(kafka.bootstrap(), INPUT, first_half).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let group = unique("outage");
    let config =
        config(&kafka, &group, dir.path(), &[("KDEDUP_STORE__KIND", "postgres"), ("KDEDUP_STORE__URL", &pg.url())]);
    Store::open(&config.store, &config.retention).unwrap().apply_schema().await.unwrap();
    let running = start(config, Faults::default());
    let m = running.metrics.clone();
    wait_for("the first half decided", Duration::from_secs(60), || {
        let n = m.consumed.get();
        async move { n >= first_half.len() as u64 }
    })
    .await;

    pg.down();
    mock::produce_all(kafka.bootstrap(), INPUT, second_half).await.unwrap();
    wait_for("readiness to go false", Duration::from_secs(30), || {
        let ready = m.is_ready();
        async move { !ready }
    })
    .await;
    // Let commits of work finished before the outage land, then watch offsets stand still.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let committed_during = |m: &kdedup::metrics::Metrics| {
        (0..4).map(|p| m.committed_offset.with_label_values(&[INPUT, &p.to_string()]).get()).collect::<Vec<_>>()
    };
    let at_outage = committed_during(&m);
    tokio::time::sleep(Duration::from_secs(3)).await; // the outage lasts a few seconds
    assert_eq!(committed_during(&m), at_outage, "no offset moves while the store is down");
    assert!(m.store_errors.get() > 0);
    assert!(!m.is_ready());

    pg.up();
    wait_all_committed(&kafka, &running.metrics).await;
    assert!(m.is_ready(), "ready again once the store answers");
    running.stop(StopMode::Drain).await;
    assert_exactly_once(&mock::read_all(kafka.bootstrap(), OUTPUT).unwrap(), &ids);
    assert_eq!(m.outcome("new"), 10_000);
    assert_eq!(m.outcome("duplicate"), 2_000);
    assert_outcomes_sum(&m);
}

/// Broker restart mid-stream: all brokers go down for longer than the session
/// timeout while the pipeline is busy (produce requests in flight), then come
/// back. The member loses its assignment; its partition tasks cannot drain and
/// are abandoned (a short drain timeout makes that certain), leaving writes
/// queued in the producer. The next owner of each partition (this same member,
/// after it rejoins) must let those writes land before it reads the output back,
/// or it would emit them again (it did: ~2,800 repeats per run before the wait).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_restart_mid_stream_recovers_without_loss_or_repeats() {
    let kafka = cluster(4);
    let (records, ids) = events(40_000, 6_000, 4, 12);
    mock::produce_all(kafka.bootstrap(), INPUT, &records).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let config = config(&kafka, &unique("broker-restart"), dir.path(), &[("KDEDUP_PIPELINE__DRAIN_TIMEOUT_MS", "300")]);
    let running = start(config, Faults::default());
    let m = running.metrics.clone();
    wait_for("the pipeline to be busy", Duration::from_secs(60), || {
        let n = m.consumed.get();
        async move { n >= 8_000 }
    })
    .await;

    kafka.set_brokers_up(false).unwrap();
    // Longer than the test session timeout (3 s): the member loses its assignment and rejoins.
    tokio::time::sleep(Duration::from_secs(8)).await;
    kafka.set_brokers_up(true).unwrap();

    wait_all_committed(&kafka, &running.metrics).await;
    running.stop(StopMode::Drain).await;
    let output = mock::read_all(kafka.bootstrap(), OUTPUT).unwrap();
    eprintln!(
        "broker restart: {} output records, {} claims resumed, {} found already written",
        output.len(),
        m.claims_resumed.get(),
        m.reconciled.get()
    );
    assert_exactly_once(&output, &ids);
    assert_eq!(m.outcome("new"), 40_000);
    // Records are decided per delivery: those of abandoned batches and those
    // finished but not committed before the outage come again after the
    // rejoin, so outcomes cover every input record and at most every delivery.
    let decided: u64 = kdedup::metrics::OUTCOMES.iter().map(|o| m.outcome(o)).sum();
    assert!(
        decided >= records.len() as u64 && decided <= m.consumed.get(),
        "decided {decided}, consumed {}",
        m.consumed.get()
    );
}
