//! `rule`: migrated client prefixes (origin side).

use std::{net::IpAddr, time::Duration};

use clap::Subcommand;

use super::{Global, instance, render::Report};
use crate::datapath::{self, Prefix};

#[derive(Debug, Subcommand)]
pub enum RuleCmd {
    /// Migrate a client address or prefix to a target.
    Add {
        prefix: Prefix,
        /// Target's control address.
        #[arg(long)]
        to: IpAddr,
        /// Skip the readiness probe through the tunnel.
        #[arg(long)]
        no_probe: bool,
        /// How long to wait for the probe's answer.
        #[arg(long, default_value_t = 2000)]
        probe_timeout_ms: u64,
        /// Replace a rule that sends the prefix to another target (its flows living there
        /// break); without it, such a rule is refused.
        #[arg(long)]
        replace: bool,
    },
    /// Withdraw a rule: drain (default 60 s) or remove at once.
    Del {
        prefix: Prefix,
        /// Drain period in seconds.
        #[arg(long, conflicts_with = "now")]
        drain: Option<u64>,
        /// Remove at once (flows living on the target break).
        #[arg(long)]
        now: bool,
    },
    /// List rules.
    List,
}

impl RuleCmd {
    pub(super) fn execute(self, global: &Global) -> anyhow::Result<Report> {
        let mut dp = instance::existing(global)?;
        match self {
            Self::Add { prefix, to, no_probe, probe_timeout_ms, replace } => {
                let probe = (!no_probe).then(|| Duration::from_millis(probe_timeout_ms));
                dp.migrate_many(&[prefix], to, probe, replace)?;
                Ok(Report::RuleAdded { prefix, to })
            }
            Self::Del { prefix, drain: _, now: true } => {
                dp.release(prefix)?;
                Ok(Report::Done)
            }
            Self::Del { prefix, drain, now: false } => {
                let period = drain.map_or(datapath::DEFAULT_DRAIN, Duration::from_secs);
                dp.drain(prefix, period)?;
                Ok(Report::Draining { prefix, period })
            }
            Self::List => Ok(Report::Rules(dp.list_rules()?)),
        }
    }
}
