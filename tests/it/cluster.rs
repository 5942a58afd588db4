//! Issue 16: the system on a 3-node JetStream cluster with R3 streams.

use std::time::Duration;

use contracts::{notification::v1::ListNotificationsRequest, order::v1::PayOrderRequest};
use testkit::{TestStack, bearer, eventually};

use crate::helpers::{item, order};

/// Killing one node of three under a stream of orders loses nothing and
/// duplicates nothing: every order's notifications arrive once and in order,
/// and the ORDERS stream (three replicas) holds each event once; the node
/// comes back and the cluster serves on.
#[tokio::test]
async fn a_cluster_node_killed_under_load_loses_and_duplicates_nothing() -> anyhow::Result<()> {
    let mut stack = TestStack::start_clustered(3).await?;
    let (user_id, token) = stack.signed_up_user().await?;
    let mut orders = stack.orders().await?;
    let mut placed = Vec::new();
    for n in 0..30 {
        if n == 10 {
            stack.nats.kill();
        }
        if n == 20 {
            stack.nats.start_again().await?;
        }
        let id = orders
            .create_order(bearer(&token, order(vec![item("A", 1, 100)])))
            .await?
            .into_inner()
            .order
            .expect("order")
            .id;
        orders
            .pay_order(bearer(
                &token,
                PayOrderRequest {
                    order_id: id.clone(),
                    payment_reference: format!("p-{n}"),
                    amount_minor: 100,
                    ..Default::default()
                },
            ))
            .await?;
        placed.push(id);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let listed = eventually("every notification", Duration::from_secs(60), || async {
        let listed = stack
            .notifications()
            .await
            .ok()?
            .list_notifications(bearer(
                &token,
                ListNotificationsRequest {
                    user_id: user_id.clone(),
                    page_size: 100,
                    ..Default::default()
                },
            ))
            .await
            .ok()?
            .into_inner()
            .notifications;
        let of_orders: Vec<_> = listed
            .into_iter()
            .filter(|n| n.event_type.starts_with("order."))
            .collect();
        (of_orders.len() >= placed.len() * 2).then_some(of_orders)
    })
    .await?;
    assert_eq!(listed.len(), placed.len() * 2, "each event once");
    for id in &placed {
        let sequence: Vec<&str> = listed
            .iter()
            .rev()
            .filter(|n| n.subject.contains(id.as_str()))
            .map(|n| n.event_type.as_str())
            .collect();
        assert_eq!(sequence, ["order.created", "order.paid"], "order {id}");
    }
    // Ask a node that never went away.
    let peer = async_nats::connect(stack.nats_peers[0].url()).await?;
    let js = async_nats::jetstream::new(peer);
    let mut stream = js.get_stream(messaging::ORDERS_STREAM.name).await?;
    let info = stream.info().await?;
    assert_eq!(info.config.num_replicas, 3, "R3");
    assert_eq!(
        info.state.messages,
        u64::try_from(placed.len() * 2)?,
        "every event once in the stream"
    );
    stack.stop().await;
    Ok(())
}
