//! `redirector-demo-app --name A --listen 198.18.0.10:80 [--hook SOCKET --service ADDR]`
//!
//! An HTTP/1.1 server (keep-alive) with a session per client address: a counter and the last
//! few counts. Every response says who served it, the client, and the session's count, as JSON:
//! `{"server":"A","client":"198.18.1.5","count":7,"history":[3,4,5,6,7]}`.
//!
//! With `--hook`, it connects to the local redirector agent and lets its sessions move: export
//! freezes a client's session (its requests wait), commit drops it and closes the client's idle
//! connections (the next request opens a new connection, which the kernel steers to the
//! sibling that imported the session), abort unfreezes it.

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
    session: Session,
    /// Hand-over that froze this session.
    frozen: Option<String>,
    /// Requests being answered right now.
    busy: u32,
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
        let mut map = self.clients.lock().expect("lock");
        for c in clients {
            if let Some(cl) = map.get_mut(c) {
                cl.frozen = Some(handoff.to_string());
            }
        }
        // Let requests already being answered finish, so the snapshot includes them.
        loop {
            if clients.iter().all(|c| map.get(c).is_none_or(|cl| cl.busy == 0)) {
                break;
            }
            map = self.changed.wait_timeout(map, Duration::from_millis(50)).expect("lock").0;
        }
        clients.iter().filter_map(|c| map.get(c).map(|cl| (*c, cl.session.blob()))).collect()
    }

    fn import(&self, handoff: &str, sessions: Vec<(IpAddr, Vec<u8>)>) -> Result<(), String> {
        let parsed: Result<Vec<(IpAddr, Session)>, String> = sessions.into_iter().map(|(c, b)| Ok((c, Session::from_blob(&b)?))).collect();
        let mut map = self.clients.lock().expect("lock");
        for (c, s) in parsed? {
            let cl = map.entry(c).or_default();
            cl.session = s;
            cl.moved = false;
            cl.frozen = None;
            cl.imported = Some(handoff.to_string());
        }
        Ok(())
    }

    fn commit(&self, handoff: &str) {
        let mut map = self.clients.lock().expect("lock");
        for cl in map.values_mut().filter(|cl| cl.frozen.as_deref() == Some(handoff)) {
            cl.frozen = None;
            cl.moved = true;
            cl.session = Session::default();
            // Idle connections close now; a busy one closes after its answer.
            for (stream, idle) in cl.conns.values() {
                if idle.load(Ordering::SeqCst) {
                    let _ = stream.shutdown(Shutdown::Both);
                }
            }
        }
        for cl in map.values_mut().filter(|cl| cl.imported.as_deref() == Some(handoff)) {
            cl.imported = None;
        }
        self.changed.notify_all();
    }

    fn abort(&self, handoff: &str) {
        let mut map = self.clients.lock().expect("lock");
        for cl in map.values_mut() {
            if cl.frozen.as_deref() == Some(handoff) {
                cl.frozen = None;
            }
            if cl.imported.as_deref() == Some(handoff) {
                cl.imported = None;
                cl.session = Session::default();
            }
        }
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

fn serve(store: &Store, name: &str, stream: TcpStream) {
    let Ok(peer) = stream.peer_addr() else { return };
    let client = peer.ip();
    let id = NEXT_CONN.fetch_add(1, Ordering::Relaxed);
    let idle = Arc::new(AtomicBool::new(true));
    let _ = stream.set_nodelay(true);
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
        let body = {
            let mut map = store.clients.lock().expect("lock");
            // Wait while the session is frozen by a hand-over (bounded: a hand-over that hangs
            // is aborted by the agent well before this).
            let deadline = std::time::Instant::now() + Duration::from_secs(10);
            while map.get(&client).is_some_and(|c| c.frozen.is_some()) && std::time::Instant::now() < deadline {
                map = store.changed.wait_timeout(map, Duration::from_millis(50)).expect("lock").0;
            }
            let cl = map.entry(client).or_default();
            if cl.moved || cl.frozen.is_some() {
                // The session lives elsewhere now: close without an answer; the client's retry
                // opens a new connection, which is steered to the sibling.
                eprintln!("closing a connection of {client}: session {}", if cl.moved { "moved" } else { "still frozen" });
                None
            } else {
                cl.busy += 1;
                cl.session.count += 1;
                let n = cl.session.count;
                cl.session.history.push_back(n);
                if cl.session.history.len() > HISTORY {
                    cl.session.history.pop_front();
                }
                Some(json!({"server": name, "client": client.to_string(), "count": n, "history": cl.session.history}).to_string())
            }
        };
        let Some(body) = body else { break };
        let resp = format!("HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: keep-alive\r\n\r\n{body}", body.len());
        let ok = w.write_all(resp.as_bytes()).is_ok();
        let moved = {
            let mut map = store.clients.lock().expect("lock");
            let cl = map.entry(client).or_default();
            cl.busy -= 1;
            store.changed.notify_all();
            cl.moved
        };
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
        eprintln!("usage: redirector-demo-app --name NAME --listen ADDR [--hook SOCKET --service ADDR]");
        std::process::exit(2);
    };
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
        std::thread::spawn(move || serve(&store, &name, conn));
    }
}
