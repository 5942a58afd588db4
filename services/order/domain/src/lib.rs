//! The order domain: value types, the [`Order`] aggregate, its commands and
//! events. Pure: no I/O, no async, no framework types. All rules live in
//! [`Order::handle`](es::Aggregate::handle); `apply` only changes state.

mod values;

pub use values::{Currency, CurrencyError, LineError, OrderLine, Quantity, Sku, UnitPrice};

use es::{Aggregate, DomainEvent};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// Most lines one order may have.
pub const MAX_LINES: usize = 100;

/// Where an order is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OrderStatus {
    Created,
    Paid,
    Shipped,
    Delivered,
    Cancelled,
}

impl std::fmt::Display for OrderStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Created => "created",
            Self::Paid => "paid",
            Self::Shipped => "shipped",
            Self::Delivered => "delivered",
            Self::Cancelled => "cancelled",
        })
    }
}

/// What a caller asks of an order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OrderCommand {
    /// Place a new order.
    Create {
        order_id: Uuid,
        user_id: Uuid,
        currency: Currency,
        lines: Vec<OrderLine>,
    },
}

/// What happened to an order. Stored as JSON; `type` is the tag.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum OrderEvent {
    /// An order was placed.
    Created {
        order_id: Uuid,
        user_id: Uuid,
        currency: Currency,
        lines: Vec<OrderLine>,
        total_minor: i64,
    },
}

impl DomainEvent for OrderEvent {
    fn event_type(&self) -> &'static str {
        match self {
            Self::Created { .. } => "order.created",
        }
    }
}

/// Why an order command was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OrderError {
    #[error("order already exists (status {status})")]
    AlreadyExists { status: OrderStatus },
    #[error("an order needs at least one line")]
    NoLines,
    #[error("an order may have at most {MAX_LINES} lines")]
    TooManyLines,
    #[error("order total exceeds the largest amount we can represent")]
    TotalOverflow,
}

/// The order aggregate: the state needed to decide commands, folded from
/// its events.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Order {
    pub id: Option<Uuid>,
    pub user_id: Option<Uuid>,
    pub status: Option<OrderStatus>,
    pub currency: Option<Currency>,
    pub lines: Vec<OrderLine>,
    pub total_minor: i64,
    /// Number of events applied.
    pub version: i64,
}

/// Sum of `quantity * unit_price` over `lines`, or `None` on overflow.
#[must_use]
pub fn total_minor(lines: &[OrderLine]) -> Option<i64> {
    lines.iter().try_fold(0_i64, |sum, line| {
        line.unit_price
            .minor()
            .checked_mul(i64::from(line.quantity.get()))
            .and_then(|amount| sum.checked_add(amount))
    })
}

impl Aggregate for Order {
    type Command = OrderCommand;
    type Event = OrderEvent;
    type Error = OrderError;

    const STREAM_PREFIX: &'static str = "order";

    fn handle(&self, command: OrderCommand) -> Result<Vec<OrderEvent>, OrderError> {
        match command {
            OrderCommand::Create {
                order_id,
                user_id,
                currency,
                lines,
            } => {
                if let Some(status) = self.status {
                    return Err(OrderError::AlreadyExists { status });
                }
                if lines.is_empty() {
                    return Err(OrderError::NoLines);
                }
                if lines.len() > MAX_LINES {
                    return Err(OrderError::TooManyLines);
                }
                let total_minor = total_minor(&lines).ok_or(OrderError::TotalOverflow)?;
                Ok(vec![OrderEvent::Created {
                    order_id,
                    user_id,
                    currency,
                    lines,
                    total_minor,
                }])
            }
        }
    }

    fn apply(&mut self, event: &OrderEvent) {
        match event {
            OrderEvent::Created {
                order_id,
                user_id,
                currency,
                lines,
                total_minor,
            } => {
                self.id = Some(*order_id);
                self.user_id = Some(*user_id);
                self.status = Some(OrderStatus::Created);
                self.currency = Some(currency.clone());
                self.lines.clone_from(lines);
                self.total_minor = *total_minor;
            }
        }
        self.version += 1;
    }
}

#[cfg(test)]
mod tests;
