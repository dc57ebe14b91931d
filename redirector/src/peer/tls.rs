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
pub fn read_certs(path: &Path) -> anyhow::Result<Vec<CertificateDer<'static>>> {
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

/// The cluster CA in `ca`, as the roots both directions trust.
fn roots(ca: &Path) -> anyhow::Result<Arc<RootCertStore>> {
    let mut roots = RootCertStore::empty();
    for c in read_certs(ca)? {
        roots.add(c).with_context(|| format!("adding the CA in {}", ca.display()))?;
    }
    Ok(Arc::new(roots))
}

impl Tls {
    /// Loads the node's certificate and key and the CA; both directions require a certificate
    /// issued by the CA.
    pub fn load(ca: &Path, cert: &Path, key: &Path) -> anyhow::Result<Self> {
        let roots = roots(ca)?;
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

/// A node certificate this close to its expiry is warned about, at start and every day.
pub const WARN_DAYS: i64 = 30;

/// When `cert` expires, in Unix seconds (`None`: it cannot be read).
#[must_use]
pub fn not_after(cert: &CertificateDer<'_>) -> Option<i64> {
    let (_, c) = x509_parser::parse_x509_certificate(cert.as_ref()).ok()?;
    Some(c.validity().not_after.timestamp())
}

/// The DNS names `cert` is issued for (its subject alternative names), and when it expires.
#[must_use]
pub fn names_and_expiry(cert: &CertificateDer<'_>) -> Option<(Vec<String>, i64)> {
    let (_, c) = x509_parser::parse_x509_certificate(cert.as_ref()).ok()?;
    let names = c
        .subject_alternative_name()
        .ok()
        .flatten()
        .map(|san| {
            san.value
                .general_names
                .iter()
                .filter_map(|n| match n {
                    x509_parser::extensions::GeneralName::DNSName(d) => Some((*d).to_string()),
                    _ => None,
                })
                .collect()
        })
        .unwrap_or_default();
    Some((names, c.validity().not_after.timestamp()))
}

/// A Unix time as a UTC date, `2027-12-05`.
#[must_use]
pub fn date(unix: i64) -> String {
    time::OffsetDateTime::from_unix_timestamp(unix).map_or_else(|_| format!("@{unix}"), |t| t.date().to_string())
}

/// How the certificate in `path` stands on expiry: the days it has left when fewer than
/// [`WARN_DAYS`]; an error when it has expired (or cannot be read).
pub fn expiry(path: &Path) -> Result<Option<i64>, String> {
    let chain = read_certs(path).map_err(|e| format!("{e:#}"))?;
    let until = not_after(&chain[0]).ok_or_else(|| format!("{}: the certificate cannot be read", path.display()))?;
    let left = until - time::OffsetDateTime::now_utc().unix_timestamp();
    if left <= 0 {
        return Err(format!("{} expired on {}", path.display(), date(until)));
    }
    Ok((left < WARN_DAYS * 86_400).then_some(left / 86_400))
}

/// The SHA-256 fingerprint of `cert`: lower-case hex, as `[tls] deny` lists it.
#[must_use]
pub fn fingerprint(cert: &CertificateDer<'_>) -> String {
    use sha2::Digest as _;
    sha2::Sha256::digest(cert.as_ref()).iter().fold(String::with_capacity(64), |mut s, b| {
        let _ = std::fmt::Write::write_fmt(&mut s, format_args!("{b:02x}"));
        s
    })
}

/// A fingerprint as an operator writes it (`openssl x509 -fingerprint -sha256` prints
/// `AB:CD:...`; any case, colons or not), as [`fingerprint`] spells it; `None` if it is not 32
/// bytes of hex.
#[must_use]
pub fn parse_fingerprint(s: &str) -> Option<String> {
    let s = s.trim();
    let s = s.strip_prefix("sha256:").or_else(|| s.strip_prefix("SHA256:")).unwrap_or(s);
    let hex: String = s.chars().filter(|c| *c != ':').map(|c| c.to_ascii_lowercase()).collect();
    (hex.len() == 64 && hex.chars().all(|c| c.is_ascii_hexdigit())).then_some(hex)
}

/// Which of `names` the (already CA-verified) certificate `cert` was issued for.
#[must_use]
pub fn identity<'a>(cert: &CertificateDer<'_>, names: impl IntoIterator<Item = &'a str>) -> Option<&'a str> {
    let ee = webpki::EndEntityCert::try_from(cert).ok()?;
    names.into_iter().find(|n| ServerName::try_from(*n).is_ok_and(|sn| ee.verify_is_valid_for_subject_name(&sn).is_ok()))
}

/// Checks that `cert` is this node's certificate as its siblings will check it: issued by the
/// CA in `ca`, valid now, for the name `node`. The reason when it is not.
pub fn check_node_cert(ca: &Path, cert: &Path, node: &str) -> Result<(), String> {
    use rustls::client::danger::ServerCertVerifier as _;
    let roots = roots(ca).map_err(|e| format!("{e:#}"))?;
    let chain = read_certs(cert).map_err(|e| format!("{e:#}"))?;
    let verifier = rustls::client::WebPkiServerVerifier::builder_with_provider(roots, provider()).build().map_err(|e| format!("building the verifier: {e}"))?;
    let name = ServerName::try_from(node.to_string()).map_err(|e| format!("node name {node:?}: {e}"))?;
    verifier.verify_server_cert(&chain[0], &chain[1..], &name, &[], rustls::pki_types::UnixTime::now()).map(drop).map_err(|e| format!("{}: {e}", cert.display()))
}

/// Opens a TCP connection to sibling `name` at `addr` and completes a mutual TLS handshake,
/// within `timeout`: the sibling listens, presents a certificate of the cluster CA for its
/// name, and accepts this node's.
pub fn handshake(tls: &Tls, name: &str, addr: std::net::SocketAddr, timeout: std::time::Duration) -> anyhow::Result<()> {
    let tcp = std::net::TcpStream::connect_timeout(&addr, timeout).with_context(|| format!("connecting to {addr}"))?;
    tcp.set_read_timeout(Some(timeout))?;
    tcp.set_write_timeout(Some(timeout))?;
    let server = ServerName::try_from(name.to_string()).with_context(|| format!("sibling name {name:?}"))?;
    let conn = rustls::ClientConnection::new(tls.client.clone(), server).context("starting TLS")?;
    let mut stream = rustls::StreamOwned::new(conn, tcp);
    while stream.conn.is_handshaking() {
        stream.conn.complete_io(&mut stream.sock).with_context(|| format!("TLS handshake with {addr}"))?;
    }
    // The server's verdict on this node's certificate arrives after the client's handshake
    // ends (TLS 1.3): wait a moment for an alert, or for nothing (accepted).
    let _ = stream.sock.set_read_timeout(Some(std::time::Duration::from_millis(300)));
    let mut byte = [0u8; 1];
    match std::io::Read::read(&mut stream, &mut byte) {
        Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => Ok(()),
        Err(e) => Err(anyhow::anyhow!("{addr} refused this node's certificate: {e}")),
        Ok(_) => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fingerprints_are_read_as_operators_write_them() {
        let hex = "ab".repeat(32);
        let openssl = vec!["AB"; 32].join(":");
        assert_eq!(parse_fingerprint(&openssl).as_deref(), Some(hex.as_str()));
        assert_eq!(parse_fingerprint(&format!("sha256:{hex}")).as_deref(), Some(hex.as_str()));
        assert_eq!(parse_fingerprint(&format!(" {} ", hex.to_uppercase())).as_deref(), Some(hex.as_str()));
        for bad in ["", "ab", &"ab".repeat(31), &"zz".repeat(32), &"ab".repeat(33)] {
            assert_eq!(parse_fingerprint(bad), None, "{bad}");
        }
        assert_eq!(date(0), "1970-01-01");
    }
}
