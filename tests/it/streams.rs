//! Stream settings are applied on restart (issue 13, defect 3): they were
//! silently ignored on existing streams (`get_or_create_stream`).

use std::time::Duration;

use messaging::{ORDERS_STREAM, StreamLimits, declare_stream, ensure_stream};

#[tokio::test]
async fn a_restart_with_other_stream_settings_applies_them_and_names_what_it_cannot()
-> anyhow::Result<()> {
    let nats = testkit::NatsServer::start().await?;
    let js = async_nats::jetstream::new(async_nats::connect(nats.url()).await?);
    let first = StreamLimits {
        replicas: 1,
        max_age_secs: 7 * 86_400,
        duplicate_window_secs: 120,
    };
    let (_, created) = declare_stream(&js, ORDERS_STREAM, &first).await?;
    assert_eq!(created, messaging::Reconciled::default(), "a new stream");

    let second = StreamLimits {
        max_age_secs: 3600,
        duplicate_window_secs: 30,
        ..first.clone()
    };
    let (mut stream, reconciled) = declare_stream(&js, ORDERS_STREAM, &second).await?;
    let config = stream.info().await?.config.clone();
    assert_eq!(config.duplicate_window, Duration::from_secs(30));
    assert_eq!(config.max_age, Duration::from_secs(3600));
    assert_eq!(reconciled.changed.len(), 2, "{reconciled:?}");
    assert!(reconciled.refused.is_empty(), "{reconciled:?}");

    // Three replicas on a single server: JetStream refuses, and says so.
    let third = StreamLimits {
        replicas: 3,
        duplicate_window_secs: 60,
        ..second.clone()
    };
    let (mut stream, reconciled) = declare_stream(&js, ORDERS_STREAM, &third).await?;
    assert!(
        reconciled.refused.iter().any(|r| r.starts_with("replicas")),
        "{reconciled:?}"
    );
    assert!(
        reconciled
            .changed
            .iter()
            .any(|c| c.starts_with("duplicate_window")),
        "what can change still does: {reconciled:?}"
    );
    let info = stream.info().await?;
    assert_eq!(
        info.cluster.as_ref().map_or(0, |c| c.replicas.len()),
        0,
        "one copy, whatever the config records"
    );
    assert_eq!(info.config.duplicate_window, Duration::from_secs(60));

    // A new stream with three replicas on one server is an error at start.
    let fresh = declare_stream(&js, messaging::USERS_STREAM, &third)
        .await
        .expect_err("one server cannot hold three copies");
    assert!(fresh.to_string().contains("replicas"), "{fresh}");

    // A reader declaring the stream leaves the owner's settings alone.
    let mut read = ensure_stream(&js, ORDERS_STREAM, &StreamLimits::default()).await?;
    assert_eq!(
        read.info().await?.config.duplicate_window,
        Duration::from_secs(60)
    );
    Ok(())
}

/// A NATS connection that stops answering (the node died, the link went
/// silent) costs a batch one ack timeout, not one per message in flight:
/// awaited one by one, each ack's timeout started only when the previous one
/// ended, and a killed node stalled the relay for its whole step deadline
/// (found by `shopctl chaos kill-nats-node`).
#[tokio::test]
async fn a_silent_connection_costs_a_batch_one_ack_timeout_not_one_per_message()
-> anyhow::Result<()> {
    let nats = testkit::NatsServer::start().await?;
    let upstream = nats.url().trim_start_matches("nats://").parse()?;
    let link = testkit::TcpProxy::start(upstream).await?;
    let mut js =
        async_nats::jetstream::new(async_nats::connect(format!("nats://{}", link.addr())).await?);
    let limits = StreamLimits {
        replicas: 1,
        max_age_secs: 3600,
        duplicate_window_secs: 120,
    };
    ensure_stream(&js, ORDERS_STREAM, &limits).await?;
    let timeout = Duration::from_millis(300);
    js.set_timeout(timeout);
    let messages: Vec<_> = (0..20)
        .map(|i| messaging::OutboundMessage {
            subject: "order.created".to_owned(),
            message_id: format!("silent-{i}"),
            headers: Vec::new(),
            payload: b"x".to_vec().into(),
        })
        .collect();

    link.set(testkit::Link::Blackhole);
    let started = std::time::Instant::now();
    let results = messaging::publish_each(&js, &messages).await;
    let took = started.elapsed();

    for result in &results {
        let timed_out = matches!(
            result,
            Err(messaging::MessagingError::Publish { source, .. })
                if source.kind() == async_nats::jetstream::context::PublishErrorKind::TimedOut
        );
        assert!(timed_out, "every ack timed out: {result:?}");
    }
    // One by one this takes 20 x 300 ms = 6 s; together, one timeout.
    assert!(
        took >= timeout && took < timeout * 6,
        "{took:?} for 20 messages with a {timeout:?} ack timeout"
    );
    Ok(())
}
