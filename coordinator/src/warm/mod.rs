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
//! **Rooms.** One concept per file, each with its own state behind its own lock:
//!
//! - [`queue`]: the jobs (`Queue`): created, cancelled, failed, started; their states and
//!   the store records that make them durable.
//! - [`dispatch`]: the warm-capable sessions and what is out on them (`Dispatch`), and the
//!   origin budget (`Budget`: one AIMD controller per running job).
//! - [`progress`]: shard reports, fetch totals, the per-edge activity that finds stuck
//!   edges (`Progress`), and the end of a job whose edges are all done or dropped.
//! - [`popular`]: the popular URLs the agents report (`Popular`).
//! - [`schedule`]: the loop that starts jobs, fires cron entries and re-warms after tag
//!   purges through the [`tags`] index (`TagIndex`).
//! - [`refresh`]: refresh mode (`[purge] refresh_tags`): soft tag purges become refresh
//!   jobs, most requested pages first, merged with a refresh still running, bounded by
//!   a deadline.
//!
//! This file is the facade: [`Warm`] owns the rooms' states, and `Held` (every lock a
//! job's life touches, taken in order) is how one call changes several rooms at once:
//! a job that ends forgets its per-edge bookkeeping in dispatch, budget and progress.
//!
//! **Lock order.** `queue` → `dispatch` → `budget` → `progress` → `tags`; `popular` is
//! taken alone, `origin_failing` alone or last (the monitor reads it). A call takes the
//! locks it needs in that order (`Warm::hold` takes the first four), never holds one
//! across an `.await`, and reads the store's shards only with none held.
//!
//! Nothing here runs on the purge path: the listener never waits on warming.

pub mod config;
mod dispatch;
pub mod job;
mod metrics;
mod popular;
mod progress;
mod queue;
pub mod refresh;
pub mod schedule;
pub mod store;
pub mod tags;

use daemon::sync::IoMutex;
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::sync::watch;

use crate::edges::EdgeRegistry;
pub use config::{ScheduleConfig, WarmConfig};
use dispatch::{Budget, Dispatch};
pub use dispatch::{IN_FLIGHT, REMOTE_SESSIONS};
pub use metrics::{FetchTotals, WarmMetrics};
use popular::Popular;
use progress::Progress;
use queue::Queue;
use store::{WarmStore, WarmStoreError};
use tags::TagIndex;

/// Warming's shared state; share it behind an `Arc`.
pub struct Warm {
    config: WarmConfig,
    token: String,
    regions: Vec<String>,
    store: WarmStore,
    edges: Arc<EdgeRegistry>,
    queue: IoMutex<Queue>,
    dispatch: IoMutex<Dispatch>,
    budget: IoMutex<Budget>,
    progress: IoMutex<Progress>,
    tags: IoMutex<TagIndex>,
    popular: IoMutex<Popular>,
    refresh_totals: refresh::RefreshTotals,
    origin_failing: Mutex<progress::OriginFailing>,
    /// The fleet's counters: shoppers' background fetches share a refresh's budget.
    traffic: std::sync::OnceLock<Arc<crate::traffic::Traffic>>,
    changed: watch::Sender<u64>,
}

impl std::fmt::Debug for Warm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Warm").finish_non_exhaustive()
    }
}

/// Why an API call on warming failed.
#[derive(Debug, thiserror::Error)]
pub enum WarmError {
    #[error("{0}")]
    Invalid(String),
    #[error("no warm job {0}")]
    NotFound(u64),
    /// This coordinator has just become the leader and is still reading the jobs the
    /// last one left (or it follows): it cannot give out a job id yet.
    #[error("this coordinator is taking over the warm jobs (it has just become the leader); try again in a moment")]
    TakingOver,
    #[error(transparent)]
    Store(#[from] WarmStoreError),
}

/// The locks a job's life touches, taken in the lock order: what a call that changes
/// several rooms at once (a report, a cancel, a dropped edge) holds.
struct Held<'a> {
    queue: MutexGuard<'a, Queue>,
    dispatch: MutexGuard<'a, Dispatch>,
    budget: MutexGuard<'a, Budget>,
    progress: MutexGuard<'a, Progress>,
}

impl Held<'_> {
    /// Drops the per-edge bookkeeping of a job that ended (it would grow with every
    /// re-warm otherwise).
    fn forget(&mut self, id: u64) {
        self.budget.forget(id);
        self.progress.forget(id);
        self.dispatch.forget(id);
    }

    /// Ends job `id` if every edge is done or dropped (see [`Queue::finish_if_done`]) and
    /// forgets its bookkeeping. Returns the job record to store.
    fn end_if_done(&mut self, id: u64) -> Option<job::Job> {
        let job = self.queue.finish_if_done(id)?;
        self.forget(id);
        Some(job)
    }

    /// Drops every job and what was out for them.
    fn forget_all(&mut self) {
        self.queue.clear();
        self.budget.clear();
        self.dispatch.clear();
    }

    /// Puts the stored jobs in; running ones resume with a fresh controller.
    fn load(&mut self, jobs: Vec<job::Job>, config: &WarmConfig) {
        for (id, budget) in self.queue.load(jobs) {
            self.budget.start(id, budget, config);
        }
    }
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
        let warm = Warm {
            tags: IoMutex::new(TagIndex::new(config.tag_index_pairs)),
            config,
            token,
            regions,
            store,
            edges,
            queue: IoMutex::default(),
            dispatch: IoMutex::default(),
            budget: IoMutex::default(),
            progress: IoMutex::default(),
            popular: IoMutex::default(),
            refresh_totals: refresh::RefreshTotals::default(),
            origin_failing: Mutex::default(),
            traffic: std::sync::OnceLock::new(),
            changed: watch::channel(0).0,
        };
        let jobs = warm.store.jobs()?;
        warm.hold().load(jobs, &warm.config);
        Ok(Arc::new(warm))
    }

    /// Lets a refresh count shoppers' background fetches against its origin budget.
    pub fn set_traffic(&self, traffic: Arc<crate::traffic::Traffic>) {
        let _ = self.traffic.set(traffic);
    }

    /// The store (for a backup's copy).
    pub fn store(&self) -> &WarmStore {
        &self.store
    }

    fn queue(&self) -> MutexGuard<'_, Queue> {
        self.queue.lock()
    }

    fn dispatch(&self) -> MutexGuard<'_, Dispatch> {
        self.dispatch.lock()
    }

    fn budget(&self) -> MutexGuard<'_, Budget> {
        self.budget.lock()
    }

    fn progress(&self) -> MutexGuard<'_, Progress> {
        self.progress.lock()
    }

    fn tags(&self) -> MutexGuard<'_, TagIndex> {
        self.tags.lock()
    }

    fn popular(&self) -> MutexGuard<'_, Popular> {
        self.popular.lock()
    }

    /// Queue, dispatch, budget and progress, in the lock order.
    fn hold(&self) -> Held<'_> {
        let queue = self.queue();
        let dispatch = self.dispatch();
        let budget = self.budget();
        let progress = self.progress();
        Held {
            queue,
            dispatch,
            budget,
            progress,
        }
    }

    fn bump(&self) {
        self.changed.send_modify(|v| *v += 1);
    }

    /// Wakes on every change that may give a session something to send.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.changed.subscribe()
    }
}

#[cfg(test)]
mod tests;
