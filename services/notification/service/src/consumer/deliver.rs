//! Delivery of a batch of decoded events: the per-order ordering gate, then
//! every channel not yet recorded for each event, each email or webhook
//! success recorded at once.

use std::collections::HashMap;

use notification_domain::{Channel, Trigger};
use uuid::Uuid;

use super::{Deliverer, decode::Decoded, failures::Problem};
use crate::{
    channels::Outgoing,
    store::{self, Delivered},
};

/// Orders of one batch whose emails and webhooks go out at once.
const CONCURRENT_GROUPS: usize = 8;

/// One decoded message of a batch.
pub(super) struct Item<'a> {
    pub(super) subject: &'a str,
    pub(super) decoded: &'a Decoded,
    /// A redriven dead letter skips the ordering gate: its order has moved
    /// on, and it is delivered late, once.
    pub(super) redriven: bool,
    /// The message's span (it continues the relay's trace).
    pub(super) span: &'a tracing::Span,
}

/// An item with what was read for it and what it renders to.
struct Prepared<'i, 'a> {
    item: &'i Item<'a>,
    known: &'i store::Known,
    rendered: Option<(&'i Trigger, &'i notification_domain::Message)>,
}

/// What handling one item came to.
struct Handled {
    result: Result<bool, Problem>,
    /// The log channel's record, written with the batch.
    log: Option<Delivered>,
    /// The order's version this item finished.
    finished: Option<(Uuid, i64)>,
}

impl Handled {
    fn duplicate() -> Self {
        Self {
            result: Ok(true),
            log: None,
            finished: None,
        }
    }

    fn waiting(why: &str) -> Self {
        Self {
            result: Err(Problem::Waiting(why.to_owned())),
            log: None,
            finished: None,
        }
    }
}

impl Item<'_> {
    /// The order and version the gate checks, if any.
    fn gated(&self) -> Option<(Uuid, i64)> {
        self.decoded.order.filter(|_| !self.redriven)
    }
}

impl Deliverer {
    /// Delivers what each item causes, in one transaction for the batch:
    /// BEGIN, the orders' advisory locks, one read (progress, channels
    /// already done, webhooks, addresses), one write (the log records and
    /// the finished versions), COMMIT: five round trips however many events
    /// (ADR 11). An email or webhook success is recorded at once on its own,
    /// so a later failure never makes it go out twice.
    ///
    /// Each order's items are handled in their order (a later event in the
    /// same batch sees the earlier one finished); different orders' items
    /// are delivered concurrently, so slow endpoints do not queue behind
    /// one another. Per item, `Ok(true)` is a duplicate (everything it
    /// causes was done before). `Err` is the batch's: nothing of it
    /// committed but the recorded emails and webhooks.
    pub(super) async fn process(
        &self,
        items: &[Item<'_>],
    ) -> Result<Vec<Result<bool, Problem>>, Problem> {
        for item in items {
            if let Some(Trigger::UserCreated { user_id, email }) = &item.decoded.trigger {
                self.store.remember_recipient(*user_id, email).await?;
            }
        }
        let rendered: Vec<_> = items
            .iter()
            .map(|item| item.decoded.trigger.as_ref().map(|t| (t, t.render())))
            .collect();
        let wanted: Vec<store::Wanted> = items
            .iter()
            .zip(&rendered)
            .map(|(item, rendered)| store::Wanted {
                order_id: item.gated().map(|(order_id, _)| order_id),
                event_id: item.decoded.event_id,
                user_id: rendered.as_ref().map(|(_, message)| message.user_id),
            })
            .collect();
        let orders: Vec<Uuid> = wanted.iter().filter_map(|w| w.order_id).collect();
        let mut tx = self.store.pool().begin().await?;
        store::lock_orders(&mut tx, &orders).await?;
        let known = store::prepare(
            &mut tx,
            &wanted,
            self.webhooks.is_some(),
            self.mailer.is_some(),
        )
        .await?;
        let batch: Vec<Prepared<'_, '_>> = items
            .iter()
            .zip(&known)
            .zip(&rendered)
            .map(|((item, known), rendered)| Prepared {
                item,
                known,
                rendered: rendered
                    .as_ref()
                    .map(|(trigger, message)| (*trigger, message)),
            })
            .collect();
        // One group per order (per event for events of no order), in batch
        // order. A redriven copy shares its order's group, so it never runs
        // beside its original.
        let mut groups: Vec<Vec<usize>> = Vec::new();
        let mut group_of: HashMap<Uuid, usize> = HashMap::new();
        for (index, item) in items.iter().enumerate() {
            let key = item
                .decoded
                .order
                .map_or(item.decoded.event_id, |(order_id, _)| order_id);
            let group = *group_of.entry(key).or_insert_with(|| {
                groups.push(Vec::new());
                groups.len() - 1
            });
            groups[group].push(index);
        }
        // Bounded: each email or webhook success takes a pool connection to
        // be recorded, beside the one this batch holds.
        let pending: Vec<_> = groups
            .iter()
            .map(|indices| self.process_group(&batch, indices))
            .collect();
        let handled: Vec<_> = futures::StreamExt::collect(futures::StreamExt::buffer_unordered(
            futures::stream::iter(pending),
            CONCURRENT_GROUPS,
        ))
        .await;
        let mut each: Vec<Option<Handled>> = (0..items.len()).map(|_| None).collect();
        for group in handled {
            for (index, result) in group? {
                each[index] = Some(result);
            }
        }
        // Log records in batch order: one order's notifications are
        // numbered in event order.
        let mut logs = Vec::new();
        let mut finished = Vec::new();
        let mut results = Vec::with_capacity(items.len());
        for handled in each {
            let Handled {
                result,
                log,
                finished: done,
            } = handled.unwrap_or_else(|| Handled::waiting("not handled"));
            logs.extend(log);
            finished.extend(done);
            results.push(result);
        }
        store::finish(&mut tx, &logs, &finished).await?;
        tx.commit().await?;
        Ok(results)
    }

    /// Handles one order's items of a batch, in their order.
    async fn process_group(
        &self,
        batch: &[Prepared<'_, '_>],
        indices: &[usize],
    ) -> Result<Vec<(usize, Handled)>, Problem> {
        // The order's last finished version, this batch included.
        // (Read for its gated items; a redriven one is not gated.)
        let mut last = indices
            .iter()
            .find(|index| batch[**index].item.gated().is_some())
            .map_or(0, |index| batch[*index].known.last_version);
        // Copies of one message (redelivered while queued) share a group.
        let mut seen: HashMap<Uuid, bool> = HashMap::new();
        let mut handled = Vec::with_capacity(indices.len());
        for &index in indices {
            let Prepared {
                item,
                known,
                rendered,
            } = &batch[index];
            // A copy follows the first, so a failure is never acked.
            if let Some(&succeeded) = seen.get(&item.decoded.event_id) {
                handled.push((
                    index,
                    if succeeded {
                        Handled::duplicate()
                    } else {
                        Handled::waiting("the same event is being retried")
                    },
                ));
                continue;
            }
            if let Some((order_id, version)) = item.gated() {
                if version <= last {
                    handled.push((index, Handled::duplicate())); // a redelivery
                    continue;
                }
                if version > last + 1 {
                    let wait =
                        format!("event {} of order {order_id} is not finished yet", last + 1);
                    handled.push((index, Handled::waiting(&wait)));
                    continue;
                }
            }
            let (log, sent, outcome) = match rendered {
                Some((trigger, message)) => {
                    tracing::Instrument::instrument(
                        self.deliver(item.subject, item.decoded, trigger, message, known),
                        item.span.clone(),
                    )
                    .await?
                }
                None => (None, 0, Ok(())),
            };
            let duplicate = sent == 0 && !known.delivered_channels.is_empty();
            // The log record commits even when another channel failed (so
            // the log line is not written twice); the version finishes only
            // on success.
            let finished = item.gated().filter(|_| outcome.is_ok());
            if let Some((_, version)) = finished {
                last = version;
            }
            seen.insert(item.decoded.event_id, outcome.is_ok());
            handled.push((
                index,
                Handled {
                    result: outcome.map(|()| duplicate),
                    log,
                    finished,
                },
            ));
        }
        Ok(handled)
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
                    Err(error) => problems.push(error.into()),
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
                    Err(error) => problems.push(error.into()),
                }
            }
        }
        let outcome = match problems.into_iter().next() {
            None => Ok(()),
            Some(problem) => Err(problem),
        };
        Ok((log_record, sent, outcome))
    }
}
