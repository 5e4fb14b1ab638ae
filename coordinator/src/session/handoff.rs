//! Hand-off: a coordinator cut off from its store (etcd) but not from its peers gives its
//! agents to a coordinator that reaches the store, so no region goes stale behind it
//! (purges sent to the others would never reach the agents it holds: it cannot read the
//! shared log).
//!
//! [`Handoff::watch`] checks twice a second: the store unreachable for `[store]
//! handoff_after_s` or longer ([`crate::store_health::StoreHealth`]) while at least one
//! peer said in its last self-report that it reaches the store
//! ([`crate::cluster::Cluster::peer_reaching_store`]). While that holds, every session
//! whose agent lists another coordinator is ended with a `handoff` status (the agent
//! dials the next coordinator of its list at once) and such sessions are refused; an
//! agent that lists only this coordinator stays, as do all agents when no coordinator
//! reaches the store (etcd lost its quorum: moving would gain nothing). The first answer
//! from the store ends it: sessions are accepted again (agents are not called back; they
//! stay where they landed until their session there ends).

use daemon::sync::Recover;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::clock::now_ms;
use crate::state::Coordinator;
use crate::store_health::Reach;

/// How often the condition is checked.
const CHECK_EVERY: Duration = Duration::from_millis(500);

/// Whether this coordinator hands its agents off now, and why.
#[derive(Debug)]
pub struct Handoff {
    after: Duration,
    /// The reason given to the agents while handing off; `None` otherwise.
    reason: Mutex<Option<String>>,
}

impl Handoff {
    /// Hands off once the store has been unreachable for `after`.
    pub fn new(after: Duration) -> Handoff {
        Handoff {
            after,
            reason: Mutex::new(None),
        }
    }

    /// `Some(reason)` while this coordinator hands its agents off.
    pub fn active(&self) -> Option<String> {
        self.reason.locked().clone()
    }

    /// Sets (or clears) the reason; whether one was set before.
    fn set(&self, reason: Option<String>) -> bool {
        std::mem::replace(&mut *self.reason.locked(), reason).is_some()
    }

    /// Whether to hand off: the store unreachable for `after` or longer (as of `now_ms`)
    /// while a peer reaches it.
    pub fn due(reach: &Reach, now_ms: u64, after: Duration, peer_reaching: Option<&str>) -> bool {
        reach.reachable == Some(false)
            && now_ms.saturating_sub(reach.since_ms) >= after.as_millis() as u64
            && peer_reaching.is_some()
    }

    /// Follows the store's reachability and the peers' until `shutdown`, ending and
    /// refusing the movable agents' sessions while [`Self::due`].
    pub async fn watch(self: Arc<Self>, state: Coordinator, shutdown: CancellationToken) {
        let mut tick = tokio::time::interval(CHECK_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tick.tick() => {}
            }
            let reach = state.cluster.store_health().get();
            let peer = state.cluster.peer_reaching_store();
            let due = Self::due(&reach, now_ms(), self.after, peer.as_deref());
            if due {
                let since = std::time::UNIX_EPOCH + Duration::from_millis(reach.since_ms);
                let reason = format!(
                    "coordinator {} cannot reach its store since {} ({}); coordinator {} can: use another coordinator",
                    state.cluster.id(),
                    humantime::format_rfc3339_seconds(since),
                    reach.error.as_deref().unwrap_or("no answer"),
                    peer.as_deref().unwrap_or_default(),
                );
                let was = self.set(Some(reason.clone()));
                let ended = state.edges.hand_off(&reason);
                if !was {
                    tracing::warn!(unreachable_s = now_ms().saturating_sub(reach.since_ms) as f64 / 1000.0,
                        peer = peer.as_deref().unwrap_or_default(), ended,
                        "store unreachable but a peer reaches it: handing this coordinator's agents to the others");
                } else if ended > 0 {
                    tracing::info!(ended, "handed more agents to the other coordinators");
                }
            } else if self.set(None) {
                tracing::info!(
                    store_reachable = ?reach.reachable,
                    "no longer handing agents off: accepting their sessions again"
                );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reach(reachable: Option<bool>, since_ms: u64) -> Reach {
        Reach {
            reachable,
            since_ms,
            error: None,
        }
    }

    #[test]
    fn hands_off_only_when_blind_for_long_enough_and_a_peer_sees() {
        let after = Duration::from_secs(5);
        let blind = reach(Some(false), 10_000);
        assert!(Handoff::due(&blind, 15_000, after, Some("c2")));
        assert!(!Handoff::due(&blind, 14_999, after, Some("c2")), "not yet");
        assert!(
            !Handoff::due(&blind, 60_000, after, None),
            "every coordinator blind (quorum lost): nobody hands off"
        );
        assert!(!Handoff::due(
            &reach(Some(true), 0),
            60_000,
            after,
            Some("c2")
        ));
        assert!(
            !Handoff::due(&reach(None, 0), 60_000, after, Some("c2")),
            "unknown is not blind"
        );
    }
}
