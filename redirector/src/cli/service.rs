//! `service`: the services this host steers (origin side).

use std::net::{IpAddr, SocketAddr};

use clap::Subcommand;

use super::{Global, instance, render::Report};

#[derive(Debug, Subcommand)]
pub enum ServiceCmd {
    /// Steer TCP service ADDR:PORT (this host's service address).
    Add {
        service: SocketAddr,
        /// Uplink interface the clients' packets arrive on.
        #[arg(long)]
        dev: String,
        /// Outer source of tunnelled packets: this host's control address.
        #[arg(long)]
        tunnel_src: Option<IpAddr>,
        /// Uplink MTU for the MSS clamp (default: the interface's).
        #[arg(long)]
        mtu: Option<u32>,
        /// Forward migrated clients' packets in XDP on the uplink too (the fast path; needs
        /// native XDP and forwarding on the interface, else the classifier alone steers, with a
        /// warning). Without it, the fast path leaves the service to the classifier.
        #[arg(long)]
        xdp: bool,
    },
    /// Stop steering a service.
    Del { service: SocketAddr },
    /// List steered services.
    List,
}

impl ServiceCmd {
    pub(super) fn execute(self, global: &Global) -> anyhow::Result<Report> {
        match self {
            Self::Add { service, dev, tunnel_src, mtu, xdp } => {
                let service = instance::create(global, Some(&dev))?.add_service_xdp((service.ip(), service.port()), &dev, tunnel_src, mtu, xdp)?;
                if let Some(why) = &service.xdp_unavailable {
                    eprintln!("warning: {why}; {} is steered by the TC classifier alone", service.service());
                }
                Ok(Report::ServiceAdded { service, dev })
            }
            Self::Del { service } => {
                instance::existing(global)?.del_service((service.ip(), service.port()))?;
                Ok(Report::Done)
            }
            Self::List => Ok(Report::Services(instance::existing(global)?.list_services()?)),
        }
    }
}
