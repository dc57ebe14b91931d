//! Liveness: siblings silent past the timeout have the rules pointing at them drained, and
//! rules whose drain ended are removed.

use std::{
    net::IpAddr,
    sync::Arc,
    time::{Duration, Instant},
};

use tracing::{info, warn};

use super::{Agent, host_prefix};

impl Agent {
    pub(super) async fn liveness_loop(self: Arc<Self>) {
        let mut tick = tokio::time::interval(Duration::from_millis(self.cfg.heartbeat_ms));
        let live = Duration::from_millis(self.cfg.liveness_ms);
        let mut last_collect = Instant::now();
        loop {
            tick.tick().await;
            // Rules whose drain ended are inert in the kernel; remove them so the map never
            // fills up with them.
            if last_collect.elapsed() >= Duration::from_secs(5) {
                last_collect = Instant::now();
                match self.dp().collect_drained() {
                    Ok(0) => {}
                    Ok(n) => info!(rules = n, "removed rules whose drain ended"),
                    Err(e) => warn!("removing drained rules: {e}"),
                }
            }
            let dead: Vec<(String, Vec<IpAddr>)> = {
                let st = self.state();
                self.cfg
                    .siblings
                    .iter()
                    .filter(|s| st.siblings.get(&s.name).is_none_or(|x| x.last_heartbeat.is_none_or(|t| t.elapsed() >= live)))
                    .map(|s| (s.name.clone(), st.migrated.values().filter(|m| m.to == s.name).map(|m| m.client).collect::<Vec<_>>()))
                    .filter(|(_, c)| !c.is_empty())
                    .collect()
            };
            for (name, clients) in dead {
                warn!(sibling = %name, clients = clients.len(), "sibling silent past the liveness timeout: draining its rules, clients come home");
                let period = Duration::from_secs(self.cfg.drain_secs);
                {
                    let mut dp = self.dp();
                    for c in &clients {
                        if let Err(e) = dp.drain(host_prefix(*c), period) {
                            warn!(client = %c, "drain failed: {e}");
                        }
                    }
                }
                let mut st = self.state();
                for c in clients {
                    st.migrated.remove(&c);
                }
            }
        }
    }
}
