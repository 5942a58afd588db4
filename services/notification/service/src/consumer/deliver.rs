//! Delivery of one decoded event: the per-order ordering gate, then every
//! channel not yet recorded for the event, each success recorded at once.

use notification_domain::{Channel, Trigger};

use super::{Deliverer, decode::Decoded, failures::Problem};
use crate::{
    channels::Outgoing,
    store::{self, Delivered},
};

impl Deliverer {
    /// Delivers what `decoded` causes. A redriven dead letter skips the
    /// ordering gate: its order has moved on, and it is delivered late, once.
    ///
    /// An order event costs five round trips: BEGIN, the order's advisory
    /// lock, one read (progress, channels already done, webhooks, address),
    /// one write (the log record and the finished version), COMMIT. An
    /// email or webhook success is recorded at once on its own, so a later
    /// channel's failure never makes it go out twice.
    /// `Ok(true)` for a duplicate: everything it causes was done before.
    pub(super) async fn process(
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
