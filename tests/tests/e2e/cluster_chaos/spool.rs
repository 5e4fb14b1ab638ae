//! Purges survive an etcd outage: a coordinator that etcd does not answer within
//! `spool_after_ms` keeps the purge in its own fsynced spool, answers 200 with
//! `"spooled": true` at once, and appends the spool to the shared log in order and
//! exactly once when etcd takes writes again — across a kill -9 of the coordinator with
//! a full spool, or in the middle of its drain. Only a full spool (`spool_max_bytes`)
//! answers 503, and nothing acknowledged before it is lost.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use proto::edge::purge_entry::Op;
use tests::ha::{HaCluster, HaOpts};
use tests::{assert_eventually, get, magento_purge, raw, tags_pattern, Resp};

/// How many times each tag appears in the shared log.
async fn tag_counts(ha: &HaCluster) -> BTreeMap<String, usize> {
    let mut counts = BTreeMap::new();
    for e in ha.shared_log().await {
        if let Some(Op::Tags(t)) = e.op {
            for tag in t.tags {
                *counts.entry(tag).or_insert(0) += 1;
            }
        }
    }
    counts
}

/// One Magento PURGE of `tag` to coordinator `i`, and how long the answer took.
async fn purge(ha: &HaCluster, i: usize, tag: &str) -> (Duration, Option<Resp>) {
    let started = Instant::now();
    let r = tokio::time::timeout(
        Duration::from_secs(12),
        raw(ha.c[i].purge, &magento_purge(&tags_pattern(&[tag]))),
    )
    .await
    .ok()
    .and_then(Result::ok);
    (started.elapsed(), r)
}

fn spooled(r: &Resp) -> bool {
    r.status == 200 && r.header("x-purge-spooled") == Some("1") && r.json()["spooled"] == true
}

/// Waits until coordinator `i`'s spool is empty (its metric says 0).
async fn drained(ha: &HaCluster, i: usize, secs: u64) {
    assert_eventually!(
        secs,
        ha.metric(i, "coordinator_purge_spool_entries").await == Some(0.0),
        "c{}'s spool did not drain: {:?} entries",
        i + 1,
        ha.metric(i, "coordinator_purge_spool_entries").await
    );
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// Sends `n` purges (`{prefix}{k}`) to coordinator `i` from 8 senders; all must be
/// answered 200 spooled. Returns the tags, and those answered only after etcd's
/// deadline (the writer tried etcd with them first, or they queued behind it).
async fn spool_many(
    ha: &HaCluster,
    i: usize,
    prefix: &str,
    n: usize,
) -> (Vec<String>, Vec<String>) {
    let tags: Vec<String> = (0..n).map(|k| format!("{prefix}{k}")).collect();
    let addr = ha.c[i].purge;
    let mut tasks = Vec::new();
    for w in 0..8 {
        let mine: Vec<String> = tags.iter().skip(w).step_by(8).cloned().collect();
        tasks.push(tokio::spawn(async move {
            let mut waited = Vec::new();
            for t in mine {
                let started = Instant::now();
                let r = raw(addr, &magento_purge(&tags_pattern(&[&t])))
                    .await
                    .expect("purge");
                assert!(spooled(&r), "{t}: {} {} {:?}", r.status, r.body, r.headers);
                if started.elapsed() >= Duration::from_millis(800) {
                    waited.push(t);
                }
            }
            waited
        }));
    }
    let mut waited = Vec::new();
    for t in tasks {
        waited.extend(t.await.expect("sender"));
    }
    (tags, waited)
}

/// Each tag is in the shared log exactly once, including those whose first try on etcd
/// timed out (a member without quorum may keep such a proposal and commit it once the
/// quorum is back: the spool mark it moves tells the drain they are in already).
fn exactly_once(counts: &BTreeMap<String, usize>, tags: &[String], waited: &[String], when: &str) {
    for t in tags {
        let n = counts.get(t).copied().unwrap_or(0);
        assert_eq!(
            n,
            1,
            "{t} is in the shared log {n} times {when} (it waited for etcd: {})",
            waited.contains(t)
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quorum_loss_during_a_magento_burst_spools_every_purge_and_drains_each_once() {
    let mut ha = HaCluster::start(HaOpts::default()).await;
    // Pages on every edge to see the purges land on real varnish.
    let pages = 60;
    for v in &ha.varnish {
        for p in 0..pages {
            get(v.http, &format!("/p/{p}")).await;
            assert_eq!(get(v.http, &format!("/p/{p}")).await.cache(), "HIT");
        }
    }
    // Magento's way: each save sends one PURGE to every coordinator in turn, and waits.
    // Saves while etcd has no quorum name the warmed pages first.
    let t0 = Instant::now();
    let mut outage_saves = 0;
    let mut answers: Vec<(usize, usize, Duration, Option<Resp>, Duration)> = Vec::new();
    let mut save = 0usize;
    let mut killed_at = None;
    let mut back_at = None;
    let mut tags = Vec::new();
    while t0.elapsed() < Duration::from_secs(24) {
        let at = t0.elapsed();
        if killed_at.is_none() && at >= Duration::from_secs(3) {
            ha.kill_etcd(&[0, 1]).await;
            killed_at = Some(t0.elapsed());
        }
        if back_at.is_none()
            && killed_at.is_some_and(|k| t0.elapsed() >= k + Duration::from_secs(15))
        {
            ha.restart_etcd(&[0, 1]).await;
            back_at = Some(t0.elapsed());
        }
        let outage = killed_at.is_some() && back_at.is_none();
        let tag = if outage {
            outage_saves += 1;
            format!("cat_p_{}", outage_saves - 1)
        } else {
            format!("cat_p_{}", 10_000 + save)
        };
        tags.push(tag.clone());
        for i in 0..3 {
            let (took, r) = purge(&ha, i, &tag).await;
            answers.push((save, i, took, r, at));
        }
        save += 1;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (killed_at, back_at) = (killed_at.expect("killed"), back_at.expect("back"));
    let mut lat: Vec<f64> = answers.iter().map(|a| ms(a.2)).collect();
    lat.sort_by(f64::total_cmp);
    let during: Vec<&(usize, usize, Duration, Option<Resp>, Duration)> = answers
        .iter()
        .filter(|a| a.4 >= killed_at && a.4 < back_at)
        .collect();
    let spooled_n = answers
        .iter()
        .filter(|a| a.3.as_ref().is_some_and(spooled))
        .count();
    eprintln!(
        "{} PURGEs ({} sent while etcd had no quorum, {spooled_n} spooled): {}",
        answers.len(),
        during.len(),
        tests::percentiles_line("ack latency", lat.clone())
    );
    for (save, i, took, r, _) in &answers {
        let r = r
            .as_ref()
            .unwrap_or_else(|| panic!("save {save} on c{}: no answer", i + 1));
        assert_eq!(r.status, 200, "save {save} on c{}: {}", i + 1, r.body);
        assert!(
            *took < Duration::from_secs(2),
            "save {save} on c{} took {took:?}",
            i + 1
        );
    }
    assert!(
        during
            .iter()
            .filter(|a| a.3.as_ref().is_some_and(spooled))
            .count()
            * 10
            >= during.len() * 9,
        "purges without quorum were not spooled"
    );
    for i in 0..3 {
        drained(&ha, i, 40).await;
    }
    // Each purge is in the log exactly once per coordinator that answered it, also the
    // first each tried on etcd after the quorum went (its proposal may commit late).
    let counts = tag_counts(&ha).await;
    for tag in &tags {
        let n = counts.get(tag).copied().unwrap_or(0);
        assert_eq!(
            n, 3,
            "{tag} is in the shared log {n} times, not once per coordinator"
        );
    }
    // Every edge applied all of it, and the pages the outage's purges named are gone.
    let head = ha.shared_log().await.last().map(|e| e.seq).unwrap_or(0);
    assert_eventually!(
        30,
        ha.c[0].applied_everywhere(head, 3).await,
        "not applied everywhere up to {head}: {:?}",
        ha.c[0].edges().await
    );
    assert!(
        outage_saves >= pages,
        "only {outage_saves} saves during the outage"
    );
    for v in &ha.varnish {
        for p in 0..pages {
            assert_eq!(
                get(v.http, &format!("/p/{p}")).await.cache(),
                "MISS",
                "/p/{p} still cached on {} after its purge drained",
                v.http
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_coordinator_killed_with_a_full_spool_drains_it_once_after_restart() {
    let mut ha = HaCluster::start(HaOpts::default()).await;
    ha.kill_etcd(&[0, 1]).await;
    let (tags, waited) = spool_many(&ha, 0, "k9_", 40).await;
    // c2 has found etcd unreachable meanwhile (its own calls fail): it spools its first
    // purge at once, without waiting for etcd's deadline.
    HaCluster::settle(2.0).await;
    let (took, r) = purge(&ha, 1, "known_down").await;
    let r = r.expect("an answer");
    assert!(spooled(&r), "{} {}", r.status, r.body);
    assert!(
        took < Duration::from_millis(500),
        "a coordinator that knows etcd is unreachable waited {took:?}"
    );
    assert_eq!(
        ha.metric(0, "coordinator_purge_spool_entries").await,
        Some(40.0)
    );
    assert_eq!(
        ha.metric(0, "coordinator_purge_spooled_total").await,
        Some(40.0)
    );
    ha.c[0].child.kill9().await;
    ha.restart_etcd(&[0, 1]).await;
    ha.c[0].restart().await;
    drained(&ha, 0, 30).await;
    exactly_once(
        &tag_counts(&ha).await,
        &tags,
        &waited,
        "after the restart's drain",
    );
    // Counted since the restart: what it drained, less what etcd had committed late
    // before it (the first tries on etcd) and the restart skipped.
    let drained_total = ha
        .metric(0, "coordinator_purge_spool_drained_total")
        .await
        .unwrap_or(0.0);
    assert!(
        drained_total <= 40.0 && drained_total >= (40 - waited.len()) as f64,
        "{drained_total} drained, {} waited for etcd first",
        waited.len()
    );
    let head = ha.shared_log().await.last().map(|e| e.seq).unwrap_or(0);
    assert_eventually!(
        30,
        ha.c[1].applied_everywhere(head, 3).await,
        "the drained purges did not reach every edge: {:?}",
        ha.c[1].edges().await
    );
    // Another restart drains nothing again.
    ha.c[0].kill9_and_restart().await;
    HaCluster::settle(3.0).await;
    exactly_once(
        &tag_counts(&ha).await,
        &tags,
        &waited,
        "after a second restart",
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kill_9_in_the_middle_of_a_drain_appends_each_entry_exactly_once() {
    let mut ha = HaCluster::start(HaOpts::default()).await;
    ha.kill_etcd(&[0, 1]).await;
    let total = 6000;
    let (tags, waited) = spool_many(&ha, 0, "mid_", total).await;
    assert_eq!(
        ha.metric(0, "coordinator_purge_spool_entries").await,
        Some(total as f64)
    );
    // etcd back: kill c1 as soon as its drain mark moves, before it is done.
    let etcd = etcd::Etcd::connect(&ha.etcd.endpoints).expect("etcd");
    ha.restart_etcd(&[0, 1]).await;
    let mark = |etcd: etcd::Etcd| async move {
        etcd.range(etcd::etcdserverpb::RangeRequest {
            key: b"/vc-test/log/spool/c1".to_vec(),
            ..Default::default()
        })
        .await
        .ok()
        .and_then(|r| r.kvs.first().map(|kv| kv.value.clone()))
        .and_then(|v| <[u8; 8]>::try_from(v.as_slice()).ok())
        .map_or(0, u64::from_be_bytes)
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    while mark(etcd.clone()).await == 0 {
        assert!(Instant::now() < deadline, "the drain never started");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    ha.c[0].child.kill9().await;
    let at_kill = mark(etcd.clone()).await;
    eprintln!("killed c1 with {at_kill} of {total} spooled purges drained");
    assert!(
        at_kill < total as u64,
        "the drain finished before the kill: make the spool larger"
    );
    ha.c[0].restart().await;
    drained(&ha, 0, 60).await;
    exactly_once(
        &tag_counts(&ha).await,
        &tags,
        &waited,
        "after the kill mid-drain",
    );
    assert_eq!(mark(etcd).await, total as u64);
    // And in the order they were received.
    let order: Vec<usize> = ha
        .shared_log()
        .await
        .into_iter()
        .filter_map(|e| match e.op {
            Some(Op::Tags(t)) => t.tags[0].strip_prefix("mid_")?.parse().ok(),
            _ => None,
        })
        .collect();
    assert_eq!(order.len(), total);
    // The spool assigns ids as purges arrive; eight senders interleave, each waiting
    // for its answers: each sender's purges are in the log in the order it sent them.
    let mut last = [None::<usize>; 8];
    for k in order {
        assert!(
            last[k % 8].is_none_or(|l| l < k),
            "mid_{k} is in the log after a later purge of its sender"
        );
        last[k % 8] = Some(k);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_spool_answers_503_and_loses_nothing_it_acknowledged() {
    let mut ha = HaCluster::start(HaOpts {
        store_extra: "spool_max_bytes = 4096".into(),
        ..HaOpts::default()
    })
    .await;
    ha.kill_etcd(&[0, 1]).await;
    let mut acked = Vec::new();
    let mut waited = Vec::new();
    let refused = loop {
        let tag = format!("full_{}", acked.len());
        let (took, r) = purge(&ha, 0, &tag).await;
        let r = r.expect("an answer");
        assert!(took < Duration::from_secs(2), "{tag} took {took:?}");
        if took >= Duration::from_millis(800) {
            waited.push(tag.clone());
        }
        if r.status != 200 {
            break r;
        }
        assert!(spooled(&r), "{}", r.body);
        acked.push(tag);
        assert!(acked.len() < 1000, "the spool bound never applied");
    };
    assert_eq!(refused.status, 503, "{}", refused.body);
    assert!(
        refused.body.contains("spool_max_bytes"),
        "the 503 does not say why: {}",
        refused.body
    );
    eprintln!(
        "{} purges spooled in 4096 bytes, then 503: {}",
        acked.len(),
        refused.body
    );
    assert!(acked.len() > 20, "{}", acked.len());
    ha.restart_etcd(&[0, 1]).await;
    drained(&ha, 0, 30).await;
    let counts = tag_counts(&ha).await;
    exactly_once(&counts, &acked, &waited, "after the full spool drained");
    assert!(!counts.contains_key(&format!("full_{}", acked.len())));
    // Drained, the spool takes purges again (and etcd commits them directly).
    let (_, r) = purge(&ha, 0, "after").await;
    let r = r.expect("an answer");
    assert_eq!(r.status, 200, "{}", r.body);
    assert!(r.json()["seq"].as_u64().unwrap_or(0) > 0, "{}", r.body);
}

/// What a drain late by the length of an outage rests on: purges commute. Two varnishd
/// with the same pages get the same purges in opposite orders; each page is then served
/// from cache (or not) alike on both, in ban mode and in xkey mode with soft purges.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn purges_commute_on_real_varnish_in_ban_and_xkey_mode() {
    tests::require_varnish();
    let dir = tests::temp_dir();
    let origin = tests::OriginServer::start().await;
    let v = [
        tests::VarnishNode::start(&dir.path().join("v0"), origin.addr).await,
        tests::VarnishNode::start(&dir.path().join("v1"), origin.addr).await,
    ];
    let pages = [
        "/p/1",
        "/p/2",
        "/p/3",
        "/p/4",
        "/c/1",
        "/c/2",
        "/untagged/a",
    ];
    let ban = |tags: &str| format!("ban obj.http.X-Magento-Tags ~ \"(^|,)({tags})(,|$)\"");
    let xkey = |tags: &str, soft: bool| {
        format!(
            "PURGE / HTTP/1.1\r\nHost: localhost\r\nX-Xkey-Purge: {tags}\r\n{}\r\n",
            if soft {
                "X-Magento-Purge-Soft: 1\r\n"
            } else {
                ""
            }
        )
    };
    // (ban command or xkey request, what each page then is: ban mode, then xkey mode)
    let bans = [ban("cat_p_1"), ban("cat_c_1"), ban("cat_p_2|cat_p_3")];
    let xkeys = [
        xkey("cat_p_1", false),
        xkey("cat_p_2", true),
        xkey("cat_p_3", true),
        xkey("cat_c_1", false),
        xkey("cat_p_3", false),
    ];
    let verdicts = |node: &tests::VarnishNode| {
        let addr = node.http;
        async move {
            let mut out = Vec::new();
            for p in pages {
                out.push(get(addr, p).await.cache().to_owned());
            }
            out
        }
    };
    for mode in ["ban", "xkey"] {
        for node in &v {
            // A fresh cache: every page fetched and cached.
            node.admin("ban obj.status != 0").await;
            for p in pages {
                get(node.http, p).await;
                assert_eq!(get(node.http, p).await.cache(), "HIT", "{p}");
            }
        }
        for (k, node) in v.iter().enumerate() {
            let n = if mode == "ban" {
                bans.len()
            } else {
                xkeys.len()
            };
            // v0 in the order received, v1 in the reverse (the newest first).
            for i in 0..n {
                let i = if k == 0 { i } else { n - 1 - i };
                if mode == "ban" {
                    node.admin(&bans[i]).await;
                } else {
                    let r = raw(node.http, xkeys[i].as_bytes()).await.expect("xkey");
                    assert_eq!(r.status, 200, "{}", r.body);
                }
            }
        }
        let (a, b) = (verdicts(&v[0]).await, verdicts(&v[1]).await);
        assert_eq!(a, b, "{mode}: the order of the purges changed the cache");
        let expected: Vec<&str> = if mode == "ban" {
            vec!["MISS", "MISS", "MISS", "HIT", "MISS", "HIT", "HIT"]
        } else {
            // cat_p_2 soft: served stale from grace; cat_p_3 soft and hard: hard wins.
            vec!["MISS", "HIT", "MISS", "HIT", "MISS", "HIT", "HIT"]
        };
        assert_eq!(a, expected, "{mode}: {pages:?}");
    }
}
