//! The control port's gate: connections that have not proved who they are yet (TLS handshake
//! and hello) are bounded, in all and per source address, and their failures are logged at a
//! bounded rate. A flood of such connections then costs the agent a few dozen descriptors and
//! a line a second, its other sockets (hook, admin, probes, the lock) stay available, and the
//! configured siblings, whose addresses have room of their own, still link up.

use std::{
    collections::HashMap,
    net::IpAddr,
    sync::{Arc, Mutex},
    time::Instant,
};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use super::policy::TokenBucket;

/// Connections of sources that are not configured siblings in their handshake at once.
pub const MAX_HANDSHAKES: usize = 64;

/// Connections of one source address in their handshake at once: an agent opens one to each
/// sibling (a second while the first is being replaced).
pub const MAX_PER_SOURCE: u32 = 4;

/// Log lines about refused or failed handshakes: a burst of this many, then one a second.
const LOG_BURST: f64 = 10.0;

/// Why a connection was closed at once.
#[derive(Debug, PartialEq, Eq)]
pub enum Closed {
    /// Its source is not a configured sibling's control address, and only those are accepted.
    NotASibling,
    /// Its source has [`MAX_PER_SOURCE`] connections in their handshake already.
    SourceBusy,
    /// [`MAX_HANDSHAKES`] connections of strangers are in their handshake already.
    Full,
}

impl std::fmt::Display for Closed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Closed::NotASibling => "not a configured sibling's control address (control_siblings_only)",
            Closed::SourceBusy => "too many handshakes from this address at once",
            Closed::Full => "too many handshakes in progress",
        })
    }
}

/// The gate.
pub struct Gate {
    strangers: Arc<Semaphore>,
    per_source: Mutex<HashMap<IpAddr, u32>>,
    log: Mutex<Bucket>,
}

/// A connection let through, until it proved who it is (or failed to): dropped, it frees its
/// place.
pub struct Pass {
    gate: Arc<Gate>,
    source: IpAddr,
    _stranger: Option<OwnedSemaphorePermit>,
}

impl Drop for Pass {
    fn drop(&mut self) {
        let mut per = self.gate.per_source.lock().expect("lock");
        if let Some(n) = per.get_mut(&self.source) {
            *n -= 1;
            if *n == 0 {
                per.remove(&self.source);
            }
        }
    }
}

/// Log lines' tokens, counting what they held back.
struct Bucket {
    tokens: TokenBucket,
    held_back: u64,
}

impl Gate {
    #[must_use]
    pub fn new() -> Arc<Self> {
        Arc::new(Self {
            strangers: Arc::new(Semaphore::new(MAX_HANDSHAKES)),
            per_source: Mutex::default(),
            log: Mutex::new(Bucket { tokens: TokenBucket::new(1.0, LOG_BURST, Instant::now()), held_back: 0 }),
        })
    }

    /// Lets a connection from `source` start its handshake, or says why not. `sibling`:
    /// `source` is a configured sibling's control address (it does not wait behind
    /// strangers); `siblings_only`: nothing else is let through.
    pub fn admit(self: &Arc<Self>, source: IpAddr, sibling: bool, siblings_only: bool) -> Result<Pass, Closed> {
        if siblings_only && !sibling {
            return Err(Closed::NotASibling);
        }
        let stranger = if sibling { None } else { Some(self.strangers.clone().try_acquire_owned().map_err(|_| Closed::Full)?) };
        let mut per = self.per_source.lock().expect("lock");
        let n = per.entry(source).or_insert(0);
        if *n >= MAX_PER_SOURCE {
            return Err(Closed::SourceBusy);
        }
        *n += 1;
        Ok(Pass { gate: self.clone(), source, _stranger: stranger })
    }

    /// Whether a line about a refused or failed handshake may be logged now, and how many
    /// were held back since the last one.
    pub fn may_log(&self) -> Option<u64> {
        self.may_log_at(Instant::now())
    }

    fn may_log_at(&self, now: Instant) -> Option<u64> {
        let mut b = self.log.lock().expect("lock");
        if b.tokens.take(now) {
            Some(std::mem::take(&mut b.held_back))
        } else {
            b.held_back += 1;
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn strangers_are_bounded_per_source_and_in_all_and_siblings_keep_their_room() {
        let g = Gate::new();
        let one: Vec<Pass> = (0..MAX_PER_SOURCE).map(|_| g.admit(ip("198.18.1.1"), false, false).unwrap()).collect();
        assert_eq!(g.admit(ip("198.18.1.1"), false, false).err(), Some(Closed::SourceBusy));
        let mut many = Vec::new();
        for i in 0..=255u8 {
            for j in 0..MAX_PER_SOURCE {
                match g.admit(IpAddr::from([198, 18, 2, i]), false, false) {
                    Ok(p) => many.push(p),
                    Err(e) => {
                        assert_eq!(e, Closed::Full, "{i}/{j}");
                    }
                }
            }
        }
        assert_eq!(one.len() + many.len(), MAX_HANDSHAKES, "strangers in all");
        // A sibling's address is let through while strangers fill the gate.
        let sib = g.admit(ip("198.18.0.2"), true, false).expect("a sibling has room of its own");
        drop(many);
        assert!(g.admit(ip("198.18.2.7"), false, false).is_ok(), "places come back when passes end");
        drop((one, sib));
        assert!(g.per_source.lock().unwrap().values().all(|n| *n > 0), "no empty counts kept");
        assert_eq!(g.admit(ip("198.18.1.1"), false, true).err(), Some(Closed::NotASibling));
        assert!(g.admit(ip("198.18.0.2"), true, true).is_ok());
    }

    #[test]
    fn log_lines_come_in_a_burst_then_one_a_second_counting_the_rest() {
        let g = Gate::new();
        let burst = (0..100).filter(|_| g.may_log().is_some()).count();
        assert_eq!(burst, 10);
        let later = Instant::now() + std::time::Duration::from_secs(1);
        assert_eq!(g.may_log_at(later), Some(90), "the next line says how many were held back");
        assert_eq!(g.may_log_at(later), None, "one a second");
    }
}
