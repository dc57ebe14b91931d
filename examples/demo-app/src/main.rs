//! `redirector-demo-app --name A --listen 198.18.0.10:80 [--hook SOCKET --service ADDR]
//! [--freeze-wait-ms MS]`
//!
//! An HTTP/1.1 server (keep-alive) with a session per client address: a counter and the last
//! few counts. Every response says who served it, the client, and the session's count, as JSON:
//! `{"server":"A","client":"198.18.1.5","count":7,"history":[3,4,5,6,7]}`.
//!
//! With `--hook`, it connects to the local redirector agent and lets its sessions move: export
//! freezes the clients (their requests wait, and no session is created for them meanwhile),
//! commit drops their sessions and closes their connections (idle ones at once, busy ones after
//! their answer, waiting requests unanswered: the next request opens a new connection, which
//! the kernel steers to the sibling that imported the session), abort unfreezes them. A
//! request that waits longer than `--freeze-wait-ms` (default 10000) is answered 503 (the
//! session is neither forked nor lost: the client may retry). Hook events are logged to
//! stderr as `hook: ...` lines.

use std::{
    collections::{HashMap, VecDeque},
    io::{BufRead as _, BufReader, Write as _},
    net::{IpAddr, Shutdown, SocketAddr, TcpListener, TcpStream},
    sync::{
        Arc, Condvar, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::Duration,
};

use redirector_sdk::{Hook, Sessions};
use serde_json::json;

const HISTORY: usize = 5;

#[derive(Clone, Default)]
struct Session {
    count: u64,
    history: VecDeque<u64>,
}

impl Session {
    fn blob(&self) -> Vec<u8> {
        json!({"count": self.count, "history": self.history}).to_string().into_bytes()
    }

    fn from_blob(b: &[u8]) -> Result<Self, String> {
        let v: serde_json::Value = serde_json::from_slice(b).map_err(|e| format!("bad session blob: {e}"))?;
        let count = v["count"].as_u64().ok_or("session blob without count")?;
        let history = v["history"].as_array().ok_or("session blob without history")?.iter().filter_map(serde_json::Value::as_u64).collect();
        Ok(Self { count, history })
    }
}

#[derive(Default)]
struct Client {
    /// None until the client's first answered request (or an import).
    session: Option<Session>,
    /// Hand-over that froze this client (with or without a session).
    frozen: Option<String>,
    /// The session moved to a sibling: close this client's connections.
    moved: bool,
    /// Imported by hand-over (dropped if it aborts).
    imported: Option<String>,
    /// Open connections: id -> (stream, idle).
    conns: HashMap<u64, (TcpStream, Arc<AtomicBool>)>,
}

#[derive(Default)]
struct Store {
    clients: Mutex<HashMap<IpAddr, Client>>,
    changed: Condvar,
}

impl Sessions for Store {
    fn export(&self, handoff: &str, clients: &[IpAddr]) -> Vec<(IpAddr, Vec<u8>)> {
        // Every session change happens under this lock, together with its answer's count: the
        // snapshot includes every request answered or being answered, and no request changes
        // a frozen session. Nothing to wait for.
        let mut map = self.clients.lock().expect("lock");
        let mut out = Vec::new();
        for c in clients {
            let cl = map.entry(*c).or_default();
            cl.frozen = Some(handoff.to_string());
            if let Some(s) = &cl.session {
                out.push((*c, s.blob()));
            }
        }
        eprintln!("hook: export {handoff}: froze {} clients, {} sessions", clients.len(), out.len());
        out
    }

    fn import(&self, handoff: &str, sessions: Vec<(IpAddr, Vec<u8>)>) -> Result<(), String> {
        let parsed: Result<Vec<(IpAddr, Session)>, String> = sessions.into_iter().map(|(c, b)| Ok((c, Session::from_blob(&b)?))).collect();
        let parsed = parsed?;
        let mut map = self.clients.lock().expect("lock");
        for (c, s) in &parsed {
            let cl = map.entry(*c).or_default();
            cl.session = Some(s.clone());
            cl.moved = false;
            cl.frozen = None;
            cl.imported = Some(handoff.to_string());
        }
        eprintln!("hook: import {handoff}: {} sessions (tentative until the commit)", parsed.len());
        self.changed.notify_all();
        Ok(())
    }

    fn commit(&self, handoff: &str) {
        let mut map = self.clients.lock().expect("lock");
        let (mut out, mut confirmed) = (0, 0);
        for cl in map.values_mut() {
            if cl.frozen.as_deref() == Some(handoff) {
                out += 1;
                cl.frozen = None;
                cl.moved = true;
                cl.session = None;
                // Idle connections close now; a busy one closes after its answer; a waiting
                // request wakes up and closes its connection unanswered.
                for (stream, idle) in cl.conns.values() {
                    if idle.load(Ordering::SeqCst) {
                        let _ = stream.shutdown(Shutdown::Both);
                    }
                }
            }
            if cl.imported.as_deref() == Some(handoff) {
                confirmed += 1;
                cl.imported = None;
            }
        }
        eprintln!("hook: commit {handoff}: {out} clients moved out, {confirmed} imported sessions confirmed");
        self.changed.notify_all();
    }

    fn abort(&self, handoff: &str) {
        let mut map = self.clients.lock().expect("lock");
        let (mut unfrozen, mut dropped) = (0, 0);
        for cl in map.values_mut() {
            if cl.frozen.as_deref() == Some(handoff) {
                unfrozen += 1;
                cl.frozen = None;
            }
            if cl.imported.as_deref() == Some(handoff) {
                dropped += 1;
                cl.imported = None;
                cl.session = None;
            }
        }
        eprintln!("hook: abort {handoff}: {unfrozen} clients unfrozen, {dropped} imported sessions dropped");
        self.changed.notify_all();
    }
}

static NEXT_CONN: AtomicU64 = AtomicU64::new(0);

/// Reads one request head; false at end of stream.
fn read_request(r: &mut BufReader<TcpStream>) -> bool {
    let mut line = String::new();
    let mut first = true;
    loop {
        line.clear();
        match r.read_line(&mut line) {
            Ok(0) | Err(_) => return false,
            Ok(_) => {}
        }
        if line == "\r\n" || line == "\n" {
            return !first;
        }
        first = false;
    }
}

/// What a request gets.
enum Reply {
    Ok(String),
    /// Frozen for too long: 503, the session untouched.
    Busy(String),
    /// The session moved away: close without an answer.
    Close,
}

fn serve(store: &Store, name: &str, stream: TcpStream, freeze_wait: Duration) {
    let Ok(peer) = stream.peer_addr() else { return };
    // A dual-stack listener reports IPv4 clients as ::ffff:a.b.c.d: one client, one key.
    let client = peer.ip().to_canonical();
    let id = NEXT_CONN.fetch_add(1, Ordering::Relaxed);
    let idle = Arc::new(AtomicBool::new(true));
    let _ = stream.set_nodelay(true);
    // A client that does not read never holds a thread (or the store) for long.
    let _ = stream.set_write_timeout(Some(Duration::from_secs(10)));
    {
        let mut map = store.clients.lock().expect("lock");
        let cl = map.entry(client).or_default();
        cl.moved = false;
        if let Ok(s) = stream.try_clone() {
            cl.conns.insert(id, (s, idle.clone()));
        }
    }
    let Ok(mut w) = stream.try_clone() else { return };
    let mut r = BufReader::new(stream);
    while read_request(&mut r) {
        idle.store(false, Ordering::SeqCst);
        let reply = {
            let mut map = store.clients.lock().expect("lock");
            // Wait while the client is frozen by a hand-over (until it ends; the agent tells
            // the outcome even across its own restarts, but the wait is bounded).
            let deadline = std::time::Instant::now() + freeze_wait;
            while map.get(&client).is_some_and(|c| c.frozen.is_some()) && std::time::Instant::now() < deadline {
                map = store.changed.wait_timeout(map, Duration::from_millis(50)).expect("lock").0;
            }
            let cl = map.entry(client).or_default();
            if cl.moved {
                // The session lives elsewhere now: close without an answer; the client's retry
                // opens a new connection, which is steered to the sibling.
                eprintln!("closing a connection of {client}: its session moved");
                Reply::Close
            } else if let Some(h) = &cl.frozen {
                eprintln!("answering 503 to {client}: frozen by hand-over {h} for over {} ms", freeze_wait.as_millis());
                Reply::Busy(json!({"server": name, "client": client.to_string(), "error": format!("session frozen by hand-over {h}: retry later")}).to_string())
            } else {
                let s = cl.session.get_or_insert_default();
                s.count += 1;
                let n = s.count;
                s.history.push_back(n);
                if s.history.len() > HISTORY {
                    s.history.pop_front();
                }
                Reply::Ok(json!({"server": name, "client": client.to_string(), "count": n, "history": s.history}).to_string())
            }
        };
        let resp = match reply {
            Reply::Close => break,
            Reply::Ok(body) => format!("HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: keep-alive\r\n\r\n{body}", body.len()),
            Reply::Busy(body) => format!(
                "HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\nContent-Length: {}\r\nRetry-After: 1\r\nConnection: keep-alive\r\n\r\n{body}",
                body.len()
            ),
        };
        let ok = w.write_all(resp.as_bytes()).is_ok();
        let moved = store.clients.lock().expect("lock").get(&client).is_some_and(|c| c.moved);
        idle.store(true, Ordering::SeqCst);
        if !ok || moved {
            break;
        }
    }
    let _ = w.shutdown(Shutdown::Both);
    if let Some(cl) = store.clients.lock().expect("lock").get_mut(&client) {
        cl.conns.remove(&id);
    }
}

fn arg(args: &[String], name: &str) -> Option<String> {
    args.iter().position(|a| a == name).and_then(|i| args.get(i + 1)).cloned()
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let (Some(name), Some(listen)) = (arg(&args, "--name"), arg(&args, "--listen")) else {
        eprintln!("usage: redirector-demo-app --name NAME --listen ADDR [--hook SOCKET --service ADDR] [--freeze-wait-ms MS]");
        std::process::exit(2);
    };
    let freeze_wait = Duration::from_millis(arg(&args, "--freeze-wait-ms").and_then(|v| v.parse().ok()).unwrap_or(10_000));
    let listen: SocketAddr = listen.parse().unwrap_or_else(|e| {
        eprintln!("bad --listen: {e}");
        std::process::exit(2);
    });
    let store = Arc::new(Store::default());
    let _hook = arg(&args, "--hook").map(|sock| {
        let service: SocketAddr = arg(&args, "--service").and_then(|s| s.parse().ok()).unwrap_or(listen);
        Hook::start(sock, service, store.clone())
    });
    let listener = TcpListener::bind(listen).unwrap_or_else(|e| {
        eprintln!("cannot listen on {listen}: {e}");
        std::process::exit(1);
    });
    eprintln!("listening on {listen} as {name}");
    for conn in listener.incoming().flatten() {
        let (store, name) = (store.clone(), name.clone());
        std::thread::spawn(move || serve(&store, &name, conn, freeze_wait));
    }
}
