//! The application hook: a local Unix socket (mode 0660, owner configurable) the application
//! connects to. It registers its service (and reports the hand-overs it has not seen end),
//! then answers the agent's requests: export (freeze and return session blobs), import,
//! commit, abort. Newline-delimited JSON, base64 blobs; the protocol is specified in
//! docs/app-protocol.md.
//!
//! Applications never decide the outcome of a hand-over: commit and abort are retried until
//! the application confirms them, on every connection it makes, and the agent answers the
//! unfinished hand-overs an application reports when it registers.

use std::{
    collections::{HashMap, HashSet},
    net::{IpAddr, SocketAddr},
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context as _, anyhow, bail};
use base64::{Engine as _, engine::general_purpose::STANDARD};
use serde_json::json;
use tokio::{
    io::{AsyncBufRead, AsyncBufReadExt as _, AsyncWriteExt as _, BufReader},
    net::{UnixListener, UnixStream},
    sync::{Notify, mpsc, oneshot, watch},
};
use tracing::{debug, error, info, warn};

use crate::peer::SessionBlob;

/// Version of the hook protocol: an application registers with it.
pub const VERSION: u64 = 1;

/// Longest line accepted from an application, except an export answer, which may also take
/// its sessions' room (see [`Limits::export_room`]).
pub const MAX_LINE: usize = 16 << 20;

/// How long an application has to send its register line once connected.
pub const REGISTER_TIMEOUT: Duration = Duration::from_secs(5);

/// How often a commit or abort the application has not confirmed is sent again while it is
/// connected (it is also sent at once when it registers again).
const RETRY: Duration = Duration::from_secs(1);

const MIB: u128 = 1 << 20;

/// Which side of a hand-over an application was on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// It exported (froze) the sessions: the origin.
    Export,
    /// It imported them: the volunteer.
    Import,
}

/// A hand-over an application reported as unfinished when it registered.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PendingHandoff {
    pub handoff: String,
    pub role: Role,
    /// The clients it froze (export) or imported (import).
    pub clients: Vec<IpAddr>,
}

/// An application registered: the agent decides its unfinished hand-overs (through
/// [`Apps::settle`]), then says `done`; only then does the application get requests.
pub struct Registration {
    pub service: SocketAddr,
    pub pending: Vec<PendingHandoff>,
    pub done: oneshot::Sender<()>,
}

/// Time limits and sizes for requests to applications.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// Base time for every request.
    pub timeout: Duration,
    /// More time per MiB of request line, and per MiB of answer received so far.
    pub per_mib_ms: u64,
    pub max_session_bytes: usize,
}

/// Length of a blob of `n` bytes in base64 with padding.
fn b64_len(n: usize) -> usize {
    n.div_ceil(3).saturating_mul(4)
}

impl Limits {
    /// The allowance for `bytes` of data at `per_mib_ms`.
    #[must_use]
    pub fn per_mib(&self, bytes: u64) -> Duration {
        Duration::from_millis(u64::try_from(u128::from(self.per_mib_ms) * u128::from(bytes) / MIB).unwrap_or(u64::MAX))
    }

    /// Time a request line of `bytes` gets before any answer arrives.
    #[must_use]
    pub fn allowance(&self, bytes: u64) -> Duration {
        self.timeout.saturating_add(self.per_mib(bytes))
    }

    /// Time a volunteer gives its application to import `sessions` (the same on both sides: the
    /// origin waits this, plus its negotiation timeout, for the acknowledgement).
    #[must_use]
    pub fn import_allowance<'a>(&self, sessions: impl IntoIterator<Item = &'a SessionBlob>) -> Duration {
        self.allowance(import_line_len(sessions))
    }

    /// Extra line length an export answer for `clients` clients may take.
    #[must_use]
    pub fn export_room(&self, clients: usize) -> usize {
        clients.saturating_mul(b64_len(self.max_session_bytes).saturating_add(128)).saturating_add(4096)
    }
}

/// About the length of the import line of `sessions`.
pub fn import_line_len<'a>(sessions: impl IntoIterator<Item = &'a SessionBlob>) -> u64 {
    let n = sessions.into_iter().fold(128usize, |sum, s| sum.saturating_add(b64_len(s.blob.len())).saturating_add(72));
    u64::try_from(n).unwrap_or(u64::MAX)
}

/// A client address as an application wrote it, in the agent's form: IPv4-mapped IPv6
/// addresses (what a dual-stack listener reports for IPv4 clients) are IPv4.
#[must_use]
pub fn parse_client(s: &str) -> Option<IpAddr> {
    s.parse::<IpAddr>().ok().map(|a| a.to_canonical())
}

/// An answer to a request, or why there is none.
type Answer = Result<Vec<u8>, String>;

enum Out {
    Line(String),
    /// Write this line, then close the connection.
    Close(String),
}

struct AppConn {
    tx: mpsc::Sender<Out>,
    waiters: Mutex<HashMap<u64, oneshot::Sender<Answer>>>,
    next: AtomicU64,
    /// Bytes received from the application so far: progress that extends deadlines.
    received: AtomicU64,
    /// Room in the line limit for the export answers outstanding.
    export_room: AtomicUsize,
}

impl AppConn {
    fn fail_all(&self, why: &str) {
        for (_, w) in self.waiters.lock().expect("lock").drain() {
            let _ = w.send(Err(why.to_string()));
        }
    }
}

/// Removes a request's waiter and its line room when the request ends, however it ends.
struct WaiterGuard<'a> {
    conn: &'a AppConn,
    id: u64,
    room: usize,
}

impl Drop for WaiterGuard<'_> {
    fn drop(&mut self) {
        self.conn.waiters.lock().expect("lock").remove(&self.id);
        self.conn.export_room.fetch_sub(self.room, Ordering::Relaxed);
    }
}

/// A commit or abort the application has not confirmed yet.
struct Owed {
    commit: bool,
    done: watch::Receiver<bool>,
}

/// Registered applications, by the service they serve, and the outcomes they owe a
/// confirmation of.
pub struct Apps {
    by_service: Mutex<HashMap<SocketAddr, Arc<AppConn>>>,
    owed: Mutex<HashMap<(SocketAddr, String), Owed>>,
    /// Woken on every registration.
    registered: Notify,
    registrations: mpsc::UnboundedSender<Registration>,
    limits: Limits,
}

#[derive(serde::Deserialize)]
struct Head {
    id: Option<serde_json::Value>,
}

#[derive(serde::Deserialize)]
struct OkField {
    ok: Option<serde_json::Value>,
    error: Option<serde_json::Value>,
}

#[derive(serde::Deserialize)]
struct ExportAnswer {
    ok: Option<serde_json::Value>,
    error: Option<serde_json::Value>,
    sessions: Option<Vec<ExportedSession>>,
}

/// An answer's `ok` (required, boolean) and `error` (optional): Ok if `ok` is true, else why
/// not.
fn ok_or_why(ok: Option<&serde_json::Value>, error: Option<&serde_json::Value>, text: &[u8]) -> Result<(), String> {
    match ok {
        Some(serde_json::Value::Bool(true)) => Ok(()),
        Some(serde_json::Value::Bool(false)) => Err(format!("refused: {}", error.and_then(serde_json::Value::as_str).unwrap_or("no reason given"))),
        _ => Err(format!("without a boolean \"ok\": {}", preview(text))),
    }
}

/// Checks a small answer (import, commit, abort): `ok` true.
fn check_ok(text: &[u8]) -> Result<(), String> {
    let a: OkField = serde_json::from_slice(text).map_err(|e| format!("with malformed JSON: {e}"))?;
    ok_or_why(a.ok.as_ref(), a.error.as_ref(), text)
}

#[derive(serde::Deserialize)]
struct ExportedSession {
    client: Option<String>,
    blob: Option<String>,
}

#[derive(serde::Serialize)]
struct WireSession {
    client: String,
    blob: String,
}

#[derive(serde::Serialize)]
struct ImportRequest<'a> {
    id: u64,
    op: &'static str,
    handoff: &'a str,
    sessions: Vec<WireSession>,
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct Register {
    op: String,
    service: String,
    version: Option<u64>,
    #[serde(default)]
    pending: Vec<WirePending>,
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct WirePending {
    handoff: String,
    role: String,
    clients: Vec<String>,
}

/// Checks an export answer against the request: a `sessions` list (possibly empty) of
/// `{"client","blob"}` for requested clients only, each once, with base64 blobs of at most
/// `max` bytes.
fn parse_export(text: &[u8], requested: &[IpAddr], max: usize) -> anyhow::Result<Vec<SessionBlob>> {
    let v: ExportAnswer = serde_json::from_slice(text).map_err(|e| anyhow!("the export answer is malformed: {e}"))?;
    ok_or_why(v.ok.as_ref(), v.error.as_ref(), text).map_err(|e| anyhow!("{e}"))?;
    let list = v.sessions.ok_or_else(|| anyhow!("the export answer has no sessions list (required, even when empty)"))?;
    let requested: HashSet<IpAddr> = requested.iter().copied().collect();
    let mut seen = HashSet::with_capacity(list.len());
    let mut out = Vec::with_capacity(list.len());
    for (i, s) in list.into_iter().enumerate() {
        let (Some(client), Some(blob)) = (s.client, s.blob) else {
            bail!("exported session #{i} lacks a client or a blob");
        };
        let addr = parse_client(&client).ok_or_else(|| anyhow!("the application exported a session for {client:?}, not an address"))?;
        if !requested.contains(&addr) {
            bail!("the application exported a session for {addr}, which was not requested");
        }
        if !seen.insert(addr) {
            bail!("the application exported two sessions for {addr}");
        }
        if b64_len(max) < blob.len() {
            bail!("session of {addr} is over the limit of {max} bytes (max_session_bytes)");
        }
        let blob = STANDARD.decode(&blob).map_err(|e| anyhow!("session of {addr}: blob is not base64: {e}"))?;
        if blob.len() > max {
            bail!("session of {addr} is {} bytes, over the limit of {max} (max_session_bytes)", blob.len());
        }
        out.push(SessionBlob { client: addr, blob });
    }
    Ok(out)
}

/// Parses a register line: (service, pending hand-overs), or why not.
fn parse_register(line: &[u8]) -> Result<(SocketAddr, Vec<PendingHandoff>), String> {
    let r: Register = serde_json::from_slice(line).map_err(|e| format!("malformed register line: {e}"))?;
    if r.op != "register" {
        return Err(format!("expected op \"register\", got {:?}", r.op));
    }
    let service: SocketAddr = r.service.parse().map_err(|_| format!("service {:?} is not ADDRESS:PORT", r.service))?;
    match r.version {
        Some(VERSION) => {}
        Some(v) => return Err(format!("this agent speaks hook protocol version {VERSION}, not {v}")),
        None => return Err(format!("no version: register with \"version\":{VERSION}")),
    }
    let mut pending = Vec::with_capacity(r.pending.len());
    for p in r.pending {
        let role = match p.role.as_str() {
            "export" => Role::Export,
            "import" => Role::Import,
            other => return Err(format!("pending hand-over {:?}: role {other:?} is neither \"export\" nor \"import\"", p.handoff)),
        };
        let clients =
            p.clients.iter().map(|c| parse_client(c).ok_or_else(|| format!("pending hand-over {:?}: {c:?} is not an address", p.handoff))).collect::<Result<Vec<_>, _>>()?;
        pending.push(PendingHandoff { handoff: p.handoff, role, clients });
    }
    Ok((service, pending))
}

/// Reads one line (without its `\n`) into `buf`, at most `cap()` bytes; cancel-safe: what was
/// read stays in `buf` for the next call. `Ok(false)` at the end of the stream.
async fn read_line_capped<R: AsyncBufRead + Unpin>(r: &mut R, buf: &mut Vec<u8>, cap: impl Fn() -> usize, received: &AtomicU64) -> std::io::Result<bool> {
    loop {
        let avail = r.fill_buf().await?;
        if avail.is_empty() {
            return Ok(false);
        }
        let (take, done) = match memchr(avail) {
            Some(i) => (i + 1, true),
            None => (avail.len(), false),
        };
        buf.extend_from_slice(&avail[..take]);
        r.consume(take);
        received.fetch_add(u64::try_from(take).unwrap_or(u64::MAX), Ordering::Relaxed);
        if done {
            buf.pop();
        }
        let cap = cap();
        if buf.len() > cap {
            return Err(std::io::Error::new(std::io::ErrorKind::InvalidData, format!("a line over {cap} bytes")));
        }
        if done {
            return Ok(true);
        }
    }
}

fn memchr(b: &[u8]) -> Option<usize> {
    b.iter().position(|c| *c == b'\n')
}

/// The start of a line, for a log message.
fn preview(line: &[u8]) -> String {
    let s = String::from_utf8_lossy(&line[..line.len().min(120)]).into_owned();
    if line.len() > 120 { format!("{s}...") } else { s }
}

impl Apps {
    /// The hook's registry; registrations (with the hand-overs they report unfinished) come
    /// out of the receiver, for the agent to decide.
    #[must_use]
    pub fn new(limits: Limits) -> (Arc<Self>, mpsc::UnboundedReceiver<Registration>) {
        let (tx, rx) = mpsc::unbounded_channel();
        let apps = Self { by_service: Mutex::default(), owed: Mutex::default(), registered: Notify::new(), registrations: tx, limits };
        (Arc::new(apps), rx)
    }

    /// Whether an application registered for `service`.
    #[must_use]
    pub fn has(&self, service: SocketAddr) -> bool {
        self.by_service.lock().expect("lock").contains_key(&service)
    }

    #[must_use]
    pub fn limits(&self) -> Limits {
        self.limits
    }

    /// Services with an application registered, and how many commits or aborts are not
    /// confirmed yet: for the status.
    #[must_use]
    pub fn status(&self) -> (Vec<String>, usize) {
        let mut services: Vec<String> = self.by_service.lock().expect("lock").keys().map(ToString::to_string).collect();
        services.sort();
        (services, self.owed.lock().expect("lock").len())
    }

    /// Whether a commit (`Some(true)`) or abort of `handoff` is on its way to the application
    /// of `service`.
    #[must_use]
    pub fn owes(&self, service: SocketAddr, handoff: &str) -> Option<bool> {
        self.owed.lock().expect("lock").get(&(service, handoff.to_string())).map(|o| o.commit)
    }

    fn conn(&self, service: SocketAddr) -> Option<Arc<AppConn>> {
        self.by_service.lock().expect("lock").get(&service).cloned()
    }

    /// Sends the request `make(id)` and waits for its answer: `allowance` of the line's size
    /// from now, extended by the answer's progress. `room`: extra line length its answer may
    /// take.
    async fn call(&self, service: SocketAddr, what: &str, room: usize, make: impl FnOnce(u64) -> anyhow::Result<String>) -> anyhow::Result<Vec<u8>> {
        let conn = self.conn(service).ok_or_else(|| anyhow!("no application registered for {service}"))?;
        let id = conn.next.fetch_add(1, Ordering::Relaxed);
        let line = make(id)?;
        let (tx, rx) = oneshot::channel();
        conn.waiters.lock().expect("lock").insert(id, tx);
        conn.export_room.fetch_add(room, Ordering::Relaxed);
        let _guard = WaiterGuard { conn: &conn, id, room };
        let start = Instant::now();
        let received0 = conn.received.load(Ordering::Relaxed);
        let allowance = self.limits.allowance(u64::try_from(line.len()).unwrap_or(u64::MAX));
        let gone = || anyhow!("the application for {service} disconnected");
        // Queueing the request counts against the time too: an application that stops reading
        // never holds the agent up.
        let exchange = async {
            conn.tx.send(Out::Line(line)).await.map_err(|_| gone())?;
            rx.await.map_err(|_| gone())?.map_err(|e| anyhow!("the application for {service}: {e}"))
        };
        tokio::pin!(exchange);
        let text = loop {
            let progress = conn.received.load(Ordering::Relaxed) - received0;
            let deadline = start + allowance + self.limits.per_mib(progress);
            tokio::select! {
                r = &mut exchange => break r?,
                () = tokio::time::sleep_until(deadline.into()) => {
                    if conn.received.load(Ordering::Relaxed) - received0 == progress {
                        bail!("the application for {service} did not answer {what} within {} ms", deadline.duration_since(start).as_millis());
                    }
                }
            }
        };
        Ok(text)
    }

    /// Exports (and freezes) the sessions of `clients`; checks the answer against the request.
    /// The answer (possibly hundreds of MiB) is checked on a blocking thread.
    pub async fn export(&self, service: SocketAddr, handoff: &str, clients: &[IpAddr]) -> anyhow::Result<Vec<SessionBlob>> {
        let names: Vec<String> = clients.iter().map(ToString::to_string).collect();
        let room = self.limits.export_room(clients.len());
        let what = format!("export {handoff}");
        let text = self.call(service, &what, room, |id| Ok(json!({"id": id, "op": "export", "handoff": handoff, "clients": names}).to_string())).await?;
        let (requested, max) = (clients.to_vec(), self.limits.max_session_bytes);
        tokio::task::spawn_blocking(move || parse_export(&text, &requested, max))
            .await
            .map_err(|e| anyhow!("checking the export: {e}"))?
            .map_err(|e| anyhow!("the application for {service} answered {what}: {e:#}"))
    }

    /// Imports sessions moved here (tentatively, until [`Apps::settle`]). The line is encoded
    /// in place of the async worker (`block_in_place`: a multi-threaded runtime only).
    pub async fn import(&self, service: SocketAddr, handoff: &str, sessions: &[SessionBlob]) -> anyhow::Result<()> {
        let what = format!("import {handoff}");
        let text = self
            .call(service, &what, 0, |id| {
                tokio::task::block_in_place(|| {
                    let req = ImportRequest {
                        id,
                        op: "import",
                        handoff,
                        sessions: sessions.iter().map(|s| WireSession { client: s.client.to_string(), blob: STANDARD.encode(&s.blob) }).collect(),
                    };
                    serde_json::to_string(&req).context("encoding the import")
                })
            })
            .await?;
        check_ok(&text).map_err(|e| anyhow!("the application for {service} answered {what}: {e}"))
    }

    /// Tells the application of `service` that hand-over `handoff` committed (`true`) or
    /// aborted, until it confirms: sent again every second while it is connected and whenever
    /// it registers again. Returns once confirmed. A second call for the same hand-over waits
    /// for the first one's delivery.
    pub async fn settle(&self, service: SocketAddr, handoff: &str, commit: bool) {
        let key = (service, handoff.to_string());
        let mine = {
            let mut owed = self.owed.lock().expect("lock");
            if let Some(o) = owed.get(&key) {
                if o.commit != commit {
                    error!(%service, handoff, "asked to {} a hand-over already being {}: keeping the first outcome", op(commit), if o.commit { "committed" } else { "aborted" });
                }
                Err(o.done.clone())
            } else {
                let (tx, rx) = watch::channel(false);
                owed.insert(key.clone(), Owed { commit, done: rx });
                Ok(tx)
            }
        };
        let done = match mine {
            Ok(tx) => tx,
            Err(mut rx) => {
                let _ = rx.wait_for(|d| *d).await;
                return;
            }
        };
        let op = op(commit);
        let mut failures = 0u32;
        loop {
            let registered = self.registered.notified();
            if self.has(service) {
                let what = format!("{op} {handoff}");
                let answer = self.call(service, &what, 0, |id| Ok(json!({"id": id, "op": op, "handoff": handoff}).to_string())).await;
                match answer.and_then(|t| check_ok(&t).map_err(|e| anyhow!("the application for {service} answered {what}: {e}"))) {
                    Ok(()) => break,
                    Err(e) => {
                        failures += 1;
                        if failures == 1 || failures.is_multiple_of(30) {
                            warn!(%service, handoff, failures, "{op} not confirmed by the application yet: {e:#}; sending it again until it is (the application keeps the hand-over unfinished meanwhile)");
                        } else {
                            debug!(%service, handoff, failures, "{op} not confirmed yet: {e:#}");
                        }
                    }
                }
            }
            tokio::select! {
                () = registered => {}
                () = tokio::time::sleep(RETRY) => {}
            }
        }
        if failures > 0 {
            info!(%service, handoff, "the application confirmed the {op} at last");
        }
        self.owed.lock().expect("lock").remove(&key);
        let _ = done.send(true);
    }
}

fn op(commit: bool) -> &'static str {
    if commit { "commit" } else { "abort" }
}

/// Binds the hook socket at `path`: mode 0660 and owner `owner` from the moment it appears.
pub fn bind(path: &std::path::Path, owner: Option<(u32, u32)>) -> anyhow::Result<UnixListener> {
    let l = crate::sock::bind(path, 0o660, owner).with_context(|| format!("application hook {}", path.display()))?;
    l.set_nonblocking(true)?;
    UnixListener::from_std(l).with_context(|| format!("application hook {}", path.display()))
}

/// Serves the hook socket until the process ends.
pub async fn serve(apps: Arc<Apps>, listener: UnixListener) {
    let mut failures = crate::sock::AcceptFailures::default();
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                failures.reset();
                let apps = apps.clone();
                tokio::spawn(async move {
                    if let Err(e) = app_conn(apps, stream).await {
                        warn!("application connection closed: {e:#}");
                    }
                });
            }
            Err(e) => failures.wait("application connections", &e).await,
        }
    }
}

async fn app_conn(apps: Arc<Apps>, stream: UnixStream) -> anyhow::Result<()> {
    let (r, mut w) = stream.into_split();
    let mut r = BufReader::with_capacity(1 << 16, r);
    let received = AtomicU64::new(0);
    let mut buf = Vec::new();
    let first = tokio::time::timeout(REGISTER_TIMEOUT, read_line_capped(&mut r, &mut buf, || MAX_LINE, &received)).await;
    match first {
        Err(_) => bail!("no register line within {} s", REGISTER_TIMEOUT.as_secs()),
        Ok(Err(e)) => bail!("reading the register line: {e}"),
        Ok(Ok(false)) => bail!("closed before registering"),
        Ok(Ok(true)) => {}
    }
    let (service, pending) = match parse_register(&buf) {
        Ok(r) => r,
        Err(why) => {
            let _ = w.write_all(format!("{}\n", json!({"op": "error", "error": why})).as_bytes()).await;
            bail!("refused a registration: {why}");
        }
    };
    buf.clear();
    // The agent decides the hand-overs the application did not see end before it gets any
    // new request: their clients are not exported again meanwhile.
    let n_pending = pending.len();
    let (done_tx, done_rx) = oneshot::channel();
    if apps.registrations.send(Registration { service, pending, done: done_tx }).is_ok() && tokio::time::timeout(Duration::from_secs(10), done_rx).await.is_err() {
        warn!(%service, "the agent took over 10 s to look at the unfinished hand-overs of a registration; going on");
    }
    let (tx, mut rx) = mpsc::channel::<Out>(64);
    let conn = Arc::new(AppConn { tx, waiters: Mutex::default(), next: AtomicU64::new(1), received, export_room: AtomicUsize::new(0) });
    let old = apps.by_service.lock().expect("lock").insert(service, conn.clone());
    if let Some(old) = old {
        info!(%service, "a new registration replaces the application's previous connection");
        let _ = old.tx.try_send(Out::Close(json!({"op": "error", "error": "replaced by a newer registration of this service"}).to_string()));
        old.fail_all("replaced by a newer registration of this service");
    }
    w.write_all(format!("{}\n", json!({"op": "registered", "service": service.to_string(), "version": VERSION})).as_bytes()).await?;
    info!(%service, pending = n_pending, "application registered");
    apps.registered.notify_waiters();
    let writer = async move {
        while let Some(out) = rx.recv().await {
            match out {
                Out::Line(line) => {
                    w.write_all(line.as_bytes()).await?;
                    w.write_all(b"\n").await?;
                }
                Out::Close(line) => {
                    let _ = w.write_all(format!("{line}\n").as_bytes()).await;
                    let _ = w.shutdown().await;
                    return Ok(());
                }
            }
        }
        Ok::<(), anyhow::Error>(())
    };
    let reader = async {
        loop {
            let cap = || MAX_LINE.saturating_add(conn.export_room.load(Ordering::Relaxed));
            match read_line_capped(&mut r, &mut buf, cap, &conn.received).await {
                Ok(true) => {}
                Ok(false) => bail!("the application closed the hook"),
                Err(e) => {
                    conn.fail_all(&format!("it sent {e}: connection closed"));
                    bail!("the application sent {e}: closing its connection");
                }
            }
            let line = std::mem::take(&mut buf);
            // Only the id is read here; the requester parses the rest. A big line (an export
            // answer) takes a while to scan: off the async workers.
            let head = if line.len() > (1 << 20) { tokio::task::block_in_place(|| serde_json::from_slice::<Head>(&line)) } else { serde_json::from_slice::<Head>(&line) };
            let id = match head {
                Ok(Head { id: Some(id) }) => id.as_u64(),
                Ok(Head { id: None }) => None,
                Err(e) => {
                    error!(%service, "the application sent a line that is not a JSON object ({e}): {}; its outstanding requests fail", preview(&line));
                    conn.fail_all(&format!("it sent a line that is not a JSON object ({e})"));
                    continue;
                }
            };
            let Some(id) = id else {
                error!(%service, "the application sent a line without a numeric id: {}; its outstanding requests fail", preview(&line));
                conn.fail_all("it sent a line without a numeric id");
                continue;
            };
            let waiter = conn.waiters.lock().expect("lock").remove(&id);
            if let Some(w) = waiter {
                let _ = w.send(Ok(line));
            } else {
                warn!(%service, id, "the application answered a request that is not outstanding (answered too late?): ignored");
            }
        }
    };
    let result: anyhow::Result<()> = tokio::select! {
        r = writer => r,
        r = reader => r,
    };
    let mut map = apps.by_service.lock().expect("lock");
    if map.get(&service).is_some_and(|c| Arc::ptr_eq(c, &conn)) {
        map.remove(&service);
        info!(%service, "application unregistered (hook connection closed)");
    }
    drop(map);
    conn.fail_all("the connection closed");
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    fn a(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn export_answers_are_checked_against_the_request() {
        let req = [a("198.18.1.5"), a("198.18.1.9"), a("2001:db8::5")];
        let ok = br#"{"id":1,"ok":true,"sessions":[{"client":"198.18.1.5","blob":"eA=="},{"client":"::ffff:198.18.1.9","blob":""},{"client":"2001:DB8::5","blob":"eHk="}]}"#;
        let s = parse_export(ok, &req, 10).unwrap();
        assert_eq!(s.iter().map(|s| s.client).collect::<Vec<_>>(), req, "IPv4-mapped and upper-case forms are the same clients");
        assert_eq!(s[0].blob, b"x");
        assert!(parse_export(br#"{"id":1,"ok":true,"sessions":[]}"#, &req, 10).unwrap().is_empty());
        let err = |t: &[u8]| format!("{:#}", parse_export(t, &req, 10).unwrap_err());
        assert!(err(br#"{"id":1,"ok":true}"#).contains("no sessions list"));
        assert!(err(br#"{"id":1,"ok":true,"sessions":[{"client":"198.18.1.6","blob":""}]}"#).contains("198.18.1.6, which was not requested"));
        assert!(err(br#"{"id":1,"ok":true,"sessions":[{"client":"198.18.1.5","blob":""},{"client":"198.18.1.5","blob":"eA=="}]}"#).contains("two sessions for 198.18.1.5"));
        assert!(err(br#"{"id":1,"ok":true,"sessions":[{"client":"nobody","blob":""}]}"#).contains("not an address"));
        assert!(err(br#"{"id":1,"ok":true,"sessions":[{"client":"198.18.1.5"}]}"#).contains("lacks a client or a blob"));
        assert!(err(br#"{"id":1,"ok":true,"sessions":[{"client":"198.18.1.5","blob":"%%"}]}"#).contains("not base64"));
        assert!(err(br#"{"id":1,"ok":true,"sessions":[{"client":"198.18.1.5","blob":"eHl6eHl6eHl6eHl6"}]}"#).contains("over the limit"));
        assert!(err(b"not json").contains("malformed"));
        assert!(err(br#"{"id":1,"sessions":[]}"#).contains("without a boolean \"ok\""));
        assert!(err(br#"{"id":1,"ok":"yes","sessions":[]}"#).contains("without a boolean \"ok\""));
        assert!(err(br#"{"id":1,"ok":false,"error":"busy"}"#).contains("refused: busy"));
        assert_eq!(check_ok(br#"{"id":3,"ok":true}"#), Ok(()));
        assert!(check_ok(br#"{"id":3}"#).is_err());
    }

    #[test]
    fn registrations_need_a_version_and_well_formed_pending_hand_overs() {
        let (svc, p) = parse_register(br#"{"op":"register","service":"198.18.0.10:80","version":1}"#).unwrap();
        assert_eq!((svc, p.len()), ("198.18.0.10:80".parse().unwrap(), 0));
        let (_, p) = parse_register(
            br#"{"op":"register","service":"[2001:db8::10]:80","version":1,"pending":[{"handoff":"a/1/b","role":"export","clients":["::ffff:198.18.1.5"]},{"handoff":"c/2/a","role":"import","clients":[]}]}"#,
        )
        .unwrap();
        assert_eq!(p[0], PendingHandoff { handoff: "a/1/b".into(), role: Role::Export, clients: vec![a("198.18.1.5")] });
        assert_eq!(p[1].role, Role::Import);
        for (bad, why) in [
            (r#"{"op":"register","service":"198.18.0.10:80"}"#, "no version"),
            (r#"{"op":"register","service":"198.18.0.10:80","version":2}"#, "not 2"),
            (r#"{"op":"register","service":"198.18.0.10","version":1}"#, "not ADDRESS:PORT"),
            (r#"{"op":"hello","service":"198.18.0.10:80","version":1}"#, "expected op"),
            (r#"{"op":"register","service":"198.18.0.10:80","version":1,"pending":[{"handoff":"x","role":"both","clients":[]}]}"#, "neither"),
            (r#"{"op":"register","service":"198.18.0.10:80","version":1,"pending":[{"handoff":"x","role":"export"}]}"#, "malformed"),
            (r#"{"op":"register","service":"198.18.0.10:80","version":1,"servce":1}"#, "unknown field"),
        ] {
            let e = parse_register(bad.as_bytes()).unwrap_err();
            assert!(e.contains(why), "{bad}: {e}");
        }
    }

    #[test]
    fn time_grows_with_the_data() {
        let l = Limits { timeout: Duration::from_secs(2), per_mib_ms: 100, max_session_bytes: 3 };
        assert_eq!(l.allowance(0), Duration::from_secs(2));
        assert_eq!(l.allowance(10 << 20), Duration::from_secs(3));
        assert_eq!(l.allowance(u64::MAX), Duration::from_secs(2) + Duration::from_millis(u64::try_from(u128::from(u64::MAX) * 100 / MIB).unwrap()));
        let s = SessionBlob { client: a("198.18.1.5"), blob: vec![0; 3 << 20] };
        assert!(l.import_allowance([&s]) >= Duration::from_millis(2400), "4 MiB of base64: {:?}", l.import_allowance([&s]));
        assert_eq!(l.export_room(2), 2 * (4 + 128) + 4096);
    }

    #[tokio::test]
    async fn lines_are_capped_and_reading_is_cancel_safe() {
        let data: &[u8] = b"short\nthis line is too long\nnext\n";
        let mut r = BufReader::with_capacity(64, data);
        let (mut buf, n) = (Vec::new(), AtomicU64::new(0));
        assert!(read_line_capped(&mut r, &mut buf, || 10, &n).await.unwrap());
        assert_eq!(buf, b"short");
        buf.clear();
        let e = read_line_capped(&mut r, &mut buf, || 10, &n).await.unwrap_err();
        assert!(e.to_string().contains("over 10 bytes"), "{e}");
        let mut r = BufReader::with_capacity(4, &b"ab"[..]);
        buf.clear();
        assert!(!read_line_capped(&mut r, &mut buf, || 10, &n).await.unwrap(), "end of stream");
        assert_eq!(n.load(Ordering::Relaxed), 6 + 22 + 2);
    }
}
