//! The notification domain: which events cause which notifications, and
//! their wording. Pure: no I/O, no async, no framework types.

use uuid::Uuid;

/// How a notification reaches its user.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Channel {
    /// Written to the service log (the local stack's default).
    Log,
}

impl Channel {
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Log => "log",
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
        item_count: usize,
        currency: String,
        total_minor: i64,
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

impl Trigger {
    /// The notification this event causes.
    #[must_use]
    pub fn render(&self) -> Message {
        match self {
            Self::UserCreated { user_id, email } => Message {
                user_id: *user_id,
                subject: "Welcome to the shop".to_owned(),
                body: format!("Hello {email}, your account is ready."),
            },
            Self::OrderCreated {
                order_id,
                user_id,
                item_count,
                currency,
                total_minor,
            } => Message {
                user_id: *user_id,
                subject: format!("Order {order_id} confirmed"),
                body: format!(
                    "We received your order of {item_count} item{} totalling {}.",
                    if *item_count == 1 { "" } else { "s" },
                    format_money(*total_minor, currency)
                ),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn money_is_formatted_with_two_decimals() {
        assert_eq!(format_money(123_456, "EUR"), "1234.56 EUR");
        assert_eq!(format_money(5, "USD"), "0.05 USD");
        assert_eq!(format_money(-250, "EUR"), "-2.50 EUR");
    }

    #[test]
    fn an_order_confirmation_names_order_and_total() {
        let order_id = Uuid::from_u128(7);
        let message = Trigger::OrderCreated {
            order_id,
            user_id: Uuid::from_u128(1),
            item_count: 3,
            currency: "EUR".to_owned(),
            total_minor: 3000,
        }
        .render();
        assert!(message.subject.contains(&order_id.to_string()));
        assert_eq!(
            message.body,
            "We received your order of 3 items totalling 30.00 EUR."
        );
    }
}
