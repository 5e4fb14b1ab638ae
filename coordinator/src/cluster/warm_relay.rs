//! Warm work for agents whose sessions a follower holds.
//!
//! Only the leader runs warm jobs (`warm::Warm`, fenced writes in etcd), and an agent
//! talks only to the coordinator holding its session. So once a second each follower
//! asks the leader (`POST /api/v1/cluster/warm`, a [`WarmPull`] naming its
//! warm-capable sessions and acking what it took), and the leader answers a
//! [`WarmRelayBatch`]: what each of those sessions should be sent.
//!
//! On the leader ([`WarmRelay::serve`]) each of a follower's sessions stands in
//! `Warm` as a session of its own, numbered from `warm::REMOTE_SESSIONS` up, so dispatch,
//! budgets and "disconnected" work exactly as for a local session: a shard goes back
//! to the pool when the follower stops naming the session (it ended, or moved) or stops
//! asking for [`PEER_SILENCE`]. Messages handed out stay in the follower's outbox until
//! it acks them, so an answer lost on the way is sent again, never a shard left in
//! flight with nobody working on it. Agents' progress reports come back through the
//! reports relay (`relay`) and are taken with the stand-in's number, from the follower it
//! stands for only ([`WarmRelay::vid_of`]).
//!
//! An edge named by two followers at once (it moved from one to the other, and its old
//! session there has not timed out yet) stays with the follower that had it until that
//! one stops naming it or asking: the stand-in never moves back and forth between them,
//! which would hand its shards out again at every move.
//!
//! On a follower ([`WarmRelay::accept`]) each message newer than what it took is queued
//! for the named session's warm loop (`Warm::forward`); a message for a session that has
//! ended is dropped (the leader reissues its shards when it sees the session gone).

use daemon::sync::Recover;
use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use proto::edge::{CoordinatorMessage, WarmPull, WarmRelayBatch, WarmRelayed, WarmSession};

use crate::edges::EdgeRegistry;
use crate::warm::{Warm, REMOTE_SESSIONS};

/// A follower that has not asked for this long is taken as gone: its sessions' shards
/// go back to the pool.
pub const PEER_SILENCE: Duration = Duration::from_secs(5);
/// Unacked messages kept per follower (a follower that stops acking loses the oldest).
const OUTBOX_MAX: usize = 4_096;

/// Both ends of the warm relay; share it behind an `Arc`.
#[derive(Debug)]
pub struct WarmRelay {
    instance: u64,
    inner: Mutex<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    /// Leader: the followers' sessions standing in `Warm`, by edge.
    remote: HashMap<String, Remote>,
    /// Leader: per follower, when it last asked and what it has not acked.
    outboxes: HashMap<String, Outbox>,
    next_vid: u64,
    next_seq: u64,
    /// Follower: the leader instance and the last sequence taken from it.
    taken: (u64, u64),
}

#[derive(Debug, Clone)]
struct Remote {
    peer: String,
    /// The follower's number for the session.
    session: u64,
    /// The stand-in's number in `Warm`.
    vid: u64,
}

#[derive(Debug)]
struct Outbox {
    asked: Instant,
    messages: VecDeque<WarmRelayed>,
}

impl Default for WarmRelay {
    fn default() -> Self {
        WarmRelay {
            instance: rand::random::<u64>().max(1),
            inner: Mutex::new(Inner {
                next_vid: REMOTE_SESSIONS,
                ..Inner::default()
            }),
        }
    }
}

impl WarmRelay {
    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.locked()
    }

    /// The stand-in session of `edge` (a follower holds it), whichever follower it is
    /// for (tests; progress is taken through `vid_of`).
    #[cfg(test)]
    pub fn vid(&self, edge: &str) -> Option<u64> {
        self.lock().remote.get(edge).map(|r| r.vid)
    }

    /// [`Self::vid`] when `peer` is the follower the stand-in is for: progress relayed
    /// by another one (an old session of the edge, half-dead there) is not the
    /// stand-in's.
    pub fn vid_of(&self, edge: &str, peer: &str) -> Option<u64> {
        self.lock()
            .remote
            .get(edge)
            .filter(|r| r.peer == peer)
            .map(|r| r.vid)
    }

    /// Leader: answers a follower's pull. Its sessions stand in `warm` from now on (an
    /// edge whose session is here is left to that session), what it acked is dropped,
    /// and what `warm` has for each of its sessions is added to its outbox.
    pub fn serve(&self, pull: WarmPull, warm: &Warm, edges: &EdgeRegistry) -> WarmRelayBatch {
        let mut connect = Vec::new();
        let mut disconnect = Vec::new();
        let mine: Vec<(String, u64, u64)> = {
            let mut inner = self.lock();
            let inner = &mut *inner;
            let outbox = inner
                .outboxes
                .entry(pull.peer.clone())
                .or_insert_with(|| Outbox {
                    asked: Instant::now(),
                    messages: VecDeque::new(),
                });
            outbox.asked = Instant::now();
            if pull.instance == self.instance {
                outbox.messages.retain(|m| m.seq > pull.acked);
            }
            let named: HashMap<&str, &WarmSession> = pull
                .sessions
                .iter()
                .filter(|s| !edges.is_connected_here(&s.edge_id))
                .map(|s| (s.edge_id.as_str(), s))
                .collect();
            inner.remote.retain(|edge, r| {
                let keep = r.peer != pull.peer
                    || named
                        .get(edge.as_str())
                        .is_some_and(|s| s.session == r.session);
                if !keep {
                    disconnect.push((edge.clone(), r.vid));
                }
                keep
            });
            for (edge, s) in named {
                if let Some(held) = inner.remote.get(edge) {
                    if held.peer == pull.peer {
                        continue;
                    }
                    // Another follower names it too (the edge moved and its old session
                    // there has not ended yet). Last-asker-wins would move the stand-in
                    // at every pull of either, each move handing its shards out again:
                    // the one holding it keeps it while it still names it and asks; this
                    // one takes over once that session ends there (its next pull drops
                    // it) or that follower falls silent.
                    let holder_asks = inner
                        .outboxes
                        .get(&held.peer)
                        .is_some_and(|o| o.asked.elapsed() < PEER_SILENCE);
                    if holder_asks {
                        continue;
                    }
                    disconnect.push((edge.to_owned(), held.vid));
                }
                let vid = inner.next_vid;
                inner.next_vid += 1;
                inner.remote.insert(
                    edge.to_owned(),
                    Remote {
                        peer: pull.peer.clone(),
                        session: s.session,
                        vid,
                    },
                );
                connect.push((edge.to_owned(), s.region.clone(), vid));
            }
            inner
                .remote
                .iter()
                .filter(|(_, r)| r.peer == pull.peer)
                .map(|(e, r)| (e.clone(), r.session, r.vid))
                .collect()
        };
        for (edge, vid) in disconnect {
            warm.disconnect(&edge, vid);
        }
        for (edge, region, vid) in connect {
            warm.connect_remote(&edge, &region, vid);
        }
        // `Warm` is asked without this relay's lock held.
        let handed: Vec<(String, u64, Vec<_>)> = mine
            .into_iter()
            .map(|(edge, session, vid)| {
                let msgs = warm.next_for(&edge, vid);
                (edge, session, msgs)
            })
            .collect();
        let mut inner = self.lock();
        let inner = &mut *inner;
        let Some(outbox) = inner.outboxes.get_mut(&pull.peer) else {
            return WarmRelayBatch {
                instance: self.instance,
                messages: Vec::new(),
            };
        };
        for (edge, session, msgs) in handed {
            for msg in msgs {
                inner.next_seq += 1;
                outbox.messages.push_back(WarmRelayed {
                    seq: inner.next_seq,
                    edge_id: edge.clone(),
                    session,
                    msg: Some(CoordinatorMessage { msg: Some(msg) }),
                });
            }
        }
        if outbox.messages.len() > OUTBOX_MAX {
            let excess = outbox.messages.len() - OUTBOX_MAX;
            outbox.messages.drain(..excess);
            tracing::warn!(peer = %pull.peer, dropped = excess, "a follower does not ack warm work; the oldest dropped");
        }
        WarmRelayBatch {
            instance: self.instance,
            messages: outbox.messages.iter().cloned().collect(),
        }
    }

    /// Leader, every second: the sessions of followers that stopped asking (or left the
    /// cluster: not in `members`) end in `warm`. Not the leader: all of them end.
    pub fn expire(&self, leading: bool, members: &[String], warm: &Warm) {
        let ended: Vec<(String, u64)> = {
            let mut inner = self.lock();
            let inner = &mut *inner;
            inner.outboxes.retain(|peer, o| {
                leading && o.asked.elapsed() < PEER_SILENCE && members.contains(peer)
            });
            let outboxes = &inner.outboxes;
            let mut ended = Vec::new();
            inner.remote.retain(|edge, r| {
                let keep = outboxes.contains_key(&r.peer);
                if !keep {
                    ended.push((edge.clone(), r.vid));
                }
                keep
            });
            ended
        };
        for (edge, vid) in ended {
            warm.disconnect(&edge, vid);
        }
    }

    /// Follower: what to ask the leader, as `peer`.
    pub fn pull(&self, peer: &str, warm: &Warm) -> WarmPull {
        let (instance, acked) = self.lock().taken;
        WarmPull {
            peer: peer.to_owned(),
            instance,
            acked,
            sessions: warm
                .own_sessions()
                .into_iter()
                .map(|(edge_id, region, session)| WarmSession {
                    edge_id,
                    region,
                    session,
                })
                .collect(),
        }
    }

    /// Follower: queues what the leader's answer holds that was not taken yet.
    pub fn accept(&self, batch: WarmRelayBatch, warm: &Warm) {
        let mut todo = Vec::new();
        {
            let mut inner = self.lock();
            if inner.taken.0 != batch.instance {
                inner.taken = (batch.instance, 0);
            }
            for m in batch.messages {
                if m.seq <= inner.taken.1 {
                    continue;
                }
                inner.taken.1 = m.seq;
                if let Some(msg) = m.msg.and_then(|c| c.msg) {
                    todo.push((m.edge_id, m.session, msg));
                }
            }
        }
        for (edge, session, msg) in todo {
            if !warm.forward(&edge, session, msg) {
                tracing::debug!(
                    edge,
                    session,
                    "warm work for a session that ended; the leader hands it out again"
                );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::warm::job::{JobSource, JobSpec, JobState};
    use crate::warm::WarmConfig;
    use proto::edge::{coordinator_message::Msg, WarmProgress};
    use std::sync::Arc;

    fn warm(dir: &std::path::Path) -> (Arc<Warm>, Arc<EdgeRegistry>) {
        let edges = Arc::new(EdgeRegistry::default());
        let config = WarmConfig {
            shard_urls: 10,
            ..WarmConfig::default()
        };
        let regions = vec!["eu".into(), "us".into()];
        let w = Warm::open(config, "tok".into(), regions, dir, edges.clone()).unwrap();
        (w, edges)
    }

    fn shards(msgs: &[Msg]) -> Vec<u32> {
        msgs.iter()
            .filter_map(|m| match m {
                Msg::WarmShard(s) => Some(s.shard),
                _ => None,
            })
            .collect()
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn a_followers_agent_gets_the_leaders_shards_once_even_when_an_answer_is_lost() {
        let (ld, fd) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let ((lw, le), (fw, _)) = (warm(ld.path()), warm(fd.path()));
        let (leader, follower) = (WarmRelay::default(), WarmRelay::default());
        // The follower holds eu-1's session (its number 7); the leader learns of it.
        fw.connect("eu-1", "eu", 7);
        let first = leader.serve(follower.pull("c2", &fw), &lw, &le);
        assert!(first.messages.is_empty());
        follower.accept(first, &fw);
        let vid = leader.vid("eu-1").expect("a stand-in on the leader");
        assert!(vid >= REMOTE_SESSIONS);
        // A job on the leader targets the follower's edge like one of its own.
        let id = lw
            .create(
                JobSpec {
                    urls: (0..30).map(|i| format!("http://shop/p/{i}")).collect(),
                    regions: Some(vec!["eu".into()]),
                    ..JobSpec::default()
                },
                JobSource::Api,
            )
            .unwrap();
        lw.start_next().await;
        assert_eq!(lw.view(id).unwrap().state, JobState::Running);
        let pull = follower.pull("c2", &fw);
        let lost = leader.serve(pull.clone(), &lw, &le);
        assert_eq!(lost.messages.len(), 2, "two shards in flight");
        // That answer never arrived: the same pull gets the same two again.
        let again = leader.serve(pull, &lw, &le);
        assert_eq!(
            again.messages.iter().map(|m| m.seq).collect::<Vec<_>>(),
            lost.messages.iter().map(|m| m.seq).collect::<Vec<_>>()
        );
        follower.accept(again.clone(), &fw);
        follower.accept(again, &fw); // taken once
        let sent = fw.next_for("eu-1", 7);
        assert_eq!(shards(&sent), [0, 1]);
        assert!(fw.next_for("eu-1", 7).is_empty());
        // Acked: nothing more until a shard is reported (it comes back relayed).
        let acked = leader.serve(follower.pull("c2", &fw), &lw, &le);
        assert!(acked.messages.is_empty(), "{:?}", acked.messages);
        lw.on_progress(
            "eu-1",
            vid,
            WarmProgress {
                job_id: id,
                shard: 0,
                fetched: 10,
                ..WarmProgress::default()
            },
        );
        let next = leader.serve(follower.pull("c2", &fw), &lw, &le);
        follower.accept(next, &fw);
        assert_eq!(shards(&fw.next_for("eu-1", 7)), [2]);
        // The session ends on the follower: its shards go back to the pool, and a new
        // session (number 8) is handed them again.
        fw.disconnect("eu-1", 7);
        let gone = leader.serve(follower.pull("c2", &fw), &lw, &le);
        follower.accept(gone, &fw);
        assert_eq!(leader.vid("eu-1"), None);
        fw.connect("eu-1", "eu", 8);
        let back = leader.serve(follower.pull("c2", &fw), &lw, &le);
        follower.accept(back, &fw);
        assert_eq!(shards(&fw.next_for("eu-1", 8)), [1, 2]);
        // A leader that steps down lets every stand-in go.
        leader.expire(false, &["c1".into(), "c2".into()], &lw);
        assert_eq!(leader.vid("eu-1"), None);
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn a_follower_that_stops_asking_loses_its_stand_ins_and_a_local_session_wins() {
        let dir = tempfile::tempdir().unwrap();
        let (lw, le) = warm(dir.path());
        let leader = WarmRelay::default();
        let pull = WarmPull {
            peer: "c2".into(),
            sessions: vec![WarmSession {
                edge_id: "eu-1".into(),
                region: "eu".into(),
                session: 3,
            }],
            ..WarmPull::default()
        };
        leader.serve(pull.clone(), &lw, &le);
        assert!(leader.vid("eu-1").is_some());
        // Still asking, still a member: kept. Gone from the members: let go.
        leader.expire(true, &["c1".into(), "c2".into()], &lw);
        assert!(leader.vid("eu-1").is_some());
        leader.expire(true, &["c1".into()], &lw);
        assert_eq!(leader.vid("eu-1"), None);
        // The edge's session is here now: a stale pull naming it stands nothing in.
        lw.connect("eu-1", "eu", 1);
        assert!(!lw.connect_remote("eu-1", "eu", REMOTE_SESSIONS + 5));
        assert_eq!(lw.own_sessions(), [("eu-1".into(), "eu".into(), 1)]);
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn an_edge_two_followers_name_does_not_flap_between_them() {
        let dir = tempfile::tempdir().unwrap();
        let (lw, le) = warm(dir.path());
        let leader = WarmRelay::default();
        let pull = |peer: &str, session: u64, names: bool| WarmPull {
            peer: peer.into(),
            sessions: names
                .then(|| WarmSession {
                    edge_id: "eu-1".into(),
                    region: "eu".into(),
                    session,
                })
                .into_iter()
                .collect(),
            ..WarmPull::default()
        };
        let id = lw
            .create(
                JobSpec {
                    urls: (0..30).map(|i| format!("http://shop/p/{i}")).collect(),
                    regions: Some(vec!["eu".into()]),
                    ..JobSpec::default()
                },
                JobSource::Api,
            )
            .unwrap();
        // eu-1's session is on c2; the job hands its shards out there.
        leader.serve(pull("c2", 4, true), &lw, &le);
        lw.start_next().await;
        assert_eq!(lw.view(id).unwrap().state, JobState::Running);
        let first = leader.serve(pull("c2", 4, true), &lw, &le);
        let handed = |b: &WarmRelayBatch| {
            b.messages
                .iter()
                .filter(|m| {
                    matches!(
                        m.msg.as_ref().and_then(|c| c.msg.as_ref()),
                        Some(Msg::WarmShard(_))
                    )
                })
                .count()
        };
        assert_eq!(handed(&first), 2);
        let vid = leader.vid("eu-1").unwrap();
        // The agent moved to c3, whose pulls name it while c2's old session lingers:
        // pulls of both, alternately, leave the stand-in where it was, and nothing is
        // handed out again.
        for _ in 0..4 {
            let b3 = leader.serve(pull("c3", 9, true), &lw, &le);
            assert_eq!(handed(&b3), 0, "c3 got shards while c2 holds the stand-in");
            assert_eq!(leader.vid("eu-1"), Some(vid), "the stand-in moved to c3");
            let b2 = leader.serve(pull("c2", 4, true), &lw, &le);
            assert_eq!(b2.messages.len(), 2, "c2's outbox: the same two, unacked");
            assert_eq!(leader.vid("eu-1"), Some(vid), "the stand-in moved back");
        }
        // Progress relayed by c3 is not the stand-in's; c2's is.
        assert_eq!(leader.vid_of("eu-1", "c3"), None);
        assert_eq!(leader.vid_of("eu-1", "c2"), Some(vid));
        // c2's old session ends: c3's next pull takes it over, once, with the shards.
        leader.serve(pull("c2", 4, false), &lw, &le);
        assert_eq!(leader.vid("eu-1"), None);
        let taken = leader.serve(pull("c3", 9, true), &lw, &le);
        let moved = leader.vid_of("eu-1", "c3").expect("c3's stand-in");
        assert_ne!(moved, vid);
        assert_eq!(handed(&taken), 2, "the shards go to c3's session");
        leader.serve(pull("c3", 9, true), &lw, &le);
        assert_eq!(leader.vid("eu-1"), Some(moved));
        // c3 falls silent (and c2 names the edge again): only then does c2 get it back.
        leader.lock().outboxes.get_mut("c3").unwrap().asked -= PEER_SILENCE * 2;
        leader.serve(pull("c2", 5, true), &lw, &le);
        assert!(leader.vid_of("eu-1", "c2").is_some());
    }
}
