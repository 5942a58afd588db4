//! The one mapping from this service's errors to `Status`. Storage errors
//! arrive classified ([`platform::db::StorageError`]): UNAVAILABLE when the
//! database could not be reached, INTERNAL otherwise, wherever they come
//! from (loading, appending, reading a model, the audit trail).

use es_postgres::AppendError;
use order_domain::OrderError;
use platform::status;
use tonic::Status;
use uuid::Uuid;

use crate::{commands::CommandError, history::HistoryError, queries::QueryError};

impl From<CommandError> for Status {
    fn from(error: CommandError) -> Self {
        match error {
            CommandError::Rejected(rejected) => rejected_status(&rejected),
            CommandError::NotFound(_) => Status::not_found(error.to_string()),
            CommandError::WrongVersion { .. } | CommandError::Conflict(_) => {
                Status::aborted(error.to_string())
            }
            CommandError::KeyReused => status::invalid_argument(
                "idempotency_key",
                "was already used for a different request",
            ),
            CommandError::Decode(e) => status::internal(&e),
            CommandError::Store(e) | CommandError::Append(AppendError::Database(e)) => e.into(),
            CommandError::Append(e) => status::internal(&e),
        }
    }
}

fn rejected_status(rejected: &OrderError) -> Status {
    match rejected {
        OrderError::AlreadyExists { .. } => Status::already_exists(rejected.to_string()),
        OrderError::NotFound => Status::not_found(rejected.to_string()),
        OrderError::NoLines | OrderError::TooManyLines | OrderError::TotalOverflow => {
            status::invalid_argument("items", rejected)
        }
        OrderError::AmountMismatch { .. } => status::invalid_argument("amount_minor", rejected),
        OrderError::InvalidTransition { .. } | OrderError::NoShippingAddress { .. } => {
            Status::failed_precondition(rejected.to_string())
        }
    }
}

impl From<QueryError> for Status {
    fn from(error: QueryError) -> Self {
        match error {
            QueryError::NotCaughtUp(_) => Status::unavailable(error.to_string()),
            QueryError::UnknownPosition(_) => status::invalid_argument("min_position", &error),
            QueryError::Database(e) => e.into(),
            QueryError::Corrupt(e) => status::internal(&e),
        }
    }
}

impl From<HistoryError> for Status {
    fn from(error: HistoryError) -> Self {
        match error {
            HistoryError::Store(e) => e.into(),
            HistoryError::Decode(e) => status::internal(&e),
        }
    }
}

/// A missing order, and another user's: ids leak nothing.
pub(super) fn not_found(order_id: Uuid) -> Status {
    Status::not_found(format!("order {order_id} not found"))
}
