//! `shopctl load`: the project's own load generator. It signs up its own
//! users, then drives order flows (a mix of create / pay / ship / deliver /
//! cancel and queries) against a running stack, closed loop (`--concurrency
//! N` workers, each starting its next flow when the last ends) or open loop
//! (`--rate R` commands per second, latency counted from each flow's planned
//! start so a slow server cannot hide its queue). It watches the
//! notifications of its users to measure end to end: command accepted ->
//! notification streamed, and (sampled) command accepted -> read model
//! updated. Bounded in time: warm-up + duration, then a bounded drain.

mod flow;
mod plot;
mod report;

use std::{
    collections::HashMap,
    path::PathBuf,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use contracts::{
    notification::v1::{
        WatchNotificationsRequest, notification_service_client::NotificationServiceClient,
    },
    order::v1::order_service_client::OrderServiceClient,
    user::v1::{AuthenticateRequest, CreateUserRequest, user_service_client::UserServiceClient},
};
use tonic::transport::Channel;
use uuid::Uuid;

pub(crate) use flow::Mix;

/// `shopctl load` options.
#[derive(Debug, clap::Args)]
pub(crate) struct LoadOptions {
    /// Where `shopctl up` recorded its endpoints.
    #[arg(long, default_value = ".shop/stack.json")]
    stack_file: PathBuf,
    /// Closed loop: this many concurrent workers (default 8).
    #[arg(long, conflicts_with = "rate")]
    concurrency: Option<usize>,
    /// Open loop: this many commands per second, whatever the latency.
    #[arg(long)]
    rate: Option<f64>,
    /// Measured time, after the warm-up (e.g. 30s, 2m).
    #[arg(long, default_value = "20s", value_parser = parse_duration)]
    duration: Duration,
    /// Time before measuring starts (load runs, samples are dropped).
    #[arg(long, default_value = "3s", value_parser = parse_duration)]
    warmup: Duration,
    /// Flows to run: steps joined by `,`, flows by spaces, each with an
    /// optional `:weight`. Steps: create, pay, ship, deliver, cancel, get
    /// (read-your-writes), list.
    #[arg(long, default_value = "create,pay,ship")]
    mix: Mix,
    /// Users to sign up and spread the flows over (default: as many as
    /// workers, at most 64).
    #[arg(long)]
    users: Option<usize>,
    /// Measure "accepted -> read model updated" on every Nth create (0: off).
    #[arg(long, default_value_t = 10)]
    read_sample: u64,
    /// After the run, wait at most this long for missing notifications.
    #[arg(long, default_value = "15s", value_parser = parse_duration)]
    drain: Duration,
    /// In-flight flows beyond which the open loop drops (and counts) starts.
    #[arg(long, default_value_t = 20_000)]
    max_in_flight: usize,
    /// Write `load.json`, `load.md` and `load.svg` into this directory.
    #[arg(long)]
    report_dir: Option<PathBuf>,
    /// Print the JSON report on stdout instead of the Markdown summary.
    #[arg(long)]
    json: bool,
    /// No progress line.
    #[arg(long)]
    quiet: bool,
}

pub(crate) fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let (number, unit) = text
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .map_or((text, "s"), |i| text.split_at(i));
    let value: f64 = number
        .parse()
        .map_err(|_| format!("{text:?} is not a duration like 500ms, 20s or 2m"))?;
    let seconds = match unit {
        "ms" => value / 1000.0,
        "s" => value,
        "m" => value * 60.0,
        _ => return Err(format!("unknown unit {unit:?} in {text:?}; use ms, s or m")),
    };
    if !(0.0..=86_400.0).contains(&seconds) {
        return Err(format!("{text:?} is out of range (at most a day)"));
    }
    Ok(Duration::from_secs_f64(seconds))
}

/// One finished call.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Sample {
    /// When it ended, since the run started (warm-up included).
    pub(crate) at: Duration,
    pub(crate) step: flow::Step,
    pub(crate) latency: Duration,
    /// `None` for OK.
    pub(crate) code: Option<tonic::Code>,
}

/// When the client was told a command succeeded, and when the notification
/// of its event arrived.
pub(crate) type Timing = (Option<Instant>, Option<Instant>);

/// What the run shares between workers, watchers and the progress line.
#[derive(Debug, Default)]
pub(crate) struct Shared {
    pub(crate) samples: Mutex<Vec<Sample>>,
    /// (order, event type) -> (accepted, notified).
    pub(crate) events: Mutex<HashMap<(Uuid, &'static str), Timing>>,
    /// Accepted -> read model caught up, sampled.
    pub(crate) read_model: Mutex<Vec<(Duration, Duration)>>,
    pub(crate) ok: AtomicU64,
    pub(crate) errors: AtomicU64,
    pub(crate) dropped: AtomicU64,
    pub(crate) creates: AtomicU64,
}

impl Shared {
    pub(crate) fn record(&self, sample: Sample) {
        if sample.code.is_none() {
            self.ok.fetch_add(1, Ordering::Relaxed);
        } else {
            self.errors.fetch_add(1, Ordering::Relaxed);
        }
        if let Ok(mut samples) = self.samples.lock() {
            samples.push(sample);
        }
    }

    pub(crate) fn accepted(&self, order: Uuid, event: &'static str, at: Instant) {
        if let Ok(mut events) = self.events.lock() {
            events.entry((order, event)).or_default().0 = Some(at);
        }
    }

    fn notified(&self, order: Uuid, event: &'static str, at: Instant) {
        if let Ok(mut events) = self.events.lock() {
            let entry = events.entry((order, event)).or_default();
            entry.1.get_or_insert(at);
        }
    }

    fn missing_notifications(&self) -> usize {
        self.events.lock().map_or(0, |events| {
            events
                .values()
                .filter(|(accepted, notified)| accepted.is_some() && notified.is_none())
                .count()
        })
    }
}

/// A signed-up user of the run.
#[derive(Debug, Clone)]
pub(crate) struct User {
    pub(crate) token: String,
}

/// The connections a worker uses.
#[derive(Debug, Clone)]
pub(crate) struct Clients {
    pub(crate) orders: OrderServiceClient<Channel>,
}

/// A channel to `url`, or balanced over every replica when `url` lists
/// several (comma-separated); a lone endpoint is connected to at once, so
/// a wrong address fails here.
pub(crate) async fn channel(url: &str) -> anyhow::Result<Channel> {
    let endpoint = |url: &str| -> anyhow::Result<tonic::transport::Endpoint> {
        Ok(tonic::transport::Endpoint::from_shared(url.to_owned())
            .with_context(|| format!("{url:?} is not a URL"))?
            .connect_timeout(Duration::from_secs(3))
            .timeout(Duration::from_secs(30))
            .tcp_nodelay(true))
    };
    match platform::net::urls(url).as_slice() {
        [] => anyhow::bail!("no address given"),
        [one] => endpoint(one)?
            .connect()
            .await
            .with_context(|| format!("cannot connect to {one}")),
        many => Ok(platform::net::channel(
            many.iter()
                .map(|u| endpoint(u))
                .collect::<anyhow::Result<_>>()?,
        )),
    }
}

pub(crate) async fn sign_up(
    users: &mut UserServiceClient<Channel>,
    run: Uuid,
    i: usize,
) -> anyhow::Result<User> {
    let email = format!("load-{}-{i}@example.com", run.simple());
    let password = "load generator password".to_owned();
    users
        .create_user(CreateUserRequest {
            email: email.clone(),
            password: password.clone(),
        })
        .await
        .context("CreateUser")?;
    // A busy hashing pool answers RESOURCE_EXHAUSTED: wait and try again.
    let mut tries = 0;
    let token = loop {
        match users
            .authenticate(AuthenticateRequest {
                email: email.clone(),
                password: password.clone(),
            })
            .await
        {
            Err(status) if status.code() == tonic::Code::ResourceExhausted && tries < 20 => {
                tries += 1;
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            answer => break answer.context("Authenticate")?.into_inner().access_token,
        }
    };
    Ok(User { token })
}

/// The first UUID in `text` (notification subjects name their order).
fn uuid_in(text: &str) -> Option<Uuid> {
    text.split(|c: char| !(c.is_ascii_hexdigit() || c == '-'))
        .find_map(|word| {
            (word.len() == 36)
                .then(|| Uuid::parse_str(word).ok())
                .flatten()
        })
}

/// Streams one user's notifications into `shared` until `stop`.
async fn watch(
    mut client: NotificationServiceClient<Channel>,
    user: User,
    shared: Arc<Shared>,
    ready: tokio::sync::mpsc::Sender<()>,
    stop: tokio_util::sync::CancellationToken,
) -> anyhow::Result<()> {
    let mut stream = client
        .watch_notifications(crate::demo::authed(
            &user.token,
            WatchNotificationsRequest {},
        )?)
        .await
        .context("WatchNotifications")?
        .into_inner();
    let _ = ready.send(()).await;
    loop {
        let next = tokio::select! {
            () = stop.cancelled() => return Ok(()),
            next = stream.message() => next,
        };
        let Some(message) = next.context("WatchNotifications stream")? else {
            return Ok(());
        };
        let now = Instant::now();
        let Some(n) = message.notification else {
            continue;
        };
        if let (Some(event), Some(order)) = (flow::event_type(&n.event_type), uuid_in(&n.subject)) {
            shared.notified(order, event, now);
        }
    }
}

/// `shopctl load`.
pub(crate) async fn run(options: LoadOptions) -> anyhow::Result<()> {
    let stack = crate::admin::read_stack(&options.stack_file).with_context(|| {
        format!(
            "no running stack at {} (start one with `shopctl up`, or pass --stack-file)",
            options.stack_file.display()
        )
    })?;
    if options.rate.is_some_and(|r| !(r > 0.0 && r <= 1_000_000.0)) {
        bail!("--rate must be between 0 and 1000000 commands per second");
    }
    let concurrency = options.concurrency.unwrap_or(8).clamp(1, 4096);
    let user_count = options
        .users
        .unwrap_or_else(|| concurrency.min(64))
        .clamp(1, 2048);
    let run_id = Uuid::new_v4();
    let users_client = UserServiceClient::new(channel(&stack.user_service).await?);
    // Eight at a time: password hashing is the slow part.
    let mut users = Vec::with_capacity(user_count);
    for chunk in (0..user_count).collect::<Vec<_>>().chunks(8) {
        let signing_up = chunk.iter().map(|&i| {
            let mut client = users_client.clone();
            async move { sign_up(&mut client, run_id, i).await }
        });
        for user in futures::future::join_all(signing_up).await {
            users.push(user?);
        }
    }
    // A few connections, shared round robin: HTTP/2 multiplexes calls.
    let mut clients = Vec::new();
    for _ in 0..concurrency.clamp(1, 8) {
        clients.push(Clients {
            orders: OrderServiceClient::new(channel(&stack.order_service).await?),
        });
    }
    let shared = Arc::new(Shared::default());
    let stop_watch = tokio_util::sync::CancellationToken::new();
    let notifications = NotificationServiceClient::new(channel(&stack.notification_service).await?);
    let (ready_tx, mut ready_rx) = tokio::sync::mpsc::channel(users.len());
    let mut watchers = Vec::new();
    for user in &users {
        watchers.push(tokio::spawn(watch(
            notifications.clone(),
            user.clone(),
            shared.clone(),
            ready_tx.clone(),
            stop_watch.clone(),
        )));
    }
    for _ in 0..users.len() {
        ready_rx
            .recv()
            .await
            .context("a notification watcher failed to start")?;
    }

    let t0 = Instant::now();
    let plan = flow::Plan {
        t0,
        end: t0 + options.warmup + options.duration,
        mix: Arc::new(options.mix.clone()),
        users: Arc::new(users),
        clients: Arc::new(clients),
        read_sample: options.read_sample,
    };
    let progress = tokio::spawn(progress(
        shared.clone(),
        t0,
        options.warmup + options.duration,
        !options.quiet,
    ));
    match options.rate {
        None => {
            let workers: Vec<_> = (0..concurrency)
                .map(|worker| tokio::spawn(flow::closed_loop(plan.clone(), shared.clone(), worker)))
                .collect();
            for worker in workers {
                worker.await?;
            }
        }
        Some(rate) => {
            flow::open_loop(plan.clone(), shared.clone(), rate, options.max_in_flight).await;
        }
    }
    progress.abort();
    let drain_until = Instant::now() + options.drain;
    while shared.missing_notifications() > 0 && Instant::now() < drain_until {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    stop_watch.cancel();
    for watcher in watchers {
        if let Ok(Err(error)) = watcher.await {
            eout!("shopctl load: a notification watcher stopped early: {error:#}");
        }
    }
    let settings = report::Settings {
        mode: match options.rate {
            Some(rate) => format!("open loop, {rate} commands/s"),
            None => format!("closed loop, {concurrency} workers"),
        },
        concurrency: options.rate.is_none().then_some(concurrency),
        rate: options.rate,
        warmup: options.warmup,
        duration: options.duration,
        mix: options.mix.to_string(),
        users: user_count,
    };
    let report = report::build(&shared, &settings, t0);
    if let Some(dir) = &options.report_dir {
        report::write(&report, dir)?;
    }
    if options.json {
        out!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        out!("{}", report::markdown(&report));
    }
    Ok(())
}

/// The live line: elapsed, rate over the last second, errors.
async fn progress(shared: Arc<Shared>, t0: Instant, total: Duration, enabled: bool) {
    use std::io::{IsTerminal as _, Write as _};
    let enabled = enabled && std::io::stderr().is_terminal();
    let mut last = 0;
    loop {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let ok = shared.ok.load(Ordering::Relaxed);
        let errors = shared.errors.load(Ordering::Relaxed);
        if enabled {
            let elapsed = t0.elapsed().min(total);
            let _ = write!(
                std::io::stderr(),
                "\r[{:>4.0}s/{:.0}s] {:>6} commands/s  {ok} ok  {errors} errors   ",
                elapsed.as_secs_f64(),
                total.as_secs_f64(),
                ok - last
            );
        }
        last = ok;
    }
}
