//! The direct-server-return probe between agents ([`crate::probe`], `redirector doctor`):
//! the doctor on an origin asks its agent (admin `probe`), which asks a sibling (`Probe`) to
//! send the datagram with the origin's service address as its source.

use std::{
    net::SocketAddr,
    sync::{Arc, atomic::Ordering},
    time::Duration,
};

use anyhow::{anyhow, bail};
use tracing::info;

use super::Agent;
use crate::peer::{Answer, Request, Said};

/// How long a sibling has to send the probe and say so.
const PROBE_TIMEOUT: Duration = Duration::from_secs(3);

impl Agent {
    /// Origin: asks sibling `sibling` to send the probe holding `token` from `service` (one of
    /// this node's) to this node's control address of its family, port `port`.
    ///
    /// # Errors
    /// Not a service or sibling of this node, the sibling not linked, or its refusal.
    pub async fn probe_via(self: &Arc<Self>, sibling: &str, service: SocketAddr, port: u16, token: u64) -> anyhow::Result<()> {
        if self.sibling(sibling).is_none() {
            bail!("{sibling} is not a sibling of this node");
        }
        if !self.cfg.services.iter().any(|s| s.address == service) {
            bail!("{service} is not a service of this node");
        }
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        match self.ask(sibling, Request::Probe { id, service, port, token }, id, PROBE_TIMEOUT).await? {
            Answer::Probed { error: None, .. } => Ok(()),
            Answer::Probed { error: Some(e), .. } => Err(anyhow!("{sibling} did not send the probe: {}", Said(&e))),
            other => Err(anyhow!("{sibling} answered {}", other.what())),
        }
    }

    /// Sibling: origin `from` asks for the probe. Sent only from the address of a service this
    /// node may adopt from it, and only to its own control address: a sibling cannot make
    /// this node send as anyone else, or to anyone else.
    pub(super) async fn probe_for(self: &Arc<Self>, from: &str, service: SocketAddr, port: u16, token: u64) -> Option<String> {
        let Some(origin) = self.sibling(from) else { return Some("not a configured sibling".into()) };
        if !origin.services.contains(&service) {
            return Some(format!("{service} is not one of {from}'s services this node may adopt ([[sibling]] services)"));
        }
        let Some(to) = origin.control_address(service.ip()) else {
            return Some(format!("this node knows no control address of {from} of the family of {service} (dual_stack_address)"));
        };
        let to = SocketAddr::new(to, port);
        let sent = tokio::task::spawn_blocking(move || crate::probe::send(service.ip(), to, token)).await;
        match sent {
            Ok(Ok(())) => {
                info!(origin = %from, source = %service.ip(), %to, "sent the direct-server-return probe");
                None
            }
            Ok(Err(e)) => Some(e.to_string()),
            Err(e) => Some(format!("the probe's task failed: {e}")),
        }
    }
}
