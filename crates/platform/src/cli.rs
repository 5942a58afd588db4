//! The service binaries' command line: they are configured by `APP_...`
//! environment variables only, so they take no arguments; `--help` and
//! `--version` answer and exit instead of starting the service, and anything
//! else is refused rather than ignored.

/// What the command line asked for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Invocation {
    /// No arguments: start the service.
    Run,
    /// Print this text to stdout and exit 0.
    Print(String),
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
        Some(_) => Invocation::Refuse(format!(
            "{service} takes no arguments (it is configured by APP_... environment variables); \
             try `{service} --help`\n"
        )),
    }
}

fn help(service: &str, version: &str) -> String {
    format!(
        "{service} {version}: one of the shop's services.\n\n\
         Usage: {service} [--help | --version]\n\n\
         It is configured by environment variables, defaults first:\n  \
         APP_GRPC_ADDR       gRPC address to serve on\n  \
         APP_ADMIN_ADDR      admin address (/livez, /readyz, /metrics)\n  \
         APP_DATABASE_URL    its Postgres database\n  \
         APP_NATS_URL        NATS with JetStream\n  \
         RUST_LOG, APP_LOG_FORMAT=json, OTEL_EXPORTER_OTLP_ENDPOINT\n\
         and the service's own settings listed in the README (\"The services\").\n\
         SIGTERM, SIGINT or SIGHUP stops it gracefully.\n"
    )
}

/// Reads the process's arguments; prints and exits for anything but a plain
/// start.
pub fn handle_args(service: &str, version: &str) {
    use std::io::Write as _;
    let args: Vec<String> = std::env::args().skip(1).collect();
    match invocation(service, version, &args) {
        Invocation::Run => {}
        Invocation::Print(text) => {
            let _ = std::io::stdout().write_all(text.as_bytes());
            std::process::exit(0);
        }
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
