//! Schema evolution of stored order events. Stored payloads keep the schema
//! version they were written with; reading always goes through [`decode`],
//! which upcasts old versions step by step to the current one.
//!
//! History (each version has a fixture under `fixtures/events/`):
//! - `order.created` v1: no `shipping_address` (orders placed before
//!   addresses were collected). v2 adds it; v1 upcasts to `null`, and such an
//!   order cannot ship until it has an address.
//! - every other type: v1 is current.

use serde_json::Value;

use crate::{CREATED_SCHEMA_VERSION, OrderEvent};

/// Why a stored event could not be read.
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    #[error("{event_type} has unknown schema version {schema_version}")]
    UnknownVersion {
        event_type: String,
        schema_version: i32,
    },
    #[error("{event_type} v{schema_version} payload does not match its schema: {source}")]
    Payload {
        event_type: String,
        schema_version: i32,
        #[source]
        source: serde_json::Error,
    },
}

/// Upcasts a payload of `event_type` at `schema_version` to the current
/// version of that type.
///
/// # Errors
///
/// [`DecodeError::UnknownVersion`] for a version newer than this code knows.
pub fn upcast(
    event_type: &str,
    schema_version: i32,
    mut payload: Value,
) -> Result<Value, DecodeError> {
    let current = current_version(event_type);
    if schema_version < 1 || schema_version > current {
        return Err(DecodeError::UnknownVersion {
            event_type: event_type.to_owned(),
            schema_version,
        });
    }
    if event_type == "order.created"
        && schema_version == 1
        && let Value::Object(fields) = &mut payload
    {
        fields.entry("shipping_address").or_insert(Value::Null);
    }
    Ok(payload)
}

/// Reads a stored order event of any known version.
///
/// # Errors
///
/// See [`DecodeError`].
pub fn decode(
    event_type: &str,
    schema_version: i32,
    payload: &Value,
) -> Result<OrderEvent, DecodeError> {
    let invalid = |source| DecodeError::Payload {
        event_type: event_type.to_owned(),
        schema_version,
        source,
    };
    if schema_version == current_version(event_type) {
        // Nothing to upcast: read the stored payload where it is.
        return serde::Deserialize::deserialize(payload).map_err(invalid);
    }
    let current = upcast(event_type, schema_version, payload.clone())?;
    serde_json::from_value(current).map_err(invalid)
}

/// The schema version `event_type` is written with today.
fn current_version(event_type: &str) -> i32 {
    match event_type {
        "order.created" => CREATED_SCHEMA_VERSION,
        _ => 1,
    }
}
