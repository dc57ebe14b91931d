//! The origin's shedding rounds: whether one is running, the hysteresis and back-off that say
//! when the next may start, when the load was last low, and what the last one did.

use std::time::{Duration, Instant};

/// After a round, how long a load still above the low watermark keeps shedding.
const SHED_ON: Duration = Duration::from_secs(2);

/// A crossing the kernel reported longer ago than this is not the one a round starts from.
const CROSSING_FRESH_NS: u64 = 1_000_000_000;

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

/// What one reading of the load says of shedding.
#[derive(Debug, PartialEq, Eq)]
pub struct Seen {
    /// A round starts now ([`Rounds::begin`]).
    pub start: bool,
    /// The load is over the high watermark (otherwise a start continues the last round).
    pub over: bool,
}

impl Rounds {
    /// The load this node could shed is `projected` at `now`: notes since when it is at or
    /// under `low`, and says whether a round starts: over `high`, or still above `low` shortly
    /// after a round (the hysteresis goes down to low); never while one runs, the back-off
    /// holds, or the agent is `leaving`.
    pub fn see(&mut self, projected: u64, low: u64, high: u64, leaving: bool, now: Instant) -> Seen {
        if projected <= low {
            self.shed_until = None;
            self.low_since.get_or_insert(now);
        } else {
            self.low_since = None;
        }
        let over = projected > high;
        let continuing = projected > low && self.shed_until.is_some_and(|t| now < t);
        let waiting = self.backoff_until.is_some_and(|t| now < t);
        Seen { start: !leaving && !self.negotiating && !waiting && (over || continuing), over }
    }

    /// Whether the load has been low for `home_after` (never when that is zero): clients may
    /// come home; the wait starts again.
    pub fn home_due(&mut self, home_after: Duration, now: Instant) -> bool {
        let due = !home_after.is_zero() && self.low_since.is_some_and(|t| now.duration_since(t) >= home_after);
        if due {
            self.low_since = Some(now);
        }
        due
    }

    /// The kernel reported a crossing of the armed watermark at `at_ns` (`CLOCK_MONOTONIC`).
    pub fn crossed(&mut self, at_ns: u64) {
        self.crossing_ns = Some(at_ns);
    }

    /// A round begins at `now_ns`; returns the crossing it starts from: the kernel's report
    /// if recent, otherwise now.
    pub fn begin(&mut self, now_ns: u64) -> u64 {
        self.negotiating = true;
        self.crossing_ns.take().filter(|c| now_ns.saturating_sub(*c) < CROSSING_FRESH_NS).unwrap_or(now_ns)
    }

    /// A round's rules went into the kernel at `at_ns`.
    pub fn rules_installed(&mut self, at_ns: u64) {
        self.rules_installed_ns = Some(at_ns);
    }

    /// A round that started from `crossing_ns` moved `moved` clients: returns the time from the
    /// crossing to its last rules installed, recorded as the last shedding's when it moved any.
    pub fn shed(&mut self, moved: usize, crossing_ns: u64) -> Option<f64> {
        #[expect(clippy::cast_precision_loss, reason = "nanoseconds of a round")]
        let steered_ms = self.rules_installed_ns.map(|r| r.saturating_sub(crossing_ns) as f64 / 1e6);
        if moved > 0 {
            self.last_shed_ms = steered_ms;
        }
        steered_ms
    }

    /// The round ended at `now`: a load still above low keeps shedding for a while; after one
    /// that moved nothing, the next waits `backoff`.
    pub fn end(&mut self, backoff: Option<Duration>, now: Instant) {
        self.negotiating = false;
        self.shed_until = Some(now + SHED_ON);
        self.backoff_until = backoff.map(|w| now + w);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LOW: u64 = 10;
    const HIGH: u64 = 20;

    fn start(r: &mut Rounds, projected: u64, now: Instant) -> bool {
        r.see(projected, LOW, HIGH, false, now).start
    }

    #[test]
    fn a_round_starts_over_high_one_at_a_time() {
        let (mut r, now) = (Rounds::default(), Instant::now());
        assert_eq!(r.see(HIGH, LOW, HIGH, false, now), Seen { start: false, over: false }, "at high: nothing");
        assert_eq!(r.see(HIGH + 1, LOW, HIGH, false, now), Seen { start: true, over: true });
        assert!(!r.see(HIGH + 1, LOW, HIGH, true, now).start, "never while leaving");
        r.begin(1);
        assert!(!start(&mut r, HIGH + 1, now), "never while one runs");
    }

    #[test]
    fn after_a_round_shedding_goes_on_down_to_low_for_a_while() {
        let (mut r, now) = (Rounds::default(), Instant::now());
        assert!(!start(&mut r, LOW + 1, now), "above low only: no round");
        r.begin(1);
        r.end(None, now);
        assert_eq!(r.see(LOW + 1, LOW, HIGH, false, now), Seen { start: true, over: false }, "continues");
        assert!(!start(&mut r, LOW + 1, now + SHED_ON), "not past the hysteresis");
        r.end(None, now);
        assert!(!start(&mut r, LOW, now), "low reached");
        assert!(!start(&mut r, LOW + 1, now), "and the hysteresis is over");
    }

    #[test]
    fn after_a_round_that_moved_nothing_the_next_waits() {
        let (mut r, now) = (Rounds::default(), Instant::now());
        r.begin(1);
        r.end(Some(Duration::from_secs(1)), now);
        assert!(!start(&mut r, HIGH + 1, now + Duration::from_millis(999)));
        assert!(start(&mut r, HIGH + 1, now + Duration::from_secs(1)));
    }

    #[test]
    fn clients_come_home_after_the_load_stayed_low_long_enough() {
        let (mut r, now) = (Rounds::default(), Instant::now());
        let after = Duration::from_secs(5);
        r.see(LOW, LOW, HIGH, false, now);
        r.see(LOW, LOW, HIGH, false, now + Duration::from_secs(3));
        assert!(!r.home_due(after, now + Duration::from_secs(4)));
        assert!(r.home_due(after, now + after), "low since the first reading");
        assert!(!r.home_due(after, now + after + Duration::from_secs(1)), "the wait starts again");
        r.see(LOW + 1, LOW, HIGH, false, now + after * 3);
        assert!(!r.home_due(after, now + after * 3), "no longer low");
        r.see(0, LOW, HIGH, false, now);
        assert!(!r.home_due(Duration::ZERO, now + after * 9), "zero: never");
    }

    #[test]
    fn a_round_starts_from_a_recent_crossing_and_times_its_rules() {
        let mut r = Rounds::default();
        r.crossed(5_000_000_000);
        assert_eq!(r.begin(5_500_000_000), 5_000_000_000, "the kernel's crossing");
        assert!(r.negotiating);
        assert_eq!(r.begin(9_000_000_000), 9_000_000_000, "taken once: now");
        r.crossed(1_000_000_000);
        assert_eq!(r.begin(3_000_000_000), 3_000_000_000, "too old: now");
        assert_eq!(r.shed(1, 0), None, "no rules went in");
        r.rules_installed(5_250_000_000);
        assert_eq!(r.shed(0, 5_000_000_000), Some(250.0));
        assert_eq!(r.last_shed_ms, None, "moved nothing: not recorded");
        assert_eq!(r.shed(2, 5_000_000_000), Some(250.0));
        assert_eq!(r.last_shed_ms, Some(250.0));
    }
}
