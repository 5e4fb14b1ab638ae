//! The cluster's one alert about its store: "etcd unreachable", then "etcd back", each
//! sent once for the whole cluster.
//!
//! The region alerts go out from the leader, but a leader is elected through etcd: with
//! etcd gone there is no leader anyone can trust, and every coordinator sending its own
//! alert would page three times. So this alert has its own rule, decided from what the
//! peer poll already carries (each coordinator's self record, `GET
//! /api/v1/cluster?scope=local`: whether it reaches etcd, and whether it holds the
//! alert as sent):
//!
//! * the **sender** is the coordinator with the lowest id among those in sight (itself and
//!   the peers heard from within [`IN_SIGHT`]); every coordinator computes it the same way
//!   from the same records;
//! * the cluster counts as **blind** to etcd while more than half of the coordinators in
//!   sight report it unreachable (one coordinator cut off from etcd is that coordinator's
//!   problem, shown in `/api/v1/cluster`, not an outage of the store);
//! * the sender sends "unreachable" once blindness has lasted [`HOLD`], and "back" once
//!   it has been over for [`HOLD`]; the others copy the sender's "sent" flag each round,
//!   so a sender that dies mid-outage hands its state to the next lowest id, which sends
//!   "back" (not a second "unreachable").
//!
//! Neither alert goes through the alert ledger (it lives in etcd): when etcd returns,
//! nothing is re-sent from it. A cluster split in two (peers out of each other's sight)
//! may send one alert per side.

use std::time::{Duration, Instant};

use serde::Serialize;

/// How long the cluster must be blind (or sighted again) before the alert goes out: a
/// single slow answer is not an outage.
pub const HOLD: Duration = Duration::from_secs(3);
/// A peer heard from within this long is in sight.
pub const IN_SIGHT: Duration = Duration::from_secs(3);

/// One coordinator in sight, as its self record (or this coordinator itself) says.
#[derive(Debug, Clone)]
pub struct Seen {
    pub id: String,
    pub store_reachable: Option<bool>,
    /// It holds the "unreachable" alert as sent (no "back" yet).
    pub alert: bool,
}

/// Which of the two alerts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Event {
    StoreUnreachable,
    StoreBack,
}

impl Event {
    pub fn as_str(self) -> &'static str {
        match self {
            Event::StoreUnreachable => "store_unreachable",
            Event::StoreBack => "store_back",
        }
    }
}

/// The alert's state on one coordinator.
#[derive(Debug, Default)]
pub struct StoreAlert {
    sent: bool,
    blind_since: Option<Instant>,
    clear_since: Option<Instant>,
}

impl StoreAlert {
    /// Whether this coordinator holds the "unreachable" alert as sent.
    pub fn sent(&self) -> bool {
        self.sent
    }

    /// One round: `sight` is every coordinator in sight, `me` included. Returns the
    /// alert this coordinator must send now, if any.
    pub fn step(&mut self, me: &str, sight: &[Seen], now: Instant) -> Option<Event> {
        let sender = sight.iter().min_by(|a, b| a.id.cmp(&b.id))?;
        if sender.id != me {
            self.sent = sender.alert;
            self.blind_since = None;
            self.clear_since = None;
            return None;
        }
        let blind = sight
            .iter()
            .filter(|s| s.store_reachable == Some(false))
            .count();
        if blind * 2 > sight.len() {
            self.clear_since = None;
            let since = *self.blind_since.get_or_insert(now);
            if !self.sent && now.duration_since(since) >= HOLD {
                self.sent = true;
                return Some(Event::StoreUnreachable);
            }
        } else {
            self.blind_since = None;
            if self.sent {
                let since = *self.clear_since.get_or_insert(now);
                if now.duration_since(since) >= HOLD {
                    self.sent = false;
                    return Some(Event::StoreBack);
                }
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seen(id: &str, reachable: bool, alert: bool) -> Seen {
        Seen {
            id: id.into(),
            store_reachable: Some(reachable),
            alert,
        }
    }

    #[test]
    fn the_lowest_id_in_sight_sends_each_alert_once_after_the_hold() {
        let t0 = Instant::now();
        let (mut c1, mut c2) = (StoreAlert::default(), StoreAlert::default());
        let blind = |a: bool| {
            vec![
                seen("c1", false, a),
                seen("c2", false, a),
                seen("c3", false, a),
            ]
        };
        assert_eq!(
            c1.step("c1", &blind(false), t0),
            None,
            "not before the hold"
        );
        assert_eq!(c2.step("c2", &blind(false), t0), None);
        let t1 = t0 + HOLD;
        assert_eq!(
            c1.step("c1", &blind(false), t1),
            Some(Event::StoreUnreachable)
        );
        assert_eq!(c1.step("c1", &blind(true), t1 + HOLD), None, "once");
        assert_eq!(
            c2.step("c2", &blind(true), t1),
            None,
            "c2 is not the sender"
        );
        assert!(c2.sent(), "c2 copies the sender's flag");
        // c1 dies mid-outage: c2 is the lowest in sight, and sends "back", not again
        // "unreachable".
        let c2_alone = |r: bool| vec![seen("c2", r, true), seen("c3", r, true)];
        assert_eq!(c2.step("c2", &c2_alone(false), t1 + HOLD * 3), None);
        let t2 = t1 + HOLD * 4;
        assert_eq!(
            c2.step("c2", &c2_alone(true), t2),
            None,
            "not before the hold"
        );
        assert_eq!(
            c2.step("c2", &c2_alone(true), t2 + HOLD),
            Some(Event::StoreBack)
        );
        assert_eq!(c2.step("c2", &c2_alone(true), t2 + HOLD * 2), None);
    }

    #[test]
    fn one_coordinator_cut_off_from_the_store_is_no_outage_and_a_blip_is_none() {
        let t0 = Instant::now();
        let mut c1 = StoreAlert::default();
        let one = vec![
            seen("c1", false, false),
            seen("c2", true, false),
            seen("c3", true, false),
        ];
        for s in 0..10 {
            assert_eq!(c1.step("c1", &one, t0 + Duration::from_secs(s)), None);
        }
        let all = vec![
            seen("c1", false, false),
            seen("c2", false, false),
            seen("c3", false, false),
        ];
        assert_eq!(c1.step("c1", &all, t0), None);
        let ok = vec![
            seen("c1", true, false),
            seen("c2", true, false),
            seen("c3", true, false),
        ];
        assert_eq!(c1.step("c1", &ok, t0 + Duration::from_secs(1)), None);
        assert_eq!(
            c1.step("c1", &all, t0 + Duration::from_secs(2)),
            None,
            "the hold restarts"
        );
    }
}
