//! Warm shards: the coordinator hands this edge slices of a warm job ([`WarmShard`]);
//! each is fetched through the local varnish with [`warmer::engine::fetch_all`] and
//! answered with one [`WarmProgress`].
//!
//! Shards of one job share a [`Throttle`] and a concurrency limit, so however many shards
//! are in flight the edge never exceeds the rate the coordinator gave it (its share of the
//! origin budget, updated by [`WarmRate`]); the throttle's own AIMD slows the edge down
//! within one request of a 5xx or a slow miss, before the coordinator's global controller
//! hears of it. [`WarmCancel`] aborts a job's shards. Nothing here is durable: a shard
//! that was not reported when the session dropped is handed out again.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use proto::edge::{agent_message, AgentMessage, UrlTags, WarmProgress, WarmShard};
use tokio::sync::{mpsc, Semaphore};
use tokio::task::JoinSet;
use warmer::engine::{fetch_all, FetchSpec};
use warmer::pace::{Aimd, Throttle};

/// Most URLs in one shard (the coordinator sends far fewer).
const MAX_SHARD_URLS: usize = 10_000;
/// Most concurrent fetches per job, whatever the coordinator asks.
const MAX_CONCURRENCY: usize = 64;

/// What the session loop forwards to the worker.
#[derive(Debug)]
pub enum Command {
    Shard(WarmShard),
    Rate { job_id: u64, rate: f64 },
    Cancel { job_id: u64 },
}

struct Job {
    throttle: Arc<Throttle>,
    slots: Arc<Semaphore>,
    /// Dropping the set aborts the shards (when the session ends or the job is cancelled).
    tasks: JoinSet<()>,
}

/// Runs shards until the session ends (`commands` closes, or this task is aborted);
/// in-flight shards are aborted with it.
pub async fn run(
    via: SocketAddr,
    mut commands: mpsc::Receiver<Command>,
    synthetic: crate::synthetic::Synthetic,
    out: mpsc::Sender<AgentMessage>,
) {
    let mut jobs: HashMap<u64, Job> = HashMap::new();
    while let Some(cmd) = commands.recv().await {
        match cmd {
            Command::Shard(shard) => {
                jobs.retain(|id, j| {
                    while j.tasks.try_join_next().is_some() {}
                    *id == shard.job_id || !j.tasks.is_empty()
                });
                let rate = sane_rate(shard.rate);
                let job = jobs.entry(shard.job_id).or_insert_with(|| Job {
                    throttle: Arc::new(Throttle::new(Aimd::new(
                        rate,
                        Duration::from_millis(u64::from(shard.slow_ttfb_ms.max(1))),
                    ))),
                    slots: Arc::new(Semaphore::new(
                        (shard.concurrency as usize).clamp(1, MAX_CONCURRENCY),
                    )),
                    tasks: JoinSet::new(),
                });
                job.throttle.set_ceiling(rate);
                job.tasks.spawn(run_shard(
                    shard,
                    via,
                    job.throttle.clone(),
                    job.slots.clone(),
                    synthetic.clone(),
                    out.clone(),
                ));
            }
            Command::Rate { job_id, rate } => {
                if let Some(job) = jobs.get(&job_id) {
                    job.throttle.set_ceiling(sane_rate(rate));
                }
            }
            Command::Cancel { job_id } => {
                if let Some(job) = jobs.remove(&job_id) {
                    tracing::info!(job_id, shards = job.tasks.len(), "warm job cancelled");
                }
            }
        }
    }
}

/// A rate the throttle can use (a garbage value from the wire becomes a slow crawl).
fn sane_rate(rate: f64) -> f64 {
    if rate.is_finite() && rate > 0.0 {
        rate.min(100_000.0)
    } else {
        0.1
    }
}

async fn run_shard(
    shard: WarmShard,
    via: SocketAddr,
    throttle: Arc<Throttle>,
    slots: Arc<Semaphore>,
    synthetic: crate::synthetic::Synthetic,
    out: mpsc::Sender<AgentMessage>,
) {
    let variations: Vec<Vec<(String, String)>> = shard
        .variations
        .iter()
        .map(|v| {
            v.headers
                .iter()
                .map(|h| (h.name.clone(), h.value.clone()))
                .collect()
        })
        .collect();
    let urls = &shard.urls[..shard.urls.len().min(MAX_SHARD_URLS)];
    let mut items = warmer::engine::items(urls, &variations);
    // Every fetch is marked as the agent's own, so varnish's log tells it from shoppers'.
    let mark = crate::mark::header(crate::mark::Kind::Warm);
    for (_, headers) in &mut items {
        headers.push(mark.clone());
    }
    let spec = Arc::new(FetchSpec {
        via,
        host: Some(shard.host.clone()).filter(|h| !h.is_empty()),
        timeout: Duration::from_millis(u64::from(shard.timeout_ms.clamp(100, 600_000))),
        token: Some(shard.token.clone()).filter(|t| !t.is_empty()),
        refresh: shard.refresh,
        only_stale: shard.only_stale,
        want_tags: shard.want_tags,
    });
    let s = fetch_all(items, spec, throttle, slots, &|_, _| {}).await;
    synthetic.add(
        (s.fetched + s.errors) as u64,
        s.hits as u64,
        s.misses as u64,
    );
    tracing::debug!(
        job_id = shard.job_id,
        shard = shard.shard,
        fetched = s.fetched,
        hits = s.hits,
        misses = s.misses,
        errors = s.errors,
        "warm shard done"
    );
    let n = |v: usize| u32::try_from(v).unwrap_or(u32::MAX);
    let progress = WarmProgress {
        job_id: shard.job_id,
        shard: shard.shard,
        fetched: n(s.fetched),
        hits: n(s.hits),
        misses: n(s.misses),
        errors: n(s.errors),
        throttled: n(s.throttled),
        miss_ttfb_us: u64::try_from(s.miss_ttfb.as_micros()).unwrap_or(u64::MAX),
        tags: s
            .tags
            .into_iter()
            .map(|(url, tags)| UrlTags { url, tags })
            .collect(),
        first_error: s.first_errors.into_iter().next().unwrap_or_default(),
    };
    let _ = out
        .send(AgentMessage {
            msg: Some(agent_message::Msg::WarmProgress(progress)),
        })
        .await;
}
