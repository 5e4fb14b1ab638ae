//! Purges down the stream: where a session resumes ([`resume_point`]) and the sender
//! that streams the log from there.
//!
//! The sender waits on the log's head and sends every entry after the cursor, in
//! batches, into a small bounded channel: a slow agent fills it, the sender waits, and by
//! the time there is room the next batch is bigger, so the agent coalesces more. A
//! session that falls behind retention, or starts without a usable cursor, gets a
//! [`FullBan`] first.
//!
//! Fan-out cost is per session, so two things keep it small with a thousand edges. A
//! batch from the log's tail goes out as bytes encoded once for every session at that
//! cursor ([`PurgeLog::read_encoded`], written as-is by `proto::codec`). And after a
//! send, the next one waits until the fan-out window has passed ([`Pacer`]): a purge
//! storm reaches each edge as one batch per window instead of one per commit, while a
//! lone purge (nothing sent within the window) goes at once. The window is 10 ms, and
//! grows with the fleet during a storm (`purge::pacer`), when every sender sends on the
//! pacer's shared ticks so the fleet shares one batch per tick. An agent that announces
//! `purge_ranges` gets each run of tag purges in a batch as one range entry
//! (`purge::ranges`): fewer bytes for every session to copy and send.

use std::sync::Arc;

use proto::edge::{coordinator_message, FullBan, PurgeBatch};
use tokio::time::Instant;
use tonic::Status;

use super::{send, Outbound};
use crate::edges::SessionHandle;
use crate::purge::log::PurgeLog;
use crate::purge::pacer::Pacer;

/// Entries per batch message.
const BATCH_ENTRIES: usize = 2048;

/// Where a session starts.
#[derive(Debug, PartialEq, Eq)]
pub enum ResumePoint {
    /// Send entries from this sequence on.
    From(u64),
    /// Ban everything, count as applied up to `head`, then send from `head + 1`.
    FullBan { head: u64, reason: &'static str },
}

/// Decides how an agent with cursor (`log_id`, `applied`) resumes against the log.
pub fn resume_point(
    log_id: &str,
    first: u64,
    head: u64,
    cursor_log: &str,
    applied: u64,
) -> ResumePoint {
    if cursor_log.is_empty() && applied == 0 {
        return ResumePoint::FullBan {
            head,
            reason: "new edge: its cache may hold pages purged before it joined",
        };
    }
    if cursor_log != log_id {
        return ResumePoint::FullBan {
            head,
            reason: "cursor refers to another purge log",
        };
    }
    if applied > head {
        return ResumePoint::FullBan {
            head,
            reason: "cursor is ahead of the log",
        };
    }
    if applied + 1 < first {
        return ResumePoint::FullBan {
            head,
            reason: "cursor is older than the log's retention",
        };
    }
    ResumePoint::From(applied + 1)
}

/// Streams the log to one agent from `resume` until the session ends; `ranges`: the
/// agent takes range entries (`purge::ranges`).
pub(super) async fn send_loop(
    log: PurgeLog,
    resume: ResumePoint,
    tx: Outbound,
    handle: SessionHandle,
    pacer: Arc<Pacer>,
    ranges: bool,
) {
    let _slot = pacer.join();
    let mut head_rx = log.subscribe();
    let mut next = match resume {
        ResumePoint::From(seq) => seq,
        ResumePoint::FullBan { head, reason } => {
            let ban = FullBan {
                up_to_seq: head,
                log_id: log.log_id().to_owned(),
                reason: reason.to_owned(),
            };
            if !send(&tx, &handle, coordinator_message::Msg::FullBan(ban)).await {
                return;
            }
            head + 1
        }
    };
    let mut last_sent: Option<Instant> = None;
    let mut last_tick: Option<Instant> = None;
    loop {
        if next > log.head() {
            tokio::select! {
                _ = handle.cancel.cancelled() => return,
                changed = head_rx.changed() => if changed.is_err() { return },
            }
            continue;
        }
        let window = pacer.window(log.head());
        // In a storm, on the fleet's clock: one batch per tick, up to the head at the tick.
        let tick = pacer.storm().then(|| {
            let tick = pacer.tick(window, Instant::now());
            match last_tick {
                Some(t) if t >= tick => tick + window,
                _ => tick,
            }
        });
        if tick.is_some() {
            last_tick = tick;
        }
        let wait = tick.or_else(|| {
            last_sent
                .filter(|at| at.elapsed() < window)
                .map(|at| at + window)
        });
        if let Some(until) = wait.filter(|at| *at > Instant::now()) {
            tokio::select! {
                _ = handle.cancel.cancelled() => return,
                _ = tokio::time::sleep_until(until) => {}
            }
        }
        let up_to = match tick {
            Some(tick) => pacer.head_at(tick, log.head()),
            None => log.head(),
        };
        while next <= up_to {
            if next < log.first() {
                // Retention overtook a live session that fell this far behind.
                let head = log.head();
                let ban = FullBan {
                    up_to_seq: head,
                    log_id: log.log_id().to_owned(),
                    reason: "edge fell behind the log's retention".to_owned(),
                };
                if !send(&tx, &handle, coordinator_message::Msg::FullBan(ban)).await {
                    return;
                }
                next = head + 1;
                continue;
            }
            if let Some((last, encoded)) = log.read_encoded(next, up_to, BATCH_ENTRIES, ranges) {
                next = last + 1;
                let batch = PurgeBatch {
                    entries: Vec::new(),
                    encoded,
                };
                if !send(&tx, &handle, coordinator_message::Msg::Purges(batch)).await {
                    return;
                }
                last_sent = Some(Instant::now());
                continue;
            }
            let entries = match log.read_from(next, BATCH_ENTRIES).await {
                Ok(e) if !e.is_empty() => e,
                Ok(_) => break,
                Err(e) => {
                    tracing::error!(error = %e, edge = %handle.edge_id, "reading the purge log failed");
                    let _ = tx
                        .send(Err(Status::unavailable("purge log unavailable")))
                        .await;
                    return;
                }
            };
            next = entries.last().map(|e| e.seq + 1).unwrap_or(next);
            let batch = PurgeBatch {
                entries: entries.iter().map(|e| (**e).clone()).collect(),
                encoded: Default::default(),
            };
            if !send(&tx, &handle, coordinator_message::Msg::Purges(batch)).await {
                return;
            }
            last_sent = Some(Instant::now());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resume_rules() {
        assert!(matches!(
            resume_point("L", 1, 10, "", 0),
            ResumePoint::FullBan { .. }
        ));
        assert_eq!(resume_point("L", 1, 10, "L", 4), ResumePoint::From(5));
        assert_eq!(resume_point("L", 5, 10, "L", 4), ResumePoint::From(5));
        assert!(matches!(
            resume_point("L", 6, 10, "L", 4),
            ResumePoint::FullBan { .. }
        ));
        assert!(matches!(
            resume_point("L", 1, 10, "X", 4),
            ResumePoint::FullBan { .. }
        ));
        assert!(matches!(
            resume_point("L", 1, 10, "L", 11),
            ResumePoint::FullBan { .. }
        ));
        assert_eq!(resume_point("L", 11, 10, "L", 10), ResumePoint::From(11));
    }
}
