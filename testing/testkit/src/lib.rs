//! Test kit: real infrastructure for tests and for `shopctl chaos`, never
//! mocks.
//!
//! - [`TestDb`]: a fresh database per test on the test Postgres server
//!   (`SHOP_TEST_DATABASE_URL`, default `postgres://postgres@127.0.0.1:5432/postgres`).
//! - [`NatsServer`]: a private `nats-server -js` process per test, on a free
//!   port, that the test can stop and start again.
//! - [`PgServer`]: a private Postgres cluster a test can crash and restart.
//! - [`TestStack`]: the three services in-process on port 0, wired to those,
//!   with typed clients.
//! - [`TcpProxy`]: a fault proxy between a service and its peer (partition,
//!   latency; see [`Link`]) that counts what reaches the peer.
//! - [`SmtpSink`] and [`WebhookReceiver`]: real SMTP and HTTP peers for the
//!   notification channels.
//! - [`Certs`] and [`TlsTerminator`]: certificates from the real `openssl`
//!   tool, and TLS in front of a plaintext peer.

mod nats;
mod pg;
mod pg_server;
mod proxy;
mod smtp;
mod stack;
mod tls;
mod webhook;

pub use nats::{NatsCluster, NatsServer};
pub use pg::TestDb;
pub use pg_server::PgServer;
pub use proxy::{Link, TcpProxy};
pub use smtp::{Mail, SmtpSink};
pub use stack::{TEST_SIGNING_KEY, TestStack, bearer};
pub use tls::{Certs, TlsTerminator};
pub use webhook::{Hit, WebhookReceiver};

/// Installs test logging once (`RUST_LOG` to see service logs).
pub fn init_logging() {
    use tracing_subscriber::{EnvFilter, fmt};
    let _ = fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("warn")),
        )
        .with_test_writer()
        .try_init();
}

/// A port that was free a moment ago.
///
/// # Panics
///
/// If the OS has no free port.
#[must_use]
pub fn free_port() -> u16 {
    #[allow(clippy::unwrap_used)]
    platform::ports::free_port().unwrap()
}

/// Polls `check` every 50 ms until it returns `Some`, or fails after `timeout`.
///
/// # Errors
///
/// When `timeout` passes first; the error says what was awaited.
pub async fn eventually<T, F, Fut>(
    what: &str,
    timeout: std::time::Duration,
    mut check: F,
) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if let Some(value) = check().await {
            return Ok(value);
        }
        if tokio::time::Instant::now() >= deadline {
            anyhow::bail!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

/// A plain HTTP/1.1 GET (admin endpoints): status code and body.
///
/// # Errors
///
/// When the connection fails or the answer is not HTTP.
pub async fn http_get(addr: std::net::SocketAddr, path: &str) -> anyhow::Result<(u16, String)> {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let mut stream = tokio::net::TcpStream::connect(addr).await?;
    stream
        .write_all(
            format!("GET {path} HTTP/1.1\r\nHost: admin\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .await?;
    let mut response = String::new();
    stream.read_to_string(&mut response).await?;
    let status = response
        .split_whitespace()
        .nth(1)
        .ok_or_else(|| anyhow::anyhow!("not an HTTP answer: {response:?}"))?
        .parse()?;
    let body = response
        .split_once("\r\n\r\n")
        .map_or("", |(_, b)| b)
        .to_owned();
    Ok((status, body))
}

/// The value of the sample `name{labels}` in a Prometheus text exposition
/// (`labels` as written, e.g. `type="order.created"`; empty for none).
#[must_use]
pub fn metric(exposition: &str, name: &str, labels: &str) -> Option<f64> {
    exposition.lines().find_map(|line| {
        let (series, value) = line.rsplit_once(' ')?;
        let matches = if labels.is_empty() {
            series == name
        } else {
            series
                .strip_prefix(name)?
                .strip_prefix('{')?
                .strip_suffix('}')?
                .split(',')
                .collect::<Vec<_>>()
                == labels.split(',').collect::<Vec<_>>()
                || series == format!("{name}{{{labels}}}")
        };
        if matches { value.parse().ok() } else { None }
    })
}
