//! What a failed message becomes: a NAK with backoff while it may still
//! succeed, a dead letter (and its order moved on) once it cannot. Waiting
//! for an order's previous event spends no attempts; failures are counted
//! per (consumer, event) in Postgres, so they survive restarts.

use std::time::Duration;

use async_nats::jetstream::{self, AckKind};
use messaging::dlq;
use uuid::Uuid;

use super::{Deliverer, decode::Decoded};
use crate::{channels::DeliveryError, store};

/// A waiting message's first wait (see `wait_delay`).
const WAIT_FIRST_CHECK: Duration = Duration::from_millis(25);

/// Why processing did not finish; all are retried with backoff. Each
/// failure carries its cause.
#[derive(Debug, thiserror::Error)]
pub(super) enum Problem {
    /// Something else must happen first (an earlier event of the order, the
    /// user's email address arriving): a reason, not a failure.
    #[error("{0}")]
    Waiting(String),
    #[error("database: {0}")]
    Database(#[from] sqlx::Error),
    #[error(transparent)]
    Delivery(#[from] DeliveryError),
    #[error("dead-letter stream: {0}")]
    DeadLetter(#[source] messaging::MessagingError),
    /// The batch this message was handled in failed (the cause, as text:
    /// one cause is shared by every message of the batch).
    #[error("{0}")]
    Batch(String),
}

impl Problem {
    /// Whether Postgres itself is away (retrying item by item is futile).
    pub(super) fn is_outage(&self) -> bool {
        matches!(
            self,
            Self::Database(
                sqlx::Error::PoolTimedOut | sqlx::Error::PoolClosed | sqlx::Error::Io(_)
            )
        )
    }

    /// The same problem for another message of a failed batch.
    pub(super) fn again(&self) -> Self {
        match self {
            Self::Waiting(why) => Self::Waiting(why.clone()),
            other => Self::Batch(other.to_string()),
        }
    }

    /// Whether it is a failure (counted towards `max_deliver`) rather than
    /// a wait.
    fn failed(&self) -> bool {
        !matches!(self, Self::Waiting(_))
    }
}

impl Deliverer {
    /// Dead-letters the message and lets its order move on.
    pub(super) async fn dead_letter(
        &self,
        message: &jetstream::Message,
        consumer: &str,
        reason: &str,
        attempts: i64,
        last_error: &str,
        order: Option<(Uuid, i64)>,
    ) -> Result<(), Problem> {
        let failure = dlq::Failure {
            consumer,
            reason,
            attempts,
            last_error,
        };
        dlq::publish(
            &self.js,
            message.subject.as_str(),
            message.headers.as_ref(),
            message.payload.clone(),
            &failure,
        )
        .await
        .map_err(Problem::DeadLetter)?;
        if let Some((order_id, version)) = order {
            let mut tx = self.store.pool().begin().await?;
            store::lock_orders(&mut tx, &[order_id]).await?;
            store::finish(&mut tx, &[], &[(order_id, version)]).await?;
            tx.commit().await?;
        }
        tracing::error!(consumer, reason, attempts, last_error, subject = %message.subject, "message dead-lettered");
        Ok(())
    }

    /// How long a message waiting for its order's previous event stays away,
    /// on its `attempts`-th delivery. The predecessor is most often in
    /// another replica's batch, committed within milliseconds: the first
    /// checks come soon (about 25 ms, doubling, jittered), and a long wait (a
    /// predecessor that is failing) polls gently, at most as often as the
    /// first retry of a failure.
    fn wait_delay(&self, attempts: i64) -> Duration {
        let soon = resilience::Backoff::equal(WAIT_FIRST_CHECK, self.backoff.ceiling(0));
        soon.delay(u32::try_from(attempts.saturating_sub(1)).unwrap_or(u32::MAX))
    }

    /// After a failed or waiting attempt: NAK with a delay, or dead-letter
    /// and terminate once the message has failed `max_deliver` times or
    /// waited `max_wait` for its order's previous event.
    pub(super) async fn retry_or_give_up(
        &self,
        consumer: &str,
        message: &jetstream::Message,
        decoded: &Decoded,
        attempts: i64,
        problem: &Problem,
    ) -> AckKind {
        let subject = message.subject.as_str();
        let (give_up, reason, delay) = match problem {
            Problem::Waiting(_) => match self.store.note_wait(consumer, decoded.event_id).await {
                Ok(waited) => (
                    waited >= self.max_wait,
                    "waited too long",
                    self.wait_delay(attempts),
                ),
                Err(error) => {
                    tracing::warn!(%error, "cannot note the wait; retrying");
                    (false, "", self.backoff.delay(0))
                }
            },
            failure => {
                match self
                    .store
                    .count_failure(consumer, decoded.event_id, &failure.to_string())
                    .await
                {
                    Ok(failures) => {
                        let attempt = u32::try_from(failures.saturating_sub(1)).unwrap_or(u32::MAX);
                        (
                            failures >= self.max_deliver,
                            "max deliveries reached",
                            self.backoff.delay(attempt),
                        )
                    }
                    // Postgres cannot count (it is likely the failure itself):
                    // an outage must not dead-letter healthy messages.
                    Err(_) => {
                        let attempt = u32::try_from(attempts.saturating_sub(1)).unwrap_or(u32::MAX);
                        (false, "", self.backoff.delay(attempt))
                    }
                }
            }
        };
        if give_up {
            // A message that waited too long does not move its order past
            // the predecessor it waited for (that one may still come, and
            // must then be delivered, not taken for a duplicate).
            let finishes = decoded.order.filter(|_| problem.failed());
            return match self
                .dead_letter(
                    message,
                    consumer,
                    reason,
                    attempts,
                    &problem.to_string(),
                    finishes,
                )
                .await
            {
                Ok(()) => {
                    if let Err(error) = self.store.forget_failures(consumer, decoded.event_id).await
                    {
                        tracing::debug!(%error, "failure count left behind");
                    }
                    AckKind::Term
                }
                Err(e) => {
                    tracing::warn!(error = %e, "cannot dead-letter; will retry");
                    AckKind::Nak(Some(self.backoff.delay(0)))
                }
            };
        }
        if let Problem::Waiting(_) = problem {
            // Routine across replicas, checked again within milliseconds.
            tracing::debug!(%subject, event_id = %decoded.event_id, attempts, ?delay, %problem, "waiting for an earlier event");
        } else {
            tracing::warn!(
                %subject,
                event_id = %decoded.event_id,
                attempts,
                ?delay,
                %problem,
                "notification not delivered yet; retrying"
            );
        }
        AckKind::Nak(Some(delay))
    }
}
