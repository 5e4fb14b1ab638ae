//! Whether this coordinator can reach its shared store (etcd) now, as every part that
//! talks to it has found: one answer for the purge log's writer (spool at once rather
//! than wait on a store known to be gone), the cluster view, `/healthz`, the monitor
//! (what it cannot see is `unknown`, not `down`) and the session layer (hand agents to a
//! coordinator that can reach the store).
//!
//! Every etcd call's outcome may be reported: [`StoreHealth::succeeded`] after any
//! answer, [`StoreHealth::failed`] after a timeout or a transport error. The state flips
//! to unreachable on the first failure not followed by a success, and back on the next
//! success; [`Reach::since_ms`] says since when. With the embedded store it is always
//! reachable. Cheap to clone.

use tokio::sync::watch;

use crate::clock::now_ms;

/// The store's reachability as last found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reach {
    /// `None` until the first outcome is reported.
    pub reachable: Option<bool>,
    /// When `reachable` last changed (ms since the epoch).
    pub since_ms: u64,
    /// The failure that made it unreachable.
    pub error: Option<String>,
}

/// A shared handle on the store's reachability.
#[derive(Debug, Clone)]
pub struct StoreHealth {
    tx: std::sync::Arc<watch::Sender<Reach>>,
}

impl StoreHealth {
    /// Unknown until the first outcome (a store in etcd).
    pub fn new() -> StoreHealth {
        StoreHealth::with(None)
    }

    /// Always reachable (the embedded store).
    pub fn embedded() -> StoreHealth {
        StoreHealth::with(Some(true))
    }

    fn with(reachable: Option<bool>) -> StoreHealth {
        let reach = Reach {
            reachable,
            since_ms: now_ms(),
            error: None,
        };
        StoreHealth {
            tx: std::sync::Arc::new(watch::channel(reach).0),
        }
    }

    /// The store answered a call.
    pub fn succeeded(&self) {
        self.tx.send_if_modified(|r| {
            if r.reachable == Some(true) {
                return false;
            }
            *r = Reach {
                reachable: Some(true),
                since_ms: now_ms(),
                error: None,
            };
            true
        });
    }

    /// A call to the store timed out or failed in transport (not a refusal such as a
    /// failed compare, which is an answer).
    pub fn failed(&self, error: &str) {
        self.tx.send_if_modified(|r| {
            if r.reachable == Some(false) {
                return false;
            }
            *r = Reach {
                reachable: Some(false),
                since_ms: now_ms(),
                error: Some(error.to_owned()),
            };
            true
        });
    }

    /// The state now.
    pub fn get(&self) -> Reach {
        self.tx.borrow().clone()
    }

    /// `Some(false)` only when the last outcome was a failure.
    pub fn reachable(&self) -> Option<bool> {
        self.tx.borrow().reachable
    }

    /// Follows every change.
    #[cfg(test)]
    pub fn subscribe(&self) -> watch::Receiver<Reach> {
        self.tx.subscribe()
    }
}

impl Default for StoreHealth {
    fn default() -> Self {
        StoreHealth::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flips_on_the_first_failure_and_back_on_the_next_success() {
        let h = StoreHealth::new();
        assert_eq!(h.reachable(), None);
        h.succeeded();
        assert_eq!(h.reachable(), Some(true));
        let mut rx = h.subscribe();
        rx.borrow_and_update();
        h.failed("deadline");
        assert!(rx.has_changed().unwrap());
        assert_eq!(h.get().error.as_deref(), Some("deadline"));
        rx.borrow_and_update();
        h.failed("again");
        assert!(!rx.has_changed().unwrap(), "a repeat failure is no change");
        h.succeeded();
        assert_eq!(
            h.get(),
            Reach {
                reachable: Some(true),
                since_ms: h.get().since_ms,
                error: None
            }
        );
        assert_eq!(StoreHealth::embedded().reachable(), Some(true));
    }
}
