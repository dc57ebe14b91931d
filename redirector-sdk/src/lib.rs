//! The application side of redirector's session hook: connect to the local agent's Unix
//! socket, register the service, and answer its requests by implementing [`Sessions`].
//!
//! The wire protocol (newline-delimited JSON, base64 blobs, version 1) is specified in
//! `docs/app-protocol.md`; this crate is one implementation of it. The application never
//! decides how a hand-over ends: when the connection to the agent drops, exported sessions
//! stay frozen and imported ones tentative; on reconnecting, the hook reports them (`pending`)
//! and the agent answers each with a commit or an abort.

use std::{
    collections::BTreeMap,
    io::{BufRead as _, BufReader, BufWriter, Write},
    net::{IpAddr, SocketAddr},
    os::unix::net::UnixStream,
    path::{Path, PathBuf},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    thread::JoinHandle,
    time::Duration,
};

use base64::{Engine as _, engine::general_purpose::STANDARD};
use serde_json::{Value, json};

/// Version of the hook protocol this crate speaks.
pub const VERSION: u64 = 1;

/// What an application does when the agent moves its clients' sessions. Calls come one at a
/// time, in the order the agent sent them.
///
/// - `export`: **freeze** every one of `clients`, those without a session too (no session may
///   be created for a frozen client), and return the sessions of those that have one.
///   Requests of frozen clients wait until `commit` or `abort` of the same hand-over (bounded:
///   after a while, answer them with an error such as 503; never with the frozen session).
/// - `import`: take sessions moved here from a sibling (for hand-over `handoff`), replacing
///   any this application has for those clients. They are live at once (the clients' new
///   connections may arrive before the commit) but tentative: an `abort` drops them.
/// - `commit`: exported sessions now live elsewhere: drop them, and close the connections of
///   those clients (idle ones at once, others after the answer in progress; a request waiting
///   on the frozen session gets no answer, its connection is closed) so that their next
///   request opens a new connection, which the kernel steers to the sibling. Imported sessions
///   are final.
/// - `abort`: the hand-over failed: unfreeze exported sessions (waiting requests go on), drop
///   imported ones.
///
/// `commit` and `abort` may name a hand-over this application never saw, or repeat one: ignore
/// those.
pub trait Sessions: Send + Sync + 'static {
    fn export(&self, handoff: &str, clients: &[IpAddr]) -> Vec<(IpAddr, Vec<u8>)>;
    fn import(&self, handoff: &str, sessions: Vec<(IpAddr, Vec<u8>)>) -> Result<(), String>;
    fn commit(&self, handoff: &str);
    fn abort(&self, handoff: &str);
}

/// Which side of a hand-over this application is on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    Export,
    Import,
}

/// Hand-overs this application has taken part in and not seen end: (role, clients), by name.
/// They outlive a connection: reported when registering again.
pub type Unfinished = BTreeMap<String, (Role, Vec<IpAddr>)>;

/// A connection to the agent, kept up (reconnecting) until dropped.
pub struct Hook {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Hook {
    /// Connects to the agent's hook socket at `socket` and serves `sessions` for `service`
    /// (the address and port clients use). Reconnects every half second if the agent is away.
    pub fn start(socket: impl Into<PathBuf>, service: SocketAddr, sessions: Arc<dyn Sessions>) -> Self {
        let socket = socket.into();
        let stop = Arc::new(AtomicBool::new(false));
        let s = stop.clone();
        let thread = std::thread::spawn(move || {
            let unfinished = Mutex::new(Unfinished::new());
            while !s.load(Ordering::Relaxed) {
                if let Err(e) = serve(&socket, service, sessions.as_ref(), &s, &unfinished) {
                    let n = unfinished.lock().expect("lock").len();
                    eprintln!("redirector hook: {e}; reconnecting ({n} hand-over(s) unfinished, kept as they are)");
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

/// The register line, with the hand-overs not seen end.
#[must_use]
pub fn register_line(service: SocketAddr, unfinished: &Unfinished) -> String {
    let pending: Vec<Value> = unfinished
        .iter()
        .map(|(h, (role, clients))| {
            let role = match role {
                Role::Export => "export",
                Role::Import => "import",
            };
            json!({"handoff": h, "role": role, "clients": clients.iter().map(ToString::to_string).collect::<Vec<_>>()})
        })
        .collect();
    json!({"op": "register", "service": service.to_string(), "version": VERSION, "pending": pending}).to_string()
}

fn serve(socket: &Path, service: SocketAddr, sessions: &dyn Sessions, stop: &AtomicBool, unfinished: &Mutex<Unfinished>) -> std::io::Result<()> {
    let stream = UnixStream::connect(socket)?;
    stream.set_read_timeout(Some(Duration::from_millis(200)))?;
    // An agent that stops reading is as good as gone: reconnect.
    stream.set_write_timeout(Some(Duration::from_mins(1)))?;
    let mut w = stream.try_clone()?;
    let (line, n) = {
        let u = unfinished.lock().expect("lock");
        (register_line(service, &u), u.len())
    };
    w.write_all(format!("{line}\n").as_bytes())?;
    if n > 0 {
        eprintln!("redirector hook: registering with {n} unfinished hand-over(s): the agent says how each ended");
    }
    let mut r = BufReader::with_capacity(1 << 16, stream);
    let mut line = Vec::new();
    while !stop.load(Ordering::Relaxed) {
        // read_until keeps what it read before a timeout: a long line arrives in pieces.
        match r.read_until(b'\n', &mut line) {
            Ok(0) => return Err(std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "the agent closed the hook")),
            Ok(_) if line.last() == Some(&b'\n') => {}
            Ok(_) => return Err(std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "the agent closed the hook mid-line")),
            Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => continue,
            Err(e) => return Err(e),
        }
        line.pop();
        let mut out = BufWriter::with_capacity(1 << 16, &mut w);
        handle(sessions, unfinished, &line, &mut out)?;
        out.flush()?;
        line.clear();
    }
    Ok(())
}

#[derive(serde::Deserialize)]
struct Head {
    id: Option<Value>,
    op: Option<String>,
    handoff: Option<String>,
    error: Option<Value>,
}

#[derive(serde::Deserialize)]
struct ExportRequest {
    clients: Vec<String>,
}

#[derive(serde::Deserialize)]
struct WireSession {
    client: String,
    blob: String,
}

#[derive(serde::Deserialize)]
struct ImportRequest {
    sessions: Vec<WireSession>,
}

/// A client address in the agent's form (IPv4-mapped IPv6 addresses are IPv4).
#[must_use]
pub fn parse_client(s: &str) -> Option<IpAddr> {
    s.parse::<IpAddr>().ok().map(|a| a.to_canonical())
}

fn answer(out: &mut impl Write, v: &Value) -> std::io::Result<()> {
    serde_json::to_writer(&mut *out, v)?;
    out.write_all(b"\n")
}

/// Handles one line from the agent (without its `\n`), writing the answer (if any) to `out`
/// as one line. An `error` from the agent (the registration refused or replaced) is an
/// error: the caller reconnects.
pub fn handle(sessions: &dyn Sessions, unfinished: &Mutex<Unfinished>, line: &[u8], out: &mut impl Write) -> std::io::Result<()> {
    let head: Head = match serde_json::from_slice(line) {
        Ok(h) => h,
        Err(e) => {
            eprintln!("redirector hook: ignoring a line that is not JSON from the agent: {e}");
            return Ok(());
        }
    };
    let id = head.id.unwrap_or(Value::Null);
    let handoff = head.handoff.unwrap_or_default();
    match head.op.as_deref() {
        Some("registered") => Ok(()),
        Some("error") => Err(std::io::Error::other(format!("the agent says: {}", head.error.unwrap_or(Value::Null)))),
        Some("export") => {
            let clients: Vec<IpAddr> = match serde_json::from_slice::<ExportRequest>(line) {
                Ok(r) => r.clients.iter().filter_map(|c| parse_client(c)).collect(),
                Err(e) => return answer(out, &json!({"id": id, "ok": false, "error": format!("malformed export: {e}")})),
            };
            unfinished.lock().expect("lock").insert(handoff.clone(), (Role::Export, clients.clone()));
            let exported = sessions.export(&handoff, &clients);
            // Written as it is encoded: a big answer starts flowing at once.
            write!(out, "{{\"id\":{id},\"ok\":true,\"sessions\":[")?;
            for (i, (c, b)) in exported.iter().enumerate() {
                if i > 0 {
                    out.write_all(b",")?;
                }
                write!(out, "{{\"client\":\"{c}\",\"blob\":\"{}\"}}", STANDARD.encode(b))?;
            }
            out.write_all(b"]}\n")
        }
        Some("import") => {
            let req = match serde_json::from_slice::<ImportRequest>(line) {
                Ok(r) => r,
                Err(e) => return answer(out, &json!({"id": id, "ok": false, "error": format!("malformed import: {e}")})),
            };
            let mut list = Vec::with_capacity(req.sessions.len());
            for s in req.sessions {
                match (parse_client(&s.client), STANDARD.decode(s.blob.as_bytes())) {
                    (Some(c), Ok(b)) => list.push((c, b)),
                    _ => return answer(out, &json!({"id": id, "ok": false, "error": format!("malformed session of {:?} in import", s.client)})),
                }
            }
            unfinished.lock().expect("lock").insert(handoff.clone(), (Role::Import, list.iter().map(|s| s.0).collect()));
            match sessions.import(&handoff, list) {
                Ok(()) => answer(out, &json!({"id": id, "ok": true})),
                Err(e) => answer(out, &json!({"id": id, "ok": false, "error": e})),
            }
        }
        Some("commit") => {
            unfinished.lock().expect("lock").remove(&handoff);
            sessions.commit(&handoff);
            answer(out, &json!({"id": id, "ok": true}))
        }
        Some("abort") => {
            unfinished.lock().expect("lock").remove(&handoff);
            sessions.abort(&handoff);
            answer(out, &json!({"id": id, "ok": true}))
        }
        other => answer(out, &json!({"id": id, "ok": false, "error": format!("unknown op {other:?}")})),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Default)]
    struct Log(Mutex<Vec<String>>);

    impl Sessions for Log {
        fn export(&self, handoff: &str, clients: &[IpAddr]) -> Vec<(IpAddr, Vec<u8>)> {
            self.0.lock().unwrap().push(format!("export {handoff} {clients:?}"));
            clients.iter().take(1).map(|c| (*c, b"hi".to_vec())).collect()
        }
        fn import(&self, handoff: &str, sessions: Vec<(IpAddr, Vec<u8>)>) -> Result<(), String> {
            self.0.lock().unwrap().push(format!("import {handoff} {}", sessions.len()));
            Ok(())
        }
        fn commit(&self, handoff: &str) {
            self.0.lock().unwrap().push(format!("commit {handoff}"));
        }
        fn abort(&self, handoff: &str) {
            self.0.lock().unwrap().push(format!("abort {handoff}"));
        }
    }

    fn run(s: &Log, u: &Mutex<Unfinished>, line: &str) -> Value {
        let mut out = Vec::new();
        handle(s, u, line.as_bytes(), &mut out).unwrap();
        assert_eq!(out.split(|b| *b == b'\n').count(), 2, "one line");
        serde_json::from_slice(&out).unwrap()
    }

    #[test]
    fn unfinished_hand_overs_are_kept_and_reported_until_they_end() {
        let (s, u) = (Log::default(), Mutex::new(Unfinished::new()));
        let a = run(&s, &u, r#"{"id":1,"op":"export","handoff":"a/1/b","clients":["198.18.1.5","::ffff:198.18.1.6"]}"#);
        assert_eq!(a, json!({"id":1,"ok":true,"sessions":[{"client":"198.18.1.5","blob":"aGk="}]}));
        let a = run(&s, &u, r#"{"id":2,"op":"import","handoff":"c/9/a","sessions":[{"client":"2001:db8::5","blob":"aGk="}]}"#);
        assert_eq!(a, json!({"id":2,"ok":true}));
        let reg: Value = serde_json::from_str(&register_line("198.18.0.10:80".parse().unwrap(), &u.lock().unwrap())).unwrap();
        assert_eq!(reg["version"], 1);
        assert_eq!(
            reg["pending"],
            json!([{"handoff":"a/1/b","role":"export","clients":["198.18.1.5","198.18.1.6"]},{"handoff":"c/9/a","role":"import","clients":["2001:db8::5"]}])
        );
        assert_eq!(run(&s, &u, r#"{"id":3,"op":"commit","handoff":"a/1/b"}"#), json!({"id":3,"ok":true}));
        assert_eq!(run(&s, &u, r#"{"id":4,"op":"abort","handoff":"never/seen/this"}"#), json!({"id":4,"ok":true}), "unknown hand-overs are answered ok");
        assert_eq!(u.lock().unwrap().keys().collect::<Vec<_>>(), ["c/9/a"]);
        assert_eq!(run(&s, &u, r#"{"id":5,"op":"dance"}"#)["ok"], false);
        let mut out = Vec::new();
        assert!(handle(&s, &u, br#"{"op":"error","error":"replaced"}"#, &mut out).is_err(), "an error from the agent ends the connection");
        assert!(handle(&s, &u, br#"{"op":"registered","service":"x","version":1}"#, &mut out).is_ok() && out.is_empty());
    }
}
