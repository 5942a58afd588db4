//! `shopctl`: run the shop locally, tell its story, and (later) administer it.
//!
//! - `shopctl up [--demo]`: a zero-configuration local stack (private
//!   nats-server and Postgres from the binaries on the machine, then the
//!   three services), stopped cleanly on Ctrl-C or SIGTERM.
//! - `shopctl demo`: one user, one login, one order, and the notification
//!   that followed, with timings.
//!
//! Output on stdout is the product of this tool, hence `println!`.
#![allow(clippy::print_stdout)]

mod admin;
mod demo;
mod infra;
mod stack;

use std::path::PathBuf;

use clap::{Parser, Subcommand, ValueEnum};

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
    Serve { service: Service },
}

#[derive(Debug, Subcommand)]
enum OrdersCommand {
    /// Every event of an order with its metadata and the change it made.
    History {
        order_id: uuid::Uuid,
        #[command(flatten)]
        target: admin::Target,
    },
    /// The order as it was at a version or a moment, and how it got there.
    At {
        order_id: uuid::Uuid,
        /// State after this many events.
        #[arg(long, conflicts_with = "at", required_unless_present = "at")]
        version: Option<i64>,
        /// State as of this RFC 3339 time, e.g. 2026-11-25T13:00:00Z.
        #[arg(long)]
        at: Option<chrono::DateTime<chrono::Utc>>,
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
        /// `order_summary` or `orders_by_user`.
        name: String,
        /// Return once the rebuild is requested instead of waiting for it.
        #[arg(long)]
        no_wait: bool,
        #[command(flatten)]
        target: admin::Target,
    },
    /// Live and building generations of each read model.
    Status {
        #[command(flatten)]
        target: admin::Target,
    },
}

#[derive(Debug, Subcommand)]
enum DlqCommand {
    /// Every dead letter: where it came from, why, how often it was tried.
    List {
        #[command(flatten)]
        target: admin::Target,
    },
    /// One dead letter with its headers and payload.
    Show {
        sequence: u64,
        #[command(flatten)]
        target: admin::Target,
    },
    /// Publish dead letters to their original subject again and remove them.
    Redrive {
        #[arg(required_unless_present = "all", conflicts_with = "all")]
        sequence: Option<u64>,
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

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Up {
            demo,
            exit_after_demo,
            options,
        } => {
            let _telemetry = platform::telemetry::init("shopctl");
            stack::up(options, demo, exit_after_demo).await
        }
        Command::Demo { stack_file } => demo::run_or_start(&stack_file).await,
        Command::Serve { service } => serve(service).await,
        Command::Orders(OrdersCommand::History { order_id, target }) => {
            admin::history(&target, order_id).await
        }
        Command::Orders(OrdersCommand::At {
            order_id,
            version,
            at,
            target,
        }) => {
            let point = match (version, at) {
                (Some(v), _) => order_service::history::At::Version(v),
                (None, Some(t)) => order_service::history::At::Time(t),
                (None, None) => anyhow::bail!("give --version N or --at TIME"),
            };
            admin::at(&target, order_id, point).await
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
            target,
        }) => admin::rebuild(&target, &name, !no_wait).await,
        Command::Projections(ProjectionsCommand::Status { target }) => admin::status(&target).await,
        Command::Dlq(DlqCommand::List { target }) => admin::dlq_list(&target).await,
        Command::Dlq(DlqCommand::Show { sequence, target }) => {
            admin::dlq_show(&target, sequence).await
        }
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
