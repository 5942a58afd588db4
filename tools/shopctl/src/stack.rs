//! `shopctl up`: the local stack supervisor.

use std::{
    fs,
    io::Write as _,
    path::{Path, PathBuf},
    process::Stdio,
    time::Duration,
};

use anyhow::{Context as _, bail};
use serde::{Deserialize, Serialize};
use tonic_health::pb::{
    HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
};

use crate::infra::{self, Managed};

#[derive(Debug, clap::Args)]
pub(crate) struct UpOptions {
    /// Use this NATS server instead of starting one.
    #[arg(long, env = "SHOP_NATS_URL")]
    pub(crate) nats_url: Option<String>,
    /// Use this Postgres server (any database URL on it; the services' own
    /// databases are created beside it) instead of starting one.
    #[arg(long, env = "SHOP_POSTGRES_URL")]
    pub(crate) postgres_url: Option<String>,
    /// Where the private servers keep their data, and the stack file.
    #[arg(long, default_value = ".shop")]
    pub(crate) data_dir: PathBuf,
}

/// One process of the stack, as recorded in the stack file.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct Process {
    pub(crate) name: String,
    pub(crate) pid: u32,
    /// Start time in clock ticks since boot (`/proc/<pid>/stat`), so that a
    /// recycled pid is never mistaken for ours.
    pub(crate) start_ticks: u64,
}

/// What [`up`] does after its `when_ready` task: keep the stack running
/// until stopped, or stop it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Then {
    Serve,
    Stop,
}

/// Endpoints of a running stack, written to `<data-dir>/stack.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct StackFile {
    pub(crate) user_service: String,
    pub(crate) order_service: String,
    pub(crate) notification_service: String,
    /// Admin endpoints (`/metrics`, `/livez`, `/readyz`) of user, order and
    /// notification service.
    pub(crate) admin: [String; 3],
    pub(crate) nats_url: String,
    pub(crate) database_url: String,
    pub(crate) users_database_url: String,
    pub(crate) orders_database_url: String,
    #[serde(default)]
    pub(crate) notifications_database_url: String,
    /// The supervisor (`shopctl up`).
    pub(crate) pid: u32,
    /// Every process it started.
    #[serde(default)]
    pub(crate) processes: Vec<Process>,
}

/// Reads a 64-hex-character signing key from `path`, creating it first.
pub(crate) fn signing_key(path: &Path) -> anyhow::Result<String> {
    if let Ok(key) = std::fs::read_to_string(path)
        && key.trim().len() >= 32
    {
        return Ok(key.trim().to_owned());
    }
    let key = format!(
        "{}{}",
        uuid::Uuid::new_v4().simple(),
        uuid::Uuid::new_v4().simple()
    );
    std::fs::write(path, &key)?;
    std::fs::set_permissions(path, std::os::unix::fs::PermissionsExt::from_mode(0o600))?;
    Ok(key)
}

/// Starts `shopctl serve <service>` with `env`; its output goes to `log`
/// (appended) when given, else to ours.
pub(crate) fn spawn_service(
    service: &'static str,
    env: &[(&str, String)],
    log: Option<&Path>,
) -> anyhow::Result<Managed> {
    let exe = std::env::current_exe().context("locating shopctl")?;
    let mut command = infra::supervised(&exe, "TERM", false);
    command.args(["serve", service]).stdin(Stdio::null());
    if let Some(log) = log {
        command
            .stdout(infra::log_file(log)?)
            .stderr(infra::log_file(log)?);
    }
    for (key, value) in env {
        command.env(key, value);
    }
    let child = command
        .spawn()
        .with_context(|| format!("starting {service}"))?;
    Ok(Managed {
        name: service,
        child,
        stop_signal: "TERM",
        pid_file: None,
    })
}

pub(crate) async fn wait_healthy(
    name: &str,
    url: &str,
    children: &mut [Managed],
) -> anyhow::Result<()> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(90);
    loop {
        for child in children.iter_mut() {
            if let Ok(Some(status)) = child.child.try_wait() {
                bail!("{} exited during start-up ({status})", child.name);
            }
        }
        if let Ok(channel) = tonic::transport::Endpoint::from_shared(url.to_owned())?
            .connect_timeout(Duration::from_millis(500))
            .connect()
            .await
            && let Ok(response) = HealthClient::new(channel)
                .check(HealthCheckRequest {
                    service: String::new(),
                })
                .await
            && response.into_inner().status() == ServingStatus::Serving
        {
            return Ok(());
        }
        if tokio::time::Instant::now() > deadline {
            bail!("{name} did not become healthy at {url}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Starts everything, prints endpoints, runs `when_ready` (the demo, say), and
/// unless it asks to stop, serves until Ctrl-C, SIGTERM or a dying service;
/// then stops it all (services first, then NATS and Postgres).
pub(crate) async fn up<F, Fut>(options: UpOptions, when_ready: F) -> anyhow::Result<()>
where
    F: FnOnce(StackFile) -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<Then>>,
{
    fs::create_dir_all(&options.data_dir)
        .with_context(|| format!("creating the data dir {}", options.data_dir.display()))?;
    let data_dir = fs::canonicalize(&options.data_dir)?;
    // Nothing in the data dir is touched before this lock is ours.
    let _lock = lock_data_dir(&data_dir)?;
    stop_stale_children(&data_dir).await;
    // Left by a supervisor that was killed: they describe nothing running.
    let _ = fs::remove_file(data_dir.join("stack.json"));
    let _ = fs::remove_file(data_dir.join(PROMETHEUS_TARGETS));
    // A second Ctrl-C (or SIGTERM/SIGHUP) cuts the graceful stop short; the
    // children then get their parent-death signal.
    tokio::spawn(async {
        platform::shutdown::wait_for_signal().await;
        platform::shutdown::wait_for_signal().await;
        eout!("shopctl: stopping at once");
        std::process::exit(130);
    });
    let mut infrastructure = Vec::new();
    let mut services = Vec::new();
    let result = run(
        &options,
        &data_dir,
        &mut infrastructure,
        &mut services,
        when_ready,
    )
    .await;
    if let Err(error) = &result {
        // Printed here, before the (slow) shutdown, and not again by main.
        eout!("shopctl: {error:#}");
    }
    out!("Stopping…");
    let _ = fs::remove_file(data_dir.join("stack.json"));
    let _ = fs::remove_file(data_dir.join(PROMETHEUS_TARGETS));
    for child in services.into_iter().rev() {
        child.stop(Duration::from_secs(15)).await;
    }
    for child in infrastructure.into_iter().rev() {
        child.stop(Duration::from_secs(30)).await;
    }
    let _ = fs::remove_file(data_dir.join(CHILDREN));
    out!("Stopped.");
    result.map_err(|error| crate::Reported(error).into())
}

/// Prometheus file-based service discovery for the running stack.
pub(crate) const PROMETHEUS_TARGETS: &str = "prometheus-targets.json";
/// The children of the current (or a crashed) supervisor, one per line.
const CHILDREN: &str = "children";

/// An exclusive lock on the data dir for as long as it is held: a second
/// `shopctl up` (or `demo` starting a stack) on the same dir refuses to
/// start instead of sharing the JetStream store and Postgres cluster.
#[derive(Debug)]
struct DataDirLock(#[allow(dead_code)] fs::File);

fn lock_data_dir(data_dir: &Path) -> anyhow::Result<DataDirLock> {
    let path = data_dir.join("lock");
    let mut file = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .with_context(|| format!("opening {}", path.display()))?;
    match file.try_lock() {
        Ok(()) => {}
        Err(fs::TryLockError::WouldBlock) => {
            let holder = fs::read_to_string(&path).unwrap_or_default();
            let holder = holder.trim();
            bail!(
                "another `shopctl up` (pid {}) is running with the data dir {}; \
                 stop it first, or pass another --data-dir",
                if holder.is_empty() { "unknown" } else { holder },
                data_dir.display()
            );
        }
        Err(fs::TryLockError::Error(error)) => {
            return Err(error).with_context(|| format!("locking {}", path.display()));
        }
    }
    file.set_len(0)?;
    write!(file, "{}", std::process::id())?;
    Ok(DataDirLock(file))
}

/// Start time of `pid` in clock ticks since boot, if it is running.
pub(crate) fn start_ticks(pid: u32) -> Option<u64> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may hold spaces; fields resume after ')'.
    let rest = &stat[stat.rfind(')')? + 2..];
    rest.split_whitespace().nth(19)?.parse().ok()
}

fn record_child(data_dir: &Path, child: &Managed) {
    let pid = child.child.id();
    let line = format!(
        "{} {pid} {}\n",
        child.name,
        start_ticks(pid).unwrap_or_default()
    );
    let appended = fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(data_dir.join(CHILDREN))
        .and_then(|mut f| f.write_all(line.as_bytes()));
    if let Err(error) = appended {
        tracing::warn!(%error, "cannot record child process");
    }
}

fn processes(children: &[&Managed]) -> Vec<Process> {
    children
        .iter()
        .map(|c| Process {
            name: c.name.to_owned(),
            pid: c.child.id(),
            start_ticks: start_ticks(c.child.id()).unwrap_or_default(),
        })
        .collect()
}

/// Stops processes a previous supervisor of this data dir started and left
/// behind (it was killed before its children noticed). Only processes whose
/// pid *and* start time match the record are signalled.
async fn stop_stale_children(data_dir: &Path) {
    let Ok(text) = fs::read_to_string(data_dir.join(CHILDREN)) else {
        return;
    };
    for line in text.lines() {
        let mut fields = line.split_whitespace();
        let (Some(name), Some(Ok(pid)), Some(Ok(ticks))) = (
            fields.next(),
            fields.next().map(str::parse::<u32>),
            fields.next().map(str::parse::<u64>),
        ) else {
            continue;
        };
        if start_ticks(pid) != Some(ticks) {
            continue;
        }
        tracing::warn!(
            process = name,
            pid,
            "stopping a process left by an earlier shopctl up"
        );
        let signal = if name == "postgres" { "INT" } else { "TERM" };
        let _ = std::process::Command::new("kill")
            .args(["-s", signal, &pid.to_string()])
            .status();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        while start_ticks(pid) == Some(ticks) && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        if start_ticks(pid) == Some(ticks) {
            let _ = std::process::Command::new("kill")
                .args(["-s", "KILL", &pid.to_string()])
                .status();
        }
    }
    let _ = fs::remove_file(data_dir.join(CHILDREN));
}

async fn run<F, Fut>(
    options: &UpOptions,
    data_dir: &Path,
    infrastructure: &mut Vec<Managed>,
    services: &mut Vec<Managed>,
    when_ready: F,
) -> anyhow::Result<()>
where
    F: FnOnce(StackFile) -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<Then>>,
{
    let stop = platform::shutdown::on_signal();
    infra::install_missing(options.nats_url.is_none(), options.postgres_url.is_none())?;
    let nats_url = match &options.nats_url {
        Some(url) => url.clone(),
        None => {
            let (child, url) = infra::start_nats(data_dir).await?;
            record_child(data_dir, &child);
            infrastructure.push(child);
            url
        }
    };
    let admin_url = match &options.postgres_url {
        Some(url) => url.clone(),
        None => {
            let (child, url) = infra::start_postgres(data_dir).await?;
            record_child(data_dir, &child);
            infrastructure.push(child);
            url
        }
    };
    let urls = infra::ensure_databases(
        &admin_url,
        &["shop_users", "shop_orders", "shop_notifications"],
    )
    .await?;
    let [users_db, orders_db, notifications_db] = urls.as_slice() else {
        bail!("expected three database URLs");
    };
    let key = signing_key(&data_dir.join("signing.key"))?;
    // gRPC and admin port of each service.
    let mut ports = Vec::with_capacity(6);
    for _ in 0..6 {
        ports.push(infra::free_port()?);
    }
    let addr = |port: u16| format!("127.0.0.1:{port}");
    let url = |port: u16| format!("http://127.0.0.1:{port}");
    let common = |db: &str, grpc: u16, admin: u16| {
        vec![
            ("APP_GRPC_ADDR", addr(grpc)),
            ("APP_ADMIN_ADDR", addr(admin)),
            ("APP_DATABASE_URL", db.to_owned()),
            ("APP_NATS_URL", nats_url.clone()),
        ]
    };
    let mut user_env = common(users_db, ports[0], ports[3]);
    user_env.push(("APP_AUTH__SIGNING_KEY", key));
    let mut order_env = common(orders_db, ports[1], ports[4]);
    order_env.push(("APP_USER_SERVICE__URL", url(ports[0])));
    let mut notification_env = common(notifications_db, ports[2], ports[5]);
    notification_env.push(("APP_USER_SERVICE__URL", url(ports[0])));
    // A local stack posts to local receivers; deployments allow public only.
    notification_env.push(("APP_WEBHOOK_ALLOWED_NETWORKS", "127.0.0.0/8,::1".to_owned()));
    for (name, env) in [
        ("user-service", &user_env),
        ("order-service", &order_env),
        ("notification-service", &notification_env),
    ] {
        let child = spawn_service(name, env, None)?;
        record_child(data_dir, &child);
        services.push(child);
    }
    for (name, port) in [
        ("user-service", ports[0]),
        ("order-service", ports[1]),
        ("notification-service", ports[2]),
    ] {
        let endpoint = url(port);
        tokio::select! {
            () = stop.cancelled() => return Ok(()),
            healthy = wait_healthy(name, &endpoint, services) => healthy?,
        }
    }
    let stack = StackFile {
        user_service: url(ports[0]),
        order_service: url(ports[1]),
        notification_service: url(ports[2]),
        admin: [url(ports[3]), url(ports[4]), url(ports[5])],
        nats_url: nats_url.clone(),
        database_url: admin_url.clone(),
        users_database_url: users_db.clone(),
        orders_database_url: orders_db.clone(),
        notifications_database_url: notifications_db.clone(),
        pid: std::process::id(),
        processes: processes(
            &infrastructure
                .iter()
                .chain(services.iter())
                .collect::<Vec<_>>(),
        ),
    };
    write_prometheus_targets(data_dir, &stack)?;
    // Written whole, then renamed: a reader never sees half a file.
    let tmp = data_dir.join("stack.json.tmp");
    fs::write(&tmp, serde_json::to_string_pretty(&stack)?)?;
    fs::rename(&tmp, data_dir.join("stack.json"))?;
    out!();
    out!("The shop is up:");
    out!(
        "  user-service          {}  (gRPC: shop.user.v1.UserService)",
        stack.user_service
    );
    out!(
        "  order-service         {}  (gRPC: shop.order.v1.OrderService)",
        stack.order_service
    );
    out!(
        "  notification-service  {}  (gRPC: shop.notification.v1.NotificationService)",
        stack.notification_service
    );
    out!(
        "  admin (metrics, livez, readyz)  users {}  orders {}  notifications {}",
        stack.admin[0],
        stack.admin[1],
        stack.admin[2]
    );
    out!("  nats                  {}", stack.nats_url);
    out!(
        "  postgres              {}",
        platform::config::DatabaseUrl::new(stack.database_url.as_str()).redacted()
    );
    out!("  data                  {}", data_dir.display());
    out!(
        "  prometheus targets    {}",
        data_dir.join(PROMETHEUS_TARGETS).display()
    );
    out!("All services answer grpc.health.v1 and reflection. Ctrl-C stops everything.");
    out!();

    if let Then::Stop = when_ready(stack.clone()).await? {
        return Ok(());
    }
    loop {
        tokio::select! {
            () = stop.cancelled() => return Ok(()),
            () = tokio::time::sleep(Duration::from_millis(500)) => {}
        }
        for child in services.iter_mut().chain(infrastructure.iter_mut()) {
            if let Ok(Some(status)) = child.child.try_wait() {
                bail!("{} exited unexpectedly ({status})", child.name);
            }
        }
    }
}

/// `[{"targets": ["127.0.0.1:port"], "labels": {"service": "…"}}, …]`, the
/// shape of Prometheus's `file_sd_configs`.
fn write_prometheus_targets(data_dir: &Path, stack: &StackFile) -> anyhow::Result<()> {
    let names = ["user-service", "order-service", "notification-service"];
    let groups: Vec<_> = names
        .iter()
        .zip(&stack.admin)
        .map(|(name, url)| {
            serde_json::json!({
                "targets": [url.trim_start_matches("http://")],
                "labels": { "service": name },
            })
        })
        .collect();
    let tmp = data_dir.join(format!("{PROMETHEUS_TARGETS}.tmp"));
    fs::write(&tmp, serde_json::to_string_pretty(&groups)?)?;
    fs::rename(&tmp, data_dir.join(PROMETHEUS_TARGETS))?;
    Ok(())
}
