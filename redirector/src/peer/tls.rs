//! TLS of the sibling channel: a node's certificate and key and the cluster CA, loaded for
//! both directions (each requires a certificate issued by the CA), and a peer's identity read
//! from its certificate.

use std::{path::Path, sync::Arc};

use anyhow::{Context as _, bail};
use rustls::{
    RootCertStore,
    pki_types::{CertificateDer, PrivateKeyDer, ServerName, pem::PemObject as _},
    server::WebPkiClientVerifier,
};

/// Reads every certificate in a PEM file (at least one).
pub(crate) fn read_certs(path: &Path) -> anyhow::Result<Vec<CertificateDer<'static>>> {
    let certs: Result<Vec<_>, _> = CertificateDer::pem_file_iter(path).with_context(|| format!("reading certificates from {}", path.display()))?.collect();
    let certs = certs.with_context(|| format!("parsing certificates in {}", path.display()))?;
    if certs.is_empty() {
        bail!("no certificate in {}", path.display());
    }
    Ok(certs)
}

/// TLS material of a node: its own certificate and key, and the cluster CA.
pub struct Tls {
    pub server: Arc<rustls::ServerConfig>,
    pub client: Arc<rustls::ClientConfig>,
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

impl Tls {
    /// Loads the node's certificate and key and the CA; both directions require a certificate
    /// issued by the CA.
    pub fn load(ca: &Path, cert: &Path, key: &Path) -> anyhow::Result<Self> {
        let mut roots = RootCertStore::empty();
        for c in read_certs(ca)? {
            roots.add(c).with_context(|| format!("adding the CA in {}", ca.display()))?;
        }
        let roots = Arc::new(roots);
        let chain = read_certs(cert)?;
        let key = PrivateKeyDer::from_pem_file(key).with_context(|| format!("reading the private key {}", key.display()))?;
        let verifier = WebPkiClientVerifier::builder_with_provider(roots.clone(), provider()).build().context("building the client-certificate verifier")?;
        let server = rustls::ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .context("TLS versions")?
            .with_client_cert_verifier(verifier)
            .with_single_cert(chain.clone(), key.clone_key())
            .context("loading this node's certificate and key")?;
        let client = rustls::ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .context("TLS versions")?
            .with_root_certificates(roots)
            .with_client_auth_cert(chain, key)
            .context("loading this node's certificate and key")?;
        Ok(Self { server: Arc::new(server), client: Arc::new(client) })
    }
}

/// Which of `names` the (already CA-verified) certificate `cert` was issued for.
#[must_use]
pub fn identity<'a>(cert: &CertificateDer<'_>, names: impl IntoIterator<Item = &'a str>) -> Option<&'a str> {
    let ee = webpki::EndEntityCert::try_from(cert).ok()?;
    names.into_iter().find(|n| ServerName::try_from(*n).is_ok_and(|sn| ee.verify_is_valid_for_subject_name(&sn).is_ok()))
}
