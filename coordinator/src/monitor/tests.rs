//! Tests of the monitor as a whole (probes in, health and alerts out), and the helpers
//! the files' own tests share.

use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::*;
use crate::clock::now_ms;
use crate::edges::{EdgeHello, EdgeView};

pub(super) fn hello(id: &str, region: &str) -> EdgeHello {
    EdgeHello {
        id: id.into(),
        region: region.into(),
        varnish_version: String::new(),
        purge_mode: String::new(),
        agent_version: String::new(),
        cert_not_after: None,
    }
}

pub(super) fn monitor() -> (Arc<Monitor>, Arc<EdgeRegistry>) {
    let edges = Arc::new(EdgeRegistry::default());
    let shutdown = CancellationToken::new();
    for (id, region) in [("a-1", "a"), ("b-1", "b")] {
        edges.connect(hello(id, region), 0, &shutdown);
    }
    let check = CheckConfig {
        name: "health".into(),
        path: "/".into(),
        host: "x".into(),
        expect_status: 200,
        body_contains: None,
        interval_ms: 1000,
        timeout_ms: 1000,
        slow_ms: 100,
    };
    let m = Monitor::new(
        MonitoringConfig::default(),
        vec![check],
        AlertsConfig::default(),
        vec!["a".into(), "b".into()],
        edges.clone(),
        test_log(),
        Arc::default(),
    );
    (m, edges)
}

pub(super) fn test_log() -> PurgeLog {
    let dir = Box::leak(Box::new(tempfile::tempdir().unwrap()));
    PurgeLog::open(
        dir.path(),
        crate::purge::log::Retention {
            max_entries: 1000,
            max_age: Duration::from_secs(3600),
        },
    )
    .unwrap()
}

pub(super) fn view(id: &str, connected: bool) -> EdgeView {
    EdgeView {
        connected,
        applied_seq: 10,
        ..EdgeView::new(id, "a")
    }
}

pub(super) fn result(target: &str, ok: bool, ms: u32) -> ProbeResult {
    ProbeResult {
        check: "health".into(),
        target: target.into(),
        ok,
        status: if ok { 200 } else { 0 },
        total_us: ms * 1000,
        ttfb_us: ms * 500,
        error: if ok {
            String::new()
        } else {
            "connect refused".into()
        },
        at_ms: {
            // One instant for every result of a test run: they share one minute.
            static AT: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
            *AT.get_or_init(now_ms)
        },
        ..Default::default()
    }
}

#[test]
fn failing_purges_are_news() {
    let (m, edges) = monitor();
    for r in ["a", "b"] {
        m.record(r, result("edge", true, 10));
    }
    m.evaluate();
    assert!(m.alerts.pending().is_empty());
    let handle = edges.connect(hello("a-1", "a"), 0, &CancellationToken::new());
    edges.error(
        &handle,
        1,
        1,
        "varnish admin authentication failed".into(),
        false,
    );
    m.evaluate();
    let pending = m.alerts.pending();
    assert_eq!(pending.len(), 1, "{pending:?}");
    assert_eq!(
        (pending[0].state, pending[0].diagnosis),
        (Health::Degraded, Some(Diagnosis::PurgeFailing))
    );
}

#[test]
fn relayed_results_move_health_and_stay_out_of_this_coordinators_histograms() {
    let (m, _) = monitor();
    m.record("a", result("edge", true, 10));
    // Region a's other edge is held by another coordinator: its results arrive
    // relayed, and they count for the region's health like an own one's.
    for _ in 0..3 {
        m.record_relayed("a", result("edge", false, 0));
    }
    let h = &m.health()["a"];
    assert_eq!(
        (h.health, h.diagnosis),
        (Health::Down, Some(Diagnosis::EdgeDown))
    );
    assert_eq!(
        m.probes("a")[0].last_error.as_deref(),
        Some("connect refused")
    );
    // /metrics counts only the one result this coordinator's own agent sent.
    let edge = m
        .histograms()
        .into_iter()
        .find(|h| h.region == "a" && h.target == "edge")
        .expect("a histogram for region a");
    assert_eq!(edge.durations.count, 1);
}

#[test]
fn thresholds_diagnosis_and_stats() {
    let (m, _) = monitor();
    for r in ["a", "b"] {
        m.record(r, result("edge", true, 10));
        m.record(r, result("origin", true, 10));
    }
    assert_eq!(m.health()["a"].health, Health::Up);
    // Two failures change nothing; the third makes it down: the edge, not the origin.
    m.record("a", result("edge", false, 0));
    m.record("a", result("edge", false, 0));
    assert_eq!(m.health()["a"].health, Health::Up);
    m.record("a", result("edge", false, 0));
    let h = &m.health()["a"];
    assert_eq!(
        (h.health, h.diagnosis),
        (Health::Down, Some(Diagnosis::EdgeDown))
    );
    // One success is not enough to recover; two are.
    m.record("a", result("edge", true, 10));
    assert_eq!(m.health()["a"].health, Health::Down);
    m.record("a", result("edge", true, 30));
    assert_eq!(m.health()["a"].health, Health::Up);
    // Slow answers degrade.
    for _ in 0..3 {
        m.record("b", result("edge", true, 500));
    }
    assert_eq!(m.health()["b"].health, Health::Degraded);
    let minute = m.probes("a")[0].minute.unwrap();
    assert_eq!(minute.count, 3);
    assert!((minute.mean_ms - 50.0 / 3.0).abs() < 1e-9);
    assert!(minute.std_ms > 0.0);
    assert!((minute.ttfb_mean_ms - 25.0 / 3.0).abs() < 1e-9);
}

#[test]
fn origin_down_everywhere_is_one_grouped_change_set() {
    let (m, _) = monitor();
    for r in ["a", "b"] {
        m.record(r, result("edge", true, 10));
        m.record(r, result("origin", true, 10));
    }
    m.evaluate();
    for _ in 0..3 {
        for r in ["a", "b"] {
            m.record(r, result("edge", false, 0));
            m.record(r, result("origin", false, 0));
        }
    }
    let h = m.health();
    assert!(
        h.values()
            .all(|h| h.diagnosis == Some(Diagnosis::OriginDownEverywhere)),
        "{h:?}"
    );
    m.alerts.settle();
    let changes = m.alerts.take_due().unwrap();
    assert_eq!(changes.len(), 2);
    let body = alert_body("x", &changes);
    assert!(body["text"]
        .as_str()
        .unwrap()
        .starts_with("🔴 origin down everywhere"));
    assert_eq!(body["grouped"], true);
    assert!(m.alerts.take_due().is_none());
}

#[test]
fn what_a_coordinator_cannot_see_is_unknown_and_pages_nobody() {
    let (m, edges) = monitor();
    let store = StoreHealth::new();
    store.succeeded();
    m.set_store_health(store.clone());
    for r in ["a", "b"] {
        m.record(r, result("edge", true, 10));
    }
    m.evaluate();
    assert!(m.health().values().all(|h| h.health == Health::Up));
    // a-1's session drops while etcd cannot be read: where it went cannot be told.
    let handle = edges.connect(hello("a-1", "a"), 0, &CancellationToken::new());
    edges.disconnect(&handle);
    store.failed("deadline");
    let h = m.health()["a"].clone();
    assert_eq!(
        (h.health, h.diagnosis),
        (Health::Unknown, Some(Diagnosis::StoreUnavailable))
    );
    assert!(h.last_error.unwrap().contains("deadline"));
    assert_eq!(m.health()["b"].health, Health::Up, "b is in sight");
    m.evaluate();
    assert!(m.alerts.pending().is_empty(), "unknown is no news");
    // Sight returns and the agent is really gone: one change, from what is true now.
    store.succeeded();
    m.evaluate();
    let pending = m.alerts.pending();
    assert_eq!(pending.len(), 1, "{pending:?}");
    assert_eq!(
        (pending[0].state, pending[0].diagnosis),
        (Health::Down, Some(Diagnosis::AgentLost))
    );
    // Formed, then out of sight again before it went out: not sent.
    store.failed("deadline");
    m.evaluate();
    m.alerts.settle();
    assert!(m.alerts.take_due().is_none(), "a blind region is not paged");
    // Up -> unknown -> up: nothing.
    let _back = edges.connect(hello("a-1", "a"), 0, &CancellationToken::new());
    store.succeeded();
    m.evaluate();
    m.alerts.settle();
    assert!(m.alerts.take_due().is_none());
}

#[test]
fn a_lost_agent_is_told_apart() {
    let (m, edges) = monitor();
    m.record("a", result("edge", true, 10));
    let list = edges.list(0);
    assert!(list.iter().all(|e| e.connected));
    // Disconnect a-1 by replacing its session and dropping the new handle's claim.
    let shutdown = CancellationToken::new();
    let handle = edges.connect(hello("a-1", "a"), 0, &shutdown);
    edges.disconnect(&handle);
    let h = &m.health()["a"];
    assert_eq!(
        (h.health, h.diagnosis),
        (Health::Down, Some(Diagnosis::AgentLost))
    );
}

/// Region `a` down (3 failures) or up again (2 successes), evaluated.
fn set_a(m: &Monitor, up: bool) {
    for _ in 0..3 {
        m.record("a", result("edge", up, 10));
    }
    m.evaluate();
}

fn due(m: &Monitor) -> Vec<Change> {
    m.alerts.settle();
    m.alerts.take_due().unwrap_or_default()
}

#[test]
fn a_drained_regions_changes_are_held_and_undraining_tells_once_where_it_is() {
    let (m, _) = monitor();
    let dir = tempfile::tempdir().unwrap();
    let maint = crate::maintenance::Maintenance::open(dir.path(), vec!["a".into()]).unwrap();
    m.set_maintenance(maint.clone());
    m.record("b", result("edge", true, 10));
    set_a(&m, true);
    assert!(due(&m).is_empty());
    let drain = crate::maintenance::DrainRequest::default()
        .check("api", now_ms())
        .unwrap();
    maint.drain("a", drain.clone()).unwrap();
    // Down while drained: listed, held, told to nobody; health still says down.
    set_a(&m, false);
    assert_eq!(m.health()["a"].health, Health::Down);
    let held = due(&m);
    assert_eq!(held.len(), 1, "{held:?}");
    assert_eq!(held[0].held, Some(Held::Drained));
    // Up and down again: held as well.
    set_a(&m, true);
    set_a(&m, false);
    assert!(due(&m).iter().all(|c| c.held == Some(Held::Drained)));
    // Undrained while down: one change from what the webhooks heard (up) to down.
    maint.undrain("a").unwrap();
    m.evaluate();
    let told = due(&m);
    assert_eq!(told.len(), 1, "{told:?}");
    assert_eq!(
        (told[0].previous, told[0].state, told[0].held),
        (Health::Up, Health::Down, None)
    );
    m.evaluate();
    assert!(due(&m).is_empty(), "once");
    // Drained while down, repaired, undrained up: the webhooks hear it is up again.
    maint.drain("a", drain.clone()).unwrap();
    set_a(&m, true);
    assert_eq!(due(&m)[0].held, Some(Held::Drained));
    maint.undrain("a").unwrap();
    m.evaluate();
    let back = due(&m);
    assert_eq!(
        (back.len(), back[0].state, back[0].held),
        (1, Health::Up, None)
    );
    // Drained and undrained with nothing changed in between: nothing.
    maint.drain("a", drain.clone()).unwrap();
    m.evaluate();
    maint.undrain("a").unwrap();
    m.evaluate();
    assert!(due(&m).is_empty());
    // Down and up again while drained, undrained before the up was due: the webhooks,
    // which heard nothing of the down, hear nothing of the up.
    maint.drain("a", drain).unwrap();
    set_a(&m, false);
    assert_eq!(due(&m)[0].held, Some(Held::Drained));
    set_a(&m, true);
    maint.undrain("a").unwrap();
    m.evaluate();
    assert!(due(&m).is_empty());
}

#[test]
fn a_silence_holds_what_it_matches_until_it_is_removed() {
    let (m, _) = monitor();
    let dir = tempfile::tempdir().unwrap();
    let maint = crate::maintenance::Maintenance::open(dir.path(), vec![]).unwrap();
    m.set_maintenance(maint.clone());
    m.record("b", result("edge", true, 10));
    set_a(&m, true);
    due(&m);
    // The first down pages; then the operator silences the region.
    set_a(&m, false);
    let first = due(&m);
    assert_eq!((first.len(), first[0].held), (1, None));
    let silence = crate::maintenance::SilenceRequest {
        region: Some("a".into()),
        diagnosis: None,
        for_s: 3600,
        reason: Some("known".into()),
    }
    .check("api", now_ms())
    .unwrap();
    maint.silence(silence.clone()).unwrap().unwrap();
    for up in [true, false, true] {
        set_a(&m, up);
        let c = due(&m);
        assert_eq!(c.len(), 1, "{c:?}");
        assert_eq!(
            (c[0].held, c[0].silence.as_deref()),
            (Some(Held::Silenced), Some(silence.id.as_str()))
        );
    }
    // A silence of another diagnosis does not match; removed, the next change pages.
    maint.unsilence(&silence.id).unwrap();
    let other = crate::maintenance::SilenceRequest {
        region: None,
        diagnosis: Some("origin_down".into()),
        for_s: 60,
        reason: None,
    }
    .check("api", now_ms())
    .unwrap();
    maint.silence(other).unwrap().unwrap();
    set_a(&m, false);
    let paged = due(&m);
    assert_eq!(
        (paged.len(), paged[0].state, paged[0].held),
        (1, Health::Down, None)
    );
    assert_eq!(paged[0].previous_diagnosis, None);
}
