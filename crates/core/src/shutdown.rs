//! The shutdown signal: Ctrl-C or SIGTERM cancels one token that every task
//! of a role watches. A second signal while stopping exits at once.

use tokio_util::sync::CancellationToken;

/// Returns a token cancelled on the first SIGINT or SIGTERM. A second signal
/// ends the process with status 130 (the operator insists).
pub fn on_signals() -> CancellationToken {
    let token = CancellationToken::new();
    let t = token.clone();
    tokio::spawn(async move {
        wait_for_signal().await;
        tracing::info!("stop signal received; draining");
        t.cancel();
        wait_for_signal().await;
        tracing::warn!("second stop signal; exiting now");
        crate::telemetry::flush_logs();
        std::process::exit(130);
    });
    token
}

async fn wait_for_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    let mut int = signal(SignalKind::interrupt()).expect("SIGINT handler");
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
}

/// Cancels `token` when this process's parent changes (the supervisor died
/// without stopping us), so no child outlives `shoal up`. Checks once a
/// second; `expected_parent` is the supervisor's pid.
pub fn exit_with_parent(expected_parent: u32, token: CancellationToken) {
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(std::time::Duration::from_secs(1)).await;
            if std::os::unix::process::parent_id() != expected_parent {
                tracing::warn!(expected_parent, "supervisor is gone; stopping");
                token.cancel();
                return;
            }
        }
    });
}
