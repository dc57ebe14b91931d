//! The sibling channel: mutual TLS against a cluster CA (a peer's identity is the name in its
//! certificate and must be a configured sibling), length-delimited frames with a hard maximum,
//! and versioned postcard messages that start with a hello.

use std::{
    net::{IpAddr, SocketAddr},
    path::Path,
    sync::Arc,
};

use anyhow::{Context as _, anyhow, bail};
use rustls::{
    RootCertStore,
    pki_types::{CertificateDer, PrivateKeyDer, ServerName, pem::PemObject as _},
    server::WebPkiClientVerifier,
};
use serde::{Deserialize, Serialize};
use tokio_util::codec::LengthDelimitedCodec;

/// Version of the sibling protocol; a peer speaking another one is refused. Version 2:
/// transfers name every tunnel source, long client lists travel in `Clients` chunks, and a
/// refused peer is told why (`Refused`). Version 3: sessions say which service they belong
/// to, a transfer counts and digests them per service, and a volunteer can ask the origin for
/// the outcome of a hand-over (`Outcome`, `OutcomeIs`).
pub const PROTOCOL_VERSION: u32 = 3;

/// Room left in a frame for a message's own fields around a chunk of a list.
const FRAME_OVERHEAD: usize = 4096;

/// A client moved from an origin to a volunteer, with its connections at the origin.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MovedClient {
    pub addr: IpAddr,
    pub connections: u64,
}

/// A client's session as the application exported it (opaque to redirector).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionBlob {
    pub client: IpAddr,
    pub blob: Vec<u8>,
}

/// The sessions of one of the origin's services in a transfer: how many, and their digest
/// ([`digest`]). The volunteer imports them only if it received exactly these.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionSet {
    /// The origin's service address the sessions belong to.
    pub service: SocketAddr,
    pub count: u64,
    pub digest: u64,
}

/// The outcome of a hand-over, as its origin knows it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Verdict {
    /// The origin's rules steer the clients to the volunteer: the sessions live there.
    Committed,
    /// Nothing was steered: the sessions live on the origin.
    Aborted,
    /// Not decided yet (the origin is still working on it): ask again later.
    Pending,
}

/// The digest of a list of sessions: the wrapping sum, over the sessions, of the first 8 bytes
/// (big-endian) of SHA-256(client address as 16 bytes, IPv4 as IPv4-mapped IPv6 || blob).
/// Order does not matter; a lost, added or changed session changes it (with the count).
#[must_use]
pub fn digest<'a>(sessions: impl IntoIterator<Item = &'a SessionBlob>) -> u64 {
    sessions.into_iter().fold(0u64, |sum, s| sum.wrapping_add(session_digest(s)))
}

fn session_digest(s: &SessionBlob) -> u64 {
    let addr = match s.client {
        IpAddr::V4(a) => a.to_ipv6_mapped().octets(),
        IpAddr::V6(a) => a.octets(),
    };
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    ctx.update(&addr);
    ctx.update(&s.blob);
    let d = ctx.finish();
    let mut first = [0u8; 8];
    first.copy_from_slice(&d.as_ref()[..8]);
    u64::from_be_bytes(first)
}

/// Messages between siblings. Requests travel on the requester's own connection, answers come
/// back on it.
///
/// `Hello` stays the first variant with the same fields in every version, so that a peer of
/// any version can read the hello it is refused with.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Msg {
    /// First frame on every connection, both ways. A node that refuses a peer for its
    /// protocol version answers with its own hello (so the peer can say which versions
    /// differ), then closes.
    Hello { version: u32, node: String },
    /// Periodic, both ways: the sender's load.
    Heartbeat { load: u64, high: u64, low: u64 },
    /// An overloaded origin asks for room for `connections` connections of `clients` clients.
    HelpRequest { id: u64, connections: u64, clients: u32 },
    /// A volunteer offers room for `capacity` connections, reserved for `lease_ms`.
    Offer { id: u64, capacity: u64, lease_ms: u64 },
    /// A sibling cannot help.
    Decline { id: u64, reason: String },
    /// Session blobs of clients about to be transferred, exported by the application of the
    /// origin's `service` (several frames may precede the `Transfer` of the same id; an empty
    /// one keeps the volunteer's reservation alive during a long export).
    Sessions { id: u64, service: SocketAddr, sessions: Vec<SessionBlob> },
    /// The origin hands clients over (these and those of the `Clients` chunks before it): the
    /// volunteer serves `services` (the origin's service addresses) and accepts tunnels from
    /// the origin's control addresses before it acknowledges. `tunnel_src` are the origin's
    /// tunnel sources; the volunteer refuses them unless they are the ones it has configured
    /// for that sibling. `sessions` counts and digests, per service, the sessions sent before
    /// it: the volunteer refuses the transfer unless it received exactly those.
    Transfer { id: u64, services: Vec<SocketAddr>, tunnel_src: Vec<IpAddr>, clients: Vec<MovedClient>, sessions: Vec<SessionSet> },
    /// The volunteer is ready: the origin may steer.
    TransferAck { id: u64 },
    /// The origin steered the transferred clients: the volunteer's imported sessions are
    /// final.
    Commit { id: u64 },
    /// Something failed before the acknowledgement: nothing is steered.
    Abort { id: u64, reason: String },
    /// The origin took clients back (drained or removed their rules).
    Release { clients: Vec<IpAddr> },
    /// Part of the clients of the `Transfer` with the same id, sent before it when they do not
    /// fit in one frame.
    Clients { id: u64, clients: Vec<MovedClient> },
    /// The connection is refused (sent instead of a hello, then the connection closes).
    Refused { reason: String },
    /// A volunteer asks the origin how hand-over `handoff` (the origin's id) ended; `back`: it
    /// was a hand-back (the volunteer exported). `clients` are some of its clients (the origin
    /// checks its rules for them if it keeps no record of it). `id` is the volunteer's own
    /// request id.
    Outcome { id: u64, handoff: u64, back: bool, clients: Vec<IpAddr> },
    /// The origin's answer to `Outcome` (or `GiveBack`) `id`.
    OutcomeIs { id: u64, verdict: Verdict },
    /// The origin takes `clients` home: the volunteer exports (freezes) their sessions of the
    /// origin's `services` and answers on this link with `Sessions` frames, then `Returning`
    /// (or `Abort` to refuse). The origin then imports them, withdraws its rules (the commit
    /// point) and sends `Commit` (or `Abort`).
    HandBack { id: u64, services: Vec<SocketAddr>, clients: Vec<IpAddr> },
    /// The volunteer's answer to `HandBack` `id`: the clients it gives back, with their
    /// connections there, and per service the count and digest of the `Sessions` sent before.
    Returning { id: u64, clients: Vec<MovedClient>, sessions: Vec<SessionSet> },
    /// A volunteer asks the origin to take `clients` back (it needs the room, or it leaves);
    /// the origin hands them back and answers `OutcomeIs` once that ended (or `Decline`).
    GiveBack { id: u64, clients: Vec<IpAddr> },
}

/// `items` in chunks whose encoding, with `overhead` bytes of other fields, stays under
/// `max_frame`; every item encodes in at most `item_max` bytes.
fn chunks<T>(items: Vec<T>, max_frame: usize, overhead: usize, item_max: usize) -> Vec<Vec<T>> {
    let per = (max_frame.saturating_sub(overhead.saturating_add(FRAME_OVERHEAD)) / item_max).max(1);
    let mut out = Vec::with_capacity(items.len() / per + 1);
    let mut it = items.into_iter().peekable();
    while it.peek().is_some() {
        out.push(it.by_ref().take(per).collect());
    }
    out
}

/// Moved clients in chunks that fit in frames of `max_frame` bytes next to `services` (the
/// last chunk travels in the `Transfer` itself, the others in `Clients` before it). Never
/// empty: a transfer of nobody is one empty chunk.
#[must_use]
pub fn client_chunks(clients: Vec<MovedClient>, services: &[SocketAddr], max_frame: usize) -> Vec<Vec<MovedClient>> {
    // An address: a tag and 16 bytes at most; a u64: 10 bytes at most.
    let mut c = chunks(clients, max_frame, services.len() * 24, 28);
    if c.is_empty() {
        c.push(Vec::new());
    }
    c
}

/// At most this many clients are named in an `Outcome` query (the origin's rules for a
/// transfer are all in or all out per family, so a sample of each family decides).
pub const OUTCOME_SAMPLE: usize = 256;

/// Addresses in chunks that fit in `Release`, `HandBack` or `GiveBack` frames of `max_frame`
/// bytes.
#[must_use]
pub fn addr_chunks(addrs: Vec<IpAddr>, max_frame: usize) -> Vec<Vec<IpAddr>> {
    chunks(addrs, max_frame, 0, 18)
}

/// Clients in groups small enough that the volunteer's `Returning` for each (every client with
/// its connections) fits in a frame of `max_frame` bytes next to `services`: one hand-back
/// per group.
#[must_use]
pub fn hand_back_groups(addrs: Vec<IpAddr>, services: &[SocketAddr], max_frame: usize) -> Vec<Vec<IpAddr>> {
    chunks(addrs, max_frame, services.len() * 40, 28)
}

impl Msg {
    /// Encodes a message for one frame.
    #[must_use]
    pub fn encode(&self) -> Vec<u8> {
        postcard::to_stdvec(self).expect("messages always encode")
    }

    /// Encodes a message as a frame body.
    #[must_use]
    pub fn frame(&self) -> bytes::Bytes {
        bytes::Bytes::from(self.encode())
    }

    /// Decodes one frame; never panics, whatever the bytes.
    pub fn decode(frame: &[u8]) -> anyhow::Result<Self> {
        let (msg, rest) = postcard::take_from_bytes::<Msg>(frame).map_err(|e| anyhow!("malformed message: {e}"))?;
        if !rest.is_empty() {
            bail!("malformed message: {} trailing bytes", rest.len());
        }
        Ok(msg)
    }
}

/// The frame codec: a 4-byte length, then the message; longer frames close the connection.
#[must_use]
pub fn codec(max_frame: usize) -> LengthDelimitedCodec {
    LengthDelimitedCodec::builder().length_field_length(4).max_frame_length(max_frame).new_codec()
}

/// Checks a peer's hello: protocol version and the name its certificate proved.
pub fn check_hello(msg: &Msg, cert_name: &str) -> anyhow::Result<()> {
    match msg {
        Msg::Hello { version, node } => {
            if *version != PROTOCOL_VERSION {
                bail!("peer {node} speaks protocol version {version}, this node speaks {PROTOCOL_VERSION}: refused");
            }
            if node != cert_name {
                bail!("peer says it is {node} but its certificate is for {cert_name}: refused");
            }
            Ok(())
        }
        other => bail!("expected a hello, got {other:?}"),
    }
}

fn read_certs(path: &Path) -> anyhow::Result<Vec<CertificateDer<'static>>> {
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
    use proptest::prelude::*;

    use super::*;

    fn any_msg() -> impl Strategy<Value = Msg> {
        let ip = any::<[u8; 4]>().prop_map(IpAddr::from);
        prop_oneof![
            (any::<u32>(), "[a-z]{0,12}").prop_map(|(version, node)| Msg::Hello { version, node }),
            (any::<u64>(), any::<u64>(), any::<u64>()).prop_map(|(load, high, low)| Msg::Heartbeat { load, high, low }),
            (any::<u64>(), any::<u64>(), any::<u32>()).prop_map(|(id, connections, clients)| Msg::HelpRequest { id, connections, clients }),
            (any::<u64>(), any::<u64>(), any::<u64>()).prop_map(|(id, capacity, lease_ms)| Msg::Offer { id, capacity, lease_ms }),
            (any::<u64>(), ".{0,20}").prop_map(|(id, reason)| Msg::Decline { id, reason }),
            (any::<u64>(), ip.clone(), proptest::collection::vec((ip.clone(), any::<u64>()), 0..20), proptest::collection::vec((any::<u64>(), any::<u64>()), 0..3)).prop_map(
                |(id, tunnel_src, c, sets)| {
                    Msg::Transfer {
                        id,
                        services: vec![SocketAddr::new(tunnel_src, 80)],
                        tunnel_src: vec![tunnel_src],
                        clients: c.into_iter().map(|(addr, connections)| MovedClient { addr, connections }).collect(),
                        sessions: sets.into_iter().map(|(count, digest)| SessionSet { service: SocketAddr::new(tunnel_src, 80), count, digest }).collect(),
                    }
                }
            ),
            (any::<u64>(), any::<u64>(), any::<bool>(), proptest::collection::vec(ip.clone(), 0..20)).prop_map(|(id, handoff, back, clients)| Msg::Outcome {
                id,
                handoff,
                back,
                clients
            }),
            (any::<u64>(), ip.clone(), proptest::collection::vec(ip.clone(), 0..20)).prop_map(|(id, svc, clients)| Msg::HandBack {
                id,
                services: vec![SocketAddr::new(svc, 80)],
                clients
            }),
            (any::<u64>(), ip.clone(), proptest::collection::vec((ip.clone(), any::<u64>()), 0..20), proptest::collection::vec((any::<u64>(), any::<u64>()), 0..3)).prop_map(
                |(id, svc, c, sets)| Msg::Returning {
                    id,
                    clients: c.into_iter().map(|(addr, connections)| MovedClient { addr, connections }).collect(),
                    sessions: sets.into_iter().map(|(count, digest)| SessionSet { service: SocketAddr::new(svc, 80), count, digest }).collect(),
                }
            ),
            (any::<u64>(), proptest::collection::vec(ip.clone(), 0..20)).prop_map(|(id, clients)| Msg::GiveBack { id, clients }),
            (any::<u64>(), prop_oneof![Just(Verdict::Committed), Just(Verdict::Aborted), Just(Verdict::Pending)]).prop_map(|(id, verdict)| Msg::OutcomeIs { id, verdict }),
            (any::<u64>(), proptest::collection::vec((ip.clone(), any::<u64>()), 0..20))
                .prop_map(|(id, c)| Msg::Clients { id, clients: c.into_iter().map(|(addr, connections)| MovedClient { addr, connections }).collect() }),
            ".{0,40}".prop_map(|reason| Msg::Refused { reason }),
            any::<u64>().prop_map(|id| Msg::TransferAck { id }),
            any::<u64>().prop_map(|id| Msg::Commit { id }),
            (any::<u64>(), ".{0,20}").prop_map(|(id, reason)| Msg::Abort { id, reason }),
            proptest::collection::vec(ip.clone(), 0..20).prop_map(|clients| Msg::Release { clients }),
            (any::<u64>(), ip.clone(), proptest::collection::vec((ip, proptest::collection::vec(any::<u8>(), 0..64)), 0..8)).prop_map(|(id, svc, s)| Msg::Sessions {
                id,
                service: SocketAddr::new(svc, 443),
                sessions: s.into_iter().map(|(client, blob)| SessionBlob { client, blob }).collect()
            }),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 4096, ..ProptestConfig::default() })]

        /// The decoder never panics on arbitrary bytes.
        #[test]
        fn decoding_garbage_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = Msg::decode(&bytes);
        }

        /// Every message survives a round trip; truncating or extending it is an error.
        #[test]
        fn messages_round_trip(msg in any_msg(), cut in any::<usize>()) {
            let bytes = msg.encode();
            prop_assert_eq!(Msg::decode(&bytes).unwrap(), msg);
            let cut = cut % bytes.len();
            prop_assert!(Msg::decode(&bytes[..cut]).is_err());
            let mut longer = bytes.clone();
            longer.push(0);
            prop_assert!(Msg::decode(&longer).is_err());
        }

        /// Flipping bytes of a valid message never panics the decoder.
        #[test]
        fn corrupted_messages_never_panic(msg in any_msg(), flips in proptest::collection::vec((any::<usize>(), any::<u8>()), 1..8)) {
            let mut bytes = msg.encode();
            for (i, b) in flips {
                let n = bytes.len();
                bytes[i % n] ^= b;
            }
            let _ = Msg::decode(&bytes);
        }
    }

    #[test]
    fn hellos_are_checked() {
        let ok = Msg::Hello { version: PROTOCOL_VERSION, node: "b".into() };
        assert!(check_hello(&ok, "b").is_ok());
        let e = check_hello(&Msg::Hello { version: 99, node: "b".into() }, "b").unwrap_err();
        assert!(e.to_string().contains("version 99"), "{e}");
        assert!(check_hello(&ok, "c").is_err());
        assert!(check_hello(&Msg::TransferAck { id: 1 }, "b").is_err());
    }

    /// A hello keeps its encoding across versions: a peer of another version reads it.
    #[test]
    fn a_hello_is_variant_zero() {
        let b = Msg::Hello { version: 7, node: "b".into() }.encode();
        assert_eq!(b, [0, 7, 1, b'b']);
    }

    /// Long lists travel in chunks that each fit in a frame: 60,000 IPv6 clients with the
    /// largest connection counts, and as many addresses to release.
    #[test]
    fn long_lists_are_chunked_under_the_frame_limit() {
        let v6 = |i: u32| IpAddr::from(std::net::Ipv6Addr::from(u128::MAX - u128::from(i)));
        let clients: Vec<MovedClient> = (0..60_000).map(|i| MovedClient { addr: v6(i), connections: u64::MAX }).collect();
        let services: Vec<SocketAddr> = (0..100).map(|i| SocketAddr::new(v6(i), 65535)).collect();
        for max_frame in [8192, 1 << 20] {
            let chunks = client_chunks(clients.clone(), &services, max_frame);
            assert!(chunks.len() > 1, "{max_frame}: one frame would not do");
            assert_eq!(chunks.iter().map(Vec::len).sum::<usize>(), clients.len(), "nobody lost");
            for c in &chunks {
                let sessions = services.iter().map(|s| SessionSet { service: *s, count: u64::MAX, digest: u64::MAX }).collect();
                let last = Msg::Transfer { id: u64::MAX, services: services.clone(), tunnel_src: vec![v6(0), v6(1)], clients: c.clone(), sessions };
                assert!(last.encode().len() <= max_frame, "{max_frame}: a transfer of {} clients is {} bytes", c.len(), last.encode().len());
                let part = Msg::Clients { id: u64::MAX, clients: c.clone() };
                assert!(part.encode().len() <= max_frame);
            }
            let addrs: Vec<IpAddr> = (0..60_000).map(v6).collect();
            for c in addr_chunks(addrs, max_frame) {
                assert!(Msg::Release { clients: c }.encode().len() <= max_frame);
            }
        }
        assert_eq!(client_chunks(Vec::new(), &services, 8192), vec![Vec::new()], "a transfer of nobody is one frame");
        // An outcome query's sample of clients fits in a frame too.
        let sample: Vec<IpAddr> = (0..u32::try_from(OUTCOME_SAMPLE).unwrap()).map(v6).collect();
        assert!(Msg::Outcome { id: u64::MAX, handoff: u64::MAX, back: true, clients: sample }.encode().len() <= 8192);
        // A hand-back's request and its answer fit in a frame.
        let addrs: Vec<IpAddr> = (0..60_000).map(v6).collect();
        for max_frame in [8192, 1 << 20] {
            let groups = hand_back_groups(addrs.clone(), &services, max_frame);
            assert_eq!(groups.iter().map(Vec::len).sum::<usize>(), addrs.len(), "nobody lost");
            for g in groups {
                let sessions = services.iter().map(|s| SessionSet { service: *s, count: u64::MAX, digest: u64::MAX }).collect();
                let back = Msg::Returning { id: u64::MAX, clients: g.iter().map(|a| MovedClient { addr: *a, connections: u64::MAX }).collect(), sessions };
                assert!(back.encode().len() <= max_frame, "{max_frame}: a Returning of {} clients is {} bytes", g.len(), back.encode().len());
                assert!(Msg::HandBack { id: u64::MAX, services: services.clone(), clients: g.clone() }.encode().len() <= max_frame);
                assert!(Msg::GiveBack { id: u64::MAX, clients: g }.encode().len() <= max_frame);
            }
        }
    }

    /// The digest sees every lost, added, changed or moved byte, whatever the order.
    #[test]
    fn the_digest_of_sessions_ignores_order_but_nothing_else() {
        let s = |c: u8, b: &[u8]| SessionBlob { client: IpAddr::from([198, 18, 1, c]), blob: b.to_vec() };
        let all = [s(1, b"one"), s(2, b"two"), s(3, b"")];
        let d = digest(&all);
        assert_eq!(d, digest([&all[2], &all[0], &all[1]]), "order does not matter");
        assert_ne!(d, digest(&all[..2]), "a lost session shows");
        assert_ne!(d, digest(&[s(1, b"one"), s(2, b"twO"), s(3, b"")]), "a changed byte shows");
        assert_ne!(d, digest(&[s(1, b"one"), s(4, b"two"), s(3, b"")]), "another client shows");
        assert_ne!(digest(&[s(1, b"ab"), s(2, b"")]), digest(&[s(1, b"a"), s(2, b"b")]), "bytes moved between sessions show");
        assert_eq!(digest(&[]), 0);
        // Pinned: both sides of a transfer may run different builds.
        assert_eq!(digest(&[s(5, b"x")]), session_digest(&s(5, b"x")));
        let v4 = SessionBlob { client: IpAddr::from([198, 18, 1, 5]), blob: b"x".to_vec() };
        let mapped = SessionBlob { client: IpAddr::from(std::net::Ipv4Addr::new(198, 18, 1, 5).to_ipv6_mapped()), blob: b"x".to_vec() };
        assert_eq!(digest([&v4]), digest([&mapped]), "one address, one digest");
    }

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
