//! Private infrastructure servers for the local stack: a Postgres cluster and
//! a nats-server with JetStream, from the binaries on the machine, with their
//! data under the stack's data directory.

use std::{
    fs,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::Duration,
};

use std::os::unix::process::CommandExt as _;

use anyhow::{Context as _, bail};
use sqlx::{Connection as _, PgConnection};

/// A child process we started and must stop.
#[derive(Debug)]
pub(crate) struct Managed {
    pub(crate) name: String,
    pub(crate) child: Child,
    /// Signal that asks it to stop quickly but cleanly.
    pub(crate) stop_signal: &'static str,
    /// A file whose first line is the pid to signal, when the child is a
    /// wrapper (`runuser`) that does not forward signals.
    pub(crate) pid_file: Option<PathBuf>,
}

impl Managed {
    /// The pid to signal: the server's own, not a wrapper's.
    fn target_pid(&self) -> String {
        self.pid_file
            .as_ref()
            .and_then(|f| fs::read_to_string(f).ok())
            .and_then(|s| s.lines().next().map(|l| l.trim().to_owned()))
            .unwrap_or_else(|| self.child.id().to_string())
    }

    /// Whether the process has exited.
    pub(crate) fn exited(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(Some(_)))
    }

    /// Sends `signal` (`KILL`, `TERM`, `QUIT`, ...) and waits up to `wait`
    /// for the process to exit; whether it did.
    pub(crate) async fn signal_and_wait(&mut self, signal: &str, wait: Duration) -> bool {
        if self.exited() {
            return true;
        }
        let pid = self.target_pid();
        let _ = Command::new("kill").args(["-s", signal, &pid]).status();
        let deadline = tokio::time::Instant::now() + wait;
        while tokio::time::Instant::now() < deadline {
            if self.exited() {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        false
    }

    /// Sends the stop signal and waits up to `grace`, then kills.
    pub(crate) async fn stop(mut self, grace: Duration) {
        if self.exited() {
            return;
        }
        if self.signal_and_wait(self.stop_signal, grace).await {
            tracing::info!(process = %self.name, "stopped");
            return;
        }
        tracing::warn!(process = %self.name, "did not stop in time; killing");
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A port that is free now.
pub(crate) fn free_port() -> anyhow::Result<u16> {
    Ok(platform::ports::free_port()?)
}

fn is_root() -> bool {
    fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .map(|l| l.split_whitespace().nth(1) == Some("0"))
        })
        .unwrap_or(false)
}

async fn wait_for_port(
    process: &mut Managed,
    port: u16,
    log: &Path,
    timeout: Duration,
) -> anyhow::Result<()> {
    let what = process.name.clone();
    let deadline = tokio::time::Instant::now() + timeout;
    while tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .is_err()
    {
        if let Ok(Some(status)) = process.child.try_wait() {
            bail!(
                "{what} exited at start-up ({status}); see {}",
                log.display()
            );
        }
        if tokio::time::Instant::now() > deadline {
            bail!(
                "{what} did not listen on port {port} within {timeout:?}; see {}",
                log.display()
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(())
}

pub(crate) fn log_file(path: &Path) -> anyhow::Result<Stdio> {
    Ok(Stdio::from(
        fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .with_context(|| format!("opening {}", path.display()))?,
    ))
}

/// Finds a binary: an explicit path from `env`, then `PATH`, then `extra` dirs.
fn find_binary(name: &str, env: &str, extra: &[PathBuf]) -> Option<PathBuf> {
    if let Some(path) = std::env::var_os(env) {
        return Some(PathBuf::from(path));
    }
    let path_dirs = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .unwrap_or_default();
    path_dirs
        .iter()
        .chain(extra)
        .map(|dir| dir.join(name))
        .find(|candidate| candidate.is_file())
}

fn nats_binary() -> Option<PathBuf> {
    find_binary(
        "nats-server",
        "NATS_SERVER_BIN",
        &[PathBuf::from("/usr/sbin")],
    )
}

/// Makes sure the servers the stack will start are installed: as root on
/// Debian/Ubuntu it installs what is missing with apt-get, exactly as
/// `scripts/test` does; otherwise it names the one command to run.
///
/// # Errors
///
/// When something is missing and cannot be installed here.
pub(crate) fn install_missing(nats: bool, postgres: bool) -> anyhow::Result<()> {
    let mut missing = Vec::new();
    if nats && nats_binary().is_none() {
        missing.push("nats-server");
    }
    if postgres && postgres_bin_dir().is_none() {
        missing.push("postgresql");
    }
    if missing.is_empty() {
        return Ok(());
    }
    let packages = missing.join(" ");
    let apt = find_binary("apt-get", "APT_GET_BIN", &[PathBuf::from("/usr/bin")]);
    let Some(apt) = apt.filter(|_| is_root()) else {
        bail!(
            "{packages} not installed. Install with:\n    sudo apt-get install -y {packages}\n\
             or use running servers with --nats-url / --postgres-url."
        );
    };
    eout!("shopctl: installing {packages} (apt-get)");
    let run = |args: &[&str]| -> anyhow::Result<()> {
        let status = Command::new(&apt)
            .args(args)
            .env("DEBIAN_FRONTEND", "noninteractive")
            .stdout(Stdio::null())
            .status()
            .with_context(|| format!("running apt-get {}", args.join(" ")))?;
        if !status.success() {
            bail!("apt-get {} failed ({status})", args.join(" "));
        }
        Ok(())
    };
    run(&["update", "-qq"])?;
    let mut install = vec!["install", "-y", "-qq"];
    install.extend(&missing);
    run(&install)
}

/// One nats-server of the stack: a lone one, or a node of a cluster.
#[derive(Debug, Clone)]
pub(crate) struct NatsNode {
    pub(crate) index: usize,
    pub(crate) port: u16,
    /// This node's route port and every node's route URL.
    cluster: Option<(u16, String)>,
}

impl NatsNode {
    /// Ports for a cluster of `size` nodes on loopback (one node: a lone
    /// server, no cluster).
    pub(crate) fn plan(size: usize) -> anyhow::Result<Vec<Self>> {
        let mut nodes = Vec::with_capacity(size);
        let mut routes = Vec::with_capacity(size);
        for index in 0..size {
            let route = free_port()?;
            routes.push(format!("nats://127.0.0.1:{route}"));
            nodes.push(Self {
                index,
                port: free_port()?,
                cluster: (size > 1).then_some((route, String::new())),
            });
        }
        let routes = routes.join(",");
        for node in &mut nodes {
            if let Some((_, all)) = &mut node.cluster {
                all.clone_from(&routes);
            }
        }
        Ok(nodes)
    }

    pub(crate) fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// `nats-server`, or `nats-N` in a cluster.
    pub(crate) fn name(&self) -> String {
        if self.cluster.is_some() {
            format!("nats-{}", self.index)
        } else {
            "nats-server".to_owned()
        }
    }

    /// The name the server gives itself (what JetStream reports as a
    /// stream's leader).
    pub(crate) fn server_name(&self) -> String {
        format!("shop-nats-{}", self.index)
    }

    /// Where its store and log live under `dir`.
    fn paths(&self, dir: &Path) -> (PathBuf, PathBuf) {
        if self.cluster.is_some() {
            (
                dir.join(format!("nats-{}", self.index)),
                dir.join(format!("nats-{}.log", self.index)),
            )
        } else {
            (dir.join("nats"), dir.join("nats.log"))
        }
    }
}

/// Every node's URL, comma-separated (what `APP_NATS_URL` takes).
pub(crate) fn nats_url(nodes: &[NatsNode]) -> String {
    nodes
        .iter()
        .map(NatsNode::url)
        .collect::<Vec<_>>()
        .join(",")
}

/// Starts `node` (again: a restart reuses its ports and store) and waits
/// until it listens.
pub(crate) async fn start_nats_node(dir: &Path, node: &NatsNode) -> anyhow::Result<Managed> {
    let binary = nats_binary().ok_or_else(|| {
        anyhow::anyhow!(
            "nats-server is not installed. Install it with:\n    sudo apt-get install -y nats-server\n\
             or point NATS_SERVER_BIN at a nats-server binary, or pass --nats-url to use a running server."
        )
    })?;
    let (store, log) = node.paths(dir);
    fs::create_dir_all(&store)?;
    let mut command = supervised(&binary, "TERM", false);
    command
        .args([
            "-js",
            "-a",
            "127.0.0.1",
            "-p",
            &node.port.to_string(),
            "-sd",
        ])
        .arg(&store);
    if let Some((route, routes)) = &node.cluster {
        command.args([
            "-n",
            &node.server_name(),
            "--cluster_name",
            "shop",
            "--cluster",
            &format!("nats://127.0.0.1:{route}"),
            "--routes",
            routes,
        ]);
    }
    let child = command
        .stdout(log_file(&log)?)
        .stderr(log_file(&log)?)
        .process_group(0)
        .spawn()
        .with_context(|| format!("starting {}", binary.display()))?;
    let mut managed = Managed {
        name: node.name(),
        child,
        stop_signal: "TERM",
        pid_file: None,
    };
    wait_for_port(&mut managed, node.port, &log, Duration::from_secs(15)).await?;
    Ok(managed)
}

/// Starts every node of `nodes` and waits until JetStream answers on each
/// (a cluster has elected its meta leader).
pub(crate) async fn start_nats_cluster(
    dir: &Path,
    nodes: &[NatsNode],
    started: &mut Vec<Managed>,
) -> anyhow::Result<()> {
    for node in nodes {
        started.push(start_nats_node(dir, node).await?);
    }
    for node in nodes {
        wait_jetstream(&node.url(), Duration::from_secs(30)).await?;
    }
    Ok(())
}

/// Waits until JetStream at `url` answers its info request without error.
pub(crate) async fn wait_jetstream(url: &str, timeout: Duration) -> anyhow::Result<()> {
    let deadline = tokio::time::Instant::now() + timeout;
    let mut last = String::new();
    while tokio::time::Instant::now() < deadline {
        // The raw API: async-nats cannot parse a 2.9 cluster node's account info.
        let answer = async {
            let client = async_nats::connect(url).await?;
            let reply = client.request("$JS.API.INFO", "".into()).await?;
            let info: serde_json::Value = serde_json::from_slice(&reply.payload)?;
            match info.get("error") {
                Some(error) => anyhow::bail!("{error}"),
                None => Ok(()),
            }
        };
        match answer.await {
            Ok(()) => return Ok(()),
            Err(error) => last = format!("{error:#}"),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    bail!("JetStream at {url} did not answer within {timeout:?}: {last}")
}

fn postgres_bin_dir() -> Option<PathBuf> {
    if let Some(dir) = std::env::var_os("PG_BIN") {
        return Some(PathBuf::from(dir));
    }
    if let Some(initdb) = find_binary("initdb", "PG_INITDB", &[]) {
        return initdb.parent().map(Path::to_path_buf);
    }
    // Debian keeps server binaries out of PATH, one directory per major version.
    let mut versions: Vec<PathBuf> = fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .filter_map(|e| e.ok().map(|e| e.path().join("bin")))
        .filter(|bin| bin.join("initdb").is_file() && bin.join("postgres").is_file())
        .collect();
    versions.sort_by_key(|p| {
        p.parent()
            .and_then(|v| v.file_name())
            .and_then(|v| v.to_str())
            .and_then(|v| v.parse::<u32>().ok())
            .unwrap_or(0)
    });
    versions.pop()
}

/// A command for a child that must not outlive `shopctl`: through util-linux
/// `setpriv --pdeathsig`, the kernel sends it `death_signal` when the thread
/// that started it dies, whatever the reason (SIGKILL included). As root,
/// `as_postgres` runs it as the `postgres` OS user (Postgres refuses root);
/// `setpriv` changes the user before setting the signal and then `exec`s, so
/// the child's pid is the server's own. The signal is tied to the *thread*
/// that spawns: `shopctl up` spawns from the main thread (inside
/// `Runtime::block_on`), which lives as long as the process.
pub(crate) fn supervised(binary: &Path, death_signal: &str, as_postgres: bool) -> Command {
    let as_postgres = as_postgres && is_root();
    let setpriv = find_binary("setpriv", "SETPRIV_BIN", &[PathBuf::from("/usr/bin")]);
    let mut command = match setpriv {
        Some(setpriv) => {
            let mut command = Command::new(setpriv);
            if as_postgres {
                command.args([
                    "--reuid",
                    "postgres",
                    "--regid",
                    "postgres",
                    "--init-groups",
                ]);
            }
            command
                .args(["--pdeathsig", death_signal, "--"])
                .arg(binary);
            command
        }
        None if as_postgres => {
            tracing::warn!(
                "util-linux setpriv not found: children will not stop if shopctl is killed \
                 (the next `up` stops them)"
            );
            let mut command = Command::new("runuser");
            command.args(["-u", "postgres", "--"]).arg(binary);
            command
        }
        None => {
            tracing::warn!(
                "util-linux setpriv not found: children will not stop if shopctl is killed \
                 (the next `up` stops them)"
            );
            Command::new(binary)
        }
    };
    // The postgres user may not be able to enter the caller's directory.
    command.current_dir("/");
    command
}

/// A one-shot Postgres tool (initdb), as the `postgres` user when root.
fn pg_command(binary: &Path) -> Command {
    supervised(binary, "KILL", true)
}

/// Whether the `postgres` OS user can reach (search) `dir`: every ancestor
/// must be searchable by it, which a 0700 home or `mktemp -d` is not.
fn postgres_can_reach(dir: &Path) -> bool {
    Command::new("runuser")
        .args(["-u", "postgres", "--", "test", "-x"])
        .arg(dir)
        .current_dir("/")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Where the private cluster keeps its data: `<data-dir>/postgres`, or, when
/// we are root and the `postgres` user cannot reach the data dir, a directory
/// under `/var/lib/shopctl/` that `<data-dir>/postgres` links to (so the
/// cluster is found again by the next `up`, and `ls -l` shows where it is).
/// Postgres must run as `postgres`; handing it the user's home by loosening
/// that home's permissions would be worse.
fn postgres_data_dir(dir: &Path) -> anyhow::Result<PathBuf> {
    let link = dir.join("postgres");
    if let Ok(target) = fs::read_link(&link) {
        return Ok(target);
    }
    if !is_root() || postgres_can_reach(dir) {
        return Ok(link);
    }
    if link.join("PG_VERSION").is_file() {
        bail!(
            "the postgres user cannot enter {} where a cluster already lives ({}); \
             give it access (e.g. chmod o+x on each parent) or move the data dir",
            dir.display(),
            link.display()
        );
    }
    // An empty directory an earlier, failed `up` made: replace it by the link.
    if link.is_dir() {
        fs::remove_dir(&link).with_context(|| format!("removing {}", link.display()))?;
    }
    let target = Path::new(FALLBACK_ROOT).join(fallback_name(dir));
    fs::create_dir_all(FALLBACK_ROOT).with_context(|| format!("creating {FALLBACK_ROOT}"))?;
    fs::create_dir_all(&target).with_context(|| format!("creating {}", target.display()))?;
    std::os::unix::fs::symlink(&target, &link)
        .with_context(|| format!("linking {} to {}", link.display(), target.display()))?;
    tracing::info!(
        dir = %target.display(),
        "the postgres user cannot enter {}; keeping the cluster in {}",
        dir.display(),
        target.display()
    );
    Ok(target)
}

/// Where clusters of data dirs the `postgres` user cannot reach live.
pub(crate) const FALLBACK_ROOT: &str = "/var/lib/shopctl";

/// A readable, unique directory name for `dir`: the tail of its path plus a
/// hash of all of it (`/a/b_c` and `/a_b/c` must not share a cluster).
fn fallback_name(dir: &Path) -> String {
    use std::hash::{Hash as _, Hasher as _};
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    dir.hash(&mut hasher);
    let readable: String = dir
        .to_string_lossy()
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
        .collect();
    let tail: String = readable
        .trim_matches('_')
        .chars()
        .rev()
        .take(80)
        .collect::<Vec<_>>()
        .into_iter()
        .rev()
        .collect();
    format!("{tail}-{:016x}", hasher.finish())
}

/// Starts a private Postgres on a free port (initdb on first use) and
/// returns its admin URL.
pub(crate) async fn start_postgres(dir: &Path) -> anyhow::Result<(Managed, String)> {
    start_postgres_at(dir, free_port()?).await
}

/// Starts the private Postgres of `dir` on `port` (a restart after a crash
/// reuses its port and runs crash recovery).
pub(crate) async fn start_postgres_at(dir: &Path, port: u16) -> anyhow::Result<(Managed, String)> {
    let bin = postgres_bin_dir().ok_or_else(|| {
        anyhow::anyhow!(
            "PostgreSQL server binaries (initdb, postgres) are not installed. Install them with:\n    \
             sudo apt-get install -y postgresql\n\
             or set PG_BIN to their directory, or pass --postgres-url to use a running server."
        )
    })?;
    let data = postgres_data_dir(dir)?;
    if !data.join("PG_VERSION").is_file() {
        fs::create_dir_all(&data)?;
        if is_root() {
            let status = Command::new("chown")
                .args(["-R", "postgres:postgres"])
                .arg(&data)
                .status()?;
            if !status.success() {
                bail!("cannot hand {} to the postgres user", data.display());
            }
        }
        tracing::info!(dir = %data.display(), "initialising a local Postgres cluster");
        let output = pg_command(&bin.join("initdb"))
            .args([
                "-U",
                "postgres",
                "-A",
                "trust",
                "-E",
                "UTF8",
                "--no-instructions",
                "-D",
            ])
            .arg(&data)
            .output()
            .context("running initdb")?;
        if !output.status.success() {
            bail!(
                "initdb failed:\n{}",
                String::from_utf8_lossy(&output.stderr)
            );
        }
    }
    let log = dir.join("postgres.log");
    if !log.exists() {
        fs::File::create(&log)?;
    }
    // SIGINT is Postgres's fast shutdown: clean, without waiting for clients.
    let child = supervised(&bin.join("postgres"), "INT", true)
        .arg("-D")
        .arg(&data)
        .args([
            "-p",
            &port.to_string(),
            "-c",
            "listen_addresses=127.0.0.1",
            "-c",
            "unix_socket_directories=",
            // Room for `--replicas 8` (about 470 connections) and the
            // tools: every replica keeps its own pools (user 10, order 20,
            // notification 24), follower sessions and LISTEN connections.
            "-c",
            "max_connections=600",
        ])
        .args(extra_settings())
        .stdout(log_file(&log)?)
        .stderr(log_file(&log)?)
        .process_group(0)
        .spawn()
        .context("starting postgres")?;
    // The postmaster's pid comes from its pid file (runuser may sit between).
    let mut managed = Managed {
        name: "postgres".to_owned(),
        child,
        stop_signal: "INT",
        pid_file: Some(data.join("postmaster.pid")),
    };
    let url = format!("postgres://postgres@127.0.0.1:{port}/postgres");
    wait_for_port(&mut managed, port, &log, Duration::from_secs(30)).await?;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while let Err(error) = PgConnection::connect(&url).await {
        if tokio::time::Instant::now() > deadline {
            bail!(
                "postgres did not accept connections: {error} (see {})",
                log.display()
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Ok((managed, url))
}

/// `SHOP_POSTGRES_SETTINGS="a=1 b=2"`: extra server settings for the private
/// cluster (the benchmark loads `pg_stat_statements` this way).
fn extra_settings() -> Vec<String> {
    std::env::var("SHOP_POSTGRES_SETTINGS")
        .unwrap_or_default()
        .split_whitespace()
        .flat_map(|setting| ["-c".to_owned(), setting.to_owned()])
        .collect()
}

/// Creates each database on the server behind `admin_url` unless it exists;
/// returns one URL per database.
pub(crate) async fn ensure_databases(
    admin_url: &str,
    names: &[&str],
) -> anyhow::Result<Vec<String>> {
    let mut conn = PgConnection::connect(admin_url).await.map_err(|error| {
        anyhow::anyhow!(
            "cannot connect to Postgres at {}: {}",
            crate::admin::where_postgres(admin_url),
            crate::admin::sqlx_cause(&error)
        )
    })?;
    let (base, _) = admin_url.rsplit_once('/').ok_or_else(|| {
        anyhow::anyhow!(
            "the Postgres URL must end in /<database>: {}",
            crate::admin::where_postgres(admin_url)
        )
    })?;
    let mut urls = Vec::with_capacity(names.len());
    for name in names {
        let exists: bool =
            sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_database WHERE datname = $1)")
                .bind(name)
                .fetch_one(&mut conn)
                .await?;
        if !exists {
            sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE \"{name}\"")))
                .execute(&mut conn)
                .await?;
        }
        urls.push(format!("{base}/{name}"));
    }
    Ok(urls)
}
