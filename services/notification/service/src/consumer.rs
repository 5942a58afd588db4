//! JetStream -> notifications, delivered on every enabled channel exactly
//! once per (event, channel).
//!
//! For each message: decode it; for order events take the order's advisory
//! lock and check that the previous version is finished (else NAK and wait:
//! notifications of one order go out in event order, on any number of
//! replicas); deliver on each channel not yet recorded for this event,
//! recording each success; mark the version finished; ack. A failure NAKs
//! with a capped, jittered exponential delay; after `max_deliver` failed
//! attempts (counted in Postgres: waiting for the previous event is not a
//! failure and spends nothing), or once it has waited `max_wait` for its
//! predecessor, or at once for a message that cannot be decoded, the message
//! goes to the dead-letter stream with its reason and is terminated, and its
//! order moves on. A poison message blocks nothing behind it on other orders.

use std::time::Duration;

use async_nats::jetstream::{self, AckKind, consumer::PullConsumer};
use chrono::{DateTime, Utc};
use contracts::events::v1 as pb;
use futures::StreamExt as _;
use messaging::dlq;
use notification_domain::{Channel, Trigger};
use resilience::Backoff;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::{
    channels::{Mailer, Outgoing, WebhookSender},
    store::{self, Delivered, NotificationStore},
};

/// Why a message could not be turned into a trigger. Not retryable.
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    #[error("payload is not a valid {0}: {1}")]
    Protobuf(&'static str, prost::DecodeError),
    #[error("{0} is missing or malformed")]
    Field(&'static str),
}

/// What a message means for notifications.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decoded {
    pub event_id: Uuid,
    pub occurred_at: DateTime<Utc>,
    /// The notification it causes, if any (`order.delivered` causes none).
    pub trigger: Option<Trigger>,
    /// For order events: the order and the event's version in it.
    pub order: Option<(Uuid, i64)>,
}

fn uuid(field: &'static str, raw: &str) -> Result<Uuid, DecodeError> {
    Uuid::parse_str(raw).map_err(|_| DecodeError::Field(field))
}

struct Meta {
    event_id: Uuid,
    occurred_at: DateTime<Utc>,
    version: i64,
}

fn metadata(meta: Option<&pb::EventMetadata>) -> Result<Meta, DecodeError> {
    let meta = meta.ok_or(DecodeError::Field("metadata"))?;
    let event_id = uuid("metadata.event_id", &meta.event_id)?;
    let occurred_at = meta
        .occurred_at
        .as_ref()
        .and_then(|t| DateTime::from_timestamp(t.seconds, u32::try_from(t.nanos).unwrap_or(0)))
        .ok_or(DecodeError::Field("metadata.occurred_at"))?;
    Ok(Meta {
        event_id,
        occurred_at,
        version: meta.stream_version,
    })
}

fn units(items: &[pb::OrderLine]) -> u64 {
    items
        .iter()
        .map(|i| u64::try_from(i.quantity).unwrap_or(0))
        .sum()
}

fn decode_as<M: prost::Message + Default>(
    name: &'static str,
    payload: &[u8],
) -> Result<M, DecodeError> {
    M::decode(payload).map_err(|e| DecodeError::Protobuf(name, e))
}

/// An order event's common parts: its metadata, order and user.
fn order_event(
    meta: Option<&pb::EventMetadata>,
    order_id: &str,
    user_id: &str,
) -> Result<(Meta, Uuid, Uuid), DecodeError> {
    Ok((
        metadata(meta)?,
        uuid("order_id", order_id)?,
        uuid("user_id", user_id)?,
    ))
}

/// Decodes an integration event; `Ok(None)` for subjects this service
/// ignores.
///
/// # Errors
///
/// A payload that does not match its subject's schema.
pub fn decode(subject: &str, payload: &[u8]) -> Result<Option<Decoded>, DecodeError> {
    let (meta, order, trigger) = match subject {
        "user.created" => {
            let e: pb::UserCreated = decode_as("UserCreated", payload)?;
            let trigger = Trigger::UserCreated {
                user_id: uuid("user_id", &e.user_id)?,
                email: e.email,
            };
            (metadata(e.metadata.as_ref())?, None, Some(trigger))
        }
        "order.created" => {
            let e: pb::OrderCreated = decode_as("OrderCreated", payload)?;
            let (meta, order_id, user_id) =
                order_event(e.metadata.as_ref(), &e.order_id, &e.user_id)?;
            let trigger = Trigger::OrderCreated {
                order_id,
                user_id,
                item_count: units(&e.items),
                currency: e.currency,
                total_minor: e.total_minor,
            };
            (meta, Some(order_id), Some(trigger))
        }
        "order.paid" => {
            let e: pb::OrderPaid = decode_as("OrderPaid", payload)?;
            let (meta, order_id, user_id) =
                order_event(e.metadata.as_ref(), &e.order_id, &e.user_id)?;
            let trigger = Trigger::OrderPaid {
                order_id,
                user_id,
                currency: e.currency,
                amount_minor: e.amount_minor,
                payment_reference: e.payment_reference,
            };
            (meta, Some(order_id), Some(trigger))
        }
        "order.shipped" => {
            let e: pb::OrderShipped = decode_as("OrderShipped", payload)?;
            let (meta, order_id, user_id) =
                order_event(e.metadata.as_ref(), &e.order_id, &e.user_id)?;
            let destination = e
                .shipping_address
                .map(|a| format!("{}, {}", a.city, a.country))
                .unwrap_or_else(|| "you".to_owned());
            let trigger = Trigger::OrderShipped {
                order_id,
                user_id,
                carrier: e.carrier,
                tracking_number: e.tracking_number,
                item_count: units(&e.items),
                destination,
            };
            (meta, Some(order_id), Some(trigger))
        }
        "order.delivered" => {
            let e: pb::OrderDelivered = decode_as("OrderDelivered", payload)?;
            let (meta, order_id, _) = order_event(e.metadata.as_ref(), &e.order_id, &e.user_id)?;
            (meta, Some(order_id), None)
        }
        "order.cancelled" => {
            let e: pb::OrderCancelled = decode_as("OrderCancelled", payload)?;
            let (meta, order_id, user_id) =
                order_event(e.metadata.as_ref(), &e.order_id, &e.user_id)?;
            let trigger = Trigger::OrderCancelled {
                order_id,
                user_id,
                reason: e.reason,
                currency: e.currency,
                refund_minor: e.refund_minor,
            };
            (meta, Some(order_id), Some(trigger))
        }
        _ => return Ok(None),
    };
    Ok(Some(Decoded {
        event_id: meta.event_id,
        occurred_at: meta.occurred_at,
        trigger,
        order: order.map(|id| (id, meta.version)),
    }))
}

/// Why processing did not finish; both are retried with backoff.
#[derive(Debug)]
enum Problem {
    /// Something else must happen first (an earlier event of the order, the
    /// user's email address arriving).
    Waiting(String),
    /// A delivery or the database failed.
    Failed(String),
}

impl Problem {
    fn text(&self) -> &str {
        match self {
            Self::Waiting(s) | Self::Failed(s) => s,
        }
    }
}

impl From<sqlx::Error> for Problem {
    fn from(error: sqlx::Error) -> Self {
        Self::Failed(format!("database: {error}"))
    }
}

/// Everything a consumer needs to deliver.
#[derive(Debug, Clone)]
pub struct Deliverer {
    pub store: NotificationStore,
    pub js: jetstream::Context,
    pub log: bool,
    pub mailer: Option<Mailer>,
    pub webhooks: Option<WebhookSender>,
    pub backoff: Backoff,
    /// Failed attempts before a message is dead-lettered.
    pub max_deliver: i64,
    /// How long a message may wait for its order's previous event.
    pub max_wait: Duration,
    /// Messages handled at once per consumer (see [`run`]).
    pub lanes: usize,
    pub pause_before_ack: Duration,
    pub metrics: platform::metrics::Metrics,
}

impl Deliverer {
    /// Whether this service acts on `subject` at all.
    fn store_known(&self, subject: &str) -> bool {
        matches!(
            subject,
            "user.created"
                | "order.created"
                | "order.paid"
                | "order.shipped"
                | "order.delivered"
                | "order.cancelled"
        )
    }

    /// Delivers what `decoded` causes. A redriven dead letter skips the
    /// ordering gate: its order has moved on, and it is delivered late, once.
    ///
    /// An order event costs five round trips: BEGIN, the order's advisory
    /// lock, one read (progress, channels already done, webhooks, address),
    /// one write (the log record and the finished version), COMMIT. An
    /// email or webhook success is recorded at once on its own, so a later
    /// channel's failure never makes it go out twice.
    /// `Ok(true)` for a duplicate: everything it causes was done before.
    async fn process(
        &self,
        subject: &str,
        decoded: &Decoded,
        redriven: bool,
    ) -> Result<bool, Problem> {
        if let Some(Trigger::UserCreated { user_id, email }) = &decoded.trigger {
            self.store.remember_recipient(*user_id, email).await?;
        }
        let gated = decoded.order.filter(|_| !redriven);
        let rendered = decoded.trigger.as_ref().map(|t| (t, t.render()));
        let user = rendered.as_ref().map(|(_, message)| message.user_id);
        let mut tx = self.store.pool().begin().await?;
        if let Some((order_id, _)) = gated {
            store::lock_order(&mut tx, order_id).await?;
        }
        let known = store::prepare(
            &mut tx,
            gated.map(|(order_id, _)| order_id),
            decoded.event_id,
            user,
            self.webhooks.is_some(),
            self.mailer.is_some(),
        )
        .await?;
        if let Some((order_id, version)) = gated {
            if version <= known.last_version {
                return Ok(true); // finished before: a redelivery
            }
            if version > known.last_version + 1 {
                return Err(Problem::Waiting(format!(
                    "event {} of order {order_id} is not finished yet",
                    known.last_version + 1
                )));
            }
        }
        let (log, sent, outcome) = match &rendered {
            Some((trigger, message)) => {
                self.deliver(subject, decoded, trigger, message, &known)
                    .await?
            }
            None => (None, 0, Ok(())),
        };
        let duplicate = sent == 0 && !known.delivered_channels.is_empty();
        // The log record commits even when another channel failed (so the
        // log line is not written twice); the version finishes only on success.
        let finished = gated.filter(|_| outcome.is_ok());
        store::finish(&mut tx, log.as_ref(), finished).await?;
        tx.commit().await?;
        outcome.map(|()| duplicate)
    }

    /// Delivers on every channel not yet done. Returns the log channel's
    /// record (the caller writes it in its transaction) and the outcome.
    async fn deliver(
        &self,
        subject: &str,
        decoded: &Decoded,
        trigger: &Trigger,
        message: &notification_domain::Message,
        known: &store::Known,
    ) -> Result<(Option<Delivered>, usize, Result<(), Problem>), Problem> {
        let outgoing = Outgoing {
            event_id: decoded.event_id,
            event_type: subject,
            occurred_at: decoded.occurred_at,
            user_id: message.user_id,
            order_id: trigger.order_id(),
            subject: &message.subject,
            body: &message.body,
        };
        let done = &known.delivered_channels;
        let record = |channel: String, target: Option<String>| Delivered {
            event_id: decoded.event_id,
            event_type: subject.to_owned(),
            occurred_at: decoded.occurred_at,
            user_id: message.user_id,
            channel,
            target,
            subject: message.subject.clone(),
            body: message.body.clone(),
        };
        let mut problems = Vec::new();
        let mut sent = 0;
        let log = Channel::Log.name();
        let mut log_record = None;
        if self.log && !done.contains(&log) {
            tracing::info!(
                channel = "log",
                user_id = %message.user_id,
                event_id = %decoded.event_id,
                subject = %message.subject,
                trace_id = tracing::field::Empty,
                span_id = tracing::field::Empty,
                "notification delivered"
            );
            // The body may hold personal data (the welcome names the email
            // address): only at debug level.
            tracing::debug!(event_id = %decoded.event_id, body = %message.body, "notification body");
            log_record = Some(record(log, None));
            sent += 1;
        }
        let email = Channel::Email.name();
        if let Some(mailer) = &self.mailer
            && !done.contains(&email)
        {
            match &known.recipient {
                None => problems.push(Problem::Waiting(
                    "the user's email address is not known yet".to_owned(),
                )),
                Some(address) => match mailer.send(address, &outgoing).await {
                    Ok(()) => {
                        self.store
                            .record(&record(email.clone(), Some(address.clone())))
                            .await?;
                        sent += 1;
                    }
                    Err(error) => problems.push(Problem::Failed(error.to_string())),
                },
            }
        }
        if let Some(sender) = &self.webhooks {
            for hook in &known.webhooks {
                let channel = Channel::Webhook(hook.id).name();
                if done.contains(&channel) {
                    continue;
                }
                match sender.send(&hook.url, &hook.secret, &outgoing).await {
                    Ok(()) => {
                        self.store
                            .record(&record(channel, Some(hook.url.clone())))
                            .await?;
                        sent += 1;
                    }
                    Err(error) => problems.push(Problem::Failed(error.to_string())),
                }
            }
        }
        let outcome = match problems.into_iter().next() {
            None => Ok(()),
            Some(problem) => Err(problem),
        };
        Ok((log_record, sent, outcome))
    }

    /// Dead-letters the message and lets its order move on.
    async fn dead_letter(
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
        .map_err(|e| Problem::Failed(e.to_string()))?;
        if let Some((order_id, version)) = order {
            let mut tx = self.store.pool().begin().await?;
            store::lock_order(&mut tx, order_id).await?;
            store::finish_version(&mut tx, order_id, version).await?;
            tx.commit().await?;
        }
        tracing::error!(consumer, reason, attempts, last_error, subject = %message.subject, "message dead-lettered");
        Ok(())
    }

    /// After a failed or waiting attempt: NAK with a delay, or dead-letter
    /// and terminate once the message has failed `max_deliver` times or
    /// waited `max_wait` for its order's previous event.
    async fn retry_or_give_up(
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
                // Predecessors come back within an ack wait: poll gently,
                // without growing the delay as for failures.
                Ok(waited) => (
                    waited >= self.max_wait,
                    "waited too long",
                    self.backoff.delay(0),
                ),
                Err(error) => {
                    tracing::warn!(%error, "cannot note the wait; retrying");
                    (false, "", self.backoff.delay(0))
                }
            },
            Problem::Failed(text) => {
                match self
                    .store
                    .count_failure(consumer, decoded.event_id, text)
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
            let finishes = match problem {
                Problem::Waiting(_) => None,
                Problem::Failed(_) => decoded.order,
            };
            return match self
                .dead_letter(
                    message,
                    consumer,
                    reason,
                    attempts,
                    problem.text(),
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
                    tracing::warn!(error = e.text(), "cannot dead-letter; will retry");
                    AckKind::Nak(Some(self.backoff.delay(0)))
                }
            };
        }
        tracing::warn!(
            %subject,
            event_id = %decoded.event_id,
            attempts,
            ?delay,
            problem = problem.text(),
            "notification not delivered yet; retrying"
        );
        AckKind::Nak(Some(delay))
    }

    /// Handles one message: ack, NAK with delay, or dead-letter and terminate.
    pub async fn handle(&self, consumer: &str, message: jetstream::Message) {
        // Continue the trace the relay put in the message headers.
        let span = tracing::info_span!(
            "notification.handle",
            otel.name = "notification handle",
            otel.kind = "consumer",
            consumer,
            subject = %message.subject,
        );
        let parent = message
            .headers
            .as_ref()
            .and_then(|h| h.get(messaging::headers::TRACEPARENT))
            .map(ToString::to_string);
        platform::trace::set_parent(&span, platform::trace::from_traceparent(parent.as_deref()));
        tracing::Instrument::instrument(self.handle_traced(consumer, message), span).await;
    }

    async fn handle_traced(&self, consumer: &str, message: jetstream::Message) {
        let subject = message.subject.as_str().to_owned();
        let attempts = message.info().map_or(1, |i| i.delivered);
        let redriven = message
            .headers
            .as_ref()
            .is_some_and(|h| h.get(dlq::headers::REDRIVEN_FROM).is_some());
        let mut duplicate = false;
        let outcome = match decode(&subject, &message.payload) {
            Ok(None) => AckKind::Ack,
            Err(error) => {
                match self
                    .dead_letter(
                        &message,
                        consumer,
                        "undecodable",
                        attempts,
                        &error.to_string(),
                        None,
                    )
                    .await
                {
                    Ok(()) => AckKind::Term,
                    Err(problem) => {
                        tracing::warn!(error = problem.text(), "cannot dead-letter; will retry");
                        AckKind::Nak(Some(self.backoff.delay(0)))
                    }
                }
            }
            Ok(Some(decoded)) => match self.process(&subject, &decoded, redriven).await {
                Ok(was_duplicate) => {
                    duplicate = was_duplicate;
                    if attempts > 1
                        && let Err(error) =
                            self.store.forget_failures(consumer, decoded.event_id).await
                    {
                        tracing::debug!(%error, "failure count left behind");
                    }
                    if !self.pause_before_ack.is_zero() {
                        tokio::time::sleep(self.pause_before_ack).await;
                    }
                    AckKind::Ack
                }
                Err(problem) => {
                    self.retry_or_give_up(consumer, &message, &decoded, attempts, &problem)
                        .await
                }
            },
        };
        let counted = match &outcome {
            AckKind::Ack if !self.store_known(&subject) => "ignored",
            // Redelivered (a crash before the ack, a republish): done before.
            AckKind::Ack if duplicate => "duplicate",
            AckKind::Ack => "delivered",
            AckKind::Term => "dead_lettered",
            _ => "retried",
        };
        self.metrics.event_consumed(&subject, counted);
        if attempts > 1 {
            self.metrics.consumer_redelivery(consumer);
        }
        if let Err(error) = message.ack_with(outcome).await {
            tracing::warn!(%error, %subject, "ack failed; the message will be redelivered");
        }
    }
}

/// The lane of a message: by order, so one order's messages are handled one
/// at a time and in stream order, while different orders go in parallel.
fn lane_of(subject: &str, payload: &[u8], lanes: usize) -> usize {
    use std::hash::{Hash as _, Hasher as _};
    let key = match decode(subject, payload) {
        Ok(Some(Decoded {
            order: Some((order, _)),
            ..
        })) => order,
        Ok(Some(decoded)) => decoded.event_id,
        _ => return 0,
    };
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    key.hash(&mut hasher);
    (hasher.finish() % lanes as u64) as usize
}

/// Consumes one durable consumer until `shutdown`, resubscribing after
/// connection trouble. Messages are handled in `deliverer.lanes` lanes at
/// once, each order always in the same lane: in order per order (ADR 9),
/// in parallel across orders. A full lane holds back the pull (bounded
/// memory); on shutdown each lane finishes the message it holds.
pub async fn run(consumer: PullConsumer, deliverer: Deliverer, shutdown: CancellationToken) {
    let name = consumer.cached_info().name.clone();
    let lanes = deliverer.lanes.max(1);
    let mut senders = Vec::with_capacity(lanes);
    let mut workers = Vec::with_capacity(lanes);
    for _ in 0..lanes {
        let (sender, mut receiver) = tokio::sync::mpsc::channel::<jetstream::Message>(32);
        let (deliverer, name, shutdown) = (deliverer.clone(), name.clone(), shutdown.clone());
        workers.push(tokio::spawn(async move {
            while let Some(message) = receiver.recv().await {
                if shutdown.is_cancelled() {
                    break;
                }
                deliverer.handle(&name, message).await;
            }
        }));
        senders.push(sender);
    }
    'outer: while !shutdown.is_cancelled() {
        match consumer.messages().await {
            Ok(mut messages) => loop {
                let next = tokio::select! {
                    () = shutdown.cancelled() => break 'outer,
                    next = messages.next() => next,
                };
                match next {
                    Some(Ok(message)) => {
                        let lane = lane_of(message.subject.as_str(), &message.payload, lanes);
                        tokio::select! {
                            () = shutdown.cancelled() => break 'outer,
                            sent = senders[lane].send(message) => {
                                if sent.is_err() {
                                    break 'outer;
                                }
                            }
                        }
                    }
                    Some(Err(error)) => {
                        tracing::warn!(consumer = %name, %error, "consumer stream error");
                        break;
                    }
                    None => break,
                }
            },
            Err(error) => tracing::warn!(consumer = %name, %error, "cannot pull messages"),
        }
        tokio::select! {
            () = shutdown.cancelled() => {}
            () = tokio::time::sleep(Duration::from_millis(500)) => {}
        }
    }
    // Unacknowledged messages still queued are redelivered after ack_wait.
    drop(senders);
    for worker in workers {
        let _ = worker.await;
    }
    tracing::info!(consumer = %name, "consumer stopped");
}
