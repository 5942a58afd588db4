//! Composition root and lifecycle of notification-service.

use std::{net::SocketAddr, time::Duration};

use async_nats::jetstream::consumer::PullConsumer;
use contracts::notification::v1::notification_service_server::NotificationServiceServer;
use messaging::{ConsumerSpec, StreamSpec};
use platform::{
    StartError,
    admin::{AdminServer, Readiness},
    auth::Authenticator,
    metrics::Metrics,
};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tonic::server::NamedService as _;

use crate::{
    Settings,
    channels::{Mailer, WebhookSender},
    consumer::{self, Deliverer},
    grpc::NotificationApi,
    store::NotificationStore,
    watch::Hub,
};

/// A built, not yet running notification-service: its ports are bound, its
/// database migrated and its durable consumers declared.
#[derive(Debug)]
pub struct Application {
    listener: TcpListener,
    addr: SocketAddr,
    admin: AdminServer,
    store: NotificationStore,
    auth: Authenticator,
    consumers: Vec<PullConsumer>,
    /// Clones of the consumers, for sampling their backlog.
    sampled_consumers: Vec<PullConsumer>,
    deliverer: Deliverer,
    egress: crate::egress::Egress,
    limits: crate::config::UserLimits,
    database_url: platform::config::DatabaseUrl,
    metrics: Metrics,
    readiness: Readiness,
    tls: Option<tonic::transport::ServerTlsConfig>,
}

fn consumer_spec(
    settings: &Settings,
    stream: StreamSpec,
    suffix: &str,
    filter: &str,
) -> ConsumerSpec {
    ConsumerSpec {
        stream,
        durable_name: format!("{}-{suffix}", settings.consumer_prefix),
        filter_subject: filter.to_owned(),
        ack_wait: Duration::from_secs(settings.ack_wait_secs),
        // The service counts deliveries and dead-letters itself; the server
        // never gives up on a message silently.
        max_deliver: -1,
        max_ack_pending: 1000,
    }
}

impl Application {
    /// # Errors
    ///
    /// Fails when Postgres or NATS stay unreachable past the start-up wait,
    /// a migration fails, or a port is taken.
    pub async fn build(settings: Settings) -> Result<Self, StartError> {
        let wait = Duration::from_secs(settings.startup_wait_secs);
        let pool = platform::db::pool(
            settings.database_url.expose(),
            settings.database_max_connections,
        )?;
        platform::db::migrate(&pool, vec![sqlx::migrate!("./migrations")], wait).await?;
        let (nats, js) =
            platform::nats::connect(&settings.nats_url, "notification-service", wait).await?;
        let specs = [
            consumer_spec(&settings, messaging::USERS_STREAM, "users", "user.>"),
            consumer_spec(&settings, messaging::ORDERS_STREAM, "orders", "order.>"),
        ];
        let metrics = Metrics::new();
        metrics.set_build_info("notification-service", env!("CARGO_PKG_VERSION"));
        for spec in &specs {
            metrics.init_consumer(&spec.durable_name);
        }
        let mut consumers = Vec::with_capacity(specs.len());
        for spec in &specs {
            consumers.push(
                messaging::ensure_consumer(&js, spec, &settings.streams)
                    .await
                    .map_err(|e| StartError::nats(&settings.nats_url, e))?,
            );
        }
        messaging::declare_stream(&js, messaging::dlq::DLQ_STREAM, &settings.streams)
            .await
            .map_err(|e| StartError::nats(&settings.nats_url, e))?;
        let store = NotificationStore::new(pool.clone());
        let egress = crate::egress::Egress::new(&settings.webhook_allowed_networks)
            .map_err(|e| StartError::setting("APP_WEBHOOK_ALLOWED_NETWORKS", e))?;
        let deliverer = Deliverer {
            store: store.clone(),
            js: js.clone(),
            log: settings.channel_enabled("log"),
            mailer: if settings.channel_enabled("email") {
                Some(
                    Mailer::new(&settings.smtp)
                        .map_err(|e| StartError::setting("APP_SMTP__*", e))?,
                )
            } else {
                None
            },
            webhooks: if settings.channel_enabled("webhook") {
                Some(
                    WebhookSender::new(
                        Duration::from_millis(settings.webhook_timeout_ms),
                        egress.clone(),
                    )
                    .map_err(|e| StartError::setting("APP_CHANNELS (webhook client)", e))?,
                )
            } else {
                None
            },
            backoff: resilience::Backoff::equal(
                Duration::from_millis(settings.retry_base_ms),
                Duration::from_millis(settings.retry_max_ms),
            ),
            max_deliver: settings.max_deliver.max(1),
            max_wait: Duration::from_secs(settings.max_wait_secs),
            lanes: settings.consumer_lanes.clamp(1, 256),
            // Each message's order is one advisory lock held by the batch:
            // bounded well within max_locks_per_transaction.
            batch: settings.consumer_batch.clamp(1, 256),
            ack_wait: Duration::from_secs(settings.ack_wait_secs),
            pause_before_ack: Duration::from_millis(settings.faults.pause_before_ack_ms),
            metrics: metrics.clone(),
        };
        let auth = Authenticator::new(
            &settings.user_service,
            Duration::from_secs(settings.token_cache_secs),
            &metrics,
        )?;
        let readiness = Readiness::new().postgres(pool.clone()).nats(nats);
        let (listener, addr) = platform::net::bind(&settings.grpc_addr).await?;
        let admin = AdminServer::bind(&settings.admin_addr).await?;
        let tls = settings.tls.config()?;
        Ok(Self {
            listener,
            addr,
            admin,
            store,
            auth,
            sampled_consumers: consumers.clone(),
            consumers,
            deliverer,
            egress,
            limits: settings.limits,
            database_url: settings.database_url,
            metrics,
            readiness,
            tls,
        })
    }

    /// The bound gRPC address (useful with port 0).
    #[must_use]
    pub fn grpc_addr(&self) -> SocketAddr {
        self.addr
    }

    /// The bound admin address (`/metrics`, `/livez`, `/readyz`).
    #[must_use]
    pub fn admin_addr(&self) -> SocketAddr {
        self.admin.addr()
    }

    /// Serves gRPC and the admin port and runs the consumers until
    /// `shutdown` fires.
    ///
    /// # Errors
    ///
    /// Fails when the gRPC transport fails.
    pub async fn run_until_stopped(self, shutdown: CancellationToken) -> Result<(), StartError> {
        tracing::info!(addr = %self.addr, admin = %self.admin.addr(), "notification-service serving");
        let hub = Hub::new();
        let mut background: Vec<_> = self
            .consumers
            .into_iter()
            .map(|c| tokio::spawn(consumer::run(c, self.deliverer.clone(), shutdown.clone())))
            .collect();
        background.push(tokio::spawn(
            hub.clone()
                .run(self.database_url.expose().to_owned(), shutdown.clone()),
        ));
        background.push(tokio::spawn(sample(
            self.metrics.clone(),
            self.store.pool().clone(),
            self.sampled_consumers,
            self.deliverer.js.clone(),
            shutdown.clone(),
        )));
        platform::grpc::Service {
            routes: tonic::service::Routes::new(NotificationServiceServer::new(
                NotificationApi::new(
                    self.store,
                    self.auth,
                    hub,
                    self.egress,
                    self.limits,
                    shutdown.clone(),
                ),
            )),
            name: NotificationServiceServer::<NotificationApi>::NAME,
            listener: self.listener,
            admin: self.admin,
            metrics: self.metrics.clone(),
            readiness: self.readiness,
            tls: self.tls,
            background,
        }
        .run(shutdown)
        .await
    }
}

/// Samples consumer backlogs, the dead-letter depth and the pool into the
/// metrics every few seconds.
async fn sample(
    metrics: Metrics,
    pool: sqlx::PgPool,
    mut consumers: Vec<PullConsumer>,
    js: async_nats::jetstream::Context,
    shutdown: CancellationToken,
) {
    loop {
        metrics.set_db_pool(&pool);
        for consumer in &mut consumers {
            if let Ok(info) = consumer.info().await {
                let pending = i64::try_from(info.num_pending).unwrap_or(i64::MAX)
                    + i64::try_from(info.num_ack_pending).unwrap_or(i64::MAX);
                metrics.set_consumer_pending(&info.name, pending);
            }
        }
        if let Ok(mut stream) = js.get_stream(messaging::dlq::DLQ_STREAM.name).await
            && let Ok(info) = stream.info().await
        {
            metrics.set_dlq_messages(i64::try_from(info.state.messages).unwrap_or(i64::MAX));
        }
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(Duration::from_secs(2)) => {}
        }
    }
}
