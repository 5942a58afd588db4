//! `shopctl chaos <scenario>|all`: the fault scenarios of
//! `docs/reliability.md`, each on a fresh stack under a bounded load,
//! judged by the history oracle ([`oracle`]). One summary line per
//! scenario; the exit status is non-zero when any count is not 0, a
//! scenario's own check failed, or the system did not settle.

mod load;
mod oracle;
mod sabotage;
mod scenarios;
mod stack;

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    sync::atomic::Ordering,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use contracts::{
    notification::v1::{
        RegisterWebhookRequest, notification_service_client::NotificationServiceClient,
    },
    order::v1::order_service_client::OrderServiceClient,
    user::v1::user_service_client::UserServiceClient,
};
use serde::Serialize;

use scenarios::Scenario;
use stack::{ChaosStack, Database, Service};

/// `shopctl chaos` options.
#[derive(Debug, clap::Args)]
pub(crate) struct ChaosOptions {
    /// Scenarios to run (names, or `all`); `--list` names them.
    #[arg(required_unless_present = "list", value_delimiter = ',')]
    scenarios: Vec<String>,
    /// Name every scenario and what it does.
    #[arg(long)]
    list: bool,
    /// Load time per scenario (the fault comes after 3 s).
    #[arg(long, default_value = "20s", value_parser = crate::load::parse_duration)]
    duration: Duration,
    /// Concurrent clients.
    #[arg(long, default_value_t = 8)]
    concurrency: usize,
    /// Keep the load going past `--duration` until this many commands were
    /// acknowledged (at most 60 s more), so a slow scenario still means
    /// something.
    #[arg(long, default_value_t = 5000)]
    min_commands: usize,
    /// Where the servers keep their data and logs (a scenario's directory
    /// is removed when it passes, kept when it fails).
    #[arg(long, default_value = ".shop/chaos")]
    data_dir: PathBuf,
    /// One JSON array on stdout instead of text.
    #[arg(long)]
    json: bool,
    /// The oracle's own test: after settling, lose, double, invent and
    /// change one thing each; the run must then report exactly one of each.
    #[arg(long, hide = true)]
    sabotage: bool,
}

/// A scenario's own check besides the oracle.
#[derive(Debug, Serialize)]
struct Check {
    what: String,
    passed: bool,
}

/// One scenario's result.
#[derive(Debug, Serialize)]
struct Outcome {
    scenario: &'static str,
    passed: bool,
    #[serde(flatten)]
    verdict: oracle::Verdict,
    commands_per_second: f64,
    /// Failed attempts (each retried with its key), by gRPC code.
    errors: BTreeMap<String, u64>,
    /// Commands given up on after their retry budget.
    abandoned: u64,
    /// First successful answer after the fault healed.
    first_success_after_heal_s: Option<f64>,
    /// The restarted process answering health checks, after the heal.
    ready_after_heal_s: Option<f64>,
    /// From the end of the load until relay, projections and consumers had
    /// nothing left.
    settled_in_s: Option<f64>,
    /// Timings the fault measured, in seconds (leader takeover, NATS
    /// reconnect), each also checked against its documented bound.
    figures: BTreeMap<&'static str, f64>,
    checks: Vec<Check>,
    /// Why the scenario could not run or settle.
    error: Option<String>,
    /// Logs of a failed scenario.
    logs: Option<String>,
}

fn seconds(d: Duration) -> f64 {
    (d.as_secs_f64() * 100.0).round() / 100.0
}

/// `shopctl chaos`.
pub(crate) async fn run(options: ChaosOptions) -> anyhow::Result<()> {
    if options.list {
        for s in scenarios::ALL {
            out!("{:<26} {}", s.name, s.about);
        }
        return Ok(());
    }
    let chosen = choose(&options.scenarios)?;
    if !(1..=256).contains(&options.concurrency) {
        bail!("--concurrency must be 1..=256");
    }
    if options.duration < Duration::from_secs(8) || options.duration > Duration::from_secs(3600) {
        bail!("--duration must be between 8s and 1h (the fault comes after 3 s)");
    }
    crate::infra::install_missing(true, true)?;
    // The metrics scrapes use reqwest, which needs a rustls provider.
    platform::tls::install_crypto_provider();
    std::fs::create_dir_all(&options.data_dir)
        .with_context(|| format!("creating {}", options.data_dir.display()))?;
    let data_dir = std::fs::canonicalize(&options.data_dir)?;
    let mut db = Database::start(&data_dir).await?;
    let mut outcomes = Vec::new();
    for scenario in chosen {
        if !options.json {
            eout!("chaos: {} — {}", scenario.name, scenario.about);
        }
        let outcome = run_one(scenario, &options, &data_dir, &mut db).await;
        if !options.json {
            out!("{}", summary(&outcome));
        }
        outcomes.push(outcome);
    }
    db.stop().await;
    if options.json {
        out!("{}", serde_json::to_string_pretty(&outcomes)?);
    }
    let failed: Vec<_> = outcomes
        .iter()
        .filter(|o| !o.passed)
        .map(|o| o.scenario)
        .collect();
    if failed.is_empty() {
        Ok(())
    } else {
        bail!("failed: {}", failed.join(", "))
    }
}

fn choose(names: &[String]) -> anyhow::Result<Vec<Scenario>> {
    let mut chosen = Vec::new();
    for name in names.iter().map(|n| n.trim()).filter(|n| !n.is_empty()) {
        if name == "all" {
            chosen.extend(scenarios::ALL.iter().copied());
            continue;
        }
        match scenarios::ALL.iter().find(|s| s.name == name) {
            Some(s) => chosen.push(*s),
            None => bail!("unknown scenario {name:?}; `shopctl chaos --list` names them"),
        }
    }
    if chosen.is_empty() {
        bail!("name a scenario, or `all`");
    }
    Ok(chosen)
}

/// One line: the verdict's counts, then recovery, then errors.
fn summary(o: &Outcome) -> String {
    let v = &o.verdict;
    let mut line = format!(
        "{:<25} {}  acknowledged {}  lost {}  duplicated {}  unexpected {}  diverged {}  repeats {}",
        o.scenario,
        if o.passed { "PASS" } else { "FAIL" },
        v.acknowledged,
        v.lost,
        v.duplicated,
        v.unexpected,
        v.diverged,
        v.repeats
    );
    line.push_str(&format!("  | {:.0} cmd/s", o.commands_per_second));
    if let Some(s) = o.first_success_after_heal_s {
        line.push_str(&format!("  first success +{s:.2} s"));
    }
    if let Some(s) = o.ready_after_heal_s {
        line.push_str(&format!("  ready +{s:.2} s"));
    }
    if let Some(s) = o.settled_in_s {
        line.push_str(&format!("  settled {s:.2} s"));
    }
    for (figure, s) in &o.figures {
        line.push_str(&format!("  {figure} {s:.2}"));
    }
    if !o.errors.is_empty() {
        let errors: Vec<String> = o.errors.iter().map(|(c, n)| format!("{c} {n}")).collect();
        line.push_str(&format!("  | retried: {}", errors.join(", ")));
    }
    if o.abandoned > 0 {
        line.push_str(&format!("  abandoned {}", o.abandoned));
    }
    for check in &o.checks {
        line.push_str(&format!(
            "\n    {} {}",
            if check.passed { "ok  " } else { "FAIL" },
            check.what
        ));
    }
    for example in &v.examples {
        line.push_str(&format!("\n    finding: {example}"));
    }
    if let Some(error) = &o.error {
        line.push_str(&format!("\n    error: {error}"));
    }
    if let Some(logs) = &o.logs {
        line.push_str(&format!("\n    logs: {logs}"));
    }
    line
}

async fn run_one(
    scenario: Scenario,
    options: &ChaosOptions,
    data_dir: &Path,
    db: &mut Database,
) -> Outcome {
    let dir = data_dir.join(scenario.name);
    let _ = std::fs::remove_dir_all(&dir);
    let prefix = format!("chaos_{}", scenario.name.replace('-', "_"));
    let mut outcome = Outcome {
        scenario: scenario.name,
        passed: false,
        verdict: oracle::Verdict::default(),
        commands_per_second: 0.0,
        errors: BTreeMap::new(),
        abandoned: 0,
        first_success_after_heal_s: None,
        ready_after_heal_s: None,
        settled_in_s: None,
        figures: BTreeMap::new(),
        checks: Vec::new(),
        error: None,
        logs: None,
    };
    let stack = ChaosStack::start(&dir, db, &prefix, &scenario.tuning(), scenario.topology).await;
    let result = match stack {
        Ok(mut stack) => {
            let result = drive(scenario, options, &mut stack, db, &mut outcome).await;
            stack.stop().await;
            result
        }
        Err(error) => Err(error),
    };
    if let Err(error) = result {
        outcome.error = Some(format!("{error:#}"));
    }
    outcome.passed = outcome.error.is_none()
        && outcome.verdict.clean()
        && outcome.checks.iter().all(|c| c.passed);
    if outcome.passed {
        let _ = std::fs::remove_dir_all(&dir);
        for suffix in ["users", "orders", "notifications"] {
            let _ = stack::drop_database(&db.admin_url, &format!("{prefix}_{suffix}")).await;
        }
    } else {
        outcome.logs = Some(dir.display().to_string());
    }
    outcome
}

/// Signs up users with a webhook each, runs the load, injects and heals the
/// fault, settles and judges.
async fn drive(
    scenario: Scenario,
    options: &ChaosOptions,
    stack: &mut ChaosStack,
    db: &mut Database,
    outcome: &mut Outcome,
) -> anyhow::Result<()> {
    let receiver = testkit::WebhookReceiver::start().await?;
    let mut users_client =
        UserServiceClient::new(crate::load::channel(&stack.grpc(Service::User)).await?);
    let notifications = NotificationServiceClient::new(
        crate::load::channel(&stack.grpc(Service::Notification)).await?,
    );
    let run_id = uuid::Uuid::new_v4();
    let mut users = Vec::new();
    for i in 0..options.concurrency.min(8) {
        let user = crate::load::sign_up(&mut users_client, run_id, i).await?;
        notifications
            .clone()
            .register_webhook(crate::demo::authed(
                &user.token,
                RegisterWebhookRequest {
                    url: receiver.url(),
                },
            )?)
            .await
            .context("RegisterWebhook")?;
        users.push(user);
    }
    let orders = OrderServiceClient::new(crate::load::channel(&stack.grpc(Service::Order)).await?);
    let started = Instant::now();
    let load = load::Load::start(&orders, &users, options.concurrency, scenario.race);
    tokio::time::sleep(Duration::from_secs(3)).await;
    let injected = scenarios::inject(scenario.fault, stack, db).await;
    // The load goes on until the duration is up, and at least 3 s past the heal.
    let end = (started + options.duration).max(Instant::now() + Duration::from_secs(3));
    tokio::time::sleep_until(end.into()).await;
    let cap = end + Duration::from_secs(60);
    while load.ledger.acknowledged() < options.min_commands && Instant::now() < cap {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let ledger = load.finish().await;
    let elapsed = started.elapsed();
    let injected = injected?;
    outcome.figures.clone_from(&injected.figures);
    outcome.errors = ledger.errors.lock().map(|e| e.clone()).unwrap_or_default();
    outcome.abandoned = ledger.abandoned.load(Ordering::Relaxed);
    let acks = ledger.acks();
    outcome.commands_per_second = (acks.len() as f64 / elapsed.as_secs_f64()).round();
    outcome.first_success_after_heal_s = injected
        .healed_at
        .and_then(|at| ledger.first_success_after(at))
        .map(seconds);
    outcome.ready_after_heal_s = injected.ready_after.map(seconds);

    let orders_pool = crate::admin::connect_postgres(&stack.orders_db).await?;
    let users_pool = crate::admin::connect_postgres(&stack.users_db).await?;
    let notifications_pool = crate::admin::connect_postgres(&stack.notifications_db).await?;
    let js = async_nats::jetstream::new(crate::admin::connect_nats(&stack.nats_url).await?);
    for (name, generation) in &injected.rebuilt {
        let live = wait_rebuilt(&orders_pool, name, *generation).await;
        outcome.checks.push(Check {
            what: format!("rebuilt {name} generation {generation} is live"),
            passed: live,
        });
    }
    match oracle::settle(&orders_pool, &users_pool, &js, Duration::from_secs(90)).await {
        Ok(took) => outcome.settled_in_s = Some(seconds(took)),
        Err(busy) => bail!("did not settle within 90 s: {busy}"),
    }
    if options.sabotage {
        sabotage::apply(&orders_pool, &notifications_pool, &js).await?;
    }
    let mut facts = oracle::collect(&orders_pool, &users_pool, &notifications_pool, &js).await?;
    facts.acks = acks;
    facts.double_wins = ledger.double_wins.load(Ordering::Relaxed);
    facts.injected = injected.injected.iter().cloned().collect();
    facts.received = receiver
        .accepted()
        .into_iter()
        .filter_map(|hit| hit.headers.get("shop-webhook-id").cloned())
        .collect();
    outcome.verdict = oracle::judge(&facts);
    if let Some(before) = injected.slow_duplicates {
        let after = stack.duplicates_absorbed().await;
        outcome.checks.push(Check {
            what: format!(
                "redeliveries absorbed as duplicates: {before} by the slow consumer, {after} after its restart"
            ),
            passed: before + after > 0.0,
        });
    }
    scenario_checks(
        scenario,
        options.min_commands,
        &js,
        &facts,
        &injected,
        &ledger,
        outcome,
    )
    .await?;
    Ok(())
}

/// Redrives `letter` and waits (at most 30 s) for the consumer to refuse it
/// again: it arrives back in the DLQ under a new sequence.
async fn redriven_and_refused(
    js: &async_nats::jetstream::Context,
    letter: &messaging::dlq::DeadLetter,
) -> anyhow::Result<bool> {
    messaging::dlq::redrive(js, letter.sequence).await?;
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        let back = messaging::dlq::list(js)
            .await?
            .into_iter()
            .any(|l| l.event_id == letter.event_id && l.sequence > letter.sequence);
        if back {
            return Ok(true);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    Ok(false)
}

async fn wait_rebuilt(pool: &sqlx::PgPool, name: &str, generation: i32) -> bool {
    let deadline = Instant::now() + Duration::from_secs(120);
    while Instant::now() < deadline {
        if let Ok(Some((live, None))) = es_postgres::projection::progress(pool, name).await
            && live.generation == generation
        {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    false
}

/// What a scenario shows besides the oracle: that its fault really did
/// what it is named for.
async fn scenario_checks(
    scenario: Scenario,
    min_commands: usize,
    js: &async_nats::jetstream::Context,
    facts: &oracle::Facts,
    injected: &scenarios::Injected,
    ledger: &load::Ledger,
    outcome: &mut Outcome,
) -> anyhow::Result<()> {
    use scenarios::Fault;
    let timeouts: u64 = ["Cancelled", "DeadlineExceeded"]
        .iter()
        .filter_map(|code| outcome.errors.get(*code))
        .sum();
    let mut check = |what: String, passed: bool| outcome.checks.push(Check { what, passed });
    match scenario.fault {
        Fault::Poison => {
            let letters = messaging::dlq::list(js).await?;
            for id in &injected.injected {
                let dead = letters
                    .iter()
                    .any(|l| l.event_id.as_deref() == Some(id.as_str()));
                check(format!("poison message {id} is dead-lettered"), dead);
            }
            check(
                format!("nothing else is dead-lettered ({} letters)", letters.len()),
                letters.len() == injected.injected.len(),
            );
            for letter in &letters {
                check(
                    format!(
                        "redriven letter {} is dead-lettered again, as it is still poison",
                        letter.sequence
                    ),
                    redriven_and_refused(js, letter).await?,
                );
            }
        }
        Fault::RelayGap { .. } => {
            for id in &injected.appended {
                check(
                    format!("the event held open ({id}) was published"),
                    facts.published.contains_key(&id.to_string()),
                );
            }
        }
        _ => {}
    }
    if scenario.race {
        let races = ledger.races.load(Ordering::Relaxed);
        check(
            format!("{races} payment races ran, each with at most one winner"),
            races > 0,
        );
    }
    if let Fault::CrashPostgres { .. } = scenario.fault {
        // With Postgres known down, calls fail at once with UNAVAILABLE
        // instead of running into the client's 3 s deadline.
        check(
            format!("calls failed fast while Postgres was down ({timeouts} ran into the deadline)"),
            timeouts == 0,
        );
    }
    check(
        format!(
            "at least {min_commands} commands acknowledged ({acknowledged})",
            acknowledged = facts.acks.len()
        ),
        facts.acks.len() >= min_commands,
    );
    for (what, passed) in &injected.checks {
        check(what.clone(), *passed);
    }
    // Only where the fault is on the command path (NATS and
    // notification-service faults never stop commands: the outbox absorbs
    // them, and the oracle judges what they delay).
    if let Fault::Signal {
        service: Service::Order | Service::User,
        ..
    }
    | Fault::CrashPostgres { .. }
    | Fault::Partition {
        peer: stack::Peer::Postgres | stack::Peer::UserService,
        ..
    }
    | Fault::Latency { .. } = scenario.fault
    {
        check(
            "commands succeeded again after the heal".to_owned(),
            outcome.first_success_after_heal_s.is_some(),
        );
    }
    Ok(())
}
