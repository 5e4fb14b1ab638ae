//! The rollout end to end on an embedded store: agents played by the tests push,
//! apply, refuse, drift and reconnect; phases, targets and views are checked.

use super::*;
use crate::bundle::Bundle;
use proto::edge::{ConfigResult, ConfigStatus};

fn setup(canary: Option<&str>, drift: DriftPolicy) -> (tempfile::TempDir, Arc<Rollouts>) {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(BundleStore::open(dir.path()).unwrap());
    let config = RolloutConfig {
        canary_region: canary.map(str::to_owned),
        canary_wait_s: 0,
        drift,
        ..RolloutConfig::default()
    };
    let mut regions = BTreeMap::new();
    for r in ["eu", "us"] {
        regions.insert(r.to_owned(), Vars::for_region(r, &BTreeMap::new()));
    }
    (dir, Rollouts::new(store, config, regions).unwrap())
}

fn bundle(text: &str) -> Bundle {
    let mut files = BTreeMap::new();
    files.insert("main.vcl".to_owned(), text.to_owned());
    Bundle { files }
}

fn report(r: &Rollouts, edge: &str, vcl: &str, version: &str) {
    r.on_status(
        edge,
        1,
        ConfigStatus {
            active_vcl: vcl.into(),
            active_version: version.into(),
            ..Default::default()
        },
    );
}

#[tokio::test]
async fn a_status_report_wakes_only_its_own_edge() {
    let (_d, r) = setup(None, DriftPolicy::Enforce);
    r.connect("eu-1", "eu", 1, true);
    r.connect("us-1", "us", 1, true);
    let mut everyone = r.subscribe();
    everyone.mark_unchanged();
    let (eu, us) = (
        r.subscribe_edge("eu-1").unwrap(),
        r.subscribe_edge("us-1").unwrap(),
    );
    report(&r, "eu-1", "boot", "");
    let woke = |n: &tokio::sync::Notify| {
        let fut = n.notified();
        futures_ready(fut)
    };
    assert!(woke(&eu), "eu-1's session is woken");
    assert!(!woke(&us), "us-1's is not");
    assert!(!everyone.has_changed().unwrap(), "nor is every session");
    // A push still wakes every session.
    r.push(
        &bundle("vcl 4.1; backend b { .host = \"127.0.0.1\"; }"),
        false,
        true,
    )
    .unwrap();
    assert!(everyone.has_changed().unwrap());
}

/// Whether a future is ready at its first poll.
fn futures_ready<F: std::future::Future>(fut: F) -> bool {
    let mut fut = std::pin::pin!(fut);
    let waker = std::task::Waker::noop();
    let mut cx = std::task::Context::from_waker(waker);
    fut.as_mut().poll(&mut cx).is_ready()
}

/// Plays an agent whose varnishd refuses `version` to compile.
fn reject(r: &Rollouts, edge: &str, version: &str, error: &str) {
    r.on_result(
        edge,
        1,
        ConfigResult {
            version: version.to_owned(),
            ok: false,
            error: error.into(),
            ..Default::default()
        },
    );
}

/// Plays an agent that applies whatever it is sent.
fn obey(r: &Rollouts, edge: &str) -> Option<String> {
    let apply = r.next_apply(edge, 1)?;
    r.on_result(
        edge,
        1,
        ConfigResult {
            version: apply.version.clone(),
            ok: true,
            ..Default::default()
        },
    );
    report(r, edge, &format!("cfg_{}", apply.version), &apply.version);
    Some(apply.version)
}

#[test]
fn canary_first_then_fleet() {
    let (_d, r) = setup(Some("eu"), DriftPolicy::Enforce);
    r.connect("eu-1", "eu", 1, true);
    r.connect("us-1", "us", 1, true);
    report(&r, "eu-1", "boot", "");
    report(&r, "us-1", "boot", "");
    let v1 = r.push(&bundle("v1"), true, false).unwrap().version;
    assert_eq!(r.next_apply("us-1", 1), None, "fleet waits for the canary");
    assert_eq!(obey(&r, "eu-1").as_deref(), Some(v1.as_str()));
    r.tick(); // canary healthy, wait 0 s -> fleet
    assert_eq!(obey(&r, "us-1").as_deref(), Some(v1.as_str()));
    r.tick();
    let view = r.view();
    assert_eq!(view.current.as_deref(), Some(v1.as_str()));
    assert_eq!(view.rollout.unwrap().phase, Phase::Done);
    assert!(view.edges.iter().all(|e| e.state == BundleState::InSync));
}

#[test]
fn a_broken_push_over_a_rollout_in_flight_goes_back_to_what_ran() {
    let (_d, r) = setup(Some("eu"), DriftPolicy::Enforce);
    for (e, region) in [("eu-1", "eu"), ("us-1", "us"), ("us-2", "us")] {
        r.connect(e, region, 1, true);
        report(&r, e, "boot", "");
    }
    let v0 = r.push(&bundle("v0"), false, false).unwrap().version;
    for e in ["eu-1", "us-1", "us-2"] {
        obey(&r, e);
    }
    r.tick();
    // v1 (say, a new WAF rule) reaches the canary and one fleet edge, not yet us-2.
    let v1 = r.push(&bundle("v1"), true, false).unwrap().version;
    obey(&r, "eu-1");
    r.tick();
    obey(&r, "us-1");
    r.tick();
    // A second push while v1 is in flight is refused without --force...
    assert!(matches!(
        r.push(&bundle("broken"), true, false),
        Err(RolloutError::InFlight(v)) if v == v1
    ));
    // ...and with it, supersedes v1; the canary rejects it.
    let v2 = r.push(&bundle("broken"), true, true).unwrap().version;
    let apply = r.next_apply("eu-1", 1).unwrap();
    assert_eq!(apply.version, v2);
    reject(&r, "eu-1", &v2, "main.vcl line 1: syntax");
    r.tick();
    let view = r.view();
    assert_eq!(view.rollout.as_ref().map(|r| r.phase), Some(Phase::Failed));
    let target = |id: &str| {
        view.edges
            .iter()
            .find(|e| e.id == id)
            .and_then(|e| e.target_version.clone())
    };
    // Each edge goes back to what it ran: v1 where v1 had arrived, never older.
    assert_eq!(target("eu-1").as_deref(), Some(v1.as_str()));
    assert_eq!(target("us-1").as_deref(), Some(v1.as_str()));
    assert_eq!(target("us-2").as_deref(), Some(v0.as_str()));
    for e in ["eu-1", "us-1", "us-2"] {
        assert_eq!(r.next_apply(e, 1), None, "{e} keeps what it runs");
    }
}

#[test]
fn canary_failure_stops_and_reverts() {
    let (_d, r) = setup(Some("eu"), DriftPolicy::Enforce);
    r.connect("eu-1", "eu", 1, true);
    r.connect("us-1", "us", 1, true);
    report(&r, "eu-1", "boot", "");
    report(&r, "us-1", "boot", "");
    let v1 = r.push(&bundle("v1"), false, false).unwrap().version;
    obey(&r, "eu-1");
    obey(&r, "us-1");
    r.tick();
    let v2 = r.push(&bundle("broken"), true, false).unwrap().version;
    let apply = r.next_apply("eu-1", 1).unwrap();
    assert_eq!(apply.version, v2);
    reject(&r, "eu-1", &v2, "main.vcl line 3: syntax");
    let view = r.view();
    let rollout = view.rollout.unwrap();
    assert_eq!(rollout.phase, Phase::Failed);
    assert!(rollout.error.unwrap().contains("main.vcl line 3"));
    assert_eq!(view.desired.as_deref(), Some(v1.as_str()));
    assert_eq!(r.next_apply("us-1", 1), None, "the fleet never saw v2");
    assert_eq!(r.next_apply("eu-1", 1), None, "eu-1 still runs v1");
}

#[test]
fn drift_enforce_and_report() {
    for policy in [DriftPolicy::Enforce, DriftPolicy::Report] {
        let (_d, r) = setup(None, policy);
        r.connect("eu-1", "eu", 1, true);
        report(&r, "eu-1", "boot", "");
        let v1 = r.push(&bundle("v1"), false, false).unwrap().version;
        obey(&r, "eu-1");
        report(&r, "eu-1", "hand_edit", "");
        let view = r.view();
        assert!(view.edges[0].drift && view.edges[0].drift_events == 1);
        let resent = r.next_apply("eu-1", 1).map(|a| a.version);
        match policy {
            DriftPolicy::Enforce => assert_eq!(resent, Some(v1.clone())),
            DriftPolicy::Report => assert_eq!(resent, None),
        }
        // A varnishd back on its boot VCL is restored in both modes.
        report(&r, "eu-1", "boot", "");
        if policy == DriftPolicy::Report {
            assert_eq!(r.next_apply("eu-1", 1).map(|a| a.version), Some(v1));
        }
    }
}

#[test]
fn an_unreachable_varnish_is_waited_for_not_sent_to() {
    let (_d, r) = setup(None, DriftPolicy::Enforce);
    r.connect("eu-1", "eu", 1, true);
    report(&r, "eu-1", "boot", "");
    let v1 = r.push(&bundle("v1"), false, false).unwrap().version;
    obey(&r, "eu-1");
    r.on_status(
        "eu-1",
        1,
        ConfigStatus {
            admin_error: "connection refused".into(),
            ..Default::default()
        },
    );
    assert_eq!(r.next_apply("eu-1", 1), None);
    assert_eq!(r.view().edges[0].drift_events, 0);
    // varnishd is back on its boot VCL: drift, and the version goes out at once.
    report(&r, "eu-1", "boot", "");
    assert_eq!(r.next_apply("eu-1", 1).map(|a| a.version), Some(v1));
}

#[test]
fn rollback_and_restart_resume() {
    let (d, r) = setup(None, DriftPolicy::Enforce);
    r.connect("eu-1", "eu", 1, true);
    report(&r, "eu-1", "boot", "");
    let v1 = r.push(&bundle("v1"), false, false).unwrap().version;
    obey(&r, "eu-1");
    r.tick();
    let v2 = r.push(&bundle("v2"), false, false).unwrap().version;
    obey(&r, "eu-1");
    r.tick();
    assert_eq!(r.view().current.as_deref(), Some(v2.as_str()));
    let back = r.rollback(None).unwrap();
    assert_eq!(back.version, v1);
    // A restarted coordinator resumes the rollback.
    drop(r);
    let store = Arc::new(BundleStore::open(d.path()).unwrap());
    let r = Rollouts::new(store, RolloutConfig::default(), BTreeMap::new()).unwrap();
    let view = r.view();
    assert_eq!(view.rollout.as_ref().map(|r| r.phase), Some(Phase::Fleet));
    assert_eq!(view.desired.as_deref(), Some(v1.as_str()));
    // The earlier rollouts survived the restart too, newest first, each as it ended.
    let past: Vec<(&str, &str, Phase)> = view
        .past_rollouts
        .iter()
        .map(|r| (r.kind.as_str(), r.version.as_str(), r.phase))
        .collect();
    assert_eq!(
        past,
        vec![
            ("push", v2.as_str(), Phase::Done),
            ("push", v1.as_str(), Phase::Done)
        ]
    );
    r.connect("eu-1", "eu", 1, true);
    report(&r, "eu-1", "cfg_v2", &v2);
    assert_eq!(obey(&r, "eu-1"), Some(v1.clone()));
    r.tick();
    assert_eq!(r.view().current.as_deref(), Some(v1.as_str()));
    assert!(r.rollback(Some("0000".into())).is_err());
}

#[test]
fn push_refuses_unknown_variables() {
    let (_d, r) = setup(None, DriftPolicy::Enforce);
    let err = r
        .push(&bundle("x ${nope}"), false, false)
        .unwrap_err()
        .to_string();
    assert!(err.contains("main.vcl:1") && err.contains("nope"), "{err}");
    assert!(r.store().list().unwrap().is_empty(), "nothing stored");
}

#[test]
fn a_compile_error_quoting_the_warm_token_is_kept_without_it() {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(BundleStore::open(dir.path()).unwrap());
    let mut regions = BTreeMap::new();
    regions.insert(
        "eu".to_owned(),
        Vars::for_region("eu", &BTreeMap::new()).with_warm_token("s3cr3t-warm-token"),
    );
    let config = RolloutConfig {
        canary_wait_s: 0,
        ..RolloutConfig::default()
    };
    let r = Rollouts::new(store, config, regions).unwrap();
    r.connect("eu-1", "eu", 1, true);
    report(&r, "eu-1", "boot", "");
    r.push(&bundle("v1"), false, false).unwrap();
    let apply = r.next_apply("eu-1", 1).expect("sent to the edge");
    // What varnishd answers for a bad line holding the token (it quotes the line).
    reject(
        &r,
        "eu-1",
        &apply.version,
        "Message from VCC-compiler:\nExpected ')' got '{'\n('main.vcl' Line 3 Pos 45)\nif (req.http.X-Warm-Token == \"s3cr3t-warm-token\" {\n--------------------------------------------#\n",
    );
    r.tick();
    let view = serde_json::to_string(&r.view()).unwrap();
    assert!(
        !view.contains("s3cr3t") && view.contains("${warm_token}"),
        "{view}"
    );
}

#[test]
fn the_rollout_id_metric_changes_with_each_rollout() {
    let (_d, r) = setup(None, DriftPolicy::Enforce);
    let id = |r: &Arc<Rollouts>| {
        let mut registry = crate::metrics::Registry::default();
        r.register_metrics(&mut registry);
        let text = crate::metrics::render(&registry, crate::metrics::Format::Prometheus);
        text.lines()
            .find_map(|l| l.strip_prefix("coordinator_config_rollout_id "))
            .map(str::to_owned)
    };
    assert_eq!(id(&r).as_deref(), Some("0"), "none yet");
    r.push(&bundle("v1"), true, false).unwrap();
    let first = id(&r);
    r.push(&bundle("v2"), true, true).unwrap();
    let second = id(&r);
    assert!(
        first.is_some() && first.as_deref() != Some("0"),
        "{first:?}"
    );
    assert!(
        second.is_some() && second != first,
        "{first:?} -> {second:?}"
    );
}
