//! Bundles down the stream: the ones [`Rollouts::next_apply`] wants this edge to run,
//! sent whenever the rollout changes, or this edge's own status does (a report from one
//! edge wakes only that edge's loop).

use std::sync::Arc;

use proto::edge::coordinator_message;

use super::{send, Outbound};
use crate::edges::SessionHandle;
use crate::rollout::Rollouts;

/// Sends this edge the bundles the rollout wants it to run.
pub(super) async fn bundle_loop(rollouts: Arc<Rollouts>, tx: Outbound, handle: SessionHandle) {
    let mut changed = rollouts.subscribe();
    let mine = rollouts.subscribe_edge(&handle.edge_id);
    loop {
        while let Some(apply) = rollouts.next_apply(&handle.edge_id, handle.session) {
            tracing::info!(edge = %handle.edge_id, version = %apply.version, "sending bundle");
            if !send(&tx, &handle, coordinator_message::Msg::ApplyConfig(apply)).await {
                return;
            }
        }
        let edge_changed = async {
            match &mine {
                Some(n) => n.notified().await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = handle.cancel.cancelled() => return,
            c = changed.changed() => if c.is_err() { return },
            _ = edge_changed => {}
        }
    }
}
