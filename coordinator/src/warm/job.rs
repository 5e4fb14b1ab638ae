//! A warm job as the API takes it ([`JobSpec`]), as the store keeps it ([`Job`]: state,
//! the edges it targets and which shards each has done) and as the API shows it
//! ([`JobView`]: done / total / errors / ETA per region).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// What `POST /api/v1/warm/jobs` (and `warm start`, and `[[warm.schedule]]`) asks for.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JobSpec {
    /// A sitemap or sitemap index (`http://`; gzip allowed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sitemap: Option<String>,
    /// Explicit absolute URLs.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub urls: Vec<String>,
    /// The N most requested URLs of each target region (from the agents' request logs).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub top: Option<usize>,
    /// Target regions; none (or `["all"]`): every configured region.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub regions: Option<Vec<String>>,
    /// Origin budget for this job, requests/s (at most `[warm] origin_budget_rps`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate: Option<f64>,
    /// Concurrent fetches per edge.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub concurrency: Option<u32>,
    /// `Header: value` sets (several headers joined by `;;`); each URL is fetched plain and
    /// once more per variation. Default: `[warm] variations`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub variations: Option<Vec<String>>,
    /// Host header (default: `[warm] host`, else each URL's own host).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
    /// Shield first, satellites from the shield (default: when `[warm] shield` is set).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tiered: Option<bool>,
    /// Force a miss on every URL: refresh cached pages in place.
    #[serde(default)]
    pub refresh: bool,
    /// Refresh only the stale copies (a fresh one is a hit and costs the origin nothing):
    /// what a refresh after a tag purge does.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub only_stale: bool,
    /// Learn these URLs' tags so a tag purge re-warms them (default:
    /// `[warm] rewarm_after_purge`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rewarm: Option<bool>,
}

impl JobSpec {
    /// Checks what serde cannot; `known` are the configured region names.
    pub fn validate(&self, known: &[String]) -> Result<(), String> {
        let sources = usize::from(self.sitemap.is_some())
            + usize::from(!self.urls.is_empty())
            + usize::from(self.top.is_some());
        if sources == 0 {
            return Err("a job needs a source: sitemap, urls or top".into());
        }
        if let Some(s) = &self.sitemap {
            if !s.starts_with("http://") {
                return Err(format!("sitemap {s:?} must be an http:// URL"));
            }
        }
        for u in &self.urls {
            if !(u.starts_with("http://") || u.starts_with("https://"))
                || u.len() > 2048
                || u.chars().any(|c| c.is_control() || c == ' ')
            {
                return Err(format!("url {u:?} must be an absolute http(s) URL"));
            }
        }
        if self.urls.len() > 1_000_000 {
            return Err("at most 1000000 urls in one job".into());
        }
        if matches!(self.top, Some(0) | Some(10_001..)) {
            return Err("top must be 1..=10000".into());
        }
        if let Some(r) = self.rate {
            if !r.is_finite() || r <= 0.0 {
                return Err("rate must be a positive number".into());
            }
        }
        if matches!(self.concurrency, Some(0) | Some(65..)) {
            return Err("concurrency must be 1..=64".into());
        }
        for v in self.variations.iter().flatten() {
            warmer::engine::parse_variation(v).map_err(|e| e.to_string())?;
        }
        if let Some(h) = &self.host {
            if h.is_empty() || h.chars().any(|c| c.is_control() || c == ' ' || c == '/') {
                return Err(format!("host {h:?} is not a host name"));
            }
        }
        for r in self.regions.iter().flatten() {
            if r != "all" && !known.contains(r) {
                return Err(format!("unknown region {r:?}"));
            }
        }
        Ok(())
    }
}

/// Where a job is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum JobState {
    Queued,
    Running,
    Done,
    Failed,
    Cancelled,
}

impl JobState {
    pub fn is_final(self) -> bool {
        matches!(
            self,
            JobState::Done | JobState::Failed | JobState::Cancelled
        )
    }

    pub fn as_str(self) -> &'static str {
        match self {
            JobState::Queued => "queued",
            JobState::Running => "running",
            JobState::Done => "done",
            JobState::Failed => "failed",
            JobState::Cancelled => "cancelled",
        }
    }
}

/// Why a job exists.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase", tag = "kind", content = "name")]
pub enum JobSource {
    /// Asked for through the API or CLI.
    Api,
    /// A `[[warm.schedule]]` entry fired.
    Schedule(String),
    /// Tags were purged; these are the URLs known to carry them.
    Rewarm,
    /// Tags were purged soft (`[purge] refresh_tags`): the stale pages known to carry
    /// them, most requested first, refreshed in place.
    Refresh,
}

/// What a refresh job refreshes: the purges it follows and the bound on staleness.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RefreshInfo {
    /// The purges it covers (a merged refresh covers its predecessors' too).
    pub first_seq: u64,
    pub last_seq: u64,
    /// When the newest of them was received (Unix ms).
    pub purged_ms: u64,
    /// `purged_ms` + `[purge] refresh_max_stale_s`: a page not refreshed by then is a miss.
    pub deadline_ms: u64,
    /// Pages refreshed everywhere when the deadline passed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub refreshed_by_deadline: Option<u64>,
}

/// A refresh's progress, in the job view and `GET /api/v1/purges/{seq}`: `stale` +
/// `refreshed` + `evicted` = `pages`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RefreshProgress {
    pub job_id: u64,
    pub first_seq: u64,
    pub last_seq: u64,
    /// Purged pages the coordinator knows (URLs times header sets).
    pub pages: u64,
    /// Still stale, being served stale, waiting for their refresh (0 past the deadline).
    pub stale: u64,
    /// Refreshed in every target region (before the deadline).
    pub refreshed: u64,
    /// Not refreshed by the deadline: evicted at the bound (the next shopper waits).
    pub evicted: u64,
    /// Fetches that failed or were answered still stale (the origin did not answer).
    pub errors: u64,
    pub deadline_ms: u64,
    /// The refresh that took over this one's unfinished pages (this one was cancelled).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub merged_into: Option<u64>,
}

/// One edge's part of a running job.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct EdgeWork {
    pub region: String,
    /// Bit `i` set: shard `i` is done.
    pub done: Vec<u64>,
    pub fetched: u64,
    pub hits: u64,
    pub misses: u64,
    pub errors: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub first_error: Option<String>,
    /// Why this edge was taken out of the job (disconnected, stuck, every fetch
    /// failing); its remaining shards are not waited for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dropped: Option<String>,
}

impl EdgeWork {
    pub fn is_done(&self, shard: u32) -> bool {
        self.done
            .get(shard as usize / 64)
            .is_some_and(|w| w & (1 << (shard % 64)) != 0)
    }

    pub fn set_done(&mut self, shard: u32) {
        let word = shard as usize / 64;
        if self.done.len() <= word {
            self.done.resize(word + 1, 0);
        }
        self.done[word] |= 1 << (shard % 64);
    }

    pub fn shards_done(&self) -> u32 {
        self.done.iter().map(|w| w.count_ones()).sum()
    }
}

/// A job as stored.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Job {
    pub id: u64,
    pub spec: JobSpec,
    /// Stored under its first name, `origin`, so every release reads every other's jobs.
    #[serde(rename = "origin")]
    pub source: JobSource,
    pub state: JobState,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    pub created_ms: u64,
    #[serde(default)]
    pub started_ms: Option<u64>,
    #[serde(default)]
    pub finished_ms: Option<u64>,
    /// Resolved when the job starts: URL count, shards, URLs per shard, variations.
    #[serde(default)]
    pub urls: usize,
    #[serde(default)]
    pub shards: u32,
    #[serde(default)]
    pub per_shard: usize,
    #[serde(default)]
    pub variations: Vec<Vec<(String, String)>>,
    #[serde(default)]
    pub host: Option<String>,
    /// The shield region when the job runs tiered.
    #[serde(default)]
    pub shield: Option<String>,
    #[serde(default)]
    pub want_tags: bool,
    /// Start on an edge only once it applied this purge sequence (re-warm after purge).
    #[serde(default)]
    pub after_seq: u64,
    /// Origin budget (requests/s).
    pub budget: f64,
    pub regions: Vec<String>,
    /// A refresh after soft tag purges.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub refresh: Option<RefreshInfo>,
    /// The refresh that took over this one's unfinished pages.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub merged_into: Option<u64>,
    /// Target edges by id (stored under their own keys, see [`super::store`]).
    #[serde(skip)]
    pub edges: BTreeMap<String, EdgeWork>,
}

impl Job {
    /// Fetches shard `shard` stands for on one edge (URLs times header sets: plain, then
    /// each variation).
    pub fn shard_fetches(&self, shard: u32) -> u64 {
        let start = shard as usize * self.per_shard;
        let urls = self.urls.saturating_sub(start).min(self.per_shard);
        (urls * (self.variations.len() + 1)) as u64
    }

    /// Fetches the whole job stands for on one edge.
    pub fn fetches_total(&self) -> u64 {
        (self.urls * (self.variations.len() + 1)) as u64
    }

    /// Fetches behind the shards `w` has done: every shard is full but perhaps the last.
    pub fn fetches_done(&self, w: &EdgeWork) -> u64 {
        let Some(last) = self.shards.checked_sub(1) else {
            return 0;
        };
        let last_done = w.is_done(last);
        let full_done = u64::from(w.shards_done()) - u64::from(last_done);
        full_done * self.shard_fetches(0)
            + if last_done {
                self.shard_fetches(last)
            } else {
                0
            }
    }

    /// Whether nothing more is waited for from `w`: every shard done, or dropped.
    pub fn edge_done(&self, w: &EdgeWork) -> bool {
        w.dropped.is_some() || w.shards_done() >= self.shards
    }

    pub fn all_done(&self) -> bool {
        self.edges.values().all(|w| self.edge_done(w))
    }

    /// Fetches (pages times header sets) refreshed on every edge still in the job: the
    /// fewest any edge did without an error (a page counts once it is fresh everywhere).
    pub fn fetches_refreshed(&self) -> u64 {
        self.edges
            .values()
            .filter(|w| w.dropped.is_none())
            .map(|w| self.fetches_done(w).saturating_sub(w.errors))
            .min()
            .unwrap_or(0)
    }

    /// The refresh's progress at `now_ms` (refresh jobs only).
    pub fn refresh_progress(&self, now_ms: u64) -> Option<RefreshProgress> {
        let info = self.refresh.as_ref()?;
        let per_page = (self.variations.len() + 1) as u64;
        let pages = if self.state == JobState::Queued {
            (self.spec.urls.len() as u64) * per_page
        } else {
            self.fetches_total()
        };
        let past = now_ms >= info.deadline_ms;
        let refreshed = match info.refreshed_by_deadline {
            Some(r) => r,
            None if self.state == JobState::Queued => 0,
            None => self.fetches_refreshed(),
        }
        .min(pages);
        // A refresh merged into a newer one keeps only what it refreshed.
        let pages = if self.merged_into.is_some() {
            refreshed
        } else {
            pages
        };
        let (stale, evicted) = if past || self.state.is_final() {
            (0, pages - refreshed)
        } else {
            (pages - refreshed, 0)
        };
        Some(RefreshProgress {
            job_id: self.id,
            first_seq: info.first_seq,
            last_seq: info.last_seq,
            pages,
            stale,
            refreshed,
            evicted,
            errors: self.edges.values().map(|w| w.errors).sum(),
            deadline_ms: info.deadline_ms,
            merged_into: self.merged_into,
        })
    }

    /// Whether `shard` is done on every shield edge (tiered jobs).
    pub fn shield_done(&self, shard: u32) -> bool {
        let Some(shield) = &self.shield else {
            return true;
        };
        // A dropped shield edge is not waited for (satellites then fetch through the
        // shield's remaining edges, or find it dead and are dropped in turn).
        self.edges
            .values()
            .filter(|w| &w.region == shield && w.dropped.is_none())
            .all(|w| w.is_done(shard))
    }
}

/// Where one region of a job is.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RegionStatus {
    /// Nothing done yet.
    #[default]
    Waiting,
    Warming,
    Done,
    /// Every edge of the region was taken out of the job (`error` says why).
    Dropped,
}

/// One region's progress in a job.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct RegionProgress {
    pub done: u64,
    pub total: u64,
    pub errors: u64,
    pub hits: u64,
    pub misses: u64,
    pub edges: usize,
    /// Seconds left at the pace so far (null until there is a pace, and once the region
    /// is finished or dropped: `status` says which).
    pub eta_s: Option<u64>,
    /// `waiting` (nothing done yet), `warming`, `done`, or `dropped` (every edge of the
    /// region was taken out of the job: `error` says why).
    pub status: RegionStatus,
    /// Why the region's edges were dropped, if any were.
    pub error: Option<String>,
}

/// What the API shows for a job.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct JobView {
    pub id: u64,
    pub state: JobState,
    #[serde(flatten)]
    pub source: JobSource,
    pub error: Option<String>,
    pub spec: JobSpec,
    pub urls: usize,
    /// Header sets per URL: plain plus each variation.
    pub variations: usize,
    pub tiered: bool,
    pub budget: f64,
    /// The origin rate the AIMD controller allows now.
    pub rate: Option<f64>,
    pub created_ms: u64,
    pub started_ms: Option<u64>,
    pub finished_ms: Option<u64>,
    pub regions: BTreeMap<String, RegionProgress>,
    /// A refresh job's progress.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub refresh: Option<RefreshProgress>,
}

impl JobView {
    pub fn of(job: &Job, rate: Option<f64>, now_ms: u64) -> Self {
        let mut regions: BTreeMap<String, RegionProgress> = job
            .regions
            .iter()
            .map(|r| (r.clone(), RegionProgress::default()))
            .collect();
        let mut open: BTreeMap<&str, usize> = BTreeMap::new();
        let mut dropped: BTreeMap<&str, usize> = BTreeMap::new();
        for (id, w) in &job.edges {
            let p = regions.entry(w.region.clone()).or_default();
            p.edges += 1;
            p.total += job.fetches_total();
            p.done += job.fetches_done(w);
            p.errors += w.errors;
            p.hits += w.hits;
            p.misses += w.misses;
            if let Some(reason) = &w.dropped {
                *dropped.entry(&w.region).or_default() += 1;
                let line = format!("{id}: {reason}");
                p.error = Some(match p.error.take() {
                    Some(e) => format!("{e}; {line}"),
                    None => line,
                });
            } else if !job.edge_done(w) {
                *open.entry(&w.region).or_default() += 1;
            }
        }
        let elapsed = job
            .started_ms
            .map(|s| now_ms.saturating_sub(s) as f64 / 1000.0);
        for (name, p) in regions.iter_mut() {
            let open = open.get(name.as_str()).copied().unwrap_or(0);
            let all_dropped = p.edges > 0 && dropped.get(name.as_str()) == Some(&p.edges);
            p.status = if all_dropped {
                RegionStatus::Dropped
            } else if p.edges > 0 && open == 0 {
                RegionStatus::Done
            } else if p.done > 0 {
                RegionStatus::Warming
            } else {
                RegionStatus::Waiting
            };
            if let (Some(elapsed), JobState::Running, RegionStatus::Warming) =
                (elapsed, job.state, p.status)
            {
                if elapsed > 0.0 {
                    let per_s = p.done as f64 / elapsed;
                    p.eta_s = Some(((p.total.saturating_sub(p.done)) as f64 / per_s).ceil() as u64);
                }
            }
        }
        JobView {
            id: job.id,
            state: job.state,
            source: job.source.clone(),
            error: job.error.clone(),
            spec: job.spec.clone(),
            urls: job.urls,
            variations: job.variations.len() + 1,
            tiered: job.shield.is_some(),
            budget: job.budget,
            rate,
            created_ms: job.created_ms,
            started_ms: job.started_ms,
            finished_ms: job.finished_ms,
            regions,
            refresh: job.refresh_progress(now_ms),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spec_validation() {
        let known = vec!["eu".to_owned()];
        let ok = JobSpec {
            sitemap: Some("http://shop/sitemap.xml".into()),
            ..JobSpec::default()
        };
        assert!(ok.validate(&known).is_ok());
        assert!(JobSpec::default().validate(&known).is_err());
        let bad = |f: &dyn Fn(&mut JobSpec)| {
            let mut s = ok.clone();
            f(&mut s);
            s.validate(&known).unwrap_err()
        };
        assert!(bad(&|s| s.sitemap = Some("/etc/passwd".into())).contains("http://"));
        assert!(bad(&|s| s.regions = Some(vec!["mars".into()])).contains("mars"));
        assert!(bad(&|s| s.rate = Some(f64::NAN)).contains("rate"));
        assert!(bad(&|s| s.variations = Some(vec!["nocolon".into()])).contains("Header"));
        assert!(bad(&|s| s.urls = vec!["ftp://x".into()]).contains("absolute"));
        assert!(bad(&|s| s.concurrency = Some(0)).contains("concurrency"));
    }

    #[test]
    fn shard_bits_and_progress() {
        let mut job = Job {
            id: 1,
            spec: JobSpec::default(),
            source: JobSource::Api,
            state: JobState::Running,
            error: None,
            created_ms: 0,
            started_ms: Some(0),
            finished_ms: None,
            urls: 25,
            shards: 3,
            per_shard: 10,
            variations: vec![vec![], vec![]],
            host: None,
            shield: Some("eu".into()),
            want_tags: false,
            after_seq: 0,
            budget: 10.0,
            regions: vec!["eu".into(), "us".into()],
            refresh: None,
            merged_into: None,
            edges: BTreeMap::new(),
        };
        job.edges.insert(
            "eu-1".into(),
            EdgeWork {
                region: "eu".into(),
                ..Default::default()
            },
        );
        job.edges.insert(
            "us-1".into(),
            EdgeWork {
                region: "us".into(),
                ..Default::default()
            },
        );
        assert_eq!(job.shard_fetches(2), 15);
        assert!(!job.shield_done(0));
        let eu = job.edges.get_mut("eu-1").unwrap();
        eu.set_done(0);
        eu.set_done(2);
        assert!(eu.is_done(2) && !eu.is_done(1) && !eu.is_done(70));
        assert!(job.shield_done(0) && !job.shield_done(1));
        let v = JobView::of(&job, None, 1000);
        // 25 URLs x (plain + 2 variations).
        assert_eq!(v.regions["eu"].total, 75);
        assert_eq!(v.regions["eu"].done, 45);
        assert_eq!(v.regions["eu"].eta_s, Some(1));
        assert_eq!(v.regions["us"].done, 0);
        assert!(!job.all_done());
        assert!(v.refresh.is_none());

        // As a refresh: a page counts once every edge has it fresh, errors do not count,
        // and past the deadline what is left is evicted.
        job.source = JobSource::Refresh;
        job.refresh = Some(RefreshInfo {
            first_seq: 4,
            last_seq: 6,
            purged_ms: 0,
            deadline_ms: 30_000,
            ..RefreshInfo::default()
        });
        let us = job.edges.get_mut("us-1").unwrap();
        us.set_done(0);
        us.errors = 3;
        let r = job.refresh_progress(1000).unwrap();
        assert_eq!((r.pages, r.refreshed, r.stale, r.evicted), (75, 27, 48, 0));
        assert_eq!((r.first_seq, r.last_seq, r.errors), (4, 6, 3));
        let r = job.refresh_progress(30_000).unwrap();
        assert_eq!((r.refreshed, r.stale, r.evicted), (27, 0, 48));
        job.refresh.as_mut().unwrap().refreshed_by_deadline = Some(20);
        let r = job.refresh_progress(40_000).unwrap();
        assert_eq!((r.refreshed, r.stale, r.evicted), (20, 0, 55));
        job.merged_into = Some(9);
        let r = job.refresh_progress(1000).unwrap();
        assert_eq!(
            (r.pages, r.stale, r.evicted, r.merged_into),
            (20, 0, 0, Some(9))
        );
    }
}
