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
    /// Show a certificate's names, expiry and SHA-256 fingerprint (what `[tls] deny` lists).
    Show { file: PathBuf },
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
            Self::Show { file } => {
                let cert = crate::peer::tls::read_certs(&file)?.remove(0);
                let (names, until) = crate::peer::tls::names_and_expiry(&cert).ok_or_else(|| anyhow::anyhow!("{}: the certificate cannot be read", file.display()))?;
                Ok(Report::CertShown { fingerprint: crate::peer::tls::fingerprint(&cert), file, names, until })
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn show_says_a_certificates_names_expiry_and_fingerprint() {
        let dir = std::env::temp_dir().join(format!("redirector-tls-show-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        TlsCmd::Ca { dir: dir.clone(), days: 30 }.execute().unwrap();
        let Report::NodeCertWritten { fingerprint: made, until: made_until, .. } = TlsCmd::Node { name: "b".into(), dir: dir.clone(), days: 7 }.execute().unwrap() else {
            panic!("a node certificate")
        };
        let Report::CertShown { names, until, fingerprint, .. } = TlsCmd::Show { file: dir.join("b.pem") }.execute().unwrap() else { panic!("shown") };
        assert_eq!((names, until, fingerprint), (vec!["b".to_string()], made_until, made));
        assert!(TlsCmd::Show { file: dir.join("nothing.pem") }.execute().is_err());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
