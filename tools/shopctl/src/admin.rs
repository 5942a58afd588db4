//! Operator commands: the audit trail and time travel of an order, relay
//! republishing, projection rebuilds. They talk to the service's database
//! (and NATS) directly, with the same code the services run.

use std::path::{Path, PathBuf};

use anyhow::{Context as _, bail};
use es_postgres::{EventStore, projection};
use order_service::history::{self, At};

use crate::stack::StackFile;

/// Where to find the servers: flags, else the running local stack.
#[derive(Debug, clap::Args)]
pub(crate) struct Target {
    /// The service's database (default: from the stack file of `shopctl up`).
    #[arg(long, env = "SHOP_DATABASE_URL")]
    database_url: Option<String>,
    /// NATS (default: from the stack file of `shopctl up`).
    #[arg(long, env = "NATS_URL")]
    nats_url: Option<String>,
    #[arg(long, default_value = ".shop/stack.json")]
    stack_file: PathBuf,
}

impl Target {
    fn stack(&self) -> anyhow::Result<StackFile> {
        read_stack(&self.stack_file).with_context(|| {
            format!(
                "no --database-url given and no running stack at {} (start one with `shopctl up`)",
                self.stack_file.display()
            )
        })
    }

    fn database(&self, pick: impl FnOnce(&StackFile) -> String) -> anyhow::Result<String> {
        match &self.database_url {
            Some(url) => Ok(url.clone()),
            None => Ok(pick(&self.stack()?)),
        }
    }

    fn nats(&self) -> anyhow::Result<String> {
        match &self.nats_url {
            Some(url) => Ok(url.clone()),
            None => Ok(self.stack()?.nats_url),
        }
    }
}

fn read_stack(path: &Path) -> anyhow::Result<StackFile> {
    Ok(serde_json::from_str(&std::fs::read_to_string(path)?)?)
}

fn orders_store(target: &Target) -> anyhow::Result<EventStore> {
    let url = target.database(|s| s.orders_database_url.clone())?;
    Ok(EventStore::new(platform::db::pool(&url, 2)?))
}

fn show(value: &serde_json::Value) -> String {
    match value {
        serde_json::Value::Null => "-".to_owned(),
        serde_json::Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

fn print_entry(entry: &history::Entry, changes: &[history::Change]) {
    let r = &entry.recorded;
    println!(
        "v{:<3} {}  {:<16} schema v{}  position {}  actor {}  correlation {}  causation {}{}",
        r.version,
        r.occurred_at.format("%Y-%m-%d %H:%M:%S%.3fZ"),
        r.event_type,
        r.schema_version,
        r.position,
        r.context.actor,
        r.context.correlation_id,
        r.context.causation_id,
        r.context
            .traceparent
            .as_ref()
            .map(|t| format!("  trace {t}"))
            .unwrap_or_default(),
    );
    for (field, before, after) in changes {
        println!("       {field}: {} -> {}", show(before), show(after));
    }
}

/// `shopctl orders history <id>`: every event with its metadata and the
/// change it made.
pub(crate) async fn history(target: &Target, order_id: uuid::Uuid) -> anyhow::Result<()> {
    let store = orders_store(target)?;
    let entries = history::trail(&store, order_id, None).await?;
    if entries.is_empty() {
        bail!("order {order_id} not found");
    }
    println!("Order {order_id}: {} events", entries.len());
    for (entry, changes) in history::changes(&entries) {
        print_entry(entry, &changes);
    }
    Ok(())
}

/// `shopctl orders at <id> --version N | --at TIME`: the state then, and the
/// diff each event up to then made.
pub(crate) async fn at(target: &Target, order_id: uuid::Uuid, point: At) -> anyhow::Result<()> {
    let store = orders_store(target)?;
    let Some((order, entries)) = history::state_at(&store, order_id, point).await? else {
        bail!("order {order_id} did not exist at that point");
    };
    for (entry, changes) in history::changes(&entries) {
        print_entry(entry, &changes);
    }
    println!("\nState of order {order_id} at version {}:", order.version);
    println!("{}", serde_json::to_string_pretty(&order)?);
    Ok(())
}

/// Which service's outbox to republish.
#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub(crate) enum Outbox {
    #[value(name = "order-service")]
    Orders,
    #[value(name = "user-service")]
    Users,
}

/// `shopctl relay republish --from N`: publish again from Postgres.
pub(crate) async fn republish(
    target: &Target,
    outbox: Outbox,
    from: Option<i64>,
    from_time: Option<chrono::DateTime<chrono::Utc>>,
) -> anyhow::Result<()> {
    let url = target.database(|s| match outbox {
        Outbox::Orders => s.orders_database_url.clone(),
        Outbox::Users => s.users_database_url.clone(),
    })?;
    let mut conn = <sqlx::PgConnection as sqlx::Connection>::connect(&url).await?;
    let from = match (from, from_time) {
        (Some(position), _) => position,
        (None, Some(time)) => sqlx::query_scalar::<_, Option<i64>>(
            "SELECT min(position) FROM events WHERE occurred_at >= $1",
        )
        .bind(time)
        .fetch_one(&mut conn)
        .await?
        .unwrap_or(i64::MAX),
        (None, None) => bail!("give --from <position> or --from-time <RFC 3339 time>"),
    };
    let client = async_nats::connect(target.nats()?).await?;
    let js = async_nats::jetstream::new(client);
    let limits = messaging::StreamLimits::default();
    let published = match outbox {
        Outbox::Orders => {
            messaging::ensure_stream(&js, messaging::ORDERS_STREAM, &limits).await?;
            es_postgres::relay::republish(
                &mut conn,
                &js,
                &order_service::integration::OrderEvents,
                from,
            )
            .await?
        }
        Outbox::Users => {
            messaging::ensure_stream(&js, messaging::USERS_STREAM, &limits).await?;
            es_postgres::relay::republish(
                &mut conn,
                &js,
                &user_service::integration::UserEvents,
                from,
            )
            .await?
        }
    };
    println!(
        "Republished {published} events from position {from}; JetStream dropped any it still had (Nats-Msg-Id)."
    );
    Ok(())
}

/// `shopctl projections rebuild <name>`: build the next generation beside
/// the live one and wait until it has taken over.
pub(crate) async fn rebuild(target: &Target, name: &str, wait: bool) -> anyhow::Result<()> {
    if !order_service::projections::ALL.contains(&name) {
        bail!(
            "unknown projection {name:?}; known: {}",
            order_service::projections::ALL.join(", ")
        );
    }
    let url = target.database(|s| s.orders_database_url.clone())?;
    let pool = platform::db::pool(&url, 2)?;
    let generation = projection::start_rebuild(&pool, name).await?;
    println!(
        "Rebuilding {name} as generation {generation}; queries keep using the live one meanwhile."
    );
    if !wait {
        return Ok(());
    }
    let started = std::time::Instant::now();
    loop {
        let status = projection::status(&pool, name)
            .await?
            .context("projection vanished")?;
        if status.live_generation == generation && status.building_generation.is_none() {
            println!(
                "Generation {generation} of {name} is live ({:.1} s).",
                started.elapsed().as_secs_f64()
            );
            return Ok(());
        }
        if started.elapsed() > std::time::Duration::from_secs(600) {
            bail!("the rebuild has not finished after 10 minutes; is order-service running?");
        }
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
}

/// `shopctl projections status`.
pub(crate) async fn status(target: &Target) -> anyhow::Result<()> {
    let url = target.database(|s| s.orders_database_url.clone())?;
    let pool = platform::db::pool(&url, 2)?;
    for name in order_service::projections::ALL {
        match projection::status(&pool, name).await? {
            Some(s) => println!(
                "{name:<16} live generation {}{}",
                s.live_generation,
                s.building_generation
                    .map(|b| format!(", building {b}"))
                    .unwrap_or_default()
            ),
            None => println!("{name:<16} not started yet"),
        }
    }
    Ok(())
}

async fn jetstream(target: &Target) -> anyhow::Result<async_nats::jetstream::Context> {
    let client = async_nats::connect(target.nats()?).await?;
    Ok(async_nats::jetstream::new(client))
}

fn print_letter(letter: &messaging::dlq::DeadLetter, full: bool) {
    println!(
        "#{:<5} {}  {:<16} consumer {}  attempts {}  reason: {}",
        letter.sequence,
        letter.dead_at,
        letter.subject,
        letter.consumer,
        letter.attempts,
        letter.reason
    );
    println!(
        "       event {}  last error: {}",
        letter.event_id.as_deref().unwrap_or("-"),
        letter.last_error
    );
    if full {
        if let Some(trace) = &letter.traceparent {
            println!("       trace {trace}");
        }
        for (name, values) in letter.headers.iter() {
            for value in values {
                println!("       header {name}: {value}");
            }
        }
        println!(
            "       payload ({} bytes): {:02x?}",
            letter.payload.len(),
            &letter.payload[..letter.payload.len().min(256)]
        );
    }
}

/// `shopctl dlq list`.
pub(crate) async fn dlq_list(target: &Target) -> anyhow::Result<()> {
    let letters = messaging::dlq::list(&jetstream(target).await?).await?;
    if letters.is_empty() {
        println!("The dead-letter stream is empty.");
    }
    for letter in &letters {
        print_letter(letter, false);
    }
    Ok(())
}

/// `shopctl dlq show <sequence>`.
pub(crate) async fn dlq_show(target: &Target, sequence: u64) -> anyhow::Result<()> {
    print_letter(
        &messaging::dlq::show(&jetstream(target).await?, sequence).await?,
        true,
    );
    Ok(())
}

/// `shopctl dlq redrive <sequence> | --all`.
pub(crate) async fn dlq_redrive(
    target: &Target,
    sequence: Option<u64>,
    all: bool,
) -> anyhow::Result<()> {
    let js = jetstream(target).await?;
    let sequences = match (sequence, all) {
        (Some(sequence), false) => vec![sequence],
        (None, true) => messaging::dlq::list(&js)
            .await?
            .iter()
            .map(|l| l.sequence)
            .collect(),
        _ => bail!("give a sequence or --all"),
    };
    for sequence in sequences {
        let letter = messaging::dlq::redrive(&js, sequence).await?;
        println!(
            "Redrove #{sequence} to {} (event {}).",
            letter.subject,
            letter.event_id.as_deref().unwrap_or("-")
        );
    }
    Ok(())
}
