//! High availability among ATMs: the wire format of their messages (authenticated with
//! HMAC-SHA256 and guarded against replays), and the election as a pure state machine that
//! the daemon feeds with heartbeats and clock ticks.
//!
//! The rules are TCL's (reference §7.5.2, §7.5.4.3): every ATM starts as backup and looks for
//! a primary for `dead_after` heartbeats; if none answers, the highest-listed running ATM
//! becomes primary; when the primary stops answering, the highest-listed running backup is
//! promoted; a former primary that comes back stays backup (no preemption). Two primaries that
//! see each other (after a partition heals) keep the one promoted last (higher term); on equal
//! terms, the higher-listed one.

mod election;
mod wire;

pub use election::*;
pub use wire::*;
