//! The stack a chaos scenario runs against: a private nats-server and the
//! three services as processes this tool owns (so it can kill, stop and
//! restart each one), on a Postgres cluster shared by the run, with a fault
//! proxy on every link a scenario may cut or slow.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::Context as _;

use crate::infra::{self, Managed};
use testkit::{Link, TcpProxy};

/// One of the three services.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Service {
    User,
    Order,
    Notification,
}

impl Service {
    pub(crate) const ALL: [Self; 3] = [Self::User, Self::Order, Self::Notification];

    pub(crate) fn name(self) -> &'static str {
        match self {
            Self::User => "user-service",
            Self::Order => "order-service",
            Self::Notification => "notification-service",
        }
    }

    fn index(self) -> usize {
        match self {
            Self::User => 0,
            Self::Order => 1,
            Self::Notification => 2,
        }
    }
}

/// A link a scenario can cut or slow.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Peer {
    /// order-service and notification-service to NATS.
    Nats,
    /// order-service and notification-service to Postgres.
    Postgres,
    /// order-service to user-service.
    UserService,
}

/// The shared Postgres of a chaos run.
#[derive(Debug)]
pub(crate) struct Database {
    dir: PathBuf,
    port: u16,
    pub(crate) admin_url: String,
    server: Option<Managed>,
}

impl Database {
    pub(crate) async fn start(dir: &Path) -> anyhow::Result<Self> {
        let port = infra::free_port()?;
        let (server, admin_url) = infra::start_postgres_at(dir, port).await?;
        Ok(Self {
            dir: dir.to_owned(),
            port,
            admin_url,
            server: Some(server),
        })
    }

    fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    /// `pg_ctl stop -m immediate`: the postmaster gets SIGQUIT and every
    /// backend dies without a checkpoint, as in a crash.
    pub(crate) async fn crash(&mut self) {
        if let Some(mut server) = self.server.take()
            && !server
                .signal_and_wait("QUIT", Duration::from_secs(10))
                .await
        {
            server.stop(Duration::from_secs(1)).await;
        }
    }

    /// Starts it again on its port (crash recovery runs first).
    pub(crate) async fn restart(&mut self) -> anyhow::Result<()> {
        let (server, _) = infra::start_postgres_at(&self.dir, self.port).await?;
        self.server = Some(server);
        Ok(())
    }

    pub(crate) async fn stop(mut self) {
        if let Some(server) = self.server.take() {
            server.stop(Duration::from_secs(30)).await;
        }
    }
}

/// One service process and how to start it again.
#[derive(Debug)]
struct Slot {
    env: Vec<(&'static str, String)>,
    grpc: String,
    admin: String,
    log: PathBuf,
    process: Option<Managed>,
}

/// The stack of one scenario.
#[derive(Debug)]
pub(crate) struct ChaosStack {
    pub(crate) dir: PathBuf,
    nats_port: u16,
    nats: Option<Managed>,
    pub(crate) nats_url: String,
    pub(crate) users_db: String,
    pub(crate) orders_db: String,
    pub(crate) notifications_db: String,
    slots: Vec<Slot>,
    nats_links: [TcpProxy; 2],
    postgres_links: [TcpProxy; 2],
    user_link: TcpProxy,
}

/// Settings a scenario adds to a service's environment.
pub(crate) type Tuning = Vec<(Service, &'static str, String)>;

impl ChaosStack {
    /// Creates the scenario's databases on `db` and starts NATS and the
    /// services, each service healthy before this returns.
    pub(crate) async fn start(
        dir: &Path,
        db: &Database,
        prefix: &str,
        tuning: &Tuning,
    ) -> anyhow::Result<Self> {
        std::fs::create_dir_all(dir)?;
        let nats_port = infra::free_port()?;
        let names = [
            format!("{prefix}_users"),
            format!("{prefix}_orders"),
            format!("{prefix}_notifications"),
        ];
        for name in &names {
            drop_database(&db.admin_url, name).await?;
        }
        let urls = infra::ensure_databases(
            &db.admin_url,
            &names.iter().map(String::as_str).collect::<Vec<_>>(),
        )
        .await?;
        let nats_addr = SocketAddr::from(([127, 0, 0, 1], nats_port));
        let nats_links = [
            TcpProxy::start(nats_addr).await?,
            TcpProxy::start(nats_addr).await?,
        ];
        let postgres_links = [
            TcpProxy::start(db.addr()).await?,
            TcpProxy::start(db.addr()).await?,
        ];
        let ports: Vec<u16> = (0..6)
            .map(|_| infra::free_port())
            .collect::<Result<_, _>>()?;
        let user_link = TcpProxy::start(SocketAddr::from(([127, 0, 0, 1], ports[0]))).await?;
        let via = |proxy: &TcpProxy, url: &str| {
            // Same database name and user, through the proxy's port.
            let (_, rest) = url.split_once("@127.0.0.1:").unwrap_or(("", url));
            let database = rest.split_once('/').map_or("", |(_, d)| d);
            format!(
                "postgres://postgres@127.0.0.1:{}/{database}",
                proxy.addr().port()
            )
        };
        let key = crate::stack::signing_key(&dir.join("signing.key"))?;
        let nats_url = format!("nats://127.0.0.1:{nats_port}");
        let common = |grpc: u16, admin: u16, db: String, nats: String| {
            vec![
                ("APP_GRPC_ADDR", format!("127.0.0.1:{grpc}")),
                ("APP_ADMIN_ADDR", format!("127.0.0.1:{admin}")),
                ("APP_DATABASE_URL", db),
                ("APP_NATS_URL", nats),
                ("RUST_LOG", "warn".to_owned()),
            ]
        };
        let mut envs = [
            common(ports[0], ports[3], urls[0].clone(), nats_url.clone()),
            common(
                ports[1],
                ports[4],
                via(&postgres_links[0], &urls[1]),
                format!("nats://{}", nats_links[0].addr()),
            ),
            common(
                ports[2],
                ports[5],
                via(&postgres_links[1], &urls[2]),
                format!("nats://{}", nats_links[1].addr()),
            ),
        ];
        envs[0].push(("APP_AUTH__SIGNING_KEY", key));
        envs[1].push((
            "APP_USER_SERVICE__URL",
            format!("http://{}", user_link.addr()),
        ));
        envs[2].push((
            "APP_USER_SERVICE__URL",
            format!("http://127.0.0.1:{}", ports[0]),
        ));
        envs[2].push(("APP_WEBHOOK_ALLOWED_NETWORKS", "127.0.0.0/8".to_owned()));
        for (service, key, value) in tuning {
            envs[service.index()].push((key, value.clone()));
        }
        let mut slots = Vec::new();
        for (i, (service, env)) in Service::ALL.into_iter().zip(envs).enumerate() {
            slots.push(Slot {
                env,
                grpc: format!("http://127.0.0.1:{}", ports[i]),
                admin: format!("http://127.0.0.1:{}", ports[i + 3]),
                log: dir.join(format!("{}.log", service.name())),
                process: None,
            });
        }
        // Everything that can fail without leaving a process behind is
        // done; from here on a failure stops what was started.
        let (nats, _) = infra::start_nats_at(dir, nats_port).await?;
        let mut stack = Self {
            dir: dir.to_owned(),
            nats_port,
            nats: Some(nats),
            nats_url,
            users_db: urls[0].clone(),
            orders_db: urls[1].clone(),
            notifications_db: urls[2].clone(),
            slots,
            nats_links,
            postgres_links,
            user_link,
        };
        for service in Service::ALL {
            if let Err(error) = stack.start_service(service).await {
                stack.stop().await;
                return Err(error);
            }
        }
        Ok(stack)
    }

    pub(crate) fn grpc(&self, service: Service) -> &str {
        &self.slots[service.index()].grpc
    }

    pub(crate) fn admin(&self, service: Service) -> &str {
        &self.slots[service.index()].admin
    }

    /// Starts the service (again) and waits until it is healthy.
    pub(crate) async fn start_service(&mut self, service: Service) -> anyhow::Result<()> {
        self.start_service_with(service, &[]).await
    }

    /// Starts the service (again) with `extra` settings on top of its own.
    pub(crate) async fn start_service_with(
        &mut self,
        service: Service,
        extra: &[(&'static str, String)],
    ) -> anyhow::Result<()> {
        let slot = &mut self.slots[service.index()];
        let env: Vec<(&str, String)> = slot
            .env
            .iter()
            .chain(extra)
            .map(|(k, v)| (*k, v.clone()))
            .collect();
        let process = crate::stack::spawn_service(service.name(), &env, Some(&slot.log))?;
        let mut processes = vec![process];
        let healthy = crate::stack::wait_healthy(service.name(), &slot.grpc, &mut processes).await;
        slot.process = processes.pop();
        healthy.with_context(|| format!("see {}", slot.log.display()))
    }

    /// Sends `signal` to the service and waits until it has exited.
    pub(crate) async fn signal_service(&mut self, service: Service, signal: &str) {
        if let Some(mut process) = self.slots[service.index()].process.take()
            && !process
                .signal_and_wait(signal, Duration::from_secs(20))
                .await
        {
            process.stop(Duration::from_secs(1)).await;
        }
    }

    /// The sum of the service's metric `name` over the series whose label
    /// `label` has `value`; `None` when the service does not answer or has
    /// no such series (so an unreachable service never reads as 0).
    pub(crate) async fn metric(
        &self,
        service: Service,
        name: &str,
        (label, value): (&str, &str),
    ) -> Option<f64> {
        let url = format!("{}/metrics", self.admin(service));
        let text = reqwest::get(&url).await.ok()?.text().await.ok()?;
        let samples: Vec<f64> = crate::status::parse_metrics(&text)
            .iter()
            .filter(|s| s.name == name && s.labels.get(label).map(String::as_str) == Some(value))
            .map(|s| s.value)
            .collect();
        (!samples.is_empty()).then(|| samples.iter().fold(0.0, |sum, v| sum + v))
    }

    /// Redelivered events notification-service recognised as done before.
    pub(crate) async fn duplicates_absorbed(&self) -> f64 {
        self.metric(
            Service::Notification,
            "shop_events_consumed_total",
            ("outcome", "duplicate"),
        )
        .await
        .unwrap_or(0.0)
    }

    /// kill -9 of nats-server.
    pub(crate) async fn kill_nats(&mut self) {
        if let Some(mut nats) = self.nats.take() {
            nats.signal_and_wait("KILL", Duration::from_secs(10)).await;
        }
    }

    /// nats-server again, on its port and with its store.
    pub(crate) async fn restart_nats(&mut self) -> anyhow::Result<()> {
        let (nats, _) = infra::start_nats_at(&self.dir, self.nats_port).await?;
        self.nats = Some(nats);
        Ok(())
    }

    /// Cuts, slows or heals a link.
    pub(crate) fn link(&self, peer: Peer, link: Link) {
        match peer {
            Peer::Nats => self.nats_links.iter().for_each(|p| p.set(link)),
            Peer::Postgres => self.postgres_links.iter().for_each(|p| p.set(link)),
            Peer::UserService => self.user_link.set(link),
        }
    }

    /// Stops everything: services first, then NATS.
    pub(crate) async fn stop(mut self) {
        for slot in self.slots.iter_mut().rev() {
            if let Some(process) = slot.process.take() {
                process.stop(Duration::from_secs(15)).await;
            }
        }
        if let Some(nats) = self.nats.take() {
            nats.stop(Duration::from_secs(15)).await;
        }
    }
}

/// Drops `name` if it exists (a rerun of a scenario starts clean).
pub(crate) async fn drop_database(admin_url: &str, name: &str) -> anyhow::Result<()> {
    use sqlx::Connection as _;
    let mut conn = sqlx::PgConnection::connect(admin_url).await?;
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)"
    )))
    .execute(&mut conn)
    .await?;
    Ok(())
}
