//! `redirector-demo-app --name A --listen 198.18.0.10:80 [--hook SOCKET --service ADDR]
//! [--freeze-wait-ms MS] [--idle-close-ms MS] [--hook-version 1|2]`
//!
//! An HTTP/1.1 server with a session per client address: a counter and the last few counts.
//! Every response says who served it, the client, and the session's count, as JSON:
//! `{"server":"A","client":"198.18.1.5","count":7,"history":[3,4,5,6,7]}`.
//!
//! Connections persist as HTTP/1.1 says (RFC 9112 section 9.3): an HTTP/1.1 connection stays
//! open for the next request unless the request says `Connection: close`; an HTTP/1.0 one only
//! if the request says `Connection: keep-alive`. Every response says which (`Connection:
//! keep-alive` or `Connection: close`); after a `close` answer the server closes the connection
//! first. A request body (`Content-Length`) is read and ignored; a request with a
//! `Transfer-Encoding` is answered, then its connection closed. With `--idle-close-ms`, the
//! server also closes first a connection on which no request arrived for that long since it
//! opened or since its last answer (default: never; the client closes).
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
    io::{BufRead as _, BufReader, ErrorKind, Read as _, Write as _},
    net::{IpAddr, Shutdown, SocketAddr, TcpListener, TcpStream},
    sync::{
        Arc, Condvar, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use redirector_sdk::{Hook, Sessions, Version};
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

/// What the server needs from a request head.
struct Request {
    /// The connection stays open after the answer.
    keep_alive: bool,
}

/// How waiting for a connection's next request ended.
enum Next {
    /// A request (at least its first byte) is there.
    Request,
    /// No byte within `--idle-close-ms`.
    Idle,
    /// The client closed (or reset) the connection.
    Closed,
}

/// Waits for the first byte of the next request, at most `idle` (none: as long as it takes).
fn next_request(r: &mut BufReader<TcpStream>, idle: Option<Duration>) -> Next {
    if !r.buffer().is_empty() {
        return Next::Request;
    }
    let Some(idle) = idle else { return Next::Request };
    if r.get_ref().set_read_timeout(Some(idle)).is_err() {
        return Next::Closed;
    }
    let next = match r.fill_buf() {
        Ok([]) => Next::Closed,
        Ok(_) => Next::Request,
        Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => Next::Idle,
        Err(_) => Next::Closed,
    };
    // The rest of the request (and a frozen session's wait) is not bound by the idle time.
    if r.get_ref().set_read_timeout(None).is_err() {
        return Next::Closed;
    }
    next
}

/// Reads one request (its head, and a `Content-Length` body, which is ignored); None at end
/// of stream or on an error.
fn read_request(r: &mut BufReader<TcpStream>) -> Option<Request> {
    let mut line = String::new();
    // The request line (empty lines before it are ignored, RFC 9112 section 2.2).
    for _ in 0..8 {
        line.clear();
        if r.read_line(&mut line).ok()? == 0 {
            return None;
        }
        if !line.trim_end().is_empty() {
            break;
        }
    }
    if line.trim_end().is_empty() {
        return None;
    }
    let version = line.trim_end().rsplit(' ').next().unwrap_or_default().to_ascii_uppercase();
    let (mut close, mut keep, mut length, mut chunked) = (false, false, 0u64, false);
    loop {
        line.clear();
        if r.read_line(&mut line).ok()? == 0 {
            return None;
        }
        if line.trim_end().is_empty() {
            break;
        }
        let Some((name, value)) = line.split_once(':') else { continue };
        let (name, value) = (name.trim().to_ascii_lowercase(), value.trim());
        match name.as_str() {
            "connection" => {
                for token in value.split(',').map(str::trim) {
                    close |= token.eq_ignore_ascii_case("close");
                    keep |= token.eq_ignore_ascii_case("keep-alive");
                }
            }
            "content-length" => length = value.parse().ok()?,
            "transfer-encoding" => chunked = true,
            _ => {}
        }
    }
    if length > 0 && std::io::copy(&mut r.by_ref().take(length), &mut std::io::sink()).ok()? < length {
        return None;
    }
    // HTTP/1.1 (and later 1.x) persists unless told to close; HTTP/1.0 only when asked; a
    // body whose end this server does not look for (a transfer coding) ends the connection.
    let persistent = match version.strip_prefix("HTTP/1.") {
        Some("0") => keep,
        Some(minor) => minor.parse::<u32>().is_ok(),
        None => false,
    };
    Some(Request { keep_alive: persistent && !close && !chunked })
}

/// Closes a connection the server is done with, first: sends its FIN, then reads (and
/// ignores) what the client still sends until it closes too, for at most a second, so that
/// the client reads the whole answer before any reset.
fn close_first(r: &mut BufReader<TcpStream>) {
    let s = r.get_ref();
    if s.shutdown(Shutdown::Write).is_err() {
        return;
    }
    let deadline = Instant::now() + Duration::from_secs(1);
    let mut buf = [0u8; 4096];
    let mut left = 64 * 1024usize;
    loop {
        let now = Instant::now();
        if now >= deadline || left == 0 || r.get_ref().set_read_timeout(Some(deadline - now)).is_err() {
            return;
        }
        match r.get_mut().read(&mut buf) {
            Ok(0) | Err(_) => return,
            Ok(n) => left = left.saturating_sub(n),
        }
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

/// The server's settings for every connection.
#[derive(Clone, Copy)]
struct Settings {
    /// How long a request of a frozen client waits before its 503.
    freeze_wait: Duration,
    /// Close a connection with no request for this long (none: never).
    idle_close: Option<Duration>,
}

/// How a connection ends.
enum End {
    /// The client closed it, a write failed, or the client's session moved: close at once.
    Now,
    /// The server closes first: the client asked (`Connection: close`, HTTP/1.0) or the
    /// connection was idle too long.
    First,
}

fn serve(store: &Store, name: &str, stream: TcpStream, settings: Settings) {
    let Settings { freeze_wait, idle_close } = settings;
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
    let end = loop {
        match next_request(&mut r, idle_close) {
            Next::Request => {}
            Next::Idle => break End::First,
            Next::Closed => break End::Now,
        }
        let Some(request) = read_request(&mut r) else { break End::Now };
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
        let connection = if request.keep_alive { "keep-alive" } else { "close" };
        let resp = match reply {
            Reply::Close => break End::Now,
            Reply::Ok(body) => format!("HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: {connection}\r\n\r\n{body}", body.len()),
            Reply::Busy(body) => format!(
                "HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\nContent-Length: {}\r\nRetry-After: 1\r\nConnection: {connection}\r\n\r\n{body}",
                body.len()
            ),
        };
        let ok = w.write_all(resp.as_bytes()).is_ok();
        let moved = store.clients.lock().expect("lock").get(&client).is_some_and(|c| c.moved);
        idle.store(true, Ordering::SeqCst);
        if !ok || moved {
            break End::Now;
        }
        if !request.keep_alive {
            break End::First;
        }
    };
    match end {
        End::Now => {
            let _ = w.shutdown(Shutdown::Both);
        }
        End::First => close_first(&mut r),
    }
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
        eprintln!("usage: redirector-demo-app --name NAME --listen ADDR [--hook SOCKET --service ADDR] [--freeze-wait-ms MS] [--idle-close-ms MS] [--hook-version 1|2]");
        std::process::exit(2);
    };
    let millis = |name: &str| {
        arg(&args, name).map(|v| {
            Duration::from_millis(v.parse::<u64>().unwrap_or_else(|e| {
                eprintln!("bad {name} {v:?}: {e}");
                std::process::exit(2);
            }))
        })
    };
    let settings = Settings { freeze_wait: millis("--freeze-wait-ms").unwrap_or(Duration::from_secs(10)), idle_close: millis("--idle-close-ms").filter(|d| !d.is_zero()) };
    let listen: SocketAddr = listen.parse().unwrap_or_else(|e| {
        eprintln!("bad --listen: {e}");
        std::process::exit(2);
    });
    // Without --hook-version, the newest version the agent speaks.
    let version = arg(&args, "--hook-version").map(|v| {
        v.parse().ok().and_then(Version::from_number).unwrap_or_else(|| {
            eprintln!("bad --hook-version {v:?}: 1 or 2");
            std::process::exit(2);
        })
    });
    let store = Arc::new(Store::default());
    let _hook = arg(&args, "--hook").map(|sock| {
        let service: SocketAddr = arg(&args, "--service").and_then(|s| s.parse().ok()).unwrap_or(listen);
        Hook::start_version(sock, service, version, store.clone())
    });
    let listener = TcpListener::bind(listen).unwrap_or_else(|e| {
        eprintln!("cannot listen on {listen}: {e}");
        std::process::exit(1);
    });
    eprintln!("listening on {listen} as {name}");
    for conn in listener.incoming().flatten() {
        let (store, name) = (store.clone(), name.clone());
        std::thread::spawn(move || serve(&store, &name, conn, settings));
    }
}
