//! What the tests share: assertions on statuses and request builders.

use contracts::order::v1::{CreateOrderRequest, OrderItem, ShippingAddress};
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

/// One order line.
pub(crate) fn item(sku: &str, quantity: i32, unit_price_minor: i64) -> OrderItem {
    OrderItem {
        sku: sku.to_owned(),
        quantity,
        unit_price_minor,
    }
}

pub(crate) fn address() -> ShippingAddress {
    ShippingAddress {
        name: "Ada Lovelace".to_owned(),
        line1: "12 St James's Square".to_owned(),
        line2: String::new(),
        city: "London".to_owned(),
        postal_code: "SW1Y 4JH".to_owned(),
        country: "GB".to_owned(),
    }
}

pub(crate) fn order(items: Vec<OrderItem>) -> CreateOrderRequest {
    CreateOrderRequest {
        items,
        currency: "EUR".to_owned(),
        idempotency_key: String::new(),
        shipping_address: Some(address()),
    }
}

/// A minimal event for the event-store tests, with a fresh time-ordered id.
pub(crate) fn new_event() -> es_postgres::NewEvent {
    es_postgres::NewEvent {
        event_id: uuid::Uuid::now_v7(),
        event_type: "test.happened",
        schema_version: 1,
        payload: serde_json::json!({"n": 1}),
        occurred_at: chrono::Utc::now(),
    }
}
