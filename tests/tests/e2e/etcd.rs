//! The etcd client (`etcd` crate: etcd's own .proto files compiled with protox) against a
//! real 3-member etcd cluster: what the shared store and leader election will stand on.
//! Compare-and-swap on a head key admits exactly one writer per revision, a watch from a
//! revision sees every later write in order, an election has one leader at a time whose
//! key revision grows (the fencing token), and the cluster keeps serving with a member
//! killed.

use std::time::Duration;

use etcd::etcdserverpb::{
    compare, request_op, watch_request, Compare, LeaseGrantRequest, LeaseRevokeRequest, PutRequest,
    RangeRequest, RequestOp, TxnRequest, WatchCreateRequest, WatchRequest,
};
use etcd::v3electionpb::{CampaignRequest, LeaderRequest, ResignRequest};
use etcd::Etcd;
use tests::{temp_dir, EtcdCluster};

/// A txn that sets `key` to `value` only if its mod revision is still `seen`.
fn cas(key: &[u8], seen: i64, value: &[u8]) -> TxnRequest {
    TxnRequest {
        compare: vec![Compare {
            result: compare::CompareResult::Equal as i32,
            target: compare::CompareTarget::Mod as i32,
            key: key.to_vec(),
            target_union: Some(compare::TargetUnion::ModRevision(seen)),
            ..Default::default()
        }],
        success: vec![RequestOp {
            request: Some(request_op::Request::RequestPut(PutRequest {
                key: key.to_vec(),
                value: value.to_vec(),
                ..Default::default()
            })),
        }],
        failure: vec![],
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_etcd_client_does_cas_watch_election_and_survives_a_member() {
    let dir = temp_dir();
    let mut cluster = EtcdCluster::start(dir.path(), 3).await;
    let etcd = Etcd::connect(&cluster.endpoints).expect("connect");
    let mut kv = etcd.kv();

    // Compare-and-swap on a head key: of two writers that saw the same revision, one wins.
    let put = kv
        .put(PutRequest {
            key: b"/t/head".to_vec(),
            value: b"0".to_vec(),
            ..Default::default()
        })
        .await
        .expect("put")
        .into_inner();
    let rev = put.header.expect("header").revision;
    let a = kv
        .txn(cas(b"/t/head", rev, b"1"))
        .await
        .expect("txn a")
        .into_inner();
    let b = kv
        .txn(cas(b"/t/head", rev, b"2"))
        .await
        .expect("txn b")
        .into_inner();
    assert!(
        a.succeeded && !b.succeeded,
        "exactly one writer per revision"
    );
    let got = kv
        .range(RangeRequest {
            key: b"/t/head".to_vec(),
            ..Default::default()
        })
        .await
        .expect("range")
        .into_inner();
    assert_eq!(got.kvs[0].value, b"1");

    // A watch from a revision replays every later write, in order.
    let from = got.header.expect("header").revision + 1;
    for i in 0..5 {
        kv.put(PutRequest {
            key: format!("/t/log/{i:04}").into_bytes(),
            value: vec![i as u8],
            ..Default::default()
        })
        .await
        .expect("put");
    }
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tx.send(WatchRequest {
        request_union: Some(watch_request::RequestUnion::CreateRequest(
            WatchCreateRequest {
                key: b"/t/log/".to_vec(),
                range_end: etcd::prefix_end(b"/t/log/"),
                start_revision: from,
                ..Default::default()
            },
        )),
    })
    .await
    .expect("watch request");
    let mut stream = etcd
        .watch()
        .watch(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .expect("watch")
        .into_inner();
    let mut seen = Vec::new();
    while seen.len() < 5 {
        let msg = tokio::time::timeout(Duration::from_secs(10), stream.message())
            .await
            .expect("watch events in time")
            .expect("watch stream")
            .expect("open");
        seen.extend(
            msg.events
                .iter()
                .filter_map(|e| e.kv.as_ref())
                .map(|kv| kv.value[0]),
        );
    }
    assert_eq!(seen, vec![0, 1, 2, 3, 4]);

    // Election: one leader at a time; the next one's key revision is higher (fencing).
    let mut lease = etcd.lease();
    let grant = |ttl| LeaseGrantRequest { ttl, id: 0 };
    let l1 = lease
        .lease_grant(grant(5))
        .await
        .expect("lease")
        .into_inner()
        .id;
    let l2 = lease
        .lease_grant(grant(5))
        .await
        .expect("lease")
        .into_inner()
        .id;
    let mut election = etcd.election();
    let first = election
        .campaign(CampaignRequest {
            name: b"/t/leader".to_vec(),
            lease: l1,
            value: b"c1".to_vec(),
        })
        .await
        .expect("campaign")
        .into_inner()
        .leader
        .expect("leader key");
    let mut second_election = etcd.election();
    let second = tokio::spawn(async move {
        second_election
            .campaign(CampaignRequest {
                name: b"/t/leader".to_vec(),
                lease: l2,
                value: b"c2".to_vec(),
            })
            .await
            .map(|r| r.into_inner().leader)
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(!second.is_finished(), "two leaders at once");
    let leader = election
        .leader(LeaderRequest {
            name: b"/t/leader".to_vec(),
        })
        .await
        .expect("leader")
        .into_inner()
        .kv
        .expect("a leader");
    assert_eq!(leader.value, b"c1");
    // The first leader's lease goes (a crash): the second wins, with a later revision.
    lease
        .lease_revoke(LeaseRevokeRequest { id: l1 })
        .await
        .expect("revoke");
    let next = tokio::time::timeout(Duration::from_secs(10), second)
        .await
        .expect("second elected in time")
        .expect("task")
        .expect("campaign")
        .expect("leader key");
    assert!(
        next.rev > first.rev,
        "fencing token grows: {} then {}",
        first.rev,
        next.rev
    );
    election
        .resign(ResignRequest { leader: Some(next) })
        .await
        .expect("resign");

    // One member killed (the one in use first): the other two still serve, and the
    // client moves on to them.
    cluster.members[0].kill9().await;
    for i in 0..20 {
        let key = format!("/t/after/{i}").into_bytes();
        etcd.retry(|ch| {
            let key = key.clone();
            async move {
                etcd::etcdserverpb::kv_client::KvClient::new(ch)
                    .put(PutRequest {
                        key,
                        value: b"x".to_vec(),
                        ..Default::default()
                    })
                    .await
            }
        })
        .await
        .expect("put with a member down");
    }
}

/// The purge log on etcd (`coordinator::purge::log::etcd`): two coordinators appending at
/// once get dense, ordered, never-duplicated sequences, every answered append is stored
/// under the sequences it was given, a member's death changes nothing, and with etcd gone
/// an append fails instead of pretending.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_coordinators_share_one_dense_purge_log_on_etcd() {
    use coordinator::purge::log::etcd::{Append, EtcdLog};
    use coordinator::purge::log::NewPurge;
    use proto::edge::{purge_entry::Op, TagSet};

    let dir = temp_dir();
    let mut cluster = EtcdCluster::start(dir.path(), 3).await;
    let etcd = Etcd::connect(&cluster.endpoints).expect("connect");
    let c1 = EtcdLog::open(etcd.clone(), "/vc/").await.expect("open c1");
    let c2 = EtcdLog::open(Etcd::connect(&cluster.endpoints).expect("connect"), "/vc/")
        .await
        .expect("open c2");
    assert_eq!(c1.log_id(), c2.log_id(), "one log");

    // 8 appenders, half through each coordinator, each stamping its purges with its own
    // received_at so the stored entries can be traced back to the append answered.
    let mut tasks = Vec::new();
    for w in 0..8u64 {
        let log = if w % 2 == 0 { c1.clone() } else { c2.clone() };
        tasks.push(tokio::spawn(async move {
            let mut answered = Vec::new();
            let mut head = 0;
            for i in 0..25u64 {
                let stamp = w * 1_000 + i;
                let n = 1 + (i % 3) as usize;
                let purges = (0..n)
                    .map(|k| NewPurge {
                        op: Op::Tags(TagSet {
                            tags: vec![format!("w{w}_{i}_{k}")],
                        }),
                        soft: false,
                    })
                    .collect();
                let (last, committed) = log
                    .append(
                        &[Append {
                            received_at_us: stamp,
                            purges,
                        }],
                        head,
                    )
                    .await
                    .expect("append");
                // What was committed, as the writer hands it to its own tail.
                let seqs: Vec<u64> = committed.iter().map(|e| e.seq).collect();
                assert_eq!(seqs.len(), n);
                assert_eq!(seqs.last(), Some(&last[0]), "{seqs:?}");
                assert!(seqs.windows(2).all(|w| w[1] == w[0] + 1), "{seqs:?}");
                head = last[0];
                answered.push((stamp, last[0], n));
            }
            answered
        }));
    }
    let mut answered = Vec::new();
    for (i, t) in tasks.into_iter().enumerate() {
        answered.extend(t.await.expect("appender"));
        if i == 3 {
            // Half way through collecting, a member dies; the rest must not notice.
            cluster.members[1].kill9().await;
        }
    }
    let total: usize = answered.iter().map(|a| a.2).sum();
    let entries = c2.read_from(1, 10_000).await.expect("read");
    let seqs: Vec<u64> = entries.iter().map(|e| e.seq).collect();
    assert_eq!(
        seqs,
        (1..=total as u64).collect::<Vec<_>>(),
        "dense and ordered"
    );
    assert_eq!(c1.head().await.expect("head"), total as u64);
    for (stamp, last, n) in &answered {
        for k in 0..*n as u64 {
            let e = &entries[(*last - k - 1) as usize];
            assert_eq!(
                e.received_at_us, *stamp,
                "seq {} belongs to append {stamp}",
                e.seq
            );
        }
    }

    // A head key that is not a sequence (written by hand, another tool): an append says
    // so at once instead of retrying against a head that never matches.
    let bad = EtcdLog::open(etcd.clone(), "/bad/")
        .await
        .expect("open /bad/");
    let garbage = etcd::etcdserverpb::TxnRequest {
        success: vec![etcd::op::put(b"/bad/log/head", b"xyz")],
        ..Default::default()
    };
    etcd.txn(garbage).await.expect("put a garbage head");
    let purge = |tag: &str| Append {
        received_at_us: 1,
        purges: vec![NewPurge {
            op: Op::Tags(TagSet {
                tags: vec![tag.into()],
            }),
            soft: false,
        }],
    };
    let refused = tokio::time::timeout(Duration::from_secs(10), bad.append(&[purge("x")], 0))
        .await
        .expect("an answer, not a retry loop");
    let err = refused.expect_err("a garbage head is refused").to_string();
    assert!(err.contains("head key is not 8 bytes"), "{err}");

    // etcd gone: an append fails (the listener answers 503), it never claims success.
    for m in cluster.members.iter_mut() {
        m.kill9().await;
    }
    let started = std::time::Instant::now();
    assert!(c1.append(&[purge("lost")], total as u64).await.is_err());
    assert!(
        started.elapsed() < Duration::from_secs(15),
        "{:?}",
        started.elapsed()
    );
}

/// Leader election (`coordinator::leader`): one leader at a time, every campaigner knows
/// who and its fencing revision; a leader that steps down hands over at once with a
/// higher fencing revision; a leader cut off from etcd's quorum stops calling itself
/// leader within its lease TTL.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_leader_at_a_time_and_a_cut_off_leader_steps_down() {
    use coordinator::leader::{campaign, Leadership};
    use tokio_util::sync::CancellationToken;

    let dir = temp_dir();
    let mut cluster = EtcdCluster::start(dir.path(), 3).await;
    let ttl = Duration::from_secs(2);
    let (s1, s2) = (CancellationToken::new(), CancellationToken::new());
    let etcd = |_| Etcd::connect(&cluster.endpoints).expect("connect");
    let r1 = campaign(etcd(1), "/vc/leader", "c1", ttl, s1.clone());
    let r2 = campaign(etcd(2), "/vc/leader", "c2", ttl, s2.clone());
    let both = |r1: &tokio::sync::watch::Receiver<Leadership>,
                r2: &tokio::sync::watch::Receiver<Leadership>| {
        (r1.borrow().clone(), r2.borrow().clone())
    };
    tests::assert_eventually!(
        10,
        {
            let (a, b) = both(&r1, &r2);
            (a.me ^ b.me) && a.leader.is_some() && a.leader == b.leader && a.fencing == b.fencing
        },
        "no single agreed leader: {:?}",
        both(&r1, &r2)
    );
    let (a, b) = both(&r1, &r2);
    let (leader_stop, follower) = if a.me {
        (s1.clone(), &r2)
    } else {
        (s2.clone(), &r1)
    };
    let first_fencing = a.fencing.expect("fencing");
    // The leader steps down (a deploy): the other leads at once, with a later revision.
    leader_stop.cancel();
    tests::assert_eventually!(
        5,
        follower.borrow().me,
        "no hand-over: {:?}",
        both(&r1, &r2)
    );
    let now = follower.borrow().clone();
    assert!(now.fencing.expect("fencing") > first_fencing, "{now:?}");
    assert_ne!(
        now.leader,
        if a.me {
            a.leader.clone()
        } else {
            b.leader.clone()
        }
    );

    // Quorum lost (2 of 3 members gone): the leader cannot renew its lease and must stop
    // acting as leader within the TTL.
    cluster.members[0].kill9().await;
    cluster.members[1].kill9().await;
    let cut = std::time::Instant::now();
    tests::assert_eventually!(
        6,
        !follower.borrow().me,
        "a leader without quorum still says it leads"
    );
    assert!(
        cut.elapsed() <= ttl + Duration::from_secs(2),
        "{:?}",
        cut.elapsed()
    );
    s1.cancel();
    s2.cancel();
}

/// Following the shared log: a follower started before two coordinators append sees every
/// entry once, in order; one whose watch starts at a compacted revision re-lists and
/// still sees every entry.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn followers_see_every_entry_once_in_order_even_after_compaction() {
    use coordinator::purge::log::etcd::{Append, EtcdLog};
    use coordinator::purge::log::NewPurge;
    use proto::edge::{purge_entry::Op, TagSet};

    let dir = temp_dir();
    let cluster = EtcdCluster::start(dir.path(), 3).await;
    let etcd = Etcd::connect(&cluster.endpoints).expect("connect");
    let c1 = EtcdLog::open(etcd.clone(), "/f/").await.expect("open");
    let c2 = EtcdLog::open(Etcd::connect(&cluster.endpoints).expect("connect"), "/f/")
        .await
        .expect("open");
    let start_rev = revision(&etcd).await;
    let mut follower = c2.follow(1);
    let purge = |tag: String| NewPurge {
        op: Op::Tags(TagSet { tags: vec![tag] }),
        soft: false,
    };
    let mut tasks = Vec::new();
    for w in 0..4u64 {
        let log = if w % 2 == 0 { c1.clone() } else { c2.clone() };
        tasks.push(tokio::spawn(async move {
            for i in 0..20u64 {
                let a = Append {
                    received_at_us: w,
                    purges: vec![purge(format!("f{w}_{i}"))],
                };
                log.append(&[a], 0).await.expect("append");
            }
        }));
    }
    for t in tasks {
        t.await.expect("appender");
    }
    assert_eq!(
        seqs(&mut follower, 80).await,
        (1..=80).collect::<Vec<u64>>()
    );

    // Compact everything up to now, then follow from an old revision: the watch is
    // cancelled as compacted, the follower re-lists and still delivers every entry.
    let now = c1.head().await.expect("head");
    assert_eq!(now, 80);
    compact_to_now(&etcd).await;
    let mut late = c1.follow_at(1, Some(start_rev));
    assert_eq!(seqs(&mut late, 80).await, (1..=80).collect::<Vec<u64>>());
}

/// Compacts the cluster's history up to its current revision (a watch from before it
/// is cancelled by etcd).
async fn compact_to_now(etcd: &Etcd) {
    let revision = revision(etcd).await;
    etcd.kv()
        .compact(etcd::etcdserverpb::CompactionRequest {
            revision,
            physical: true,
        })
        .await
        .expect("compact");
}

/// The cluster's current revision.
async fn revision(etcd: &Etcd) -> i64 {
    etcd.kv()
        .range(RangeRequest {
            key: b"/".to_vec(),
            ..Default::default()
        })
        .await
        .expect("range")
        .into_inner()
        .header
        .expect("header")
        .revision
}

/// The sequences of the next `n` entries a follower delivers (15 s each at most).
async fn seqs(
    follower: &mut tokio::sync::mpsc::Receiver<proto::edge::PurgeEntry>,
    n: usize,
) -> Vec<u64> {
    let mut out = Vec::new();
    while out.len() < n {
        let e = tokio::time::timeout(Duration::from_secs(15), follower.recv())
            .await
            .expect("entries in time")
            .expect("follower open");
        out.push(e.seq);
    }
    out
}

/// `etcd::ListWatch`: a listing in pages at one revision, then every change in order; a
/// watch broken by an etcd restart lists again (an append-only log resumes after its last
/// key, nothing delivered twice); a watch that starts on a compacted revision lists again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn list_then_watch_lists_again_after_a_restart_and_a_compaction() {
    use etcd::etcdserverpb::DeleteRangeRequest;
    use etcd::{ListWatch, Update};
    use std::collections::BTreeMap;

    let dir = temp_dir();
    let mut cluster = EtcdCluster::start(dir.path(), 1).await;
    let etcd = Etcd::connect(&cluster.endpoints).expect("connect");
    let put = |key: &str, value: &str| {
        let (etcd, key, value) = (etcd.clone(), key.to_owned(), value.to_owned());
        async move {
            // Retried while the member restarts.
            for _ in 0..300 {
                let req = PutRequest {
                    key: key.clone().into_bytes(),
                    value: value.clone().into_bytes(),
                    ..Default::default()
                };
                if etcd.kv().put(req).await.is_ok() {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            panic!("etcd took no put of {key} in 30 s");
        }
    };
    for k in ["a", "b", "c"] {
        put(&format!("/lw/{k}"), "1").await;
    }
    for i in 1..=3 {
        put(&format!("/log/{i:04}"), "x").await;
    }
    let start_rev = revision(&etcd).await;

    /// The next update, 15 s at most.
    async fn next(w: &mut etcd::Watching) -> Update {
        tokio::time::timeout(Duration::from_secs(15), w.next())
            .await
            .expect("an update in time")
            .expect("watch open")
    }
    /// Applies one update to a copy of the range; the keys it delivered, in order.
    fn apply(copy: &mut BTreeMap<String, String>, u: Update) -> Vec<String> {
        let s = |b: Vec<u8>| String::from_utf8(b).expect("utf-8");
        match u {
            Update::Listed { kvs, first, .. } => {
                if first {
                    copy.clear();
                }
                kvs.into_iter()
                    .map(|kv| {
                        copy.insert(s(kv.key.clone()), s(kv.value));
                        s(kv.key)
                    })
                    .collect()
            }
            Update::Events { events, .. } => events
                .into_iter()
                .filter_map(|e| {
                    let kv = e.kv?;
                    if e.r#type == etcd::mvccpb::event::EventType::Delete as i32 {
                        copy.remove(&s(kv.key.clone()));
                    } else {
                        copy.insert(s(kv.key.clone()), s(kv.value));
                    }
                    Some(s(kv.key))
                })
                .collect(),
        }
    }

    // The listing comes in pages, all at one revision, the last one marked.
    let mut range = ListWatch::prefix(&etcd, b"/lw/".to_vec()).page(2).spawn();
    let mut copy = BTreeMap::new();
    let (a, b) = (next(&mut range).await, next(&mut range).await);
    match (&a, &b) {
        (
            Update::Listed {
                revision: r1,
                kvs: k1,
                first: true,
                last: false,
            },
            Update::Listed {
                revision: r2,
                kvs: k2,
                first: false,
                last: true,
            },
        ) => {
            assert_eq!((r1, r2), (&start_rev, &start_rev));
            assert_eq!((k1.len(), k2.len()), (2, 1));
        }
        other => panic!("not a listing in two pages: {other:?}"),
    }
    apply(&mut copy, a);
    apply(&mut copy, b);
    // Then the changes, in order.
    put("/lw/d", "1").await;
    etcd.kv()
        .delete_range(DeleteRangeRequest {
            key: b"/lw/a".to_vec(),
            ..Default::default()
        })
        .await
        .expect("delete");
    let mut changed = Vec::new();
    while changed.len() < 2 {
        changed.extend(apply(&mut copy, next(&mut range).await));
    }
    assert_eq!(changed, ["/lw/d", "/lw/a"]);
    let keys = |c: &BTreeMap<String, String>| c.keys().cloned().collect::<Vec<_>>();
    assert_eq!(keys(&copy), ["/lw/b", "/lw/c", "/lw/d"]);

    let mut log = ListWatch::prefix(&etcd, b"/log/".to_vec())
        .resume_after_last_key()
        .spawn();
    let mut log_copy = BTreeMap::new();
    let mut delivered = Vec::new();
    while delivered.len() < 3 {
        delivered.extend(apply(&mut log_copy, next(&mut log).await));
    }

    // etcd restarts under both watches; each lists again and goes on.
    cluster.kill9(0).await;
    cluster.restart(0);
    put("/lw/e", "1").await;
    put("/log/0004", "x").await;
    let mut relisted = false;
    while !copy.contains_key("/lw/e") {
        let u = next(&mut range).await;
        relisted |= matches!(u, Update::Listed { first: true, .. });
        apply(&mut copy, u);
    }
    assert!(relisted, "the broken watch listed the range again");
    assert_eq!(keys(&copy), ["/lw/b", "/lw/c", "/lw/d", "/lw/e"]);
    while delivered.len() < 4 {
        delivered.extend(apply(&mut log_copy, next(&mut log).await));
    }
    assert_eq!(
        delivered,
        ["/log/0001", "/log/0002", "/log/0003", "/log/0004"],
        "the log resumed after its last key: every key once, in order"
    );

    // A watch from a compacted revision is cancelled by etcd: it lists instead.
    compact_to_now(&etcd).await;
    let mut late = ListWatch::prefix(&etcd, b"/lw/".to_vec())
        .start_at(start_rev)
        .spawn();
    let mut late_copy = BTreeMap::new();
    match next(&mut late).await {
        u @ Update::Listed {
            first: true,
            last: true,
            ..
        } => {
            apply(&mut late_copy, u);
        }
        other => panic!("not a fresh listing: {other:?}"),
    }
    assert_eq!(late_copy, copy);
    put("/lw/f", "2").await;
    assert_eq!(apply(&mut late_copy, next(&mut late).await), ["/lw/f"]);

    // Dropping a watch stops it; the others go on.
    drop(late);
    put("/lw/g", "3").await;
    assert_eq!(apply(&mut copy, next(&mut range).await), ["/lw/f"]);
    assert_eq!(apply(&mut copy, next(&mut range).await), ["/lw/g"]);
}
