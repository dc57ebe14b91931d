//! `redirector-demo-app --name A --listen 198.18.0.10:80 [--hook SOCKET --service ADDR]
//! [--freeze-wait-ms MS] [--idle-close-ms MS] [--hook-version 1|2|3] [--spare-threads N]`
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
//!
//! In version 3 of the hook (the default when the agent speaks it; `--hook-version` picks one)
//! idle keep-alive connections move too: right after an export that asks for them, every
//! connection of the exported clients that is idle at a request boundary (its last request
//! answered, nothing of the next one read) is handed over, with an empty blob; its thread lets
//! go of it without a byte or a close. Connections that come with a commit or an abort (moved
//! here, or given back) are served as if just accepted. A connection's thread waits for its
//! next request with `poll(2)`, which reads nothing: only once it holds the store's lock and
//! finds the connection still its own does it read, so a hand-over never loses a byte.
//!
//! Each connection is served by a thread of its own, taken from idle worker threads, of which
//! `--spare-threads` (default 64) are kept waiting, so that connections a hand-over brings
//! (a hundred at once) are served without waiting for threads to be made; more end after a
//! minute idle.
//!
//! `GET /download/N` answers N bytes of a fixed pattern ([`download`]); a download moves in
//! the middle with its connection.

use std::{
    collections::{HashMap, VecDeque},
    io::{BufRead, BufReader, Chain, Cursor, Read, Write as _},
    net::{IpAddr, Shutdown, SocketAddr, TcpListener, TcpStream},
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
    sync::{
        Arc, Condvar, Mutex, Weak,
        atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

mod download;
mod workers;

use redirector_sdk::{Connection, Hook, Sessions, Version};
use serde_json::json;
use workers::Workers;

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
    /// Open connections, by id.
    conns: HashMap<u64, Conn>,
}

/// An open connection, as the store knows it.
struct Conn {
    /// A copy of its socket: to close it (commit) or hand it over (export).
    stream: TcpStream,
    /// Its thread is reading a request, answering it or closing the connection. Not busy: idle
    /// at a request boundary (the last request answered, nothing of the next one read), the
    /// only time it may be closed by a commit or handed over. Changed under the store's lock.
    busy: bool,
    /// Its request waits on the client's frozen session: the bytes read of it and after it
    /// (what the connection is handed over with, as its blob, to be answered elsewhere).
    waiting: Option<Vec<u8>>,
    /// Handed over (the entry is gone from the store): its thread lets go of it untouched.
    gone: Arc<AtomicBool>,
    /// Wakes its thread waiting for the next request (an eventfd).
    wake: Arc<OwnedFd>,
    /// A hand-over asks its download to stop where it is (and go with the connection).
    pause: Arc<AtomicBool>,
    /// Its thread let go of its copies of the socket.
    released: Arc<AtomicBool>,
}

struct Store {
    clients: Mutex<HashMap<IpAddr, Client>>,
    /// A frozen session thawed or left, or a connection was handed over: what the threads of
    /// requests waiting on a frozen session wait for.
    changed: Condvar,
    /// A connection reached a point where a hand-over can take it (idle at a request
    /// boundary, or its request waiting on the frozen session), or the threads of handed-over
    /// ones let go of them (`letting_go`): what a hand-over collecting connections waits for.
    /// Apart from `changed` because with one condition variable, each of a hundred connections
    /// reaching such a point woke every thread waiting on a frozen session, and each of those
    /// took the lock only to go back to sleep.
    settled: Condvar,
    /// The server's name, in every answer.
    name: String,
    settings: Settings,
    /// Itself, to serve the connections it adopts.
    me: Weak<Store>,
    /// The listening socket (non-blocking), shared by the accepting loop and a hand-over,
    /// which first takes the connections waiting to be accepted: the kernel counts them as the
    /// clients' already, and a connection the application does not know cannot go along.
    listener: std::sync::OnceLock<TcpListener>,
    /// Held from taking connections off the listener to putting them in the store, so that
    /// a hand-over's accepting (which waits for it) finds every connection accepted before it
    /// in the store. Without it, one the accepting loop had just taken was left out of the
    /// hand-over, and closed at its next request once its session moved (its client saw a
    /// failed request, once in a CI run of `keep_alive_connections_move_with_their_clients`).
    accepting: Mutex<()>,
    /// Commits applied, counted under the store's lock. A commit first accepts what waits in
    /// the listener's queue, then applies; a connection the accepting loop took before a commit
    /// and enlists after it may have waited there since before the rules (see `enlist`).
    commits: AtomicU64,
    /// The threads that serve the connections, accepted or adopted.
    workers: Workers,
    /// Threads of handed-over connections that have not let go of them yet: the one that
    /// brings it to zero wakes the hand-overs waiting (one of two at once may wait for the
    /// other's too, looking again every 2 ms).
    letting_go: AtomicUsize,
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
        // The agent steered the moving clients' new connections elsewhere before it sent the
        // commit: a connection of one of them still in the listener's queue is one of its open
        // connections here (closed below), not the client coming back, which a connection
        // accepted later means. A loaded Node.js demo once took such a connection after the
        // commit and served the client from a new session here for the rest of the run.
        self.accept_pending();
        let mut map = self.clients.lock().expect("lock");
        self.commits.fetch_add(1, Ordering::SeqCst);
        let (mut out, mut confirmed) = (0, 0);
        for cl in map.values_mut() {
            if cl.frozen.as_deref() == Some(handoff) {
                out += 1;
                cl.frozen = None;
                cl.moved = true;
                cl.session = None;
                // Idle connections close now; a busy one closes after its answer; a waiting
                // request wakes up and closes its connection unanswered. (Those handed over
                // are no longer here.)
                for c in cl.conns.values().filter(|c| !c.busy) {
                    let _ = c.stream.shutdown(Shutdown::Both);
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

    fn connections(&self, handoff: &str, clients: &[IpAddr]) -> Vec<Connection> {
        self.accept_pending();
        // Under the lock a connection's thread takes before it reads a request: an idle one
        // has read nothing of the next request (its blob is empty) and will not read now; one
        // whose request waits on the frozen session goes with that request (its blob). One
        // that is reading a request or writing an answer becomes one or the other in a moment
        // (its client is frozen): waited for, a little.
        let deadline = Instant::now() + HAND_OVER_WAIT;
        let mut map = self.clients.lock().expect("lock");
        // A download stops between two writes and goes in the middle (its thread sees this).
        for k in clients.iter().filter_map(|c| map.get(c)).flat_map(|cl| cl.conns.values()).filter(|k| k.busy && k.waiting.is_none()) {
            k.pause.store(true, Ordering::SeqCst);
            wake(&k.wake);
        }
        let in_between = |map: &HashMap<IpAddr, Client>| clients.iter().filter_map(|c| map.get(c)).flat_map(|cl| cl.conns.values()).any(|k| k.busy && k.waiting.is_none());
        while in_between(&map) && Instant::now() < deadline {
            map = self.settled.wait_timeout(map, Duration::from_millis(5)).expect("lock").0;
        }
        let waited = deadline.elapsed();
        let (mut out, mut waiting, mut stay) = (Vec::new(), 0, 0);
        let (mut out_released, mut wakes) = (Vec::new(), Vec::new());
        for c in clients {
            let Some(cl) = map.get_mut(c) else { continue };
            let ready: Vec<u64> = cl.conns.iter().filter(|(_, k)| !k.busy || k.waiting.is_some()).map(|(id, _)| *id).collect();
            stay += cl.conns.len() - ready.len();
            for id in ready {
                let k = cl.conns.remove(&id).expect("listed just now");
                self.letting_go.fetch_add(1, Ordering::SeqCst);
                k.gone.store(true, Ordering::SeqCst);
                wakes.push(k.wake);
                out_released.push(k.released.clone());
                waiting += usize::from(k.waiting.is_some());
                out.push(Connection { client: *c, socket: k.stream, blob: k.waiting.unwrap_or_default() });
            }
        }
        // Woken without the lock: each thread woken under it went straight to wait for it (a
        // thousand took 11 ms to wake).
        drop(map);
        for w in &wakes {
            wake(w);
        }
        self.changed.notify_all();
        // The threads of these connections let go of their copies first: a socket this
        // application still held would stay open on this server after the agent closed its
        // own, and take the client's packets here.
        let mut map = self.clients.lock().expect("lock");
        let until = Instant::now() + HAND_OVER_WAIT;
        while out_released.iter().any(|r: &Arc<AtomicBool>| !r.load(Ordering::SeqCst)) && Instant::now() < until {
            map = self.settled.wait_timeout(map, Duration::from_millis(2)).expect("lock").0;
        }
        drop(map);
        let holding = out_released.iter().filter(|r| !r.load(Ordering::SeqCst)).count();
        let late = if stay > 0 { format!("; {stay} still busy after {} ms stay", (HAND_OVER_WAIT + waited).as_millis()) } else { String::new() };
        let holding = if holding > 0 { format!("; {holding} still held by their threads") } else { String::new() };
        eprintln!("hook: hand over {handoff}: {} connections of {} clients ({waiting} with a request waiting{late}{holding})", out.len(), clients.len());
        out
    }

    fn adopt(&self, handoff: &str, connections: Vec<Connection>) {
        let Some(me) = self.me.upgrade() else { return };
        let n = connections.len();
        // In the store before the commit or abort that follows (a commit closes one if its
        // client's session left), all at once, then each served by a thread of its own (an idle
        // worker). One at a time, a hundred took 8-16 ms here: each took the store's lock
        // after the threads of the ones before, busy answering their clients.
        let conns = me.enlist(connections.into_iter().map(|c| (c.client.to_canonical(), c.socket, c.blob)).collect(), None);
        let served = conns.len();
        self.workers.run_all(conns.into_iter().map(|conn| {
            let me = me.clone();
            move || me.serve(conn)
        }));
        eprintln!("hook: adopt {handoff}: {served} of {n} connections, served as if just accepted");
    }
}

static NEXT_CONN: AtomicU64 = AtomicU64::new(0);

/// How long a hand-over waits for connections in the middle of a request or an answer to
/// reach a point where they can go.
const HAND_OVER_WAIT: Duration = Duration::from_secs(1);

/// Idle threads kept waiting for connections without `--spare-threads` (as a threaded web
/// server keeps spare threads: Apache's worker module keeps 25 to 75).
const SPARE_THREADS: usize = 64;

/// How long a thread beyond the spare ones stays idle before it ends (as long as Java's
/// `ThreadPoolExecutor` keeps them in its cached pools: 60 s).
const KEEP_IDLE: Duration = Duration::from_mins(1);

/// How often a thread waiting for its connection's next request looks whether the connection
/// was handed over (and lets go of it then).
const TICK: Duration = Duration::from_millis(50);

/// What the server needs from a request head.
struct Request {
    /// The connection stays open after the answer.
    keep_alive: bool,
    /// A download of this many bytes (`GET /download/N`, [`download`]).
    download: Option<u64>,
}

/// How waiting for a connection's next request ended.
enum Next {
    /// A request (at least its first byte) is there, or the client closed: read it.
    Request,
    /// No byte within `--idle-close-ms`.
    Idle,
    /// Handed over to the agent: not this server's any more.
    HandedOver,
}

/// A connection's input: what was read of it before (an adopted connection's blob), then its
/// socket.
type Input = BufReader<Chain<Cursor<Vec<u8>>, TcpStream>>;

/// Whether bytes of the connection were read but not used yet.
/// What `r` holds that was read from the connection but not consumed yet.
fn unread(r: &Input) -> Vec<u8> {
    let (before, _) = r.get_ref().get_ref();
    let rest = usize::try_from(before.position()).ok().and_then(|p| before.get_ref().get(p..)).unwrap_or_default();
    [r.buffer(), rest].concat()
}

/// A reader that keeps a copy of what it consumes: a request's bytes, to hand over with it.
struct Recorded<'a, R: BufRead> {
    inner: &'a mut R,
    raw: Vec<u8>,
}

impl<R: BufRead> Read for Recorded<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.raw.extend_from_slice(&buf[..n]);
        Ok(n)
    }
}

impl<R: BufRead> BufRead for Recorded<'_, R> {
    fn fill_buf(&mut self) -> std::io::Result<&[u8]> {
        self.inner.fill_buf()
    }

    fn consume(&mut self, n: usize) {
        // What is consumed was filled just before: no read happens here.
        if let Ok(b) = self.inner.fill_buf() {
            self.raw.extend_from_slice(&b[..n.min(b.len())]);
        }
        self.inner.consume(n);
    }
}

fn pending(r: &Input) -> bool {
    let (before, _) = r.get_ref().get_ref();
    !r.buffer().is_empty() || usize::try_from(before.position()).is_ok_and(|p| p < before.get_ref().len())
}

fn socket(r: &Input) -> &TcpStream {
    r.get_ref().get_ref().1
}

/// Which of `fds` (at most 32) have something to read (or their end, or an error) within
/// `wait`, as a mask (bit `i`: `fds[i]`), reading nothing.
fn readable(fds: &[std::os::fd::RawFd], wait: Duration) -> std::io::Result<u32> {
    let mut p: Vec<libc::pollfd> = fds.iter().take(32).map(|fd| libc::pollfd { fd: *fd, events: libc::POLLIN, revents: 0 }).collect();
    let ms = libc::c_int::try_from(wait.as_millis()).unwrap_or(libc::c_int::MAX);
    let n = libc::nfds_t::try_from(p.len()).unwrap_or(libc::nfds_t::MAX);
    // SAFETY: `n` valid pollfds, borrowed for the call only.
    match unsafe { libc::poll(p.as_mut_ptr(), n, ms) } {
        n if n > 0 => Ok(p.iter().enumerate().filter(|(_, x)| x.revents != 0).fold(0, |m, (i, _)| m | (1 << i))),
        0 => Ok(0),
        _ => {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted { Ok(0) } else { Err(e) }
        }
    }
}

/// A descriptor that wakes a connection's thread out of its wait for the next request.
fn eventfd() -> std::io::Result<OwnedFd> {
    // SAFETY: no pointers; a new descriptor or -1.
    let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: a descriptor just made, owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Wakes the thread waiting on `fd` ([`eventfd`]).
fn wake(fd: &OwnedFd) {
    let one: u64 = 1;
    // SAFETY: eight readable bytes; a failure (the counter is full) still leaves it readable.
    let _ = unsafe { libc::write(fd.as_raw_fd(), (&raw const one).cast(), 8) };
}

/// Takes a wake-up of `fd` ([`eventfd`]), so that the next wait waits again.
fn drain(fd: &OwnedFd) {
    let mut v = [0u8; 8];
    // SAFETY: eight writable bytes; the eventfd is non-blocking (nothing to take: an error).
    let _ = unsafe { libc::read(fd.as_raw_fd(), v.as_mut_ptr().cast(), 8) };
}

/// Reads one request (its head, and a `Content-Length` body, which is ignored); None at end
/// of stream or on an error.
fn read_request(r: &mut impl BufRead) -> Option<Request> {
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
    let download = line.split(' ').nth(1).and_then(download::requested);
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
    Some(Request { keep_alive: persistent && !close && !chunked, download })
}

/// Closes a connection the server is done with, first: sends its FIN, then reads (and
/// ignores) what the client still sends until it closes too, for at most a second, so that
/// the client reads the whole answer before any reset.
fn close_first(s: &TcpStream) {
    if s.shutdown(Shutdown::Write).is_err() {
        return;
    }
    let deadline = Instant::now() + Duration::from_secs(1);
    let mut buf = [0u8; 4096];
    let mut left = 64 * 1024usize;
    loop {
        let now = Instant::now();
        if now >= deadline || left == 0 || s.set_read_timeout(Some(deadline - now)).is_err() {
            return;
        }
        match (&*s).read(&mut buf) {
            Ok(0) => return,
            Ok(n) => left = left.saturating_sub(n),
            // Stopped and continued (SIGSTOP, a frozen cgroup): a read with a timeout fails
            // with EINTR (signal(7)). The client is still there: read on until the deadline.
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(_) => return,
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
    /// Handed over to the agent: let go of it without touching it.
    HandedOver,
}

/// A connection in the store, ready to serve.
struct Served {
    id: u64,
    client: IpAddr,
    gone: Arc<AtomicBool>,
    wake: Arc<OwnedFd>,
    pause: Arc<AtomicBool>,
    released: Arc<AtomicBool>,
    r: Input,
    w: TcpStream,
    /// A download it came in the middle of (adopted), to finish first.
    resume: Option<download::Resume>,
}

/// How a download (or the rest of one) went.
enum Sent {
    All,
    /// The connection went with a hand-over, in the middle.
    HandedOver,
    /// The client went away.
    Failed,
}

impl Store {
    fn new(name: String, settings: Settings, spare_threads: usize) -> Arc<Self> {
        Arc::new_cyclic(|me| Self {
            clients: Mutex::default(),
            changed: Condvar::new(),
            settled: Condvar::new(),
            name,
            settings,
            me: me.clone(),
            listener: std::sync::OnceLock::new(),
            accepting: Mutex::new(()),
            commits: AtomicU64::new(0),
            workers: Workers::new(spare_threads, KEEP_IDLE),
            letting_go: AtomicUsize::new(0),
        })
    }

    /// Accepts every connection waiting on the listener: each in the store at once, served
    /// by a thread of its own.
    fn accept_pending(&self) {
        self.accept_pending_then(|| {});
    }

    /// [`Store::accept_pending`], calling `accepted` between taking each connection from the
    /// listener and putting it in the store (tests pause there).
    fn accept_pending_then(&self, accepted: impl Fn()) {
        let (Some(l), Some(me)) = (self.listener.get(), self.me.upgrade()) else { return };
        loop {
            // Each connection apart: a flood of them must not keep a hand-over waiting.
            let _one_at_a_time = self.accepting.lock().expect("lock");
            let commits = self.commits.load(Ordering::SeqCst);
            let stream = match l.accept() {
                Ok((s, _)) => s,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return,
                Err(e) => {
                    eprintln!("accepting a connection: {e}");
                    return;
                }
            };
            let Ok(peer) = stream.peer_addr() else { continue };
            if stream.set_nonblocking(false).is_err() {
                continue;
            }
            accepted();
            // A dual-stack listener reports IPv4 clients as ::ffff:a.b.c.d: one client, one key.
            for conn in self.enlist(vec![(peer.ip().to_canonical(), stream, Vec::new())], Some(commits)) {
                let me = me.clone();
                self.workers.run(move || me.serve(conn));
            }
        }
    }

    /// Puts connections in the store, each of a client, with a blob saying what was read of
    /// it already and any download it is in the middle of (an adopted connection's), under one
    /// taking of the lock; those it could not prepare (out of descriptors) are dropped.
    /// `accepted`: new connections of their clients, with the commits applied before they were
    /// accepted. One came here, so its client is back (its session is not elsewhere, e.g. its
    /// volunteer was lost) unless a commit came in between: then it may have waited in the
    /// queue since before that commit's rules, and it is one of the moved client's old
    /// connections (closed at its next request; the client's retry comes here again if the
    /// client is really back).
    fn enlist(&self, conns: Vec<(IpAddr, TcpStream, Vec<u8>)>, accepted: Option<u64>) -> Vec<Served> {
        let ready: Vec<(Conn, Served)> = conns.into_iter().filter_map(|(client, stream, blob)| Self::prepare(client, stream, blob)).collect();
        let mut map = self.clients.lock().expect("lock");
        let back = accepted == Some(self.commits.load(Ordering::SeqCst));
        ready
            .into_iter()
            .map(|(conn, served)| {
                let cl = map.entry(served.client).or_default();
                if back {
                    cl.moved = false;
                }
                cl.conns.insert(served.id, conn);
                served
            })
            .collect()
    }

    /// A connection's entry in the store and what its thread serves it with.
    fn prepare(client: IpAddr, stream: TcpStream, blob: Vec<u8>) -> Option<(Conn, Served)> {
        let (resume, before) = download::from_blob(blob);
        let _ = stream.set_nodelay(true);
        // A client that does not read never holds a thread (or the store) for long.
        let _ = stream.set_write_timeout(Some(Duration::from_secs(10)));
        let (kept, w) = (stream.try_clone().ok()?, stream.try_clone().ok()?);
        let id = NEXT_CONN.fetch_add(1, Ordering::Relaxed);
        let gone = Arc::new(AtomicBool::new(false));
        let (wake, released, pause) = (Arc::new(eventfd().ok()?), Arc::new(AtomicBool::new(false)), Arc::new(AtomicBool::new(false)));
        let busy = resume.is_some() || !before.is_empty();
        let conn = Conn { stream: kept, busy, waiting: None, gone: gone.clone(), wake: wake.clone(), pause: pause.clone(), released: released.clone() };
        Some((conn, Served { id, client, gone, wake, pause, released, r: BufReader::new(Cursor::new(before).chain(stream)), w, resume }))
    }

    /// Waits for the connection's next request without reading it, then makes the connection
    /// busy under the store's lock unless it was handed over meanwhile.
    fn next_request(&self, c: &Served) -> Next {
        let since = Instant::now();
        let mut next = Next::Request;
        if !pending(&c.r) {
            loop {
                if c.gone.load(Ordering::SeqCst) {
                    return Next::HandedOver;
                }
                let left = self.settings.idle_close.map(|d| d.saturating_sub(since.elapsed()));
                if left.is_some_and(|l| l.is_zero()) {
                    next = Next::Idle;
                    break;
                }
                // An error: the read that follows sees it.
                // Woken (a hand-over asks, or a download's stop came late): look again whether
                // the connection is still this thread's, still waiting for a request.
                let ready = readable(&[socket(&c.r).as_raw_fd(), c.wake.as_raw_fd()], left.map_or(TICK, |l| l.min(TICK))).unwrap_or(1);
                if ready & 2 != 0 {
                    drain(&c.wake);
                }
                if ready & 1 != 0 {
                    break;
                }
            }
        }
        let mut map = self.clients.lock().expect("lock");
        match map.get_mut(&c.client).and_then(|cl| cl.conns.get_mut(&c.id)) {
            Some(k) => {
                k.busy = true;
                next
            }
            None => Next::HandedOver,
        }
    }

    /// Writes download `r` (from where it got) to `c`; a hand-over that wants the connection
    /// stops it between two writes, and takes it with a blob that says how far it got (or,
    /// should the hand-over end without it, the download goes on).
    fn download(&self, c: &Served, r: download::Resume) -> Sent {
        let mut r = r;
        loop {
            match download::write(&c.w, &c.wake, r.sent, r.total, || c.pause.load(Ordering::SeqCst) || c.gone.load(Ordering::SeqCst)) {
                Err(_) => return Sent::Failed,
                Ok(download::Wrote::All) => return Sent::All,
                Ok(download::Wrote::Stopped(at)) => r.sent = at,
            }
            // Ready to go with the hand-over from here: what it wrote is in the socket's send
            // queue (which moves with it), what it read ahead goes in the blob.
            let mut map = self.clients.lock().expect("lock");
            let Some(k) = map.get_mut(&c.client).and_then(|cl| cl.conns.get_mut(&c.id)) else { return Sent::HandedOver };
            k.waiting = Some(download::blob(r, &unread(&c.r)));
            self.settled.notify_all();
            let deadline = Instant::now() + self.settings.freeze_wait;
            while map.get(&c.client).is_some_and(|cl| cl.frozen.is_some()) && Instant::now() < deadline && !c.gone.load(Ordering::SeqCst) {
                map = self.changed.wait_timeout(map, Duration::from_millis(50)).expect("lock").0;
            }
            if c.gone.load(Ordering::SeqCst) {
                return Sent::HandedOver;
            }
            if let Some(k) = map.get_mut(&c.client).and_then(|cl| cl.conns.get_mut(&c.id)) {
                k.waiting = None;
            }
            c.pause.store(false, Ordering::SeqCst);
        }
    }

    /// Waits for the connection's next request, reads it and answers it: whether the answer
    /// went out, and whether the connection stays open; or how the connection ends.
    fn answer_next(&self, c: &mut Served) -> Result<(bool, bool), End> {
        let (name, freeze_wait, client) = (self.name.as_str(), self.settings.freeze_wait, c.client);
        match self.next_request(c) {
            Next::Request => {}
            Next::Idle => return Err(End::First),
            Next::HandedOver => return Err(End::HandedOver),
        }
        let mut rec = Recorded { inner: &mut c.r, raw: Vec::new() };
        let Some(request) = read_request(&mut rec) else { return Err(End::Now) };
        let raw = rec.raw;
        let reply = {
            let mut map = self.clients.lock().expect("lock");
            // Wait while the client is frozen by a hand-over (until it ends; the agent tells
            // the outcome even across its own restarts, but the wait is bounded). Meanwhile
            // the connection may go with the session, this request with it.
            let deadline = Instant::now() + freeze_wait;
            if map.get(&client).is_some_and(|c| c.frozen.is_some())
                && let Some(k) = map.get_mut(&client).and_then(|cl| cl.conns.get_mut(&c.id))
            {
                k.waiting = Some([raw, unread(&c.r)].concat());
                self.settled.notify_all();
            }
            while map.get(&client).is_some_and(|c| c.frozen.is_some()) && Instant::now() < deadline && !c.gone.load(Ordering::SeqCst) {
                map = self.changed.wait_timeout(map, Duration::from_millis(50)).expect("lock").0;
            }
            if c.gone.load(Ordering::SeqCst) {
                return Err(End::HandedOver);
            }
            if let Some(k) = map.get_mut(&client).and_then(|cl| cl.conns.get_mut(&c.id)) {
                k.waiting = None;
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
        let download = request.download.filter(|_| matches!(reply, Reply::Ok(_)));
        let resp = match reply {
            Reply::Close => return Err(End::Now),
            // A download says who answered, and the session, in a header.
            Reply::Ok(body) if download.is_some() => format!(
                "HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\nContent-Length: {}\r\nX-Session: {body}\r\nConnection: {connection}\r\n\r\n",
                download.unwrap_or_default()
            ),
            Reply::Ok(body) => format!("HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: {connection}\r\n\r\n{body}", body.len()),
            Reply::Busy(body) => format!(
                "HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\nContent-Length: {}\r\nRetry-After: 1\r\nConnection: {connection}\r\n\r\n{body}",
                body.len()
            ),
        };
        let mut ok = c.w.write_all(resp.as_bytes()).is_ok();
        if let Some(total) = download.filter(|_| ok) {
            match self.download(c, download::Resume { total, sent: 0, keep_alive: request.keep_alive }) {
                Sent::All => {}
                Sent::HandedOver => return Err(End::HandedOver),
                Sent::Failed => ok = false,
            }
        }
        Ok((ok, request.keep_alive))
    }

    fn serve(&self, mut c: Served) {
        let client = c.client;
        let mut resume = c.resume.take();
        let end = loop {
            // The rest of a download the connection came in the middle of, or its next request.
            let (ok, keep_alive) = if let Some(r) = resume.take() {
                match self.download(&c, r) {
                    Sent::All => (true, r.keep_alive),
                    Sent::HandedOver => break End::HandedOver,
                    Sent::Failed => (false, false),
                }
            } else {
                match self.answer_next(&mut c) {
                    Ok(r) => r,
                    Err(end) => break end,
                }
            };
            let mut map = self.clients.lock().expect("lock");
            let cl = map.get_mut(&client);
            if !ok || cl.as_ref().is_some_and(|cl| cl.moved) {
                break End::Now;
            }
            if !keep_alive {
                break End::First;
            }
            // Idle again (a commit may close it, an export hand it over) unless the next
            // request's first bytes are already read.
            if !pending(&c.r)
                && let Some(k) = cl.and_then(|cl| cl.conns.get_mut(&c.id))
            {
                k.busy = false;
                self.settled.notify_all();
            }
        };
        match end {
            // The agent holds the socket now: drop this thread's copies, nothing more, and
            // say so (the hand-over waits for it).
            End::HandedOver => {
                let released = c.released.clone();
                drop(c);
                released.store(true, Ordering::SeqCst);
                // The last to let go wakes the hand-over, under the lock so that it cannot miss
                // it between looking and waiting (with a hand-over of a thousand, each one
                // taking the lock to wake it took 31 ms).
                if self.letting_go.fetch_sub(1, Ordering::SeqCst) == 1 {
                    let _map = self.clients.lock().expect("lock");
                    self.settled.notify_all();
                }
                return;
            }
            End::Now => {
                let _ = c.w.shutdown(Shutdown::Both);
            }
            End::First => close_first(socket(&c.r)),
        }
        if let Some(cl) = self.clients.lock().expect("lock").get_mut(&client) {
            cl.conns.remove(&c.id);
        }
    }
}

fn arg(args: &[String], name: &str) -> Option<String> {
    args.iter().position(|a| a == name).and_then(|i| args.get(i + 1)).cloned()
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let (Some(name), Some(listen)) = (arg(&args, "--name"), arg(&args, "--listen")) else {
        eprintln!(
            "usage: redirector-demo-app --name NAME --listen ADDR [--hook SOCKET --service ADDR] [--freeze-wait-ms MS] [--idle-close-ms MS] [--hook-version 1|2|3] [--spare-threads N]"
        );
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
    let spare_threads = arg(&args, "--spare-threads").map_or(SPARE_THREADS, |v| {
        v.parse().unwrap_or_else(|e| {
            eprintln!("bad --spare-threads {v:?}: {e}");
            std::process::exit(2);
        })
    });
    let listen: SocketAddr = listen.parse().unwrap_or_else(|e| {
        eprintln!("bad --listen: {e}");
        std::process::exit(2);
    });
    // Without --hook-version, the newest version the agent speaks.
    let version = arg(&args, "--hook-version").map(|v| {
        v.parse().ok().and_then(Version::from_number).unwrap_or_else(|| {
            eprintln!("bad --hook-version {v:?}: 1, 2 or 3");
            std::process::exit(2);
        })
    });
    let store = Store::new(name.clone(), settings, spare_threads);
    let _hook = arg(&args, "--hook").map(|sock| {
        let service: SocketAddr = arg(&args, "--service").and_then(|s| s.parse().ok()).unwrap_or(listen);
        Hook::start_version(sock, service, version, store.clone())
    });
    let listener = TcpListener::bind(listen).unwrap_or_else(|e| {
        eprintln!("cannot listen on {listen}: {e}");
        std::process::exit(1);
    });
    eprintln!("listening on {listen} as {name}");
    if let Err(e) = listener.set_nonblocking(true) {
        eprintln!("cannot make the listener non-blocking: {e}");
        std::process::exit(1);
    }
    let _ = store.listener.set(listener);
    let fd = store.listener.get().expect("just set").as_raw_fd();
    loop {
        // Woken by a connection to accept (or every second).
        let _ = readable(&[fd], Duration::from_secs(1));
        store.accept_pending();
    }
}

#[cfg(test)]
mod tests {
    use std::{net::Ipv4Addr, sync::mpsc, thread};

    use super::*;

    /// A connection the accepting loop has taken from the listener but not yet put in the
    /// store when a hand-over asks for its client's connections goes with the hand-over: the
    /// agent counted it as the client's, and one left behind is closed at its next request
    /// once the session moved (the client sees a failed request and reconnects).
    #[test]
    fn a_connection_being_accepted_as_a_hand_over_starts_goes_with_it() {
        let store = Store::new("A".into(), Settings { freeze_wait: Duration::from_secs(10), idle_close: None }, 2);
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).expect("bind");
        listener.set_nonblocking(true).expect("non-blocking");
        let addr = listener.local_addr().expect("address");
        assert!(store.listener.set(listener).is_ok());
        let _client = TcpStream::connect(addr).expect("connect");
        // The accepting loop, paused between taking the connection and putting it in the store.
        let (took, go) = (mpsc::channel(), mpsc::channel::<()>());
        let (took_tx, go_rx) = (took.0, Mutex::new(go.1));
        let accepting = {
            let store = store.clone();
            thread::spawn(move || {
                store.accept_pending_then(|| {
                    took_tx.send(()).expect("send");
                    let _ = go_rx.lock().expect("lock").recv_timeout(Duration::from_secs(10));
                });
            })
        };
        took.1.recv_timeout(Duration::from_secs(10)).expect("the connection was accepted");
        let (done_tx, done_rx) = mpsc::channel();
        let handing = {
            let store = store.clone();
            thread::spawn(move || done_tx.send(store.connections("h", &[IpAddr::V4(Ipv4Addr::LOCALHOST)])).expect("send"))
        };
        let early = done_rx.recv_timeout(Duration::from_millis(300)).ok();
        go.0.send(()).expect("send");
        let handed = early.unwrap_or_else(|| done_rx.recv_timeout(Duration::from_secs(10)).expect("the hand-over answered"));
        accepting.join().expect("accepting thread");
        handing.join().expect("hand-over thread");
        assert_eq!(handed.len(), 1, "the connection being accepted went with the hand-over");
    }

    /// Closing first, the server reads what the client still sends until the client closes,
    /// also when the server is stopped and continued meanwhile (SIGSTOP and SIGCONT: its read
    /// with a timeout fails with EINTR, signal(7)). A server that closed then would answer
    /// the client's next bytes with a reset. This test's whole process is stopped for 100 ms.
    #[test]
    fn closing_first_outlasts_a_stop() {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).expect("bind");
        let mut client = TcpStream::connect(listener.local_addr().expect("address")).expect("connect");
        let (server, _) = listener.accept().expect("accept");
        // The client sends more after the stop, then closes.
        let sends = thread::spawn(move || {
            thread::sleep(Duration::from_millis(600));
            let first = client.write_all(b"more");
            thread::sleep(Duration::from_millis(100));
            let second = client.write_all(b"again");
            (first.map_err(|e| e.to_string()), second.map_err(|e| e.to_string()))
        });
        let mut stop =
            std::process::Command::new("sh").args(["-c", "sleep 0.2; kill -STOP $PPID; sleep 0.1; kill -CONT $PPID"]).spawn().expect("the shell that stops this process");
        let t0 = Instant::now();
        close_first(&server);
        let took = t0.elapsed();
        drop(server);
        assert!(stop.wait().expect("the shell").success(), "the stop and the continue were sent");
        let sent = sends.join().expect("the client");
        assert_eq!(sent, (Ok(()), Ok(())), "the client's bytes after the stop met no reset (closing first took {took:?})");
    }
}
