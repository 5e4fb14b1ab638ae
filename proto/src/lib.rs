//! The gRPC contract between the coordinator and its edge agents.
//!
//! `proto/edge.proto` is the source of truth; `build.rs` compiles it with protox (pure
//! Rust) so no system `protoc` is needed. Everything is re-exported under [`edge`].
//!
//! One bidirectional stream per agent (`Coordinator/Session`): the agent dials out, says
//! [`edge::Hello`] with its cursor, and the coordinator answers [`edge::Welcome`] followed
//! by purge batches. Payloads are `oneof` members, so new kinds of message can be added
//! without breaking old peers (see the rules at the top of the `.proto`).

pub mod codec;
pub mod vcl;
pub mod version;

/// Generated types and service stubs for package `edge.v1`.
#[allow(clippy::all, missing_docs)]
pub mod edge {
    tonic::include_proto!("edge.v1");
}

pub use edge::coordinator_client::CoordinatorClient;
pub use edge::coordinator_server::{Coordinator, CoordinatorServer};

/// Capability an agent announces when it understands [`edge::FullBan`].
pub const CAP_FULL_BAN: &str = "full_ban";
/// Capability an agent announces when it can apply soft purges (xkey mode).
pub const CAP_SOFT_PURGE: &str = "soft_purge";
/// Capability an agent announces when it applies [`edge::ApplyConfig`] bundles.
pub const CAP_CONFIG: &str = "config";
/// Capability an agent announces when it runs [`edge::ProbePlan`]s.
pub const CAP_PROBES: &str = "probes";
/// Capability an agent announces when it runs [`edge::WarmShard`]s.
pub const CAP_WARM: &str = "warm";
/// Capability an agent announces when it applies an entry standing for a range of
/// purges ([`edge::PurgeEntry::first_seq`]).
pub const CAP_PURGE_RANGES: &str = "purge_ranges";

/// Response metadata key a coordinator sets when it refuses or ends a session for a
/// reason the agent acts on (see the `.proto`).
pub const REFUSAL_KEY: &str = "x-vc-refusal";
/// [`REFUSAL_KEY`]: another agent holds a live session for this edge id.
pub const REFUSAL_DUPLICATE: &str = "duplicate_edge_id";
/// [`REFUSAL_KEY`]: the coordinator hands its agents to another one (it cannot reach its
/// store); dial the next coordinator.
pub const REFUSAL_HANDOFF: &str = "handoff";
/// [`REFUSAL_KEY`]: the agent's protocol version is outside the coordinator's window
/// ([`version::window`]); the message names both versions.
pub const REFUSAL_PROTOCOL: &str = "protocol_version";

/// Why a coordinator refused or ended a session, from the status it sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// Another agent holds a live session for this edge id ([`REFUSAL_DUPLICATE`]).
    DuplicateEdgeId,
    /// The coordinator hands its agents to another one ([`REFUSAL_HANDOFF`]).
    Handoff,
    /// The agent's protocol version is outside the coordinator's window
    /// ([`REFUSAL_PROTOCOL`]).
    ProtocolVersion,
}

impl Refusal {
    /// The refusal a status carries, if any.
    pub fn of(status: &tonic::Status) -> Option<Refusal> {
        match status.metadata().get(REFUSAL_KEY)?.to_str().ok()? {
            REFUSAL_DUPLICATE => Some(Refusal::DuplicateEdgeId),
            REFUSAL_HANDOFF => Some(Refusal::Handoff),
            REFUSAL_PROTOCOL => Some(Refusal::ProtocolVersion),
            _ => None,
        }
    }

    /// A status carrying this refusal with `message`.
    pub fn status(self, message: String) -> tonic::Status {
        let (mut status, tag) = match self {
            Refusal::DuplicateEdgeId => (tonic::Status::already_exists(message), REFUSAL_DUPLICATE),
            Refusal::Handoff => (tonic::Status::unavailable(message), REFUSAL_HANDOFF),
            Refusal::ProtocolVersion => (
                tonic::Status::failed_precondition(message),
                REFUSAL_PROTOCOL,
            ),
        };
        status.metadata_mut().insert(
            REFUSAL_KEY,
            tonic::metadata::MetadataValue::from_static(tag),
        );
        status
    }
}

impl edge::PurgeEntry {
    /// The oldest purge this entry stands for: `seq`, or `first_seq` for a range.
    pub fn first(&self) -> u64 {
        if self.first_seq != 0 && self.first_seq < self.seq {
            self.first_seq
        } else {
            self.seq
        }
    }
}

/// Upper bounds (seconds) of the served-time histogram agents report in
/// [`edge::VarnishStats::served_buckets`]: a cache hit is well under a millisecond, a
/// Magento miss hundreds of milliseconds to seconds.
pub const SERVED_BUCKETS_S: [f64; 12] = [
    0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_refusal_survives_the_status_it_is_sent_in() {
        for r in [
            Refusal::DuplicateEdgeId,
            Refusal::Handoff,
            Refusal::ProtocolVersion,
        ] {
            let s = r.status("why".into());
            assert_eq!(Refusal::of(&s), Some(r));
            // As the client reads it: from the headers/trailers map.
            let http = s.clone().into_http();
            let back = tonic::Status::from_header_map(http.headers()).unwrap();
            assert_eq!(Refusal::of(&back), Some(r));
            assert_eq!(back.message(), "why");
        }
        assert_eq!(
            Refusal::DuplicateEdgeId.status(String::new()).code(),
            tonic::Code::AlreadyExists
        );
        assert_eq!(
            Refusal::Handoff.status(String::new()).code(),
            tonic::Code::Unavailable
        );
        assert_eq!(Refusal::of(&tonic::Status::unavailable("down")), None);
    }
}
