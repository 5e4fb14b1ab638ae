//! Protocol versions: which agents and coordinators work together.
//!
//! Each side says the protocol version it speaks in the session's hello
//! (`Hello.protocol_version` from the agent, `Welcome.protocol_version` from the
//! coordinator). A peer that sends none (0 on the wire: a build from before the field) is
//! protocol 1. The rule, in one place ([`window`], [`check`]): a process speaking
//! protocol `N` works with peers speaking `N-1 ..= N+1`, one version either way. Within
//! it the two use what both understand: capabilities (`Hello.capabilities`) still say
//! which kinds of message the coordinator may send. Outside it the coordinator refuses
//! the session (`x-vc-refusal: protocol_version`, [`crate::Refusal::ProtocolVersion`])
//! and an agent that gets a `Welcome` from outside its own window ends the session; each
//! names both versions ([`Mismatch`]).
//!
//! Protocol 1 is every build from before this check: they send no version and refuse
//! nobody. A process running as protocol 1 therefore checks nothing either, so it
//! behaves exactly as those builds do.
//!
//! When to bump [`PROTOCOL_VERSION`]: for a change an older peer cannot simply ignore (a
//! field whose absence it would misread, a message it must act on). A new optional
//! message behind a capability needs no bump. Peers two versions apart refuse each other,
//! which is why an upgrade goes one version at a time: coordinators first, one at a time,
//! then the agents (docs/upgrade.md).
//!
//! For tests only: `VC_PROTOCOL_VERSION=N` in a process's environment makes it speak
//! protocol `N` instead ([`own`], read once), so today's binaries can play an older or a
//! newer peer. It is not a setting: a fleet never needs it.

use std::ops::RangeInclusive;
use std::sync::OnceLock;

/// The protocol version this build speaks. 1: the builds before versions were said.
pub const PROTOCOL_VERSION: u32 = 2;

/// The environment variable that makes a process speak another protocol version (for
/// tests only: see the module docs).
pub const ENV: &str = "VC_PROTOCOL_VERSION";

/// The protocol version this process speaks: [`PROTOCOL_VERSION`], or for tests the
/// value of [`ENV`] (read once, at first use; a bad value is ignored here, and refused at
/// start by [`from_env`]).
pub fn own() -> u32 {
    static OWN: OnceLock<u32> = OnceLock::new();
    *OWN.get_or_init(|| from_env().ok().flatten().unwrap_or(PROTOCOL_VERSION))
}

/// The protocol version [`ENV`] asks for: `None` when it is not set, an error naming the
/// variable and the value when it is not a version (a positive integer). The binaries
/// call this at start so a bad value stops them with that error.
pub fn from_env() -> Result<Option<u32>, String> {
    match std::env::var(ENV) {
        Err(std::env::VarError::NotPresent) => Ok(None),
        Err(std::env::VarError::NotUnicode(v)) => Err(format!(
            "{ENV}={v:?} is not a protocol version (a whole number from 1; for tests only)"
        )),
        Ok(v) => parse(&v).map(Some),
    }
}

/// A protocol version as [`ENV`] gives it.
fn parse(v: &str) -> Result<u32, String> {
    match v.trim().parse::<u32>() {
        Ok(n) if n >= 1 => Ok(n),
        _ => Err(format!(
            "{ENV}={v:?} is not a protocol version (a whole number from 1; for tests only)"
        )),
    }
}

/// The version a peer speaks, from what it sent: 0 (it predates the field) is 1.
pub fn of_wire(sent: u32) -> u32 {
    sent.max(1)
}

/// The peer versions a process speaking `own` works with: one version either way.
pub fn window(own: u32) -> RangeInclusive<u32> {
    own.saturating_sub(1).max(1)..=own.saturating_add(1)
}

/// `lo..=hi`, as the errors and the API write a window.
pub fn fmt_window(own: u32) -> String {
    let w = window(own);
    format!("{}..={}", w.start(), w.end())
}

/// Whether a process speaking `own` works with a peer that sent `sent`: within
/// [`window`] of it, or always when `own` is 1 (those builds check nothing).
pub fn check(own: u32, sent: u32) -> Result<(), Mismatch> {
    let peer = of_wire(sent);
    if own <= 1 || window(own).contains(&peer) {
        Ok(())
    } else {
        Err(Mismatch { own, peer })
    }
}

/// A peer outside the window: this side speaks `own`, the peer `peer`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Mismatch {
    pub own: u32,
    pub peer: u32,
}

impl Mismatch {
    /// The peer's version against this side's window, as `side` (`coordinator`, `agent`)
    /// says it: `protocol 5, this coordinator speaks 1..=3`.
    pub fn short(&self, side: &str) -> String {
        format!(
            "protocol {}, this {side} speaks {}",
            self.peer,
            fmt_window(self.own)
        )
    }

    /// [`Self::short`] with this side's own version and what to do, for the refusal an
    /// operator reads (`side` is `coordinator` or `agent`).
    pub fn explain(&self, side: &str) -> String {
        let coordinator_older = match side {
            "coordinator" => self.own < self.peer,
            _ => self.peer < self.own,
        };
        let todo = if coordinator_older {
            "upgrade the coordinators first (one at a time), then the agents"
        } else {
            "upgrade the agent to a version within that window"
        };
        let peer = if side == "coordinator" {
            "agent"
        } else {
            "coordinator"
        };
        format!(
            "{peer} speaks protocol {}, this {side} speaks {} (it is protocol {}): {todo}",
            self.peer,
            fmt_window(self.own),
            self.own
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peers_one_version_apart_work_together_and_two_apart_refuse_each_other() {
        assert_eq!(window(2), 1..=3);
        assert_eq!(window(5), 4..=6);
        assert_eq!(window(1), 1..=2, "there is no protocol 0");
        for own in 2..10u32 {
            for peer in 1..12 {
                let ok = own.abs_diff(peer) <= 1;
                assert_eq!(check(own, peer).is_ok(), ok, "{own} and {peer}");
                // Symmetric: both sides (when both check) agree.
                if peer >= 2 {
                    assert_eq!(check(peer, own).is_ok(), ok, "{peer} and {own}");
                }
            }
        }
        assert_eq!(
            check(4, 2),
            Err(Mismatch { own: 4, peer: 2 }),
            "two versions behind"
        );
    }

    #[test]
    fn a_peer_that_says_nothing_is_protocol_1_and_protocol_1_refuses_nobody() {
        assert_eq!(of_wire(0), 1);
        assert_eq!(
            check(PROTOCOL_VERSION, 0),
            Ok(()),
            "today's peers: 0 on the wire"
        );
        assert_eq!(check(3, 0), Err(Mismatch { own: 3, peer: 1 }));
        // Builds from before the check accept anything: a process playing them too.
        for peer in [0, 1, 2, 3, 7, u32::MAX] {
            assert_eq!(check(1, peer), Ok(()));
        }
        assert!(check(u32::MAX, u32::MAX).is_ok());
    }

    #[test]
    fn a_mismatch_names_both_versions_and_who_to_upgrade() {
        let too_new = check(2, 5).unwrap_err();
        assert_eq!(
            too_new.short("coordinator"),
            "protocol 5, this coordinator speaks 1..=3"
        );
        let e = too_new.explain("coordinator");
        assert!(
            e.contains("agent speaks protocol 5, this coordinator speaks 1..=3 (it is protocol 2)"),
            "{e}"
        );
        assert!(e.contains("upgrade the coordinators first"), "{e}");
        let too_old = check(4, 2).unwrap_err().explain("coordinator");
        assert!(too_old.contains("upgrade the agent"), "{too_old}");
        let agent = check(3, 0).unwrap_err().explain("agent");
        assert!(
            agent.starts_with(
                "coordinator speaks protocol 1, this agent speaks 2..=4 (it is protocol 3)"
            ) && agent.contains("upgrade the coordinators first"),
            "{agent}"
        );
        let agent_behind = check(2, 4).unwrap_err().explain("agent");
        assert!(agent_behind.contains("upgrade the agent"), "{agent_behind}");
    }

    #[test]
    fn the_test_knob_takes_a_whole_number_from_1_and_nothing_else() {
        assert_eq!(parse("1"), Ok(1));
        assert_eq!(parse(" 3 "), Ok(3));
        for bad in ["0", "-1", "two", "", "2.0"] {
            let e = parse(bad).unwrap_err();
            assert!(e.contains(ENV) && e.contains(&format!("{bad:?}")), "{e}");
        }
    }
}
