//! Live notifications for `WatchNotifications`: one `LISTEN` per replica on
//! the channel a trigger signals for every recorded notification (so a
//! watcher on any replica hears deliveries made by any other), fanned out
//! in-process. The announcement carries the record itself, so watchers do
//! not read it back (unless it was too large to carry).

use std::{sync::Arc, time::Duration};

use chrono::{DateTime, Utc};
use sqlx::postgres::PgListener;
use tokio::sync::broadcast;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::store::NotificationRecord;

/// The NOTIFY channel of `notifications_notify_trigger` (JSON payloads).
pub const CHANNEL: &str = "notification_recorded_v2";

/// A recorded notification as announced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Recorded {
    /// The whole record.
    Whole(Arc<NotificationRecord>),
    /// Too large to announce: whose it is and its id, to read back.
    ById { user_id: Uuid, id: Uuid },
}

impl Recorded {
    /// Whose notification it is.
    #[must_use]
    pub fn user_id(&self) -> Uuid {
        match self {
            Self::Whole(record) => record.user_id,
            Self::ById { user_id, .. } => *user_id,
        }
    }

    /// Parses a NOTIFY payload; `None` for anything else.
    #[must_use]
    pub fn parse(payload: &str) -> Option<Self> {
        #[derive(serde::Deserialize)]
        struct Whole {
            seq: i64,
            id: Uuid,
            user_id: Uuid,
            event_id: Uuid,
            event_type: String,
            channel: String,
            subject: String,
            body: String,
            occurred_at: DateTime<Utc>,
            created_at: DateTime<Utc>,
        }
        #[derive(serde::Deserialize)]
        struct ById {
            user_id: Uuid,
            id: Uuid,
        }
        if let Ok(w) = serde_json::from_str::<Whole>(payload) {
            return Some(Self::Whole(Arc::new(NotificationRecord {
                seq: w.seq,
                id: w.id,
                user_id: w.user_id,
                event_id: w.event_id,
                event_type: w.event_type,
                channel: w.channel,
                subject: w.subject,
                body: w.body,
                occurred_at: w.occurred_at,
                created_at: w.created_at,
            })));
        }
        let ById { user_id, id } = serde_json::from_str(payload).ok()?;
        Some(Self::ById { user_id, id })
    }
}

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
            let parsed = Recorded::parse(notification.payload());
            if let Some(recorded) = parsed {
                // No watchers is fine.
                let _ = self.sender.send(recorded);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_whole_record_is_read_as_postgres_formats_it() {
        let payload = r#"{"seq" : 7, "id" : "0193d0a4-7c1e-7000-8000-000000000001", "user_id" : "0193d0a4-7c1e-7000-8000-000000000002", "event_id" : "0193d0a4-7c1e-7000-8000-000000000003", "event_type" : "order.paid", "channel" : "log", "subject" : "Receipt", "body" : "Paid: 1.00 EUR", "occurred_at" : "2026-12-03T13:12:29.612345+00:00", "created_at" : "2026-12-03T13:12:30+00:00"}"#;
        let Some(Recorded::Whole(record)) = Recorded::parse(payload) else {
            panic!("not read whole");
        };
        assert_eq!(record.seq, 7);
        assert_eq!(record.event_type, "order.paid");
        assert_eq!(record.body, "Paid: 1.00 EUR");
        assert_eq!(
            record.occurred_at.to_rfc3339(),
            "2026-12-03T13:12:29.612345+00:00"
        );
        assert_eq!(
            record.user_id.to_string(),
            "0193d0a4-7c1e-7000-8000-000000000002"
        );
    }

    #[test]
    fn a_record_too_large_to_carry_is_announced_by_id_and_junk_is_nothing() {
        let payload = r#"{"user_id" : "0193d0a4-7c1e-7000-8000-000000000002", "id" : "0193d0a4-7c1e-7000-8000-000000000001"}"#;
        assert_eq!(
            Recorded::parse(payload),
            Some(Recorded::ById {
                user_id: Uuid::parse_str("0193d0a4-7c1e-7000-8000-000000000002")
                    .unwrap_or_default(),
                id: Uuid::parse_str("0193d0a4-7c1e-7000-8000-000000000001").unwrap_or_default(),
            })
        );
        assert_eq!(Recorded::parse("user:id"), None);
        assert_eq!(Recorded::parse(r#"{"user_id" : "x", "id" : "y"}"#), None);
    }
}
