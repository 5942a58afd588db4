//! The service binaries' command line: they are configured by `APP_...`
//! environment variables only, so they take no arguments; `--help`,
//! `--version`, `--env` (every variable the binary reads, with its default)
//! and `--healthcheck` (exit 0 when the running service's `/readyz` says
//! ready: the container health check of images without a shell) answer and
//! exit instead of starting the service; anything else is refused rather
//! than ignored.

/// What the command line asked for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Invocation {
    /// No arguments: start the service.
    Run,
    /// Print this text to stdout and exit 0.
    Print(String),
    /// Print every variable the binary reads, with its default, and exit 0.
    Env,
    /// Ask the running service's `/readyz`; exit 0 when ready, else 1.
    Healthcheck,
    /// Print this text to stderr and exit 2.
    Refuse(String),
}

/// Decides what `args` (without the program name) ask of `service`.
#[must_use]
pub fn invocation(service: &str, version: &str, args: &[String]) -> Invocation {
    match args.first().map(String::as_str) {
        None => Invocation::Run,
        Some("-h" | "--help") if args.len() == 1 => Invocation::Print(help(service, version)),
        Some("-V" | "--version") if args.len() == 1 => {
            Invocation::Print(format!("{service} {version}\n"))
        }
        Some("--env") if args.len() == 1 => Invocation::Env,
        Some("--healthcheck") if args.len() == 1 => Invocation::Healthcheck,
        Some(_) => Invocation::Refuse(format!(
            "{service} takes no arguments (it is configured by APP_... environment variables); \
             try `{service} --help`\n"
        )),
    }
}

fn help(service: &str, version: &str) -> String {
    format!(
        "{service} {version}: one of the shop's services.\n\n\
         Usage: {service} [--help | --version | --env | --healthcheck]\n\n\
         It is configured by environment variables, defaults first:\n  \
         APP_GRPC_ADDR       gRPC address to serve on\n  \
         APP_ADMIN_ADDR      admin address (/livez, /readyz, /metrics)\n  \
         APP_DATABASE_URL    its Postgres database\n  \
         APP_NATS_URL        NATS with JetStream\n  \
         RUST_LOG, APP_LOG_FORMAT=json, OTEL_EXPORTER_OTLP_ENDPOINT\n\
         and the service's own settings: `{service} --env` lists every one with\n\
         its default. `--healthcheck` exits 0 when the running service is ready.\n\
         SIGTERM, SIGINT or SIGHUP stops it gracefully.\n"
    )
}

/// Every variable a service binary reads whose settings are `S`, with its
/// default: the `APP_*` tree of `S` (nested fields joined by `__`), then the
/// logging and OpenTelemetry variables every service reads.
#[must_use]
pub fn env_reference<S: serde::Serialize + Default>() -> Vec<(String, String)> {
    fn flatten(prefix: &str, value: &serde_json::Value, out: &mut Vec<(String, String)>) {
        match value {
            serde_json::Value::Object(fields) => {
                for (key, value) in fields {
                    let name = if prefix.is_empty() {
                        format!("APP_{}", key.to_ascii_uppercase())
                    } else {
                        format!("{prefix}__{}", key.to_ascii_uppercase())
                    };
                    flatten(&name, value, out);
                }
            }
            serde_json::Value::String(text) => out.push((prefix.to_owned(), text.clone())),
            serde_json::Value::Null => out.push((prefix.to_owned(), String::new())),
            other => out.push((prefix.to_owned(), other.to_string())),
        }
    }
    let mut out = Vec::new();
    if let Ok(value) = serde_json::to_value(S::default()) {
        flatten("", &value, &mut out);
    }
    out.extend(
        crate::telemetry::ENV
            .iter()
            .map(|(name, default)| ((*name).to_owned(), (*default).to_owned())),
    );
    out
}

/// Asks `/readyz` on the admin address `S` is configured with (a wildcard
/// address means this host). Blocking, bounded by `timeout`.
fn healthcheck<S>(timeout: std::time::Duration) -> Result<(), String>
where
    S: serde::Serialize + serde::de::DeserializeOwned + Default,
{
    let settings: S = crate::config::load().map_err(|e| e.to_string())?;
    let value = serde_json::to_value(&settings).map_err(|e| e.to_string())?;
    let admin = value
        .get("admin_addr")
        .and_then(serde_json::Value::as_str)
        .ok_or("no admin_addr setting")?;
    let addr: std::net::SocketAddr = admin
        .parse()
        .map_err(|e| format!("APP_ADMIN_ADDR {admin:?}: {e}"))?;
    probe_ready(addr, timeout)
}

/// GET `/readyz` at `addr` (a wildcard address means this host): `Ok` on 200.
fn probe_ready(mut addr: std::net::SocketAddr, timeout: std::time::Duration) -> Result<(), String> {
    use std::io::{Read as _, Write as _};
    if addr.ip().is_unspecified() {
        addr.set_ip(match addr {
            std::net::SocketAddr::V4(_) => std::net::Ipv4Addr::LOCALHOST.into(),
            std::net::SocketAddr::V6(_) => std::net::Ipv6Addr::LOCALHOST.into(),
        });
    }
    let mut stream =
        std::net::TcpStream::connect_timeout(&addr, timeout).map_err(|e| format!("{addr}: {e}"))?;
    stream
        .set_read_timeout(Some(timeout))
        .and_then(|()| stream.set_write_timeout(Some(timeout)))
        .map_err(|e| e.to_string())?;
    stream
        .write_all(b"GET /readyz HTTP/1.0\r\nHost: localhost\r\n\r\n")
        .map_err(|e| e.to_string())?;
    let mut answer = Vec::new();
    let _ = stream.take(4096).read_to_end(&mut answer);
    let answer = String::from_utf8_lossy(&answer);
    let status = answer.lines().next().unwrap_or_default();
    if status.split_whitespace().nth(1) == Some("200") {
        Ok(())
    } else {
        Err(format!("/readyz on {addr}: {}", answer.trim()))
    }
}

/// Reads the process's arguments; prints and exits for anything but a plain
/// start. `S` is the service's settings (for `--env` and `--healthcheck`).
pub fn handle_args<S>(service: &str, version: &str)
where
    S: serde::Serialize + serde::de::DeserializeOwned + Default,
{
    use std::io::Write as _;
    let args: Vec<String> = std::env::args().skip(1).collect();
    match invocation(service, version, &args) {
        Invocation::Run => {}
        Invocation::Print(text) => {
            let _ = std::io::stdout().write_all(text.as_bytes());
            std::process::exit(0);
        }
        Invocation::Env => {
            let mut out = String::new();
            for (name, default) in env_reference::<S>() {
                out.push_str(&format!("{name}={default}\n"));
            }
            let _ = std::io::stdout().write_all(out.as_bytes());
            std::process::exit(0);
        }
        Invocation::Healthcheck => match healthcheck::<S>(std::time::Duration::from_secs(2)) {
            Ok(()) => std::process::exit(0),
            Err(error) => {
                let _ = writeln!(std::io::stderr(), "{service}: not ready: {error}");
                std::process::exit(1);
            }
        },
        Invocation::Refuse(text) => {
            let _ = std::io::stderr().write_all(text.as_bytes());
            std::process::exit(2);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| (*s).to_owned()).collect()
    }

    #[test]
    fn no_arguments_start_the_service() {
        assert_eq!(invocation("x", "1", &[]), Invocation::Run);
    }

    #[test]
    fn help_and_version_answer_instead_of_starting() {
        let Invocation::Print(help) = invocation("order-service", "0.1.0", &args(&["--help"]))
        else {
            panic!("--help must print");
        };
        assert!(help.contains("APP_DATABASE_URL"));
        assert_eq!(
            invocation("order-service", "0.1.0", &args(&["-V"])),
            Invocation::Print("order-service 0.1.0\n".to_owned())
        );
    }

    #[derive(Debug, Default, serde::Serialize, serde::Deserialize)]
    struct Example {
        grpc_addr: String,
        nested: Nested,
    }

    #[derive(Debug, serde::Serialize, serde::Deserialize)]
    struct Nested {
        token_ttl_secs: u64,
        key: crate::config::Secret,
    }

    impl Default for Nested {
        fn default() -> Self {
            Self {
                token_ttl_secs: 3600,
                key: crate::config::Secret::new("hidden"),
            }
        }
    }

    #[test]
    fn the_env_reference_names_every_setting_as_figment_reads_it() {
        let reference = env_reference::<Example>();
        let names: Vec<&str> = reference.iter().map(|(n, _)| n.as_str()).collect();
        assert!(names.contains(&"APP_GRPC_ADDR"));
        assert!(reference.contains(&("APP_NESTED__TOKEN_TTL_SECS".to_owned(), "3600".to_owned())));
        assert!(
            reference.contains(&("APP_NESTED__KEY".to_owned(), "***".to_owned())),
            "secrets are never printed"
        );
        assert!(names.contains(&"OTEL_EXPORTER_OTLP_ENDPOINT"));
        assert_eq!(invocation("x", "1", &args(&["--env"])), Invocation::Env);
        assert_eq!(
            invocation("x", "1", &args(&["--healthcheck"])),
            Invocation::Healthcheck
        );
    }

    #[tokio::test]
    async fn the_healthcheck_follows_readyz_of_the_real_admin_server() {
        let shutdown = tokio_util::sync::CancellationToken::new();
        let serve = |readiness: crate::admin::Readiness| {
            let shutdown = shutdown.clone();
            async move {
                let admin = crate::admin::AdminServer::bind("0.0.0.0:0")
                    .await
                    .expect("bind");
                let addr = admin.addr();
                tokio::spawn(admin.serve(crate::metrics::Metrics::new(), readiness, shutdown));
                addr
            }
        };
        let ready = serve(crate::admin::Readiness::new()).await;
        let unreachable_db = sqlx::postgres::PgPoolOptions::new()
            .acquire_timeout(std::time::Duration::from_millis(300))
            .connect_lazy("postgres://nobody@127.0.0.1:1/none")
            .expect("lazy pool");
        let unready = crate::admin::Readiness::new().postgres(unreachable_db);
        tokio::spawn(
            unready
                .clone()
                .watch(crate::metrics::Metrics::new(), shutdown.clone()),
        );
        let not_ready = serve(unready.clone()).await;
        // The background check needs two failed pings to call Postgres down.
        tokio::time::timeout(std::time::Duration::from_secs(10), async {
            while !unready.postgres_down() {
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
        })
        .await
        .expect("the background check sees the dead database");
        let timeout = std::time::Duration::from_secs(5);
        let probe = |addr| tokio::task::spawn_blocking(move || probe_ready(addr, timeout));
        probe(ready)
            .await
            .expect("join")
            .expect("ready answers 200");
        let refused = probe(not_ready).await.expect("join").expect_err("503");
        assert!(refused.contains("503"), "{refused}");
        let closed: std::net::SocketAddr = "127.0.0.1:1".parse().expect("addr");
        assert!(probe(closed).await.expect("join").is_err());
        shutdown.cancel();
    }

    #[test]
    fn unknown_arguments_are_refused() {
        assert!(matches!(
            invocation("x", "1", &args(&["--port", "1"])),
            Invocation::Refuse(_)
        ));
        assert!(matches!(
            invocation("x", "1", &args(&["--help", "extra"])),
            Invocation::Refuse(_)
        ));
    }
}
