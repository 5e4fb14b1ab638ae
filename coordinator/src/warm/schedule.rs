//! What starts warm jobs besides the API: the queue itself, `[[warm.schedule]]` cron
//! entries, and tag purges (re-warm).
//!
//! [`Warm::run`] ticks every [`TICK`]: it starts the next queued job when none runs,
//! queues a job for every schedule whose next time (cron: 5 fields, or 6 with seconds
//! first; UTC) has come (a
//! schedule whose previous job is still queued or running is skipped: a slow nightly
//! warm never piles up), and follows the purge log. Tag purges accumulate until
//! `rewarm_debounce_ms` pass without one (at most four times that in a steady stream), so
//! a reindex that purges a thousand tags in a burst becomes one re-warm pass:
//! [`Warm::rewarm`] queues one job per fetch profile for the URLs the [`super::tags`]
//! index knows carry the purged tags. In refresh mode soft tag purges go to
//! [`Warm::refresh`] instead, after a much shorter quiet time (see [`super::refresh`]),
//! and each tick closes the refreshes whose deadline passed.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use proto::edge::purge_entry::Op;
use tokio_util::sync::CancellationToken;

use super::config::ScheduleConfig;
use super::job::{JobSource, JobState};
use super::refresh::PendingRefresh;
use super::Warm;
use crate::purge::log::PurgeLog;

/// How often the schedule loop looks.
pub const TICK: Duration = Duration::from_millis(250);
/// Most tags one re-warm pass collects (a full reindex is a warm job, not a re-warm).
const MAX_PENDING_TAGS: usize = 100_000;

/// Tag purges waiting for the quiet time.
#[derive(Debug, Default)]
struct Pending {
    tags: BTreeSet<String>,
    last_seq: u64,
    first_at: Option<Instant>,
    last_at: Option<Instant>,
}

impl Warm {
    /// Runs the queue, the cron schedules and re-warming until `shutdown`, while `leading`
    /// is true (the cluster's leader; always, embedded), so a cluster runs each job,
    /// schedule and re-warm once.
    pub async fn run(
        self: Arc<Self>,
        log: PurgeLog,
        leading: tokio::sync::watch::Receiver<bool>,
        shutdown: CancellationToken,
    ) {
        let mut crons: Vec<(&ScheduleConfig, croner::Cron, Option<DateTime<Utc>>)> = self
            .config
            .schedule
            .iter()
            .filter_map(|s| {
                let cron = s.cron().ok()?;
                let next = cron.find_next_occurrence(&Utc::now(), false).ok();
                Some((s, cron, next))
            })
            .collect();
        let mut seen_seq = log.head();
        let mut pending = Pending::default();
        let mut refresh = PendingRefresh::default();
        let debounce = Duration::from_millis(self.config.rewarm_debounce_ms);
        let mut tick = tokio::time::interval(TICK);
        let mut led = None;
        let mut was_leading = false;
        let mut relearn: Option<Instant> = None;
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tick.tick() => {}
            }
            // In a cluster the jobs are the leader's: it takes them over from the store
            // when it becomes leader, and a follower holds none (it hands out nothing).
            let leads = *leading.borrow();
            if self.store.is_shared() && led != Some(leads) {
                let result = if leads {
                    self.reload()
                } else {
                    self.forget_jobs()
                };
                match result {
                    Ok(()) => led = Some(leads),
                    Err(e) => tracing::warn!(error = %e, "warm jobs not taken over yet"),
                }
            }
            if !leads {
                seen_seq = log.head();
                was_leading = false;
                continue;
            }
            if !was_leading {
                // A restart or a new leader: its tag index is empty (it is not stored).
                was_leading = true;
                relearn = self.refreshes().then(Instant::now);
            }
            // Give a first warm job the chance to teach the index, and the agents time to
            // report their popular pages.
            if relearn.is_some_and(|t| t.elapsed() >= super::refresh::RELEARN_AFTER)
                && (!self.tags().is_empty() || self.relearn_tags().is_some())
            {
                relearn = None;
            }
            self.drop_stuck_edges();
            self.start_next().await;
            let now = Utc::now();
            for (schedule, cron, next) in crons.iter_mut() {
                if next.is_some_and(|t| t <= now) {
                    *next = cron.find_next_occurrence(&now, false).ok();
                    self.fire(schedule);
                }
            }
            seen_seq = self
                .follow_log(&log, seen_seq, &mut pending, &mut refresh)
                .await;
            if refresh.due() {
                let p = std::mem::take(&mut refresh);
                let tags: Vec<String> = p.tags.into_iter().collect();
                self.refresh(&tags, p.first_seq, p.last_seq, p.purged_ms);
            }
            self.close_deadlines(crate::clock::now_ms());
            let quiet = pending.last_at.is_some_and(|t| t.elapsed() >= debounce);
            let overdue = pending
                .first_at
                .is_some_and(|t| t.elapsed() >= debounce * 4);
            if !pending.tags.is_empty() && (quiet || overdue) {
                let p = std::mem::take(&mut pending);
                let tags: Vec<String> = p.tags.into_iter().collect();
                self.rewarm(&tags, p.last_seq);
            }
        }
    }

    /// Queues the schedule's job unless its previous one is still pending.
    fn fire(&self, s: &ScheduleConfig) {
        let name = s.name.as_str();
        let source = JobSource::Schedule(name.to_owned());
        let busy =
            self.queue().jobs.values().any(|j| {
                j.source == source && matches!(j.state, JobState::Queued | JobState::Running)
            });
        if busy {
            tracing::warn!(
                schedule = name,
                "previous scheduled warm job still pending; skipped"
            );
            return;
        }
        match self.create(s.job.clone(), source) {
            Ok(id) => tracing::info!(schedule = name, job_id = id, "scheduled warm job queued"),
            Err(e) => tracing::error!(schedule = name, error = %e, "scheduled warm job not queued"),
        }
    }

    /// Reads purges after `seen`, collecting their tags; with nothing indexed for re-warm
    /// there is nothing to look up, so it only moves to the head.
    async fn follow_log(
        &self,
        log: &PurgeLog,
        mut seen: u64,
        pending: &mut Pending,
        refresh: &mut PendingRefresh,
    ) -> u64 {
        if self.tags().is_empty() {
            return log.head();
        }
        while seen < log.head() {
            let entries = match log.read_from(seen + 1, 10_000).await {
                Ok(e) if !e.is_empty() => e,
                // Retention moved past us (or the log failed): skip ahead.
                _ => return log.head(),
            };
            for e in &entries {
                seen = e.seq;
                if let Some(Op::Tags(t)) = &e.op {
                    if e.soft && self.refreshes() {
                        if refresh.tags.len() < MAX_PENDING_TAGS {
                            refresh.add(&t.tags, e.seq, e.received_at_us);
                        }
                        continue;
                    }
                    if pending.tags.len() < MAX_PENDING_TAGS {
                        pending.tags.extend(t.tags.iter().cloned());
                    }
                    pending.last_seq = e.seq;
                    let now = Instant::now();
                    pending.first_at.get_or_insert(now);
                    pending.last_at = Some(now);
                }
            }
        }
        seen
    }

    /// Re-warm: queues jobs for the URLs known to carry `tags`, to start on each edge
    /// once it applied purge `after_seq`.
    pub fn rewarm(&self, tags: &[String], after_seq: u64) -> Vec<u64> {
        let groups = self.tags().lookup(tags);
        let mut ids = Vec::new();
        for (profile, urls) in groups {
            let spec = super::refresh::profile_job(&profile, urls);
            if let Err(e) = spec.validate(&self.regions) {
                tracing::warn!(error = %e, "re-warm skipped");
                continue;
            }
            match self.create_after(spec, JobSource::Rewarm, after_seq, None) {
                Ok(id) => ids.push(id),
                Err(e) => tracing::error!(error = %e, "cannot queue a re-warm"),
            }
        }
        if !ids.is_empty() {
            tracing::info!(tags = tags.len(), jobs = ?ids, after_seq, "re-warming purged URLs");
        }
        ids
    }
}
