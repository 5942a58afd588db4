//! user-service binary: configuration from `APP_...`, then run until SIGTERM.

/// glibc's allocator took ~22 % of order-service's CPU under load (malloc,
/// free, consolidation); mimalloc's thread-local heaps do not (ADR 11).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    platform::cli::handle_args::<user_service::Settings>("user-service", env!("CARGO_PKG_VERSION"));
    let telemetry = platform::telemetry::init("user-service");
    let settings: user_service::Settings = platform::config::load()?;
    let app = user_service::Application::build(settings).await?;
    let result = app.run_until_stopped(platform::shutdown::on_signal()).await;
    telemetry.shutdown();
    Ok(result?)
}
