//! Alerting: changes of region health, grouped, sent to the webhooks by the leader.
//!
//! [`Alerts::evaluate`] compares each region's health with what was last announced and
//! queues the changes that are news (`unknown` is never news; neither is a region coming
//! up for the first time, nor `no_agents` within `startup_grace_s`). [`Monitor::run`]
//! sends them once no new change arrived for `group_ms`, or at the latest after
//! `4 x group_ms`, all together in one message, so everything failing at once is one
//! alert, not one per region. A change formed before or while a region was out of sight
//! goes out only if it is still true then. Delivery is retried with backoff; in a
//! cluster each alert goes through the etcd [`ledger`](super::ledger) so a new leader
//! finishes what the last one left unsent ([`Alerts::take_over`]). One lock, over the
//! announced states, the queue, the history and the delivery counts.
//!
//! **Held changes.** A change of a drained region, or one a silence in force matches
//! ([`crate::maintenance`]), is decided when it is due: it is kept in the history (and
//! the ledger) marked `held`, and sent to no webhook. What the webhooks last heard of
//! each region is kept (`told`; a silenced change counts as heard: the operator knows):
//! when a region is undrained and is not as they last heard (it went down during the
//! maintenance and stayed down), one change from that to now goes out, once, and a
//! change that only brings a region back to what they last heard is not sent.

use daemon::sync::Recover;
use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use super::config::AlertsConfig;
use super::health::{Diagnosis, Health, RegionHealth};
use super::ledger::{self, Ledger, LedgerError};
use super::{Change, Held, Monitor};
use crate::clock::now_ms;
use crate::maintenance::Maintenance;
use crate::store_health::StoreHealth;

/// Alerts kept for `GET /api/v1/alerts`.
const ALERTS_KEPT: usize = 50;

/// Alert deliveries since start.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct AlertCounts {
    pub sent: u64,
    pub failed: u64,
}

/// One grouped alert: its changes, when it went out, and whether every webhook took it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AlertRecord {
    /// The same in every delivery of this alert (a new leader resending it, see
    /// `ledger`), and in the webhook's body.
    #[serde(default)]
    pub id: String,
    pub at_ms: u64,
    pub changes: Vec<Change>,
    /// Webhooks that answered 2xx (within the attempts) and those that did not.
    pub delivered: u32,
    pub failed: u32,
}

impl AlertRecord {
    /// A new alert of `changes`, formed now, with a fresh id.
    fn new(changes: Vec<Change>) -> Self {
        AlertRecord {
            id: format!("{:016x}", rand::random::<u64>()),
            at_ms: now_ms(),
            changes,
            delivered: 0,
            failed: 0,
        }
    }
}

struct State {
    announced: BTreeMap<String, RegionHealth>,
    /// The newest alerts, oldest first.
    history: VecDeque<AlertRecord>,
    pending: Vec<Change>,
    pending_since: Option<u64>,
    last_change: u64,
    sent: u64,
    failed: u64,
    /// Per region, the health and diagnosis the webhooks last heard of (or took as the
    /// baseline without news).
    told: BTreeMap<String, (Health, Option<Diagnosis>)>,
    /// The regions drained at the last evaluation.
    drained: BTreeSet<String>,
}

/// Whether going from `previous` (health, diagnosis; `None`: nothing known) to `now` is
/// news: `unknown` never is, nor coming up from it; any other change of health or
/// diagnosis is.
fn news(previous: Option<(Health, Option<Diagnosis>)>, now: &RegionHealth) -> bool {
    let (prev_health, prev_diagnosis) = previous.unwrap_or_default();
    let coming_up = prev_health == Health::Unknown && now.health <= Health::Up;
    !coming_up
        && now.health != Health::Unknown
        && (prev_health != now.health || now.diagnosis != prev_diagnosis)
}

/// What was announced, what waits to go out, and where it goes.
pub struct Alerts {
    config: AlertsConfig,
    /// `[monitoring] startup_grace_s`.
    startup_grace_s: u64,
    started: Instant,
    /// The cluster's alert ledger in etcd (none with the embedded store).
    ledger: OnceLock<Ledger>,
    /// Whether this coordinator reaches etcd (unset: always, embedded).
    store: OnceLock<StoreHealth>,
    /// Drains and silences (unset: none).
    maintenance: OnceLock<Arc<Maintenance>>,
    state: Mutex<State>,
}

type WebhookClient = hyper_util::client::legacy::Client<
    hyper_util::client::legacy::connect::HttpConnector,
    http_body_util::Full<axum::body::Bytes>,
>;

fn webhook_client() -> WebhookClient {
    hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new()).build_http()
}

impl Alerts {
    pub fn new(config: AlertsConfig, startup_grace_s: u64) -> Self {
        Alerts {
            config,
            startup_grace_s,
            started: Instant::now(),
            ledger: OnceLock::new(),
            store: OnceLock::new(),
            maintenance: OnceLock::new(),
            state: Mutex::new(State {
                announced: BTreeMap::new(),
                history: VecDeque::new(),
                pending: Vec::new(),
                pending_since: None,
                last_change: 0,
                sent: 0,
                failed: 0,
                told: BTreeMap::new(),
                drained: BTreeSet::new(),
            }),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.locked()
    }

    /// The cluster's alert ledger (`[store] backend = "etcd"`); set once at start.
    pub fn set_ledger(&self, ledger: Ledger) {
        let _ = self.ledger.set(ledger);
    }

    /// Drains and silences; set once at start.
    pub fn set_maintenance(&self, maintenance: Arc<Maintenance>) {
        let _ = self.maintenance.set(maintenance);
    }

    /// Whether this coordinator reaches etcd; set once at start.
    pub fn set_store_health(&self, store: StoreHealth) {
        let _ = self.store.set(store);
    }

    /// Compares `health()` (taken under this lock, so evaluations apply in order) with
    /// what was last announced and queues the changes that are news.
    pub fn evaluate(&self, health: impl FnOnce() -> BTreeMap<String, RegionHealth>) {
        let mut state = self.lock();
        let now = now_ms();
        let current = health();
        let maintenance = self.maintenance.get();
        for (region, h) in current {
            let drained = maintenance.is_some_and(|m| m.drained(&region));
            let previous = state.announced.get(&region).cloned();
            let change = |previous: Option<(Health, Option<Diagnosis>)>| Change {
                region: region.clone(),
                previous: previous.unwrap_or_default().0,
                state: h.health,
                diagnosis: h.diagnosis,
                check: h.check.clone(),
                last_error: h.last_error.clone(),
                at_ms: now,
                previous_diagnosis: previous.and_then(|p| p.1),
                held: None,
                silence: None,
            };
            // Undrained: the webhooks hear once where the region is now, if that is not
            // what they last heard.
            let mut caught_up = false;
            if !drained && state.drained.remove(&region) {
                let told = state.told.get(&region).copied();
                if news(told, &h) {
                    state.pending.push(change(told));
                    state.pending_since.get_or_insert(now);
                    state.last_change = now;
                    caught_up = true;
                }
            }
            if drained {
                state.drained.insert(region.clone());
            }
            let changed = previous.as_ref() != Some(&h);
            if !changed {
                continue;
            }
            // Agents are still dialling in: not news yet (the state itself is shown).
            let starting = self.started.elapsed().as_secs() < self.startup_grace_s;
            if starting && previous.is_none() && h.diagnosis == Some(Diagnosis::NoAgents) {
                continue;
            }
            // Unknown -> up (a region coming online) is not news; the rest is.
            let before = previous.as_ref().map(|p| (p.health, p.diagnosis));
            if news(before, &h) {
                if !caught_up {
                    state.pending.push(change(before));
                    state.pending_since.get_or_insert(now);
                    state.last_change = now;
                }
            } else if !drained {
                // Not news: the new baseline, as if the webhooks had heard it.
                state.told.insert(region.clone(), (h.health, h.diagnosis));
            }
            state.announced.insert(region, h);
        }
    }

    /// Whether `change` is still what the region shows now (what a change formed
    /// earlier must be to go out: no page replays what is no longer true).
    fn still_true(state: &State, change: &Change) -> bool {
        state
            .announced
            .get(&change.region)
            .is_some_and(|h| h.health == change.state && h.diagnosis == change.diagnosis)
    }

    /// Whether `region` is out of this coordinator's sight now.
    fn blind_now(state: &State, region: &str) -> bool {
        state
            .announced
            .get(region)
            .is_some_and(|h| h.diagnosis.is_some_and(Diagnosis::is_blind))
    }

    /// The pending changes once they have settled (or waited long enough).
    pub(super) fn take_due(&self) -> Option<Vec<Change>> {
        let mut state = self.lock();
        let since = state.pending_since?;
        let now = now_ms();
        let quiet = now.saturating_sub(state.last_change) >= self.config.group_ms;
        let too_long = now.saturating_sub(since) >= self.config.group_ms * 4;
        if !(quiet || too_long) {
            return None;
        }
        state.pending_since = None;
        // Per region: from the state before the group to its latest state; a region that
        // flapped back within the group is dropped.
        let mut latest: BTreeMap<String, Change> = BTreeMap::new();
        for c in state.pending.drain(..) {
            match latest.get_mut(&c.region) {
                Some(first) => {
                    let (previous, previous_diagnosis) = (first.previous, first.previous_diagnosis);
                    *first = Change {
                        previous,
                        previous_diagnosis,
                        ..c
                    };
                }
                None => {
                    latest.insert(c.region.clone(), c);
                }
            }
        }
        // A region that went out of sight since is not paged for what it showed before.
        let changes: Vec<Change> = latest
            .into_values()
            .filter(|c| c.previous != c.state || c.diagnosis.is_some())
            .filter(|c| !Self::blind_now(&state, &c.region))
            .collect();
        // Held or not, decided now: a drain or silence made while the group settled
        // counts.
        let maintenance = self.maintenance.get();
        let changes: Vec<Change> = changes
            .into_iter()
            .filter_map(|mut c| {
                if let Some(m) = maintenance {
                    if m.drained(&c.region) {
                        c.held = Some(Held::Drained);
                    } else if let Some(id) = m.silence_for(
                        &c.region,
                        c.diagnosis.map(Diagnosis::as_str),
                        c.previous_diagnosis.map(Diagnosis::as_str),
                    ) {
                        c.held = Some(Held::Silenced);
                        c.silence = Some(id);
                    }
                }
                let now = (c.state, c.diagnosis);
                match c.held {
                    // What the webhooks believe already (a change formed during a
                    // drain that ended before it was due) is no news to them.
                    None if state.told.get(&c.region) == Some(&now) => return None,
                    // A silence is the operator saying they know: as good as heard.
                    None | Some(Held::Silenced) => {
                        state.told.insert(c.region.clone(), now);
                    }
                    // Drained: the webhooks hear where it is on undrain.
                    Some(Held::Drained) => {}
                }
                Some(c)
            })
            .collect();
        (!changes.is_empty()).then_some(changes)
    }

    /// Webhooks alerts go to.
    pub fn webhook_count(&self) -> usize {
        self.config.webhooks.len()
    }

    /// The newest alerts, newest first: this coordinator's own (with the embedded store).
    pub fn recent_alerts(&self) -> Vec<AlertRecord> {
        self.lock().history.iter().rev().cloned().collect()
    }

    /// The cluster's alerts from its ledger in etcd, newest first (`None` with the
    /// embedded store): the same list on every coordinator, whichever leader sent them.
    /// An alert on its way shows no delivery yet. Blocking (it reads etcd).
    pub fn cluster_alerts(&self) -> Option<Result<Vec<AlertRecord>, LedgerError>> {
        let ledger = self.ledger.get()?;
        // Known unreachable: no read that could only time out.
        if self.store.get().and_then(StoreHealth::reachable) == Some(false) {
            return Some(Err(LedgerError::Unreachable));
        }
        Some(ledger.entries().map(|entries| {
            entries
                .into_iter()
                .rev()
                .take(ALERTS_KEPT)
                .map(|e| AlertRecord {
                    id: e.id,
                    at_ms: e.at_ms,
                    changes: e.changes,
                    delivered: e.delivered,
                    failed: e.failed,
                })
                .collect()
        }))
    }

    /// Alerts sent and failed (after all attempts).
    pub fn counts(&self) -> AlertCounts {
        let state = self.lock();
        AlertCounts {
            sent: state.sent,
            failed: state.failed,
        }
    }

    /// Sends one cluster alert (etcd unreachable / back, `cluster::store_alert`) to every
    /// webhook: not in the ledger (etcd is its subject), not in the region history.
    pub async fn send_cluster_alert(
        &self,
        event: &str,
        text: &str,
        coordinators: Vec<serde_json::Value>,
    ) {
        let id = format!("{:016x}", rand::random::<u64>());
        let body = serde_json::json!({
            "id": id,
            "text": text,
            "grouped": false,
            "alerts": [],
            "cluster": {"event": event, "coordinators": coordinators},
        });
        self.deliver_all(&webhook_client(), &body).await;
    }

    /// Sends `body` to every webhook, counting each delivery; (delivered, failed).
    async fn deliver_all(&self, client: &WebhookClient, body: &serde_json::Value) -> (u32, u32) {
        let (mut delivered, mut failed) = (0, 0);
        for url in &self.config.webhooks {
            let ok = deliver(client, url, body, self.config.attempts).await;
            let mut state = self.lock();
            if ok {
                state.sent += 1;
                delivered += 1;
            } else {
                state.failed += 1;
                failed += 1;
            }
        }
        (delivered, failed)
    }

    /// A coordinator that has just become the leader sends what the ledger holds unsent,
    /// then the changes it saw as a follower (since `since_ms`, within the window) that
    /// no ledger entry covers.
    async fn take_over(&self, client: &WebhookClient, since_ms: u64) {
        let Some(ledger) = self.ledger.get() else {
            return;
        };
        let entries = match ledger.entries() {
            Ok(e) => e,
            Err(e) => {
                tracing::warn!(error = %e, "alert ledger unreadable; alerts the last leader left unsent may be lost");
                return;
            }
        };
        for e in entries.iter().filter(|e| !e.sent) {
            tracing::info!(id = %e.id, changes = e.changes.len(), "sending an alert the last leader did not finish");
            let mut record = AlertRecord {
                id: e.id.clone(),
                at_ms: e.at_ms,
                changes: e.changes.clone(),
                delivered: 0,
                failed: 0,
            };
            self.send(client, &mut record).await;
            self.keep(record);
        }
        let from = now_ms()
            .saturating_sub(ledger::TAKEOVER_WINDOW_MS)
            .max(since_ms);
        // Only what is still true: a change seen while no leader could send it (etcd
        // gone, say) that has passed is not replayed as a page.
        let own: Vec<Change> = {
            let state = self.lock();
            state
                .history
                .iter()
                .filter(|r| r.at_ms >= from && r.delivered == 0 && r.failed == 0)
                .flat_map(|r| r.changes.clone())
                .filter(|c| c.held.is_none() && Self::still_true(&state, c))
                .collect()
        };
        let changes = ledger::uncovered(own, &entries);
        if !changes.is_empty() {
            let mut record = AlertRecord::new(changes);
            tracing::info!(id = %record.id, changes = record.changes.len(), "sending changes seen while the lead changed hands");
            self.send(client, &mut record).await;
            self.keep(record);
        }
    }

    /// Sends `record` to every webhook, recorded in the ledger before and after.
    async fn send(&self, client: &WebhookClient, record: &mut AlertRecord) {
        let mut entry = ledger::Entry {
            id: record.id.clone(),
            at_ms: record.at_ms,
            changes: record.changes.clone(),
            sent: false,
            delivered: 0,
            failed: 0,
        };
        let ledger = self.ledger.get();
        let paged: Vec<Change> = record
            .changes
            .iter()
            .filter(|c| c.held.is_none())
            .cloned()
            .collect();
        if paged.is_empty() {
            // Every change held: listed (on every coordinator), sent nowhere.
            if let Some(l) = ledger {
                entry.sent = true;
                if let Err(e) = l.put(&entry).and_then(|()| l.trim(&l.entries()?)) {
                    tracing::warn!(id = %record.id, error = %e, "held alert not in the ledger");
                }
            }
            return;
        }
        if let Some(l) = ledger {
            if let Err(e) = l.put(&entry) {
                tracing::warn!(id = %record.id, error = %e, "alert not in the ledger; sending it anyway");
            }
        }
        let body = alert_body(&record.id, &paged);
        let (delivered, failed) = self.deliver_all(client, &body).await;
        record.delivered += delivered;
        record.failed += failed;
        if let Some(l) = ledger {
            entry.sent = true;
            entry.delivered = record.delivered;
            entry.failed = record.failed;
            let done = l.put(&entry).and_then(|()| l.trim(&l.entries()?));
            if let Err(e) = done {
                tracing::warn!(id = %record.id, error = %e, "alert sent, not marked sent in the ledger");
            }
        }
    }

    /// Keeps `record` for `GET /api/v1/alerts`.
    fn keep(&self, record: AlertRecord) {
        let mut state = self.lock();
        state.history.push_back(record);
        while state.history.len() > ALERTS_KEPT {
            state.history.pop_front();
        }
    }
}

impl Monitor {
    /// Evaluates periodically (agent loss has no probe result) and delivers alerts —
    /// while `leading` is `true` (the cluster's leader; every coordinator keeps evaluating,
    /// so a new leader announces only what changes after it took over, besides what the
    /// last one left unsent: `ledger`).
    pub async fn run(
        self: Arc<Self>,
        leading: tokio::sync::watch::Receiver<bool>,
        shutdown: CancellationToken,
    ) {
        let mut tick = tokio::time::interval(Duration::from_millis(250));
        let client = webhook_client();
        let alerts = &self.alerts;
        let mut led = *leading.borrow();
        // When this coordinator last took the lead: what it formed before that as a
        // follower was looked at then.
        let mut took_over_ms = 0;
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tick.tick() => {}
            }
            let leads = *leading.borrow();
            if leads && !led {
                alerts.take_over(&client, took_over_ms).await;
                took_over_ms = now_ms();
            }
            led = leads;
            self.evaluate();
            let Some(changes) = alerts.take_due() else {
                continue;
            };
            let mut record = AlertRecord::new(changes);
            let held = record.changes.iter().filter(|c| c.held.is_some()).count();
            if held == record.changes.len() {
                tracing::info!(changes = held, id = %record.id,
                    text = %alert_body(&record.id, &record.changes)["text"],
                    "alert held (drained region or silence): sent to no webhook");
            } else {
                tracing::warn!(changes = record.changes.len(), held, id = %record.id,
                    text = %alert_body(&record.id, &record.changes)["text"], "alert");
            }
            if leads {
                alerts.send(&client, &mut record).await;
            } else {
                tracing::debug!("alert left to the cluster's leader to deliver");
            }
            alerts.keep(record);
        }
    }
}

/// The webhook payload: a Slack-compatible `text` and the structured changes.
pub fn alert_body(id: &str, changes: &[Change]) -> serde_json::Value {
    let icon = |h: Health| match h {
        Health::Down => "🔴",
        Health::Degraded => "🟠",
        Health::Up => "🟢",
        Health::Unknown => "⚪",
    };
    let everywhere = changes.len() > 1
        && changes
            .iter()
            .all(|c| c.diagnosis == Some(Diagnosis::OriginDownEverywhere));
    let mut text = if everywhere {
        format!(
            "🔴 origin down everywhere: {} regions cannot reach it\n",
            changes.len()
        )
    } else {
        String::new()
    };
    for c in changes {
        text.push_str(&format!(
            "{} {}: {:?} → {:?}{}{}{}\n",
            icon(c.state),
            c.region,
            c.previous,
            c.state,
            c.diagnosis.map(|d| format!(" ({d})")).unwrap_or_default(),
            c.check
                .as_ref()
                .map(|k| format!(", check {k}"))
                .unwrap_or_default(),
            c.last_error
                .as_ref()
                .map(|e| format!(": {e}"))
                .unwrap_or_default(),
        ));
    }
    serde_json::json!({ "id": id, "text": text.trim_end(), "grouped": changes.len() > 1, "alerts": changes })
}

async fn deliver(
    client: &WebhookClient,
    url: &str,
    body: &serde_json::Value,
    attempts: u32,
) -> bool {
    let payload = axum::body::Bytes::from(body.to_string());
    for attempt in 0..attempts {
        let req = hyper::Request::post(url)
            .header("content-type", "application/json")
            .body(http_body_util::Full::new(payload.clone()));
        let Ok(req) = req else {
            tracing::error!(url, "bad webhook URL");
            return false;
        };
        match tokio::time::timeout(Duration::from_secs(10), client.request(req)).await {
            Ok(Ok(resp)) if resp.status().is_success() => return true,
            Ok(Ok(resp)) => tracing::warn!(
                url,
                status = resp.status().as_u16(),
                attempt,
                "webhook refused the alert"
            ),
            Ok(Err(e)) => tracing::warn!(url, error = %e, attempt, "webhook unreachable"),
            Err(_) => tracing::warn!(url, attempt, "webhook timed out"),
        }
        tokio::time::sleep(Duration::from_millis(500) * 2u32.pow(attempt.min(6))).await;
    }
    tracing::error!(url, "alert not delivered after all attempts");
    false
}

#[cfg(test)]
impl Alerts {
    /// The changes queued, not yet due.
    pub(super) fn pending(&self) -> Vec<Change> {
        self.lock().pending.clone()
    }

    /// Makes the queue look settled (the last change long ago).
    pub(super) fn settle(&self) {
        self.lock().last_change = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn webhook_delivery_retries_until_accepted() {
        use std::sync::atomic::{AtomicU32, Ordering};
        let calls = Arc::new(AtomicU32::new(0));
        let seen = calls.clone();
        let app = axum::Router::new().route(
            "/hook",
            axum::routing::post(move || {
                let seen = seen.clone();
                async move {
                    if seen.fetch_add(1, Ordering::SeqCst) < 2 {
                        axum::http::StatusCode::INTERNAL_SERVER_ERROR
                    } else {
                        axum::http::StatusCode::OK
                    }
                }
            }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await });
        let client =
            hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
                .build_http();
        let body = serde_json::json!({"text": "x"});
        assert!(deliver(&client, &format!("http://{addr}/hook"), &body, 4).await);
        assert_eq!(calls.load(Ordering::SeqCst), 3);
        // Never accepted: gives up after the attempts.
        assert!(!deliver(&client, &format!("http://{addr}/missing"), &body, 2).await);
    }
}
