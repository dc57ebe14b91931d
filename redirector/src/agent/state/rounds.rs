//! The origin's shedding rounds: whether one is running, the hysteresis and back-off that say
//! when the next may start, when the load was last low, and what the last one did.

use std::time::Instant;

/// The origin's shedding rounds.
#[derive(Default)]
pub struct Rounds {
    /// A round is running (negotiation and its hand-overs).
    pub negotiating: bool,
    /// After a shedding round, until when a load still above the low watermark (clients still
    /// arriving in the same burst) keeps shedding: the hysteresis goes down to low, not high.
    pub shed_until: Option<Instant>,
    /// After rounds that moved nothing, no round starts before this.
    pub backoff_until: Option<Instant>,
    /// Time of the last successful shedding, threshold crossing (the kernel's clock of the
    /// connection that crossed it) to the round's rules installed.
    pub last_shed_ms: Option<f64>,
    /// When the kernel reported the last crossing of the armed watermark (`CLOCK_MONOTONIC` ns),
    /// until a round starts from it.
    pub crossing_ns: Option<u64>,
    /// When the last rules of a round went into the kernel (`CLOCK_MONOTONIC` ns).
    pub rules_installed_ns: Option<u64>,
    /// What the last shedding round decided, in words.
    pub last_round: Option<String>,
    /// Since when the load this node could shed has been at or under the low watermark (for
    /// taking clients home after `home_after_secs`).
    pub low_since: Option<Instant>,
}
