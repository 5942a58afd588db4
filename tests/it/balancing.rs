//! Clients balanced over replicas (`platform::net::channel`): a replica
//! that dies stops getting calls. tonic's own balancer kept it and failed
//! its share of calls with UNAVAILABLE until it came back (found by
//! `shopctl chaos kill-relay-leader`: 206 failed calls in a 3 s outage).

use std::time::Duration;

use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};

/// A gRPC server with only the health service, on `port`, until `stop`.
fn health_server(
    port: u16,
) -> (
    tokio::sync::oneshot::Sender<()>,
    tokio::task::JoinHandle<()>,
) {
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let (_, service) = tonic_health::server::health_reporter();
    let task = tokio::spawn(async move {
        let _ = tonic::transport::Server::builder()
            .add_service(service)
            .serve_with_shutdown(([127, 0, 0, 1], port).into(), async {
                let _ = stopped.await;
            })
            .await;
    });
    (stop, task)
}

/// Failed calls out of `n` health checks through `channel`.
async fn failures(channel: &tonic::transport::Channel, n: usize) -> usize {
    let mut failed = 0;
    for _ in 0..n {
        let mut client = HealthClient::new(channel.clone());
        let call = client.check(HealthCheckRequest::default());
        if !matches!(
            tokio::time::timeout(Duration::from_secs(3), call).await,
            Ok(Ok(_))
        ) {
            failed += 1;
        }
    }
    failed
}

#[tokio::test]
async fn a_balanced_channel_stops_calling_a_replica_that_died() -> anyhow::Result<()> {
    let ports = [testkit::free_port(), testkit::free_port()];
    let (_keep, _first) = health_server(ports[0]);
    let (stop, second) = health_server(ports[1]);
    let endpoints = ports
        .iter()
        .map(|p| {
            Ok(
                tonic::transport::Endpoint::from_shared(format!("http://127.0.0.1:{p}"))?
                    .connect_timeout(Duration::from_secs(1)),
            )
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let channel = platform::net::channel(endpoints);
    // Both answer (the servers may take a moment to listen).
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while failures(&channel, 10).await > 0 {
        anyhow::ensure!(
            tokio::time::Instant::now() < deadline,
            "the servers never answered"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    let _ = stop.send(());
    second.await?;
    // One probe later the dead replica is out of the balancer.
    tokio::time::sleep(platform::net::PROBE_EVERY * 3).await;

    assert_eq!(
        failures(&channel, 40).await,
        0,
        "every call went to the live replica"
    );
    Ok(())
}
