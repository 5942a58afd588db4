//! The `shop.order.v1.OrderService` API: authenticate, parse proto into
//! domain values (collecting every bad field), decide with the aggregate,
//! append; one mapping from errors to `Status`.

use chrono::Utc;
use contracts::order::v1::{self as pb, order_service_server::OrderService};
use es::{Aggregate as _, EventContext, RecordedEvent};
use es_postgres::{AppendError, EventStore, NewEvent};
use order_domain::{
    Currency, Order, OrderCommand, OrderError, OrderEvent, OrderLine, OrderStatus, Quantity, Sku,
    UnitPrice,
};
use platform::status::{self, FieldViolations};
use tonic::{Request, Response, Status};
use uuid::Uuid;

use crate::auth::Authenticator;

/// Handlers of `OrderService`.
#[derive(Debug, Clone)]
pub struct OrderApi {
    store: EventStore,
    auth: Authenticator,
}

impl OrderApi {
    #[must_use]
    pub fn new(store: EventStore, auth: Authenticator) -> Self {
        Self { store, auth }
    }

    /// Loads and folds an order's stream; `None` if it does not exist.
    async fn load(&self, order_id: Uuid) -> Result<Option<(Order, Times)>, Status> {
        let stream = es::stream_id::<Order>(order_id);
        let recorded = self
            .store
            .load(&stream)
            .await
            .map_err(|e| status::unavailable("database", &e))?;
        if recorded.is_empty() {
            return Ok(None);
        }
        let events = recorded
            .iter()
            .map(RecordedEvent::decode::<OrderEvent>)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| status::internal(&e))?;
        Ok(times(&recorded).map(|t| (Order::replay(&events), t)))
    }
}

/// Parses the request into domain values, naming every bad field.
fn parse_create(request: &pb::CreateOrderRequest) -> Result<(Currency, Vec<OrderLine>), Status> {
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
    if request.idempotency_key.len() > 128 {
        violations.add("idempotency_key", "must be at most 128 characters");
    }
    match currency {
        Some(currency) if violations.is_empty() => Ok((currency, lines)),
        _ => Err(violations.into_status()),
    }
}

fn domain_error(error: &OrderError) -> Status {
    match error {
        OrderError::AlreadyExists { .. } => Status::already_exists(error.to_string()),
        OrderError::NoLines | OrderError::TooManyLines => status::invalid_argument("items", error),
        OrderError::TotalOverflow => status::invalid_argument("items", error),
    }
}

fn status_to_proto(status: Option<OrderStatus>) -> pb::OrderStatus {
    match status {
        None => pb::OrderStatus::Unspecified,
        Some(OrderStatus::Created) => pb::OrderStatus::Created,
        Some(OrderStatus::Paid) => pb::OrderStatus::Paid,
        Some(OrderStatus::Shipped) => pb::OrderStatus::Shipped,
        Some(OrderStatus::Delivered) => pb::OrderStatus::Delivered,
        Some(OrderStatus::Cancelled) => pb::OrderStatus::Cancelled,
    }
}

/// When the order was created and last changed.
type Times = (chrono::DateTime<Utc>, chrono::DateTime<Utc>);

fn times(recorded: &[RecordedEvent]) -> Option<Times> {
    Some((recorded.first()?.occurred_at, recorded.last()?.occurred_at))
}

fn to_proto(order: &Order, (created_at, updated_at): Times) -> pb::Order {
    pb::Order {
        id: order.id.map(|id| id.to_string()).unwrap_or_default(),
        user_id: order.user_id.map(|id| id.to_string()).unwrap_or_default(),
        status: status_to_proto(order.status).into(),
        items: order
            .lines
            .iter()
            .map(|line| pb::OrderItem {
                sku: line.sku.as_str().to_owned(),
                quantity: i32::try_from(line.quantity.get()).unwrap_or(i32::MAX),
                unit_price_minor: line.unit_price.minor(),
            })
            .collect(),
        total: order.currency.as_ref().map(|currency| pb::Money {
            currency: currency.to_string(),
            amount_minor: order.total_minor,
        }),
        version: order.version,
        created_at: Some(contracts::timestamp(created_at)),
        updated_at: Some(contracts::timestamp(updated_at)),
    }
}

#[tonic::async_trait]
impl OrderService for OrderApi {
    #[tracing::instrument(skip_all, fields(user_id, order_id), err(level = "info"))]
    async fn create_order(
        &self,
        request: Request<pb::CreateOrderRequest>,
    ) -> Result<Response<pb::CreateOrderResponse>, Status> {
        let caller = self.auth.authenticate(request.metadata()).await?;
        let correlation_id = platform::grpc::correlation_id(request.metadata());
        let request = request.into_inner();
        let (currency, lines) = parse_create(&request)?;
        let order_id = Uuid::now_v7();
        let span = tracing::Span::current();
        span.record("user_id", tracing::field::display(caller.user_id));
        span.record("order_id", tracing::field::display(order_id));

        let events = Order::default()
            .handle(OrderCommand::Create {
                order_id,
                user_id: caller.user_id,
                currency,
                lines,
            })
            .map_err(|e| domain_error(&e))?;
        let now = es_postgres::now();
        let new_events = events
            .iter()
            .map(|e| NewEvent::from_domain(e, now))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| status::internal(&e))?;
        let context = EventContext {
            correlation_id,
            causation_id: Uuid::now_v7(),
            actor: caller.user_id.to_string(),
            traceparent: None,
        };
        // Keys are per user: one user's key never collides with another's.
        let key = (!request.idempotency_key.is_empty())
            .then(|| format!("{}:{}", caller.user_id, request.idempotency_key));
        let stream = es::stream_id::<Order>(order_id);
        let (order, times, position) = match self
            .store
            .append(&stream, 0, &new_events, &context, key.as_deref())
            .await
        {
            Ok(appended) => (Order::replay(&events), (now, now), appended.position),
            Err(AppendError::DuplicateKey) => {
                let key = key.as_deref().unwrap_or_default();
                let (stream, appended) = self
                    .store
                    .find_idempotency_key(key)
                    .await
                    .map_err(|e| status::unavailable("database", &e))?
                    .ok_or_else(|| {
                        Status::aborted("idempotency key is being used concurrently; retry")
                    })?;
                let original = stream
                    .strip_prefix("order-")
                    .and_then(|id| Uuid::parse_str(id).ok())
                    .ok_or_else(|| {
                        Status::internal("idempotency key points to a foreign stream")
                    })?;
                tracing::info!(%original, "idempotent retry: returning the original order");
                let (order, times) = self
                    .load(original)
                    .await?
                    .ok_or_else(|| Status::internal("idempotency key points to a missing order"))?;
                (order, times, appended.position)
            }
            Err(e @ AppendError::Conflict { .. }) => return Err(Status::aborted(e.to_string())),
            Err(AppendError::Database(e)) => return Err(status::from_sqlx(&e)),
            Err(e @ AppendError::Encode(_)) => return Err(status::internal(&e)),
        };
        tracing::info!(position, "order created");
        Ok(Response::new(pb::CreateOrderResponse {
            order: Some(to_proto(&order, times)),
            position,
        }))
    }

    #[tracing::instrument(skip_all, fields(order_id), err(level = "info"))]
    async fn get_order(
        &self,
        request: Request<pb::GetOrderRequest>,
    ) -> Result<Response<pb::GetOrderResponse>, Status> {
        let caller = self.auth.authenticate(request.metadata()).await?;
        let raw = request.into_inner().order_id;
        let order_id = Uuid::parse_str(raw.trim())
            .map_err(|_| status::invalid_argument("order_id", "must be a UUID"))?;
        tracing::Span::current().record("order_id", tracing::field::display(order_id));
        let not_found = || Status::not_found(format!("order {order_id} not found"));
        let (order, times) = self.load(order_id).await?.ok_or_else(not_found)?;
        // Another user's order is reported as missing, not forbidden: ids leak nothing.
        if order.user_id != Some(caller.user_id) {
            return Err(not_found());
        }
        Ok(Response::new(pb::GetOrderResponse {
            order: Some(to_proto(&order, times)),
        }))
    }
}
