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
    /// Run one service in this process (used by `up`; the service binaries
    /// do the same).
    #[command(hide = true)]
    Serve { service: Service },
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
            platform::telemetry::init("shopctl");
            stack::up(options, demo, exit_after_demo).await
        }
        Command::Demo { stack_file } => demo::run_or_start(&stack_file).await,
        Command::Serve { service } => serve(service).await,
    }
}

async fn serve(service: Service) -> anyhow::Result<()> {
    let shutdown = platform::shutdown::on_signal();
    match service {
        Service::User => {
            platform::telemetry::init("user-service");
            let app = user_service::Application::build(platform::config::load()?).await?;
            app.run_until_stopped(shutdown).await?;
        }
        Service::Order => {
            platform::telemetry::init("order-service");
            let app = order_service::Application::build(platform::config::load()?).await?;
            app.run_until_stopped(shutdown).await?;
        }
        Service::Notification => {
            platform::telemetry::init("notification-service");
            let app = notification_service::Application::build(platform::config::load()?).await?;
            app.run_until_stopped(shutdown).await?;
        }
    }
    Ok(())
}
