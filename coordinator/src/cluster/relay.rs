//! Agents' reports relayed between the coordinators of a cluster, so that every
//! coordinator judges every region from every edge.
//!
//! Region health, hit ratios, alert rules and routing are decided from probe results
//! and varnish counters, and an agent sends those only to the coordinator holding its
//! session. (Warm progress travels the same way, to the leader that runs the jobs:
//! `warm_relay`.) With agents spread over several coordinators, each would see part of a
//! region: the leader (which sends the alerts) could read `up` for a region whose
//! varnishd died behind a follower. So each coordinator keeps the probe results and
//! counter samples its agents sent in a bounded buffer ([`Relay`]), and every other one
//! reads it once a second (`GET /api/v1/cluster/reports?instance=I&since=N`, a
//! [`RelayBatch`] as protobuf) and records them as if its own agents had sent them
//! (`cluster::peers`).
//!
//! The buffer holds [`RING_ENTRIES`] reports. A reader that falls further behind loses
//! the oldest (counted in `missed`): probe results and counter samples are soft state,
//! the next ones correct it (counters are cumulative, so a lost sample only widens one
//! delta). A reader that names another instance (this coordinator restarted, or it is
//! the first read) starts at the newest: old results replayed would be news no more.
//! Nothing here is written to etcd.

use std::collections::VecDeque;
use std::sync::Mutex;

use proto::edge::{agent_message, AgentMessage, RelayBatch, RelayedReport};

/// Reports the buffer holds: about a minute of a thousand edges' probe results and
/// counter samples.
pub const RING_ENTRIES: usize = 16_384;
/// Most reports in one answer.
pub const READ_MAX: usize = 4_096;

/// This coordinator's reports for its peers; share it behind an `Arc`.
#[derive(Debug)]
pub struct Relay {
    /// Off for a coordinator that has no peers (the embedded store).
    enabled: bool,
    /// Picked at start: a reader holding another one starts over.
    instance: u64,
    ring: Mutex<Ring>,
}

#[derive(Debug, Default)]
struct Ring {
    /// Sequence of `entries[0]`.
    first: u64,
    entries: VecDeque<RelayedReport>,
}

impl Relay {
    pub fn new(enabled: bool) -> Self {
        Relay {
            enabled,
            instance: rand::random::<u64>().max(1),
            ring: Mutex::new(Ring::default()),
        }
    }

    /// Keeps `msg` from `edge` of `region` for the peers when it is a kind they use
    /// (probe results, counter samples, and warm progress for the leader's jobs);
    /// anything else is not kept.
    pub fn offer(&self, edge: &str, region: &str, msg: &agent_message::Msg) {
        if !self.enabled
            || !matches!(
                msg,
                agent_message::Msg::Probe(_)
                    | agent_message::Msg::Stats(_)
                    | agent_message::Msg::WarmProgress(_)
            )
        {
            return;
        }
        let report = RelayedReport {
            edge_id: edge.to_owned(),
            region: region.to_owned(),
            report: Some(AgentMessage {
                msg: Some(msg.clone()),
            }),
        };
        let mut ring = self.ring.lock().unwrap_or_else(|p| p.into_inner());
        ring.entries.push_back(report);
        while ring.entries.len() > RING_ENTRIES {
            ring.entries.pop_front();
            ring.first += 1;
        }
    }

    /// What a peer holding (`instance`, `since`) gets next: the reports from `since` on
    /// (at most [`READ_MAX`]), or, for another instance, none and where to start.
    pub fn read(&self, instance: u64, since: u64) -> RelayBatch {
        let ring = self.ring.lock().unwrap_or_else(|p| p.into_inner());
        let end = ring.first + ring.entries.len() as u64;
        let mut batch = RelayBatch {
            instance: self.instance,
            next: end,
            missed: 0,
            reports: Vec::new(),
        };
        if instance != self.instance || since > end {
            return batch;
        }
        let from = since.max(ring.first);
        batch.missed = from - since;
        let skip = usize::try_from(from - ring.first).unwrap_or(usize::MAX);
        batch.reports = ring
            .entries
            .iter()
            .skip(skip)
            .take(READ_MAX)
            .cloned()
            .collect();
        batch.next = from + batch.reports.len() as u64;
        batch
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proto::edge::{ProbeResult, VarnishStats};

    fn probe(n: u32) -> agent_message::Msg {
        agent_message::Msg::Probe(ProbeResult {
            check: format!("c{n}"),
            ..Default::default()
        })
    }

    fn checks(batch: &RelayBatch) -> Vec<String> {
        batch
            .reports
            .iter()
            .filter_map(|r| match r.report.as_ref()?.msg.as_ref()? {
                agent_message::Msg::Probe(p) => Some(p.check.clone()),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn a_reader_starts_at_the_newest_then_gets_each_report_once_in_order() {
        let relay = Relay::new(true);
        relay.offer("e1", "eu", &probe(0));
        // First read (or another instance): nothing old, only where to go on from.
        let first = relay.read(0, 0);
        assert!(first.reports.is_empty());
        assert_eq!(first.next, 1);
        relay.offer("e1", "eu", &probe(1));
        relay.offer(
            "e2",
            "us",
            &agent_message::Msg::Stats(VarnishStats::default()),
        );
        relay.offer(
            "e2",
            "us",
            &agent_message::Msg::Heartbeat(Default::default()),
        );
        let b = relay.read(first.instance, first.next);
        assert_eq!(b.reports.len(), 2, "heartbeats are not relayed");
        assert_eq!(checks(&b), ["c1"]);
        assert_eq!(b.reports[1].edge_id, "e2");
        assert_eq!(b.reports[1].region, "us");
        assert_eq!(b.missed, 0);
        let again = relay.read(b.instance, b.next);
        assert!(again.reports.is_empty());
        assert_eq!(again.next, b.next);
        // A restarted coordinator is another instance: the reader starts over.
        let other = Relay::new(true);
        other.offer("e1", "eu", &probe(2));
        let restarted = other.read(b.instance, b.next);
        assert!(restarted.reports.is_empty());
        assert_eq!(restarted.next, 1);
        assert_ne!(restarted.instance, b.instance);
    }

    #[test]
    fn the_buffer_is_bounded_and_a_late_reader_is_told_what_it_missed() {
        let relay = Relay::new(true);
        let start = relay.read(0, 0);
        for n in 0..(RING_ENTRIES + 10) as u32 {
            relay.offer("e1", "eu", &probe(n));
        }
        let ring_len = relay.ring.lock().unwrap().entries.len();
        assert_eq!(ring_len, RING_ENTRIES);
        let b = relay.read(start.instance, start.next);
        assert_eq!(b.missed, 10);
        assert_eq!(b.reports.len(), READ_MAX);
        assert_eq!(checks(&b)[0], "c10");
        let rest = relay.read(b.instance, b.next);
        assert_eq!(checks(&rest)[0], format!("c{}", 10 + READ_MAX));
    }

    #[test]
    fn a_coordinator_without_peers_keeps_nothing() {
        let relay = Relay::new(false);
        relay.offer("e1", "eu", &probe(0));
        assert!(relay.ring.lock().unwrap().entries.is_empty());
    }
}
