//! The notification domain: which events cause which notifications, their
//! wording, and the channels they go out on. Pure: no I/O, no async, no
//! framework types.

use uuid::Uuid;

/// How a notification reaches its user.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Channel {
    /// Written to the service log (the local stack's default).
    Log,
    /// Sent to the user's email address over SMTP.
    Email,
    /// POSTed to one of the user's registered endpoints.
    Webhook(Uuid),
}

impl Channel {
    /// The stored name: `log`, `email`, `webhook:<id>`. One notification per
    /// (event, channel name).
    #[must_use]
    pub fn name(self) -> String {
        match self {
            Self::Log => "log".to_owned(),
            Self::Email => "email".to_owned(),
            Self::Webhook(id) => format!("webhook:{id}"),
        }
    }
}

/// An event a user is told about.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Trigger {
    UserCreated {
        user_id: Uuid,
        email: String,
    },
    OrderCreated {
        order_id: Uuid,
        user_id: Uuid,
        item_count: u64,
        currency: String,
        total_minor: i64,
    },
    OrderPaid {
        order_id: Uuid,
        user_id: Uuid,
        currency: String,
        amount_minor: i64,
        payment_reference: String,
    },
    OrderShipped {
        order_id: Uuid,
        user_id: Uuid,
        carrier: String,
        tracking_number: String,
        item_count: u64,
        destination: String,
    },
    OrderCancelled {
        order_id: Uuid,
        user_id: Uuid,
        reason: String,
        currency: String,
        refund_minor: i64,
    },
}

/// A rendered message for one user.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    pub user_id: Uuid,
    pub subject: String,
    pub body: String,
}

/// Formats minor units with two decimals: `123456, "EUR"` -> `1234.56 EUR`.
#[must_use]
pub fn format_money(minor: i64, currency: &str) -> String {
    let sign = if minor < 0 { "-" } else { "" };
    let abs = minor.unsigned_abs();
    format!("{sign}{}.{:02} {currency}", abs / 100, abs % 100)
}

fn plural(n: u64) -> &'static str {
    if n == 1 { "" } else { "s" }
}

impl Trigger {
    /// The user this is for.
    #[must_use]
    pub fn user_id(&self) -> Uuid {
        match self {
            Self::UserCreated { user_id, .. }
            | Self::OrderCreated { user_id, .. }
            | Self::OrderPaid { user_id, .. }
            | Self::OrderShipped { user_id, .. }
            | Self::OrderCancelled { user_id, .. } => *user_id,
        }
    }

    /// The order this is about, if any (notifications of one order go out
    /// in event order).
    #[must_use]
    pub fn order_id(&self) -> Option<Uuid> {
        match self {
            Self::UserCreated { .. } => None,
            Self::OrderCreated { order_id, .. }
            | Self::OrderPaid { order_id, .. }
            | Self::OrderShipped { order_id, .. }
            | Self::OrderCancelled { order_id, .. } => Some(*order_id),
        }
    }

    /// The notification this event causes.
    #[must_use]
    pub fn render(&self) -> Message {
        let (subject, body) = match self {
            Self::UserCreated { email, .. } => (
                "Welcome to the shop".to_owned(),
                format!("Hello {email}, your account is ready."),
            ),
            Self::OrderCreated {
                order_id,
                item_count,
                currency,
                total_minor,
                ..
            } => (
                format!("Order {order_id} confirmed"),
                format!(
                    "We received your order of {item_count} item{} totalling {}.",
                    plural(*item_count),
                    format_money(*total_minor, currency)
                ),
            ),
            Self::OrderPaid {
                order_id,
                currency,
                amount_minor,
                payment_reference,
                ..
            } => (
                format!("Receipt for order {order_id}"),
                format!(
                    "We received your payment of {} (reference {payment_reference}).",
                    format_money(*amount_minor, currency)
                ),
            ),
            Self::OrderShipped {
                order_id,
                carrier,
                tracking_number,
                item_count,
                destination,
                ..
            } => (
                format!("Order {order_id} has shipped"),
                format!(
                    "{item_count} item{} left our warehouse for {destination} with {carrier}, \
                     tracking number {tracking_number}.",
                    plural(*item_count)
                ),
            ),
            Self::OrderCancelled {
                order_id,
                reason,
                currency,
                refund_minor,
                ..
            } => (
                format!("Order {order_id} cancelled"),
                if *refund_minor > 0 {
                    format!(
                        "Your order was cancelled ({reason}). We are refunding {}.",
                        format_money(*refund_minor, currency)
                    )
                } else {
                    format!("Your order was cancelled ({reason}).")
                },
            ),
        };
        Message {
            user_id: self.user_id(),
            subject,
            body,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ORDER: Uuid = Uuid::from_u128(7);
    const USER: Uuid = Uuid::from_u128(1);

    #[test]
    fn money_is_formatted_with_two_decimals() {
        assert_eq!(format_money(123_456, "EUR"), "1234.56 EUR");
        assert_eq!(format_money(5, "USD"), "0.05 USD");
        assert_eq!(format_money(-250, "EUR"), "-2.50 EUR");
    }

    #[test]
    fn an_order_confirmation_names_order_and_total() {
        let message = Trigger::OrderCreated {
            order_id: ORDER,
            user_id: USER,
            item_count: 3,
            currency: "EUR".to_owned(),
            total_minor: 3000,
        }
        .render();
        assert!(message.subject.contains(&ORDER.to_string()));
        assert_eq!(
            message.body,
            "We received your order of 3 items totalling 30.00 EUR."
        );
    }

    #[test]
    fn a_shipping_notice_carries_carrier_and_tracking() {
        let message = Trigger::OrderShipped {
            order_id: ORDER,
            user_id: USER,
            carrier: "DHL".to_owned(),
            tracking_number: "JD01".to_owned(),
            item_count: 1,
            destination: "London, GB".to_owned(),
        }
        .render();
        assert_eq!(
            message.body,
            "1 item left our warehouse for London, GB with DHL, tracking number JD01."
        );
    }

    #[test]
    fn a_cancellation_mentions_a_refund_only_when_one_is_due() {
        let cancel = |refund_minor| Trigger::OrderCancelled {
            order_id: ORDER,
            user_id: USER,
            reason: "changed my mind".to_owned(),
            currency: "EUR".to_owned(),
            refund_minor,
        };
        assert!(cancel(1999).render().body.contains("refunding 19.99 EUR"));
        assert!(!cancel(0).render().body.contains("refund"));
    }

    #[test]
    fn channel_names_are_unique_per_endpoint() {
        assert_eq!(Channel::Log.name(), "log");
        assert_ne!(
            Channel::Webhook(Uuid::from_u128(1)).name(),
            Channel::Webhook(Uuid::from_u128(2)).name()
        );
    }
}
