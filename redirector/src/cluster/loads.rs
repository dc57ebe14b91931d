//! Load travels with gossip: each member publishes a small record of its load (a foca custom
//! broadcast), and every member keeps the newest record of each. A record is published when
//! the member's room changes by a step, not on a timer, so a cluster at rest gossips no load at
//! all and the traffic per node does not grow with the cluster; a member that comes up is sent
//! each member's current record once, directly.

use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{Arc, Mutex, MutexGuard},
};

use serde::{Deserialize, Serialize};

/// One member's load, as it published it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LoadRecord {
    /// The member (its gossip address).
    pub member: SocketAddr,
    /// Its boot, then a count: a restarted member's records win over its former self's.
    pub version: (u64, u64),
    /// Connections it serves.
    pub load: u64,
    /// Connections it can take before it passes its high watermark.
    pub room: u64,
}

impl LoadRecord {
    #[must_use]
    pub fn encode(&self) -> Vec<u8> {
        postcard::to_stdvec(self).expect("a load record always encodes")
    }

    #[must_use]
    pub fn decode(bytes: &[u8]) -> Option<Self> {
        postcard::from_bytes(bytes).ok()
    }
}

/// Which record a dissemination carries: a newer one of the same member replaces it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RecordKey {
    member: SocketAddr,
    version: (u64, u64),
}

impl foca::Invalidates for RecordKey {
    fn invalidates(&self, other: &Self) -> bool {
        self.member == other.member && self.version > other.version
    }
}

/// The newest record of each member, shared between the gossip task and whoever asks.
#[derive(Clone, Default)]
pub struct Board(Arc<Mutex<HashMap<SocketAddr, LoadRecord>>>);

impl Board {
    pub fn records(&self) -> MutexGuard<'_, HashMap<SocketAddr, LoadRecord>> {
        self.0.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Keeps `r` if it is newer than what the board holds; says whether it was.
    pub fn offer(&self, r: LoadRecord) -> bool {
        let mut recs = self.records();
        match recs.get(&r.member) {
            Some(held) if held.version >= r.version => false,
            _ => {
                recs.insert(r.member, r);
                true
            }
        }
    }

    pub fn forget(&self, member: &SocketAddr) {
        self.records().remove(member);
    }
}

/// A record that cannot be decoded.
#[derive(Debug, thiserror::Error)]
#[error("a load record that does not decode")]
pub struct BadRecord;

/// The board as foca's broadcast handler: new records are kept and passed on, stale ones
/// stop where they are.
pub struct Handler(pub Board);

impl<T> foca::BroadcastHandler<T> for Handler {
    type Key = RecordKey;
    type Error = BadRecord;

    fn receive_item(&mut self, data: &[u8], _sender: Option<&T>) -> Result<Option<RecordKey>, BadRecord> {
        let r = LoadRecord::decode(data).ok_or(BadRecord)?;
        Ok(self.0.offer(r).then_some(RecordKey { member: r.member, version: r.version }))
    }
}

/// When a member publishes its room again: when it changed by a tenth of its high watermark
/// (at least one connection), or went to or from none.
#[must_use]
pub fn worth_publishing(last: Option<u64>, room: u64, high: u64) -> bool {
    let Some(last) = last else { return true };
    let step = (high / 10).max(1);
    (last == 0) != (room == 0) || last.abs_diff(room) >= step
}

#[cfg(test)]
mod tests {
    use foca::Invalidates as _;

    use super::*;

    fn rec(port: u16, version: (u64, u64), room: u64) -> LoadRecord {
        LoadRecord { member: SocketAddr::from(([198, 18, 0, 1], port)), version, load: 5, room }
    }

    #[test]
    fn the_board_keeps_the_newest_record_of_each_member() {
        let b = Board::default();
        assert!(b.offer(rec(1, (1, 1), 10)));
        assert!(!b.offer(rec(1, (1, 1), 3)), "the same version again");
        assert!(!b.offer(rec(1, (1, 0), 3)), "an older one");
        assert!(b.offer(rec(1, (2, 0), 4)), "a restarted member's first");
        assert!(b.offer(rec(2, (1, 0), 9)));
        assert_eq!(b.records()[&rec(1, (0, 0), 0).member].room, 4);
        b.forget(&rec(1, (0, 0), 0).member);
        assert_eq!(b.records().len(), 1);
    }

    #[test]
    fn a_newer_record_replaces_only_the_same_members() {
        let k = |port, v| RecordKey { member: rec(port, v, 0).member, version: v };
        assert!(k(1, (1, 2)).invalidates(&k(1, (1, 1))));
        assert!(!k(1, (1, 1)).invalidates(&k(1, (1, 2))));
        assert!(!k(2, (1, 2)).invalidates(&k(1, (1, 1))));
    }

    #[test]
    fn records_round_trip_and_garbage_is_refused() {
        let r = rec(7, (3, 4), 11);
        assert_eq!(LoadRecord::decode(&r.encode()), Some(r));
        assert_eq!(LoadRecord::decode(&[0xff; 3]), None);
    }

    #[test]
    fn room_is_published_on_a_step_or_on_filling_up() {
        assert!(worth_publishing(None, 50, 100));
        assert!(!worth_publishing(Some(50), 45, 100));
        assert!(worth_publishing(Some(50), 40, 100));
        assert!(worth_publishing(Some(3), 0, 100), "full");
        assert!(worth_publishing(Some(0), 2, 100), "room again");
        assert!(worth_publishing(Some(2), 1, 5), "a step of at least one");
    }
}
