//! The order domain: value types, the [`Order`] aggregate, its commands and
//! events, and the upcasters of old event versions. Pure: no I/O, no async,
//! no framework types. All rules live in [`Order::handle`](es::Aggregate::handle);
//! `apply` only changes state.
//!
//! Lifecycle: `created -> paid -> shipped -> delivered`, and
//! `created | paid -> cancelled`.

mod inputs;
mod upcast;
mod values;

pub use inputs::{Amount, AmountError, IdempotencyKey, KeyError};
pub use upcast::{DecodeError, decode, upcast};
pub use values::{
    AddressLine, CancelReason, Carrier, CountryCode, Currency, CurrencyError, LineError, OrderLine,
    PaymentReference, Quantity, ShippingAddress, Sku, TextError, TrackingNumber, UnitPrice,
};

use es::{Aggregate, DomainEvent};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// Most lines one order may have.
pub const MAX_LINES: usize = 100;

/// Where an order is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OrderStatus {
    Created,
    Paid,
    Shipped,
    Delivered,
    Cancelled,
}

impl OrderStatus {
    /// Every status, in lifecycle order.
    pub const ALL: [Self; 5] = [
        Self::Created,
        Self::Paid,
        Self::Shipped,
        Self::Delivered,
        Self::Cancelled,
    ];

    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Created => "created",
            Self::Paid => "paid",
            Self::Shipped => "shipped",
            Self::Delivered => "delivered",
            Self::Cancelled => "cancelled",
        }
    }

    /// Parses [`OrderStatus::as_str`] back.
    #[must_use]
    pub fn parse(raw: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|s| s.as_str() == raw)
    }
}

impl std::fmt::Display for OrderStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
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
        shipping_address: ShippingAddress,
    },
    /// Record the payment of the whole total.
    Pay {
        payment_reference: PaymentReference,
        amount: Amount,
    },
    /// Hand the paid order to a carrier.
    Ship {
        carrier: Carrier,
        tracking_number: TrackingNumber,
    },
    /// Record that the shipment arrived.
    Deliver,
    /// Cancel an order that has not shipped.
    Cancel { reason: CancelReason },
}

impl OrderCommand {
    /// The verb, for error messages.
    #[must_use]
    pub fn action(&self) -> &'static str {
        match self {
            Self::Create { .. } => "create",
            Self::Pay { .. } => "pay",
            Self::Ship { .. } => "ship",
            Self::Deliver => "deliver",
            Self::Cancel { .. } => "cancel",
        }
    }
}

/// What happened to an order. Stored as JSON; `type` is the tag. Every event
/// names its order and user so a subscriber never needs the order's history.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum OrderEvent {
    /// An order was placed. Schema v2 added `shipping_address` (absent in v1).
    Created {
        order_id: Uuid,
        user_id: Uuid,
        currency: Currency,
        lines: Vec<OrderLine>,
        total_minor: i64,
        shipping_address: Option<ShippingAddress>,
    },
    /// The total was paid.
    Paid {
        order_id: Uuid,
        user_id: Uuid,
        payment_reference: PaymentReference,
        amount_minor: i64,
        currency: Currency,
    },
    /// The order left the warehouse; carries everything a subscriber needs.
    Shipped {
        order_id: Uuid,
        user_id: Uuid,
        carrier: Carrier,
        tracking_number: TrackingNumber,
        currency: Currency,
        lines: Vec<OrderLine>,
        total_minor: i64,
        shipping_address: ShippingAddress,
    },
    /// The shipment arrived.
    Delivered { order_id: Uuid, user_id: Uuid },
    /// The order was cancelled before shipping; `refund_minor` is what was
    /// paid and must be refunded (0 if unpaid).
    Cancelled {
        order_id: Uuid,
        user_id: Uuid,
        reason: CancelReason,
        refund_minor: i64,
        currency: Currency,
    },
}

/// Current schema version of each event type (see [`upcast`]).
pub const CREATED_SCHEMA_VERSION: i32 = 2;

impl DomainEvent for OrderEvent {
    fn event_type(&self) -> &'static str {
        match self {
            Self::Created { .. } => "order.created",
            Self::Paid { .. } => "order.paid",
            Self::Shipped { .. } => "order.shipped",
            Self::Delivered { .. } => "order.delivered",
            Self::Cancelled { .. } => "order.cancelled",
        }
    }

    fn schema_version(&self) -> i32 {
        match self {
            Self::Created { .. } => CREATED_SCHEMA_VERSION,
            _ => 1,
        }
    }
}

/// Why an order command was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OrderError {
    #[error("order already exists (status {status})")]
    AlreadyExists { status: OrderStatus },
    #[error("order does not exist")]
    NotFound,
    #[error("an order needs at least one line")]
    NoLines,
    #[error("an order may have at most {MAX_LINES} lines")]
    TooManyLines,
    #[error("order total exceeds the largest amount we can represent")]
    TotalOverflow,
    #[error("cannot {action} an order whose status is {status}")]
    InvalidTransition {
        action: &'static str,
        status: OrderStatus,
    },
    #[error("amount {got} does not equal the order total {expected}")]
    AmountMismatch { expected: i64, got: i64 },
    #[error("cannot ship an order without a shipping address (status {status})")]
    NoShippingAddress { status: OrderStatus },
}

/// The order aggregate: the state needed to decide commands, folded from
/// its events. Serializable for snapshots.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Order {
    pub id: Option<Uuid>,
    pub user_id: Option<Uuid>,
    pub status: Option<OrderStatus>,
    pub currency: Option<Currency>,
    pub lines: Vec<OrderLine>,
    pub total_minor: i64,
    pub shipping_address: Option<ShippingAddress>,
    pub payment_reference: Option<PaymentReference>,
    pub paid_minor: i64,
    pub carrier: Option<Carrier>,
    pub tracking_number: Option<TrackingNumber>,
    pub cancel_reason: Option<CancelReason>,
    /// Number of events applied.
    pub version: i64,
}

/// Version of [`Order`]'s serialized shape; snapshots of another version are
/// ignored and the stream is replayed instead.
pub const SNAPSHOT_VERSION: i32 = 1;

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

impl Order {
    /// The identity and currency every later event repeats. Only called once
    /// the order exists.
    fn identity(&self) -> Result<(Uuid, Uuid, Currency), OrderError> {
        match (self.id, self.user_id, &self.currency) {
            (Some(id), Some(user), Some(currency)) => Ok((id, user, currency.clone())),
            _ => Err(OrderError::NotFound),
        }
    }

    fn require(
        &self,
        action: &'static str,
        allowed: &[OrderStatus],
    ) -> Result<OrderStatus, OrderError> {
        let status = self.status.ok_or(OrderError::NotFound)?;
        if allowed.contains(&status) {
            Ok(status)
        } else {
            Err(OrderError::InvalidTransition { action, status })
        }
    }
}

impl Aggregate for Order {
    type Command = OrderCommand;
    type Event = OrderEvent;
    type Error = OrderError;

    const STREAM_PREFIX: &'static str = "order";

    fn handle(&self, command: OrderCommand) -> Result<Vec<OrderEvent>, OrderError> {
        let action = command.action();
        let event = match command {
            OrderCommand::Create {
                order_id,
                user_id,
                currency,
                lines,
                shipping_address,
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
                OrderEvent::Created {
                    order_id,
                    user_id,
                    currency,
                    lines,
                    total_minor,
                    shipping_address: Some(shipping_address),
                }
            }
            OrderCommand::Pay {
                payment_reference,
                amount,
            } => {
                self.require(action, &[OrderStatus::Created])?;
                let amount_minor = amount.minor();
                if amount_minor != self.total_minor {
                    return Err(OrderError::AmountMismatch {
                        expected: self.total_minor,
                        got: amount_minor,
                    });
                }
                let (order_id, user_id, currency) = self.identity()?;
                OrderEvent::Paid {
                    order_id,
                    user_id,
                    payment_reference,
                    amount_minor,
                    currency,
                }
            }
            OrderCommand::Ship {
                carrier,
                tracking_number,
            } => {
                let status = self.require(action, &[OrderStatus::Paid])?;
                let shipping_address = self
                    .shipping_address
                    .clone()
                    .ok_or(OrderError::NoShippingAddress { status })?;
                let (order_id, user_id, currency) = self.identity()?;
                OrderEvent::Shipped {
                    order_id,
                    user_id,
                    carrier,
                    tracking_number,
                    currency,
                    lines: self.lines.clone(),
                    total_minor: self.total_minor,
                    shipping_address,
                }
            }
            OrderCommand::Deliver => {
                self.require(action, &[OrderStatus::Shipped])?;
                let (order_id, user_id, _) = self.identity()?;
                OrderEvent::Delivered { order_id, user_id }
            }
            OrderCommand::Cancel { reason } => {
                self.require(action, &[OrderStatus::Created, OrderStatus::Paid])?;
                let (order_id, user_id, currency) = self.identity()?;
                OrderEvent::Cancelled {
                    order_id,
                    user_id,
                    reason,
                    refund_minor: self.paid_minor,
                    currency,
                }
            }
        };
        Ok(vec![event])
    }

    fn apply(&mut self, event: &OrderEvent) {
        match event {
            OrderEvent::Created {
                order_id,
                user_id,
                currency,
                lines,
                total_minor,
                shipping_address,
            } => {
                self.id = Some(*order_id);
                self.user_id = Some(*user_id);
                self.status = Some(OrderStatus::Created);
                self.currency = Some(currency.clone());
                self.lines.clone_from(lines);
                self.total_minor = *total_minor;
                self.shipping_address.clone_from(shipping_address);
            }
            OrderEvent::Paid {
                payment_reference,
                amount_minor,
                ..
            } => {
                self.status = Some(OrderStatus::Paid);
                self.payment_reference = Some(payment_reference.clone());
                self.paid_minor = *amount_minor;
            }
            OrderEvent::Shipped {
                carrier,
                tracking_number,
                ..
            } => {
                self.status = Some(OrderStatus::Shipped);
                self.carrier = Some(carrier.clone());
                self.tracking_number = Some(tracking_number.clone());
            }
            OrderEvent::Delivered { .. } => self.status = Some(OrderStatus::Delivered),
            OrderEvent::Cancelled { reason, .. } => {
                self.status = Some(OrderStatus::Cancelled);
                self.cancel_reason = Some(reason.clone());
            }
        }
        self.version += 1;
    }
}

#[cfg(test)]
mod tests;
