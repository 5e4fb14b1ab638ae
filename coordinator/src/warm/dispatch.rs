//! Handing shards to sessions, within the origin budget.
//!
//! Dispatch is pull-based: each warm-capable session's loop asks [`Warm::next_for`], which
//! hands the edge at most [`IN_FLIGHT`] shards it has not done of every running job it
//! takes part in (a satellite only those its shield has done), each carrying the edge's
//! rate, plus the rate changes and cancels due to it. `Dispatch` keeps which sessions are
//! connected and what is out on them; `Budget` keeps one AIMD controller per running job,
//! whose rate is split among the origin-bound edges still working, so the sum never
//! exceeds the job's budget.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use proto::edge::{coordinator_message::Msg, Header, Variation, WarmCancel, WarmRate, WarmShard};
use warmer::pace::Aimd;

use super::config::WarmConfig;
use super::job::{EdgeWork, Job, JobSource};
use super::{Held, Warm};

/// Shards handed to one edge at a time.
pub const IN_FLIGHT: usize = 2;
/// Session numbers from here up stand for sessions another coordinator of the cluster
/// holds (`cluster::warm_relay`); a coordinator numbers its own from 1.
pub const REMOTE_SESSIONS: u64 = 1 << 62;

/// The warm-capable sessions and what is out on them.
#[derive(Debug, Default)]
pub(super) struct Dispatch {
    /// Warm-capable edges connected now: edge → (region, session).
    pub(super) sessions: HashMap<String, (String, u64)>,
    /// Shards out on an edge's current session: edge → (job, shard).
    pub(super) in_flight: HashMap<String, Vec<(u64, u32)>>,
    /// The rate last sent to each edge, per job.
    pub(super) sent_rate: HashMap<(String, u64), f64>,
    /// Jobs to tell an edge to drop.
    cancels: HashMap<String, Vec<u64>>,
    /// Per edge and job: a shard below which all are done.
    pub(super) hints: HashMap<(String, u64), u32>,
    /// Messages the cluster's leader handed out for this coordinator's sessions (a
    /// follower), per edge: sent by the session's warm loop like its own.
    forwarded: HashMap<String, (u64, Vec<Msg>)>,
}

impl Dispatch {
    /// Whether `session` is `edge`'s current one.
    pub(super) fn current(&self, edge: &str, session: u64) -> bool {
        self.sessions.get(edge).is_some_and(|(_, s)| *s == session)
    }

    /// The connected edges of `regions`: (edge, region).
    pub(super) fn sessions_in<'a>(
        &'a self,
        regions: &'a [String],
    ) -> impl Iterator<Item = (String, String)> + 'a {
        self.sessions
            .iter()
            .filter(|(_, (r, _))| regions.contains(r))
            .map(|(e, (r, _))| (e.clone(), r.clone()))
    }

    /// Takes job `id`'s shards back from `edge`, which is told to drop the job if it
    /// held any.
    pub(super) fn retract(&mut self, edge: &str, id: u64) {
        if let Some(slot) = self.in_flight.get_mut(edge) {
            let had = slot.iter().any(|(j, _)| *j == id);
            slot.retain(|(j, _)| *j != id);
            if had {
                self.cancels.entry(edge.to_owned()).or_default().push(id);
            }
        }
    }

    /// [`Self::retract`] from every edge.
    pub(super) fn retract_everywhere(&mut self, id: u64) {
        let holders: Vec<String> = self
            .in_flight
            .iter_mut()
            .filter_map(|(edge, shards)| {
                let had = shards.iter().any(|(j, _)| *j == id);
                shards.retain(|(j, _)| *j != id);
                had.then(|| edge.clone())
            })
            .collect();
        for edge in holders {
            self.cancels.entry(edge).or_default().push(id);
        }
    }

    /// Drops what is kept per edge for job `id`, which ended.
    pub(super) fn forget(&mut self, id: u64) {
        self.hints.retain(|(_, j), _| *j != id);
        self.sent_rate.retain(|(_, j), _| *j != id);
    }

    /// Nothing is out any more (the jobs were dropped).
    pub(super) fn clear(&mut self) {
        self.in_flight.clear();
        self.sent_rate.clear();
    }
}

/// Each running job's origin budget: one AIMD controller per job.
#[derive(Debug, Default)]
pub(super) struct Budget {
    pub(super) aimd: HashMap<u64, Aimd>,
}

impl Budget {
    /// Job `id` runs (or resumes) with `budget` requests/s.
    pub(super) fn start(&mut self, id: u64, budget: f64, config: &WarmConfig) {
        self.aimd.insert(
            id,
            Aimd::new(budget, Duration::from_millis(config.slow_ttfb_ms)),
        );
    }

    /// The origin rate job `id`'s controller allows now, if it runs.
    pub(super) fn rate_of(&self, id: u64) -> Option<f64> {
        self.aimd.get(&id).map(Aimd::rate)
    }

    /// The rate every running job may use now, summed.
    pub(super) fn total(&self) -> f64 {
        self.aimd.values().map(Aimd::rate).sum()
    }

    /// Feeds job `id`'s controller one report: `overloaded` halves the rate.
    pub(super) fn observe(&mut self, id: u64, overloaded: bool) {
        if let Some(aimd) = self.aimd.get_mut(&id) {
            aimd.observe(overloaded, Instant::now());
        }
    }

    pub(super) fn forget(&mut self, id: u64) {
        self.aimd.remove(&id);
    }

    pub(super) fn clear(&mut self) {
        self.aimd.clear();
    }
}

/// What every shard of the running job carries for one edge.
struct ShardSpec {
    rate: f64,
    concurrency: u32,
    host: String,
    variations: Vec<Vec<(String, String)>>,
    refresh: bool,
    only_stale: bool,
    want_tags: bool,
}

/// A refresh's fetches in flight on an edge at `rate`: as many as a second of renders at
/// that rate, at least `[warm] concurrency`, at most 64.
fn refresh_concurrency(rate: f64, configured: u32) -> u32 {
    let per_second = if rate.is_finite() {
        rate.ceil().clamp(1.0, 64.0) as u32
    } else {
        1
    };
    per_second.max(configured).min(64)
}

/// How far back shoppers' background fetches are counted against a refresh's budget.
const BGFETCH_WINDOW_MS: u64 = 5_000;
/// The least of its budget a refresh keeps however busy the background fetches are.
const MIN_REFRESH_SHARE: f64 = 0.2;

impl Warm {
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
        let mut queue = self.queue();
        let mut dispatch = self.dispatch();
        let local_here = dispatch
            .sessions
            .get(edge)
            .is_some_and(|(_, s)| *s < REMOTE_SESSIONS);
        if session >= REMOTE_SESSIONS && local_here {
            return false;
        }
        dispatch
            .sessions
            .insert(edge.to_owned(), (region.to_owned(), session));
        dispatch.in_flight.remove(edge);
        dispatch.sent_rate.retain(|(e, _), _| e != edge);
        drop(dispatch);
        let joined: Vec<(u64, EdgeWork)> = queue
            .jobs
            .values_mut()
            .filter(|j| j.state == super::job::JobState::Running)
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
        drop(queue);
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
        let mut dispatch = self.dispatch();
        if dispatch.current(edge, session) {
            dispatch.sessions.remove(edge);
            dispatch.in_flight.remove(edge);
            dispatch.sent_rate.retain(|(e, _), _| e != edge);
            dispatch.cancels.remove(edge);
            dispatch.forwarded.remove(edge);
        }
        drop(dispatch);
        self.bump();
    }

    /// This coordinator's own warm-capable sessions (`(edge, region, session)`), not
    /// those standing for another coordinator's.
    pub fn own_sessions(&self) -> Vec<(String, String, u64)> {
        self.dispatch()
            .sessions
            .iter()
            .filter(|(_, (_, s))| *s < REMOTE_SESSIONS)
            .map(|(e, (r, s))| (e.clone(), r.clone(), *s))
            .collect()
    }

    /// Queues `msg`, which the cluster's leader handed out for `edge`'s `session`, for
    /// that session's warm loop; false (dropped) when the session is not current.
    pub fn forward(&self, edge: &str, session: u64, msg: Msg) -> bool {
        let mut dispatch = self.dispatch();
        if !dispatch.current(edge, session) {
            return false;
        }
        let slot = dispatch
            .forwarded
            .entry(edge.to_owned())
            .or_insert((session, Vec::new()));
        if slot.0 != session {
            *slot = (session, Vec::new());
        }
        slot.1.push(msg);
        drop(dispatch);
        self.bump();
        true
    }

    /// What this edge's session should send now: cancels, rate changes, new shards of
    /// every running job it takes part in.
    pub fn next_for(&self, edge: &str, session: u64) -> Vec<Msg> {
        let mut out = Vec::new();
        let mut picks: Vec<(u64, u32, Arc<ShardSpec>)> = Vec::new();
        {
            let mut held = self.hold();
            if !held.dispatch.current(edge, session) {
                return out;
            }
            if let Some((s, msgs)) = held.dispatch.forwarded.remove(edge) {
                if s == session {
                    out.extend(msgs);
                }
            }
            for job_id in held.dispatch.cancels.remove(edge).unwrap_or_default() {
                out.push(Msg::WarmCancel(WarmCancel { job_id }));
            }
            let mut jobs: Vec<(bool, u64)> = held
                .queue
                .running()
                .filter(|j| j.edges.get(edge).is_some_and(|w| w.dropped.is_none()))
                .map(|j| (j.source != JobSource::Refresh, j.id))
                .collect();
            // A refresh goes first, and while one has work on this edge no other job's
            // shard is handed out there: shoppers are being served stale pages, and the
            // origin budget is the refresh's.
            jobs.sort();
            let refreshing = jobs.iter().any(|(other, id)| {
                !other
                    && held
                        .queue
                        .jobs
                        .get(id)
                        .is_some_and(|j| j.edges.get(edge).is_some_and(|w| !j.edge_done(w)))
            });
            for (other, job_id) in jobs {
                if other && refreshing {
                    // Paused, not stuck.
                    held.progress.touch(job_id, edge);
                    continue;
                }
                self.next_of_job(&mut held, edge, job_id, &mut out, &mut picks);
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
        held: &mut Held<'_>,
        edge: &str,
        job_id: u64,
        out: &mut Vec<Msg>,
        picks: &mut Vec<(u64, u32, Arc<ShardSpec>)>,
    ) {
        let Some(job) = held.queue.jobs.get(&job_id) else {
            return;
        };
        let Some(work) = job.edges.get(edge) else {
            return;
        };
        if job.after_seq > 0 && self.edges.applied_seq(edge).unwrap_or(0) < job.after_seq {
            return;
        }
        let rate = self.share(&held.budget, job, &work.region);
        let dispatch = &mut *held.dispatch;
        let busy: Vec<u32> = dispatch
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
        let from = dispatch.hints.get(&key).copied().unwrap_or(0);
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
                concurrency: job.spec.concurrency.unwrap_or_else(|| {
                    // A refresh races the bound: enough fetches in flight for its rate
                    // with renders of up to a second (the rate still paces the starts).
                    if job.source == JobSource::Refresh {
                        refresh_concurrency(rate, self.config.concurrency)
                    } else {
                        self.config.concurrency
                    }
                }),
                host: job.host.clone().unwrap_or_default(),
                variations: job.variations.clone(),
                refresh: job.spec.refresh,
                only_stale: job.spec.only_stale,
                want_tags: job.want_tags,
            });
            picks.extend(mine.iter().map(|s| (job_id, *s, spec.clone())));
        }
        let last = dispatch.sent_rate.get(&key).copied();
        let rate_changed = last.is_none_or(|r| (r - rate).abs() > rate * 0.05);
        if rate_changed {
            if !busy.is_empty() {
                out.push(Msg::WarmRate(WarmRate { job_id, rate }));
            }
            dispatch.sent_rate.insert(key.clone(), rate);
        }
        if let Some(h) = first_open {
            dispatch.hints.insert(key, h);
        }
        if !mine.is_empty() {
            held.progress.touch(job_id, edge);
        }
        let slot = dispatch.in_flight.entry(edge.to_owned()).or_default();
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
            only_stale: spec.only_stale,
            token: self.token.clone(),
            want_tags: spec.want_tags,
            slow_ttfb_ms: u32::try_from(self.config.slow_ttfb_ms).unwrap_or(u32::MAX),
        }
    }

    /// This edge's rate: its share of the controller's rate among the origin-bound edges
    /// still working, or the satellite rate.
    fn share(&self, budget: &Budget, job: &Job, region: &str) -> f64 {
        if job.shield.as_deref().is_some_and(|s| s != region) {
            return self.config.satellite_rate;
        }
        let mut rate = budget.rate_of(job.id).unwrap_or(job.budget);
        // A refresh shares the origin with shoppers' background fetches (their stale hits
        // in the origin-bound regions): what they took in the last seconds is not its.
        if let (JobSource::Refresh, Some(traffic)) = (&job.source, self.traffic.get()) {
            let bound: Vec<&str> = match &job.shield {
                Some(s) => vec![s.as_str()],
                None => job.regions.iter().map(String::as_str).collect(),
            };
            let taken = traffic.bgfetch_rate(&bound, crate::clock::now_ms(), BGFETCH_WINDOW_MS);
            rate = (rate - taken).max(rate * MIN_REFRESH_SHARE);
        }
        let working = job
            .edges
            .values()
            .filter(|w| job.shield.as_ref().is_none_or(|s| s == &w.region) && !job.edge_done(w))
            .count()
            .max(1);
        rate / working as f64
    }
}

#[cfg(test)]
mod tests {
    use super::refresh_concurrency;

    #[test]
    fn a_refresh_keeps_enough_fetches_in_flight_for_its_rate() {
        // 60 renders/s of 300 ms need 18 in flight; four would cap it at 13/s.
        assert_eq!(refresh_concurrency(60.0, 4), 60);
        assert_eq!(refresh_concurrency(2.5, 4), 4);
        assert_eq!(refresh_concurrency(500.0, 4), 64);
        assert_eq!(refresh_concurrency(f64::NAN, 8), 8);
    }
}
