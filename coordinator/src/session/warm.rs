//! Warm work down the stream: shards, rate changes and cancels that
//! [`Warm::next_for`] has for this edge.

use std::sync::Arc;
use std::time::Duration;

use super::{send, Outbound};
use crate::edges::SessionHandle;
use crate::warm::Warm;

/// Shortest time between two warm lookups of one session.
const WARM_LOOK_INTERVAL: Duration = Duration::from_millis(20);

/// Sends this edge the warm shards (and rate changes, cancels) the running job has for
/// it; wakes on every warm change, and every second for purge-gated re-warms.
pub(super) async fn warm_loop(warm: Arc<Warm>, tx: Outbound, handle: SessionHandle) {
    let mut changed = warm.subscribe();
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        for msg in warm.next_for(&handle.edge_id, handle.session) {
            if !send(&tx, &handle, msg).await {
                return;
            }
        }
        // Every report wakes every session; at most one look per 20 ms each keeps a
        // thousand edges from turning one report into a thousand lookups at once.
        tokio::select! {
            _ = handle.cancel.cancelled() => return,
            _ = tokio::time::sleep(WARM_LOOK_INTERVAL) => {}
        }
        tokio::select! {
            _ = handle.cancel.cancelled() => return,
            _ = tick.tick() => {}
            c = changed.changed() => if c.is_err() { return },
        }
    }
}
