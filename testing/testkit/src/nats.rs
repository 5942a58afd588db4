//! A private `nats-server` process with JetStream, per test, or a cluster
//! of them on loopback ports.

use std::{
    path::PathBuf,
    process::{Child, Command, Stdio},
    time::Duration,
};

/// A running (or stopped) private nats-server. Killed on drop.
#[derive(Debug)]
pub struct NatsServer {
    port: u16,
    store: tempfile::TempDir,
    /// Cluster arguments (name, routes), empty for a lone server.
    args: Vec<String>,
    child: Option<Child>,
}

/// `NATS_SERVER_BIN`, else `nats-server` on PATH, else Debian's path.
fn binary() -> PathBuf {
    if let Some(path) = std::env::var_os("NATS_SERVER_BIN") {
        return PathBuf::from(path);
    }
    let debian = PathBuf::from("/usr/sbin/nats-server");
    if debian.exists() {
        return debian;
    }
    PathBuf::from("nats-server")
}

impl NatsServer {
    /// Starts a server on a free port and waits until it accepts connections.
    ///
    /// # Errors
    ///
    /// When the binary is missing (the message says how to install it) or the
    /// server does not come up within 10 s.
    pub async fn start() -> anyhow::Result<Self> {
        let mut server = Self {
            port: crate::free_port(),
            store: tempfile::tempdir()?,
            args: Vec::new(),
            child: None,
        };
        server.start_again().await?;
        Ok(server)
    }

    #[must_use]
    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// Starts the server again on the same port and store (after [`Self::kill`]).
    ///
    /// # Errors
    ///
    /// As [`Self::start`].
    pub async fn start_again(&mut self) -> anyhow::Result<()> {
        let child = Command::new(binary())
            .args(["-js", "-a", "127.0.0.1", "-p", &self.port.to_string(), "-sd"])
            .arg(self.store.path())
            .args(&self.args)
            .arg("-l")
            .arg(self.store.path().join("nats.log"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| {
                anyhow::anyhow!(
                    "cannot start nats-server ({e}); install it with `apt-get install -y nats-server` \
                     or set NATS_SERVER_BIN"
                )
            })?;
        self.child = Some(child);
        let addr = format!("127.0.0.1:{}", self.port);
        crate::eventually("nats-server to listen", Duration::from_secs(10), || async {
            tokio::net::TcpStream::connect(&addr).await.ok()
        })
        .await?;
        Ok(())
    }

    /// The last lines of the server's log, for a failure's message.
    #[must_use]
    pub fn log_tail(&self) -> String {
        let log = std::fs::read_to_string(self.store.path().join("nats.log")).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        format!(
            "nats-server :{}:\n{}",
            self.port,
            lines[lines.len().saturating_sub(15)..].join("\n")
        )
    }

    /// SIGKILLs the server (its store survives for [`Self::start_again`]).
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// `size` nats-servers clustered on loopback ports (JetStream clustering:
/// streams with replicas up to `size`). Killed on drop.
#[derive(Debug)]
pub struct NatsCluster {
    pub nodes: Vec<NatsServer>,
}

impl NatsCluster {
    /// Starts the nodes and waits until JetStream answers on every one (a
    /// meta leader is elected).
    ///
    /// # Errors
    ///
    /// As [`NatsServer::start`], or when the cluster does not form in 30 s.
    pub async fn start(size: usize) -> anyhow::Result<Self> {
        let routes: Vec<u16> = (0..size).map(|_| crate::free_port()).collect();
        let route_urls = routes
            .iter()
            .map(|port| format!("nats://127.0.0.1:{port}"))
            .collect::<Vec<_>>()
            .join(",");
        let mut nodes = Vec::with_capacity(size);
        for (n, route) in routes.iter().enumerate() {
            let mut node = NatsServer {
                port: crate::free_port(),
                store: tempfile::tempdir()?,
                args: vec![
                    "-n".to_owned(),
                    format!("node-{n}"),
                    "--cluster_name".to_owned(),
                    "shop".to_owned(),
                    "--cluster".to_owned(),
                    format!("nats://127.0.0.1:{route}"),
                    "--routes".to_owned(),
                    route_urls.clone(),
                ],
                child: None,
            };
            node.start_again().await?;
            nodes.push(node);
        }
        let cluster = Self { nodes };
        cluster.wait_ready().await?;
        Ok(cluster)
    }

    /// Every node's URL, comma-separated (what `APP_NATS_URL` takes).
    #[must_use]
    pub fn url(&self) -> String {
        self.nodes
            .iter()
            .map(NatsServer::url)
            .collect::<Vec<_>>()
            .join(",")
    }

    /// Waits until JetStream answers on every running node.
    ///
    /// # Errors
    ///
    /// When it does not within 30 s.
    pub async fn wait_ready(&self) -> anyhow::Result<()> {
        self.probe().await.map_err(|error| {
            let logs: Vec<String> = self.nodes.iter().map(NatsServer::log_tail).collect();
            error.context(logs.join("\n"))
        })
    }

    async fn probe(&self) -> anyhow::Result<()> {
        for node in self.nodes.iter().filter(|n| n.child.is_some()) {
            let url = node.url();
            let last = std::sync::Mutex::new(String::new());
            let ready = crate::eventually(
                "JetStream on every node",
                Duration::from_secs(30),
                || async {
                    let answer = async {
                        // The raw API: async-nats cannot parse the account
                        // info a 2.9 cluster node sends.
                        let client = async_nats::connect(&url).await?;
                        let reply = client.request("$JS.API.INFO", "".into()).await?;
                        let info: serde_json::Value = serde_json::from_slice(&reply.payload)?;
                        match info.get("error") {
                            Some(error) => Err(anyhow::anyhow!("JetStream: {error}")),
                            None => Ok(info),
                        }
                    }
                    .await;
                    answer
                        .map_err(|error| {
                            if let Ok(mut last) = last.lock() {
                                *last = format!("{url}: {error:#}");
                            }
                        })
                        .ok()
                },
            )
            .await;
            if let Err(error) = ready {
                let last = last.lock().map(|l| l.clone()).unwrap_or_default();
                return Err(error.context(format!("last answer: {last}")));
            }
        }
        Ok(())
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        self.kill();
    }
}
