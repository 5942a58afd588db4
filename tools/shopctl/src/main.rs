//! `shopctl`: run the shop locally, tell its story, and (later) administer it.
//!
//! - `shopctl up [--demo]`: a zero-configuration local stack (private
//!   nats-server and Postgres from the binaries on the machine, then the
//!   three services), stopped cleanly on Ctrl-C or SIGTERM.
//! - `shopctl demo`: one user, one login, one order, and the notification
//!   that followed, with timings.
//! - `shopctl status`, `orders`, `relay`, `projections`, `dlq`: operate it.
//! - `shopctl load` and `shopctl chaos`: load it, and break it under load.
//!
//! Output on stdout is the product of this tool; it goes through `out!`,
//! which never panics on a closed pipe. Errors are printed once, by `main`.

#[macro_use]
mod out;
mod admin;
mod chaos;
mod demo;
mod infra;
mod load;
mod stack;
mod status;

use std::{path::PathBuf, process::ExitCode};

use clap::{CommandFactory as _, Parser, Subcommand, ValueEnum};

/// An error already shown to the user (by `up`, before its shutdown).
#[derive(Debug)]
pub(crate) struct Reported(pub(crate) anyhow::Error);

impl std::fmt::Display for Reported {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:#}", self.0)
    }
}

impl std::error::Error for Reported {}

#[derive(Debug, Parser)]
#[command(name = "shopctl", version, about = "Run, demo and operate the shop")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Start the whole system locally and keep it running until Ctrl-C.
    Up {
        /// Run the demo once the stack is healthy.
        #[arg(long)]
        demo: bool,
        /// Stop after the demo instead of waiting for Ctrl-C.
        #[arg(long, requires = "demo")]
        exit_after_demo: bool,
        #[command(flatten)]
        options: stack::UpOptions,
    },
    /// Tell the story of one order against a running stack (or start one).
    Demo {
        /// Where `shopctl up` recorded its endpoints.
        #[arg(long, default_value = ".shop/stack.json")]
        stack_file: PathBuf,
    },
    /// Health, relay lag, projections, consumer backlog, dead letters and
    /// circuit breakers of the running stack, from its admin endpoints.
    Status {
        /// Where `shopctl up` recorded its endpoints.
        #[arg(long, default_value = ".shop/stack.json")]
        stack_file: PathBuf,
        /// One JSON document instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Drive load against the running stack and report throughput, latency
    /// per command, errors and end-to-end latency (JSON, Markdown, SVG).
    Load(load::LoadOptions),
    /// Fault scenarios under load, each on its own fresh stack, judged by
    /// the history oracle (lost, duplicated, unexpected, diverged).
    Chaos(chaos::ChaosOptions),
    /// Print a shell completion script, e.g.
    /// `shopctl completions bash > /etc/bash_completion.d/shopctl`.
    Completions {
        /// The shell to complete for.
        shell: clap_complete::Shell,
    },
    /// Order audit trail and time travel.
    #[command(subcommand)]
    Orders(OrdersCommand),
    /// The outbox relays.
    #[command(subcommand)]
    Relay(RelayCommand),
    /// The order read models.
    #[command(subcommand)]
    Projections(ProjectionsCommand),
    /// The dead-letter stream.
    #[command(subcommand)]
    Dlq(DlqCommand),
    /// Run one service in this process (used by `up`; the service binaries
    /// do the same).
    #[command(hide = true)]
    Serve {
        /// Which service.
        service: Service,
    },
}

#[derive(Debug, Subcommand)]
enum OrdersCommand {
    /// Every event of an order with its metadata and the change it made.
    History {
        /// The order's id (a UUID, as the API and the demo print it).
        order_id: uuid::Uuid,
        /// One JSON array instead of text.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        target: admin::Target,
    },
    /// The order as it was at a version or a moment, and how it got there.
    At {
        /// The order's id (a UUID).
        order_id: uuid::Uuid,
        /// State after this many events (1 = as created).
        #[arg(long, conflicts_with = "at", required_unless_present = "at")]
        version: Option<i64>,
        /// State as of this RFC 3339 time, e.g. 2026-11-25T13:00:00Z.
        #[arg(long)]
        at: Option<chrono::DateTime<chrono::Utc>>,
        /// One JSON document (`state` and `events`) instead of text.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        target: admin::Target,
    },
}

#[derive(Debug, Subcommand)]
enum RelayCommand {
    /// Publish events again from Postgres (after JetStream lost messages).
    Republish {
        /// First global position to publish.
        #[arg(
            long,
            conflicts_with = "from_time",
            required_unless_present = "from_time"
        )]
        from: Option<i64>,
        /// Or: first event time (RFC 3339).
        #[arg(long)]
        from_time: Option<chrono::DateTime<chrono::Utc>>,
        #[arg(long, value_enum, default_value = "order-service")]
        service: admin::Outbox,
        #[command(flatten)]
        target: admin::Target,
    },
}

#[derive(Debug, Subcommand)]
enum ProjectionsCommand {
    /// Rebuild a read model beside the live one, then switch queries over.
    Rebuild {
        /// The read model: `order_summary` or `orders_by_user`.
        name: String,
        /// Return once the rebuild is requested instead of waiting for it.
        #[arg(long)]
        no_wait: bool,
        /// No progress bar, even on a terminal.
        #[arg(long)]
        quiet: bool,
        #[command(flatten)]
        target: admin::Target,
    },
    /// Live and building generations of each read model.
    Status {
        /// One JSON array instead of text.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        target: admin::Target,
    },
}

#[derive(Debug, Subcommand)]
enum DlqCommand {
    /// Every dead letter: where it came from, why, how often it was tried.
    List {
        /// One JSON array instead of text.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        target: admin::Target,
    },
    /// One dead letter with its headers and payload.
    Show {
        /// The dead letter's sequence number, as `dlq list` shows it (#N).
        sequence: u64,
        /// One JSON document (payload base64 and, if UTF-8, as text).
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        target: admin::Target,
    },
    /// Publish dead letters to their original subject again and remove them.
    Redrive {
        /// The dead letter's sequence number, as `dlq list` shows it (#N).
        #[arg(required_unless_present = "all", conflicts_with = "all")]
        sequence: Option<u64>,
        /// Every dead letter.
        #[arg(long)]
        all: bool,
        #[command(flatten)]
        target: admin::Target,
    },
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum Service {
    #[value(name = "user-service")]
    User,
    #[value(name = "order-service")]
    Order,
    #[value(name = "notification-service")]
    Notification,
}

/// glibc's allocator took ~22 % of order-service's CPU under load (malloc,
/// free, consolidation); mimalloc's thread-local heaps do not (ADR 11).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(error) => {
            eout!("shopctl: cannot start the async runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(dispatch(cli.command)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            if error.downcast_ref::<Reported>().is_none() {
                eout!("shopctl: {error:#}");
            }
            if std::env::var_os("RUST_BACKTRACE").is_some_and(|v| v != "0") {
                eout!("{}", error.backtrace());
            }
            ExitCode::FAILURE
        }
    }
}

async fn dispatch(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Up {
            demo,
            exit_after_demo,
            options,
        } => {
            let _telemetry = platform::telemetry::init("shopctl");
            stack::up(options, move |stack| async move {
                if demo {
                    demo::run(&stack).await?;
                    if exit_after_demo {
                        return Ok(stack::Then::Stop);
                    }
                    out!("\nThe stack keeps running; Ctrl-C stops it.");
                }
                Ok(stack::Then::Serve)
            })
            .await
        }
        Command::Demo { stack_file } => demo::run_or_start(&stack_file).await,
        Command::Status { stack_file, json } => status::show(&stack_file, json).await,
        Command::Load(options) => load::run(options).await,
        Command::Chaos(options) => chaos::run(options).await,
        Command::Completions { shell } => {
            // Into a buffer first: clap_complete panics when its writer fails
            // (`| head`); `out!` does not.
            let mut script = Vec::new();
            clap_complete::generate(shell, &mut Cli::command(), "shopctl", &mut script);
            out!("{}", String::from_utf8_lossy(&script).trim_end());
            Ok(())
        }
        Command::Serve { service } => serve(service).await,
        Command::Orders(OrdersCommand::History {
            order_id,
            json,
            target,
        }) => admin::history(&target, order_id, json).await,
        Command::Orders(OrdersCommand::At {
            order_id,
            version,
            at,
            json,
            target,
        }) => {
            let point = match (version, at) {
                (Some(v), _) => order_service::history::At::Version(v),
                (None, Some(t)) => order_service::history::At::Time(t),
                (None, None) => anyhow::bail!("give --version N or --at TIME"),
            };
            admin::at(&target, order_id, point, json).await
        }
        Command::Relay(RelayCommand::Republish {
            from,
            from_time,
            service,
            target,
        }) => admin::republish(&target, service, from, from_time).await,
        Command::Projections(ProjectionsCommand::Rebuild {
            name,
            no_wait,
            quiet,
            target,
        }) => admin::rebuild(&target, &name, !no_wait, quiet).await,
        Command::Projections(ProjectionsCommand::Status { json, target }) => {
            admin::status(&target, json).await
        }
        Command::Dlq(DlqCommand::List { json, target }) => admin::dlq_list(&target, json).await,
        Command::Dlq(DlqCommand::Show {
            sequence,
            json,
            target,
        }) => admin::dlq_show(&target, sequence, json).await,
        Command::Dlq(DlqCommand::Redrive {
            sequence,
            all,
            target,
        }) => admin::dlq_redrive(&target, sequence, all).await,
    }
}

async fn serve(service: Service) -> anyhow::Result<()> {
    let shutdown = platform::shutdown::on_signal();
    let name = match service {
        Service::User => "user-service",
        Service::Order => "order-service",
        Service::Notification => "notification-service",
    };
    let telemetry = platform::telemetry::init(name);
    let result = match service {
        Service::User => match user_service::Application::build(platform::config::load()?).await {
            Ok(app) => app.run_until_stopped(shutdown).await,
            Err(error) => Err(error),
        },
        Service::Order => {
            match order_service::Application::build(platform::config::load()?).await {
                Ok(app) => app.run_until_stopped(shutdown).await,
                Err(error) => Err(error),
            }
        }
        Service::Notification => {
            match notification_service::Application::build(platform::config::load()?).await {
                Ok(app) => app.run_until_stopped(shutdown).await,
                Err(error) => Err(error),
            }
        }
    };
    telemetry.shutdown();
    Ok(result?)
}
