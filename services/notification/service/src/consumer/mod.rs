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

use deliver::Item;
use failures::Problem;

/// A message as a lane receives it, decoded once.
pub type Received = (jetstream::Message, Result<Option<Decoded>, DecodeError>);

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
    /// Most messages one lane handles in one transaction.
    pub batch: usize,
    /// The consumers' ack wait: a batch still in progress says so every
    /// third of it.
    pub ack_wait: Duration,
    pub pause_before_ack: Duration,
    pub metrics: platform::metrics::Metrics,
}

impl Deliverer {
    /// Whether this service acts on `subject` at all.
    fn store_known(&self, subject: &str) -> bool {
        decode::SUBJECTS.contains(&subject)
    }

    /// The span of one message, continuing the trace the relay put in its
    /// headers.
    fn span_of(consumer: &str, message: &jetstream::Message) -> tracing::Span {
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
        span
    }

    /// Handles a batch of one lane's messages, in their order: each is
    /// acked, NAKed with a delay, or dead-lettered and terminated. The
    /// decodable ones are processed in one transaction ([`Self::process`]).
    pub async fn handle(&self, consumer: &str, received: Vec<Received>) {
        let (messages, decodes): (Vec<_>, Vec<_>) = received.into_iter().unzip();
        self.metrics.consumer_batch(consumer, messages.len());
        let spans: Vec<tracing::Span> = messages
            .iter()
            .map(|message| Self::span_of(consumer, message))
            .collect();
        let mut outcomes: Vec<Option<AckKind>> = vec![None; messages.len()];
        let mut decoded = Vec::with_capacity(messages.len());
        for (index, (message, decoded_now)) in messages.iter().zip(decodes).enumerate() {
            match decoded_now {
                Ok(None) => outcomes[index] = Some(AckKind::Ack),
                Ok(Some(event)) => decoded.push((index, event)),
                Err(error) => {
                    let error = error.to_string();
                    let dead = self.dead_letter(
                        message,
                        consumer,
                        "undecodable",
                        attempts_of(message),
                        &error,
                        None,
                    );
                    outcomes[index] = Some(
                        match tracing::Instrument::instrument(dead, spans[index].clone()).await {
                            Ok(()) => AckKind::Term,
                            Err(problem) => {
                                tracing::warn!(error = %problem, "cannot dead-letter; will retry");
                                AckKind::Nak(Some(self.backoff.delay(0)))
                            }
                        },
                    );
                }
            }
        }
        let items: Vec<Item<'_>> = decoded
            .iter()
            .map(|(index, event)| {
                let message = &messages[*index];
                Item {
                    subject: message.subject.as_str(),
                    decoded: event,
                    redriven: message
                        .headers
                        .as_ref()
                        .is_some_and(|h| h.get(dlq::headers::REDRIVEN_FROM).is_some()),
                    span: &spans[*index],
                }
            })
            .collect();
        let in_flight: Vec<&jetstream::Message> =
            decoded.iter().map(|(index, _)| &messages[*index]).collect();
        let batch = tracing::info_span!("notification.batch", consumer, size = items.len());
        let work = tracing::Instrument::instrument(self.process_each(&items), batch);
        let results = self.keeping_in_progress(&in_flight, work).await;
        let mut duplicates = vec![false; messages.len()];
        for ((index, event), result) in decoded.iter().zip(&results) {
            let message = &messages[*index];
            let result = result.as_ref().map(|duplicate| *duplicate);
            let settle = self.settle(consumer, message, event, result);
            let (outcome, duplicate) =
                tracing::Instrument::instrument(settle, spans[*index].clone()).await;
            outcomes[*index] = Some(outcome);
            duplicates[*index] = duplicate;
        }
        // A test's window between the work and its acks (a crash in it
        // must cause redeliveries that are recognised as duplicates).
        if !self.pause_before_ack.is_zero() && !decoded.is_empty() {
            tokio::time::sleep(self.pause_before_ack).await;
        }
        for ((message, outcome), (span, duplicate)) in messages
            .into_iter()
            .zip(outcomes)
            .zip(spans.into_iter().zip(duplicates))
        {
            let outcome = outcome.unwrap_or(AckKind::Nak(None));
            let ack = self.acknowledge(consumer, message, outcome, duplicate);
            tracing::Instrument::instrument(ack, span).await;
        }
    }

    /// Processes `items` as one batch; when the batch fails as a whole
    /// (one item's storage error rolls back all), each item alone, so one
    /// item's failure is neither counted against the others nor holds them
    /// back. Not during an outage: every item would only fail again.
    async fn process_each(&self, items: &[Item<'_>]) -> Vec<Result<bool, Problem>> {
        if items.is_empty() {
            return Vec::new();
        }
        match self.process(items).await {
            Ok(each) => each,
            Err(problem) if items.len() == 1 => vec![Err(problem)],
            Err(problem) if problem.is_outage() => {
                items.iter().map(|_| Err(problem.again())).collect()
            }
            Err(problem) => {
                tracing::debug!(%problem, size = items.len(), "batch failed; one message at a time");
                let mut each = Vec::with_capacity(items.len());
                for item in items {
                    each.push(match self.process(std::slice::from_ref(item)).await {
                        Ok(mut one) => one
                            .pop()
                            .unwrap_or_else(|| Err(Problem::Waiting("not handled".to_owned()))),
                        Err(problem) => Err(problem),
                    });
                }
                each
            }
        }
    }

    /// Runs `work`, telling the server every third of the ack wait that
    /// `messages` are still being worked on: a batch held up by a slow
    /// endpoint is not redelivered to another replica meanwhile.
    async fn keeping_in_progress<T>(
        &self,
        messages: &[&jetstream::Message],
        work: impl std::future::Future<Output = T>,
    ) -> T {
        let every = (self.ack_wait / 3).max(Duration::from_millis(100));
        let mut ticks = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
        tokio::pin!(work);
        loop {
            tokio::select! {
                done = &mut work => return done,
                _ = ticks.tick() => {
                    for message in messages {
                        if let Err(error) = message.ack_with(AckKind::Progress).await {
                            tracing::debug!(%error, "cannot extend the ack wait");
                        }
                    }
                }
            }
        }
    }

    /// What a processed message becomes: its ack, and whether it was a
    /// duplicate.
    async fn settle(
        &self,
        consumer: &str,
        message: &jetstream::Message,
        decoded: &Decoded,
        result: Result<bool, &Problem>,
    ) -> (AckKind, bool) {
        let attempts = attempts_of(message);
        match result {
            Ok(duplicate) => {
                if attempts > 1
                    && let Err(error) = self.store.forget_failures(consumer, decoded.event_id).await
                {
                    tracing::debug!(%error, "failure count left behind");
                }
                (AckKind::Ack, duplicate)
            }
            Err(problem) => (
                self.retry_or_give_up(consumer, message, decoded, attempts, problem)
                    .await,
                false,
            ),
        }
    }

    /// Counts the outcome and acks, NAKs or terminates the message.
    async fn acknowledge(
        &self,
        consumer: &str,
        message: jetstream::Message,
        outcome: AckKind,
        duplicate: bool,
    ) {
        let subject = message.subject.as_str();
        let counted = match &outcome {
            AckKind::Ack if !self.store_known(subject) => "ignored",
            // Redelivered (a crash before the ack, a republish): done before.
            AckKind::Ack if duplicate => "duplicate",
            AckKind::Ack => "delivered",
            AckKind::Term => "dead_lettered",
            _ => "retried",
        };
        self.metrics.event_consumed(subject, counted);
        let attempts = attempts_of(&message);
        if attempts > 1 {
            self.metrics.consumer_redelivery(consumer);
        }
        if let Err(error) = message.ack_with(outcome).await {
            tracing::warn!(%error, %subject, "ack failed; the message will be redelivered");
        }
    }
}

/// How many times the server has delivered `message` (1: the first time).
fn attempts_of(message: &jetstream::Message) -> i64 {
    message.info().map_or(1, |i| i.delivered)
}

/// The lane of a message: by order, so one order's messages are handled one
/// at a time and in stream order, while different orders go in parallel.
fn lane_of(decoded: &Result<Option<Decoded>, DecodeError>, lanes: usize) -> usize {
    use std::hash::{Hash as _, Hasher as _};
    let key = match decoded {
        Ok(Some(Decoded {
            order: Some((order, _)),
            ..
        })) => order,
        Ok(Some(decoded)) => &decoded.event_id,
        _ => return 0,
    };
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    key.hash(&mut hasher);
    (hasher.finish() % lanes as u64) as usize
}

/// Consumes one durable consumer until `shutdown`, resubscribing after
/// connection trouble. Messages are handled in `deliverer.lanes` lanes at
/// once, each order always in the same lane: in order per order (ADR 9),
/// in parallel across orders; each lane takes what has queued in it as one
/// batch (at most `deliverer.batch`). A full lane holds back the pull
/// (bounded memory); on shutdown each lane finishes the batch it holds.
pub async fn run(consumer: PullConsumer, deliverer: Deliverer, shutdown: CancellationToken) {
    let name = consumer.cached_info().name.clone();
    let lanes = deliverer.lanes.max(1);
    let batch = deliverer.batch.max(1);
    let mut senders = Vec::with_capacity(lanes);
    let mut workers = Vec::with_capacity(lanes);
    for _ in 0..lanes {
        let (sender, mut receiver) = tokio::sync::mpsc::channel::<Received>(batch);
        let (deliverer, name, shutdown) = (deliverer.clone(), name.clone(), shutdown.clone());
        workers.push(tokio::spawn(async move {
            let mut messages = Vec::with_capacity(batch);
            // Whatever has queued up while the last batch was handled is the
            // next batch: one message when idle, up to `batch` under load.
            while receiver.recv_many(&mut messages, batch).await > 0 {
                if shutdown.is_cancelled() {
                    // Back to the server at once, not after the ack wait.
                    for (message, _) in messages.drain(..) {
                        let _ = message.ack_with(AckKind::Nak(None)).await;
                    }
                    break;
                }
                deliverer.handle(&name, std::mem::take(&mut messages)).await;
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
                        let decoded = decode(message.subject.as_str(), &message.payload);
                        let lane = lane_of(&decoded, lanes);
                        tokio::select! {
                            () = shutdown.cancelled() => break 'outer,
                            sent = senders[lane].send((message, decoded)) => {
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
