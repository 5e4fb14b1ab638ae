//! Refresh after a tag purge (`[purge] refresh_tags`): the purged pages stay in every
//! cache, stale, and are re-rendered in place, the most requested first.
//!
//! The listener logs a tag purge soft; agents in xkey mode mark the pages stale
//! (`xkey.softpurge`) and varnish serves the stale copy at once while one background fetch
//! refreshes a page a shopper asks for. The schedule loop collects the soft tag purges
//! (a reindex's burst becomes one refresh after [`QUIET`]) and [`Warm::refresh`] queues one
//! warm job of source `refresh` per fetch profile: the URLs the tag index knows carry
//! the tags, sorted by how often shoppers asked for them (the agents' popular URLs), each
//! fetched with `X-Warm-Refresh: stale` so a page a shopper's background fetch already
//! refreshed is a hit and costs the origin nothing. The job runs like any warm job: on
//! each edge once it applied the purges, shield first and satellites from the shield,
//! within the origin budget, before any other job's shards on that edge.
//!
//! **Merged, not doubled.** A refresh of the same profile that is still queued or
//! running is cancelled and its unfinished pages join the new one, so a second reindex
//! during the first refreshes each page once more at most.
//!
//! **Relearned.** The tag index is not stored: a restarted coordinator, or a new leader,
//! knows no page's tags. A minute later, if no warm job taught it meanwhile and the
//! agents have reported their popular URLs, it queues one
//! job (source `refresh`, no purge) that fetches the most requested pages through one
//! region's varnish with `X-Warm-Refresh: stale`: cached pages answer from the cache
//! (no render), and the index learns their tags again.
//!
//! **Bounded.** A page not refreshed `refresh_max_stale_s` after the purge is no longer
//! served stale (the VCL's `${max_stale_s}`); at that deadline the job's count of pages
//! refreshed everywhere is frozen, and the rest are counted evicted at the bound.

use std::collections::{HashMap, HashSet};

use super::job::{Job, JobSource, JobSpec, JobState, RefreshInfo, RefreshProgress};
use super::store::WarmStoreError;
use super::tags::Profile;
use super::Warm;

/// Quiet time after the last soft tag purge before the refresh is queued (a reindex
/// sends its purges in a burst), and the longest a steady stream delays it.
pub const QUIET: std::time::Duration = std::time::Duration::from_millis(300);
pub const OVERDUE: std::time::Duration = std::time::Duration::from_millis(1500);
/// How long after it starts leading a coordinator with an empty tag index relearns it.
pub const RELEARN_AFTER: std::time::Duration = std::time::Duration::from_secs(60);
/// Most requested pages a relearning job fetches.
const RELEARN_PAGES: usize = 10_000;

impl Warm {
    /// Whether soft tag purges are refreshed (`[purge] refresh_tags`).
    pub fn refreshes(&self) -> bool {
        self.config.refresh_max_stale_s.is_some()
    }

    /// Queues the refresh of the pages known to carry `tags`, purged (soft) by the purges
    /// `first_seq..=last_seq`, the newest received at `purged_ms`; each edge starts once
    /// it applied `last_seq`. Returns the new jobs.
    pub fn refresh(
        &self,
        tags: &[String],
        first_seq: u64,
        last_seq: u64,
        purged_ms: u64,
    ) -> Vec<u64> {
        let Some(max_stale_s) = self.config.refresh_max_stale_s else {
            return Vec::new();
        };
        let groups = self.tags().lookup(tags);
        let rank = self.popularity();
        let mut ids = Vec::new();
        for (profile, urls) in groups {
            let mut spec = JobSpec {
                only_stale: true,
                ..profile_job(&profile, urls)
            };
            let (older, left, first) = self.take_unfinished(&spec);
            spec.urls.extend(left);
            warmer::engine::dedup(&mut spec.urls, |u| u);
            // Most requested first; the rest keep their order.
            spec.urls
                .sort_by_key(|u| std::cmp::Reverse(rank.get(path_of(u)).map_or(0, |r| r.1)));
            if let Err(e) = spec.validate(&self.regions) {
                tracing::warn!(error = %e, "refresh skipped");
                continue;
            }
            let info = RefreshInfo {
                first_seq: first.min(first_seq),
                last_seq,
                purged_ms,
                deadline_ms: purged_ms.saturating_add(max_stale_s.saturating_mul(1000)),
                refreshed_by_deadline: None,
            };
            match self.create_after(spec, JobSource::Refresh, last_seq, Some(info)) {
                Ok(id) => {
                    self.mark_merged(&older, id);
                    ids.push(id);
                }
                Err(e) => tracing::error!(error = %e, "cannot queue a refresh"),
            }
        }
        if !ids.is_empty() {
            tracing::info!(tags = tags.len(), jobs = ?ids, first_seq, last_seq, "refreshing purged pages");
        }
        ids
    }

    /// Queues the job that teaches an empty tag index the most requested pages' tags
    /// again (see the module doc); `None` while no region reported popular URLs.
    pub(super) fn relearn_tags(&self) -> Option<u64> {
        let region = self
            .config
            .shield
            .clone()
            .or_else(|| self.regions.first().cloned())?;
        let mut ranked: Vec<(String, u64)> = self.popularity().into_values().collect();
        if ranked.is_empty() {
            return None;
        }
        ranked.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
        ranked.truncate(RELEARN_PAGES);
        let spec = JobSpec {
            urls: ranked.into_iter().map(|(u, _)| u).collect(),
            regions: Some(vec![region]),
            tiered: Some(false),
            rewarm: Some(true),
            only_stale: true,
            ..JobSpec::default()
        };
        match self.create(spec, JobSource::Refresh) {
            Ok(id) => {
                tracing::info!(job_id = id, "relearning the most requested pages' tags");
                Some(id)
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot queue the tag relearning job");
                None
            }
        }
    }

    /// Per path and query, an absolute URL shoppers asked for and how often, summed over
    /// every region's popular URLs.
    fn popularity(&self) -> HashMap<String, (String, u64)> {
        let mut rank: HashMap<String, (String, u64)> = HashMap::new();
        for list in self.top(&self.regions, usize::MAX).into_values() {
            for (url, count) in list {
                rank.entry(path_of(&url).to_owned())
                    .or_insert_with(|| (url.clone(), 0))
                    .1 += count;
            }
        }
        rank
    }

    /// Cancels the queued or running refreshes fetched like `spec` (host and variations)
    /// and returns their ids, the URLs they had not refreshed on every edge, and the first
    /// purge they covered (`u64::MAX`: none).
    fn take_unfinished(&self, spec: &JobSpec) -> (Vec<u64>, Vec<String>, u64) {
        let unfinished: Vec<(u64, Vec<String>, Vec<u32>, u64)> = {
            let queue = self.queue();
            queue
                .jobs
                .values()
                .filter(|j| {
                    j.source == JobSource::Refresh
                        && j.refresh.is_some()
                        && matches!(j.state, JobState::Queued | JobState::Running)
                        && j.spec.host == spec.host
                        && j.spec.variations == spec.variations
                })
                .map(|j| {
                    let open: Vec<u32> = (0..j.shards)
                        .filter(|s| {
                            j.edges
                                .values()
                                .any(|w| w.dropped.is_none() && !w.is_done(*s))
                        })
                        .collect();
                    let queued = if j.state == JobState::Queued {
                        j.spec.urls.clone()
                    } else {
                        Vec::new()
                    };
                    let first = j.refresh.as_ref().map_or(u64::MAX, |r| r.first_seq);
                    (j.id, queued, open, first)
                })
                .collect()
        };
        let mut ids = Vec::new();
        let mut left = Vec::new();
        let mut first = u64::MAX;
        for (id, queued, open, f) in unfinished {
            left.extend(queued);
            // The store is read with no lock held.
            for shard in open {
                match self.store.shard(id, shard) {
                    Ok(urls) => left.extend(urls),
                    Err(e) => {
                        tracing::warn!(job_id = id, shard, error = %e, "cannot read a refresh shard to merge")
                    }
                }
            }
            if let Err(e) = self.cancel(id) {
                tracing::warn!(job_id = id, error = %e, "cannot cancel a refresh to merge it");
            }
            first = first.min(f);
            ids.push(id);
        }
        (ids, left, first)
    }

    /// Records on the merged refreshes which one took them over, durably.
    fn mark_merged(&self, older: &[u64], into: u64) {
        let mut changed = Vec::new();
        {
            let mut queue = self.queue();
            for id in older {
                if let Some(j) = queue.jobs.get_mut(id) {
                    j.merged_into = Some(into);
                    changed.push(j.clone());
                }
            }
        }
        for j in changed {
            if let Err(e) = self.store.put_job(&j) {
                tracing::warn!(job_id = j.id, error = %e, "cannot store a merged refresh");
            }
        }
    }

    /// Freezes, once each refresh's deadline passed, how many pages it refreshed in
    /// time (the rest were evicted at the bound), and counts them.
    pub(super) fn close_deadlines(&self, now_ms: u64) {
        let mut closed = Vec::new();
        {
            let mut queue = self.queue();
            for j in queue.jobs.values_mut() {
                let due = j.merged_into.is_none()
                    && j.refresh.as_ref().is_some_and(|r| {
                        r.refreshed_by_deadline.is_none() && now_ms >= r.deadline_ms
                    });
                if !due {
                    continue;
                }
                let pages = j.fetches_total();
                let refreshed = if j.state == JobState::Queued {
                    0
                } else {
                    j.fetches_refreshed().min(pages)
                };
                if let Some(info) = j.refresh.as_mut() {
                    info.refreshed_by_deadline = Some(refreshed);
                }
                closed.push((j.clone(), refreshed, pages.saturating_sub(refreshed)));
            }
        }
        for (job, refreshed, evicted) in closed {
            self.refresh_totals.add(refreshed, evicted);
            if evicted > 0 {
                tracing::warn!(
                    job_id = job.id,
                    refreshed,
                    evicted,
                    "refresh deadline passed: pages not refreshed in time are evicted"
                );
            }
            if let Err(e) = self.store.put_job(&job) {
                tracing::warn!(job_id = job.id, error = %e, "cannot store a refresh's deadline");
            }
        }
    }

    /// The refresh covering purge `seq` among the jobs this coordinator holds (the
    /// leader's answer), the newest first.
    pub fn refresh_of(&self, seq: u64) -> Option<RefreshProgress> {
        let now = crate::clock::now_ms();
        self.queue()
            .jobs
            .values()
            .rev()
            .find_map(|j| covering(j, seq, now))
    }

    /// [`Self::refresh_of`] as the store holds it: a follower's answer. Blocking.
    pub fn stored_refresh_of(&self, seq: u64) -> Result<Option<RefreshProgress>, WarmStoreError> {
        let now = crate::clock::now_ms();
        Ok(self
            .store
            .jobs()?
            .iter()
            .rev()
            .find_map(|j| covering(j, seq, now)))
    }
}

/// `job`'s refresh progress, if it covers purge `seq` and was not merged into a newer one.
fn covering(job: &Job, seq: u64, now_ms: u64) -> Option<RefreshProgress> {
    let info = job.refresh.as_ref()?;
    if job.merged_into.is_some() || seq < info.first_seq || seq > info.last_seq {
        return None;
    }
    job.refresh_progress(now_ms)
}

/// A job fetching `urls` as `profile` says (Host header and variations), learning their
/// tags: a re-warm's and a refresh's.
pub(super) fn profile_job(profile: &Profile, urls: Vec<String>) -> JobSpec {
    JobSpec {
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
    }
}

/// Refreshed and evicted pages, counted as deadlines close (since coordinator start).
#[derive(Debug, Default)]
pub struct RefreshTotals {
    refreshed: std::sync::atomic::AtomicU64,
    evicted: std::sync::atomic::AtomicU64,
}

impl RefreshTotals {
    fn add(&self, refreshed: u64, evicted: u64) {
        use std::sync::atomic::Ordering::Relaxed;
        self.refreshed.fetch_add(refreshed, Relaxed);
        self.evicted.fetch_add(evicted, Relaxed);
    }

    /// (refreshed, evicted at the bound).
    pub fn get(&self) -> (u64, u64) {
        use std::sync::atomic::Ordering::Relaxed;
        (self.refreshed.load(Relaxed), self.evicted.load(Relaxed))
    }
}

/// The path and query of an absolute URL (`http://host/p?q` → `/p?q`), the key popular
/// URLs and the tag index share whatever host each was seen with.
fn path_of(url: &str) -> &str {
    let rest = url
        .strip_prefix("http://")
        .or_else(|| url.strip_prefix("https://"))
        .unwrap_or(url);
    rest.find('/').map_or("/", |i| &rest[i..])
}

/// Soft tag purges waiting for [`QUIET`].
#[derive(Debug, Default)]
pub(super) struct PendingRefresh {
    pub tags: HashSet<String>,
    pub first_seq: u64,
    pub last_seq: u64,
    pub purged_ms: u64,
    pub first_at: Option<std::time::Instant>,
    pub last_at: Option<std::time::Instant>,
}

impl PendingRefresh {
    /// Adds one soft tag purge.
    pub fn add(&mut self, tags: &[String], seq: u64, received_at_us: u64) {
        self.tags.extend(tags.iter().cloned());
        if self.first_seq == 0 {
            self.first_seq = seq;
        }
        self.last_seq = seq;
        self.purged_ms = self.purged_ms.max(received_at_us / 1000);
        let now = std::time::Instant::now();
        self.first_at.get_or_insert(now);
        self.last_at = Some(now);
    }

    /// Whether the burst is over (or has gone on long enough).
    pub fn due(&self) -> bool {
        !self.tags.is_empty()
            && (self.last_at.is_some_and(|t| t.elapsed() >= QUIET)
                || self.first_at.is_some_and(|t| t.elapsed() >= OVERDUE))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn popular_urls_and_indexed_urls_meet_on_the_path() {
        assert_eq!(path_of("http://shop.test/p/1?x=2"), "/p/1?x=2");
        assert_eq!(path_of("http://127.0.0.1:9/p/1"), "/p/1");
        assert_eq!(path_of("https://shop.test"), "/");
        assert_eq!(path_of("/p/3"), "/p/3");
    }

    #[test]
    fn a_burst_is_due_after_the_quiet_time() {
        let mut p = PendingRefresh::default();
        assert!(!p.due());
        p.add(&["cat_p_1".into()], 7, 5_000_000);
        p.add(&["cat_p_2".into()], 9, 6_000_000);
        assert_eq!((p.first_seq, p.last_seq, p.purged_ms), (7, 9, 6_000));
        assert!(!p.due());
        p.last_at = Some(std::time::Instant::now() - QUIET);
        assert!(p.due());
    }
}
