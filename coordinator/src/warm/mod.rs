//! Warm jobs: every region's cache filled from Magento's sitemaps, the origin rendering
//! each page once, never past its budget.
//!
//! A job ([`job::JobSpec`]) is queued by the API, a cron entry ([`schedule`]) or a tag
//! purge. [`Warm::run`] starts one job at a time: it resolves the URLs (sitemap, list, or
//! the regions' popular URLs), splits them into shards of `shard_urls` in the store
//! ([`store`]), and fixes the target edges. From then on dispatch is pull-based, like
//! config: each agent session's warm loop asks [`Warm::next_for`], which hands the edge
//! at most [`IN_FLIGHT`] shards it has not done, each carrying the edge's rate. An edge
//! answers a shard with one progress report ([`Warm::on_progress`]); the shard is then
//! marked done for that edge, durably, so a coordinator restart resumes the job and an
//! agent restart only repeats the shards it had in flight.
//!
//! **Budget.** A job's origin budget is shared by the edges that reach the origin: all of
//! them in a flat job, the shield's in a tiered one (satellites fetch from the shield at
//! `satellite_rate`). One [`Aimd`] per job halves the budget actually used when any report
//! shows 5xx/429 or slow misses, and regains it slowly; each edge gets
//! `rate / origin-bound edges still working`, so the sum never exceeds the budget.
//!
//! **Tiered.** A satellite gets shard `i` only after every shield edge has done it, so
//! each page is rendered by the origin once (for the shield) and served to the satellites
//! from the shield's cache.
//!
//! **Re-warm.** Jobs that want tags get each URL's `X-Magento-Tags` back; the [`tags`]
//! index maps tags to URLs. The schedule loop watches the purge log, and a quiet
//! `rewarm_debounce_ms` after tag purges queues one job for the URLs carrying them, which
//! starts on each edge only once that edge has applied the purge.
//!
//! Nothing here runs on the purge path: the listener never waits on warming.

pub mod config;
pub mod job;
mod metrics;
pub mod schedule;
pub mod store;
pub mod tags;

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use proto::edge::{
    coordinator_message::Msg, Header, TopUrls, Variation, WarmCancel, WarmProgress, WarmRate,
    WarmShard,
};
use tokio::sync::watch;
use warmer::pace::Aimd;

use crate::edges::EdgeRegistry;
pub use config::{ScheduleConfig, WarmConfig};
use job::{EdgeWork, Job, JobSource, JobSpec, JobState, JobView};
pub use metrics::{FetchTotals, WarmMetrics};
use store::{WarmStore, WarmStoreError};
use tags::{Profile, TagIndex};

/// Shards handed to one edge at a time.
pub const IN_FLIGHT: usize = 2;
/// Session numbers from here up stand for sessions another coordinator of the cluster
/// holds (`cluster::warm_relay`); a coordinator numbers its own from 1.
pub const REMOTE_SESSIONS: u64 = 1 << 62;
/// Finished jobs kept in memory (and listed); older ones stay in the store only.
const KEEP_FINISHED: usize = 200;
/// Most popular URLs kept per edge.
const MAX_TOP_PER_EDGE: usize = 10_000;
/// Shards in a row that failed every fetch before an edge is dropped from a job.
const FAILED_SHARDS_TO_DROP: u32 = 3;

/// Warming's shared state; share it behind an `Arc`.
pub struct Warm {
    config: WarmConfig,
    token: String,
    regions: Vec<String>,
    store: WarmStore,
    edges: Arc<EdgeRegistry>,
    inner: Mutex<Inner>,
    changed: watch::Sender<u64>,
}

impl std::fmt::Debug for Warm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Warm").finish_non_exhaustive()
    }
}

struct Inner {
    jobs: BTreeMap<u64, Job>,
    next_id: u64,
    /// Warm-capable edges connected now: edge → (region, session).
    sessions: HashMap<String, (String, u64)>,
    /// Shards out on an edge's current session: edge → (job, shard).
    in_flight: HashMap<String, Vec<(u64, u32)>>,
    /// The rate last sent to each edge, per job.
    sent_rate: HashMap<(String, u64), f64>,
    /// Jobs to tell an edge to drop.
    cancels: HashMap<String, Vec<u64>>,
    /// Per edge and job: a shard below which all are done.
    hints: HashMap<(String, u64), u32>,
    /// Each running job's controller.
    aimd: HashMap<u64, Aimd>,
    /// Per running job and edge: the last shard handed out or reported, and how many
    /// reported shards in a row failed every fetch (a dead varnish, say).
    activity: HashMap<(u64, String), (Instant, u32)>,
    tags: TagIndex,
    /// Messages the cluster's leader handed out for this coordinator's sessions (a
    /// follower), per edge: sent by the session's warm loop like its own.
    forwarded: HashMap<String, (u64, Vec<Msg>)>,
    /// Latest popular-URL report per region and edge.
    top: BTreeMap<String, BTreeMap<String, Vec<(String, u64)>>>,
    /// Fetch results per region: [fetched, hits, misses, errors].
    totals: BTreeMap<String, FetchTotals>,
}

impl Inner {
    /// The jobs that run now, oldest first.
    fn running(&self) -> impl Iterator<Item = &Job> {
        self.jobs.values().filter(|j| j.state == JobState::Running)
    }

    /// The origin rate job `id`'s controller allows now, if it runs.
    fn rate_of(&self, id: u64) -> Option<f64> {
        self.aimd.get(&id).map(Aimd::rate)
    }

    /// Drops the per-edge bookkeeping of a job that ended (it would grow with every
    /// re-warm otherwise).
    fn forget(&mut self, id: u64) {
        self.aimd.remove(&id);
        self.activity.retain(|(j, _), _| *j != id);
        self.hints.retain(|(_, j), _| *j != id);
        self.sent_rate.retain(|(_, j), _| *j != id);
    }

    /// Notes that `edge` did something for job `id` now.
    fn touch(&mut self, id: u64, edge: &str) {
        let slot = self
            .activity
            .entry((id, edge.to_owned()))
            .or_insert((Instant::now(), 0));
        slot.0 = Instant::now();
    }

    /// Takes `edge` out of job `id` with `reason`: its shards are no longer handed out or
    /// waited for. Returns the edge's record to store.
    fn drop_edge(&mut self, id: u64, edge: &str, reason: String) -> Option<EdgeWork> {
        let work = self.jobs.get_mut(&id)?.edges.get_mut(edge)?;
        tracing::warn!(job_id = id, edge, region = %work.region, reason = %reason,
            "edge dropped from a warm job");
        work.dropped = Some(reason);
        let work = work.clone();
        if let Some(slot) = self.in_flight.get_mut(edge) {
            let had = slot.iter().any(|(j, _)| *j == id);
            slot.retain(|(j, _)| *j != id);
            if had {
                self.cancels.entry(edge.to_owned()).or_default().push(id);
            }
        }
        self.activity.remove(&(id, edge.to_owned()));
        Some(work)
    }

    /// Ends job `id` if every edge is done or dropped: `done`, or `failed` when every
    /// edge was dropped. Returns the job record to store.
    fn finish_if_done(&mut self, id: u64) -> Option<Job> {
        let job = self.jobs.get_mut(&id)?;
        if job.state != JobState::Running || !job.all_done() {
            return None;
        }
        let reasons: Vec<String> = job
            .edges
            .iter()
            .filter_map(|(e, w)| w.dropped.as_ref().map(|r| format!("{e}: {r}")))
            .collect();
        if !job.edges.is_empty() && reasons.len() == job.edges.len() {
            job.state = JobState::Failed;
            job.error = Some(format!("no edge could warm: {}", reasons.join("; ")));
        } else {
            job.state = JobState::Done;
        }
        job.finished_ms = Some(crate::clock::now_ms());
        tracing::info!(
            job_id = id,
            state = job.state.as_str(),
            dropped = reasons.len(),
            "warm job ended"
        );
        let mut meta = job.clone();
        meta.edges.clear();
        self.forget(id);
        Some(meta)
    }
}

/// Why an API call on warming failed.
#[derive(Debug, thiserror::Error)]
pub enum WarmError {
    #[error("{0}")]
    Invalid(String),
    #[error("no warm job {0}")]
    NotFound(u64),
    #[error(transparent)]
    Store(#[from] WarmStoreError),
}

/// Drops every job and what was out for them.
fn forget(inner: &mut Inner) {
    inner.jobs.clear();
    inner.aimd.clear();
    inner.in_flight.clear();
    inner.sent_rate.clear();
}

/// Puts the stored jobs into `inner` (the newest finished ones, every unfinished one;
/// running ones resume).
fn load_jobs(
    store: &WarmStore,
    config: &WarmConfig,
    inner: &mut Inner,
) -> Result<(), WarmStoreError> {
    let all = store.jobs()?;
    inner.next_id = all.iter().map(|j| j.id).max().unwrap_or(0) + 1;
    let finished: Vec<u64> = all
        .iter()
        .filter(|j| j.state.is_final())
        .map(|j| j.id)
        .collect();
    let keep_from = finished.len().saturating_sub(KEEP_FINISHED);
    for job in all {
        if job.state.is_final() && finished[..keep_from].contains(&job.id) {
            continue;
        }
        if job.state == JobState::Running {
            tracing::info!(job_id = job.id, "resuming warm job");
            inner
                .aimd
                .insert(job.id, Aimd::new(job.budget, slow(config)));
        }
        inner.jobs.insert(job.id, job);
    }
    Ok(())
}

impl Warm {
    /// Loads stored jobs (running ones resume) from `state_dir`.
    pub fn open(
        config: WarmConfig,
        token: String,
        regions: Vec<String>,
        state_dir: &Path,
        edges: Arc<EdgeRegistry>,
    ) -> Result<Arc<Self>, WarmStoreError> {
        Self::with_store(config, token, regions, WarmStore::open(state_dir)?, edges)
    }

    /// [`Self::open`] on a given store (the cluster's in etcd).
    pub fn with_store(
        config: WarmConfig,
        token: String,
        regions: Vec<String>,
        store: WarmStore,
        edges: Arc<EdgeRegistry>,
    ) -> Result<Arc<Self>, WarmStoreError> {
        let mut inner = Inner {
            jobs: BTreeMap::new(),
            next_id: 0,
            sessions: HashMap::new(),
            in_flight: HashMap::new(),
            sent_rate: HashMap::new(),
            cancels: HashMap::new(),
            hints: HashMap::new(),
            aimd: HashMap::new(),
            activity: HashMap::new(),
            tags: TagIndex::new(config.tag_index_pairs),
            forwarded: HashMap::new(),
            top: BTreeMap::new(),
            totals: BTreeMap::new(),
        };
        load_jobs(&store, &config, &mut inner)?;
        Ok(Arc::new(Warm {
            config,
            token,
            regions,
            store,
            edges,
            inner: Mutex::new(inner),
            changed: watch::channel(0).0,
        }))
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Holds no job (a follower: the leader runs them).
    pub fn forget_jobs(&self) -> Result<(), WarmStoreError> {
        forget(&mut self.lock());
        self.bump();
        Ok(())
    }

    /// Reads the jobs again from the store (a coordinator that has just become the
    /// cluster's leader takes over what the last one left); shards that were out on
    /// another coordinator's sessions are handed out again.
    pub fn reload(&self) -> Result<(), WarmStoreError> {
        let mut inner = self.lock();
        forget(&mut inner);
        load_jobs(&self.store, &self.config, &mut inner)?;
        drop(inner);
        self.bump();
        Ok(())
    }

    fn bump(&self) {
        self.changed.send_modify(|v| *v += 1);
    }

    /// Wakes on every change that may give a session something to send.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.changed.subscribe()
    }

    /// Queues a job; returns its id.
    pub fn create(&self, spec: JobSpec, origin: JobSource) -> Result<u64, WarmError> {
        spec.validate(&self.regions).map_err(WarmError::Invalid)?;
        self.create_after(spec, origin, 0)
    }

    fn create_after(
        &self,
        spec: JobSpec,
        source: JobSource,
        after_seq: u64,
    ) -> Result<u64, WarmError> {
        let budget = spec
            .rate
            .unwrap_or(self.config.origin_budget_rps)
            .min(self.config.origin_budget_rps);
        let regions = match &spec.regions {
            Some(r) if !r.iter().any(|r| r == "all") => r.clone(),
            _ => self.regions.clone(),
        };
        let mut inner = self.lock();
        let id = inner.next_id;
        let job = Job {
            id,
            spec,
            source,
            state: JobState::Queued,
            error: None,
            created_ms: crate::clock::now_ms(),
            started_ms: None,
            finished_ms: None,
            urls: 0,
            shards: 0,
            per_shard: self.config.shard_urls,
            variations: Vec::new(),
            host: None,
            shield: None,
            want_tags: false,
            after_seq,
            budget,
            regions,
            edges: BTreeMap::new(),
        };
        self.store.put_job(&job)?;
        inner.next_id += 1;
        tracing::info!(job_id = id, source = ?job.source, "warm job queued");
        inner.jobs.insert(id, job);
        drop(inner);
        self.bump();
        Ok(id)
    }

    /// Cancels a queued or running job.
    pub fn cancel(&self, id: u64) -> Result<JobView, WarmError> {
        let mut inner = self.lock();
        let Some(job) = inner.jobs.get_mut(&id) else {
            return Err(WarmError::NotFound(id));
        };
        if !job.state.is_final() {
            job.state = JobState::Cancelled;
            job.finished_ms = Some(crate::clock::now_ms());
            let job = job.clone();
            self.store.put_job(&job)?;
            let holders: Vec<String> = inner
                .in_flight
                .iter_mut()
                .filter_map(|(edge, shards)| {
                    let had = shards.iter().any(|(j, _)| *j == id);
                    shards.retain(|(j, _)| *j != id);
                    had.then(|| edge.clone())
                })
                .collect();
            for edge in holders {
                inner.cancels.entry(edge).or_default().push(id);
            }
            tracing::info!(job_id = id, "warm job cancelled");
            inner.forget(id);
            let _ = self.store.drop_shards(id);
        }
        let view = JobView::of(&inner.jobs[&id], None, crate::clock::now_ms());
        drop(inner);
        self.bump();
        Ok(view)
    }

    pub fn view(&self, id: u64) -> Option<JobView> {
        let inner = self.lock();
        inner
            .jobs
            .get(&id)
            .map(|j| JobView::of(j, inner.rate_of(id), crate::clock::now_ms()))
    }

    /// The newest jobs as the store holds them, newest first: a follower's answer
    /// (the leader runs the jobs and writes their progress there). Blocking.
    pub fn stored_list(&self, limit: usize) -> Result<Vec<JobView>, WarmStoreError> {
        let now = crate::clock::now_ms();
        Ok(self
            .store
            .jobs()?
            .iter()
            .rev()
            .take(limit)
            .map(|j| JobView::of(j, None, now))
            .collect())
    }

    /// Job `id` as the store holds it (see [`Self::stored_list`]). Blocking.
    pub fn stored_view(&self, id: u64) -> Result<Option<JobView>, WarmStoreError> {
        let now = crate::clock::now_ms();
        Ok(self
            .store
            .jobs()?
            .iter()
            .find(|j| j.id == id)
            .map(|j| JobView::of(j, None, now)))
    }

    /// The newest jobs first.
    pub fn list(&self, limit: usize) -> Vec<JobView> {
        let inner = self.lock();
        let now = crate::clock::now_ms();
        inner
            .jobs
            .values()
            .rev()
            .take(limit)
            .map(|j| JobView::of(j, inner.rate_of(j.id), now))
            .collect()
    }

    /// What the metrics export: fetch results per region, jobs per state, the rate.
    pub fn metrics(&self) -> WarmMetrics {
        let inner = self.lock();
        let mut jobs: BTreeMap<&'static str, usize> = [
            JobState::Queued,
            JobState::Running,
            JobState::Done,
            JobState::Failed,
            JobState::Cancelled,
        ]
        .iter()
        .map(|s| (s.as_str(), 0))
        .collect();
        for j in inner.jobs.values() {
            *jobs.entry(j.state.as_str()).or_default() += 1;
        }
        let fetches = inner.totals.clone();
        WarmMetrics {
            fetches,
            jobs,
            origin_rate_rps: inner.aimd.values().map(Aimd::rate).sum(),
        }
    }

    /// A warm-capable session started. An edge new to a running job's regions (added to
    /// the fleet mid-job) joins the job.
    pub fn connect(&self, edge: &str, region: &str, session: u64) {
        self.attach(edge, region, session);
    }

    /// A warm-capable session another coordinator of the cluster holds, standing here
    /// as `session` (from [`REMOTE_SESSIONS`] up), unless the edge has a session here
    /// (that one wins). Returns whether it now stands.
    pub fn connect_remote(&self, edge: &str, region: &str, session: u64) -> bool {
        self.attach(edge, region, session.max(REMOTE_SESSIONS))
    }

    fn attach(&self, edge: &str, region: &str, session: u64) -> bool {
        let mut inner = self.lock();
        let local_here = inner
            .sessions
            .get(edge)
            .is_some_and(|(_, s)| *s < REMOTE_SESSIONS);
        if session >= REMOTE_SESSIONS && local_here {
            return false;
        }
        inner
            .sessions
            .insert(edge.to_owned(), (region.to_owned(), session));
        inner.in_flight.remove(edge);
        inner.sent_rate.retain(|(e, _), _| e != edge);
        let joined: Vec<(u64, EdgeWork)> = inner
            .jobs
            .values_mut()
            .filter(|j| j.state == JobState::Running)
            .filter(|j| j.regions.iter().any(|r| r == region) && !j.edges.contains_key(edge))
            .map(|job| {
                let work = EdgeWork {
                    region: region.to_owned(),
                    ..EdgeWork::default()
                };
                job.edges.insert(edge.to_owned(), work.clone());
                (job.id, work)
            })
            .collect();
        drop(inner);
        for (job_id, work) in joined {
            tracing::info!(job_id, edge, region, "edge joined a running warm job");
            if let Err(e) = self.store.put_edge(job_id, edge, &work) {
                tracing::error!(job_id, edge, error = %e, "cannot record an edge joining a warm job");
            }
        }
        self.bump();
        true
    }

    /// The session ended: its shards go back to the pool.
    pub fn disconnect(&self, edge: &str, session: u64) {
        let mut inner = self.lock();
        if inner.sessions.get(edge).is_some_and(|(_, s)| *s == session) {
            inner.sessions.remove(edge);
            inner.in_flight.remove(edge);
            inner.sent_rate.retain(|(e, _), _| e != edge);
            inner.cancels.remove(edge);
            inner.forwarded.remove(edge);
        }
        drop(inner);
        self.bump();
    }

    /// This coordinator's own warm-capable sessions (`(edge, region, session)`), not
    /// those standing for another coordinator's.
    pub fn own_sessions(&self) -> Vec<(String, String, u64)> {
        self.lock()
            .sessions
            .iter()
            .filter(|(_, (_, s))| *s < REMOTE_SESSIONS)
            .map(|(e, (r, s))| (e.clone(), r.clone(), *s))
            .collect()
    }

    /// Queues `msg`, which the cluster's leader handed out for `edge`'s `session`, for
    /// that session's warm loop; false (dropped) when the session is not current.
    pub fn forward(&self, edge: &str, session: u64, msg: Msg) -> bool {
        let mut inner = self.lock();
        if inner.sessions.get(edge).is_none_or(|(_, s)| *s != session) {
            return false;
        }
        let slot = inner
            .forwarded
            .entry(edge.to_owned())
            .or_insert((session, Vec::new()));
        if slot.0 != session {
            *slot = (session, Vec::new());
        }
        slot.1.push(msg);
        drop(inner);
        self.bump();
        true
    }

    /// What this edge's session should send now: cancels, rate changes, new shards of
    /// every running job it takes part in.
    pub fn next_for(&self, edge: &str, session: u64) -> Vec<Msg> {
        let mut out = Vec::new();
        let mut picks: Vec<(u64, u32, Arc<ShardSpec>)> = Vec::new();
        {
            let mut inner = self.lock();
            if inner.sessions.get(edge).is_none_or(|(_, s)| *s != session) {
                return out;
            }
            if let Some((s, msgs)) = inner.forwarded.remove(edge) {
                if s == session {
                    out.extend(msgs);
                }
            }
            for job_id in inner.cancels.remove(edge).unwrap_or_default() {
                out.push(Msg::WarmCancel(WarmCancel { job_id }));
            }
            let jobs: Vec<u64> = inner
                .running()
                .filter(|j| j.edges.get(edge).is_some_and(|w| w.dropped.is_none()))
                .map(|j| j.id)
                .collect();
            for job_id in jobs {
                self.next_of_job(&mut inner, edge, job_id, &mut out, &mut picks);
            }
        }
        // The store is read without the lock held.
        for (job_id, shard, spec) in picks {
            match self.store.shard(job_id, shard) {
                Ok(urls) => out.push(Msg::WarmShard(
                    self.shard_message(job_id, shard, urls, &spec),
                )),
                Err(e) => {
                    tracing::error!(job_id, shard, error = %e, "cannot read a warm shard");
                    self.fail(job_id, format!("cannot read shard {shard}: {e}"));
                }
            }
        }
        out
    }

    /// [`Self::next_for`] for one running job: a rate change and the shards to hand out.
    fn next_of_job(
        &self,
        inner: &mut Inner,
        edge: &str,
        job_id: u64,
        out: &mut Vec<Msg>,
        picks: &mut Vec<(u64, u32, Arc<ShardSpec>)>,
    ) {
        let Some(job) = inner.jobs.get(&job_id) else {
            return;
        };
        let Some(work) = job.edges.get(edge) else {
            return;
        };
        if job.after_seq > 0 && self.edges.applied_seq(edge).unwrap_or(0) < job.after_seq {
            return;
        }
        let rate = self.share(inner, job, &work.region);
        let busy: Vec<u32> = inner
            .in_flight
            .get(edge)
            .map(|v| {
                v.iter()
                    .filter(|(j, _)| *j == job_id)
                    .map(|(_, s)| *s)
                    .collect()
            })
            .unwrap_or_default();
        let is_shield = job.shield.as_ref() == Some(&work.region);
        let mut free = IN_FLIGHT.saturating_sub(busy.len());
        // Shards below the hint are done: scans start there, not at 0.
        let key = (edge.to_owned(), job_id);
        let from = inner.hints.get(&key).copied().unwrap_or(0);
        let mut first_open = None;
        let mut mine = Vec::new();
        for shard in from..job.shards {
            if free == 0 {
                break;
            }
            if work.is_done(shard) {
                continue;
            }
            first_open.get_or_insert(shard);
            if busy.contains(&shard) {
                continue;
            }
            if !is_shield && !job.shield_done(shard) {
                // Tiered: the shield has not rendered this one yet.
                break;
            }
            mine.push(shard);
            free -= 1;
        }
        if !mine.is_empty() {
            let spec = Arc::new(ShardSpec {
                rate,
                concurrency: job.spec.concurrency.unwrap_or(self.config.concurrency),
                host: job.host.clone().unwrap_or_default(),
                variations: job.variations.clone(),
                refresh: job.spec.refresh,
                want_tags: job.want_tags,
            });
            picks.extend(mine.iter().map(|s| (job_id, *s, spec.clone())));
        }
        let last = inner.sent_rate.get(&key).copied();
        let rate_changed = last.is_none_or(|r| (r - rate).abs() > rate * 0.05);
        if rate_changed {
            if !busy.is_empty() {
                out.push(Msg::WarmRate(WarmRate { job_id, rate }));
            }
            inner.sent_rate.insert(key.clone(), rate);
        }
        if let Some(h) = first_open {
            inner.hints.insert(key, h);
        }
        if !mine.is_empty() {
            inner.touch(job_id, edge);
        }
        let slot = inner.in_flight.entry(edge.to_owned()).or_default();
        slot.extend(mine.iter().map(|s| (job_id, *s)));
    }

    fn shard_message(
        &self,
        job_id: u64,
        shard: u32,
        urls: Vec<String>,
        spec: &ShardSpec,
    ) -> WarmShard {
        WarmShard {
            job_id,
            shard,
            urls,
            host: spec.host.clone(),
            variations: spec
                .variations
                .iter()
                .map(|v| Variation {
                    headers: v
                        .iter()
                        .map(|(name, value)| Header {
                            name: name.clone(),
                            value: value.clone(),
                        })
                        .collect(),
                })
                .collect(),
            rate: spec.rate,
            concurrency: spec.concurrency,
            timeout_ms: u32::try_from(self.config.timeout_ms).unwrap_or(u32::MAX),
            refresh: spec.refresh,
            token: self.token.clone(),
            want_tags: spec.want_tags,
            slow_ttfb_ms: u32::try_from(self.config.slow_ttfb_ms).unwrap_or(u32::MAX),
        }
    }

    /// This edge's rate: its share of the controller's rate among the origin-bound edges
    /// still working, or the satellite rate.
    fn share(&self, inner: &Inner, job: &Job, region: &str) -> f64 {
        if job.shield.as_deref().is_some_and(|s| s != region) {
            return self.config.satellite_rate;
        }
        let rate = inner.rate_of(job.id).unwrap_or(job.budget);
        let working = job
            .edges
            .values()
            .filter(|w| job.shield.as_ref().is_none_or(|s| s == &w.region) && !job.edge_done(w))
            .count()
            .max(1);
        rate / working as f64
    }

    /// An edge reported a shard.
    pub fn on_progress(&self, edge: &str, session: u64, p: WarmProgress) {
        let persist = {
            let mut inner = self.lock();
            if inner.sessions.get(edge).is_none_or(|(_, s)| *s != session) {
                return;
            }
            let Some(slot) = inner.in_flight.get_mut(edge) else {
                return;
            };
            let Some(at) = slot
                .iter()
                .position(|&(j, s)| j == p.job_id && s == p.shard)
            else {
                tracing::debug!(
                    edge,
                    job_id = p.job_id,
                    shard = p.shard,
                    "report for a shard not handed out; ignored"
                );
                return;
            };
            slot.swap_remove(at);
            let inner = &mut *inner;
            let Some(job) = inner
                .jobs
                .get_mut(&p.job_id)
                .filter(|j| j.state == JobState::Running)
            else {
                return;
            };
            let Some(work) = job.edges.get_mut(edge) else {
                return;
            };
            if work.is_done(p.shard) || work.dropped.is_some() {
                return;
            }
            work.set_done(p.shard);
            work.fetched += u64::from(p.fetched);
            work.hits += u64::from(p.hits);
            work.misses += u64::from(p.misses);
            work.errors += u64::from(p.errors);
            if work.first_error.is_none() && !p.first_error.is_empty() {
                work.first_error = Some(p.first_error.chars().take(300).collect());
            }
            let region = work.region.clone();
            let t = inner.totals.entry(region.clone()).or_default();
            t.fetched += u64::from(p.fetched);
            t.hits += u64::from(p.hits);
            t.misses += u64::from(p.misses);
            t.errors += u64::from(p.errors);
            let origin_bound = job.shield.as_ref().is_none_or(|s| s == &region);
            if let Some(aimd) = inner.aimd.get_mut(&job.id) {
                if origin_bound {
                    let slow_miss = p.misses > 0
                        && p.miss_ttfb_us / u64::from(p.misses) > self.config.slow_ttfb_ms * 1000;
                    let overloaded = p.throttled > 0 || slow_miss;
                    if overloaded {
                        tracing::info!(
                            job_id = job.id,
                            edge,
                            throttled = p.throttled,
                            slow_miss,
                            rate = aimd.rate(),
                            "origin overloaded; warming slows down"
                        );
                    }
                    aimd.observe(overloaded, Instant::now());
                }
            }
            if job.want_tags {
                let profile = Profile {
                    host: job.host.clone(),
                    variations: job.variations.clone(),
                };
                for t in p.tags.iter().take(self.config.shard_urls) {
                    inner.tags.add(&profile, &t.url, &t.tags);
                }
            }
            let job_id = job.id;
            // A shard whose every fetch failed (a dead varnish answers nothing): three in
            // a row and the edge is dropped from the job instead of burning through it.
            let failed_all = p.fetched == 0 && p.errors > 0;
            inner.touch(job_id, edge);
            let streak = inner
                .activity
                .get_mut(&(job_id, edge.to_owned()))
                .map(|(_, n)| {
                    *n = if failed_all { *n + 1 } else { 0 };
                    *n
                })
                .unwrap_or(0);
            let mut work = inner
                .jobs
                .get(&job_id)
                .and_then(|j| j.edges.get(edge))
                .cloned()
                .unwrap_or_default();
            let reported_all = inner
                .jobs
                .get(&job_id)
                .is_some_and(|j| work.shards_done() >= j.shards);
            let or_no_answer = |e: &str| {
                if e.is_empty() {
                    "no answer".to_owned()
                } else {
                    e.to_owned()
                }
            };
            let reason = if reported_all && work.fetched == 0 && work.errors > 0 {
                // Done in name only: nothing was warmed there.
                let first = work.first_error.as_deref().unwrap_or_default();
                Some(format!("every fetch failed: {}", or_no_answer(first)))
            } else if streak >= FAILED_SHARDS_TO_DROP {
                Some(format!(
                    "{streak} shards in a row failed every fetch: {}",
                    or_no_answer(&p.first_error)
                ))
            } else {
                None
            };
            if let Some(w) = reason.and_then(|r| inner.drop_edge(job_id, edge, r)) {
                work = w;
            }
            let finished = inner.finish_if_done(job_id);
            (job_id, work, finished)
        };
        let (job_id, work, finished) = persist;
        self.persist(&[(job_id, edge.to_owned(), work)], finished.as_slice());
        self.bump();
    }

    /// Drops, from every running job, the target edges that have been disconnected or
    /// made no progress for longer than `warm.edge_timeout_s` (or three times a shard's
    /// time at its rate, if that is longer); ends the jobs that then have nothing left
    /// to wait for. Called by the schedule loop.
    pub fn drop_stuck_edges(&self) {
        let timeout = Duration::from_secs(self.config.edge_timeout_s);
        let mut stored = Vec::new();
        let mut finished = Vec::new();
        {
            let mut inner = self.lock();
            let inner = &mut *inner;
            let now = Instant::now();
            let mut stuck = Vec::new();
            for job in inner.jobs.values().filter(|j| j.state == JobState::Running) {
                let per_edge = job
                    .edges
                    .values()
                    .filter(|w| !job.edge_done(w))
                    .count()
                    .max(1);
                let rate = inner.rate_of(job.id).unwrap_or(job.budget) / per_edge as f64;
                let shard_s = job.shard_fetches(0) as f64 / rate.max(0.01);
                let limit = timeout.max(Duration::from_secs_f64((shard_s * 3.0).min(3600.0)));
                for (edge, w) in &job.edges {
                    if job.edge_done(w) {
                        continue;
                    }
                    let since = inner
                        .activity
                        .entry((job.id, edge.clone()))
                        .or_insert((now, 0))
                        .0;
                    let idle = now.duration_since(since);
                    if idle < limit {
                        continue;
                    }
                    let connected = inner.sessions.contains_key(edge);
                    let applied = self.edges.applied_seq(edge).unwrap_or(0);
                    let reason = if !connected {
                        format!("agent disconnected for {} s", idle.as_secs())
                    } else if job.after_seq > applied {
                        format!(
                            "has not applied purge {} for {} s (its varnish may be failing)",
                            job.after_seq,
                            idle.as_secs()
                        )
                    } else {
                        format!("no warm progress for {} s", idle.as_secs())
                    };
                    stuck.push((job.id, edge.clone(), reason));
                }
            }
            for (job_id, edge, reason) in stuck {
                if let Some(w) = inner.drop_edge(job_id, &edge, reason) {
                    stored.push((job_id, edge, w));
                }
                if let Some(job) = inner.finish_if_done(job_id) {
                    finished.push(job);
                }
            }
        }
        if stored.is_empty() && finished.is_empty() {
            return;
        }
        self.persist(&stored, &finished);
        self.bump();
    }

    /// Stores edge records and ended jobs (their shards are dropped).
    fn persist(&self, edges: &[(u64, String, EdgeWork)], finished: &[Job]) {
        for (job_id, edge, work) in edges {
            if let Err(e) = self.store.put_edge(*job_id, edge, work) {
                tracing::error!(job_id, edge, error = %e, "cannot record a warm edge");
            }
        }
        for job in finished {
            if let Err(e) = self.store.put_job(job) {
                tracing::error!(job_id = job.id, error = %e, "cannot record the end of a warm job");
            }
            let _ = self.store.drop_shards(job.id);
        }
    }

    /// An edge's popular URLs.
    pub fn on_top(&self, edge: &str, region: &str, top: TopUrls) {
        let list: Vec<(String, u64)> = top
            .urls
            .into_iter()
            .take(MAX_TOP_PER_EDGE)
            .filter(|u| u.url.len() <= 2048 && !u.url.chars().any(|c| c.is_control() || c == ' '))
            .map(|u| (u.url, u.count))
            .collect();
        let mut inner = self.lock();
        if !self.regions.iter().any(|r| r == region) {
            return;
        }
        inner
            .top
            .entry(region.to_owned())
            .or_default()
            .insert(edge.to_owned(), list);
    }

    /// The `n` most requested URLs of each region (counts summed over its edges), as
    /// absolute URLs.
    pub fn top(&self, regions: &[String], n: usize) -> BTreeMap<String, Vec<(String, u64)>> {
        let inner = self.lock();
        regions
            .iter()
            .map(|r| {
                let mut sum: HashMap<&str, u64> = HashMap::new();
                for list in inner.top.get(r).into_iter().flat_map(|e| e.values()) {
                    for (u, c) in list {
                        *sum.entry(u.as_str()).or_default() += c;
                    }
                }
                let mut all: Vec<(String, u64)> = sum
                    .into_iter()
                    .filter_map(|(u, c)| absolute(u, self.config.host.as_deref()).map(|u| (u, c)))
                    .collect();
                all.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
                all.truncate(n);
                (r.clone(), all)
            })
            .collect()
    }

    fn fail(&self, id: u64, error: String) {
        let job = {
            let mut inner = self.lock();
            let Some(job) = inner.jobs.get_mut(&id) else {
                return;
            };
            if job.state.is_final() {
                return;
            }
            job.state = JobState::Failed;
            job.error = Some(error);
            job.finished_ms = Some(crate::clock::now_ms());
            let job = job.clone();
            inner.forget(id);
            job
        };
        tracing::warn!(job_id = id, error = ?job.error, "warm job failed");
        let _ = self.store.put_job(&job);
        let _ = self.store.drop_shards(id);
        self.bump();
    }

    /// Re-warm: queues jobs for the URLs known to carry `tags`, to start on each edge
    /// once it applied purge `after_seq`.
    pub fn rewarm(&self, tags: &[String], after_seq: u64) -> Vec<u64> {
        let groups = self.lock().tags.lookup(tags);
        let mut ids = Vec::new();
        for (profile, urls) in groups {
            let spec = JobSpec {
                urls,
                host: profile.host.clone(),
                variations: Some(
                    profile
                        .variations
                        .iter()
                        .map(|v| warmer::engine::format_variation(v))
                        .collect(),
                ),
                rewarm: Some(true),
                ..JobSpec::default()
            };
            if let Err(e) = spec.validate(&self.regions) {
                tracing::warn!(error = %e, "re-warm skipped");
                continue;
            }
            match self.create_after(spec, JobSource::Rewarm, after_seq) {
                Ok(id) => ids.push(id),
                Err(e) => tracing::error!(error = %e, "cannot queue a re-warm"),
            }
        }
        if !ids.is_empty() {
            tracing::info!(tags = tags.len(), jobs = ?ids, after_seq, "re-warming purged URLs");
        }
        ids
    }

    /// Starts the oldest queued job if none runs: resolves its URLs and edges.
    pub(crate) async fn start_next(&self) {
        let (id, spec, regions) = {
            let inner = self.lock();
            // A job waits only for regions a running job is still warming: jobs for other
            // regions, for regions whose part is done (a stuck edge elsewhere holds nobody),
            // and re-warms (small, and shoppers are waiting for them) start at once.
            let busy: Vec<&String> = inner
                .running()
                .flat_map(|j| {
                    j.edges
                        .values()
                        .filter(|w| !j.edge_done(w))
                        .map(|w| &w.region)
                })
                .collect();
            let Some(job) = inner.jobs.values().find(|j| {
                j.state == JobState::Queued
                    && (j.source == JobSource::Rewarm
                        || !j.regions.iter().any(|r| busy.contains(&r)))
            }) else {
                return;
            };
            (job.id, job.spec.clone(), job.regions.clone())
        };
        let urls = match self.resolve_urls(&spec, &regions).await {
            Ok(u) if u.is_empty() => Err("the job's sources hold no URLs".to_owned()),
            other => other,
        };
        let urls = match urls {
            Ok(u) => u,
            Err(e) => return self.fail(id, e),
        };
        let variations: Vec<Vec<(String, String)>> = spec
            .variations
            .as_ref()
            .unwrap_or(&self.config.variations)
            .iter()
            .filter_map(|v| warmer::engine::parse_variation(v).ok())
            .collect();
        let job = {
            let inner = self.lock();
            let Some(mut job) = inner
                .jobs
                .get(&id)
                .filter(|j| j.state == JobState::Queued)
                .cloned()
            else {
                return; // cancelled meanwhile
            };
            let edges: BTreeMap<String, EdgeWork> = inner
                .sessions
                .iter()
                .filter(|(_, (r, _))| regions.contains(r))
                .map(|(e, (r, _))| {
                    (
                        e.clone(),
                        EdgeWork {
                            region: r.clone(),
                            ..EdgeWork::default()
                        },
                    )
                })
                .collect();
            if edges.is_empty() {
                drop(inner);
                return self.fail(
                    id,
                    "no warm-capable edge is connected in the target regions".into(),
                );
            }
            let tiered = spec.tiered.unwrap_or(self.config.shield.is_some());
            job.shield = self
                .config
                .shield
                .clone()
                .filter(|s| tiered && edges.values().any(|w| &w.region == s));
            job.urls = urls.len();
            job.per_shard = self.config.shard_urls;
            job.shards = u32::try_from(urls.len().div_ceil(job.per_shard)).unwrap_or(u32::MAX);
            job.variations = variations;
            job.host = spec.host.clone().or_else(|| self.config.host.clone());
            job.want_tags = spec.rewarm.unwrap_or(self.config.rewarm_after_purge);
            job.edges = edges;
            job.state = JobState::Running;
            job.started_ms = Some(crate::clock::now_ms());
            job
        };
        // The shards are durable before any session can be handed one.
        if let Err(e) = self.store.put_shards(&job, &urls) {
            return self.fail(id, format!("cannot store the job's shards: {e}"));
        }
        {
            let mut inner = self.lock();
            match inner.jobs.get_mut(&id) {
                Some(current) if current.state == JobState::Queued => *current = job.clone(),
                _ => {
                    // Cancelled while its shards were being written.
                    drop(inner);
                    let _ = self.store.drop_shards(id);
                    return;
                }
            }
            inner
                .aimd
                .insert(id, Aimd::new(job.budget, slow(&self.config)));
        }
        tracing::info!(
            job_id = id,
            urls = job.urls,
            shards = job.shards,
            edges = job.edges.len(),
            tiered = job.shield.is_some(),
            budget = job.budget,
            "warm job running"
        );
        self.bump();
    }

    /// The job's URLs from its sources, de-duplicated, sitemap priority order first.
    async fn resolve_urls(
        &self,
        spec: &JobSpec,
        regions: &[String],
    ) -> Result<Vec<String>, String> {
        let mut urls = Vec::new();
        if let Some(sitemap) = &spec.sitemap {
            let limits = warmer::sitemap::Limits {
                max_total_urls: self.config.max_urls,
                ..warmer::sitemap::Limits::default()
            };
            let timeout = Duration::from_millis(self.config.timeout_ms);
            urls = warmer::engine::collect_urls(sitemap, &limits, timeout)
                .await
                .map_err(|e| e.to_string())?;
        }
        urls.extend(spec.urls.iter().cloned());
        if let Some(n) = spec.top {
            for list in self.top(regions, n).into_values() {
                urls.extend(list.into_iter().map(|(u, _)| u));
            }
        }
        warmer::engine::dedup(&mut urls, |u| u);
        if urls.len() > self.config.max_urls {
            return Err(format!(
                "the job lists {} URLs; warm.max_urls is {}",
                urls.len(),
                self.config.max_urls
            ));
        }
        Ok(urls)
    }
}

/// What every shard of the running job carries for one edge.
struct ShardSpec {
    rate: f64,
    concurrency: u32,
    host: String,
    variations: Vec<Vec<(String, String)>>,
    refresh: bool,
    want_tags: bool,
}

fn slow(config: &WarmConfig) -> Duration {
    Duration::from_millis(config.slow_ttfb_ms)
}

/// `host/path` as varnishncsa prints it → `http://host/path` (`-` host: the configured
/// one).
fn absolute(url: &str, default_host: Option<&str>) -> Option<String> {
    let slash = url.find('/')?;
    let (host, path) = url.split_at(slash);
    let host = if host.is_empty() || host == "-" {
        default_host?
    } else {
        host
    };
    Some(format!("http://{host}{path}"))
}

#[cfg(test)]
mod tests;
