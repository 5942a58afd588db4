//! A private `nats-server` process with JetStream, per test.

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

    /// SIGKILLs the server (its store survives for [`Self::start_again`]).
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        self.kill();
    }
}
