//! The sibling channel's wire protocol: length-delimited frames with a hard maximum, and
//! versioned postcard messages that start with a hello. The channel runs over mutual TLS
//! against a cluster CA ([`tls`]): a peer's identity is the name in its certificate and must
//! be a configured sibling.

mod names;
mod said;
pub mod tls;

use std::net::{IpAddr, SocketAddr};

use anyhow::{anyhow, bail};
use serde::{Deserialize, Serialize};
use tokio_util::codec::LengthDelimitedCodec;

pub use self::{
    names::{HandoffId, NodeName, NotAHandoff},
    said::Said,
};

/// Version of the sibling protocol; a peer speaking another one is refused. Version 2:
/// transfers name every tunnel source, long client lists travel in `Clients` chunks, and a
/// refused peer is told why (`Refused`). Version 3: sessions say which service they belong
/// to, a transfer counts and digests them per service, and a volunteer can ask the origin for
/// the outcome of a hand-over (`Outcome`, `OutcomeIs`). Version 4: a frame says which half of
/// the protocol it is (`Frame::Request`, `Frame::Answer`), heartbeats are their own frame,
/// and the sessions' digest is XXH3 rather than SHA-256 ([`digest`]). Version 5: a transfer
/// lists its sessions (`Listed`) and comes before them, so the volunteer checks it and starts
/// importing while the sessions are still on their way; `Sealed` counts and digests them.
/// Version 6: an origin can ask a sibling to send the direct-server-return probe (`Probe`,
/// `Probed`; `redirector doctor`). Version 7: open connections move with their clients
/// (`Connections`, counted in `Sealed`; `Live` once the rules are in). Version 8: they come
/// home too (`HandBack` names the services whose connections the origin takes; the volunteer
/// has the origin freeze them, `Freeze` and `Frozen`, before it dumps them and sends them back,
/// `Answer::Connections`), and a connection whose queues do not fit in a frame moves too, its
/// queues' rest in `ConnectionBytes` frames. Version 9: membership by gossip; a node joins the
/// cluster by asking a member for its gossip key (`Join`, `Joined`) on a connection that may
/// carry nothing else until gossip knows it.
pub const PROTOCOL_VERSION: u32 = 9;

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
    /// Encoded as one byte string, not a sequence of bytes: the same postcard encoding, but
    /// one copy rather than a call per byte (640 MiB in a big hand-over).
    #[serde(with = "serde_bytes")]
    pub blob: Vec<u8>,
}

/// A session as a transfer lists it before sending it: its client and the length of its blob.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ListedSession {
    pub client: IpAddr,
    pub len: u64,
}

/// The sessions of one of the origin's services in a transfer: how many, and their digest
/// ([`digest`]). The volunteer imports them only if it received exactly these.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionSet {
    /// The origin's service address the sessions belong to.
    pub service: SocketAddr,
    pub count: u64,
    pub digest: u64,
    /// Open connections of the service moving with the sessions (`Connections`).
    pub connections: u64,
}

/// A connection as the origin's classifier knows it: the client's address and port, and the
/// service's.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Flow {
    pub client: SocketAddr,
    pub service: SocketAddr,
}

/// An open TCP connection moving with its client: everything its new socket needs (dumped
/// on the side the client leaves), and the application's blob for it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MovedConnection {
    pub state: crate::repair::TcpState,
    #[serde(with = "serde_bytes")]
    pub blob: Vec<u8>,
    /// Bytes of its send queue, then of its receive queue, still to come in `ConnectionBytes`
    /// frames, before anything else of the transfer (its queues did not fit in one frame:
    /// `state` holds their heads). Such a connection is the last of its frame.
    pub more_send: u64,
    pub more_recv: u64,
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

/// The digest of a list of sessions: the wrapping sum, over the sessions, of XXH3-64(client
/// address as 16 bytes, IPv4 as IPv4-mapped IPv6 || blob). Order does not matter; a lost,
/// added or changed session changes it (with the count). It guards against the agents' own
/// mistakes (a chunk lost or sent twice), not against a sibling that lies, which the TLS
/// channel authenticates and which could lie about the sessions themselves anyway: a fast
/// non-cryptographic hash is enough, and on 640 MiB it costs tens of milliseconds, not the
/// 0.4 s of SHA-256 on both sides of a transfer.
#[must_use]
pub fn digest<'a>(sessions: impl IntoIterator<Item = &'a SessionBlob>) -> u64 {
    sessions.into_iter().fold(0u64, |sum, s| sum.wrapping_add(session_digest(s)))
}

/// One session's part of [`digest`] (a list's digest is the wrapping sum of its sessions').
#[must_use]
pub fn session_digest(s: &SessionBlob) -> u64 {
    let addr = match s.client {
        IpAddr::V4(a) => a.to_ipv6_mapped().octets(),
        IpAddr::V6(a) => a.octets(),
    };
    let mut h = xxhash_rust::xxh3::Xxh3::new();
    h.update(&addr);
    h.update(&s.blob);
    h.digest()
}

/// Every frame on the wire. Each connection has an opener (it connected) and an acceptor:
/// after the hellos, the opener sends [`Request`]s and the acceptor [`Answer`]s, and both send
/// heartbeats; a frame of the wrong half is a peer not speaking this protocol ([`Frame::heard`]).
///
/// `Hello` stays the first variant with the same fields in every version, so that a peer of
/// any version can read the hello it is refused with.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Frame {
    /// First frame on every connection, both ways. A node that refuses a peer for its
    /// protocol version answers with its own hello (so the peer can say which versions
    /// differ), then closes.
    Hello { version: u32, node: NodeName },
    /// The connection is refused (sent instead of a hello, then the connection closes).
    Refused { reason: String },
    /// Periodic, both ways.
    Heartbeat(Heartbeat),
    /// From the opener of the connection.
    Request(Request),
    /// From the acceptor of the connection.
    Answer(Answer),
}

/// The sender's load.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Heartbeat {
    pub load: u64,
    pub high: u64,
    pub low: u64,
}

/// What a node sends on its own connection to a sibling: it asks for help and hands clients
/// over as an origin, or asks about and gives back hand-overs as a volunteer.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Request {
    /// An overloaded origin asks for room for `connections` connections of `clients` clients.
    HelpRequest { id: u64, connections: u64, clients: u32 },
    /// Session blobs of the `Transfer` of the same id, exported by the application of the
    /// origin's `service`, in the order `Listed` listed them, after the `Transfer` (an empty
    /// one before it keeps the volunteer's reservation alive during a long export).
    Sessions { id: u64, service: SocketAddr, sessions: Vec<SessionBlob> },
    /// Part of the clients of the `Transfer` with the same id, sent before it when they do not
    /// fit in one frame.
    Clients { id: u64, clients: Vec<MovedClient> },
    /// The origin hands clients over (these and those of the `Clients` chunks before it), with
    /// the sessions `Listed` before it: the volunteer serves `services` (the origin's service
    /// addresses) and accepts tunnels from the origin's control addresses before it
    /// acknowledges. `tunnel_src` are the origin's tunnel sources; the volunteer refuses them
    /// unless they are the ones it has configured for that sibling. The sessions follow
    /// (`Sessions`), then `Sealed`; the volunteer answers `TransferAck` or `Abort` (at any
    /// time: an `Abort` may come before `Sealed`).
    Transfer { id: u64, services: Vec<SocketAddr>, tunnel_src: Vec<IpAddr>, clients: Vec<MovedClient> },
    /// The origin steered the clients of hand-over `id`: the volunteer's imported sessions are
    /// final (or, for a hand-back, its exported ones are gone).
    Commit { id: u64 },
    /// Hand-over `id` ended without steering anything (or an offer is not needed).
    Abort { id: u64, reason: String },
    /// The origin took clients back (drained or removed their rules).
    Release { clients: Vec<IpAddr> },
    /// A volunteer asks the origin how hand-over `handoff` (the origin's id) ended; `back`: it
    /// was a hand-back (the volunteer exported). `clients` are some of its clients (the origin
    /// checks its rules for them if it keeps no record of it). `id` is the volunteer's own
    /// request id.
    Outcome { id: u64, handoff: u64, back: bool, clients: Vec<IpAddr> },
    /// The origin takes `clients` home: the volunteer exports (freezes) their sessions of the
    /// origin's `services` and answers with `Sessions` frames, then `Returning` (or `Abort` to
    /// refuse). The origin then imports them, withdraws its rules (the commit point) and sends
    /// `Commit` (or `Abort`). The open connections of `live` (some of `services`) come home
    /// too: the volunteer asks the origin to freeze them first (`Freeze`, right after
    /// `Returning`), dumps those it froze (`Frozen`) and sends them after the sessions
    /// (`Answer::Connections`, counted in `Sealed`).
    HandBack { id: u64, services: Vec<SocketAddr>, clients: Vec<IpAddr>, live: Vec<SocketAddr> },
    /// A volunteer asks the origin to take `clients` back (it needs the room, or it leaves);
    /// the origin hands them back and answers `OutcomeIs` once that ended (or `Decline`).
    GiveBack { id: u64, clients: Vec<IpAddr> },
    /// Part of the sessions of the `Transfer` with the same id, as the origin's application of
    /// `service` exported them: each client and the length of its blob, in the order the
    /// `Sessions` frames after the `Transfer` bring them. Sent before the `Transfer`.
    Listed { id: u64, service: SocketAddr, sessions: Vec<ListedSession> },
    /// Every session of transfer `id` was sent: per service, their count and digest. The
    /// volunteer acknowledges only if it received exactly those, as listed.
    Sealed { id: u64, sessions: Vec<SessionSet> },
    /// The origin asks the sibling to send the direct-server-return probe ([`crate::probe`]):
    /// one UDP datagram holding `token` from the address of the origin's `service` (one the
    /// sibling may adopt from it) to the origin's own control address of that family, port
    /// `port`. The sibling answers `Probed`.
    Probe { id: u64, service: SocketAddr, port: u16, token: u64 },
    /// Open connections of the clients of `Transfer` `id`, of the origin's `service`, after
    /// its sessions and before `Sealed` (which counts them). The volunteer restores them (not
    /// live yet) before it acknowledges.
    Connections { id: u64, service: SocketAddr, connections: Vec<MovedConnection> },
    /// The origin's rules for the clients of `Transfer` `handoff` are in (it committed): the
    /// volunteer takes the connections it restored live, answers `Live` and settles the
    /// transfer as committed (its `Commit` follows); only then does the origin let their
    /// packets through again. `id` is the request's own.
    Live { id: u64, handoff: u64 },
    /// The origin froze these of the flows `Freeze` of `HandBack` `id` named (their packets
    /// are dropped, and kept, from now on): the volunteer dumps their connections and sends
    /// them; the others stay where they are.
    Frozen { id: u64, flows: Vec<Flow> },
    /// The next bytes of the queues of the last connection of `Connections` (of transfer
    /// `id`, the origin's `service`) whose queues did not fit in its frame.
    ConnectionBytes {
        id: u64,
        service: SocketAddr,
        #[serde(with = "serde_bytes")]
        bytes: Vec<u8>,
    },
    /// A node with a certificate of the cluster CA asks a member for the cluster's gossip key
    /// (gossip mode), answered `Joined` or `Decline`.
    Join { id: u64 },
}

/// What a node answers on a sibling's connection, to the request of the same id.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Answer {
    /// A volunteer offers room for `capacity` connections, reserved for `lease_ms`.
    Offer { id: u64, capacity: u64, lease_ms: u64 },
    /// This node cannot help (`HelpRequest`) or take clients back (`GiveBack`).
    Decline { id: u64, reason: String },
    /// The volunteer is ready (`Transfer`): the origin may steer.
    TransferAck { id: u64 },
    /// The volunteer refuses a `Transfer` or a `HandBack`: nothing is steered.
    Abort { id: u64, reason: String },
    /// How hand-over `id` ended (`Outcome`), or whether the clients of `GiveBack` `id` went
    /// home.
    OutcomeIs { id: u64, verdict: Verdict },
    /// Session blobs of the clients of `HandBack` `id`, exported by the volunteer's
    /// application of the origin's `service`, in the order `Listed` listed them, after
    /// `Returning` (an empty one before it keeps the origin waiting during a long export).
    Sessions { id: u64, service: SocketAddr, sessions: Vec<SessionBlob> },
    /// The volunteer's answer to `HandBack` `id`: the clients it gives back, with their
    /// connections there, and the sessions `Listed` before it; they follow (`Sessions`), then
    /// `Sealed` (or `Abort`).
    Returning { id: u64, clients: Vec<MovedClient> },
    /// Part of the sessions of the `Returning` of `HandBack` `id`, as the volunteer's
    /// application of the origin's `service` exported them: each client and the length of its
    /// blob, in the order the `Sessions` after the `Returning` bring them. Sent before it.
    Listed { id: u64, service: SocketAddr, sessions: Vec<ListedSession> },
    /// Every session of hand-back `id` was sent: per service, their count and digest.
    Sealed { id: u64, sessions: Vec<SessionSet> },
    /// The probe of `Probe` `id` was sent, or why not.
    Probed { id: u64, error: Option<String> },
    /// The connections of the transfer of `Live` `id` are live here: `live` of them.
    Live { id: u64, live: u64 },
    /// The open connections of `HandBack` `id` the volunteer's applications handed over,
    /// right after `Returning` (none: nothing to freeze, none follow): the origin freezes
    /// them and answers `Frozen`.
    Freeze { id: u64, flows: Vec<Flow> },
    /// Open connections of the clients of `HandBack` `id`, of the origin's `service`, dumped
    /// after the origin froze them: after the sessions, before `Sealed`, which counts them.
    /// The origin restores them (not live yet) before its commit point.
    Connections { id: u64, service: SocketAddr, connections: Vec<MovedConnection> },
    /// The next bytes of the queues of the last connection of `Connections` (of hand-back
    /// `id`, the origin's `service`) whose queues did not fit in its frame.
    ConnectionBytes {
        id: u64,
        service: SocketAddr,
        #[serde(with = "serde_bytes")]
        bytes: Vec<u8>,
    },
    /// The cluster's gossip key (`Join` `id`), and where this member gossips.
    Joined {
        id: u64,
        #[serde(with = "serde_bytes")]
        key: Vec<u8>,
        gossip: SocketAddr,
    },
}

impl Answer {
    /// What kind of answer this is, for a log line (its contents are the sibling's).
    #[must_use]
    pub fn what(&self) -> &'static str {
        match self {
            Answer::Offer { .. } => "an offer",
            Answer::Decline { .. } => "a decline",
            Answer::TransferAck { .. } => "a transfer acknowledgement",
            Answer::Abort { .. } => "an abort",
            Answer::OutcomeIs { .. } => "an outcome",
            Answer::Sessions { .. } => "sessions",
            Answer::Returning { .. } => "a returning",
            Answer::Listed { .. } => "a listing",
            Answer::Sealed { .. } => "a seal",
            Answer::Probed { .. } => "a probe's result",
            Answer::Live { .. } => "live connections",
            Answer::Freeze { .. } => "flows to freeze",
            Answer::Connections { .. } => "open connections",
            Answer::ConnectionBytes { .. } => "an open connection's queues",
            Answer::Joined { .. } => "the gossip key",
        }
    }

    /// The id of the request this answers.
    #[must_use]
    pub fn id(&self) -> u64 {
        match self {
            Answer::Offer { id, .. }
            | Answer::Decline { id, .. }
            | Answer::TransferAck { id }
            | Answer::Abort { id, .. }
            | Answer::OutcomeIs { id, .. }
            | Answer::Sessions { id, .. }
            | Answer::Returning { id, .. }
            | Answer::Listed { id, .. }
            | Answer::Sealed { id, .. }
            | Answer::Probed { id, .. }
            | Answer::Live { id, .. }
            | Answer::Freeze { id, .. }
            | Answer::Connections { id, .. }
            | Answer::ConnectionBytes { id, .. }
            | Answer::Joined { id, .. } => *id,
        }
    }
}

impl From<Request> for Frame {
    fn from(r: Request) -> Self {
        Frame::Request(r)
    }
}

impl From<Answer> for Frame {
    fn from(a: Answer) -> Self {
        Frame::Answer(a)
    }
}

/// The half of the protocol one side of a connection sends after the hellos.
pub trait Half: Sized + Into<Frame> {
    /// What it is, for errors.
    const WHAT: &'static str;
    /// The message in `frame`, if it is of this half.
    fn from_frame(frame: Frame) -> Option<Self>;
}

impl Half for Request {
    const WHAT: &'static str = "a request";

    fn from_frame(frame: Frame) -> Option<Self> {
        if let Frame::Request(r) = frame { Some(r) } else { None }
    }
}

impl Half for Answer {
    const WHAT: &'static str = "an answer";

    fn from_frame(frame: Frame) -> Option<Self> {
        if let Frame::Answer(a) = frame { Some(a) } else { None }
    }
}

/// A frame read after the hellos: a heartbeat, or a message of the half the peer sends.
#[derive(Debug)]
pub enum Heard<T> {
    Heartbeat(Heartbeat),
    Said(T),
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

/// Listed sessions in chunks that fit in `Listed` frames of `max_frame` bytes.
#[must_use]
pub fn listed_chunks(listed: Vec<ListedSession>, max_frame: usize) -> Vec<Vec<ListedSession>> {
    // An address: a tag and 16 bytes at most; a u64: 10 bytes at most; the service: 24.
    chunks(listed, max_frame, 24, 28)
}

/// How many flows a `Freeze` or `Frozen` frame of `max_frame` bytes holds.
#[must_use]
pub fn flows_per_frame(max_frame: usize) -> usize {
    // A socket address: a tag, 16 bytes and a port at most (20); a flow is two.
    (max_frame.saturating_sub(FRAME_OVERHEAD) / 40).max(1)
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

impl Frame {
    /// Encodes a frame's body.
    #[must_use]
    pub fn encode(&self) -> Vec<u8> {
        postcard::to_stdvec(self).expect("messages always encode")
    }

    /// Encodes a frame's body as bytes to send.
    #[must_use]
    pub fn frame(&self) -> bytes::Bytes {
        bytes::Bytes::from(self.encode())
    }

    /// Decodes one frame; never panics, whatever the bytes.
    pub fn decode(frame: &[u8]) -> anyhow::Result<Self> {
        let (msg, rest) = postcard::take_from_bytes::<Frame>(frame).map_err(|e| anyhow!("malformed message: {e}"))?;
        if !rest.is_empty() {
            bail!("malformed message: {} trailing bytes", rest.len());
        }
        Ok(msg)
    }

    /// The frame as read after the hellos by the side that receives `T`: anything but a
    /// heartbeat or a `T` (another hello, the other half) is refused, the peer does not speak
    /// this protocol.
    pub fn heard<T: Half>(self) -> anyhow::Result<Heard<T>> {
        let what = match self {
            Frame::Heartbeat(h) => return Ok(Heard::Heartbeat(h)),
            Frame::Hello { .. } => "a second hello",
            ref other => other.what(),
        };
        T::from_frame(self).map(Heard::Said).ok_or_else(|| anyhow!("expected {} or a heartbeat, got {what}: not this protocol", T::WHAT))
    }

    /// What kind of frame this is, for a log line.
    #[must_use]
    pub fn what(&self) -> &'static str {
        match self {
            Frame::Heartbeat(_) => "a heartbeat",
            Frame::Hello { .. } => "a hello",
            Frame::Refused { .. } => "a refusal",
            Frame::Request(_) => "a request",
            Frame::Answer(_) => "an answer",
        }
    }
}

/// The frame codec: a 4-byte length, then the message; longer frames close the connection.
#[must_use]
pub fn codec(max_frame: usize) -> LengthDelimitedCodec {
    LengthDelimitedCodec::builder().length_field_length(4).max_frame_length(max_frame).new_codec()
}

/// Checks a peer's hello: protocol version and the name its certificate proved.
pub fn check_hello(msg: &Frame, cert_name: &str) -> anyhow::Result<()> {
    match msg {
        Frame::Hello { version, node } => {
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

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn any_request() -> impl Strategy<Value = Request> {
        let ip = any::<[u8; 4]>().prop_map(IpAddr::from);
        prop_oneof![
            (any::<u64>(), any::<u64>(), any::<u32>()).prop_map(|(id, connections, clients)| Request::HelpRequest { id, connections, clients }),
            (any::<u64>(), ip.clone(), proptest::collection::vec((ip.clone(), any::<u64>()), 0..20)).prop_map(|(id, tunnel_src, c)| {
                Request::Transfer {
                    id,
                    services: vec![SocketAddr::new(tunnel_src, 80)],
                    tunnel_src: vec![tunnel_src],
                    clients: c.into_iter().map(|(addr, connections)| MovedClient { addr, connections }).collect(),
                }
            }),
            (any::<u64>(), ip.clone(), proptest::collection::vec((ip.clone(), any::<u64>()), 0..20)).prop_map(|(id, svc, l)| Request::Listed {
                id,
                service: SocketAddr::new(svc, 80),
                sessions: l.into_iter().map(|(client, len)| ListedSession { client, len }).collect()
            }),
            (any::<u64>(), ip.clone(), proptest::collection::vec((any::<u64>(), any::<u64>()), 0..3)).prop_map(|(id, svc, sets)| Request::Sealed {
                id,
                sessions: sets.into_iter().map(|(count, digest)| SessionSet { service: SocketAddr::new(svc, 80), count, digest, connections: count }).collect()
            }),
            (any::<u64>(), any::<u64>(), any::<bool>(), proptest::collection::vec(ip.clone(), 0..20)).prop_map(|(id, handoff, back, clients)| Request::Outcome {
                id,
                handoff,
                back,
                clients
            }),
            (any::<u64>(), ip.clone(), proptest::collection::vec(ip.clone(), 0..20)).prop_map(|(id, svc, clients)| Request::HandBack {
                id,
                services: vec![SocketAddr::new(svc, 80)],
                clients,
                live: vec![SocketAddr::new(svc, 80)],
            }),
            (any::<u64>(), proptest::collection::vec((ip.clone(), any::<u16>()), 0..20)).prop_map(|(id, f)| Request::Frozen {
                id,
                flows: f.into_iter().map(|(c, port)| Flow { client: SocketAddr::new(c, port), service: SocketAddr::new(c, 80) }).collect()
            }),
            (any::<u64>(), proptest::collection::vec(ip.clone(), 0..20)).prop_map(|(id, clients)| Request::GiveBack { id, clients }),
            (any::<u64>(), ip.clone(), any::<u16>(), any::<u64>()).prop_map(|(id, svc, port, token)| Request::Probe { id, service: SocketAddr::new(svc, 80), port, token }),
            any::<u64>().prop_map(|id| Request::Join { id }),
            (any::<u64>(), proptest::collection::vec((ip.clone(), any::<u64>()), 0..20))
                .prop_map(|(id, c)| Request::Clients { id, clients: c.into_iter().map(|(addr, connections)| MovedClient { addr, connections }).collect() }),
            any::<u64>().prop_map(|id| Request::Commit { id }),
            (any::<u64>(), ".{0,20}").prop_map(|(id, reason)| Request::Abort { id, reason }),
            proptest::collection::vec(ip.clone(), 0..20).prop_map(|clients| Request::Release { clients }),
            (any::<u64>(), ip.clone(), proptest::collection::vec((ip, proptest::collection::vec(any::<u8>(), 0..64)), 0..8)).prop_map(|(id, svc, s)| Request::Sessions {
                id,
                service: SocketAddr::new(svc, 443),
                sessions: s.into_iter().map(|(client, blob)| SessionBlob { client, blob }).collect()
            }),
        ]
    }

    fn any_answer() -> impl Strategy<Value = Answer> {
        let ip = any::<[u8; 4]>().prop_map(IpAddr::from);
        prop_oneof![
            (any::<u64>(), any::<u64>(), any::<u64>()).prop_map(|(id, capacity, lease_ms)| Answer::Offer { id, capacity, lease_ms }),
            (any::<u64>(), ".{0,20}").prop_map(|(id, reason)| Answer::Decline { id, reason }),
            (any::<u64>(), proptest::option::of(".{0,20}")).prop_map(|(id, error)| Answer::Probed { id, error }),
            (any::<u64>(), proptest::collection::vec(any::<u8>(), 0..40), any::<u16>()).prop_map(|(id, key, port)| Answer::Joined {
                id,
                key,
                gossip: SocketAddr::from(([198, 18, 0, 1], port))
            }),
            any::<u64>().prop_map(|id| Answer::TransferAck { id }),
            (any::<u64>(), ".{0,20}").prop_map(|(id, reason)| Answer::Abort { id, reason }),
            (any::<u64>(), prop_oneof![Just(Verdict::Committed), Just(Verdict::Aborted), Just(Verdict::Pending)]).prop_map(|(id, verdict)| Answer::OutcomeIs { id, verdict }),
            (any::<u64>(), ip.clone(), proptest::collection::vec((ip.clone(), proptest::collection::vec(any::<u8>(), 0..64)), 0..8)).prop_map(|(id, svc, s)| {
                Answer::Sessions { id, service: SocketAddr::new(svc, 443), sessions: s.into_iter().map(|(client, blob)| SessionBlob { client, blob }).collect() }
            }),
            (any::<u64>(), proptest::collection::vec((ip.clone(), any::<u64>()), 0..20))
                .prop_map(|(id, c)| Answer::Returning { id, clients: c.into_iter().map(|(addr, connections)| MovedClient { addr, connections }).collect() }),
            (any::<u64>(), ip.clone(), proptest::collection::vec((ip.clone(), any::<u64>()), 0..20)).prop_map(|(id, svc, l)| Answer::Listed {
                id,
                service: SocketAddr::new(svc, 80),
                sessions: l.into_iter().map(|(client, len)| ListedSession { client, len }).collect()
            }),
            (any::<u64>(), proptest::collection::vec((ip.clone(), any::<u16>()), 0..20)).prop_map(|(id, f)| Answer::Freeze {
                id,
                flows: f.into_iter().map(|(c, port)| Flow { client: SocketAddr::new(c, port), service: SocketAddr::new(c, 80) }).collect()
            }),
            (any::<u64>(), ip, proptest::collection::vec((any::<u64>(), any::<u64>()), 0..3)).prop_map(|(id, svc, sets)| Answer::Sealed {
                id,
                sessions: sets.into_iter().map(|(count, digest)| SessionSet { service: SocketAddr::new(svc, 80), count, digest, connections: count }).collect()
            }),
        ]
    }

    fn any_frame() -> impl Strategy<Value = Frame> {
        prop_oneof![
            (any::<u32>(), "[a-z]{0,12}").prop_map(|(version, node)| Frame::Hello { version, node: node.into() }),
            ".{0,40}".prop_map(|reason| Frame::Refused { reason }),
            (any::<u64>(), any::<u64>(), any::<u64>()).prop_map(|(load, high, low)| Frame::Heartbeat(Heartbeat { load, high, low })),
            any_request().prop_map(Frame::Request),
            any_answer().prop_map(Frame::Answer),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 4096, ..ProptestConfig::default() })]

        /// The decoder never panics on arbitrary bytes.
        #[test]
        fn decoding_garbage_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = Frame::decode(&bytes);
        }

        /// Every message survives a round trip; truncating or extending it is an error.
        #[test]
        fn messages_round_trip(msg in any_frame(), cut in any::<usize>()) {
            let bytes = msg.encode();
            prop_assert_eq!(Frame::decode(&bytes).unwrap(), msg);
            let cut = cut % bytes.len();
            prop_assert!(Frame::decode(&bytes[..cut]).is_err());
            let mut longer = bytes.clone();
            longer.push(0);
            prop_assert!(Frame::decode(&longer).is_err());
        }

        /// Flipping bytes of a valid message never panics the decoder.
        #[test]
        fn corrupted_messages_never_panic(msg in any_frame(), flips in proptest::collection::vec((any::<usize>(), any::<u8>()), 1..8)) {
            let mut bytes = msg.encode();
            for (i, b) in flips {
                let n = bytes.len();
                bytes[i % n] ^= b;
            }
            let _ = Frame::decode(&bytes);
        }
    }

    #[test]
    fn hellos_are_checked() {
        let ok = Frame::Hello { version: PROTOCOL_VERSION, node: "b".into() };
        assert!(check_hello(&ok, "b").is_ok());
        let e = check_hello(&Frame::Hello { version: 99, node: "b".into() }, "b").unwrap_err();
        assert!(e.to_string().contains("version 99"), "{e}");
        assert!(check_hello(&ok, "c").is_err());
        assert!(check_hello(&Answer::TransferAck { id: 1 }.into(), "b").is_err());
    }

    /// After the hellos, each side reads heartbeats and the other side's half only.
    #[test]
    fn a_frame_of_the_wrong_half_is_refused() {
        let hb = || Frame::Heartbeat(Heartbeat { load: 1, high: 2, low: 3 });
        assert!(matches!(hb().heard::<Request>(), Ok(Heard::Heartbeat(_))));
        assert!(matches!(hb().heard::<Answer>(), Ok(Heard::Heartbeat(_))));
        assert!(matches!(Frame::from(Request::Commit { id: 1 }).heard::<Request>(), Ok(Heard::Said(Request::Commit { id: 1 }))));
        assert!(matches!(Frame::from(Answer::TransferAck { id: 1 }).heard::<Answer>(), Ok(Heard::Said(Answer::TransferAck { id: 1 }))));
        let e = Frame::from(Answer::TransferAck { id: 1 }).heard::<Request>().unwrap_err();
        assert!(e.to_string().contains("expected a request or a heartbeat, got an answer"), "{e}");
        assert!(Frame::from(Request::Commit { id: 1 }).heard::<Answer>().is_err());
        assert!(Frame::Hello { version: PROTOCOL_VERSION, node: "b".into() }.heard::<Answer>().is_err());
        assert!(Frame::Refused { reason: "no".into() }.heard::<Request>().is_err());
    }

    /// A hello keeps its encoding across versions: a peer of another version reads it.
    #[test]
    fn a_hello_is_variant_zero() {
        let b = Frame::Hello { version: 7, node: "b".into() }.encode();
        assert_eq!(b, [0, 7, 1, b'b']);
        // The envelope's tags, pinned too: both sides of a link may run different builds.
        assert_eq!(Frame::from(Request::Commit { id: 5 }).encode(), [3, 4, 5]);
        assert_eq!(Frame::from(Answer::TransferAck { id: 5 }).encode(), [4, 2, 5]);
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
                let last = Frame::from(Request::Transfer { id: u64::MAX, services: services.clone(), tunnel_src: vec![v6(0), v6(1)], clients: c.clone() });
                assert!(last.encode().len() <= max_frame, "{max_frame}: a transfer of {} clients is {} bytes", c.len(), last.encode().len());
                let part = Frame::from(Request::Clients { id: u64::MAX, clients: c.clone() });
                assert!(part.encode().len() <= max_frame);
            }
            let listed: Vec<ListedSession> = (0..60_000).map(|i| ListedSession { client: v6(i), len: u64::MAX }).collect();
            let chunks = listed_chunks(listed.clone(), max_frame);
            assert_eq!(chunks.iter().map(Vec::len).sum::<usize>(), listed.len(), "nobody lost");
            for c in chunks {
                assert!(Frame::from(Request::Listed { id: u64::MAX, service: services[0], sessions: c }).encode().len() <= max_frame);
            }
            let sealed = services.iter().map(|s| SessionSet { service: *s, count: u64::MAX, digest: u64::MAX, connections: u64::MAX }).collect();
            assert!(Frame::from(Request::Sealed { id: u64::MAX, sessions: sealed }).encode().len() <= max_frame);
            let addrs: Vec<IpAddr> = (0..60_000).map(v6).collect();
            for c in addr_chunks(addrs, max_frame) {
                assert!(Frame::from(Request::Release { clients: c }).encode().len() <= max_frame);
            }
        }
        assert_eq!(client_chunks(Vec::new(), &services, 8192), vec![Vec::new()], "a transfer of nobody is one frame");
        // An outcome query's sample of clients fits in a frame too.
        let sample: Vec<IpAddr> = (0..u32::try_from(OUTCOME_SAMPLE).unwrap()).map(v6).collect();
        assert!(Frame::from(Request::Outcome { id: u64::MAX, handoff: u64::MAX, back: true, clients: sample }).encode().len() <= 8192);
        // A hand-back's request and its answer fit in a frame.
        let addrs: Vec<IpAddr> = (0..60_000).map(v6).collect();
        for max_frame in [8192, 1 << 20] {
            let groups = hand_back_groups(addrs.clone(), &services, max_frame);
            assert_eq!(groups.iter().map(Vec::len).sum::<usize>(), addrs.len(), "nobody lost");
            for g in groups {
                let back = Frame::from(Answer::Returning { id: u64::MAX, clients: g.iter().map(|a| MovedClient { addr: *a, connections: u64::MAX }).collect() });
                assert!(back.encode().len() <= max_frame, "{max_frame}: a Returning of {} clients is {} bytes", g.len(), back.encode().len());
                assert!(Frame::from(Request::HandBack { id: u64::MAX, services: services.clone(), clients: g.clone(), live: services.clone() }).encode().len() <= max_frame);
                assert!(Frame::from(Request::GiveBack { id: u64::MAX, clients: g }).encode().len() <= max_frame);
            }
            // As many flows as a frame holds, of the longest addresses.
            let flow = Flow { client: SocketAddr::new(v6(u32::MAX), u16::MAX), service: SocketAddr::new(v6(u32::MAX - 1), u16::MAX) };
            let flows = vec![flow; flows_per_frame(max_frame)];
            assert!(Frame::from(Answer::Freeze { id: u64::MAX, flows: flows.clone() }).encode().len() <= max_frame);
            assert!(Frame::from(Request::Frozen { id: u64::MAX, flows }).encode().len() <= max_frame);
        }
    }

    /// The digest sees every lost, added, changed or moved byte, whatever the order.
    #[test]
    fn a_blob_is_encoded_as_a_plain_byte_sequence_would_be() {
        #[derive(Serialize)]
        struct Plain {
            client: IpAddr,
            blob: Vec<u8>,
        }
        let (client, blob) = (IpAddr::from([198, 18, 1, 5]), (0..=255u8).cycle().take(1000).collect::<Vec<u8>>());
        let ours = postcard::to_stdvec(&SessionBlob { client, blob: blob.clone() }).unwrap();
        assert_eq!(ours, postcard::to_stdvec(&Plain { client, blob: blob.clone() }).unwrap(), "the wire format stays that of protocol 3");
        assert_eq!(postcard::from_bytes::<SessionBlob>(&ours).unwrap().blob, blob);
    }

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
}
