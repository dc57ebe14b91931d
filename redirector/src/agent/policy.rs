//! The agent's pure decisions, each a small function with its own tests: which clients to
//! shed, how to split them over offers, how much room a volunteer has, how long to wait
//! before trying again.

use std::{
    collections::HashMap,
    net::IpAddr,
    time::{Duration, Instant},
};

use crate::peer::MovedClient;

/// The shedding policy: the clients with the most connections first, until the projected load
/// is at or below `low`. One function, easy to change.
#[must_use]
pub fn pick_clients(clients: &[(IpAddr, u64)], total: u64, low: u64) -> Vec<(IpAddr, u64)> {
    let mut sorted: Vec<(IpAddr, u64)> = clients.to_vec();
    sorted.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
    let mut projected = total;
    let mut out = Vec::new();
    for c in sorted {
        if projected <= low {
            break;
        }
        projected = projected.saturating_sub(c.1);
        out.push(c);
    }
    out
}

/// Which moved clients (address, connections when they moved) come home to an origin whose
/// projected load is `projected`: the largest first, each one that still fits at or under
/// `low` (a lull must not bring back more than the node can take without shedding again).
#[must_use]
pub fn pick_home(moved: &[(IpAddr, u64)], projected: u64, low: u64) -> Vec<IpAddr> {
    let mut sorted: Vec<(IpAddr, u64)> = moved.to_vec();
    sorted.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
    let mut room = low.saturating_sub(projected);
    let mut out = Vec::new();
    for (c, n) in sorted {
        let w = weight(n);
        if w <= room {
            room -= w;
            out.push(c);
        }
    }
    out
}

/// Room a client takes on a volunteer: its connections, and at least one (a client moves
/// because it will connect).
#[must_use]
pub fn weight(connections: u64) -> u64 {
    connections.max(1)
}

/// Connections a transfer brings, or `None` if a peer's numbers overflow.
#[must_use]
pub fn transfer_weight(clients: &[MovedClient]) -> Option<u64> {
    clients.iter().try_fold(0u64, |sum, c| sum.checked_add(weight(c.connections)))
}

/// Room a volunteer can offer: up to its high watermark, after its load, the capacity it
/// reserved for offers in flight, and the connections it promised to adopted clients that
/// have not arrived yet.
#[must_use]
pub fn room(high: u64, load: u64, reserved: u64, promised: u64) -> u64 {
    high.saturating_sub(load.saturating_add(reserved).saturating_add(promised))
}

/// Connections promised to adopted clients and not arrived yet: per client, what the origin
/// said it had minus what it has here now (never below zero).
#[must_use]
pub fn promised(adopted: impl IntoIterator<Item = (u64, u64)>) -> u64 {
    adopted.into_iter().fold(0u64, |sum, (promised, here)| sum.saturating_add(promised.saturating_sub(here)))
}

/// A volunteer's offer as the origin plans with it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Offer {
    pub sibling: String,
    pub capacity: u64,
    /// Families the sibling can take clients of (it and this node have a control address of
    /// that family): (IPv4, IPv6).
    pub families: (bool, bool),
}

impl Offer {
    fn takes(&self, a: IpAddr) -> bool {
        if a.is_ipv4() { self.families.0 } else { self.families.1 }
    }
}

/// How clients are split over offers.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Plan {
    /// Per volunteer, the clients it takes.
    pub moves: HashMap<String, Vec<MovedClient>>,
    /// Clients no offer fits (too big for every remaining room, or of a family no volunteer
    /// takes).
    pub unplaced: Vec<(IpAddr, u64)>,
}

/// Splits `picked` (largest first) over `offers`: each client goes to the largest offer that
/// still has room for it and takes its family.
#[must_use]
pub fn plan<S: std::hash::BuildHasher>(picked: &[(IpAddr, u64)], offers: &[Offer], bound: &HashMap<IpAddr, String, S>) -> Plan {
    let mut room: Vec<Offer> = offers.to_vec();
    room.sort_by(|a, b| b.capacity.cmp(&a.capacity).then(a.sibling.cmp(&b.sibling)));
    let mut p = Plan::default();
    for &(addr, n) in picked {
        let may_go = |o: &Offer| bound.get(&addr).is_none_or(|b| *b == o.sibling);
        match room.iter_mut().find(|o| o.takes(addr) && may_go(o) && o.capacity >= weight(n)) {
            Some(o) => {
                o.capacity -= weight(n);
                p.moves.entry(o.sibling.clone()).or_default().push(MovedClient { addr, connections: n });
            }
            None => p.unplaced.push((addr, n)),
        }
    }
    p
}

/// A token bucket: `burst` at once, then `rate` a second.
#[derive(Debug)]
pub struct TokenBucket {
    rate: f64,
    burst: f64,
    tokens: f64,
    at: Instant,
}

impl TokenBucket {
    /// Full at `now`.
    #[must_use]
    pub fn new(rate: f64, burst: f64, now: Instant) -> Self {
        Self { rate, burst, tokens: burst, at: now }
    }

    /// Takes a token at `now`, if there is one.
    pub fn take(&mut self, now: Instant) -> bool {
        self.tokens = (self.tokens + now.saturating_duration_since(self.at).as_secs_f64() * self.rate).min(self.burst);
        self.at = self.at.max(now);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// Exponential back-off: `start`, doubling up to `max`; `reset` after a success.
#[derive(Debug)]
pub struct Backoff {
    start: Duration,
    max: Duration,
    next: Duration,
}

impl Backoff {
    #[must_use]
    pub fn new(start: Duration, max: Duration) -> Self {
        Self { start, max, next: start }
    }

    /// The next wait (each one twice the last, up to the maximum).
    pub fn next_wait(&mut self) -> Duration {
        let d = self.next;
        self.next = (self.next * 2).min(self.max);
        d
    }

    /// Back to the shortest wait.
    pub fn reset(&mut self) {
        self.next = self.start;
    }
}

/// Whether the `n`-th failure in a row is worth a warning: not the first ones (a sibling
/// restarting is normal), then now and then (no log spam while it stays away).
#[must_use]
pub fn warn_on_failure(n: u32) -> bool {
    n == 3 || (n > 3 && n.is_multiple_of(30))
}

/// "12s ago" style: the age of something `secs` seconds old.
#[must_use]
pub fn ago(secs: u64) -> String {
    match secs {
        0..60 => format!("{secs}s ago"),
        60..3600 => format!("{}m{:02}s ago", secs / 60, secs % 60),
        3600..86_400 => format!("{}h{:02}m ago", secs / 3600, secs % 3600 / 60),
        _ => format!("{}d{:02}h ago", secs / 86_400, secs % 86_400 / 3600),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn c(i: u8, n: u64) -> (IpAddr, u64) {
        (IpAddr::from([198, 18, 1, i]), n)
    }

    #[test]
    fn a_token_bucket_gives_a_burst_then_its_rate() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(10.0, 5.0, t0);
        assert_eq!((0..8).filter(|_| b.take(t0)).count(), 5, "the burst");
        assert!(!b.take(t0 + Duration::from_millis(50)), "half a token");
        assert!(b.take(t0 + Duration::from_millis(100)));
        assert_eq!((0..20).filter(|_| b.take(t0 + Duration::from_mins(1))).count(), 5, "never more than the burst");
    }

    #[test]
    fn policy_moves_the_biggest_clients_until_under_low() {
        let clients = [c(1, 5), c(2, 40), c(3, 10), c(4, 30), c(5, 15)];
        // total 100, low 50: move 40 (->60), then 30 (->30).
        assert_eq!(pick_clients(&clients, 100, 50), vec![c(2, 40), c(4, 30)]);
        assert!(pick_clients(&clients, 40, 50).is_empty(), "already under low");
        assert_eq!(pick_clients(&clients, 100, 0).len(), 5, "never more than there are");
    }

    #[test]
    fn clients_come_home_as_long_as_the_origin_stays_under_low() {
        let moved = [c(1, 5), c(2, 40), c(3, 10), c(4, 0)];
        // Room 52 under low: 40 fits, 10 fits, 5 does not (2 left), the one without a
        // connection counts as one and fits.
        assert_eq!(pick_home(&moved, 48, 100), vec![c(2, 0).0, c(3, 0).0, c(4, 0).0]);
        assert!(pick_home(&moved, 100, 100).is_empty(), "at low: nobody");
        assert!(pick_home(&moved, 150, 100).is_empty(), "over low: nobody");
    }

    #[test]
    fn a_volunteer_keeps_room_for_what_it_promised() {
        // 3 promised, 1 arrived: 2 still promised; 5 promised, 7 arrived: none.
        assert_eq!(promised([(3, 1), (5, 7), (4, 0)]), 6);
        assert_eq!(room(20, 5, 4, 6), 5);
        assert_eq!(room(20, 15, 4, 6), 0, "never below zero");
        assert_eq!(room(u64::MAX, u64::MAX, u64::MAX, u64::MAX), 0, "no overflow on any numbers");
        assert_eq!(promised([(u64::MAX, 0), (u64::MAX, 0)]), u64::MAX);
    }

    #[test]
    fn a_peers_numbers_cannot_overflow_a_transfer() {
        let m = |connections| MovedClient { addr: IpAddr::from([198, 18, 1, 1]), connections };
        assert_eq!(transfer_weight(&[m(3), m(0), m(5)]), Some(9), "a client counts at least one");
        assert_eq!(transfer_weight(&[m(u64::MAX), m(1)]), None);
        assert_eq!(transfer_weight(&[]), Some(0));
    }

    #[test]
    fn clients_go_to_the_largest_offer_that_fits_and_takes_their_family() {
        let v6 = (IpAddr::from(std::net::Ipv6Addr::LOCALHOST), 2);
        let offers = [Offer { sibling: "b".into(), capacity: 10, families: (true, false) }, Offer { sibling: "c".into(), capacity: 6, families: (true, true) }];
        let p = plan(&[c(1, 8), c(2, 5), c(3, 4), v6, c(4, 9)], &offers, &HashMap::new());
        let names = |s: &str| p.moves.get(s).map(|v| v.iter().map(|m| m.connections).collect::<Vec<_>>()).unwrap_or_default();
        assert_eq!(names("b"), vec![8]);
        assert_eq!(names("c"), vec![5]);
        // 4 fits nowhere now (b 2, c 1 left), the IPv6 client only fits c (1 left), 9 nowhere.
        assert_eq!(p.unplaced, vec![c(3, 4), v6, c(4, 9)]);
    }

    /// A client whose rule drains to c (it came home from c a moment ago) may go back to c
    /// only: the kernel refuses another target until the drain ends.
    #[test]
    fn a_client_bound_to_a_volunteer_goes_there_or_stays() {
        let offers = [Offer { sibling: "b".into(), capacity: 10, families: (true, true) }, Offer { sibling: "c".into(), capacity: 1, families: (true, true) }];
        let bound = HashMap::from([(c(1, 1).0, "c".to_string()), (c(2, 1).0, "c".to_string())]);
        let p = plan(&[c(1, 1), c(2, 1), c(3, 1)], &offers, &bound);
        assert_eq!(p.moves.get("c").map(Vec::len), Some(1), "c takes the first, it has room for one");
        assert_eq!(p.moves.get("b").map(|v| v.iter().map(|m| m.addr).collect::<Vec<_>>()), Some(vec![c(3, 1).0]), "b takes the free one only");
        assert_eq!(p.unplaced, vec![c(2, 1)], "the second bound one stays");
    }

    #[test]
    fn backoff_doubles_and_resets() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_millis(500));
        let waits: Vec<u128> = (0..5).map(|_| b.next_wait().as_millis()).collect();
        assert_eq!(waits, [100, 200, 400, 500, 500]);
        b.reset();
        assert_eq!(b.next_wait(), Duration::from_millis(100));
        assert_eq!((1..=100).filter(|n| warn_on_failure(*n)).collect::<Vec<_>>(), [3, 30, 60, 90]);
    }

    #[test]
    fn ages_read_like_people_say_them() {
        assert_eq!(ago(12), "12s ago");
        assert_eq!(ago(75), "1m15s ago");
        assert_eq!(ago(7260), "2h01m ago");
        assert_eq!(ago(90_000), "1d01h ago");
    }
}
