//! The `shop.order.v1.OrderService` API: authenticate, parse proto into
//! domain values (collecting every bad field), run commands or read models,
//! and the one mapping from errors to `Status`.

use contracts::order::v1::{self as pb, order_service_server::OrderService};
use es::EventContext;
use es_postgres::IdempotencyKey;
use order_domain::{
    AddressLine, CancelReason, Carrier, CountryCode, Currency, Order, OrderCommand, OrderError,
    OrderLine, OrderStatus, PaymentReference, Quantity, ShippingAddress, Sku, TrackingNumber,
    UnitPrice,
};
use platform::status::{self, FieldViolations};
use tonic::{Request, Response, Status, metadata::MetadataMap};
use uuid::Uuid;

use platform::auth::{Authenticator, Caller};

use crate::{
    commands::{CommandError, OrderCommands, Outcome, Times},
    history::{self, At, HistoryError},
    projections::{ORDER_SUMMARY, ORDERS_BY_USER},
    queries::{self, QueryError, ReadModels},
};

/// Handlers of `OrderService`.
#[derive(Debug, Clone)]
pub struct OrderApi {
    commands: OrderCommands,
    reads: ReadModels,
    auth: Authenticator,
}

impl OrderApi {
    #[must_use]
    pub fn new(commands: OrderCommands, reads: ReadModels, auth: Authenticator) -> Self {
        Self {
            commands,
            reads,
            auth,
        }
    }

    /// Runs a command on an existing order: authenticates, parses the
    /// fields every such command shares (`order_id`, `idempotency_key`,
    /// `expected_version`) and, through `parse`, its own, naming every bad
    /// field; then executes it and answers with the outcome.
    async fn run(
        &self,
        metadata: &MetadataMap,
        common: Common<'_>,
        parse: impl FnOnce(&mut FieldViolations) -> Option<OrderCommand>,
    ) -> Result<(pb::Order, i64), Status> {
        let caller = self.auth.authenticate(metadata).await?;
        let mut violations = FieldViolations::new();
        let order_id = parse_order_id(&mut violations, common.order_id);
        let command = parse(&mut violations);
        check_key(&mut violations, common.idempotency_key);
        check_expected_version(&mut violations, common.expected_version);
        let (Some(order_id), Some(command)) = (order_id, command) else {
            return Err(violations.into_status());
        };
        violations.into_result()?;
        let context = context(metadata, caller);
        let key = scoped_key(caller, common.idempotency_key, common.fingerprint);
        let expected = (common.expected_version > 0).then_some(common.expected_version);
        let outcome = self
            .commands
            .execute(
                order_id,
                caller.user_id,
                command,
                expected,
                &context,
                key.as_ref(),
            )
            .await
            .map_err(|e| command_error(&e))?;
        Ok(answer(&outcome))
    }
}

/// The fields every command on an existing order carries.
#[derive(Debug, Clone)]
struct Common<'a> {
    order_id: &'a str,
    idempotency_key: &'a str,
    expected_version: i64,
    /// See [`fingerprint`].
    fingerprint: String,
}

const MAX_KEY_LEN: usize = 128;

fn context(metadata: &MetadataMap, caller: Caller) -> EventContext {
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
fn scoped_key(caller: Caller, key: &str, fingerprint: String) -> Option<IdempotencyKey> {
    (!key.is_empty()).then(|| IdempotencyKey {
        key: format!("{}:{key}", caller.user_id),
        fingerprint,
    })
}

/// What binds an idempotency key to its request: a hash of the RPC and
/// every field but the key itself, so reusing a key for another command or
/// another body is refused instead of answered with the first request's
/// result. Empty when the request has no key.
fn fingerprint<M: prost::Message + Clone>(
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

fn check_key(violations: &mut FieldViolations, key: &str) {
    if key.len() > MAX_KEY_LEN {
        violations.add(
            "idempotency_key",
            format!("must be at most {MAX_KEY_LEN} characters"),
        );
    } else if key.chars().any(char::is_control) {
        // NUL cannot be stored at all; other control characters are noise.
        violations.add("idempotency_key", "must not contain control characters");
    }
}

fn check_expected_version(violations: &mut FieldViolations, version: i64) {
    if version < 0 {
        violations.add("expected_version", "must not be negative (0 means any)");
    }
}

fn parse_order_id(violations: &mut FieldViolations, raw: &str) -> Option<Uuid> {
    violations.check(
        "order_id",
        Uuid::parse_str(raw.trim()).map_err(|_| "must be a UUID"),
    )
}

fn parse_address(
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

/// Parses a create request into a command, naming every bad field.
fn parse_create(request: &pb::CreateOrderRequest, caller: Caller) -> Result<OrderCommand, Status> {
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
    check_key(&mut violations, &request.idempotency_key);
    match (currency, shipping_address) {
        (Some(currency), Some(shipping_address)) if violations.is_empty() => {
            Ok(OrderCommand::Create {
                order_id: Uuid::now_v7(),
                user_id: caller.user_id,
                currency,
                lines,
                shipping_address,
            })
        }
        _ => Err(violations.into_status()),
    }
}

fn command_error(error: &CommandError) -> Status {
    match error {
        CommandError::Rejected(rejected) => match rejected {
            OrderError::AlreadyExists { .. } => Status::already_exists(rejected.to_string()),
            OrderError::NotFound => Status::not_found(rejected.to_string()),
            OrderError::NoLines | OrderError::TooManyLines | OrderError::TotalOverflow => {
                status::invalid_argument("items", rejected)
            }
            OrderError::AmountMismatch { .. } => status::invalid_argument("amount_minor", rejected),
            OrderError::InvalidTransition { .. } | OrderError::NoShippingAddress { .. } => {
                Status::failed_precondition(rejected.to_string())
            }
        },
        CommandError::NotFound(_) => Status::not_found(error.to_string()),
        CommandError::WrongVersion { .. } | CommandError::Conflict(_) => {
            Status::aborted(error.to_string())
        }
        CommandError::KeyReused => status::invalid_argument(
            "idempotency_key",
            "was already used for a different request",
        ),
        CommandError::Decode(e) => status::internal(e),
        CommandError::Store(e) => status::unavailable("database", e),
        CommandError::Append(es_postgres::AppendError::Database(e)) => status::from_sqlx(e),
        CommandError::Append(e) => status::internal(e),
    }
}

fn query_error(error: &QueryError) -> Status {
    match error {
        QueryError::NotCaughtUp(_) => Status::unavailable(error.to_string()),
        QueryError::UnknownPosition(_) => status::invalid_argument("min_position", error),
        QueryError::Database(e) => status::from_sqlx(e),
        QueryError::Corrupt(e) => status::internal(e),
    }
}

fn history_error(error: &HistoryError) -> Status {
    match error {
        HistoryError::Store(e) => status::unavailable("database", e),
        HistoryError::Decode(e) => status::internal(e),
    }
}

/// The API view of an aggregate state.
#[must_use]
pub fn order_to_proto(order: &Order, (created_at, updated_at): Times) -> pb::Order {
    let text = |value: Option<String>| value.unwrap_or_default();
    pb::Order {
        id: order.id.map(|id| id.to_string()).unwrap_or_default(),
        user_id: order.user_id.map(|id| id.to_string()).unwrap_or_default(),
        status: queries::status_to_proto(order.status).into(),
        items: queries::lines_to_proto(&order.lines),
        total: order.currency.as_ref().map(|currency| pb::Money {
            currency: currency.to_string(),
            amount_minor: order.total_minor,
        }),
        version: order.version,
        created_at: Some(contracts::timestamp(created_at)),
        updated_at: Some(contracts::timestamp(updated_at)),
        shipping_address: order
            .shipping_address
            .as_ref()
            .map(queries::address_to_proto),
        payment_reference: text(order.payment_reference.as_ref().map(ToString::to_string)),
        carrier: text(order.carrier.as_ref().map(ToString::to_string)),
        tracking_number: text(order.tracking_number.as_ref().map(ToString::to_string)),
        cancel_reason: text(order.cancel_reason.as_ref().map(ToString::to_string)),
    }
}

fn answer(outcome: &Outcome) -> (pb::Order, i64) {
    (
        order_to_proto(&outcome.order, outcome.times),
        outcome.position,
    )
}

fn entry_to_proto(entry: &history::Entry) -> pb::OrderEventRecord {
    let recorded = &entry.recorded;
    pb::OrderEventRecord {
        event_id: recorded.event_id.to_string(),
        version: recorded.version,
        position: recorded.position,
        event_type: recorded.event_type.clone(),
        schema_version: recorded.schema_version,
        occurred_at: Some(contracts::timestamp(recorded.occurred_at)),
        correlation_id: recorded.context.correlation_id.to_string(),
        causation_id: recorded.context.causation_id.to_string(),
        actor: recorded.context.actor.clone(),
        traceparent: recorded.context.traceparent.clone().unwrap_or_default(),
        payload_json: serde_json::to_string(&entry.event).unwrap_or_default(),
    }
}

/// The owner of an order, from its first event.
fn owner(entries: &[history::Entry]) -> Option<Uuid> {
    match entries.first().map(|e| &e.event) {
        Some(order_domain::OrderEvent::Created { user_id, .. }) => Some(*user_id),
        _ => None,
    }
}

fn not_found(order_id: Uuid) -> Status {
    Status::not_found(format!("order {order_id} not found"))
}

#[tonic::async_trait]
impl OrderService for OrderApi {
    #[tracing::instrument(skip_all, fields(user_id), err(level = "info"))]
    async fn create_order(
        &self,
        request: Request<pb::CreateOrderRequest>,
    ) -> Result<Response<pb::CreateOrderResponse>, Status> {
        let caller = self.auth.authenticate(request.metadata()).await?;
        tracing::Span::current().record("user_id", tracing::field::display(caller.user_id));
        let command = parse_create(request.get_ref(), caller)?;
        let context = context(request.metadata(), caller);
        let r = request.get_ref();
        let key = scoped_key(
            caller,
            &r.idempotency_key,
            fingerprint("CreateOrder", r, |m| &mut m.idempotency_key),
        );
        let outcome = self
            .commands
            .create(command, &context, key.as_ref())
            .await
            .map_err(|e| command_error(&e))?;
        let (order, position) = answer(&outcome);
        tracing::info!(order_id = %order.id, position, "order created");
        Ok(Response::new(pb::CreateOrderResponse {
            order: Some(order),
            position,
        }))
    }

    #[tracing::instrument(skip_all, fields(order_id = %platform::grpc::loggable_id(&request.get_ref().order_id)), err(level = "info"))]
    async fn pay_order(
        &self,
        request: Request<pb::PayOrderRequest>,
    ) -> Result<Response<pb::PayOrderResponse>, Status> {
        let r = request.get_ref();
        let common = Common {
            order_id: &r.order_id,
            idempotency_key: &r.idempotency_key,
            expected_version: r.expected_version,
            fingerprint: fingerprint("PayOrder", r, |m| &mut m.idempotency_key),
        };
        let (order, position) = self
            .run(request.metadata(), common, |violations| {
                let payment_reference = violations.check(
                    "payment_reference",
                    PaymentReference::parse(&r.payment_reference),
                );
                if r.amount_minor < 0 {
                    violations.add("amount_minor", "must not be negative");
                }
                Some(OrderCommand::Pay {
                    payment_reference: payment_reference?,
                    amount_minor: r.amount_minor,
                })
            })
            .await?;
        Ok(Response::new(pb::PayOrderResponse {
            order: Some(order),
            position,
        }))
    }

    #[tracing::instrument(skip_all, fields(order_id = %platform::grpc::loggable_id(&request.get_ref().order_id)), err(level = "info"))]
    async fn ship_order(
        &self,
        request: Request<pb::ShipOrderRequest>,
    ) -> Result<Response<pb::ShipOrderResponse>, Status> {
        let r = request.get_ref();
        let common = Common {
            order_id: &r.order_id,
            idempotency_key: &r.idempotency_key,
            expected_version: r.expected_version,
            fingerprint: fingerprint("ShipOrder", r, |m| &mut m.idempotency_key),
        };
        let (order, position) = self
            .run(request.metadata(), common, |violations| {
                let carrier = violations.check("carrier", Carrier::parse(&r.carrier));
                let tracking_number =
                    violations.check("tracking_number", TrackingNumber::parse(&r.tracking_number));
                Some(OrderCommand::Ship {
                    carrier: carrier?,
                    tracking_number: tracking_number?,
                })
            })
            .await?;
        Ok(Response::new(pb::ShipOrderResponse {
            order: Some(order),
            position,
        }))
    }

    #[tracing::instrument(skip_all, fields(order_id = %platform::grpc::loggable_id(&request.get_ref().order_id)), err(level = "info"))]
    async fn deliver_order(
        &self,
        request: Request<pb::DeliverOrderRequest>,
    ) -> Result<Response<pb::DeliverOrderResponse>, Status> {
        let r = request.get_ref();
        let common = Common {
            order_id: &r.order_id,
            idempotency_key: &r.idempotency_key,
            expected_version: r.expected_version,
            fingerprint: fingerprint("DeliverOrder", r, |m| &mut m.idempotency_key),
        };
        let (order, position) = self
            .run(request.metadata(), common, |_| Some(OrderCommand::Deliver))
            .await?;
        Ok(Response::new(pb::DeliverOrderResponse {
            order: Some(order),
            position,
        }))
    }

    #[tracing::instrument(skip_all, fields(order_id = %platform::grpc::loggable_id(&request.get_ref().order_id)), err(level = "info"))]
    async fn cancel_order(
        &self,
        request: Request<pb::CancelOrderRequest>,
    ) -> Result<Response<pb::CancelOrderResponse>, Status> {
        let r = request.get_ref();
        let common = Common {
            order_id: &r.order_id,
            idempotency_key: &r.idempotency_key,
            expected_version: r.expected_version,
            fingerprint: fingerprint("CancelOrder", r, |m| &mut m.idempotency_key),
        };
        let (order, position) = self
            .run(request.metadata(), common, |violations| {
                let reason = violations.check("reason", CancelReason::parse(&r.reason));
                Some(OrderCommand::Cancel { reason: reason? })
            })
            .await?;
        Ok(Response::new(pb::CancelOrderResponse {
            order: Some(order),
            position,
        }))
    }

    #[tracing::instrument(skip_all, fields(order_id = %platform::grpc::loggable_id(&request.get_ref().order_id)), err(level = "info"))]
    async fn get_order(
        &self,
        request: Request<pb::GetOrderRequest>,
    ) -> Result<Response<pb::GetOrderResponse>, Status> {
        let caller = self.auth.authenticate(request.metadata()).await?;
        let r = request.get_ref();
        let mut violations = FieldViolations::new();
        let order_id = parse_order_id(&mut violations, &r.order_id);
        if r.min_position < 0 {
            violations.add("min_position", "must not be negative");
        }
        let Some(order_id) = order_id else {
            return Err(violations.into_status());
        };
        violations.into_result()?;
        if r.min_position > 0 {
            self.reads
                .wait_for(ORDER_SUMMARY, r.min_position)
                .await
                .map_err(|e| query_error(&e))?;
        }
        let order = self
            .reads
            .order(order_id)
            .await
            .map_err(|e| query_error(&e))?
            // Another user's order is reported as missing, not forbidden: ids leak nothing.
            .filter(|order| order.user_id == caller.user_id.to_string())
            .ok_or_else(|| not_found(order_id))?;
        Ok(Response::new(pb::GetOrderResponse { order: Some(order) }))
    }

    #[tracing::instrument(skip_all, err(level = "info"))]
    async fn list_orders(
        &self,
        request: Request<pb::ListOrdersRequest>,
    ) -> Result<Response<pb::ListOrdersResponse>, Status> {
        let caller = self.auth.authenticate(request.metadata()).await?;
        let r = request.get_ref();
        let mut violations = FieldViolations::new();
        let status = match pb::OrderStatus::try_from(r.status) {
            Ok(pb::OrderStatus::Unspecified) => Some(None),
            Ok(pb::OrderStatus::Created) => Some(Some(OrderStatus::Created)),
            Ok(pb::OrderStatus::Paid) => Some(Some(OrderStatus::Paid)),
            Ok(pb::OrderStatus::Shipped) => Some(Some(OrderStatus::Shipped)),
            Ok(pb::OrderStatus::Delivered) => Some(Some(OrderStatus::Delivered)),
            Ok(pb::OrderStatus::Cancelled) => Some(Some(OrderStatus::Cancelled)),
            Err(_) => {
                violations.add("status", "is not a known order status");
                None
            }
        };
        let page = platform::paging::parse::<Uuid>(&mut violations, r.page_size, &r.page_token);
        if r.min_position < 0 {
            violations.add("min_position", "must not be negative");
        }
        let (Some(status), Some(page)) = (status, page) else {
            return Err(violations.into_status());
        };
        violations.into_result()?;
        if r.min_position > 0 {
            self.reads
                .wait_for(ORDERS_BY_USER, r.min_position)
                .await
                .map_err(|e| query_error(&e))?;
        }
        let rows = self
            .reads
            .list(caller.user_id, status, page.after, page.fetch_limit())
            .await
            .map_err(|e| query_error(&e))?;
        let (orders, next_page_token) = page.finish(rows, |o| o.id.clone());
        Ok(Response::new(pb::ListOrdersResponse {
            orders,
            next_page_token,
        }))
    }

    #[tracing::instrument(skip_all, fields(order_id = %platform::grpc::loggable_id(&request.get_ref().order_id)), err(level = "info"))]
    async fn get_order_history(
        &self,
        request: Request<pb::GetOrderHistoryRequest>,
    ) -> Result<Response<pb::GetOrderHistoryResponse>, Status> {
        let caller = self.auth.authenticate(request.metadata()).await?;
        let mut violations = FieldViolations::new();
        let Some(order_id) = parse_order_id(&mut violations, &request.get_ref().order_id) else {
            return Err(violations.into_status());
        };
        let entries = history::trail(self.commands.store(), order_id, None)
            .await
            .map_err(|e| history_error(&e))?;
        if owner(&entries) != Some(caller.user_id) {
            return Err(not_found(order_id));
        }
        Ok(Response::new(pb::GetOrderHistoryResponse {
            events: entries.iter().map(entry_to_proto).collect(),
        }))
    }

    #[tracing::instrument(skip_all, fields(order_id = %platform::grpc::loggable_id(&request.get_ref().order_id)), err(level = "info"))]
    async fn get_order_at(
        &self,
        request: Request<pb::GetOrderAtRequest>,
    ) -> Result<Response<pb::GetOrderAtResponse>, Status> {
        let caller = self.auth.authenticate(request.metadata()).await?;
        let r = request.get_ref();
        let mut violations = FieldViolations::new();
        let order_id = parse_order_id(&mut violations, &r.order_id);
        let at = match &r.point {
            Some(pb::get_order_at_request::Point::Version(v)) if *v >= 1 => Some(At::Version(*v)),
            Some(pb::get_order_at_request::Point::Version(_)) => {
                violations.add("version", "must be at least 1");
                None
            }
            Some(pb::get_order_at_request::Point::At(t)) => {
                let time = chrono::DateTime::from_timestamp(
                    t.seconds,
                    u32::try_from(t.nanos).unwrap_or(0),
                );
                violations.check("at", time.map(At::Time).ok_or("is not a valid timestamp"))
            }
            None => {
                violations.add("point", "give a version or a timestamp (at)");
                None
            }
        };
        let (Some(order_id), Some(at)) = (order_id, at) else {
            return Err(violations.into_status());
        };
        let (order, entries) = history::state_at(self.commands.store(), order_id, at)
            .await
            .map_err(|e| history_error(&e))?
            .filter(|(order, _)| order.user_id == Some(caller.user_id))
            .ok_or_else(|| {
                Status::not_found(format!("order {order_id} did not exist at that point"))
            })?;
        let times = match (entries.first(), entries.last()) {
            (Some(first), Some(last)) => (first.recorded.occurred_at, last.recorded.occurred_at),
            _ => return Err(not_found(order_id)),
        };
        Ok(Response::new(pb::GetOrderAtResponse {
            order: Some(order_to_proto(&order, times)),
        }))
    }
}
