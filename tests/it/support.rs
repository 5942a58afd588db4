//! Assertions shared by the tests.

use tonic::{Code, Status};
use tonic_types::StatusExt as _;

/// Fields named in the status's `BadRequest` details.
pub(crate) fn violated_fields(status: &Status) -> Vec<String> {
    status
        .get_details_bad_request()
        .map(|b| b.field_violations.into_iter().map(|v| v.field).collect())
        .unwrap_or_default()
}

/// Asserts `result` failed with `code` and, if given, names `field`.
#[track_caller]
pub(crate) fn assert_rejected<T: std::fmt::Debug>(
    result: Result<T, Status>,
    code: Code,
    field: Option<&str>,
) {
    let status = result.expect_err("the call should have been rejected");
    assert_eq!(status.code(), code, "unexpected status: {status:?}");
    if let Some(field) = field {
        let fields = violated_fields(&status);
        assert!(
            fields.iter().any(|f| f == field),
            "expected a violation on {field:?}, got {fields:?} ({})",
            status.message()
        );
        assert!(
            status.message().contains(field),
            "message should name {field}: {}",
            status.message()
        );
    }
}
