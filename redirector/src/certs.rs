//! Certificate issuing for `redirector tls`: a cluster CA, and node certificates signed by it
//! that name the node (the sibling channel checks that name, see [`crate::peer::tls`]).

use std::path::Path;

use anyhow::{Context as _, anyhow, bail};
use time::{Duration, OffsetDateTime};

/// Days a cluster CA is valid by default: replacing it means a new certificate for every node
/// at once, so it outlives many node certificates.
pub const CA_DAYS: u32 = 3650;

/// Days a node certificate is valid by default: a year is long enough that renewing is a
/// yearly chore rather than a weekly one, and short enough that a key copied off a server
/// stops opening the cluster (the deny list, `[tls] deny`, covers the time until then).
pub const NODE_DAYS: u32 = 365;

/// Validity from an hour ago (clocks of the cluster may differ a little) for `days`.
fn validity(params: &mut rcgen::CertificateParams, days: u32) -> anyhow::Result<OffsetDateTime> {
    if days == 0 {
        bail!("a certificate valid for 0 days is expired at once");
    }
    let now = OffsetDateTime::now_utc();
    params.not_before = now - Duration::hours(1);
    params.not_after = now + Duration::days(i64::from(days));
    Ok(params.not_after)
}

/// `redirector tls ca DIR`: a new cluster CA (`ca.pem`, `ca.key`) in DIR, valid for `days`.
/// Returns when it expires.
pub fn make_ca(dir: &Path, days: u32) -> anyhow::Result<OffsetDateTime> {
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
    let until = validity(&mut params, days)?;
    let cert = params.self_signed(&key).context("signing the CA certificate")?;
    write_secret(&key_path, &key.serialize_pem())?;
    std::fs::write(&cert_path, cert.pem()).with_context(|| format!("writing {}", cert_path.display()))?;
    Ok(until)
}

/// `redirector tls node NAME`: a certificate for node NAME signed by the CA in DIR
/// (`NAME.pem`, `NAME.key`), valid for `days` (never past the CA). Returns when it expires.
pub fn make_node(dir: &Path, name: &str, days: u32) -> anyhow::Result<OffsetDateTime> {
    crate::config::check_name(name).map_err(|e| anyhow!("bad node name: {e}"))?;
    let ca_pem = std::fs::read_to_string(dir.join("ca.pem")).with_context(|| format!("reading {}/ca.pem (make one with `redirector tls ca`)", dir.display()))?;
    let ca_key =
        rcgen::KeyPair::from_pem(&std::fs::read_to_string(dir.join("ca.key")).with_context(|| format!("reading {}/ca.key", dir.display()))?).context("parsing the CA key")?;
    let issuer = rcgen::Issuer::from_ca_cert_pem(&ca_pem, ca_key).context("parsing the CA certificate")?;
    let key = rcgen::KeyPair::generate().context("generating the node key")?;
    let mut params = rcgen::CertificateParams::new(vec![name.to_string()]).context("node parameters")?;
    params.distinguished_name.push(rcgen::DnType::CommonName, name);
    params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth, rcgen::ExtendedKeyUsagePurpose::ClientAuth];
    let mut until = validity(&mut params, days)?;
    let ca_until = crate::peer::tls::read_certs(&dir.join("ca.pem")).ok().and_then(|c| c.first().and_then(|c| crate::peer::tls::not_after(c)));
    if let Some(ca_until) = ca_until.and_then(|t| OffsetDateTime::from_unix_timestamp(t).ok()).filter(|t| *t < until) {
        // A certificate is worth nothing past its CA.
        params.not_after = ca_until;
        until = ca_until;
    }
    let cert = params.signed_by(&key, &issuer).context("signing the node certificate")?;
    write_secret(&dir.join(format!("{name}.key")), &key.serialize_pem())?;
    std::fs::write(dir.join(format!("{name}.pem")), cert.pem()).context("writing the node certificate")?;
    Ok(until)
}

fn write_secret(path: &Path, text: &str) -> anyhow::Result<()> {
    use std::{io::Write as _, os::unix::fs::OpenOptionsExt as _};
    let mut f = std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(path).with_context(|| format!("creating {}", path.display()))?;
    f.write_all(text.as_bytes()).with_context(|| format!("writing {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::peer::tls::{Tls, identity, not_after, read_certs};

    #[test]
    fn certificates_carry_the_node_name() {
        let dir = std::env::temp_dir().join(format!("redirector-tls-test-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let ca_until = make_ca(&dir, CA_DAYS).unwrap();
        assert!(make_ca(&dir, CA_DAYS).is_err(), "never overwrites a CA");
        let until = make_node(&dir, "b", NODE_DAYS).unwrap();
        let cert = read_certs(&dir.join("b.pem")).unwrap().remove(0);
        let days = |t: i64| (t - OffsetDateTime::now_utc().unix_timestamp()) / 86_400;
        assert_eq!(not_after(&cert), Some(until.unix_timestamp()), "what it says is what it wrote");
        assert!((i64::from(NODE_DAYS) - 1..=i64::from(NODE_DAYS)).contains(&days(until.unix_timestamp())), "a year, not the year 4096");
        assert!(make_node(&dir, "c", 0).is_err(), "0 days: expired at once");
        let capped = make_node(&dir, "d", 100 * CA_DAYS).unwrap();
        assert_eq!(capped.unix_timestamp(), ca_until.unix_timestamp(), "never valid past the CA");
        assert_eq!(identity(&cert, ["a", "b", "c"]), Some("b"));
        assert_eq!(identity(&cert, ["a", "c"]), None);
        Tls::load(&dir.join("ca.pem"), &dir.join("b.pem"), &dir.join("b.key")).unwrap();
        let _ = std::fs::remove_dir_all(&dir);
    }
}
