//! Event-sourced orders through the public API and the event store, one
//! file per feature; the request builders they share are here.

mod commands;
mod lifecycle;
mod publishing;
mod read_models;
mod stored_history;

pub(super) use std::{collections::BTreeSet, time::Duration};

pub(super) use contracts::order::v1::{
    CancelOrderRequest, DeliverOrderRequest, GetOrderAtRequest, GetOrderHistoryRequest,
    GetOrderRequest, ListOrdersRequest, Order, OrderStatus, PayOrderRequest, ShipOrderRequest,
    get_order_at_request::Point, order_service_client::OrderServiceClient,
};
pub(super) use es::EventContext;
pub(super) use es_postgres::EventStore;
pub(super) use order_service::{
    commands::{CommandError, Envelope, OrderCommands},
    history::{self, At},
    projections,
};
pub(super) use testkit::{TestDb, TestStack, bearer, eventually};
pub(super) use tonic::{Code, transport::Channel};

pub(super) use crate::helpers::{assert_rejected, item, order};

pub(super) type Client = OrderServiceClient<Channel>;

pub(super) async fn place(orders: &mut Client, token: &str) -> anyhow::Result<(Order, i64)> {
    let created = orders
        .create_order(bearer(
            token,
            order(vec![item("BOOK-1", 2, 1250), item("PEN-7", 1, 500)]),
        ))
        .await?
        .into_inner();
    Ok((created.order.expect("order"), created.position))
}

pub(super) fn pay(order_id: &str, amount_minor: i64, key: &str) -> PayOrderRequest {
    PayOrderRequest {
        order_id: order_id.to_owned(),
        payment_reference: "pay_123".to_owned(),
        amount_minor,
        idempotency_key: key.to_owned(),
        expected_version: 0,
    }
}

pub(super) fn ship(order_id: &str) -> ShipOrderRequest {
    ShipOrderRequest {
        order_id: order_id.to_owned(),
        carrier: "DHL".to_owned(),
        tracking_number: "JD0146000033".to_owned(),
        idempotency_key: String::new(),
        expected_version: 0,
    }
}

pub(super) fn deliver(order_id: &str) -> DeliverOrderRequest {
    DeliverOrderRequest {
        order_id: order_id.to_owned(),
        idempotency_key: String::new(),
        expected_version: 0,
    }
}

pub(super) fn cancel(order_id: &str) -> CancelOrderRequest {
    CancelOrderRequest {
        order_id: order_id.to_owned(),
        reason: "changed my mind".to_owned(),
        idempotency_key: String::new(),
        expected_version: 0,
    }
}

pub(super) async fn read(
    orders: &mut Client,
    token: &str,
    order_id: &str,
    min_position: i64,
) -> anyhow::Result<Order> {
    Ok(orders
        .get_order(bearer(
            token,
            GetOrderRequest {
                order_id: order_id.to_owned(),
                min_position,
            },
        ))
        .await?
        .into_inner()
        .order
        .expect("order"))
}

pub(super) fn list(
    status: OrderStatus,
    page_size: i32,
    page_token: &str,
    min_position: i64,
) -> ListOrdersRequest {
    ListOrdersRequest {
        status: status.into(),
        page_size,
        page_token: page_token.to_owned(),
        min_position,
    }
}
