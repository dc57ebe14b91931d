//! `status`, `move`, `give-back`: asking a running agent over its admin socket.

use std::{net::IpAddr, path::PathBuf, time::Duration};

use anyhow::bail;
use clap::Args;

use super::render::Report;
use crate::{admin, config::Config, datapath};

/// Which running agent to ask.
#[derive(Debug, Args)]
pub struct AgentSocket {
    /// The agent's admin socket.
    #[arg(long, conflicts_with = "config")]
    socket: Option<PathBuf>,
    /// Or the agent's configuration file, to find its admin socket.
    #[arg(long)]
    config: Option<PathBuf>,
    /// How long to wait for the agent's answer, in seconds (moving big sessions takes a while).
    #[arg(long, default_value_t = 120)]
    timeout_secs: u64,
}

impl AgentSocket {
    pub(super) fn path(&self) -> anyhow::Result<PathBuf> {
        match (&self.socket, &self.config) {
            (Some(s), _) => Ok(s.clone()),
            (None, Some(c)) => Ok(Config::load(c)?.admin_socket()),
            (None, None) => bail!("give the agent's --socket or its --config"),
        }
    }

    /// How long to wait for the agent's answer.
    pub(super) fn timeout(&self) -> Duration {
        Duration::from_secs(self.timeout_secs)
    }
}

/// `status`: the agent's status.
pub(super) fn status(agent: &AgentSocket) -> anyhow::Result<Report> {
    let status = admin::status(&agent.path()?)?;
    Ok(Report::Status { status, now: datapath::unix_now() })
}

/// `move`: asks the agent to move `clients` with their sessions (to sibling `to` only, if
/// given).
pub(super) fn move_clients(agent: &AgentSocket, clients: Vec<IpAddr>, to: Option<&str>) -> anyhow::Result<Report> {
    let asked = clients.len();
    let moved = admin::move_clients_to(&agent.path()?, clients, to, agent.timeout())?;
    Ok(Report::Moved { moved, asked })
}

/// `give-back`: asks the agent to bring `clients` back with their sessions.
pub(super) fn give_back(agent: &AgentSocket, clients: Vec<IpAddr>) -> anyhow::Result<Report> {
    Ok(Report::GivenBack(admin::give_back(&agent.path()?, clients, agent.timeout())?))
}
