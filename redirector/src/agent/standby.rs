//! Gossip mode's links (docs/cluster.md): a few members with room kept linked in advance (on
//! standby), so that asking for help finds them linked (a link opened inside a negotiation
//! costs it a TCP and TLS handshake), and links nothing needs closed after `idle_link_secs`,
//! so that a node of a large cluster keeps a handful, not one to every member it ever asked.

use std::{
    collections::HashSet,
    sync::Arc,
    time::{Duration, Instant},
};

use tracing::info;

use super::Agent;

impl Agent {
    /// Once a second in gossip mode: draws the members on standby (those on it already stay
    /// while they have room), dials those not linked, and closes the idle links of members
    /// that hold no clients of this node and none of whose this node holds.
    pub(super) fn keep_links(self: &Arc<Self>) {
        let Some(m) = self.membership.get() else { return };
        let kept = self.state().links.standby.clone();
        let standby: Vec<String> = if self.cfg.cluster.standby == 0 {
            Vec::new()
        } else if kept.len() == self.cfg.cluster.standby && kept.iter().all(|n| m.gossip.room_of(n).is_some_and(|r| r > 0)) {
            // All still live with room: no draw (a draw looks at every member, and a thousand
            // agents sharing two cores spent a tenth of their time drawing the same ones).
            kept
        } else {
            let kept: HashSet<String> = kept.into_iter().collect();
            m.gossip.sample(1, self.cfg.cluster.standby, |x| kept.contains(&x.name)).into_iter().map(|(x, _)| x.name).collect()
        };
        for name in &standby {
            if let Some(s) = self.sibling(name) {
                self.clone().dial_loop(name, s.address);
            }
        }
        let idle = Duration::from_secs(self.cfg.cluster.idle_link_secs);
        let mut st = self.state();
        st.links.standby = standby;
        if idle.is_zero() {
            return;
        }
        for name in st.links.idle(idle, Instant::now()) {
            if !st.shares_clients_with(&name) {
                info!(sibling = %name, idle_secs = idle.as_secs(), "closing an idle link (not on standby, no clients either way): it opens again when needed");
                st.links.retire(&name);
            }
        }
    }
}
