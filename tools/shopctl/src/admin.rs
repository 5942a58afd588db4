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
    /// The service's own database, e.g. postgres://…/shop_orders (default:
    /// from the stack file of `shopctl up`).
    #[arg(long, env = "SHOP_DATABASE_URL")]
    database_url: Option<String>,
    /// NATS (default: from the stack file of `shopctl up`).
    #[arg(long, env = "SHOP_NATS_URL")]
    nats_url: Option<String>,
    /// Where `shopctl up` recorded its endpoints.
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

pub(crate) fn read_stack(path: &Path) -> anyhow::Result<StackFile> {
    Ok(serde_json::from_str(&std::fs::read_to_string(path)?)?)
}

/// `host:port/database` of a Postgres URL, without user or password.
pub(crate) fn where_postgres(url: &str) -> String {
    let rest = url.split_once("://").map_or(url, |(_, rest)| rest);
    let rest = rest.rsplit_once('@').map_or(rest, |(_, rest)| rest);
    rest.split('?').next().unwrap_or(rest).to_owned()
}

/// A pool that has proved it can connect, or an error naming the server and
/// the real cause (one direct connection first: the pool would retry a
/// refused connection until its timeout and report only that).
pub(crate) async fn connect_postgres(url: &str) -> anyhow::Result<sqlx::PgPool> {
    let named = |error: &sqlx::Error| {
        anyhow::anyhow!(
            "cannot connect to Postgres at {}: {}",
            where_postgres(url),
            sqlx_cause(error)
        )
    };
    let probe = tokio::time::timeout(
        std::time::Duration::from_secs(5),
        <sqlx::PgConnection as sqlx::Connection>::connect(url),
    )
    .await
    .map_err(|_| {
        anyhow::anyhow!(
            "cannot connect to Postgres at {}: no answer within 5 s",
            where_postgres(url)
        )
    })?
    .map_err(|error| named(&error))?;
    let _ = sqlx::Connection::close(probe).await;
    sqlx::postgres::PgPoolOptions::new()
        .max_connections(2)
        .acquire_timeout(std::time::Duration::from_secs(5))
        .connect(url)
        .await
        .map_err(|error| named(&error))
}

/// The part of a sqlx error a person can act on (no driver internals).
pub(crate) fn sqlx_cause(error: &sqlx::Error) -> String {
    match error {
        sqlx::Error::Io(io) => io.to_string(),
        sqlx::Error::Database(db) => db.message().to_owned(),
        sqlx::Error::PoolTimedOut => "no connection within 5 s".to_owned(),
        other => other.to_string(),
    }
}

/// A NATS connection, or an error naming the server.
pub(crate) async fn connect_nats(url: &str) -> anyhow::Result<async_nats::Client> {
    async_nats::ConnectOptions::new()
        .connection_timeout(std::time::Duration::from_secs(5))
        .connect(platform::nats::servers(url))
        .await
        .map_err(|error| anyhow::anyhow!("cannot connect to NATS at {url}: {error}"))
}

async fn orders_store(target: &Target) -> anyhow::Result<EventStore> {
    let url = target.database(|s| s.orders_database_url.clone())?;
    Ok(EventStore::new(connect_postgres(&url).await?))
}

fn print_json(value: &serde_json::Value) -> anyhow::Result<()> {
    out!("{}", serde_json::to_string_pretty(value)?);
    Ok(())
}

fn entry_json(entry: &history::Entry, changes: &[history::Change]) -> serde_json::Value {
    let r = &entry.recorded;
    serde_json::json!({
        "version": r.version,
        "position": r.position,
        "event_id": r.event_id,
        "event_type": r.event_type,
        "schema_version": r.schema_version,
        "occurred_at": r.occurred_at,
        "actor": r.context.actor,
        "correlation_id": r.context.correlation_id,
        "causation_id": r.context.causation_id,
        "traceparent": r.context.traceparent,
        "payload": r.payload,
        "changes": changes
            .iter()
            .map(|(field, before, after)| serde_json::json!({
                "field": field, "before": before, "after": after,
            }))
            .collect::<Vec<_>>(),
    })
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
    out!(
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
        out!("       {field}: {} -> {}", show(before), show(after));
    }
}

/// `shopctl orders history <id>`: every event with its metadata and the
/// change it made.
pub(crate) async fn history(
    target: &Target,
    order_id: uuid::Uuid,
    json: bool,
) -> anyhow::Result<()> {
    let store = orders_store(target).await?;
    let entries = history::trail(&store, order_id, None).await?;
    if entries.is_empty() {
        bail!("order {order_id} not found");
    }
    if json {
        let all: Vec<_> = history::changes(&entries)
            .into_iter()
            .map(|(entry, changes)| entry_json(entry, &changes))
            .collect();
        return print_json(&serde_json::Value::Array(all));
    }
    out!("Order {order_id}: {} events", entries.len());
    for (entry, changes) in history::changes(&entries) {
        print_entry(entry, &changes);
    }
    Ok(())
}

/// `shopctl orders at <id> --version N | --at TIME`: the state then, and the
/// diff each event up to then made.
pub(crate) async fn at(
    target: &Target,
    order_id: uuid::Uuid,
    point: At,
    json: bool,
) -> anyhow::Result<()> {
    if let At::Version(version) = point
        && version < 1
    {
        bail!("--version must be at least 1 (the order as created), not {version}");
    }
    let store = orders_store(target).await?;
    let Some((order, entries)) = history::state_at(&store, order_id, point).await? else {
        bail!("order {order_id} did not exist at that point");
    };
    if let At::Version(version) = point
        && i64::try_from(entries.len()).unwrap_or(i64::MAX) < version
    {
        bail!(
            "order {order_id} has {} versions; there is no version {version}",
            entries.len()
        );
    }
    if json {
        let events: Vec<_> = history::changes(&entries)
            .into_iter()
            .map(|(entry, changes)| entry_json(entry, &changes))
            .collect();
        return print_json(&serde_json::json!({
            "order_id": order_id,
            "version": order.version,
            "state": order,
            "events": events,
        }));
    }
    for (entry, changes) in history::changes(&entries) {
        print_entry(entry, &changes);
    }
    out!("\nState of order {order_id} at version {}:", order.version);
    out!("{}", serde_json::to_string_pretty(&order)?);
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
    let pool = connect_postgres(&url).await?;
    let mut conn = pool.acquire().await?;
    let from = match (from, from_time) {
        (Some(position), _) => position,
        (None, Some(time)) => sqlx::query_scalar::<_, Option<i64>>(
            "SELECT min(position) FROM events WHERE occurred_at >= $1",
        )
        .bind(time)
        .fetch_one(&mut *conn)
        .await?
        .unwrap_or(i64::MAX),
        (None, None) => bail!("give --from <position> or --from-time <RFC 3339 time>"),
    };
    let js = async_nats::jetstream::new(connect_nats(&target.nats()?).await?);
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
    out!(
        "Republished {published} events from position {from}; JetStream dropped any it still had (Nats-Msg-Id)."
    );
    Ok(())
}

/// `shopctl projections rebuild <name>`: build the next generation beside
/// the live one and wait until it has taken over.
pub(crate) async fn rebuild(
    target: &Target,
    name: &str,
    wait: bool,
    quiet: bool,
) -> anyhow::Result<()> {
    if !order_service::projections::ALL.contains(&name) {
        bail!(
            "unknown projection {name:?}; known: {}",
            order_service::projections::ALL.join(", ")
        );
    }
    let url = target.database(|s| s.orders_database_url.clone())?;
    let pool = connect_postgres(&url).await?;
    let generation = projection::start_rebuild(&pool, name).await?;
    out!(
        "Rebuilding {name} as generation {generation}; queries keep using the live one meanwhile."
    );
    if !wait {
        return Ok(());
    }
    let started = std::time::Instant::now();
    let mut bar = crate::status::Progress::new(!quiet);
    loop {
        let (live, building) = projection::progress(&pool, name)
            .await?
            .context("projection vanished")?;
        if let Some(building) = &building {
            bar.show(building.position, building.lag_events, started.elapsed());
        }
        if live.generation == generation && building.is_none() {
            bar.finish();
            out!(
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
pub(crate) async fn status(target: &Target, json: bool) -> anyhow::Result<()> {
    let url = target.database(|s| s.orders_database_url.clone())?;
    let pool = connect_postgres(&url).await?;
    let all = projections_json(&pool).await?;
    if json {
        return print_json(&serde_json::Value::Array(all));
    }
    for p in &all {
        out!(
            "{:<16} {}",
            p["name"].as_str().unwrap_or_default(),
            describe_projection(p)
        );
    }
    Ok(())
}

/// One projection's progress in words, from [`projections_json`].
pub(crate) fn describe_projection(p: &serde_json::Value) -> String {
    if p["live"].is_null() {
        return "not started yet".to_owned();
    }
    let generation = |g: &serde_json::Value| {
        format!(
            "generation {} at position {} ({} events behind)",
            g["generation"], g["position"], g["lag_events"]
        )
    };
    let mut text = format!("live {}", generation(&p["live"]));
    if !p["building"].is_null() {
        text.push_str(&format!(", building {}", generation(&p["building"])));
    }
    text
}

/// Every projection's live and building generation, as JSON.
pub(crate) async fn projections_json(
    pool: &sqlx::PgPool,
) -> anyhow::Result<Vec<serde_json::Value>> {
    let progress_json = |p: &projection::Progress| {
        serde_json::json!({
            "generation": p.generation,
            "position": p.position,
            "lag_events": p.lag_events,
        })
    };
    let mut all = Vec::new();
    for name in order_service::projections::ALL {
        let (live, building) = match projection::progress(pool, name).await? {
            Some((live, building)) => (
                progress_json(&live),
                building
                    .as_ref()
                    .map_or(serde_json::Value::Null, progress_json),
            ),
            None => (serde_json::Value::Null, serde_json::Value::Null),
        };
        all.push(serde_json::json!({ "name": name, "live": live, "building": building }));
    }
    Ok(all)
}

async fn jetstream(target: &Target) -> anyhow::Result<async_nats::jetstream::Context> {
    Ok(async_nats::jetstream::new(
        connect_nats(&target.nats()?).await?,
    ))
}

fn letter_json(letter: &messaging::dlq::DeadLetter, full: bool) -> serde_json::Value {
    let mut value = serde_json::json!({
        "sequence": letter.sequence,
        "subject": letter.subject,
        "consumer": letter.consumer,
        "reason": letter.reason,
        "attempts": letter.attempts,
        "last_error": letter.last_error,
        "dead_at": letter.dead_at,
        "event_id": letter.event_id,
        "traceparent": letter.traceparent,
    });
    if full {
        let headers: serde_json::Map<String, serde_json::Value> = letter
            .headers
            .iter()
            .map(|(name, values)| {
                (
                    name.to_string(),
                    values.iter().map(ToString::to_string).collect(),
                )
            })
            .collect();
        value["headers"] = serde_json::Value::Object(headers);
        value["payload_base64"] =
            base64::Engine::encode(&base64::engine::general_purpose::STANDARD, &letter.payload)
                .into();
        value["payload_text"] = std::str::from_utf8(&letter.payload)
            .map_or(serde_json::Value::Null, |text| text.into());
    }
    value
}

fn print_letter(letter: &messaging::dlq::DeadLetter, full: bool) {
    out!(
        "#{:<5} {}  {:<16} consumer {}  attempts {}  reason: {}",
        letter.sequence,
        letter.dead_at,
        letter.subject,
        letter.consumer,
        letter.attempts,
        letter.reason
    );
    out!(
        "       event {}  last error: {}",
        letter.event_id.as_deref().unwrap_or("-"),
        letter.last_error
    );
    if full {
        if let Some(trace) = &letter.traceparent {
            out!("       trace {trace}");
        }
        for (name, values) in letter.headers.iter() {
            for value in values {
                out!("       header {name}: {value}");
            }
        }
        out!(
            "       payload ({} bytes): {:02x?}",
            letter.payload.len(),
            &letter.payload[..letter.payload.len().min(256)]
        );
    }
}

/// `shopctl dlq list`.
pub(crate) async fn dlq_list(target: &Target, json: bool) -> anyhow::Result<()> {
    let letters = messaging::dlq::list(&jetstream(target).await?).await?;
    if json {
        let all = letters.iter().map(|l| letter_json(l, false)).collect();
        return print_json(&serde_json::Value::Array(all));
    }
    if letters.is_empty() {
        out!("The dead-letter stream is empty.");
    }
    for letter in &letters {
        print_letter(letter, false);
    }
    Ok(())
}

/// `shopctl dlq show <sequence>`.
pub(crate) async fn dlq_show(target: &Target, sequence: u64, json: bool) -> anyhow::Result<()> {
    let letter = messaging::dlq::show(&jetstream(target).await?, sequence).await?;
    if json {
        return print_json(&letter_json(&letter, true));
    }
    print_letter(&letter, true);
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
        out!(
            "Redrove #{sequence} to {} (event {}).",
            letter.subject,
            letter.event_id.as_deref().unwrap_or("-")
        );
    }
    Ok(())
}
