//! The job queue: jobs created, cancelled and failed, their states (queued → running →
//! done, failed or cancelled), the store records that make each change durable, and the
//! start of the next queued job (its URLs resolved, its shards stored, its edges fixed).
//!
//! A job waits only for the regions a running job is still warming: jobs for other
//! regions, and re-warms (small, and shoppers are waiting for them), start at once.
//! Finished jobs stay listed up to `KEEP_FINISHED`; older ones stay in the store only.

use std::collections::BTreeMap;
use std::time::Duration;

use super::job::{EdgeWork, Job, JobSource, JobSpec, JobState, JobView};
use super::store::WarmStoreError;
use super::{Warm, WarmError};

/// Finished jobs kept in memory (and listed); older ones stay in the store only.
const KEEP_FINISHED: usize = 200;

/// The jobs in memory, by id.
#[derive(Debug, Default)]
pub(super) struct Queue {
    pub(super) jobs: BTreeMap<u64, Job>,
    next_id: u64,
    /// Whether the jobs are held here (loaded from the store); a follower, and a new
    /// leader until it has read them, holds none and hands out no id (its `next_id`
    /// could be one the last leader gave a job already).
    holds: bool,
}

impl Queue {
    /// The jobs that run now, oldest first.
    pub(super) fn running(&self) -> impl Iterator<Item = &Job> {
        self.jobs.values().filter(|j| j.state == JobState::Running)
    }

    /// Drops every job (a follower holds none).
    pub(super) fn clear(&mut self) {
        self.jobs.clear();
        self.holds = false;
    }

    /// [`WarmError::TakingOver`] unless the jobs are held here.
    fn held(&self) -> Result<(), WarmError> {
        if self.holds {
            Ok(())
        } else {
            Err(WarmError::TakingOver)
        }
    }

    /// Puts the stored jobs in (the newest finished ones, every unfinished one); returns
    /// the running ones with their budgets: they resume.
    pub(super) fn load(&mut self, all: Vec<Job>) -> Vec<(u64, f64)> {
        self.holds = true;
        self.next_id = all.iter().map(|j| j.id).max().unwrap_or(0) + 1;
        let finished: Vec<u64> = all
            .iter()
            .filter(|j| j.state.is_final())
            .map(|j| j.id)
            .collect();
        let keep_from = finished.len().saturating_sub(KEEP_FINISHED);
        let mut running = Vec::new();
        for job in all {
            if job.state.is_final() && finished[..keep_from].contains(&job.id) {
                continue;
            }
            if job.state == JobState::Running {
                tracing::info!(job_id = job.id, "resuming warm job");
                running.push((job.id, job.budget));
            }
            self.jobs.insert(job.id, job);
        }
        running
    }

    /// Ends job `id` if every edge is done or dropped: `done`, or `failed` when every
    /// edge was dropped. Returns the job record to store (without its edges).
    pub(super) fn finish_if_done(&mut self, id: u64) -> Option<Job> {
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
        Some(meta)
    }
}

impl Warm {
    /// Holds no job (a follower: the leader runs them).
    pub fn forget_jobs(&self) -> Result<(), WarmStoreError> {
        self.hold().forget_all();
        self.bump();
        Ok(())
    }

    /// Reads the jobs again from the store (a coordinator that has just become the
    /// cluster's leader takes over what the last one left); shards that were out on
    /// another coordinator's sessions are handed out again.
    pub fn reload(&self) -> Result<(), WarmStoreError> {
        // Read with no lock held: a slow etcd holds up no reader of the queue.
        let jobs = self.store.jobs()?;
        let mut held = self.hold();
        held.forget_all();
        held.load(jobs, &self.config);
        drop(held);
        self.bump();
        Ok(())
    }

    /// Queues a job; returns its id.
    pub fn create(&self, spec: JobSpec, origin: JobSource) -> Result<u64, WarmError> {
        spec.validate(&self.regions).map_err(WarmError::Invalid)?;
        self.create_after(spec, origin, 0, None)
    }

    /// Queues a job that starts on each edge once it applied purge `after_seq` (a
    /// refresh carries what it refreshes).
    pub(super) fn create_after(
        &self,
        spec: JobSpec,
        source: JobSource,
        after_seq: u64,
        refresh: Option<super::job::RefreshInfo>,
    ) -> Result<u64, WarmError> {
        let budget = spec
            .rate
            .unwrap_or(self.config.origin_budget_rps)
            .min(self.config.origin_budget_rps);
        let regions = match &spec.regions {
            Some(r) if !r.iter().any(|r| r == "all") => r.clone(),
            _ => self.regions.clone(),
        };
        // The id is taken under the lock, the job stored without it (an etcd call that
        // hangs must not hold up every reader of the queue), then made visible: durable
        // before anything can see it. A job whose store fails leaves a gap in the ids.
        let id = {
            let mut queue = self.queue();
            queue.held()?;
            queue.next_id += 1;
            queue.next_id - 1
        };
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
            refresh,
            merged_into: None,
            edges: BTreeMap::new(),
        };
        self.store.put_job(&job)?;
        tracing::info!(job_id = id, source = ?job.source, "warm job queued");
        {
            // Unless the jobs were let go meanwhile (this coordinator stopped leading:
            // the next leader reads the job from the store), and past any reload.
            let mut queue = self.queue();
            if queue.holds {
                queue.next_id = queue.next_id.max(id + 1);
                queue.jobs.insert(id, job);
            }
        }
        self.bump();
        Ok(id)
    }

    /// Cancels a queued or running job.
    pub fn cancel(&self, id: u64) -> Result<JobView, WarmError> {
        let (view, cancelled) = {
            let mut held = self.hold();
            held.queue.held()?;
            let Some(job) = held.queue.jobs.get_mut(&id) else {
                return Err(WarmError::NotFound(id));
            };
            let cancelled = if job.state.is_final() {
                None
            } else {
                job.state = JobState::Cancelled;
                job.finished_ms = Some(crate::clock::now_ms());
                let job = job.clone();
                held.dispatch.retract_everywhere(id);
                held.forget(id);
                Some(job)
            };
            let view = JobView::of(&held.queue.jobs[&id], None, crate::clock::now_ms());
            (view, cancelled)
        };
        self.bump();
        // Stored with no lock held (see `create_after`).
        if let Some(job) = cancelled {
            self.store.put_job(&job)?;
            tracing::info!(job_id = id, "warm job cancelled");
            let _ = self.store.drop_shards(id);
        }
        Ok(view)
    }

    pub fn view(&self, id: u64) -> Option<JobView> {
        let queue = self.queue();
        let budget = self.budget();
        queue
            .jobs
            .get(&id)
            .map(|j| JobView::of(j, budget.rate_of(id), crate::clock::now_ms()))
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
        let queue = self.queue();
        let budget = self.budget();
        let now = crate::clock::now_ms();
        queue
            .jobs
            .values()
            .rev()
            .take(limit)
            .map(|j| JobView::of(j, budget.rate_of(j.id), now))
            .collect()
    }

    /// Ends job `id` as failed with `error`, unless it has ended already.
    pub(super) fn fail(&self, id: u64, error: String) {
        let job = {
            let mut held = self.hold();
            let Some(job) = held.queue.jobs.get_mut(&id) else {
                return;
            };
            if job.state.is_final() {
                return;
            }
            job.state = JobState::Failed;
            job.error = Some(error);
            job.finished_ms = Some(crate::clock::now_ms());
            let job = job.clone();
            held.forget(id);
            job
        };
        tracing::warn!(job_id = id, error = ?job.error, "warm job failed");
        let _ = self.store.put_job(&job);
        let _ = self.store.drop_shards(id);
        self.bump();
    }

    /// Starts the oldest queued job that may start: resolves its URLs and edges.
    pub(crate) async fn start_next(&self) {
        let (id, spec, regions) = {
            let queue = self.queue();
            // A job waits only for regions a running job is still warming: jobs for other
            // regions, for regions whose part is done (a stuck edge elsewhere holds nobody),
            // and re-warms (small, and shoppers are waiting for them) start at once.
            let busy: Vec<&String> = queue
                .running()
                .flat_map(|j| {
                    j.edges
                        .values()
                        .filter(|w| !j.edge_done(w))
                        .map(|w| &w.region)
                })
                .collect();
            let Some(job) = queue.jobs.values().find(|j| {
                j.state == JobState::Queued
                    && (matches!(j.source, JobSource::Rewarm | JobSource::Refresh)
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
            let queue = self.queue();
            let Some(mut job) = queue
                .jobs
                .get(&id)
                .filter(|j| j.state == JobState::Queued)
                .cloned()
            else {
                return; // cancelled meanwhile
            };
            let edges: BTreeMap<String, EdgeWork> = self
                .dispatch()
                .sessions_in(&regions)
                .map(|(edge, region)| {
                    (
                        edge,
                        EdgeWork {
                            region,
                            ..EdgeWork::default()
                        },
                    )
                })
                .collect();
            if edges.is_empty() {
                drop(queue);
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
            // Refresh mode learns every job's tags: a soft purge refreshes what it knows.
            job.want_tags = spec.rewarm.unwrap_or(
                self.config.rewarm_after_purge || self.config.refresh_max_stale_s.is_some(),
            );
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
            let mut queue = self.queue();
            match queue.jobs.get_mut(&id) {
                Some(current) if current.state == JobState::Queued => *current = job.clone(),
                _ => {
                    // Cancelled while its shards were being written.
                    drop(queue);
                    let _ = self.store.drop_shards(id);
                    return;
                }
            }
            self.budget().start(id, job.budget, &self.config);
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
