//! The PostgreSQL store over TLS, against a private server that refuses plain
//! TCP (`PrivatePostgres::start_tls`): verify-full with the right CA works
//! (claims and `kdedup schema apply`), a wrong CA and `tls = "disable"` fail
//! with errors that say what to fix, and `kdedup check` says the same.

use std::path::Path;
use std::sync::Arc;

use kdedup::config::Config;
use kdedup::event::{EventKey, Fingerprint, Position};
use kdedup::store::{Acquired, Claim, ClaimRequest, DedupStore, Store};

use crate::utils::{PrivatePostgres, BIN};

const T0: u64 = 1_700_000_000_000;

/// A whole config whose `[store]` is `store` (the Kafka parts are never contacted here).
fn config_text(store: &str) -> String {
    format!(
        "[kafka]\nbrokers = \"127.0.0.1:1\"\ngroup_id = \"pg-tls\"\ntopics = [\"in\"]\n\
         [sink]\nkind = \"stdout\"\n[dead_letter]\ntopic = \"dlq\"\n[metrics]\nlisten = \"\"\n\
         [store]\nkind = \"postgres\"\n{store}"
    )
}

fn load(store: &str) -> Config {
    Config::from_toml_with_env(&config_text(store), "pg_tls.toml", []).expect("the config is valid")
}

fn store_keys(pg: &PrivatePostgres, tls: &str, ca: Option<&Path>) -> String {
    store_keys_at(&pg.url(), tls, ca)
}

fn store_keys_at(url: &str, tls: &str, ca: Option<&Path>) -> String {
    let ca = ca.map_or(String::new(), |p| format!("tls_ca_file = \"{}\"\n", p.display()));
    format!("url = \"{url}\"\ntls = \"{tls}\"\n{ca}")
}

fn tls_server(test: &str) -> Option<(PrivatePostgres, crate::utils::PgTlsFiles)> {
    let started = PrivatePostgres::start_tls();
    if started.is_none() {
        eprintln!("{test}: skipped: no PostgreSQL binaries under /usr/lib/postgresql");
    }
    started
}

fn at(offset: i64) -> Position {
    Position { topic: Arc::from("in"), partition: 0, offset }
}

fn request(id: &str, offset: i64) -> ClaimRequest {
    ClaimRequest {
        key: EventKey { scope: Arc::from("pg-tls"), id: id.as_bytes().to_vec() },
        fingerprint: Fingerprint(7),
        position: at(offset),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_full_with_the_right_ca_claims_completes_and_applies_the_schema() {
    let Some((pg, files)) = tls_server("verify_full_with_the_right_ca") else { return };
    let store_section = store_keys(&pg, "verify-full", Some(&files.ca));

    // `kdedup schema apply` over TLS, as an operator runs it.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("kdedup.toml");
    std::fs::write(&path, config_text(&store_section)).unwrap();
    let out = std::process::Command::new(BIN).args(["schema", "apply", "--config"]).arg(&path).output().unwrap();
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "schema apply over TLS: {stdout}{stderr}");
    assert!(stdout.contains("schema applied (postgres store)"), "{stdout}");

    let config = load(&store_section);
    let store = Store::open(&config.store, &config.retention).unwrap();
    store.check_schema(None).await.expect("the table exists");
    let claimed = store.claim(vec![request("a", 1)], T0).await.expect("claims over verify-full");
    assert_eq!(claimed, vec![Claim::New(Acquired::Fresh)]);
    assert_eq!(store.complete(vec![(request("a", 1).key, at(1))], T0).await.unwrap(), vec![true]);
    let again = store.claim(vec![request("a", 2)], T0 + 1).await.unwrap();
    assert_eq!(again, vec![Claim::Duplicate { first: at(1), claimed_at_ms: T0 }]);

    // The server refuses plain TCP (`hostnossl … reject`): every answer above came over TLS.
    let out = std::process::Command::new(BIN).args(["check", "--config"]).arg(&path).output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("postgres store reachable, schema applied"), "{stdout}");
    assert!(stdout.contains("tls: verify-full"), "{stdout}");

    // The right CA, but a host name the certificate does not list (it names IP 127.0.0.1 only).
    let url = pg.url().replace("127.0.0.1", "localhost");
    let config = load(&store_keys_at(&url, "verify-full", Some(&files.ca)));
    let store = Store::open(&config.store, &config.retention).unwrap();
    let error = store.claim(vec![request("b", 3)], T0).await.expect_err("the host name is checked").to_string();
    assert!(error.contains("certificate could not be verified") && error.contains("hostname mismatch"), "{error}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_ca_fails_saying_the_certificate_could_not_be_verified() {
    let Some((pg, files)) = tls_server("a_wrong_ca_fails") else { return };
    // A password in the URL (the server trusts and ignores it) must never be printed.
    let url = pg.url().replace("kdedup@", "kdedup:s3cr3t-pg@");
    let store_section = store_keys_at(&url, "verify-full", Some(&files.wrong_ca));
    let config = load(&store_section);
    let store = Store::open(&config.store, &config.retention).unwrap();
    let error = store.claim(vec![request("a", 1)], T0).await.expect_err("a wrong CA is refused").to_string();
    assert!(error.contains("certificate could not be verified"), "{error}");
    assert!(error.contains("unable to get local issuer certificate"), "OpenSSL's verify result: {error}");
    assert!(!error.contains("s3cr3t-pg"), "{error}");
    assert!(error.contains(&files.wrong_ca.display().to_string()), "the error names the CA file: {error}");

    // `kdedup check` reports it as a failed store check, in the same words.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("kdedup.toml");
    std::fs::write(&path, config_text(&store_section)).unwrap();
    let out = std::process::Command::new(BIN).args(["check", "--config"]).arg(&path).output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(!out.status.success(), "{stdout}");
    assert!(!stdout.contains("s3cr3t-pg") && !String::from_utf8_lossy(&out.stderr).contains("s3cr3t-pg"), "{stdout}");
    let line = stdout.lines().find(|l| l.contains("[FAIL] store")).unwrap_or_else(|| panic!("{stdout}"));
    assert!(line.contains("certificate could not be verified") && line.contains("tls_ca_file"), "{line}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_disable_against_a_tls_only_server_is_refused_clearly() {
    let Some((pg, _files)) = tls_server("tls_disable_against_a_tls_only_server") else { return };
    let config = load(&store_keys(&pg, "disable", None));
    let store = Store::open(&config.store, &config.retention).unwrap();
    let error = store.claim(vec![request("a", 1)], T0).await.expect_err("plain TCP is refused").to_string();
    assert!(error.contains("refuses connections without TLS") && error.contains("pg_hba.conf"), "{error}");
    assert!(error.contains("tls = \"verify-full\""), "the error says what to set: {error}");
}

#[test]
fn an_unreadable_ca_file_is_a_config_error_naming_the_key_and_the_file() {
    let store = "url = \"postgres://u@127.0.0.1/db\"\ntls = \"verify-full\"\ntls_ca_file = \"/nonexistent/ca.pem\"\n";
    let error = Config::from_toml_with_env(&config_text(store), "pg_tls.toml", []).unwrap_err().to_string();
    assert!(error.contains("store.tls_ca_file") && error.contains("/nonexistent/ca.pem"), "{error}");
}
