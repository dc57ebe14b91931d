//! `sibling`: the siblings allowed to send tunnelled packets here (target side).

use std::net::IpAddr;

use clap::Subcommand;

use super::{Global, instance, render::Report};

#[derive(Debug, Subcommand)]
pub enum SiblingCmd {
    /// Accept tunnels whose outer source is ADDR.
    Add {
        addr: IpAddr,
        #[arg(long)]
        dev: String,
    },
    /// Stop accepting tunnels from ADDR.
    Del { addr: IpAddr },
    /// List siblings.
    List,
}

impl SiblingCmd {
    pub(super) fn execute(self, global: &Global) -> anyhow::Result<Report> {
        match self {
            Self::Add { addr, dev } => instance::create(global, Some(&dev))?.add_sibling(addr, &dev)?,
            Self::Del { addr } => instance::existing(global)?.del_sibling(addr)?,
            Self::List => return Ok(Report::Siblings(instance::existing(global)?.list_siblings()?)),
        }
        Ok(Report::Done)
    }
}
