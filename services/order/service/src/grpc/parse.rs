//! Proto requests into domain values: every bad field is named (one
//! `BadRequest` with all of them), nothing is trusted before it is parsed.

use contracts::order::v1 as pb;
use es::EventContext;
use es_postgres::IdempotencyKey;
use order_domain::{
    AddressLine, CountryCode, Currency, OrderCommand, OrderLine, Quantity, ShippingAddress, Sku,
    UnitPrice,
};
use platform::{auth::Caller, status::FieldViolations};
use tonic::{Status, metadata::MetadataMap};
use uuid::Uuid;

/// The fields every command on an existing order carries.
#[derive(Debug, Clone)]
pub(super) struct Common<'a> {
    pub(super) order_id: &'a str,
    pub(super) idempotency_key: &'a str,
    pub(super) expected_version: i64,
    /// See [`fingerprint`].
    pub(super) fingerprint: String,
}

pub(super) fn context(metadata: &MetadataMap, caller: Caller) -> EventContext {
    let correlation_id = platform::grpc::correlation_id(metadata);
    EventContext {
        correlation_id,
        causation_id: Uuid::now_v7(),
        actor: caller.user_id.to_string(),
        traceparent: platform::trace::current_traceparent()
            .or_else(|| platform::grpc::traceparent(metadata)),
    }
}

/// Keys are per user: one user's key never collides with another's.
pub(super) fn scoped_key(
    caller: Caller,
    key: Option<&order_domain::IdempotencyKey>,
    fingerprint: String,
) -> Option<IdempotencyKey> {
    key.map(|key| IdempotencyKey {
        key: format!("{}:{}", caller.user_id, key.as_str()),
        fingerprint,
    })
}

/// What binds an idempotency key to its request: a hash of the RPC and
/// every field but the key itself, so reusing a key for another command or
/// another body is refused instead of answered with the first request's
/// result. Empty when the request has no key.
pub(super) fn fingerprint<M: prost::Message + Clone>(
    rpc: &str,
    request: &M,
    key_of: impl FnOnce(&mut M) -> &mut String,
) -> String {
    use sha2::Digest as _;
    let mut bare = request.clone();
    if std::mem::take(key_of(&mut bare)).is_empty() {
        return String::new();
    }
    let digest = sha2::Sha256::new()
        .chain_update(rpc.as_bytes())
        .chain_update([0])
        .chain_update(bare.encode_to_vec())
        .finalize();
    platform::hex::encode(&digest)
}

/// The request's idempotency key, `Some(None)` when it has none.
pub(super) fn parse_key(
    violations: &mut FieldViolations,
    raw: &str,
) -> Option<Option<order_domain::IdempotencyKey>> {
    violations.check("idempotency_key", order_domain::IdempotencyKey::parse(raw))
}

pub(super) fn check_expected_version(violations: &mut FieldViolations, version: i64) {
    if version < 0 {
        violations.add("expected_version", "must not be negative (0 means any)");
    }
}

pub(super) fn parse_order_id(violations: &mut FieldViolations, raw: &str) -> Option<Uuid> {
    violations.check(
        "order_id",
        Uuid::parse_str(raw.trim()).map_err(|_| "must be a UUID"),
    )
}

pub(super) fn parse_address(
    violations: &mut FieldViolations,
    address: Option<&pb::ShippingAddress>,
) -> Option<ShippingAddress> {
    let Some(address) = address else {
        violations.add("shipping_address", "is required");
        return None;
    };
    let name = violations.check("shipping_address.name", AddressLine::parse(&address.name));
    let line1 = violations.check("shipping_address.line1", AddressLine::parse(&address.line1));
    let line2 = if address.line2.trim().is_empty() {
        Some(None)
    } else {
        violations
            .check("shipping_address.line2", AddressLine::parse(&address.line2))
            .map(Some)
    };
    let city = violations.check("shipping_address.city", AddressLine::parse(&address.city));
    let postal_code = violations.check(
        "shipping_address.postal_code",
        AddressLine::parse(&address.postal_code),
    );
    let country = violations.check(
        "shipping_address.country",
        CountryCode::parse(&address.country),
    );
    Some(ShippingAddress {
        name: name?,
        line1: line1?,
        line2: line2?,
        city: city?,
        postal_code: postal_code?,
        country: country?,
    })
}

/// Parses a create request into a command and its idempotency key, naming
/// every bad field.
pub(super) fn parse_create(
    request: &pb::CreateOrderRequest,
    order_id: Uuid,
    caller: Caller,
) -> Result<(OrderCommand, Option<order_domain::IdempotencyKey>), Status> {
    let mut violations = FieldViolations::new();
    let currency = violations.check("currency", Currency::parse(&request.currency));
    if request.items.is_empty() {
        violations.add("items", "at least one item is required");
    }
    if request.items.len() > order_domain::MAX_LINES {
        violations.add(
            "items",
            format!("at most {} items are allowed", order_domain::MAX_LINES),
        );
    }
    let mut lines = Vec::with_capacity(request.items.len());
    for (i, item) in request.items.iter().enumerate() {
        let sku = violations.check(format!("items[{i}].sku"), Sku::parse(&item.sku));
        let quantity = violations.check(
            format!("items[{i}].quantity"),
            Quantity::new(i64::from(item.quantity)),
        );
        let unit_price = violations.check(
            format!("items[{i}].unit_price_minor"),
            UnitPrice::new(item.unit_price_minor),
        );
        if let (Some(sku), Some(quantity), Some(unit_price)) = (sku, quantity, unit_price) {
            lines.push(OrderLine {
                sku,
                quantity,
                unit_price,
            });
        }
    }
    let shipping_address = parse_address(&mut violations, request.shipping_address.as_ref());
    let key = parse_key(&mut violations, &request.idempotency_key);
    match (currency, shipping_address, key) {
        (Some(currency), Some(shipping_address), Some(key)) if violations.is_empty() => Ok((
            OrderCommand::Create {
                order_id,
                user_id: caller.user_id,
                currency,
                lines,
                shipping_address,
            },
            key,
        )),
        _ => Err(violations.into_status()),
    }
}
