//! One session's purges: where it resumes ([`resume_point`]) and the [`feed`] that
//! streams the log from there.
//!
//! The feed is a stream the session's gRPC response polls itself, with no task or
//! channel between the log and the socket: it waits on the log's head and yields every
//! entry after the cursor, in batches. A slow agent fills HTTP/2's flow-control window,
//! the response stops polling, and by the time there is room the next batch is bigger,
//! so the agent coalesces more. A session that falls behind retention, or starts
//! without a usable cursor, gets a [`FullBan`] first.
//!
//! Fan-out cost is per session, so two things keep it small with a thousand edges. A
//! batch from the log's tail goes out as bytes encoded once for every session at that
//! cursor (`super::batches`). And after a send, the next one waits until the fan-out
//! window has passed (`super::pacer`): a purge storm reaches each edge as one batch per
//! window instead of one per commit, while a lone purge (nothing sent within the
//! window) goes at once. The window is 10 ms, and grows with the fleet during a storm,
//! when every sender sends on the pacer's shared ticks so the fleet shares one batch per
//! tick. An agent that announces `purge_ranges` gets each run of tag purges in a batch
//! as one range entry (`super::ranges`): fewer bytes for every session to copy and send.

use std::sync::Arc;

use proto::edge::{coordinator_message, CoordinatorMessage, FullBan, PurgeBatch};
use tokio::time::Instant;
use tokio_stream::Stream;
use tonic::Status;

use super::Fanout;
use crate::edges::SessionHandle;
use crate::purge::log::{PurgeLog, Restored};

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

/// Decides how an agent with cursor (`log_id`, `applied`) resumes against the log
/// (`restored_from`: the log a restored backup was taken from, see
/// `crate::purge::log::Restored`).
///
/// A cursor of the backed-up log at or below the backup's head counts the same purges
/// in the restored log, so it resumes; one past that head applied purges the restored
/// log never had, and whose sequences it hands out again: a full ban, never a gap.
pub fn resume_point(
    log_id: &str,
    restored_from: Option<&Restored>,
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
    if let Some(from) = restored_from.filter(|r| r.log_id == cursor_log && cursor_log != log_id) {
        if applied > from.head {
            return ResumePoint::FullBan {
                head,
                reason: "cursor is past the head of the backup this log was restored from",
            };
        }
        return resume_in_log(first, head, applied);
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
    resume_in_log(first, head, applied)
}

/// A cursor of this log's sequences, not ahead of it: resume unless retention dropped
/// what follows it.
fn resume_in_log(first: u64, head: u64, applied: u64) -> ResumePoint {
    if applied + 1 < first {
        return ResumePoint::FullBan {
            head,
            reason: "cursor is older than the log's retention",
        };
    }
    ResumePoint::From(applied + 1)
}

/// The purges for one agent, from `resume` on, as a stream the session's gRPC response
/// polls itself, paced and sharing encoded batches through `fanout`; `ranges`: the agent
/// takes range entries (`super::ranges`).
pub fn feed(
    log: PurgeLog,
    resume: ResumePoint,
    handle: SessionHandle,
    fanout: Arc<Fanout>,
    ranges: bool,
) -> impl Stream<Item = Result<CoordinatorMessage, Status>> + Send {
    let (opening_ban, next) = match resume {
        ResumePoint::From(seq) => (None, seq),
        ResumePoint::FullBan { head, reason } => {
            let ban = FullBan {
                up_to_seq: head,
                log_id: log.log_id().to_owned(),
                reason: reason.to_owned(),
            };
            (Some(ban), head + 1)
        }
    };
    let feed = Feed {
        cancelled: Box::pin(handle.cancel.clone().cancelled_owned()),
        head_rx: log.subscribe(),
        log,
        handle,
        fanout,
        ranges,
        opening_ban,
        next,
        up_to: None,
        last_sent: None,
        last_tick: None,
        failed: false,
    };
    futures_util::stream::unfold(feed, |mut feed| async move {
        let msg = feed.next().await?;
        Some((msg, feed))
    })
}

/// A session's position in the log and its pacing.
struct Feed {
    /// The session's end, registered once (not once per wait).
    cancelled: std::pin::Pin<Box<tokio_util::sync::WaitForCancellationFutureOwned>>,
    log: PurgeLog,
    head_rx: tokio::sync::watch::Receiver<u64>,
    handle: SessionHandle,
    fanout: Arc<Fanout>,
    ranges: bool,
    /// A full ban owed before the first entry (no usable cursor).
    opening_ban: Option<FullBan>,
    /// The next sequence to send.
    next: u64,
    /// Sequences up to this one are due now (the head at the last tick or wake-up).
    up_to: Option<u64>,
    last_sent: Option<Instant>,
    last_tick: Option<Instant>,
    /// The log could not be read: the stream ends after saying so.
    failed: bool,
}

impl Feed {
    /// The next message for the agent, once it is due; `None` when the session ends.
    async fn next(&mut self) -> Option<Result<CoordinatorMessage, Status>> {
        if let Some(ban) = self.opening_ban.take() {
            return Some(message(coordinator_message::Msg::FullBan(ban)));
        }
        loop {
            if self.failed || self.handle.cancel.is_cancelled() {
                return None;
            }
            let up_to = match self.up_to.filter(|u| self.next <= *u) {
                Some(u) => u,
                None => self.due().await?,
            };
            self.up_to = Some(up_to);
            if self.next < self.log.first() {
                // Retention overtook a live session that fell this far behind.
                let head = self.log.head();
                self.next = head + 1;
                let ban = FullBan {
                    up_to_seq: head,
                    log_id: self.log.log_id().to_owned(),
                    reason: "edge fell behind the log's retention".to_owned(),
                };
                return Some(message(coordinator_message::Msg::FullBan(ban)));
            }
            let read =
                self.fanout
                    .batches
                    .read(&self.log, self.next, up_to, BATCH_ENTRIES, self.ranges);
            let batch = match read {
                Some((last, encoded)) => {
                    self.next = last + 1;
                    PurgeBatch {
                        entries: Vec::new(),
                        encoded,
                    }
                }
                None => match self.log.read_from(self.next, BATCH_ENTRIES).await {
                    Ok(entries) if !entries.is_empty() => {
                        self.next = entries.last().map_or(self.next, |e| e.seq + 1);
                        PurgeBatch {
                            entries: entries.iter().map(|e| (**e).clone()).collect(),
                            encoded: Default::default(),
                        }
                    }
                    Ok(_) => {
                        self.up_to = None;
                        continue;
                    }
                    Err(e) => {
                        tracing::error!(error = %e, edge = %self.handle.edge_id, "reading the purge log failed");
                        self.failed = true;
                        return Some(Err(Status::unavailable("purge log unavailable")));
                    }
                },
            };
            self.last_sent = Some(Instant::now());
            return Some(message(coordinator_message::Msg::Purges(batch)));
        }
    }

    /// Waits until entries after the cursor are due (the head has passed it and the
    /// fan-out window allows a send) and returns the last one due; `None` when the
    /// session ends.
    async fn due(&mut self) -> Option<u64> {
        while self.next > self.log.head() {
            tokio::select! {
                _ = &mut self.cancelled => return None,
                changed = self.head_rx.changed() => changed.ok()?,
            }
        }
        let pacer = &self.fanout.pacer;
        let window = pacer.window(self.log.head());
        // In a storm, on the fleet's clock: one batch per tick, up to the head at the tick.
        let tick = pacer.storm().then(|| {
            let tick = pacer.tick(window, Instant::now());
            match self.last_tick {
                Some(t) if t >= tick => tick + window,
                _ => tick,
            }
        });
        if tick.is_some() {
            self.last_tick = tick;
        }
        let wait = tick.or_else(|| {
            self.last_sent
                .filter(|at| at.elapsed() < window)
                .map(|at| at + window)
        });
        if let Some(until) = wait.filter(|at| *at > Instant::now()) {
            tokio::select! {
                _ = &mut self.cancelled => return None,
                _ = tokio::time::sleep_until(until) => {}
            }
        }
        Some(match tick {
            Some(tick) => pacer.head_at(tick, self.log.head()),
            None => self.log.head(),
        })
    }
}

#[allow(clippy::result_large_err)] // the item type of tonic's response stream
fn message(msg: coordinator_message::Msg) -> Result<CoordinatorMessage, Status> {
    Ok(CoordinatorMessage { msg: Some(msg) })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::edges::{EdgeHello, EdgeRegistry};
    use crate::purge::log::{NewPurge, Retention};
    use prost::Message;
    use proto::codec::WireEncode;
    use std::time::Duration;
    use tokio_stream::StreamExt;
    use tokio_util::sync::CancellationToken;

    /// The sequences a batch message carries (encoded or not).
    fn seqs(msg: Result<CoordinatorMessage, Status>) -> Vec<u64> {
        let msg = msg.expect("a message");
        let mut wire = Vec::new();
        msg.encode_wire(&mut wire);
        match CoordinatorMessage::decode(wire.as_slice())
            .expect("decode")
            .msg
        {
            Some(coordinator_message::Msg::Purges(b)) => b.entries.iter().map(|e| e.seq).collect(),
            other => panic!("not a batch: {other:?}"),
        }
    }

    #[tokio::test]
    async fn the_feed_owes_the_full_ban_first_then_yields_what_is_due_and_ends_with_the_session() {
        let dir = tempfile::tempdir().unwrap();
        let retention = Retention {
            max_entries: u64::MAX,
            max_age: Duration::from_secs(3600),
        };
        let log = PurgeLog::open(dir.path(), retention).unwrap();
        for t in ["a", "b", "c"] {
            log.append(vec![NewPurge::tag(t)]).await.unwrap();
        }
        let edges = EdgeRegistry::default();
        let shutdown = CancellationToken::new();
        let hello = EdgeHello {
            id: "e1".into(),
            region: "eu".into(),
            varnish_version: String::new(),
            purge_mode: "ban".into(),
            agent_version: String::new(),
            cert_not_after: None,
        };
        let handle = edges.connect(hello, 0, &shutdown);
        let resume = ResumePoint::FullBan {
            head: 2,
            reason: "no cursor",
        };
        let fanout = Arc::new(Fanout::default());
        let mut out = Box::pin(feed(log.clone(), resume, handle.clone(), fanout, false));
        match out
            .next()
            .await
            .expect("a message")
            .expect("not an error")
            .msg
        {
            Some(coordinator_message::Msg::FullBan(b)) => assert_eq!(b.up_to_seq, 2),
            other => panic!("expected the full ban first: {other:?}"),
        }
        // After the ban: only what it did not cover.
        assert_eq!(seqs(out.next().await.expect("a batch")), vec![3]);
        // Nothing due: the feed waits for the head.
        let waiting = tokio::time::timeout(Duration::from_millis(50), out.next()).await;
        assert!(waiting.is_err(), "nothing was due");
        log.append(vec![NewPurge::tag("d"), NewPurge::tag("e")])
            .await
            .unwrap();
        assert_eq!(seqs(out.next().await.expect("a batch")), vec![4, 5]);
        // The session ends (its report reader stopped): so does the feed, even waiting.
        handle.cancel.cancel();
        let ended = tokio::time::timeout(Duration::from_secs(5), out.next()).await;
        assert!(matches!(ended, Ok(None)), "the feed ended");
    }

    #[test]
    fn resume_rules() {
        assert!(matches!(
            resume_point("L", None, 1, 10, "", 0),
            ResumePoint::FullBan { .. }
        ));
        assert_eq!(resume_point("L", None, 1, 10, "L", 4), ResumePoint::From(5));
        assert_eq!(resume_point("L", None, 5, 10, "L", 4), ResumePoint::From(5));
        assert!(matches!(
            resume_point("L", None, 6, 10, "L", 4),
            ResumePoint::FullBan { .. }
        ));
        assert!(matches!(
            resume_point("L", None, 1, 10, "X", 4),
            ResumePoint::FullBan { .. }
        ));
        assert!(matches!(
            resume_point("L", None, 1, 10, "L", 11),
            ResumePoint::FullBan { .. }
        ));
        assert_eq!(
            resume_point("L", None, 11, 10, "L", 10),
            ResumePoint::From(11)
        );
    }

    #[test]
    fn after_a_restore_a_cursor_past_the_backup_gets_a_full_ban_and_one_below_resumes() {
        // "N" was restored from a backup of "O" taken at head 100; N has logged 101..=130.
        let from = Restored {
            log_id: "O".into(),
            head: 100,
        };
        let at = |cursor: &str, applied| resume_point("N", Some(&from), 1, 130, cursor, applied);
        assert_eq!(
            at("O", 60),
            ResumePoint::From(61),
            "behind the backup: resumes"
        );
        assert_eq!(at("O", 100), ResumePoint::From(101), "at the backup's head");
        // Applied 101..=120 of O: N's 101..=120 are other purges. Never a silent gap.
        assert!(matches!(at("O", 120), ResumePoint::FullBan { .. }));
        assert!(matches!(at("O", 101), ResumePoint::FullBan { .. }));
        assert!(
            matches!(at("O", 200), ResumePoint::FullBan { .. }),
            "past N's head too"
        );
        // The restored log's own cursors, and other logs, as always.
        assert_eq!(at("N", 120), ResumePoint::From(121));
        assert!(matches!(at("X", 50), ResumePoint::FullBan { .. }));
        assert!(matches!(at("", 0), ResumePoint::FullBan { .. }));
        // Retention of the restored log still applies to an old cursor.
        let trimmed = resume_point("N", Some(&from), 90, 130, "O", 60);
        assert!(matches!(trimmed, ResumePoint::FullBan { .. }));
        assert_eq!(
            resume_point("N", Some(&from), 90, 130, "O", 89),
            ResumePoint::From(90)
        );
    }
}
