//! Signals a daemon answers: SIGTERM and SIGINT cancel the shutdown token (servers then
//! stop within their grace time); SIGHUP asks for a reload of what can change without a
//! restart (certificates, tokens).

use tokio::signal::unix::{signal, SignalKind};
use tokio_util::sync::CancellationToken;

/// Cancels `shutdown` on the first SIGTERM or SIGINT.
pub async fn stop_on_signal(shutdown: CancellationToken) {
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        tracing::warn!("cannot listen for SIGTERM/SIGINT; stop with SIGKILL");
        return;
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
        _ = shutdown.cancelled() => return,
    }
    tracing::info!("stop requested");
    shutdown.cancel();
}

/// Calls `reload` on every SIGHUP until `shutdown` is cancelled.
pub async fn on_hangup(shutdown: CancellationToken, mut reload: impl FnMut()) {
    let Ok(mut hup) = signal(SignalKind::hangup()) else {
        tracing::warn!("cannot listen for SIGHUP; reloads happen only on restart");
        return;
    };
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            s = hup.recv() => if s.is_none() { return },
        }
        reload();
    }
}
