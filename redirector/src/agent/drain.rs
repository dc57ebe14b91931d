//! Draining a node for maintenance (`redirector drain`): every client of this node moves to
//! its siblings with its session, clients adopted here go back to their origins, no room is
//! offered and no client comes home, until `undrain`. The shedding rounds do the moving, with
//! both watermarks taken as zero (`origin.rs`). A drained node stays drained across restarts
//! (a file in `state_dir`), and its clients stay away when its agent stops: the usual reason
//! to drain is to stop the server.

use std::{fs, io::Write as _, path::Path};

use anyhow::Context as _;
use tracing::info;

use super::{Agent, records::write_atomic, state::State};
use crate::{
    admin::api::{Drain, DrainState},
    datapath::unix_now,
};

/// The file in `state_dir` that says the node is drained, and since when (Unix seconds).
const FILE: &str = "drained";

/// Since when the node in `state_dir` is drained, if it is.
///
/// # Errors
/// The file is there but unreadable: refusing to guess whether the operator drained the node.
pub(super) fn read(state_dir: &Path) -> anyhow::Result<Option<u64>> {
    let path = state_dir.join(FILE);
    match fs::read_to_string(&path) {
        Ok(s) => s.trim().parse().map(Some).with_context(|| format!("{} does not hold a time (Unix seconds): remove it to undrain", path.display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
    }
}

/// What is left to move off a drained node: the clients with connections here that are its
/// own to move (not moved out, not given back) or adopted from siblings.
pub(super) fn progress(st: &State, since_unix: u64) -> Drain {
    let left: Vec<u64> = st.load.clients.iter().filter(|(a, n)| *n > 0 && !st.stays(a)).map(|c| c.1).collect();
    let clients_left = left.len();
    Drain { since_unix, clients_left, connections_left: left.iter().sum(), done: clients_left == 0 && st.busy.is_empty() }
}

impl Agent {
    /// Drains this node (idempotent); the shedding rounds move its clients from now on.
    ///
    /// # Errors
    /// The drain could not be recorded in `state_dir` (nothing changed).
    pub fn drain(&self) -> anyhow::Result<DrainState> {
        if let Some(since) = self.state().drained {
            return Ok(DrainState { drained: true, already: true, since_unix: Some(since) });
        }
        let since = unix_now();
        let path = self.cfg.state_dir().join(FILE);
        write_atomic(&path, |w| writeln!(w, "{since}").context("writing"))?;
        self.state().drained = Some(since);
        info!(file = %path.display(), "drained: moving every client to siblings with its session; no room offered, no client taken home, until `redirector undrain`");
        self.load_wake.notify_one();
        Ok(DrainState { drained: true, already: false, since_unix: Some(since) })
    }

    /// Undrains this node (idempotent): it offers room again at once, and its moved clients
    /// come home as usual (`home_after_secs`).
    ///
    /// # Errors
    /// The drain's file in `state_dir` could not be removed (the node stays drained).
    pub fn undrain(&self) -> anyhow::Result<DrainState> {
        let path = self.cfg.state_dir().join(FILE);
        match fs::remove_file(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e).with_context(|| format!("removing {}", path.display())),
        }
        let was = self.state().drained.take();
        if let Some(since) = was {
            info!(drained_secs = unix_now().saturating_sub(since), "undrained: taking load again");
        } else {
            info!("asked to undrain a node that is not drained: nothing to do");
        }
        Ok(DrainState { drained: false, already: was.is_none(), since_unix: None })
    }
}

#[cfg(test)]
mod tests {
    use std::{net::IpAddr, time::Instant};

    use super::*;
    use crate::datapath::Load;

    fn ip(i: u8) -> IpAddr {
        IpAddr::from([198, 18, 1, i])
    }

    #[test]
    fn what_is_left_is_this_nodes_own_and_adopted_clients_and_hand_overs() {
        let mut st = State::default();
        st.moved.steered(ip(1), "b", 1, Instant::now());
        st.volunteer.returned.insert(ip(2));
        st.load = Load { total: 10, clients: vec![(ip(1), 3), (ip(2), 1), (ip(3), 2), (ip(4), 4)] };
        assert_eq!(progress(&st, 7), Drain { since_unix: 7, clients_left: 2, connections_left: 6, done: false }, "moved and given-back clients' connections finish here");
        st.load = Load { total: 4, clients: vec![(ip(1), 3), (ip(2), 1)] };
        assert!(progress(&st, 7).done);
        st.hold([ip(5)]);
        assert!(!progress(&st, 7).done, "not while a hand-over holds clients");
    }

    #[test]
    fn the_drain_file_says_since_when_or_is_refused() {
        let dir = std::env::temp_dir().join(format!("redirector-drain-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        assert_eq!(read(&dir).unwrap(), None);
        fs::write(dir.join(FILE), "1700000000\n").unwrap();
        assert_eq!(read(&dir).unwrap(), Some(1_700_000_000));
        fs::write(dir.join(FILE), "yes").unwrap();
        assert!(read(&dir).unwrap_err().to_string().contains("remove it to undrain"));
        fs::remove_dir_all(&dir).unwrap();
    }
}
