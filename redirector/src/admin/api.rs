//! What travels on the admin socket, for both ends: a [`Request`] (one JSON line, tagged by
//! `op`; the bare word `status` is accepted too) and its answer, one JSON line: [`Status`],
//! [`Moved`], [`GivenBack`], [`DrainState`] or [`ProbeSent`], or `{"error": "..."}` ([`Refused`]).

use std::{
    collections::BTreeMap,
    net::{IpAddr, SocketAddr},
};

use serde::{Deserialize, Serialize};

/// The longest request line the agent reads (newline included): a move of 400,000 IPv6
/// clients fits. The CLI refuses a longer one before sending it.
pub const MAX_REQUEST: usize = 16 << 20;

/// A request to the running agent.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "kebab-case", deny_unknown_fields)]
pub enum Request {
    /// `{"op":"status"}`: answered with [`Status`].
    Status,
    /// `{"op":"move","clients":["198.18.1.5",...]}`: move these clients to siblings with room
    /// now, as shedding would (one connection each assumed), with their sessions; answered with
    /// [`Moved`]. `"to":"NODE"`: to that sibling only.
    Move {
        clients: Vec<IpAddr>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        to: Option<String>,
    },
    /// `{"op":"give-back","clients":[...]}`: bring these clients back with their sessions
    /// (moved-out ones come home, adopted ones go back to their origin); answered with
    /// [`GivenBack`].
    GiveBack { clients: Vec<IpAddr> },
    /// `{"op":"drain"}`: from now on, move every client of this node to its siblings with
    /// its session, give adopted ones back, offer no room and take no client home, until
    /// `undrain` (kept across restarts); answered at once with [`DrainState`]; the progress
    /// shows in [`Status::drain`].
    Drain {},
    /// `{"op":"undrain"}`: take load again (offer room, take moved clients home after
    /// `home_after_secs`); answered with [`DrainState`].
    Undrain {},
    /// `{"op":"probe","sibling":"b","service":"198.18.0.10:80","port":40000,"token":7}`: asks
    /// sibling `sibling` to send the direct-server-return probe (`crate::probe`) from
    /// `service`'s address to this node, port `port` (`redirector doctor` watches for it);
    /// answered with [`ProbeSent`] once the sibling says it sent it.
    Probe { sibling: String, service: SocketAddr, port: u16, token: u64 },
}

impl Request {
    /// Reads one request line: JSON, or the bare word `status` (what earlier clients send).
    ///
    /// # Errors
    /// Why the line is no request, in words for the asker.
    pub fn parse(line: &str) -> Result<Self, String> {
        match line.trim() {
            "status" => Ok(Self::Status),
            req if req.starts_with('{') => serde_json::from_str(req).map_err(|e| format!("malformed request: {e}")),
            other => Err(format!("unknown request {:?}: try status, or a JSON request", other.chars().take(64).collect::<String>())),
        }
    }
}

/// The answer to a request the agent could not carry out, and why.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Refused {
    pub error: String,
}

/// The answer to [`Request::Move`].
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Moved {
    /// Clients moved, with their sessions.
    pub moved: usize,
    /// How long it took, in milliseconds.
    pub ms: f64,
}

/// The answer to [`Request::GiveBack`].
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct GivenBack {
    /// Clients that came home (or went back to their origin) with their sessions.
    pub given_back: usize,
    /// Clients asked for.
    pub asked: usize,
    /// How long it took, in milliseconds.
    pub ms: f64,
}

/// The answer to [`Request::Probe`]: the sibling sent the probe.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ProbeSent {
    /// From the request to the sibling's answer, in milliseconds.
    pub ms: f64,
}

/// The answer to [`Request::Drain`] and [`Request::Undrain`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DrainState {
    /// The node is drained now.
    pub drained: bool,
    /// It already was (drain) or was not (undrain): nothing changed.
    pub already: bool,
    /// Drained since then (Unix seconds).
    pub since_unix: Option<u64>,
}

/// A drained node's progress: what is still here to move.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Drain {
    /// Drained since then (Unix seconds).
    pub since_unix: u64,
    /// Clients with connections here still to move: this node's own, and clients adopted
    /// from siblings (they go back to their origins).
    pub clients_left: usize,
    /// Their connections.
    pub connections_left: u64,
    /// Nothing is left to move and no hand-over is in progress. Connections of clients that
    /// moved may still be finishing here (`load`).
    pub done: bool,
}

/// What the running agent reports of itself (`redirector status`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Status {
    pub node: String,
    /// Established connections of this node's services (the kernel's count).
    pub load: u64,
    pub high_watermark: u64,
    pub low_watermark: u64,
    /// A shedding round is running.
    pub shedding: bool,
    /// The last round's time from the load crossing the high watermark (the kernel's clock) to
    /// its rules installed, in milliseconds.
    pub last_shed_ms: Option<f64>,
    /// What the last shedding round decided, in words.
    pub last_round: Option<String>,
    /// Connections promised to adopted clients that have not arrived yet.
    pub promised: u64,
    pub siblings: Vec<SiblingStatus>,
    /// Clients moved out from here, by address.
    pub migrated_out: Vec<MovedOut>,
    /// Clients adopted here from an origin, by address.
    pub adopted: Vec<Adopted>,
    /// Rules draining in the kernel (last reconciliation).
    pub draining: usize,
    /// Rules in the kernel this agent does not manage (last reconciliation).
    pub orphaned: Vec<OrphanRule>,
    pub hook: HookStatus,
    pub handoffs: HandoffStatus,
    /// Clients that came home from a sibling that stayed unreachable: whatever session each
    /// had there is lost.
    pub sessions_lost: u64,
    /// The agent is stopping (handing clients back).
    pub leaving: bool,
    /// The node is drained (`redirector drain`), and how far it got; none: it takes load.
    #[serde(default)]
    pub drain: Option<Drain>,
    /// The datapath's decision counters (summed over CPUs), by name.
    pub counters: BTreeMap<String, u64>,
    /// Membership by gossip, once this node joined (gossip mode only).
    #[serde(default)]
    pub cluster: Option<ClusterStatus>,
}

/// This node in the gossip.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterStatus {
    /// Where this node gossips.
    pub gossip: SocketAddr,
    /// The other members gossip holds live, by name.
    pub members: Vec<MemberStatus>,
    /// Gossip datagrams sent and received since the agent started.
    pub sent: u64,
    pub received: u64,
    /// Datagrams dropped unread: not sealed with the cluster's gossip key.
    pub refused: u64,
    /// The members with room this node keeps linked in advance (`standby`).
    #[serde(default)]
    pub standby: Vec<String>,
}

/// A live member, as gossip says.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemberStatus {
    pub name: String,
    pub control: SocketAddr,
    /// The room for connections it last published (none yet: unknown).
    pub room: Option<u64>,
}

/// A configured sibling as this agent sees it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SiblingStatus {
    pub name: String,
    pub address: SocketAddr,
    /// Its link is up and it was heard within the liveness period.
    pub up: bool,
    /// Milliseconds since its last heartbeat (none yet: never).
    pub last_heartbeat_ms: Option<u64>,
    /// Milliseconds since it was last heard at all.
    pub last_seen_ms: Option<u64>,
    /// Its load, from its last heartbeat.
    pub load: u64,
}

/// A client this node moved to a volunteer.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MovedOut {
    pub client: IpAddr,
    pub to: String,
    pub since_unix: u64,
    /// Connections the client had here when it moved.
    pub connections: u64,
}

/// A client this node adopted from an origin.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Adopted {
    pub client: IpAddr,
    pub from: String,
    pub since_unix: u64,
    /// Connections the origin said the client had: room is kept for them until they arrive.
    pub promised: u64,
    /// Its connections here now.
    pub connections: u64,
}

/// A rule in the kernel this agent does not manage, and why.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct OrphanRule {
    pub prefix: String,
    pub target: IpAddr,
    pub why: String,
}

/// The applications on the hook socket.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct HookStatus {
    /// Services with an application registered.
    pub registered: Vec<String>,
    /// Outcomes (commit or abort) not yet confirmed by an application.
    pub unconfirmed: usize,
}

/// Hand-overs in both directions.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct HandoffStatus {
    /// Clients held by a hand-over in progress.
    pub clients_in_progress: usize,
    /// Hand-overs this node took part in whose outcome it awaits from their origin.
    pub awaiting_outcome: usize,
    /// Hand-overs this node started that are not decided yet.
    pub undecided: usize,
    /// Clients that came home with their sessions.
    pub handed_back: u64,
    /// The last hand-back's time, in milliseconds.
    pub last_home_ms: Option<f64>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_read_as_the_documented_lines() {
        assert_eq!(Request::parse("status\n"), Ok(Request::Status));
        assert_eq!(Request::parse(r#"{"op":"status"}"#), Ok(Request::Status));
        assert_eq!(
            Request::parse(r#"{"op":"move","clients":["198.18.1.5","2001:db8::5"]}"#),
            Ok(Request::Move { clients: vec!["198.18.1.5".parse().unwrap(), "2001:db8::5".parse().unwrap()], to: None })
        );
        assert_eq!(Request::parse(r#"{"op":"move","clients":["198.18.1.5"],"to":"b"}"#), Ok(Request::Move { clients: vec!["198.18.1.5".parse().unwrap()], to: Some("b".into()) }));
        assert_eq!(Request::parse(r#"{"op":"give-back","clients":[]}"#), Ok(Request::GiveBack { clients: Vec::new() }));
        assert_eq!(Request::parse(r#"{"op":"drain"}"#), Ok(Request::Drain {}));
        assert_eq!(Request::parse(r#"{"op":"undrain"}"#), Ok(Request::Undrain {}));
        assert_eq!(
            Request::parse(r#"{"op":"probe","sibling":"b","service":"198.18.0.10:80","port":40000,"token":7}"#),
            Ok(Request::Probe { sibling: "b".into(), service: "198.18.0.10:80".parse().unwrap(), port: 40000, token: 7 })
        );
        for bad in [r#"{"op":"move","clients":["nobody"]}"#, r#"{"op":"move","clients":[],"extra":1}"#, r#"{"op":"explode"}"#, r#"{"op":"drain","now":true}"#, "{", "hello"] {
            assert!(Request::parse(bad).is_err(), "{bad}");
        }
        let long = "x".repeat(10_000);
        assert!(Request::parse(&long).unwrap_err().len() < 200, "a long line is cut in the answer");
        // Both ends share the types: what one writes, the other reads.
        let req = Request::GiveBack { clients: vec!["198.18.1.9".parse().unwrap()] };
        assert_eq!(Request::parse(&serde_json::to_string(&req).unwrap()), Ok(req));
    }
}
