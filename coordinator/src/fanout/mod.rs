//! The purge fan-out: how the log reaches every edge, one session at a time, at a cost
//! the coordinator can afford with a thousand of them.
//!
//! - [`feed`]: where a session resumes ([`resume_point`], pure) and the stream of
//!   batches from there, which the session's gRPC response polls itself;
//! - [`pacer`]: the fan-out window ([`pacer::fanout_window`], pure) and the fleet's
//!   clock in a storm;
//! - [`batches`]: the last batches encoded for sessions, shared by every session at the
//!   same cursor;
//! - [`ranges`]: runs of tag purges merged into one range entry, for agents that take them.
//!
//! [`Fanout`] is what every session's feed shares: one per coordinator, in its state.
//! Nothing here appends to the log or waits on Magento: the purge listener never waits
//! on an edge (it only appends to the log, whose head wakes the feeds).

pub mod batches;
mod feed;
pub mod pacer;
pub mod ranges;

use std::sync::Arc;

pub use feed::{feed, resume_point, ResumePoint};

use crate::metrics::Registry;
use batches::Batches;
use pacer::Pacer;

/// Shared by every session's purge feed: the pace and the encoded batches.
#[derive(Debug, Default)]
pub struct Fanout {
    /// Counts the live senders and keeps the fan-out window and the storm clock.
    pub pacer: Arc<Pacer>,
    /// The batches encoded lately, for sessions at the same cursor to share.
    pub batches: Batches,
}

impl Fanout {
    /// Registers the fan-out window and storm gauges.
    pub fn register_metrics(&self, registry: &mut Registry) {
        self.pacer.register_metrics(registry);
    }
}
