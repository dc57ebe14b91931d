//! What the agent counts as hand-overs end, for whoever watches it (the metrics endpoint reads
//! these together with the status). Counted once, where every hand-over this node starts ends
//! ([`Agent::conclude`](super::Agent)), in both directions.

use std::time::Duration;

use prometheus_client::metrics::{
    counter::Counter,
    family::Family,
    histogram::{Histogram, exponential_buckets},
};

use super::records::Dir;

/// Where a hand-over that aborted stopped: a label of `redirector_handoffs_aborted_total`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stage {
    /// This node's application did not export (out).
    Export,
    /// The volunteer refused, or the exchange with it failed (its export back, the link, a
    /// timeout, a check of what arrived).
    Transfer,
    /// The rules could not be changed (the commit point was not reached).
    Rules,
    /// Decided after a restart of this agent, from the rules.
    Restart,
    /// Decided from the rules as this agent stopped, out of time to finish it.
    Exit,
}

impl Stage {
    #[must_use]
    pub const fn label(self) -> &'static str {
        match self {
            Self::Export => "export",
            Self::Transfer => "transfer",
            Self::Rules => "rules",
            Self::Restart => "restart",
            Self::Exit => "exit",
        }
    }
}

/// How a hand-over ended, as [`Agent::conclude`](super::Agent) is told.
#[derive(Clone, Debug)]
pub enum End {
    Committed,
    Aborted(Stage, String),
}

/// `dir` label values.
#[must_use]
pub const fn dir_label(dir: Dir) -> &'static str {
    match dir {
        Dir::Out => "out",
        Dir::Back => "back",
    }
}

pub type ByDir = Family<[(&'static str, &'static str); 1], Counter>;
pub type ByDirStage = Family<[(&'static str, &'static str); 2], Counter>;

/// The counts (cheap to clone: each is shared).
#[derive(Clone, Debug)]
pub struct Tally {
    /// Hand-overs this node started, by direction.
    pub started: ByDir,
    /// Committed, by direction.
    pub committed: ByDir,
    /// Aborted, by direction and [`Stage`].
    pub aborted: ByDirStage,
    /// Clients of committed hand-overs, by direction.
    pub clients: ByDir,
    /// Sessions and their bytes in committed hand-overs, by direction.
    pub sessions: ByDir,
    pub session_bytes: ByDir,
    /// Seconds from a hand-over's start to its commit, by direction.
    pub duration: Family<[(&'static str, &'static str); 1], Histogram>,
}

impl Default for Tally {
    fn default() -> Self {
        Self {
            started: ByDir::default(),
            committed: ByDir::default(),
            aborted: ByDirStage::default(),
            clients: ByDir::default(),
            sessions: ByDir::default(),
            session_bytes: ByDir::default(),
            // 1 ms to about 33 s.
            duration: Family::new_with_constructor(|| Histogram::new(exponential_buckets(0.001, 2.0, 16))),
        }
    }
}

impl Tally {
    pub fn started(&self, dir: Dir) {
        self.started.get_or_create(&[("dir", dir_label(dir))]).inc();
    }

    /// A hand-over of `dir` ended as `end` after `took`; when committed, it moved `clients`
    /// clients and `sessions` sessions of `bytes` bytes.
    pub fn ended(&self, dir: Dir, end: &End, took: Duration, clients: usize, sessions: usize, bytes: u64) {
        let d = [("dir", dir_label(dir))];
        match end {
            End::Committed => {
                self.committed.get_or_create(&d).inc();
                self.clients.get_or_create(&d).inc_by(u64::try_from(clients).unwrap_or(u64::MAX));
                self.sessions.get_or_create(&d).inc_by(u64::try_from(sessions).unwrap_or(u64::MAX));
                self.session_bytes.get_or_create(&d).inc_by(bytes);
                self.duration.get_or_create(&d).observe(took.as_secs_f64());
            }
            End::Aborted(stage, _) => {
                self.aborted.get_or_create(&[("dir", dir_label(dir)), ("stage", stage.label())]).inc();
            }
        }
    }
}
