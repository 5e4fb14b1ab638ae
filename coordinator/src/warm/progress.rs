//! Progress: an edge's report of a shard, the fetch totals per region, and the edges a
//! job stops waiting for.
//!
//! A report ([`Warm::on_progress`]) marks the shard done for that edge, durably, feeds
//! the job's budget controller and the tag index, and may end the job. An edge is
//! dropped from a job when it is done in name only (every fetch failed), after
//! `FAILED_SHARDS_TO_DROP` shards in a row that failed every fetch, or when it has been
//! disconnected or idle past its timeout ([`Warm::drop_stuck_edges`]); a job whose edges
//! are all done or dropped ends. The ETA per region is the job view's
//! ([`super::job::JobView`]), from the counts kept here.

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

use daemon::sync::Recover;
use proto::edge::WarmProgress;

use super::job::{EdgeWork, Job, JobState};
use super::metrics::FetchTotals;
use super::tags::Profile;
use super::{Held, Warm};

/// Shards in a row that failed every fetch before an edge is dropped from a job.
const FAILED_SHARDS_TO_DROP: u32 = 3;

/// Per running job and edge, when it last did something; fetch totals per region.
#[derive(Debug, Default)]
pub(super) struct Progress {
    /// Per running job and edge: the last shard handed out or reported, and how many
    /// reported shards in a row failed every fetch (a dead varnish, say).
    pub(super) activity: HashMap<(u64, String), (Instant, u32)>,
    /// Fetch results per region (since coordinator start).
    pub(super) totals: BTreeMap<String, FetchTotals>,
}

/// Per origin-bound region (`*`: a tiered job's shield, which every region depends on),
/// when a shard last failed every fetch with the origin's 5xx (or a copy still stale),
/// and its error; a shard fetched without one clears it. Its own lock, a leaf taken alone
/// or last: the monitor reads it and must never wait on a job's locks.
pub(super) type OriginFailing = HashMap<String, (Instant, String)>;

/// How long a failing shard says the origin is in trouble, without a newer success.
const ORIGIN_FAILING_FOR: Duration = Duration::from_secs(60);

impl Progress {
    /// Notes that `edge` did something for job `id` now.
    pub(super) fn touch(&mut self, id: u64, edge: &str) {
        let slot = self
            .activity
            .entry((id, edge.to_owned()))
            .or_insert((Instant::now(), 0));
        slot.0 = Instant::now();
    }

    /// Counts a report for job `id` on `edge`: returns how many shards in a row have
    /// now failed every fetch there.
    fn streak(&mut self, id: u64, edge: &str, failed_all: bool) -> u32 {
        self.touch(id, edge);
        self.activity
            .get_mut(&(id, edge.to_owned()))
            .map(|(_, n)| {
                *n = if failed_all { *n + 1 } else { 0 };
                *n
            })
            .unwrap_or(0)
    }

    /// Adds a report's fetches to `region`'s totals.
    fn count(&mut self, region: &str, p: &WarmProgress) {
        let t = self.totals.entry(region.to_owned()).or_default();
        t.fetched += u64::from(p.fetched);
        t.hits += u64::from(p.hits);
        t.misses += u64::from(p.misses);
        t.errors += u64::from(p.errors);
    }

    /// Drops job `id`'s activity, which ended.
    pub(super) fn forget(&mut self, id: u64) {
        self.activity.retain(|(j, _), _| *j != id);
    }
}

impl Held<'_> {
    /// Takes `edge` out of job `id` with `reason`: its shards are no longer handed out or
    /// waited for. Returns the edge's record to store.
    fn drop_edge(&mut self, id: u64, edge: &str, reason: String) -> Option<EdgeWork> {
        let work = self.queue.jobs.get_mut(&id)?.edges.get_mut(edge)?;
        tracing::warn!(job_id = id, edge, region = %work.region, reason = %reason,
            "edge dropped from a warm job");
        work.dropped = Some(reason);
        let work = work.clone();
        self.dispatch.retract(edge, id);
        self.progress.activity.remove(&(id, edge.to_owned()));
        Some(work)
    }
}

impl Warm {
    /// Why warm fetches from the origin fail from `region` now (or from the shield every
    /// region depends on), if they do.
    pub fn origin_failing(&self, region: &str) -> Option<String> {
        let failing = self.origin_failing.locked();
        [region, "*"]
            .iter()
            .filter_map(|k| failing.get(*k))
            .filter(|(at, _)| at.elapsed() < ORIGIN_FAILING_FOR)
            .map(|(_, why)| {
                if why.is_empty() {
                    "no answer".to_owned()
                } else {
                    why.clone()
                }
            })
            .next()
    }

    /// An edge reported a shard.
    pub fn on_progress(&self, edge: &str, session: u64, p: WarmProgress) {
        let persist = {
            let mut held = self.hold();
            if !held.dispatch.current(edge, session) {
                return;
            }
            let Some(slot) = held.dispatch.in_flight.get_mut(edge) else {
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
            let Some(job) = held
                .queue
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
            held.progress.count(&region, &p);
            let origin_bound = job.shield.as_ref().is_none_or(|s| s == &region);
            if origin_bound {
                let key = if job.shield.is_some() {
                    "*"
                } else {
                    region.as_str()
                };
                let mut failing = self.origin_failing.locked();
                if p.fetched == 0 && p.throttled > 0 {
                    let why = p.first_error.chars().take(200).collect();
                    failing.insert(key.to_owned(), (Instant::now(), why));
                } else if p.fetched > 0 && p.throttled == 0 {
                    failing.remove(key);
                }
            }
            if let Some(rate) = held.budget.rate_of(job.id) {
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
                            rate,
                            "origin overloaded; warming slows down"
                        );
                    }
                    held.budget.observe(job.id, overloaded);
                }
            }
            if job.want_tags {
                let profile = Profile {
                    host: job.host.clone(),
                    variations: job.variations.clone(),
                };
                let mut tags = self.tags();
                for t in p.tags.iter().take(self.config.shard_urls) {
                    tags.add(&profile, &t.url, &t.tags);
                }
            }
            let job_id = job.id;
            // A shard whose every fetch failed (a dead varnish answers nothing): three in
            // a row and the edge is dropped from the job instead of burning through it.
            let failed_all = p.fetched == 0 && p.errors > 0;
            let streak = held.progress.streak(job_id, edge, failed_all);
            let mut work = held
                .queue
                .jobs
                .get(&job_id)
                .and_then(|j| j.edges.get(edge))
                .cloned()
                .unwrap_or_default();
            let reported_all = held
                .queue
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
            if let Some(w) = reason.and_then(|r| held.drop_edge(job_id, edge, r)) {
                work = w;
            }
            let finished = held.end_if_done(job_id);
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
            let mut held = self.hold();
            let now = Instant::now();
            let mut stuck = Vec::new();
            for job in held.queue.running() {
                let per_edge = job
                    .edges
                    .values()
                    .filter(|w| !job.edge_done(w))
                    .count()
                    .max(1);
                let rate = held.budget.rate_of(job.id).unwrap_or(job.budget) / per_edge as f64;
                let shard_s = job.shard_fetches(0) as f64 / rate.max(0.01);
                let limit = timeout.max(Duration::from_secs_f64((shard_s * 3.0).min(3600.0)));
                for (edge, w) in &job.edges {
                    if job.edge_done(w) {
                        continue;
                    }
                    let since = held
                        .progress
                        .activity
                        .entry((job.id, edge.clone()))
                        .or_insert((now, 0))
                        .0;
                    let idle = now.duration_since(since);
                    if idle < limit {
                        continue;
                    }
                    let connected = held.dispatch.sessions.contains_key(edge);
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
                if let Some(w) = held.drop_edge(job_id, &edge, reason) {
                    stored.push((job_id, edge, w));
                }
                if let Some(job) = held.end_if_done(job_id) {
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
}
