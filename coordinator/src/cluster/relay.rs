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
//! Popular URLs (`TopUrls`) and shoppers' networks (`ClientNets`) travel the same way, so
//! `GET /api/v1/warm/top` and `GET /api/v1/regions/{name}/countries` count every edge
//! on every coordinator. Those two can be large, so each is cut to a bound before it is
//! kept ([`TOP_URLS_RELAYED`] URLs and [`TOP_URL_BYTES`] of them; [`NETS_RELAYED`]
//! networks, the rest counted in `other_hits`/`other_misses`), the buffer holds at most
//! [`RING_BYTES`] and one answer at most [`READ_BYTES`].
//!
//! The buffer holds [`RING_ENTRIES`] reports. A reader that falls further behind loses
//! the oldest (counted in `missed`): probe results and counter samples are soft state,
//! the next ones correct it (counters are cumulative, so a lost sample only widens one
//! delta). A reader that names another instance (this coordinator restarted, or it is
//! the first read) starts at the newest: old results replayed would be news no more.
//! Nothing here is written to etcd.

use daemon::sync::Recover;
use std::collections::VecDeque;
use std::sync::Mutex;

use prost::Message;
use proto::edge::{agent_message, AgentMessage, ClientNets, RelayBatch, RelayedReport, TopUrls};

/// Reports the buffer holds: about a minute of a thousand edges' probe results and
/// counter samples.
pub const RING_ENTRIES: usize = 16_384;
/// Most reports in one answer.
pub const READ_MAX: usize = 4_096;
/// Most bytes (encoded) the buffer holds, and one answer carries (the reader's limit is
/// 16 MiB).
pub const RING_BYTES: usize = 32 * 1024 * 1024;
pub const READ_BYTES: usize = 8 * 1024 * 1024;
/// Most popular URLs relayed per report (agents send at most 10 000, 100 by default),
/// and most bytes of them.
pub const TOP_URLS_RELAYED: usize = 1_000;
pub const TOP_URL_BYTES: usize = 128 * 1024;
/// Most client networks relayed per report (agents send 256 by default).
pub const NETS_RELAYED: usize = 1_024;

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
    entries: VecDeque<(usize, RelayedReport)>,
    /// Encoded bytes of `entries`.
    bytes: usize,
}

/// `msg` cut to what is relayed (see the module docs); `None` for a kind not relayed.
fn bounded(msg: &agent_message::Msg) -> Option<agent_message::Msg> {
    use agent_message::Msg;
    Some(match msg {
        Msg::Probe(_) | Msg::Stats(_) | Msg::WarmProgress(_) => msg.clone(),
        Msg::TopUrls(top) => {
            let mut bytes = 0;
            let urls = top
                .urls
                .iter()
                .take(TOP_URLS_RELAYED)
                .take_while(|u| {
                    bytes += u.url.len();
                    bytes <= TOP_URL_BYTES
                })
                .cloned()
                .collect();
            Msg::TopUrls(TopUrls { urls })
        }
        Msg::ClientNets(nets) => {
            let mut out = ClientNets {
                nets: nets.nets.iter().take(NETS_RELAYED).cloned().collect(),
                other_hits: nets.other_hits,
                other_misses: nets.other_misses,
            };
            for n in nets.nets.iter().skip(NETS_RELAYED) {
                out.other_hits = out.other_hits.saturating_add(n.hits);
                out.other_misses = out.other_misses.saturating_add(n.misses);
            }
            Msg::ClientNets(out)
        }
        _ => return None,
    })
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
    /// (probe results, counter samples, popular URLs and client networks, cut to their
    /// bounds, and warm progress for the leader's jobs); anything else is not kept.
    pub fn offer(&self, edge: &str, region: &str, msg: &agent_message::Msg) {
        if !self.enabled {
            return;
        }
        let Some(msg) = bounded(msg) else {
            return;
        };
        let report = RelayedReport {
            edge_id: edge.to_owned(),
            region: region.to_owned(),
            report: Some(AgentMessage { msg: Some(msg) }),
        };
        let size = report.encoded_len();
        let mut ring = self.ring.locked();
        ring.entries.push_back((size, report));
        ring.bytes += size;
        while ring.entries.len() > RING_ENTRIES || ring.bytes > RING_BYTES {
            let Some((size, _)) = ring.entries.pop_front() else {
                break;
            };
            ring.bytes -= size;
            ring.first += 1;
        }
    }

    /// What a peer holding (`instance`, `since`) gets next: the reports from `since` on
    /// (at most [`READ_MAX`]), or, for another instance, none and where to start.
    pub fn read(&self, instance: u64, since: u64) -> RelayBatch {
        let ring = self.ring.locked();
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
        let mut bytes = 0;
        batch.reports = ring
            .entries
            .iter()
            .skip(skip)
            .take(READ_MAX)
            .take_while(|(size, _)| {
                // At least one report an answer, however large, so a reader moves on.
                let first = bytes == 0;
                bytes += size;
                first || bytes <= READ_BYTES
            })
            .map(|(_, r)| r.clone())
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
        let ring_len = relay.ring.locked().entries.len();
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
        assert!(relay.ring.locked().entries.is_empty());
    }

    #[test]
    fn popular_urls_and_client_networks_are_relayed_within_their_bounds() {
        use proto::edge::{NetCount, UrlCount};
        let relay = Relay::new(true);
        let start = relay.read(0, 0);
        let urls = (0..5_000)
            .map(|i| UrlCount {
                url: format!("shop.test/p/{i}"),
                count: 5_000 - i,
            })
            .collect();
        relay.offer("e1", "eu", &agent_message::Msg::TopUrls(TopUrls { urls }));
        let nets = (0..2_000)
            .map(|i| NetCount {
                net: format!("10.{}.{}.0", i / 256, i % 256),
                prefix_len: 24,
                hits: 2,
                misses: 1,
            })
            .collect();
        relay.offer(
            "e1",
            "eu",
            &agent_message::Msg::ClientNets(ClientNets {
                nets,
                other_hits: 5,
                other_misses: 0,
            }),
        );
        let b = relay.read(start.instance, start.next);
        assert_eq!(b.reports.len(), 2);
        match b.reports[0].report.as_ref().and_then(|r| r.msg.as_ref()) {
            Some(agent_message::Msg::TopUrls(t)) => {
                assert_eq!(t.urls.len(), TOP_URLS_RELAYED);
                assert_eq!(t.urls[0].url, "shop.test/p/0", "the busiest first");
            }
            other => panic!("{other:?}"),
        }
        match b.reports[1].report.as_ref().and_then(|r| r.msg.as_ref()) {
            Some(agent_message::Msg::ClientNets(n)) => {
                assert_eq!(n.nets.len(), NETS_RELAYED);
                // The networks cut off still count, as others.
                assert_eq!(n.other_hits, 5 + 2 * (2_000 - NETS_RELAYED as u64));
                assert_eq!(n.other_misses, 2_000 - NETS_RELAYED as u64);
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn the_buffer_and_each_answer_are_bounded_in_bytes() {
        use proto::edge::UrlCount;
        let relay = Relay::new(true);
        let start = relay.read(0, 0);
        let big = || {
            let urls = (0..TOP_URLS_RELAYED)
                .map(|i| UrlCount {
                    url: format!("shop.test/{}/{i}", "x".repeat(1000)),
                    count: 1,
                })
                .collect();
            agent_message::Msg::TopUrls(TopUrls { urls })
        };
        for _ in 0..400 {
            relay.offer("e1", "eu", &big());
        }
        let bytes = relay.ring.locked().bytes;
        assert!(bytes <= RING_BYTES, "{bytes}");
        let b = relay.read(start.instance, start.next);
        assert!(b.missed > 0, "the oldest dropped for the byte bound");
        let size: usize = b.reports.iter().map(|r| r.encoded_len()).sum();
        assert!(size <= READ_BYTES, "{size}");
        assert!(!b.reports.is_empty());
    }
}
