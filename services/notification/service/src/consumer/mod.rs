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
//!
//! Decoding is in [`decode`], delivery and the ordering gate in `deliver`,
//! retries and dead letters in `failures`; this module holds the loop.

mod decode;
mod deliver;
mod failures;

pub use decode::{DecodeError, Decoded, SUBJECTS, decode};

use std::time::Duration;

use async_nats::jetstream::{self, AckKind, consumer::PullConsumer};
use futures::StreamExt as _;
use messaging::dlq;
use resilience::Backoff;
use tokio_util::sync::CancellationToken;

use crate::{
    channels::{Mailer, WebhookSender},
    store::NotificationStore,
};

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
        decode::SUBJECTS.contains(&subject)
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
                        tracing::warn!(error = %problem, "cannot dead-letter; will retry");
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
