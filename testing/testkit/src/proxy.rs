//! A TCP proxy between a service and its peer (NATS, Postgres,
//! user-service), for fault injection and for counting what reaches the
//! peer's address. `tc netem` is not available on these machines, and a
//! user-space proxy works without root. Faults apply to connections already
//! open as well as to new ones. Tests and `shopctl chaos` both use it.

use std::{
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::{TcpListener, TcpStream},
    sync::watch,
    task::JoinHandle,
};

/// What the link does to traffic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Link {
    /// Bytes flow.
    Up,
    /// A partition: nothing flows either way (both ends keep their
    /// sockets and see silence, as when packets are dropped); new
    /// connections are accepted (and connected upstream) but carry nothing.
    /// Healing lets the held bytes go.
    Blackhole,
    /// Every chunk waits this long in each direction.
    Latency(Duration),
}

/// Forwards every connection to `upstream` under the current [`Link`].
/// Counts connection attempts.
#[derive(Debug)]
pub struct TcpProxy {
    addr: SocketAddr,
    link: watch::Sender<Link>,
    connections: Arc<AtomicUsize>,
    task: JoinHandle<()>,
}

impl TcpProxy {
    /// Listens on a free loopback port.
    ///
    /// # Errors
    ///
    /// When no port can be bound.
    pub async fn start(upstream: SocketAddr) -> anyhow::Result<Self> {
        Self::start_on(0, upstream).await
    }

    /// Listens on loopback `port` (0: any free one).
    ///
    /// # Errors
    ///
    /// When the port cannot be bound.
    pub async fn start_on(port: u16, upstream: SocketAddr) -> anyhow::Result<Self> {
        let listener = TcpListener::bind(("127.0.0.1", port)).await?;
        let addr = listener.local_addr()?;
        let (link, watching) = watch::channel(Link::Up);
        let connections = Arc::new(AtomicUsize::new(0));
        let counter = connections.clone();
        let task = tokio::spawn(async move {
            while let Ok((inbound, _)) = listener.accept().await {
                counter.fetch_add(1, Ordering::SeqCst);
                let _ = inbound.set_nodelay(true);
                let watching = watching.clone();
                tokio::spawn(async move {
                    // A dead upstream: the client sees the connection close.
                    if let Ok(outbound) = TcpStream::connect(upstream).await {
                        let _ = outbound.set_nodelay(true);
                        forward(inbound, outbound, watching).await;
                    }
                });
            }
        });
        Ok(Self {
            addr,
            link,
            connections,
            task,
        })
    }

    #[must_use]
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Connections accepted so far.
    #[must_use]
    pub fn connections(&self) -> usize {
        self.connections.load(Ordering::SeqCst)
    }

    /// Cuts, slows or heals the link.
    pub fn set(&self, link: Link) {
        self.link.send_replace(link);
    }
}

impl Drop for TcpProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn forward(inbound: TcpStream, outbound: TcpStream, link: watch::Receiver<Link>) {
    let (in_read, in_write) = inbound.into_split();
    let (out_read, out_write) = outbound.into_split();
    let up = pump(in_read, out_write, link.clone());
    let down = pump(out_read, in_write, link);
    // When one direction ends, so does the connection.
    tokio::select! {
        () = up => {}
        () = down => {}
    }
}

async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    mut link: watch::Receiver<Link>,
) {
    // Chunks are read as they come and written when their delay is up, so
    // latency delays each byte without limiting the bandwidth.
    let (chunks, mut queued) = tokio::sync::mpsc::channel::<(Instant, Vec<u8>)>(256);
    let mut reading = link.clone();
    let reader = async move {
        let mut buffer = vec![0_u8; 64 * 1024];
        'reading: loop {
            // Wait out a partition before reading, so the sender's kernel
            // buffers fill and it sees no progress.
            while *reading.borrow_and_update() == Link::Blackhole {
                if reading.changed().await.is_err() {
                    break 'reading;
                }
            }
            let n = match from.read(&mut buffer).await {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            if chunks
                .send((Instant::now(), buffer[..n].to_vec()))
                .await
                .is_err()
            {
                break;
            }
        }
        // The writer drains what was read, then ends.
        drop(chunks);
    };
    let writer = async move {
        while let Some((read_at, chunk)) = queued.recv().await {
            let mode = *link.borrow_and_update();
            if let Link::Latency(delay) = mode {
                tokio::time::sleep_until((read_at + delay).into()).await;
            }
            // A partition holds what was read before it began, too.
            while *link.borrow_and_update() == Link::Blackhole {
                if link.changed().await.is_err() {
                    return;
                }
            }
            if to.write_all(&chunk).await.is_err() {
                return;
            }
        }
    };
    tokio::pin!(reader, writer);
    tokio::select! {
        () = &mut writer => {}
        () = &mut reader => writer.await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn echo_server() -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("test setup");
        let addr = listener.local_addr().expect("test setup");
        tokio::spawn(async move {
            while let Ok((mut socket, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let (mut r, mut w) = socket.split();
                    let _ = tokio::io::copy(&mut r, &mut w).await;
                });
            }
        });
        addr
    }

    async fn round_trip(stream: &mut TcpStream, wait: Duration) -> Option<Duration> {
        let started = std::time::Instant::now();
        stream.write_all(b"ping").await.ok()?;
        let mut answer = [0_u8; 4];
        tokio::time::timeout(wait, stream.read_exact(&mut answer))
            .await
            .ok()?
            .ok()?;
        Some(started.elapsed())
    }

    #[tokio::test]
    async fn a_blackhole_holds_traffic_on_open_connections_until_it_heals() {
        let proxy = TcpProxy::start(echo_server().await)
            .await
            .expect("test setup");
        let mut stream = TcpStream::connect(proxy.addr()).await.expect("test setup");
        assert!(
            round_trip(&mut stream, Duration::from_secs(2))
                .await
                .is_some()
        );
        proxy.set(Link::Blackhole);
        assert!(
            round_trip(&mut stream, Duration::from_millis(300))
                .await
                .is_none(),
            "bytes crossed a partition"
        );
        proxy.set(Link::Up);
        // The held ping and a new one both come back.
        let mut answer = [0_u8; 8];
        stream.write_all(b"ping").await.expect("test setup");
        tokio::time::timeout(Duration::from_secs(2), stream.read_exact(&mut answer))
            .await
            .expect("healed link delivers")
            .expect("test setup");
    }

    #[tokio::test]
    async fn latency_delays_each_direction() {
        let proxy = TcpProxy::start(echo_server().await)
            .await
            .expect("test setup");
        let mut stream = TcpStream::connect(proxy.addr()).await.expect("test setup");
        proxy.set(Link::Latency(Duration::from_millis(100)));
        let took = round_trip(&mut stream, Duration::from_secs(2))
            .await
            .expect("test setup");
        assert!(took >= Duration::from_millis(200), "round trip {took:?}");
    }

    #[tokio::test]
    async fn latency_delays_bytes_without_queueing_them_behind_each_other() {
        let proxy = TcpProxy::start(echo_server().await)
            .await
            .expect("test setup");
        let mut stream = TcpStream::connect(proxy.addr()).await.expect("test setup");
        proxy.set(Link::Latency(Duration::from_millis(100)));
        let started = std::time::Instant::now();
        // Ten writes 20 ms apart: one chunk each, in flight together.
        for _ in 0..10 {
            stream.write_all(b"ping").await.expect("test setup");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let mut answer = [0_u8; 40];
        tokio::time::timeout(Duration::from_secs(5), stream.read_exact(&mut answer))
            .await
            .expect("every ping comes back")
            .expect("test setup");
        let took = started.elapsed();
        // Pipelined: ~180 ms of writes + 200 ms of delay, not 10 x 200 ms.
        assert!(
            took >= Duration::from_millis(380) && took < Duration::from_millis(1500),
            "ten pings took {took:?}"
        );
    }
}
