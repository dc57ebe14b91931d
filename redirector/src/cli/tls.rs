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
        /// Days it is valid.
        #[arg(long, default_value_t = crate::certs::CA_DAYS)]
        days: u32,
    },
    /// Make the certificate of node NAME (NAME.pem, NAME.key), signed by the CA in DIR.
    Node {
        name: String,
        #[arg(long, default_value = ".")]
        dir: PathBuf,
        /// Days it is valid (never past the CA).
        #[arg(long, default_value_t = crate::certs::NODE_DAYS)]
        days: u32,
    },
}

impl TlsCmd {
    pub(super) fn execute(self) -> anyhow::Result<Report> {
        match self {
            Self::Ca { dir, days } => {
                let until = crate::certs::make_ca(&dir, days)?.unix_timestamp();
                Ok(Report::CaWritten { dir, until })
            }
            Self::Node { name, dir, days } => {
                let until = crate::certs::make_node(&dir, &name, days)?.unix_timestamp();
                let cert = crate::peer::tls::read_certs(&dir.join(format!("{name}.pem")))?;
                Ok(Report::NodeCertWritten { fingerprint: crate::peer::tls::fingerprint(&cert[0]), name, dir, until })
            }
        }
    }
}
