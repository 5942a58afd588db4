//! The stack a chaos scenario runs against: a private nats-server (or a
//! cluster of them) and the three services (one process each, or several
//! replicas) as processes this tool owns (so it can kill, stop and restart
//! each one), on a Postgres cluster shared by the run, with a fault proxy
//! on every link a scenario may cut or slow.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::Context as _;

use crate::infra::{self, Managed, NatsNode};
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

/// How many of each process a scenario runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Topology {
    /// Processes of each service.
    pub(crate) replicas: usize,
    /// nats-server nodes: 1 (a lone server, behind fault proxies) or a
    /// cluster (R3 streams, services connected to every node directly).
    pub(crate) nats_nodes: usize,
}

impl Topology {
    pub(crate) const SINGLE: Self = Self {
        replicas: 1,
        nats_nodes: 1,
    };
    /// What `shopctl up --replicas 2 --nats-cluster 3` runs.
    pub(crate) const SCALED: Self = Self {
        replicas: 2,
        nats_nodes: 3,
    };
}

/// One service process and how to start it again.
#[derive(Debug)]
struct Slot {
    name: String,
    env: Vec<(&'static str, String)>,
    grpc: String,
    admin: String,
    log: PathBuf,
    process: Option<Managed>,
    /// Its own link to Postgres (order- and notification-service).
    postgres_link: Option<TcpProxy>,
}

/// The stack of one scenario.
#[derive(Debug)]
pub(crate) struct ChaosStack {
    pub(crate) dir: PathBuf,
    nats_nodes: Vec<NatsNode>,
    nats: Vec<Option<Managed>>,
    /// Every node, directly (for the oracle and injected messages).
    pub(crate) nats_url: String,
    pub(crate) users_db: String,
    pub(crate) orders_db: String,
    pub(crate) notifications_db: String,
    /// `slots[service][replica]`.
    slots: [Vec<Slot>; 3],
    /// Only before a lone nats-server.
    nats_links: Vec<TcpProxy>,
    /// Only with one user-service: several are reached directly.
    user_link: Option<TcpProxy>,
}

/// Settings a scenario adds to a service's environment.
pub(crate) type Tuning = Vec<(Service, &'static str, String)>;

/// `http://127.0.0.1:{port}` for each port, comma-separated.
fn http_list(ports: &[u16]) -> String {
    ports
        .iter()
        .map(|p| format!("http://127.0.0.1:{p}"))
        .collect::<Vec<_>>()
        .join(",")
}

impl ChaosStack {
    /// Creates the scenario's databases on `db` and starts NATS and the
    /// services, each service healthy before this returns.
    pub(crate) async fn start(
        dir: &Path,
        db: &Database,
        prefix: &str,
        tuning: &Tuning,
        topology: Topology,
    ) -> anyhow::Result<Self> {
        std::fs::create_dir_all(dir)?;
        let replicas = topology.replicas.max(1);
        let nats_nodes = NatsNode::plan(topology.nats_nodes.max(1))?;
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
        let nats_url = infra::nats_url(&nats_nodes);
        let mut nats_links = Vec::new();
        if let [lone] = nats_nodes.as_slice() {
            let addr = SocketAddr::from(([127, 0, 0, 1], lone.port));
            nats_links.push(TcpProxy::start(addr).await?);
            nats_links.push(TcpProxy::start(addr).await?);
        }
        // order- and notification-service reach NATS through their proxy
        // before a lone server, every node directly in a cluster.
        let nats_for = |i: usize| {
            nats_links
                .get(i)
                .map_or_else(|| nats_url.clone(), |p| format!("nats://{}", p.addr()))
        };
        // One link to Postgres per order- and notification-service process.
        let mut postgres_links = [Vec::new(), Vec::new(), Vec::new()];
        for links in &mut postgres_links[1..] {
            for _ in 0..replicas {
                links.push(Some(TcpProxy::start(db.addr()).await?));
            }
        }
        postgres_links[0].resize_with(replicas, || None);
        // ports[service][replica] = (grpc, admin)
        let mut ports = Vec::new();
        for _ in Service::ALL {
            let mut of_service = Vec::new();
            for _ in 0..replicas {
                of_service.push((infra::free_port()?, infra::free_port()?));
            }
            ports.push(of_service);
        }
        let user_grpc: Vec<u16> = ports[0].iter().map(|(g, _)| *g).collect();
        let user_link = if replicas == 1 {
            Some(TcpProxy::start(SocketAddr::from(([127, 0, 0, 1], user_grpc[0]))).await?)
        } else {
            None
        };
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
        let mut base = [
            vec![
                ("APP_NATS_URL", nats_url.clone()),
                ("APP_AUTH__SIGNING_KEY", key),
            ],
            vec![
                ("APP_NATS_URL", nats_for(0)),
                (
                    "APP_USER_SERVICE__URL",
                    user_link
                        .as_ref()
                        .map_or_else(|| http_list(&user_grpc), |l| format!("http://{}", l.addr())),
                ),
            ],
            vec![
                ("APP_NATS_URL", nats_for(1)),
                ("APP_USER_SERVICE__URL", http_list(&user_grpc)),
                ("APP_WEBHOOK_ALLOWED_NETWORKS", "127.0.0.0/8".to_owned()),
            ],
        ];
        if nats_nodes.len() > 1 {
            for env in &mut base {
                env.push(("APP_STREAMS__REPLICAS", nats_nodes.len().min(3).to_string()));
            }
        }
        for (service, key, value) in tuning {
            base[service.index()].push((key, value.clone()));
        }
        let slots = Service::ALL.map(|service| {
            let links = std::mem::take(&mut postgres_links[service.index()]);
            ports[service.index()]
                .iter()
                .zip(links)
                .enumerate()
                .map(|(r, ((grpc, admin), postgres_link))| {
                    let name = if replicas == 1 {
                        service.name().to_owned()
                    } else {
                        format!("{}-{}", service.name(), r + 1)
                    };
                    let database = &urls[service.index()];
                    let mut env = vec![
                        ("APP_GRPC_ADDR", format!("127.0.0.1:{grpc}")),
                        ("APP_ADMIN_ADDR", format!("127.0.0.1:{admin}")),
                        (
                            "APP_DATABASE_URL",
                            postgres_link
                                .as_ref()
                                .map_or_else(|| database.clone(), |l| via(l, database)),
                        ),
                        ("RUST_LOG", "warn".to_owned()),
                    ];
                    env.extend(base[service.index()].iter().cloned());
                    Slot {
                        log: dir.join(format!("{name}.log")),
                        name,
                        env,
                        grpc: format!("http://127.0.0.1:{grpc}"),
                        admin: format!("http://127.0.0.1:{admin}"),
                        process: None,
                        postgres_link,
                    }
                })
                .collect()
        });
        // Everything that can fail without leaving a process behind is
        // done; from here on a failure stops what was started.
        let mut started = Vec::new();
        let nats = infra::start_nats_cluster(dir, &nats_nodes, &mut started).await;
        let mut stack = Self {
            dir: dir.to_owned(),
            nats: started.into_iter().map(Some).collect(),
            nats_nodes,
            nats_url,
            users_db: urls[0].clone(),
            orders_db: urls[1].clone(),
            notifications_db: urls[2].clone(),
            slots,
            nats_links,
            user_link,
        };
        if let Err(error) = nats {
            stack.stop().await;
            return Err(error);
        }
        for service in Service::ALL {
            if let Err(error) = stack.start_service(service).await {
                stack.stop().await;
                return Err(error);
            }
        }
        Ok(stack)
    }

    /// Processes of each service.
    pub(crate) fn replicas(&self) -> usize {
        self.slots[0].len()
    }

    /// Every replica's gRPC URL, comma-separated (clients balance over them).
    pub(crate) fn grpc(&self, service: Service) -> String {
        self.slots[service.index()]
            .iter()
            .map(|s| s.grpc.as_str())
            .collect::<Vec<_>>()
            .join(",")
    }

    /// `order-service`, or `order-service-2` among replicas.
    pub(crate) fn name(&self, service: Service, replica: usize) -> &str {
        &self.slots[service.index()][replica].name
    }

    /// Starts every replica of the service (again), each healthy before the next.
    pub(crate) async fn start_service(&mut self, service: Service) -> anyhow::Result<()> {
        self.start_service_with(service, &[]).await
    }

    /// Starts every replica (again) with `extra` settings on top of its own.
    pub(crate) async fn start_service_with(
        &mut self,
        service: Service,
        extra: &[(&'static str, String)],
    ) -> anyhow::Result<()> {
        for replica in 0..self.replicas() {
            self.start_replica_with(service, replica, extra).await?;
        }
        Ok(())
    }

    /// Starts one replica (again) and waits until it is healthy.
    pub(crate) async fn start_replica_with(
        &mut self,
        service: Service,
        replica: usize,
        extra: &[(&'static str, String)],
    ) -> anyhow::Result<()> {
        let slot = &mut self.slots[service.index()][replica];
        let env: Vec<(&str, String)> = slot
            .env
            .iter()
            .chain(extra)
            .map(|(k, v)| (*k, v.clone()))
            .collect();
        let process = crate::stack::spawn_service(service.name(), &env, Some(&slot.log))?;
        let mut processes = vec![process];
        let healthy = crate::stack::wait_healthy(&slot.name, &slot.grpc, &mut processes).await;
        slot.process = processes.pop();
        healthy.with_context(|| format!("see {}", slot.log.display()))
    }

    /// Sends `signal` to every replica of the service and waits until each has exited.
    pub(crate) async fn signal_service(&mut self, service: Service, signal: &str) {
        for replica in 0..self.replicas() {
            self.signal_replica(service, replica, signal).await;
        }
    }

    /// Sends `signal` to one replica and waits until it has exited.
    pub(crate) async fn signal_replica(&mut self, service: Service, replica: usize, signal: &str) {
        if let Some(mut process) = self.slots[service.index()][replica].process.take()
            && !process
                .signal_and_wait(signal, Duration::from_secs(20))
                .await
        {
            process.stop(Duration::from_secs(1)).await;
        }
    }

    /// Every sample one replica's `/metrics` serves; `None` when it does not answer.
    pub(crate) async fn samples(
        &self,
        service: Service,
        replica: usize,
    ) -> Option<Vec<crate::status::Sample>> {
        let url = format!("{}/metrics", self.slots[service.index()][replica].admin);
        let text = reqwest::get(&url).await.ok()?.text().await.ok()?;
        Some(crate::status::parse_metrics(&text))
    }

    /// The sum of one replica's metric `name` over the series whose label
    /// `label` has `value` (any series when `label` is empty); `None` when
    /// the replica does not answer or has no such series.
    pub(crate) async fn replica_metric(
        &self,
        service: Service,
        replica: usize,
        name: &str,
        (label, value): (&str, &str),
    ) -> Option<f64> {
        let samples: Vec<f64> = self
            .samples(service, replica)
            .await?
            .iter()
            .filter(|s| s.name == name)
            .filter(|s| label.is_empty() || s.labels.get(label).map(String::as_str) == Some(value))
            .map(|s| s.value)
            .collect();
        (!samples.is_empty()).then(|| samples.iter().sum())
    }

    /// [`Self::replica_metric`] summed over the replicas that answer;
    /// `None` when none does (so an unreachable service never reads as 0).
    pub(crate) async fn metric(
        &self,
        service: Service,
        name: &str,
        label: (&str, &str),
    ) -> Option<f64> {
        let mut total = None;
        for replica in 0..self.replicas() {
            if let Some(v) = self.replica_metric(service, replica, name, label).await {
                total = Some(total.unwrap_or(0.0) + v);
            }
        }
        total
    }

    /// The followers (`outbox:…`, `projection:…`) the replica leads now.
    pub(crate) async fn leads(&self, service: Service, replica: usize) -> Vec<String> {
        self.samples(service, replica)
            .await
            .unwrap_or_default()
            .into_iter()
            .filter(|s| s.name == "shop_follower_leader" && s.value == 1.0)
            .filter_map(|s| s.labels.get("name").cloned())
            .collect()
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

    /// nats-server nodes.
    pub(crate) fn nats_nodes(&self) -> usize {
        self.nats_nodes.len()
    }

    /// `nats-server`, or `nats-N` in a cluster.
    pub(crate) fn nats_name(&self, node: usize) -> String {
        self.nats_nodes[node].name()
    }

    /// The node that leads `stream` now (as JetStream reports it).
    pub(crate) async fn stream_leader(&self, stream: &str) -> Option<usize> {
        let client = crate::admin::connect_nats(&self.nats_url).await.ok()?;
        let reply = client
            .request(format!("$JS.API.STREAM.INFO.{stream}"), "".into())
            .await
            .ok()?;
        let info: serde_json::Value = serde_json::from_slice(&reply.payload).ok()?;
        let leader = info["cluster"]["leader"].as_str()?;
        self.nats_nodes
            .iter()
            .position(|n| n.server_name() == leader)
    }

    /// kill -9 of every nats-server node.
    pub(crate) async fn kill_nats(&mut self) {
        for node in 0..self.nats_nodes.len() {
            self.kill_nats_node(node).await;
        }
    }

    /// kill -9 of one node.
    pub(crate) async fn kill_nats_node(&mut self, node: usize) {
        if let Some(mut nats) = self.nats[node].take() {
            nats.signal_and_wait("KILL", Duration::from_secs(10)).await;
        }
    }

    /// Every node that is down, again, on its ports and with its store.
    pub(crate) async fn restart_nats(&mut self) -> anyhow::Result<()> {
        for node in 0..self.nats_nodes.len() {
            if self.nats[node].is_none() {
                self.nats[node] =
                    Some(infra::start_nats_node(&self.dir, &self.nats_nodes[node]).await?);
            }
        }
        Ok(())
    }

    /// Cuts, slows or heals a link; an error for a link the topology does
    /// not proxy (NATS in a cluster, user-service among replicas), so a
    /// scenario never "cuts" nothing and passes.
    pub(crate) fn link(&self, peer: Peer, link: Link) -> anyhow::Result<()> {
        let proxies: Vec<&TcpProxy> = match peer {
            Peer::Nats => self.nats_links.iter().collect(),
            Peer::Postgres => self
                .slots
                .iter()
                .flatten()
                .filter_map(|s| s.postgres_link.as_ref())
                .collect(),
            Peer::UserService => self.user_link.iter().collect(),
        };
        anyhow::ensure!(
            !proxies.is_empty(),
            "this stack has no fault proxy on the {peer:?} link"
        );
        proxies.iter().for_each(|p| p.set(link));
        Ok(())
    }

    /// Cuts, slows or heals one replica's link to Postgres.
    pub(crate) fn postgres_link(&self, service: Service, replica: usize, link: Link) {
        if let Some(proxy) = &self.slots[service.index()][replica].postgres_link {
            proxy.set(link);
        }
    }

    /// Stops everything: services first, then NATS.
    pub(crate) async fn stop(mut self) {
        for slots in self.slots.iter_mut().rev() {
            for slot in slots.iter_mut() {
                if let Some(process) = slot.process.take() {
                    process.stop(Duration::from_secs(15)).await;
                }
            }
        }
        for nats in self.nats.iter_mut().filter_map(Option::take) {
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
