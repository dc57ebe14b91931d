//! The shared transcripts (`transcripts/*.jsonl`): exchanges between an agent and an
//! application, shown in docs/app-protocol.md and replayed by the tests of the agent, the
//! Rust SDK and the Node.js SDK, so that all three read and write the same lines.
//!
//! One JSON object per line: `{"comment":..}` (ignored), `{"state":{CLIENT:TEXT}}` (the
//! sessions the [`Fixture`] application holds: set by the first, checked by the later ones),
//! `{"agent":MSG,"raw":TEXT}` (a line the agent sends, and the raw bytes after it),
//! `{"app":MSG,"raw":TEXT}` (the line the application must send next) and
//! `{"reconnect":true}` (the agent closes the connection; the application registers again).

use std::{
    collections::BTreeMap,
    net::IpAddr,
    path::{Path, PathBuf},
};

use serde_json::Value;

/// One step of a transcript.
#[derive(Clone, Debug, PartialEq)]
pub enum Step {
    State(BTreeMap<String, String>),
    Agent { msg: Value, raw: Vec<u8> },
    App { msg: Value, raw: Vec<u8> },
    Reconnect,
}

/// A transcript: its file's name and its steps.
#[derive(Clone, Debug)]
pub struct Transcript {
    pub name: String,
    pub steps: Vec<Step>,
}

/// The folder of the shared transcripts.
#[must_use]
pub fn dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("transcripts")
}

/// Every shared transcript, by name.
#[must_use]
pub fn all() -> Vec<Transcript> {
    let mut files: Vec<PathBuf> =
        std::fs::read_dir(dir()).expect("the transcripts folder").map(|e| e.expect("a transcript").path()).filter(|p| p.extension().is_some_and(|e| e == "jsonl")).collect();
    files.sort();
    files.iter().map(|p| read(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))).collect()
}

/// Reads one transcript file.
pub fn read(path: &Path) -> Result<Transcript, String> {
    let text = std::fs::read_to_string(path).map_err(|e| e.to_string())?;
    let mut steps = Vec::new();
    for (n, line) in text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty()) {
        let v: Value = serde_json::from_str(line).map_err(|e| format!("line {}: {e}", n + 1))?;
        let raw = v.get("raw").and_then(Value::as_str).unwrap_or_default().as_bytes().to_vec();
        let step = if let Some(m) = v.get("agent") {
            Step::Agent { msg: m.clone(), raw }
        } else if let Some(m) = v.get("app") {
            Step::App { msg: m.clone(), raw }
        } else if let Some(s) = v.get("state") {
            Step::State(serde_json::from_value(s.clone()).map_err(|e| format!("line {}: {e}", n + 1))?)
        } else if v.get("reconnect").is_some() {
            Step::Reconnect
        } else if v.get("comment").is_some() {
            continue;
        } else {
            return Err(format!("line {}: not a transcript step: {line}", n + 1));
        };
        steps.push(step);
    }
    Ok(Transcript { name: path.file_stem().unwrap_or_default().to_string_lossy().into_owned(), steps })
}

/// Whether a line an implementation wrote is the transcript's: equal JSON values, except
/// that an `error` field's text is not compared (only that there is one).
pub fn same_line(expected: &Value, got: &Value) -> Result<(), String> {
    let blank = |v: &Value| {
        let mut v = v.clone();
        if let Some(e) = v.get_mut("error") {
            *e = Value::String(String::new());
        }
        v
    };
    if blank(expected) == blank(got) { Ok(()) } else { Err(format!("expected {expected}\n     got {got}")) }
}

/// The fixture application of the transcripts: a map from client to session, with the
/// semantics docs/app-protocol.md asks of every application.
#[derive(Clone, Debug, Default)]
pub struct Fixture {
    /// Sessions, with the hand-over that imported them while it is not committed.
    sessions: BTreeMap<IpAddr, (Vec<u8>, Option<String>)>,
    /// Clients frozen by each export not ended yet.
    exported: BTreeMap<String, Vec<IpAddr>>,
}

impl Fixture {
    /// An application holding `state` (client -> text).
    #[must_use]
    pub fn new(state: &BTreeMap<String, String>) -> Self {
        let sessions = state.iter().map(|(c, t)| (c.parse().expect("a transcript's client"), (t.clone().into_bytes(), None))).collect();
        Self { sessions, exported: BTreeMap::new() }
    }

    /// Freezes `clients` and returns the sessions of those that have one, in their order.
    pub fn export(&mut self, handoff: &str, clients: &[IpAddr]) -> Vec<(IpAddr, Vec<u8>)> {
        self.exported.insert(handoff.to_string(), clients.to_vec());
        clients.iter().filter_map(|c| self.sessions.get(c).map(|s| (*c, s.0.clone()))).collect()
    }

    /// Takes sessions, tentatively, replacing those of the same clients.
    pub fn import(&mut self, handoff: &str, sessions: Vec<(IpAddr, Vec<u8>)>) {
        for (c, b) in sessions {
            self.sessions.insert(c, (b, Some(handoff.to_string())));
        }
    }

    /// Exported sessions leave; imported ones are final.
    pub fn commit(&mut self, handoff: &str) {
        for c in self.exported.remove(handoff).unwrap_or_default() {
            self.sessions.remove(&c);
        }
        for s in self.sessions.values_mut() {
            if s.1.as_deref() == Some(handoff) {
                s.1 = None;
            }
        }
    }

    /// Exported sessions thaw; imported ones still marked with the hand-over are dropped.
    pub fn abort(&mut self, handoff: &str) {
        self.exported.remove(handoff);
        self.sessions.retain(|_, s| s.1.as_deref() != Some(handoff));
    }

    /// The sessions held, as a transcript's `state` shows them.
    #[must_use]
    pub fn state(&self) -> BTreeMap<String, String> {
        self.sessions.iter().map(|(c, s)| (c.to_string(), String::from_utf8_lossy(&s.0).into_owned())).collect()
    }
}
