//! Live notifications for `WatchNotifications`: one `LISTEN` per replica on
//! the channel a trigger signals for every recorded notification (so a
//! watcher on any replica hears deliveries made by any other), fanned out
//! in-process.

use std::time::Duration;

use sqlx::postgres::PgListener;
use tokio::sync::broadcast;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

/// The NOTIFY channel of `notifications_notify_trigger`.
pub const CHANNEL: &str = "notification_recorded";

/// A recorded notification: (user, notification id).
pub type Recorded = (Uuid, Uuid);

/// Fans out recorded notifications to watchers.
#[derive(Debug, Clone)]
pub struct Hub {
    sender: broadcast::Sender<Recorded>,
}

impl Default for Hub {
    fn default() -> Self {
        Self::new()
    }
}

impl Hub {
    #[must_use]
    pub fn new() -> Self {
        Self {
            sender: broadcast::channel(1024).0,
        }
    }

    /// A receiver of everything recorded from now on.
    #[must_use]
    pub fn subscribe(&self) -> broadcast::Receiver<Recorded> {
        self.sender.subscribe()
    }

    /// Listens until `shutdown`, reconnecting after errors.
    pub async fn run(self, database_url: String, shutdown: CancellationToken) {
        while !shutdown.is_cancelled() {
            if let Err(error) = self.listen(&database_url, &shutdown).await {
                tracing::warn!(%error, "notification listener interrupted; retrying");
            }
            tokio::select! {
                () = shutdown.cancelled() => {}
                () = tokio::time::sleep(Duration::from_millis(500)) => {}
            }
        }
    }

    async fn listen(
        &self,
        database_url: &str,
        shutdown: &CancellationToken,
    ) -> Result<(), sqlx::Error> {
        let mut listener = PgListener::connect(database_url).await?;
        listener.listen(CHANNEL).await?;
        loop {
            let notification = tokio::select! {
                () = shutdown.cancelled() => return Ok(()),
                n = listener.recv() => n?,
            };
            let parsed = notification
                .payload()
                .split_once(':')
                .and_then(|(user, id)| {
                    Some((Uuid::parse_str(user).ok()?, Uuid::parse_str(id).ok()?))
                });
            if let Some(recorded) = parsed {
                // No watchers is fine.
                let _ = self.sender.send(recorded);
            }
        }
    }
}
