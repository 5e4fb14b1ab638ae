//! The job state machine without a network, across the rooms: dispatch, tiered gating,
//! the budget split, persistence across a reopen, re-warm gating on the purge cursor,
//! dropped edges, and the per-edge bookkeeping an ended job leaves behind (none).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use proto::edge::{coordinator_message::Msg, UrlTags, WarmCancel, WarmProgress, WarmShard};
use tokio_util::sync::CancellationToken;

use super::job::{self, JobSource, JobSpec, JobState, JobView};
use super::{Warm, WarmConfig, WarmError};
use crate::edges::{EdgeHello, EdgeRegistry};

fn config() -> WarmConfig {
    WarmConfig {
        shard_urls: 10,
        origin_budget_rps: 30.0,
        ..WarmConfig::default()
    }
}

fn regions() -> Vec<String> {
    vec!["eu".into(), "us".into(), "ap".into()]
}

fn urls(n: usize) -> Vec<String> {
    (0..n).map(|i| format!("http://shop/p/{i}")).collect()
}

struct Fixture {
    dir: tempfile::TempDir,
    edges: Arc<EdgeRegistry>,
    warm: Arc<Warm>,
}

fn fixture(config: WarmConfig) -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let edges = Arc::new(EdgeRegistry::default());
    let warm = Warm::open(config, "tok".into(), regions(), dir.path(), edges.clone()).unwrap();
    Fixture { dir, edges, warm }
}

fn connect_all(f: &Fixture) {
    for (i, r) in regions().iter().enumerate() {
        let h = f.edges.connect(
            EdgeHello {
                id: format!("{r}-1"),
                region: r.clone(),
                varnish_version: String::new(),
                purge_mode: "ban".into(),
                agent_version: String::new(),
                cert_not_after: None,
            },
            0,
            &CancellationToken::new(),
        );
        f.warm.connect(&h.edge_id, r, i as u64 + 1);
    }
}

fn session(edge: &str) -> u64 {
    regions()
        .iter()
        .position(|r| edge.starts_with(r.as_str()))
        .unwrap() as u64
        + 1
}

fn shards(msgs: &[Msg]) -> Vec<WarmShard> {
    msgs.iter()
        .filter_map(|m| match m {
            Msg::WarmShard(s) => Some(s.clone()),
            _ => None,
        })
        .collect()
}

fn report(f: &Fixture, edge: &str, s: &WarmShard) {
    let progress = WarmProgress {
        job_id: s.job_id,
        shard: s.shard,
        fetched: s.urls.len() as u32,
        misses: s.urls.len() as u32,
        tags: s
            .urls
            .iter()
            .map(|u| UrlTags {
                url: u.clone(),
                tags: vec![format!("t_{}", u.rsplit('/').next().unwrap())],
            })
            .collect(),
        ..WarmProgress::default()
    };
    f.warm.on_progress(edge, session(edge), progress);
}

async fn running(f: &Fixture, spec: JobSpec) -> u64 {
    let id = f.warm.create(spec, JobSource::Api).unwrap();
    f.warm.start_next().await;
    assert_eq!(f.warm.view(id).unwrap().state, JobState::Running);
    id
}

/// Runs every edge's work to the end; returns the shards each edge was handed.
fn drain(f: &Fixture) -> BTreeMap<String, Vec<u32>> {
    let mut handed: BTreeMap<String, Vec<u32>> = BTreeMap::new();
    loop {
        let mut any = false;
        for r in regions() {
            let edge = format!("{r}-1");
            for s in shards(&f.warm.next_for(&edge, session(&edge))) {
                any = true;
                handed.entry(edge.clone()).or_default().push(s.shard);
                report(f, &edge, &s);
            }
        }
        if !any {
            return handed;
        }
    }
}

#[tokio::test]
async fn flat_job_hands_every_shard_to_every_edge_once_and_splits_the_budget() {
    let f = fixture(config());
    connect_all(&f);
    let id = running(
        &f,
        JobSpec {
            urls: urls(45),
            ..JobSpec::default()
        },
    )
    .await;
    // Two shards in flight per edge, each carrying a third of the budget.
    let first = shards(&f.warm.next_for("eu-1", 1));
    assert_eq!(
        first.iter().map(|s| s.shard).collect::<Vec<_>>(),
        vec![0, 1]
    );
    assert!((first[0].rate - 10.0).abs() < 1e-9, "{}", first[0].rate);
    assert_eq!(first[0].token, "tok");
    assert!(
        shards(&f.warm.next_for("eu-1", 1)).is_empty(),
        "nothing beyond IN_FLIGHT"
    );
    // A report from another session is ignored.
    f.warm.on_progress(
        "eu-1",
        99,
        WarmProgress {
            job_id: id,
            shard: 0,
            ..Default::default()
        },
    );
    assert_eq!(f.warm.view(id).unwrap().regions["eu"].done, 0);
    for s in &first {
        report(&f, "eu-1", s);
    }
    let handed = drain(&f);
    assert_eq!(handed["eu-1"], vec![2, 3, 4]);
    assert_eq!(handed["us-1"], vec![0, 1, 2, 3, 4]);
    let v = f.warm.view(id).unwrap();
    assert_eq!(v.state, JobState::Done);
    for r in regions() {
        assert_eq!((v.regions[&r].done, v.regions[&r].total), (45, 45));
    }
    // The view the API answers reads back as the same typed view (what the CLI does).
    let json = serde_json::to_value(&v).unwrap();
    assert_eq!(json["state"], "done");
    assert_eq!(json["kind"], "api");
    let back: JobView = serde_json::from_value(json.clone()).unwrap();
    assert_eq!(serde_json::to_value(&back).unwrap(), json);
    assert_eq!(back.source, JobSource::Api);
}

#[tokio::test]
async fn tiered_satellites_wait_for_the_shield() {
    let f = fixture(WarmConfig {
        shield: Some("eu".into()),
        satellite_rate: 77.0,
        ..config()
    });
    connect_all(&f);
    let id = running(
        &f,
        JobSpec {
            urls: urls(30),
            ..JobSpec::default()
        },
    )
    .await;
    assert!(f.warm.view(id).unwrap().tiered);
    assert!(
        shards(&f.warm.next_for("us-1", 2)).is_empty(),
        "shield first"
    );
    let eu = shards(&f.warm.next_for("eu-1", 1));
    // The shield alone reaches the origin: the whole budget.
    assert!((eu[0].rate - 30.0).abs() < 1e-9);
    report(&f, "eu-1", &eu[1]);
    assert!(shards(&f.warm.next_for("us-1", 2)).is_empty(), "in order");
    report(&f, "eu-1", &eu[0]);
    let us = shards(&f.warm.next_for("us-1", 2));
    assert_eq!(us.iter().map(|s| s.shard).collect::<Vec<_>>(), vec![0, 1]);
    assert_eq!(us[0].rate, 77.0);
    for s in &us {
        report(&f, "us-1", s);
    }
    drain(&f);
    assert_eq!(f.warm.view(id).unwrap().state, JobState::Done);
}

/// A coordinator that holds no jobs (a follower, or a new leader that has not read them
/// yet) gives out no job id: its own count may be behind the last leader's, and the job
/// would overwrite one in the store. Once it has read them, ids go on after the newest.
#[tokio::test]
async fn no_job_id_is_given_out_before_the_jobs_are_taken_over() {
    let f = fixture(config());
    let spec = || JobSpec {
        urls: urls(5),
        ..JobSpec::default()
    };
    let first = f.warm.create(spec(), JobSource::Api).unwrap();
    f.warm.forget_jobs().unwrap();
    assert!(matches!(
        f.warm.create(spec(), JobSource::Api),
        Err(WarmError::TakingOver)
    ));
    assert!(matches!(f.warm.cancel(first), Err(WarmError::TakingOver)));
    f.warm.reload().unwrap();
    assert_eq!(f.warm.view(first).unwrap().state, JobState::Queued);
    assert_eq!(f.warm.create(spec(), JobSource::Api).unwrap(), first + 1);
}

#[tokio::test]
async fn a_reopened_coordinator_resumes_without_redoing_reported_shards() {
    let f = fixture(config());
    connect_all(&f);
    let id = running(
        &f,
        JobSpec {
            urls: urls(40),
            ..JobSpec::default()
        },
    )
    .await;
    for s in shards(&f.warm.next_for("eu-1", 1)) {
        report(&f, "eu-1", &s);
    }
    // Handed out but never reported: redone after the restart.
    let lost = shards(&f.warm.next_for("eu-1", 1));
    assert_eq!(lost.len(), 2);
    let dir = f.dir;
    drop(f.warm);
    let edges = Arc::new(EdgeRegistry::default());
    let warm = Warm::open(config(), "tok".into(), regions(), dir.path(), edges.clone()).unwrap();
    let f = Fixture { dir, edges, warm };
    assert_eq!(f.warm.view(id).unwrap().state, JobState::Running);
    assert_eq!(f.warm.view(id).unwrap().regions["eu"].done, 20);
    connect_all(&f);
    let handed = drain(&f);
    assert_eq!(
        handed["eu-1"],
        vec![2, 3],
        "only the unreported shards again"
    );
    assert_eq!(f.warm.view(id).unwrap().state, JobState::Done);
}

#[tokio::test]
async fn cancel_reaches_the_edges_holding_shards() {
    let f = fixture(config());
    connect_all(&f);
    let id = running(
        &f,
        JobSpec {
            urls: urls(40),
            ..JobSpec::default()
        },
    )
    .await;
    assert_eq!(shards(&f.warm.next_for("us-1", 2)).len(), 2);
    assert_eq!(f.warm.cancel(id).unwrap().state, JobState::Cancelled);
    let msgs = f.warm.next_for("us-1", 2);
    assert!(matches!(msgs.as_slice(), [Msg::WarmCancel(WarmCancel { job_id })] if *job_id == id));
    assert!(f.warm.next_for("eu-1", 1).is_empty());
}

#[tokio::test]
async fn overload_halves_the_rate_the_edges_get() {
    let f = fixture(config());
    connect_all(&f);
    let id = running(
        &f,
        JobSpec {
            urls: urls(100),
            ..JobSpec::default()
        },
    )
    .await;
    let s = shards(&f.warm.next_for("eu-1", 1));
    f.warm.on_progress(
        "eu-1",
        1,
        WarmProgress {
            job_id: id,
            shard: s[0].shard,
            fetched: 5,
            errors: 5,
            throttled: 5,
            ..Default::default()
        },
    );
    assert!((f.warm.view(id).unwrap().rate.unwrap() - 15.0).abs() < 0.5);
    // eu-1 still holds a shard: it is told its new rate (a third of 15).
    let msgs = f.warm.next_for("eu-1", 1);
    let rate = msgs.iter().find_map(|m| match m {
        Msg::WarmRate(r) => Some(r.rate),
        _ => None,
    });
    assert!(rate.is_some_and(|r| (r - 5.0).abs() < 0.2), "{msgs:?}");
    assert_eq!(f.warm.view(id).unwrap().regions["eu"].errors, 5);
}

#[tokio::test]
async fn rewarm_waits_for_the_purge_and_targets_only_the_tagged_urls() {
    let f = fixture(WarmConfig {
        rewarm_after_purge: true,
        ..config()
    });
    connect_all(&f);
    let id = running(
        &f,
        JobSpec {
            urls: urls(20),
            ..JobSpec::default()
        },
    )
    .await;
    drain(&f);
    assert_eq!(f.warm.view(id).unwrap().state, JobState::Done);
    let ids = f
        .warm
        .rewarm(&["t_7".to_owned(), "t_unknown".to_owned()], 5);
    assert_eq!(ids.len(), 1);
    f.warm.start_next().await;
    let v = f.warm.view(ids[0]).unwrap();
    assert_eq!((v.state, v.urls), (JobState::Running, 1));
    // No edge applied purge 5 yet.
    assert!(f.warm.next_for("eu-1", 1).is_empty());
    let h = f.edges.connect(
        EdgeHello {
            id: "eu-1".into(),
            region: "eu".into(),
            varnish_version: String::new(),
            purge_mode: "ban".into(),
            agent_version: String::new(),
            cert_not_after: None,
        },
        4,
        &CancellationToken::new(),
    );
    f.edges.ack(&h, 5);
    let s = shards(&f.warm.next_for("eu-1", 1));
    assert_eq!(s.len(), 1);
    assert_eq!(s[0].urls, vec!["http://shop/p/7".to_owned()]);
}

#[tokio::test]
async fn a_job_with_no_edges_or_no_urls_fails_with_a_reason() {
    let f = fixture(config());
    let id = f
        .warm
        .create(
            JobSpec {
                urls: urls(3),
                ..JobSpec::default()
            },
            JobSource::Api,
        )
        .unwrap();
    f.warm.start_next().await;
    let v = f.warm.view(id).unwrap();
    assert_eq!(v.state, JobState::Failed);
    assert!(v.error.unwrap().contains("no warm-capable edge"));
    connect_all(&f);
    let id = f
        .warm
        .create(
            JobSpec {
                top: Some(10),
                ..JobSpec::default()
            },
            JobSource::Api,
        )
        .unwrap();
    f.warm.start_next().await;
    assert!(f.warm.view(id).unwrap().error.unwrap().contains("no URLs"));
    assert!(matches!(
        f.warm.create(JobSpec::default(), JobSource::Api),
        Err(WarmError::Invalid(_))
    ));
}

#[tokio::test]
async fn an_edge_added_mid_job_joins_it() {
    let f = fixture(config());
    connect_all(&f);
    let id = running(
        &f,
        JobSpec {
            urls: urls(20),
            regions: Some(vec!["eu".into()]),
            ..JobSpec::default()
        },
    )
    .await;
    assert_eq!(f.warm.view(id).unwrap().regions["eu"].edges, 1);
    f.warm.connect("eu-2", "eu", 7);
    f.warm.connect("us-9", "us", 8);
    let v = f.warm.view(id).unwrap();
    assert_eq!((v.regions["eu"].edges, v.regions["eu"].total), (2, 40));
    assert!(!v.regions.contains_key("us"), "not a target region");
    assert_eq!(shards(&f.warm.next_for("eu-2", 7)).len(), 2);
    assert!(shards(&f.warm.next_for("us-9", 8)).is_empty());
}

#[tokio::test]
async fn a_dead_edge_is_dropped_and_the_job_ends_without_it() {
    let f = fixture(WarmConfig {
        edge_timeout_s: 1,
        ..config()
    });
    connect_all(&f);
    let id = running(
        &f,
        JobSpec {
            urls: urls(60),
            ..JobSpec::default()
        },
    )
    .await;
    // ap-1's varnish is dead: every fetch of its shards fails.
    for _ in 0..3 {
        for s in shards(&f.warm.next_for("ap-1", session("ap-1"))) {
            let p = WarmProgress {
                job_id: s.job_id,
                shard: s.shard,
                errors: s.urls.len() as u32,
                first_error: "connection refused".into(),
                ..WarmProgress::default()
            };
            f.warm.on_progress("ap-1", session("ap-1"), p);
        }
    }
    // us-1 disconnects for good after its first shard.
    let first = shards(&f.warm.next_for("us-1", session("us-1")));
    report(&f, "us-1", &first[0]);
    f.warm.disconnect("us-1", session("us-1"));
    // eu-1 finishes; us-1 is dropped only once its timeout passes.
    let mut done = 0;
    loop {
        let handed = shards(&f.warm.next_for("eu-1", session("eu-1")));
        if handed.is_empty() {
            break;
        }
        for s in handed {
            report(&f, "eu-1", &s);
            done += 1;
        }
    }
    assert_eq!(done, 6);
    let view = f.warm.view(id).unwrap();
    assert_eq!(view.state, JobState::Running, "us-1 is still waited for");
    assert_eq!(view.regions["ap"].status, job::RegionStatus::Dropped);
    assert!(view.regions["ap"]
        .error
        .as_deref()
        .unwrap()
        .contains("connection refused"));
    assert_eq!(view.regions["ap"].eta_s, None);
    tokio::time::sleep(Duration::from_millis(1100)).await;
    f.warm.drop_stuck_edges();
    let view = f.warm.view(id).unwrap();
    assert_eq!(view.state, JobState::Done, "{view:?}");
    assert_eq!(view.regions["eu"].status, job::RegionStatus::Done);
    assert_eq!(view.regions["us"].status, job::RegionStatus::Dropped);
    assert!(view.regions["us"]
        .error
        .as_deref()
        .unwrap()
        .contains("disconnected"));
}

#[tokio::test]
async fn jobs_for_other_regions_and_rewarms_do_not_queue_behind_a_running_job() {
    let f = fixture(config());
    connect_all(&f);
    let long = running(
        &f,
        JobSpec {
            urls: urls(100),
            regions: Some(vec!["ap".into()]),
            ..JobSpec::default()
        },
    )
    .await;
    let same = f
        .warm
        .create(
            JobSpec {
                urls: urls(5),
                regions: Some(vec!["ap".into()]),
                ..JobSpec::default()
            },
            JobSource::Api,
        )
        .unwrap();
    let other = f
        .warm
        .create(
            JobSpec {
                urls: urls(5),
                regions: Some(vec!["eu".into(), "us".into()]),
                ..JobSpec::default()
            },
            JobSource::Api,
        )
        .unwrap();
    f.warm.start_next().await;
    assert_eq!(f.warm.view(other).unwrap().state, JobState::Running);
    assert_eq!(f.warm.view(same).unwrap().state, JobState::Queued);
    // The other regions' job completes while the long one still runs.
    for edge in ["eu-1", "us-1"] {
        for s in shards(&f.warm.next_for(edge, session(edge))) {
            assert_eq!(s.job_id, other);
            report(&f, edge, &s);
        }
    }
    assert_eq!(f.warm.view(other).unwrap().state, JobState::Done);
    assert_eq!(f.warm.view(long).unwrap().state, JobState::Running);
    // A job over regions whose part of a running job is done starts too: us-1 still
    // works on `both`, eu-1 finished its part, so a job for eu alone need not wait.
    let both = running(
        &f,
        JobSpec {
            urls: urls(5),
            regions: Some(vec!["eu".into(), "us".into()]),
            ..JobSpec::default()
        },
    )
    .await;
    for s in shards(&f.warm.next_for("eu-1", session("eu-1"))) {
        report(&f, "eu-1", &s);
    }
    let after = f
        .warm
        .create(
            JobSpec {
                urls: urls(5),
                regions: Some(vec!["eu".into()]),
                ..JobSpec::default()
            },
            JobSource::Api,
        )
        .unwrap();
    f.warm.start_next().await;
    assert_eq!(
        f.warm.view(both).unwrap().state,
        JobState::Running,
        "us-1 still works on it"
    );
    assert_eq!(f.warm.view(after).unwrap().state, JobState::Running);
}

#[tokio::test]
async fn an_ended_job_leaves_no_per_edge_bookkeeping() {
    let f = fixture(config());
    connect_all(&f);
    let done = running(
        &f,
        JobSpec {
            urls: urls(30),
            ..JobSpec::default()
        },
    )
    .await;
    drain(&f);
    assert_eq!(f.warm.view(done).unwrap().state, JobState::Done);
    let cancelled = running(
        &f,
        JobSpec {
            urls: urls(30),
            ..JobSpec::default()
        },
    )
    .await;
    let _ = f.warm.next_for("eu-1", session("eu-1"));
    f.warm.cancel(cancelled).unwrap();
    let held = f.warm.hold();
    assert!(held.dispatch.hints.is_empty(), "{:?}", held.dispatch.hints);
    assert!(
        held.dispatch.sent_rate.is_empty(),
        "{:?}",
        held.dispatch.sent_rate
    );
    assert!(held.progress.activity.is_empty() && held.budget.aimd.is_empty());
}
