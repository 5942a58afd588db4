//! A private Postgres cluster a test can stop (`-m immediate`, like a crash)
//! and start again.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

/// A private cluster on a free port; stopped on drop.
#[derive(Debug)]
pub struct PgServer {
    dir: tempfile::TempDir,
    bin: PathBuf,
    port: u16,
}

fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status").is_ok_and(|s| {
        s.lines()
            .find(|l| l.starts_with("Uid:"))
            .is_some_and(|l| l.split_whitespace().nth(1) == Some("0"))
    })
}

fn bin_dir() -> anyhow::Result<PathBuf> {
    if let Some(dir) = std::env::var_os("PG_BIN") {
        return Ok(PathBuf::from(dir));
    }
    let mut found: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")?
        .filter_map(|e| e.ok().map(|e| e.path().join("bin")))
        .filter(|bin| bin.join("pg_ctl").is_file())
        .collect();
    found.sort();
    found.pop().ok_or_else(|| {
        anyhow::anyhow!("no PostgreSQL server binaries: apt-get install -y postgresql")
    })
}

/// Runs a Postgres tool, as the `postgres` user when we are root.
fn run(binary: &Path, args: &[&str]) -> anyhow::Result<()> {
    let mut command = if is_root() {
        let mut c = Command::new("runuser");
        c.args(["-u", "postgres", "--"]).arg(binary);
        c
    } else {
        Command::new(binary)
    };
    let output = command.args(args).output()?;
    anyhow::ensure!(
        output.status.success(),
        "{} {args:?} failed: {}",
        binary.display(),
        String::from_utf8_lossy(&output.stderr)
    );
    Ok(())
}

impl PgServer {
    /// initdb and start (a few seconds).
    ///
    /// # Errors
    ///
    /// When the server binaries are missing or the cluster does not start.
    pub async fn start() -> anyhow::Result<Self> {
        let bin = bin_dir()?;
        let dir = tempfile::tempdir()?;
        if is_root() {
            let status = Command::new("chown")
                .args(["-R", "postgres:postgres"])
                .arg(dir.path())
                .status()?;
            anyhow::ensure!(status.success(), "chown failed");
        }
        let server = Self {
            dir,
            bin,
            port: crate::free_port(),
        };
        let data = server.data();
        let initdb = server.bin.join("initdb");
        tokio::task::spawn_blocking(move || {
            run(
                &initdb,
                &["-D", &data, "-U", "postgres", "-A", "trust", "--no-sync"],
            )
        })
        .await??;
        server.start_again().await?;
        Ok(server)
    }

    fn data(&self) -> String {
        self.dir.path().join("data").display().to_string()
    }

    /// The admin URL (database `postgres`).
    #[must_use]
    pub fn url(&self) -> String {
        self.database_url("postgres")
    }

    /// The URL of `database` on this server.
    #[must_use]
    pub fn database_url(&self, database: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{database}", self.port)
    }

    /// Starts the (stopped) cluster and waits until it accepts connections.
    ///
    /// # Errors
    ///
    /// When it does not start.
    pub async fn start_again(&self) -> anyhow::Result<()> {
        let options = format!(
            "-p {} -c listen_addresses=127.0.0.1 -c unix_socket_directories= -c fsync=off",
            self.port
        );
        let log = self.dir.path().join("log").display().to_string();
        let (pg_ctl, data) = (self.bin.join("pg_ctl"), self.data());
        tokio::task::spawn_blocking(move || {
            run(
                &pg_ctl,
                &["-D", &data, "-l", &log, "-o", &options, "-w", "start"],
            )
        })
        .await??;
        Ok(())
    }

    /// Stops it like a crash would (`pg_ctl stop -m immediate`).
    ///
    /// # Errors
    ///
    /// When pg_ctl fails.
    pub async fn crash(&self) -> anyhow::Result<()> {
        let (pg_ctl, data) = (self.bin.join("pg_ctl"), self.data());
        tokio::task::spawn_blocking(move || {
            run(&pg_ctl, &["-D", &data, "-m", "immediate", "stop"])
        })
        .await??;
        Ok(())
    }
}

impl Drop for PgServer {
    fn drop(&mut self) {
        let _ = run(
            &self.bin.join("pg_ctl"),
            &["-D", &self.data(), "-m", "immediate", "stop"],
        );
    }
}
