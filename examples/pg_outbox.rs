//! Your own effect: a payments ledger in PostgreSQL, written in one
//! transaction with its outbox row (the transactional-outbox pattern), and
//! idempotent for the event ID (`ON CONFLICT (event_id) DO NOTHING`), so the
//! repeat after a crash between the effect and kdedup's completion is harmless.
//!
//! ```text
//! PAYMENTS_DATABASE_URL=postgres://user@127.0.0.1/db \
//!   cargo run --example pg_outbox -- config/kdedup.toml   # with [sink] kind = "custom"
//! ```
//!
//! Each new event's payload is `{"id": "...", "n": AMOUNT}`; one without an
//! amount is refused for good (dead-lettered by kdedup); a database that does
//! not answer is worth waiting out (retried, the partition waiting).

use std::path::Path;

use kdedup::{Config, CustomSink, Delivered, Effect, RunOptions, Sink, SinkError, StopMode, Stopping};
use tokio::sync::Mutex;

/// The ledger: `{prefix}_payments` (the business row) and `{prefix}_outbox`
/// (what downstream reads), written together or not at all.
pub struct PaymentsLedger {
    client: Mutex<tokio_postgres::Client>,
    payments: String,
    outbox: String,
}

impl PaymentsLedger {
    /// Connects and creates the two tables if missing.
    pub async fn connect(url: &str, prefix: &str) -> anyhow::Result<PaymentsLedger> {
        let (client, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls).await?;
        tokio::spawn(connection);
        let (payments, outbox) = (format!("{prefix}_payments"), format!("{prefix}_outbox"));
        client
            .batch_execute(&format!(
                "CREATE TABLE IF NOT EXISTS {payments} (event_id text PRIMARY KEY, amount bigint NOT NULL);
                 CREATE TABLE IF NOT EXISTS {outbox} (event_id text PRIMARY KEY, payload bytea NOT NULL);"
            ))
            .await?;
        Ok(PaymentsLedger { client: Mutex::new(client), payments, outbox })
    }
}

impl Sink for PaymentsLedger {
    fn kind(&self) -> &'static str {
        "payments_ledger"
    }

    async fn deliver(&self, batch: &[Effect<'_>], _stop: &Stopping) -> Vec<Result<Delivered, SinkError>> {
        // Refusals first: a record without an amount never joins the transaction.
        let parsed: Vec<Result<Payment<'_>, SinkError>> = batch.iter().map(Payment::parse).collect();
        let valid: Vec<&Payment<'_>> = parsed.iter().filter_map(|p| p.as_ref().ok()).collect();
        let written = self.write(&valid).await;
        parsed
            .into_iter()
            .map(|p| match (p, &written) {
                (Err(refused), _) => Err(refused),
                (Ok(_), Ok(())) => Ok(Delivered::done()),
                (Ok(_), Err(e)) => Err(SinkError::retriable(format!("payments database: {e}"))),
            })
            .collect()
    }
}

/// One new event as a payment.
struct Payment<'a> {
    event_id: String,
    amount: i64,
    payload: &'a [u8],
}

impl<'a> Payment<'a> {
    fn parse(e: &Effect<'a>) -> Result<Payment<'a>, SinkError> {
        let payload = e.envelope.record.payload.as_deref().unwrap_or_default();
        let json: serde_json::Value =
            serde_json::from_slice(payload).map_err(|e| SinkError::permanent(format!("not JSON: {e}")))?;
        let amount = json["n"].as_i64().ok_or_else(|| SinkError::permanent("no amount (`n`)"))?;
        Ok(Payment { event_id: String::from_utf8_lossy(&e.envelope.key.id).into_owned(), amount, payload })
    }
}

impl PaymentsLedger {
    /// One transaction for the whole batch: the business rows and their outbox rows.
    async fn write(&self, payments: &[&Payment<'_>]) -> Result<(), tokio_postgres::Error> {
        if payments.is_empty() {
            return Ok(());
        }
        let mut client = self.client.lock().await;
        let tx = client.transaction().await?;
        let insert = |table: &str, column: &str| {
            format!("INSERT INTO {table} (event_id, {column}) VALUES ($1, $2) ON CONFLICT (event_id) DO NOTHING")
        };
        let pay = tx.prepare(&insert(&self.payments, "amount")).await?;
        let out = tx.prepare(&insert(&self.outbox, "payload")).await?;
        for p in payments {
            tx.execute(&pay, &[&p.event_id, &p.amount]).await?;
            tx.execute(&out, &[&p.event_id, &p.payload]).await?;
        }
        tx.commit().await
    }
}

/// Runs kdedup with the ledger as its effect until `shutdown` resolves.
pub async fn run(
    config: &Config,
    ledger: PaymentsLedger,
    shutdown: impl std::future::Future<Output = StopMode>,
) -> anyhow::Result<()> {
    let options = RunOptions { sink: Some(CustomSink::new(ledger)), ..RunOptions::default() };
    kdedup::run(config, options, shutdown).await
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let path = std::env::args().nth(1).unwrap_or_else(|| "config/kdedup.toml".into());
    let config = Config::load(Path::new(&path))?;
    let url = std::env::var("PAYMENTS_DATABASE_URL")?;
    let ledger = PaymentsLedger::connect(&url, "example").await?;
    let shutdown = async {
        let _ = tokio::signal::ctrl_c().await;
        StopMode::Drain
    };
    run(&config, ledger, shutdown).await
}
