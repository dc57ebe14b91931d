//! Every message of the hook protocol (docs/app-protocol.md), for both ends. What the agent
//! sends is tagged by `op`; what the application sends is its register line
//! ([`crate::register::Register`]) and then answers, which carry the request's `id`.

use serde::{Deserialize, Serialize};

use crate::session::WireList;

/// Which side of a hand-over an application was on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// It exported (froze) the sessions: the side the clients leave.
    Export,
    /// It imported them: the side the clients come to.
    Import,
}

/// A session as it travels in a line: its blob in base64 (version 1) or its length, the
/// bytes following the line (version 2).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct WireSession {
    /// Empty when a session lacks one (refused by the reader).
    #[serde(default)]
    pub client: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub blob: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub len: Option<u64>,
}

/// An open connection as it travels in a line (version 3): the client it belongs to and the
/// length of the application's blob for it (its own state of the connection, e.g. what it
/// read of the next request), which is among the raw bytes after the line, after the
/// sessions' blobs. Its descriptor passes with the line (see [`crate::fds`]), in list order.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct WireConn {
    #[serde(default)]
    pub client: String,
    #[serde(default)]
    pub len: u64,
}

/// A line the agent sends an application. Applications ignore fields they do not know.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "lowercase")]
pub enum AgentMsg {
    /// The registration is accepted; `version` is what the connection speaks.
    Registered { service: String, version: u64 },
    /// The registration is refused or replaced: the connection ends.
    Error { error: String },
    /// Freeze these clients and answer with their sessions; version 3 with `connections`:
    /// and hand over their open connections that are idle at a request boundary.
    Export {
        id: u64,
        handoff: String,
        clients: Vec<String>,
        #[serde(default, skip_serializing_if = "is_false")]
        connections: bool,
    },
    /// Take these sessions, tentatively. Version 2: `bytes` raw bytes follow the line.
    Import {
        id: u64,
        handoff: String,
        #[serde(default, skip_serializing_if = "is_zero")]
        bytes: u64,
        sessions: Vec<WireSession>,
    },
    /// The hand-over took effect. Version 3: with the connections that came here (the
    /// importing side) or that did not move after all (the exporting side): `fds` descriptors
    /// pass with the line, their blobs are the `bytes` after it.
    Commit {
        id: u64,
        handoff: String,
        #[serde(default, skip_serializing_if = "is_zero")]
        bytes: u64,
        #[serde(default, skip_serializing_if = "is_zero")]
        fds: u64,
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        connections: Vec<WireConn>,
    },
    /// The hand-over failed: nobody's connections go elsewhere. Version 3: with the
    /// connections the application handed over for it, given back, as in `Commit`.
    Abort {
        id: u64,
        handoff: String,
        #[serde(default, skip_serializing_if = "is_zero")]
        bytes: u64,
        #[serde(default, skip_serializing_if = "is_zero")]
        fds: u64,
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        connections: Vec<WireConn>,
    },
}

impl AgentMsg {
    /// The raw bytes that follow this line (version 2 imports).
    #[must_use]
    pub fn bytes(&self) -> u64 {
        match self {
            Self::Import { bytes, .. } | Self::Commit { bytes, .. } | Self::Abort { bytes, .. } => *bytes,
            _ => 0,
        }
    }

    /// A commit (`true`) or an abort of `handoff`, with `connections` (version 3; their blobs
    /// are the raw bytes after the line, their descriptors pass with it).
    #[must_use]
    pub fn outcome(id: u64, handoff: String, commit: bool, connections: Vec<WireConn>) -> Self {
        let bytes = connections.iter().fold(0u64, |n, c| n.saturating_add(c.len));
        let fds = u64::try_from(connections.len()).unwrap_or(u64::MAX);
        if commit { Self::Commit { id, handoff, bytes, fds, connections } } else { Self::Abort { id, handoff, bytes, fds, connections } }
    }
}

/// An application's answer to a request. Version 2 export answers: `bytes` raw bytes follow.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Answer {
    pub id: u64,
    pub ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(default, skip_serializing_if = "is_zero")]
    pub bytes: u64,
    /// Required in export answers (possibly empty), absent in the others.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sessions: Option<Vec<WireSession>>,
    /// Version 3 export answers: the connections handed over (their blobs follow the
    /// sessions' among the raw bytes; their descriptors, `fds` of them, pass with the line).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub connections: Option<Vec<WireConn>>,
    #[serde(default, skip_serializing_if = "is_zero")]
    pub fds: u64,
}

impl Answer {
    /// `ok:true`, nothing else (import, commit, abort).
    #[must_use]
    pub fn ok(id: u64) -> Self {
        Self { id, ok: true, error: None, bytes: 0, sessions: None, connections: None, fds: 0 }
    }

    /// `ok:false` with why.
    #[must_use]
    pub fn refused(id: u64, why: impl Into<String>) -> Self {
        Self { id, ok: false, error: Some(why.into()), bytes: 0, sessions: None, connections: None, fds: 0 }
    }

    /// Reads an answer the way the agent does: `ok` must be a boolean, and `ok:false` is the
    /// application's refusal (with its `error`). Returns the answer when `ok` is true.
    pub fn parse(line: &[u8]) -> Result<Self, String> {
        // Lenient first, so that a wrong `ok` is named as such rather than as a type error.
        #[derive(Deserialize)]
        struct Loose {
            ok: Option<serde_json::Value>,
            error: Option<serde_json::Value>,
        }
        let loose: Loose = serde_json::from_slice(line).map_err(|e| format!("with malformed JSON: {e}"))?;
        match loose.ok {
            Some(serde_json::Value::Bool(true)) => serde_json::from_slice(line).map_err(|e| format!("malformed: {e}")),
            Some(serde_json::Value::Bool(false)) => Err(format!("refused: {}", loose.error.as_ref().and_then(serde_json::Value::as_str).unwrap_or("no reason given"))),
            _ => Err(format!("without a boolean \"ok\": {}", crate::frame::preview(line))),
        }
    }
}

/// An export's answer as the application writes it: an [`Answer`] with `ok:true`, whose
/// sessions are serialized as they are written ([`WireList`]). The same JSON as the `Answer`
/// built from [`crate::session::to_wire`]; its raw bytes (version 2) follow it.
#[derive(Serialize)]
pub struct ExportAnswer<'a> {
    pub id: u64,
    pub ok: bool,
    #[serde(skip_serializing_if = "is_zero")]
    pub bytes: u64,
    pub sessions: WireList<'a>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub connections: Option<Vec<WireConn>>,
    #[serde(skip_serializing_if = "is_zero")]
    pub fds: u64,
}

impl<'a> ExportAnswer<'a> {
    #[must_use]
    pub fn new(id: u64, sessions: WireList<'a>) -> Self {
        Self { id, ok: true, bytes: sessions.bytes(), sessions, connections: None, fds: 0 }
    }

    /// With `connections` (version 3): each client and its blob's length; their blobs follow
    /// the sessions', their descriptors pass with the line.
    #[must_use]
    pub fn with_connections(mut self, connections: Vec<WireConn>) -> Self {
        if connections.is_empty() {
            return self;
        }
        self.bytes = connections.iter().fold(self.bytes, |n, c| n.saturating_add(c.len));
        self.fds = u64::try_from(connections.len()).unwrap_or(u64::MAX);
        self.connections = Some(connections);
        self
    }
}

#[allow(clippy::trivially_copy_pass_by_ref, reason = "serde's skip_serializing_if passes a reference")]
fn is_zero(n: &u64) -> bool {
    *n == 0
}

#[allow(clippy::trivially_copy_pass_by_ref, reason = "serde's skip_serializing_if passes a reference")]
fn is_false(b: &bool) -> bool {
    !*b
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn an_export_answer_written_as_it_goes_is_the_answer() {
        let owned = vec![("198.18.1.5".parse().unwrap(), b"abcd".to_vec()), ("2001:db8::5".parse().unwrap(), b"hello".to_vec())];
        for v in [crate::Version::V1, crate::Version::V2] {
            let (list, bytes) = crate::session::to_wire(owned.iter().map(|(c, b)| (*c, b.as_slice())), v);
            let built = Answer { id: 9, ok: true, error: None, bytes, sessions: Some(list), connections: None, fds: 0 };
            let streamed = ExportAnswer::new(9, WireList { sessions: &owned, version: v });
            assert_eq!(serde_json::to_string(&streamed).unwrap(), serde_json::to_string(&built).unwrap(), "{v:?}");
        }
    }

    #[test]
    fn requests_are_tagged_by_op_and_bytes_appear_only_when_raw_data_follows() {
        let m = AgentMsg::Import { id: 2, handoff: "a/1/b".into(), bytes: 0, sessions: vec![] };
        assert_eq!(serde_json::to_value(&m).unwrap(), json!({"op":"import","id":2,"handoff":"a/1/b","sessions":[]}));
        let m: AgentMsg = serde_json::from_value(json!({"op":"commit","id":3,"handoff":"x","later":true})).unwrap();
        assert_eq!(m, AgentMsg::outcome(3, "x".into(), true, vec![]), "unknown fields are ignored");
        let with = AgentMsg::outcome(4, "x".into(), false, vec![WireConn { client: "198.18.1.5".into(), len: 3 }]);
        assert_eq!(serde_json::to_value(&with).unwrap(), json!({"op":"abort","id":4,"handoff":"x","bytes":3,"fds":1,"connections":[{"client":"198.18.1.5","len":3}]}));
        assert_eq!(with.bytes(), 3);
        let e = AgentMsg::Export { id: 5, handoff: "x".into(), clients: vec![], connections: false };
        assert_eq!(serde_json::to_value(&e).unwrap(), json!({"op":"export","id":5,"handoff":"x","clients":[]}), "version 2 lines stay as they were");
        assert!(serde_json::from_value::<AgentMsg>(json!({"op":"dance","id":1})).is_err());
    }

    #[test]
    fn answers_say_why_they_are_not_ok() {
        assert_eq!(Answer::parse(br#"{"id":3,"ok":true}"#), Ok(Answer::ok(3)));
        assert!(Answer::parse(br#"{"id":3}"#).unwrap_err().contains("without a boolean \"ok\""));
        assert!(Answer::parse(br#"{"id":3,"ok":"yes"}"#).unwrap_err().contains("without a boolean \"ok\""));
        assert_eq!(Answer::parse(br#"{"id":3,"ok":false,"error":"busy"}"#), Err("refused: busy".into()));
        assert!(Answer::parse(b"not json").unwrap_err().contains("malformed"));
        assert_eq!(serde_json::to_value(Answer::refused(4, "no")).unwrap(), json!({"id":4,"ok":false,"error":"no"}));
    }
}
