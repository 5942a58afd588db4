//! The NATS connection every service uses.

use std::time::Duration;

use async_nats::jetstream;

/// The servers of a NATS URL: one `nats://host:port`, or several separated
/// by commas (the nodes of a cluster; the client picks one and fails over
/// to the others, and learns the rest of the cluster from the server).
#[must_use]
pub fn servers(url: &str) -> Vec<&str> {
    crate::net::urls(url)
}

/// Connects to NATS (any of the servers of `url`, see [`servers`]),
/// retrying until `wait` has passed, and returns a JetStream context. Later disconnects are handled by the client, which
/// reconnects forever.
///
/// # Errors
///
/// Fails when the server stays unreachable for `wait`.
pub async fn connect(
    url: &str,
    name: &str,
    wait: Duration,
) -> Result<(async_nats::Client, jetstream::Context), crate::StartError> {
    let deadline = tokio::time::Instant::now() + wait;
    loop {
        let options = async_nats::ConnectOptions::new()
            .name(name)
            .retry_on_initial_connect()
            .max_reconnects(None)
            .connection_timeout(Duration::from_secs(2));
        // `retry_on_initial_connect` returns at once; prove the link with a flush.
        let attempt = match options.connect(servers(url)).await {
            Ok(client) => {
                match tokio::time::timeout(Duration::from_secs(2), client.flush()).await {
                    Ok(Ok(())) => Ok(client),
                    Ok(Err(error)) => Err(error.to_string()),
                    Err(_) => Err("no answer within 2s".to_owned()),
                }
            }
            Err(error) => Err(error.to_string()),
        };
        match attempt {
            Ok(client) => {
                let js = jetstream::new(client.clone());
                return Ok((client, js));
            }
            Err(error) if tokio::time::Instant::now() < deadline => {
                tracing::warn!(%error, url, "nats not reachable yet; retrying");
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
            Err(error) => return Err(crate::StartError::nats(url, error)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::servers;

    #[test]
    fn a_url_names_one_server_or_a_comma_separated_cluster() {
        assert_eq!(servers("nats://127.0.0.1:4222"), ["nats://127.0.0.1:4222"]);
        assert_eq!(
            servers("nats://a:1, nats://b:2,nats://c:3,"),
            ["nats://a:1", "nats://b:2", "nats://c:3"]
        );
    }
}
