//! The three services in-process on port 0, on fresh databases and a private
//! nats-server, with typed clients.

use std::{net::SocketAddr, time::Duration};

use contracts::{
    notification::v1::notification_service_client::NotificationServiceClient,
    order::v1::order_service_client::OrderServiceClient,
    user::v1::{self as user_pb, user_service_client::UserServiceClient},
};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;

use crate::{NatsCluster, NatsServer, TestDb};

/// A whole system for one test. Dropping it stops the services and the
/// nats-server.
#[derive(Debug)]
pub struct TestStack {
    /// The nats-server (of a cluster: its first node).
    pub nats: NatsServer,
    /// A cluster's other nodes (none for a lone server).
    pub nats_peers: Vec<NatsServer>,
    pub user_db: TestDb,
    pub order_db: TestDb,
    pub notification_db: TestDb,
    pub user_addr: SocketAddr,
    pub order_addr: SocketAddr,
    pub notification_addr: SocketAddr,
    /// Admin ports (`/metrics`, `/livez`, `/readyz`).
    pub user_admin: SocketAddr,
    pub order_admin: SocketAddr,
    pub notification_admin: SocketAddr,
    shutdown: CancellationToken,
    tasks: Vec<JoinHandle<()>>,
}

/// A fixed, test-only signing key (32 bytes).
pub const TEST_SIGNING_KEY: &str = "test-signing-key-test-signing-key";

fn spawn<F>(name: &'static str, run: F) -> JoinHandle<()>
where
    F: std::future::Future<Output = Result<(), platform::StartError>> + Send + 'static,
{
    tokio::spawn(async move {
        if let Err(error) = run.await {
            tracing::error!(service = name, %error, "service stopped with an error");
        }
    })
}

impl TestStack {
    /// Starts nats-server, creates three databases and starts the services.
    ///
    /// # Errors
    ///
    /// When Postgres or nats-server are not available, or a service fails to start.
    pub async fn start() -> anyhow::Result<Self> {
        Self::start_with(|_| {}).await
    }

    /// Like [`Self::start`], after `configure` adjusted user-service's
    /// authentication settings (token lifetime, throttling, keys).
    ///
    /// # Errors
    ///
    /// As [`Self::start`].
    pub async fn start_with(
        configure: impl FnOnce(&mut user_service::config::AuthSettings),
    ) -> anyhow::Result<Self> {
        Self::start_configured(configure, |_| {}).await
    }

    /// Like [`Self::start_with`], also adjusting notification-service's
    /// settings (channels, SMTP, retries).
    ///
    /// # Errors
    ///
    /// As [`Self::start`].
    pub async fn start_configured(
        configure: impl FnOnce(&mut user_service::config::AuthSettings),
        configure_notifications: impl FnOnce(&mut notification_service::Settings),
    ) -> anyhow::Result<Self> {
        let nats = NatsServer::start().await?;
        Self::start_on(vec![nats], 1, configure, configure_notifications).await
    }

    /// Like [`Self::start`], on a `size`-node NATS cluster with every stream
    /// replicated `size` times; the services are given every node's URL.
    ///
    /// # Errors
    ///
    /// As [`Self::start`], or when the cluster does not form.
    pub async fn start_clustered(size: usize) -> anyhow::Result<Self> {
        let cluster = NatsCluster::start(size).await?;
        Self::start_on(cluster.nodes, size, |_| {}, |_| {}).await
    }

    /// Every nats-server's URL, comma-separated.
    #[must_use]
    pub fn nats_url(&self) -> String {
        std::iter::once(&self.nats)
            .chain(&self.nats_peers)
            .map(NatsServer::url)
            .collect::<Vec<_>>()
            .join(",")
    }

    async fn start_on(
        nodes: Vec<NatsServer>,
        replicas: usize,
        configure: impl FnOnce(&mut user_service::config::AuthSettings),
        configure_notifications: impl FnOnce(&mut notification_service::Settings),
    ) -> anyhow::Result<Self> {
        crate::init_logging();
        let mut auth = user_service::config::AuthSettings {
            signing_key: platform::config::Secret::new(TEST_SIGNING_KEY),
            ..user_service::Settings::default().auth
        };
        configure(&mut auth);
        let mut nodes = nodes.into_iter();
        let nats = nodes
            .next()
            .ok_or_else(|| anyhow::anyhow!("no nats-server"))?;
        let nats_peers: Vec<NatsServer> = nodes.collect();
        let nats_url = std::iter::once(&nats)
            .chain(&nats_peers)
            .map(NatsServer::url)
            .collect::<Vec<_>>()
            .join(",");
        let streams = messaging::StreamLimits {
            replicas,
            ..Default::default()
        };
        let (user_db, order_db, notification_db) = tokio::try_join!(
            TestDb::create("users"),
            TestDb::create("orders"),
            TestDb::create("notifications"),
        )?;
        let shutdown = CancellationToken::new();

        let user = user_service::Application::build(user_service::Settings {
            grpc_addr: "127.0.0.1:0".to_owned(),
            admin_addr: "127.0.0.1:0".to_owned(),
            database_url: platform::config::DatabaseUrl::new(user_db.url.clone()),
            nats_url: nats_url.clone(),
            streams: streams.clone(),
            auth,
            startup_wait_secs: 10,
            ..Default::default()
        })
        .await?;
        let user_addr = user.grpc_addr();
        let user_admin = user.admin_addr();
        let user_service = platform::client::ClientSettings::new(format!("http://{user_addr}"));

        let order = order_service::Application::build(order_service::Settings {
            grpc_addr: "127.0.0.1:0".to_owned(),
            admin_addr: "127.0.0.1:0".to_owned(),
            database_url: platform::config::DatabaseUrl::new(order_db.url.clone()),
            nats_url: nats_url.clone(),
            streams: streams.clone(),
            user_service: user_service.clone(),
            startup_wait_secs: 10,
            ..Default::default()
        })
        .await?;
        let order_addr = order.grpc_addr();
        let order_admin = order.admin_addr();

        let mut notification_settings = notification_service::Settings {
            grpc_addr: "127.0.0.1:0".to_owned(),
            admin_addr: "127.0.0.1:0".to_owned(),
            database_url: platform::config::DatabaseUrl::new(notification_db.url.clone()),
            user_service,
            nats_url: nats_url.clone(),
            streams,
            startup_wait_secs: 10,
            // The tests' webhook receivers listen on loopback.
            webhook_allowed_networks: "127.0.0.0/8,::1".to_owned(),
            ..Default::default()
        };
        configure_notifications(&mut notification_settings);
        let notification = notification_service::Application::build(notification_settings).await?;
        let notification_addr = notification.grpc_addr();
        let notification_admin = notification.admin_addr();

        let tasks = vec![
            spawn("user-service", user.run_until_stopped(shutdown.clone())),
            spawn("order-service", order.run_until_stopped(shutdown.clone())),
            spawn(
                "notification-service",
                notification.run_until_stopped(shutdown.clone()),
            ),
        ];
        Ok(Self {
            nats,
            nats_peers,
            user_db,
            order_db,
            notification_db,
            user_addr,
            order_addr,
            notification_addr,
            user_admin,
            order_admin,
            notification_admin,
            shutdown,
            tasks,
        })
    }

    async fn channel(addr: SocketAddr) -> anyhow::Result<Channel> {
        Ok(Channel::from_shared(format!("http://{addr}"))?
            .connect_timeout(Duration::from_secs(5))
            .timeout(Duration::from_secs(10))
            .connect()
            .await?)
    }

    /// # Errors
    ///
    /// When the service does not accept the connection.
    pub async fn users(&self) -> anyhow::Result<UserServiceClient<Channel>> {
        Ok(UserServiceClient::new(Self::channel(self.user_addr).await?))
    }

    /// # Errors
    ///
    /// When the service does not accept the connection.
    pub async fn orders(&self) -> anyhow::Result<OrderServiceClient<Channel>> {
        Ok(OrderServiceClient::new(
            Self::channel(self.order_addr).await?,
        ))
    }

    /// # Errors
    ///
    /// When the service does not accept the connection.
    pub async fn notifications(&self) -> anyhow::Result<NotificationServiceClient<Channel>> {
        Ok(NotificationServiceClient::new(
            Self::channel(self.notification_addr).await?,
        ))
    }

    /// A channel to any of the services, for health checks.
    ///
    /// # Errors
    ///
    /// When the service does not accept the connection.
    pub async fn channel_to(&self, addr: SocketAddr) -> anyhow::Result<Channel> {
        Self::channel(addr).await
    }

    /// Registers a user with a unique email and logs in. Returns the user id
    /// and access token.
    ///
    /// # Errors
    ///
    /// When either call fails.
    pub async fn signed_up_user(&self) -> anyhow::Result<(String, String)> {
        let email = format!("user-{}@example.com", uuid::Uuid::new_v4().simple());
        let password = "correct horse battery".to_owned();
        let mut users = self.users().await?;
        let user = users
            .create_user(user_pb::CreateUserRequest {
                email: email.clone(),
                password: password.clone(),
            })
            .await?
            .into_inner()
            .user
            .ok_or_else(|| anyhow::anyhow!("CreateUser returned no user"))?;
        let token = users
            .authenticate(user_pb::AuthenticateRequest { email, password })
            .await?
            .into_inner()
            .access_token;
        Ok((user.id, token))
    }

    /// Stops the services and waits for them to finish.
    pub async fn stop(mut self) {
        self.shutdown.cancel();
        for task in self.tasks.drain(..) {
            let _ = task.await;
        }
    }
}

impl Drop for TestStack {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// Wraps `message` in a request carrying `authorization: Bearer <token>`.
///
/// # Panics
///
/// If the token contains bytes that cannot be sent as metadata.
#[must_use]
pub fn bearer<T>(token: &str, message: T) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    #[allow(clippy::unwrap_used)]
    request
        .metadata_mut()
        .insert("authorization", format!("Bearer {token}").parse().unwrap());
    request
}
