//! The `shop.order.v1.OrderService` API: authenticate, parse proto into
//! domain values (collecting every bad field), run commands or read models,
//! and answer; parsing is in [`parse`], the mapping from errors to
//! `Status` in [`errors`], to proto in [`crate::proto`].

mod errors;
mod parse;

use contracts::order::v1::{self as pb, order_service_server::OrderService};
use order_domain::{
    Amount, CancelReason, Carrier, OrderCommand, OrderStatus, PaymentReference, TrackingNumber,
};
use platform::{auth::Authenticator, status::FieldViolations};
use tonic::{Request, Response, Status, metadata::MetadataMap};
use uuid::Uuid;

use crate::{
    commands::{Envelope, OrderCommands},
    history::{self, At},
    projections::{ORDER_SUMMARY, ORDERS_BY_USER},
    proto::{answer, entry_to_proto, order_to_proto},
    queries::ReadModels,
};
use errors::not_found;
use parse::{
    Common, check_expected_version, context, fingerprint, parse_create, parse_key, parse_order_id,
    scoped_key,
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
        let key = parse_key(&mut violations, common.idempotency_key);
        check_expected_version(&mut violations, common.expected_version);
        let (Some(order_id), Some(command), Some(key)) = (order_id, command, key) else {
            return Err(violations.into_status());
        };
        violations.into_result()?;
        let context = context(metadata, caller);
        let key = scoped_key(caller, key.as_ref(), common.fingerprint);
        let envelope = Envelope {
            order_id,
            owner: caller.user_id,
            expected_version: (common.expected_version > 0).then_some(common.expected_version),
            context: &context,
            key: key.as_ref(),
        };
        let outcome = self.commands.execute(&envelope, command).await?;
        Ok(answer(&outcome))
    }
}

/// The owner of an order, from its first event.
fn owner(entries: &[history::Entry]) -> Option<Uuid> {
    match entries.first().map(|e| &e.event) {
        Some(order_domain::OrderEvent::Created { user_id, .. }) => Some(*user_id),
        _ => None,
    }
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
        // The API names new orders: time-ordered ids keep the indexes local.
        let order_id = Uuid::now_v7();
        let (command, key) = parse_create(request.get_ref(), order_id, caller)?;
        let context = context(request.metadata(), caller);
        let r = request.get_ref();
        let key = scoped_key(
            caller,
            key.as_ref(),
            fingerprint("CreateOrder", r, |m| &mut m.idempotency_key),
        );
        let envelope = Envelope {
            order_id,
            owner: caller.user_id,
            expected_version: None,
            context: &context,
            key: key.as_ref(),
        };
        let outcome = self.commands.create(&envelope, command).await?;
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
                let amount = violations.check("amount_minor", Amount::new(r.amount_minor));
                Some(OrderCommand::Pay {
                    payment_reference: payment_reference?,
                    amount: amount?,
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
            self.reads.wait_for(ORDER_SUMMARY, r.min_position).await?;
        }
        let order = self
            .reads
            .order(order_id)
            .await?
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
            self.reads.wait_for(ORDERS_BY_USER, r.min_position).await?;
        }
        let rows = self
            .reads
            .list(caller.user_id, status, page.after, page.fetch_limit())
            .await?;
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
        let entries = history::trail(self.commands.store(), order_id, None).await?;
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
            .await?
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
