//! `tls`: the cluster CA and node certificates for the peer channel.

use std::path::PathBuf;

use clap::Subcommand;

use super::render::Report;

#[derive(Debug, Subcommand)]
pub enum TlsCmd {
    /// Make a cluster CA (ca.pem, ca.key) in DIR.
    Ca {
        #[arg(long, default_value = ".")]
        dir: PathBuf,
    },
    /// Make the certificate of node NAME (NAME.pem, NAME.key), signed by the CA in DIR.
    Node {
        name: String,
        #[arg(long, default_value = ".")]
        dir: PathBuf,
    },
}

impl TlsCmd {
    pub(super) fn execute(self) -> anyhow::Result<Report> {
        match self {
            Self::Ca { dir } => {
                crate::certs::make_ca(&dir)?;
                Ok(Report::CaWritten { dir })
            }
            Self::Node { name, dir } => {
                crate::certs::make_node(&dir, &name)?;
                Ok(Report::NodeCertWritten { name, dir })
            }
        }
    }
}
