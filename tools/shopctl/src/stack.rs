//! `shopctl up`: the local stack supervisor.

use std::os::unix::process::CommandExt as _;
use std::{
    path::{Path, PathBuf},
    process::{Command, Stdio},
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
    #[arg(long, env = "NATS_URL")]
    pub(crate) nats_url: Option<String>,
    /// Use this Postgres server (any database URL on it; the services' own
    /// databases are created beside it) instead of starting one.
    #[arg(long, env = "DATABASE_URL")]
    pub(crate) database_url: Option<String>,
    /// Where the private servers keep their data, and the stack file.
    #[arg(long, default_value = ".shop")]
    pub(crate) data_dir: PathBuf,
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
    pub(crate) pid: u32,
}

/// Reads a 64-hex-character signing key from `path`, creating it first.
fn signing_key(path: &Path) -> anyhow::Result<String> {
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

fn spawn_service(service: &'static str, env: &[(&str, String)]) -> anyhow::Result<Managed> {
    let exe = std::env::current_exe().context("locating shopctl")?;
    let mut command = Command::new(exe);
    command
        .args(["serve", service])
        .stdin(Stdio::null())
        .process_group(0);
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

async fn wait_healthy(name: &str, url: &str, children: &mut [Managed]) -> anyhow::Result<()> {
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

/// Starts everything, prints endpoints, optionally runs the demo, and stops
/// it all (services first, then NATS and Postgres) on Ctrl-C or SIGTERM or
/// when a service dies.
pub(crate) async fn up(
    options: UpOptions,
    demo: bool,
    exit_after_demo: bool,
) -> anyhow::Result<()> {
    std::fs::create_dir_all(&options.data_dir)?;
    let data_dir = std::fs::canonicalize(&options.data_dir)?;
    let mut infrastructure = Vec::new();
    let mut services = Vec::new();
    let result = run(
        &options,
        &data_dir,
        &mut infrastructure,
        &mut services,
        demo,
        exit_after_demo,
    )
    .await;
    if let Err(error) = &result {
        eprintln!("shopctl: {error:#}");
    }
    println!("Stopping…");
    let _ = std::fs::remove_file(data_dir.join("stack.json"));
    for child in services.into_iter().rev() {
        child.stop(Duration::from_secs(15)).await;
    }
    for child in infrastructure.into_iter().rev() {
        child.stop(Duration::from_secs(30)).await;
    }
    println!("Stopped.");
    result
}

async fn run(
    options: &UpOptions,
    data_dir: &Path,
    infrastructure: &mut Vec<Managed>,
    services: &mut Vec<Managed>,
    demo: bool,
    exit_after_demo: bool,
) -> anyhow::Result<()> {
    let stop = platform::shutdown::on_signal();
    let nats_url = match &options.nats_url {
        Some(url) => url.clone(),
        None => {
            let (child, url) = infra::start_nats(data_dir).await?;
            infrastructure.push(child);
            url
        }
    };
    let admin_url = match &options.database_url {
        Some(url) => url.clone(),
        None => {
            let (child, url) = infra::start_postgres(data_dir).await?;
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
    services.push(spawn_service("user-service", &user_env)?);
    services.push(spawn_service("order-service", &order_env)?);
    services.push(spawn_service("notification-service", &notification_env)?);
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
        pid: std::process::id(),
    };
    std::fs::write(
        data_dir.join("stack.json"),
        serde_json::to_string_pretty(&stack)?,
    )?;
    println!();
    println!("The shop is up:");
    println!(
        "  user-service          {}  (gRPC: shop.user.v1.UserService)",
        stack.user_service
    );
    println!(
        "  order-service         {}  (gRPC: shop.order.v1.OrderService)",
        stack.order_service
    );
    println!(
        "  notification-service  {}  (gRPC: shop.notification.v1.NotificationService)",
        stack.notification_service
    );
    println!(
        "  admin (metrics, livez, readyz)  users {}  orders {}  notifications {}",
        stack.admin[0], stack.admin[1], stack.admin[2]
    );
    println!("  nats                  {}", stack.nats_url);
    println!("  postgres              {}", redact(&stack.database_url));
    println!("  data                  {}", data_dir.display());
    println!("All services answer grpc.health.v1 and reflection. Ctrl-C stops everything.");
    println!();

    if demo {
        crate::demo::run(&stack).await?;
        if exit_after_demo {
            return Ok(());
        }
        println!("\nThe stack keeps running; Ctrl-C stops it.");
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

/// Hides a password in a URL.
fn redact(url: &str) -> String {
    match (url.find("://"), url.find('@')) {
        (Some(scheme), Some(at)) if url[scheme + 3..at].contains(':') => {
            let user_end = url[scheme + 3..at].find(':').map_or(at, |i| scheme + 3 + i);
            format!("{}:***{}", &url[..user_end], &url[at..])
        }
        _ => url.to_owned(),
    }
}
