//! Helpers for the one mapping from errors to `tonic::Status`: invalid input
//! becomes INVALID_ARGUMENT with a field violation per bad field (standard
//! `google.rpc.BadRequest` details), infrastructure failures become
//! UNAVAILABLE or INTERNAL with the cause logged and never leaked.

use tonic::{Code, Status};
use tonic_types::{ErrorDetails, FieldViolation, StatusExt as _};

/// Bad fields of one request, collected so the caller learns all at once.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct FieldViolations(Vec<(String, String)>);

impl FieldViolations {
    #[must_use]
    pub fn new() -> Self {
        Self::default()
    }

    /// Records that `field` (a path such as `items[2].quantity`) is invalid.
    pub fn add(&mut self, field: impl Into<String>, description: impl ToString) {
        self.0.push((field.into(), description.to_string()));
    }

    /// Keeps the value if `result` is `Ok`, records the violation otherwise.
    pub fn check<T, E: ToString>(
        &mut self,
        field: impl Into<String>,
        result: Result<T, E>,
    ) -> Option<T> {
        match result {
            Ok(value) => Some(value),
            Err(error) => {
                self.add(field, error);
                None
            }
        }
    }

    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// `Ok(())` if no violations were recorded, INVALID_ARGUMENT otherwise.
    ///
    /// # Errors
    ///
    /// The INVALID_ARGUMENT status naming every bad field.
    pub fn into_result(self) -> Result<(), Status> {
        if self.0.is_empty() {
            Ok(())
        } else {
            Err(self.into_status())
        }
    }

    /// INVALID_ARGUMENT whose message and `BadRequest` details name every field.
    #[must_use]
    pub fn into_status(self) -> Status {
        self.into_status_with(Code::InvalidArgument, "invalid request: ")
    }

    /// A status of `code` whose message and `BadRequest` details name every field.
    #[must_use]
    pub fn into_status_with(self, code: Code, prefix: &str) -> Status {
        let message = self
            .0
            .iter()
            .map(|(field, description)| format!("{field}: {description}"))
            .collect::<Vec<_>>()
            .join("; ");
        let violations = self
            .0
            .into_iter()
            .map(|(field, description)| FieldViolation::new(field, description))
            .collect::<Vec<_>>();
        Status::with_error_details(
            code,
            format!("{prefix}{message}"),
            ErrorDetails::with_bad_request(violations),
        )
    }
}

/// INVALID_ARGUMENT for a single field.
#[must_use]
pub fn invalid_argument(field: impl Into<String>, description: impl ToString) -> Status {
    let mut violations = FieldViolations::new();
    violations.add(field, description);
    violations.into_status()
}

/// ALREADY_EXISTS naming the field whose value is taken.
#[must_use]
pub fn already_exists(field: impl Into<String>, description: impl ToString) -> Status {
    let mut violations = FieldViolations::new();
    violations.add(field, description);
    violations.into_status_with(Code::AlreadyExists, "")
}

/// UNAVAILABLE for a dependency that failed; logs the cause, tells the client
/// only what it can act on (retry).
#[must_use]
pub fn unavailable(what: &str, cause: &dyn std::error::Error) -> Status {
    tracing::warn!(error = %cause, dependency = what, "dependency unavailable");
    Status::unavailable(format!("{what} is unavailable; retry later"))
}

/// INTERNAL for a bug; logs the cause, never leaks it.
#[must_use]
pub fn internal(cause: &dyn std::error::Error) -> Status {
    tracing::error!(error = %cause, "internal error");
    Status::internal("internal error")
}

/// UNAVAILABLE when the database could not be reached (retryable), else
/// INTERNAL; the cause goes to the log only.
impl From<crate::db::StorageError> for Status {
    fn from(error: crate::db::StorageError) -> Self {
        if error.is_unavailable() {
            unavailable("database", &error)
        } else {
            internal(&error)
        }
    }
}
