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
    /// Processes of each service (clients balance across them; one replica
    /// at a time runs each relay and projection, the others stand by).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u8).range(1..=8))]
    pub(crate) replicas: u8,
    /// nats-server nodes: 1, or a cluster of 3 or 5 on loopback ports with
    /// every stream replicated 3 times.
    #[arg(long, default_value_t = 1, value_parser = nats_cluster_size)]
    pub(crate) nats_cluster: usize,
}

fn nats_cluster_size(text: &str) -> Result<usize, String> {
    match text.parse() {
        Ok(size @ (1 | 3 | 5)) => Ok(size),
        _ => Err("a NATS cluster has 1, 3 or 5 nodes (a majority must survive a loss)".to_owned()),
    }
}

/// One service process of the stack.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct Instance {
    /// `order-service`, or `order-service-2` among replicas.
    pub(crate) name: String,
    pub(crate) service: String,
    pub(crate) grpc: String,
    /// `/metrics`, `/livez`, `/readyz`.
    pub(crate) admin: String,
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
    /// gRPC endpoints of each service: every replica's, comma-separated.
    pub(crate) user_service: String,
    pub(crate) order_service: String,
    pub(crate) notification_service: String,
    /// Admin endpoints (`/metrics`, `/livez`, `/readyz`) of user, order and
    /// notification service (their first replicas).
    pub(crate) admin: [String; 3],
    /// Every service process.
    #[serde(default)]
    pub(crate) instances: Vec<Instance>,
    /// Every NATS node, comma-separated.
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
        name: service.to_owned(),
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

/// The services, in start order (user-service first: the others ask it).
pub(crate) const SERVICES: [&str; 3] = ["user-service", "order-service", "notification-service"];

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
            name: c.name.clone(),
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
    if options.nats_url.is_some() && options.nats_cluster > 1 {
        bail!("--nats-cluster starts the nodes itself; it cannot be given with --nats-url");
    }
    let nats_url = match &options.nats_url {
        Some(url) => url.clone(),
        None => {
            let nodes = infra::NatsNode::plan(options.nats_cluster)?;
            let mut started = Vec::new();
            let result = infra::start_nats_cluster(data_dir, &nodes, &mut started).await;
            for child in started {
                record_child(data_dir, &child);
                infrastructure.push(child);
            }
            result?;
            infra::nats_url(&nodes)
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
    let replicas = usize::from(options.replicas);
    let mut instances = Vec::new();
    for service in SERVICES {
        for replica in 1..=replicas {
            let name = if replicas == 1 {
                service.to_owned()
            } else {
                format!("{service}-{replica}")
            };
            instances.push(Instance {
                name,
                service: service.to_owned(),
                grpc: format!("http://127.0.0.1:{}", infra::free_port()?),
                admin: format!("http://127.0.0.1:{}", infra::free_port()?),
            });
        }
    }
    let endpoints = |service: &str| {
        instances
            .iter()
            .filter(|i| i.service == service)
            .map(|i| i.grpc.clone())
            .collect::<Vec<_>>()
            .join(",")
    };
    let user_service = endpoints("user-service");
    for instance in &instances {
        let bare = |url: &str| url.trim_start_matches("http://").to_owned();
        let mut env = vec![
            ("APP_GRPC_ADDR", bare(&instance.grpc)),
            ("APP_ADMIN_ADDR", bare(&instance.admin)),
            ("APP_NATS_URL", nats_url.clone()),
        ];
        if options.nats_cluster > 1 {
            env.push(("APP_STREAMS__REPLICAS", "3".to_owned()));
        }
        match instance.service.as_str() {
            "user-service" => {
                env.push(("APP_DATABASE_URL", users_db.clone()));
                env.push(("APP_AUTH__SIGNING_KEY", key.clone()));
            }
            "order-service" => {
                env.push(("APP_DATABASE_URL", orders_db.clone()));
                env.push(("APP_USER_SERVICE__URL", user_service.clone()));
            }
            _ => {
                env.push(("APP_DATABASE_URL", notifications_db.clone()));
                env.push(("APP_USER_SERVICE__URL", user_service.clone()));
                // A local stack posts to local receivers; deployments allow public only.
                env.push(("APP_WEBHOOK_ALLOWED_NETWORKS", "127.0.0.0/8,::1".to_owned()));
            }
        }
        let service = SERVICES
            .into_iter()
            .find(|s| *s == instance.service)
            .unwrap_or("user-service");
        let mut child = spawn_service(service, &env, None)?;
        child.name.clone_from(&instance.name);
        record_child(data_dir, &child);
        services.push(child);
    }
    for instance in &instances {
        tokio::select! {
            () = stop.cancelled() => return Ok(()),
            healthy = wait_healthy(&instance.name, &instance.grpc, services) => healthy?,
        }
    }
    let first_admin = |service: &str| {
        instances
            .iter()
            .find(|i| i.service == service)
            .map(|i| i.admin.clone())
            .unwrap_or_default()
    };
    let stack = StackFile {
        user_service,
        order_service: endpoints("order-service"),
        notification_service: endpoints("notification-service"),
        admin: SERVICES.map(first_admin),
        instances: instances.clone(),
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
    let interfaces = [
        "shop.user.v1.UserService",
        "shop.order.v1.OrderService",
        "shop.notification.v1.NotificationService",
    ];
    for instance in &stack.instances {
        let interface = SERVICES
            .iter()
            .position(|s| *s == instance.service)
            .map_or("", |i| interfaces[i]);
        out!(
            "  {:<23} {}  (gRPC: {interface})  admin {}",
            instance.name,
            instance.grpc,
            instance.admin
        );
    }
    out!("  (admin: /metrics, /livez, /readyz)");
    out!("  nats                    {}", stack.nats_url);
    out!(
        "  postgres                {}",
        platform::config::DatabaseUrl::new(stack.database_url.as_str()).redacted()
    );
    out!("  data                    {}", data_dir.display());
    out!(
        "  prometheus targets      {}",
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
    let groups: Vec<_> = stack
        .instances
        .iter()
        .map(|instance| {
            serde_json::json!({
                "targets": [instance.admin.trim_start_matches("http://")],
                "labels": { "service": instance.service, "instance_name": instance.name },
            })
        })
        .collect();
    let tmp = data_dir.join(format!("{PROMETHEUS_TARGETS}.tmp"));
    fs::write(&tmp, serde_json::to_string_pretty(&groups)?)?;
    fs::rename(&tmp, data_dir.join(PROMETHEUS_TARGETS))?;
    Ok(())
}
