//! One shutdown signal for the whole process: SIGTERM, SIGHUP (the terminal
//! closed) or Ctrl-C cancels a token that the gRPC server, relays and
//! consumers all watch.

use tokio_util::sync::CancellationToken;

/// A token cancelled on the first SIGTERM, SIGHUP or SIGINT.
#[must_use]
pub fn on_signal() -> CancellationToken {
    let token = CancellationToken::new();
    let trigger = token.clone();
    tokio::spawn(async move {
        wait_for_signal().await;
        tracing::info!("shutdown requested");
        trigger.cancel();
    });
    token
}

/// Resolves on SIGTERM, SIGHUP or SIGINT. SIGHUP's default action would end
/// the process on the spot, skipping the clean shutdown (and, for `shopctl
/// up`, orphaning what it started).
pub async fn wait_for_signal() {
    let ctrl_c = async {
        if tokio::signal::ctrl_c().await.is_err() {
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let unix = |kind: tokio::signal::unix::SignalKind| async move {
        match tokio::signal::unix::signal(kind) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(unix)]
    let (term, hangup) = (
        unix(tokio::signal::unix::SignalKind::terminate()),
        unix(tokio::signal::unix::SignalKind::hangup()),
    );
    #[cfg(not(unix))]
    let (term, hangup) = (std::future::pending::<()>(), std::future::pending::<()>());
    tokio::select! {
        () = ctrl_c => {}
        () = term => {}
        () = hangup => {}
    }
}
