//! Certificate issuing for `redirector tls`: a cluster CA, and node certificates signed by it
//! that name the node (the sibling channel checks that name, see [`crate::peer::tls`]).

use std::path::Path;

use anyhow::{Context as _, anyhow, bail};

/// `redirector tls ca DIR`: a new cluster CA (`ca.pem`, `ca.key`) in DIR.
pub fn make_ca(dir: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let (cert_path, key_path) = (dir.join("ca.pem"), dir.join("ca.key"));
    if cert_path.exists() || key_path.exists() {
        bail!("{} already holds a CA: refusing to overwrite it", dir.display());
    }
    let key = rcgen::KeyPair::generate().context("generating the CA key")?;
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).context("CA parameters")?;
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    params.distinguished_name.push(rcgen::DnType::CommonName, "redirector cluster CA");
    params.key_usages = vec![rcgen::KeyUsagePurpose::KeyCertSign, rcgen::KeyUsagePurpose::CrlSign];
    let cert = params.self_signed(&key).context("signing the CA certificate")?;
    write_secret(&key_path, &key.serialize_pem())?;
    std::fs::write(&cert_path, cert.pem()).with_context(|| format!("writing {}", cert_path.display()))?;
    Ok(())
}

/// `redirector tls node NAME`: a certificate for node NAME signed by the CA in DIR
/// (`NAME.pem`, `NAME.key`).
pub fn make_node(dir: &Path, name: &str) -> anyhow::Result<()> {
    crate::config::check_name(name).map_err(|e| anyhow!("bad node name: {e}"))?;
    let ca_pem = std::fs::read_to_string(dir.join("ca.pem")).with_context(|| format!("reading {}/ca.pem (make one with `redirector tls ca`)", dir.display()))?;
    let ca_key =
        rcgen::KeyPair::from_pem(&std::fs::read_to_string(dir.join("ca.key")).with_context(|| format!("reading {}/ca.key", dir.display()))?).context("parsing the CA key")?;
    let issuer = rcgen::Issuer::from_ca_cert_pem(&ca_pem, ca_key).context("parsing the CA certificate")?;
    let key = rcgen::KeyPair::generate().context("generating the node key")?;
    let mut params = rcgen::CertificateParams::new(vec![name.to_string()]).context("node parameters")?;
    params.distinguished_name.push(rcgen::DnType::CommonName, name);
    params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth, rcgen::ExtendedKeyUsagePurpose::ClientAuth];
    let cert = params.signed_by(&key, &issuer).context("signing the node certificate")?;
    write_secret(&dir.join(format!("{name}.key")), &key.serialize_pem())?;
    std::fs::write(dir.join(format!("{name}.pem")), cert.pem()).context("writing the node certificate")?;
    Ok(())
}

fn write_secret(path: &Path, text: &str) -> anyhow::Result<()> {
    use std::{io::Write as _, os::unix::fs::OpenOptionsExt as _};
    let mut f = std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(path).with_context(|| format!("creating {}", path.display()))?;
    f.write_all(text.as_bytes()).with_context(|| format!("writing {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::peer::tls::{Tls, identity, read_certs};

    #[test]
    fn certificates_carry_the_node_name() {
        let dir = std::env::temp_dir().join(format!("redirector-tls-test-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        make_ca(&dir).unwrap();
        assert!(make_ca(&dir).is_err(), "never overwrites a CA");
        make_node(&dir, "b").unwrap();
        let cert = read_certs(&dir.join("b.pem")).unwrap().remove(0);
        assert_eq!(identity(&cert, ["a", "b", "c"]), Some("b"));
        assert_eq!(identity(&cert, ["a", "c"]), None);
        Tls::load(&dir.join("ca.pem"), &dir.join("b.pem"), &dir.join("b.key")).unwrap();
        let _ = std::fs::remove_dir_all(&dir);
    }
}
