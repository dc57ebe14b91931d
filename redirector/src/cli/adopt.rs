//! `adopt`: siblings' services served here (target side).

use std::net::SocketAddr;

use clap::Subcommand;

use super::{Global, instance, render::Report};
use crate::datapath::Listener;

#[derive(Debug, Subcommand)]
pub enum AdoptCmd {
    /// Serve a sibling's service ADDR:PORT here.
    Add {
        service: SocketAddr,
        #[arg(long)]
        dev: String,
        /// Local listening socket (bound to LADDR:LPORT) that receives the connections.
        #[arg(long)]
        listener: Option<SocketAddr>,
        /// Uplink MTU for the SYN-ACK MSS clamp (default: the interface's).
        #[arg(long)]
        mtu: Option<u32>,
    },
    /// Give an adopted service back.
    Del { service: SocketAddr },
    /// List adopted services.
    List,
}

impl AdoptCmd {
    pub(super) fn execute(self, global: &Global) -> anyhow::Result<Report> {
        match self {
            Self::Add { service, dev, listener, mtu } => {
                instance::create(global, Some(&dev))?.adopt((service.ip(), service.port()), &dev, listener.map(|l| Listener::new(l, None)), mtu)?;
            }
            Self::Del { service } => instance::existing(global)?.unadopt((service.ip(), service.port()))?,
            Self::List => return Ok(Report::Adopted(instance::existing(global)?.list_adopted()?)),
        }
        Ok(Report::Done)
    }
}
