//! The application side of redirector's session hook: connect to the local agent's Unix
//! socket, register the service, and answer its requests by implementing [`Sessions`].
//!
//! The wire protocol (newline-delimited JSON, base64 blobs) is specified in
//! `docs/app-protocol.md`; this crate is one implementation of it.

use std::{
    io::{BufRead as _, BufReader, Write as _},
    net::{IpAddr, SocketAddr},
    os::unix::net::UnixStream,
    path::{Path, PathBuf},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread::JoinHandle,
    time::Duration,
};

use base64::{Engine as _, engine::general_purpose::STANDARD};
use serde_json::{Value, json};

/// What an application does when the agent moves its clients' sessions.
///
/// - `export`: return the sessions of `clients` (those that have one) and **freeze** them:
///   requests of those clients wait until `commit` or `abort` of the same hand-over.
/// - `import`: take sessions moved here from a sibling (for hand-over `handoff`).
/// - `commit`: the exported sessions now live elsewhere: drop them, and close the idle
///   connections of those clients (answer a request in flight first) so that their next
///   request opens a new connection, which the kernel steers to the sibling.
/// - `abort`: the hand-over failed: unfreeze exported sessions, or drop imported ones.
pub trait Sessions: Send + Sync + 'static {
    fn export(&self, handoff: &str, clients: &[IpAddr]) -> Vec<(IpAddr, Vec<u8>)>;
    fn import(&self, handoff: &str, sessions: Vec<(IpAddr, Vec<u8>)>) -> Result<(), String>;
    fn commit(&self, handoff: &str);
    fn abort(&self, handoff: &str);
}

/// A connection to the agent, kept up (reconnecting) until dropped.
pub struct Hook {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Hook {
    /// Connects to the agent's hook socket at `socket` and serves `sessions` for `service`
    /// (the address and port clients use). Reconnects every second if the agent is away.
    pub fn start(socket: impl Into<PathBuf>, service: SocketAddr, sessions: Arc<dyn Sessions>) -> Self {
        let socket = socket.into();
        let stop = Arc::new(AtomicBool::new(false));
        let s = stop.clone();
        let thread = std::thread::spawn(move || {
            while !s.load(Ordering::Relaxed) {
                if let Err(e) = serve(&socket, service, sessions.as_ref(), &s) {
                    eprintln!("redirector hook: {e}; reconnecting");
                }
                std::thread::sleep(Duration::from_millis(500));
            }
        });
        Self { stop, thread: Some(thread) }
    }
}

impl Drop for Hook {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn serve(socket: &Path, service: SocketAddr, sessions: &dyn Sessions, stop: &AtomicBool) -> std::io::Result<()> {
    let stream = UnixStream::connect(socket)?;
    let mut open = std::collections::HashSet::new();
    let r = serve_on(stream, service, sessions, stop, &mut open);
    // The agent went away mid-hand-over: nothing it started may stay half done. Exported
    // sessions are unfrozen here, imported ones dropped.
    for h in open {
        sessions.abort(&h);
    }
    r
}

fn serve_on(
    stream: UnixStream,
    service: SocketAddr,
    sessions: &dyn Sessions,
    stop: &AtomicBool,
    open: &mut std::collections::HashSet<String>,
) -> std::io::Result<()> {
    stream.set_read_timeout(Some(Duration::from_millis(200)))?;
    let mut w = stream.try_clone()?;
    writeln!(w, "{}", json!({"op": "register", "service": service.to_string()}))?;
    let mut r = BufReader::new(stream);
    let mut line = String::new();
    while !stop.load(Ordering::Relaxed) {
        match r.read_line(&mut line) {
            Ok(0) => return Err(std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "agent closed the hook")),
            Ok(_) => {}
            Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => continue,
            Err(e) => return Err(e),
        }
        if let Ok(OpHandoff { op: Some(op), handoff: Some(h) }) = serde_json::from_str::<OpHandoff>(line.trim()) {
            let h = h.as_str();
            match op.as_str() {
                "export" | "import" => {
                    open.insert(h.to_string());
                }
                "commit" | "abort" => {
                    open.remove(h);
                }
                _ => {}
            }
        }
        let reply = answer_line(sessions, line.trim());
        line.clear();
        if let Some(mut text) = reply {
            // One write for the whole line (answers can be megabytes).
            text.push('\n');
            w.write_all(text.as_bytes())?;
        }
    }
    Ok(())
}

#[derive(serde::Deserialize)]
struct OpHandoff {
    op: Option<String>,
    handoff: Option<String>,
}

#[derive(serde::Serialize, serde::Deserialize)]
struct WireSession {
    client: String,
    blob: String,
}

#[derive(serde::Serialize)]
struct ExportAnswer<'a> {
    id: &'a Value,
    ok: bool,
    sessions: Vec<WireSession>,
}

#[derive(serde::Deserialize)]
struct ImportRequest {
    sessions: Vec<WireSession>,
}

/// Answers one request line of the agent (None for messages that need no answer), as one
/// line of text.
#[must_use]
pub fn answer_line(sessions: &dyn Sessions, line: &str) -> Option<String> {
    #[derive(serde::Deserialize)]
    struct Head {
        id: Option<Value>,
        op: Option<String>,
        handoff: Option<String>,
    }
    let head: Head = serde_json::from_str(line).ok()?;
    let id = head.id.unwrap_or(Value::Null);
    let handoff = head.handoff.unwrap_or_default();
    // The big messages are parsed and written through typed structures.
    match head.op.as_deref() {
        Some("export") => {
            let req: Value = serde_json::from_str(line).ok()?;
            let clients: Vec<IpAddr> = req
                .get("clients")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
                .filter_map(|c| c.as_str()?.parse().ok())
                .collect();
            let out = sessions
                .export(&handoff, &clients)
                .into_iter()
                .map(|(c, b)| WireSession { client: c.to_string(), blob: STANDARD.encode(b) })
                .collect();
            serde_json::to_string(&ExportAnswer { id: &id, ok: true, sessions: out }).ok()
        }
        Some("import") => {
            let reply = match serde_json::from_str::<ImportRequest>(line) {
                Err(e) => json!({"id": id, "ok": false, "error": format!("malformed import: {e}")}),
                Ok(req) => {
                    let mut list = Vec::with_capacity(req.sessions.len());
                    for s in req.sessions {
                        match (s.client.parse::<IpAddr>(), STANDARD.decode(s.blob.as_bytes())) {
                            (Ok(c), Ok(b)) => list.push((c, b)),
                            _ => return Some(json!({"id": id, "ok": false, "error": "malformed session in import"}).to_string()),
                        }
                    }
                    match sessions.import(&handoff, list) {
                        Ok(()) => json!({"id": id, "ok": true}),
                        Err(e) => json!({"id": id, "ok": false, "error": e}),
                    }
                }
            };
            Some(reply.to_string())
        }
        _ => answer(sessions, line).map(|v| v.to_string()),
    }
}

/// Answers one request line of the agent (None for messages that need no answer).
#[must_use]
pub fn answer(sessions: &dyn Sessions, line: &str) -> Option<Value> {
    let req: Value = serde_json::from_str(line).ok()?;
    let id = req.get("id").cloned().unwrap_or(Value::Null);
    let handoff = req.get("handoff").and_then(Value::as_str).unwrap_or_default();
    let ok = |extra: Value| {
        let mut v = json!({"id": id, "ok": true});
        if let (Some(m), Value::Object(e)) = (v.as_object_mut(), extra) {
            m.extend(e);
        }
        v
    };
    let err = |e: String| json!({"id": id, "ok": false, "error": e});
    match req.get("op").and_then(Value::as_str) {
        Some("registered") => None,
        Some("export") => {
            let clients: Vec<IpAddr> = req
                .get("clients")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
                .filter_map(|c| c.as_str()?.parse().ok())
                .collect();
            let out: Vec<Value> = sessions
                .export(handoff, &clients)
                .into_iter()
                .map(|(c, b)| json!({"client": c.to_string(), "blob": STANDARD.encode(b)}))
                .collect();
            Some(ok(json!({"sessions": out})))
        }
        Some("import") => {
            let mut list = Vec::new();
            for s in req.get("sessions").and_then(Value::as_array).into_iter().flatten() {
                let client = s.get("client").and_then(Value::as_str).and_then(|c| c.parse().ok());
                let blob = s.get("blob").and_then(Value::as_str).and_then(|b| STANDARD.decode(b).ok());
                match (client, blob) {
                    (Some(c), Some(b)) => list.push((c, b)),
                    _ => return Some(err("malformed session in import".into())),
                }
            }
            Some(match sessions.import(handoff, list) {
                Ok(()) => ok(json!({})),
                Err(e) => err(e),
            })
        }
        Some("commit") => {
            sessions.commit(handoff);
            Some(ok(json!({})))
        }
        Some("abort") => {
            sessions.abort(handoff);
            Some(ok(json!({})))
        }
        other => Some(err(format!("unknown op {other:?}"))),
    }
}
