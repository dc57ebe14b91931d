//! The application hook: a local Unix socket (mode 0660, owner configurable) the application
//! connects to. It registers its service (and reports the hand-overs it has not seen end),
//! then answers the agent's requests: export (freeze and return session blobs), import,
//! commit, abort. The protocol's messages and framing are `redirector-hook` (JSON lines;
//! version 2 sends session blobs as raw bytes after their line, version 3 passes open
//! connections' descriptors with lines), specified in docs/app-protocol.md; this module is
//! the agent's end of it.
//!
//! Applications never decide the outcome of a hand-over: commit and abort are retried until
//! the application confirms them, on every connection it makes, and the agent answers the
//! unfinished hand-overs an application reports when it registers.

use std::{
    collections::{HashMap, HashSet, VecDeque},
    net::{IpAddr, SocketAddr},
    os::fd::{AsFd as _, OwnedFd},
    pin::Pin,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context as _, anyhow, bail};
use redirector_hook::{
    AgentMsg, Answer, fds, frame,
    msg::WireConn,
    register::Register,
    session::{Listed, base64_len, lengths_to_wire, listed, raw_parts, to_wire},
};
pub use redirector_hook::{Role, Session, Version, parse_client, register::PendingHandoff};
use tokio::{
    io::{AsyncBufRead, AsyncBufReadExt as _, AsyncRead, AsyncReadExt as _, AsyncWriteExt as _, BufReader, Interest, ReadBuf},
    net::{UnixListener, UnixStream, unix::OwnedReadHalf},
    sync::{Notify, mpsc, oneshot, watch},
};
use tracing::{debug, error, info, warn};

mod served;

pub use served::Peer;
use served::{RECONNECT_WAIT, Served};

/// Longest line accepted from an application, except an export answer, which may also take
/// its sessions' room (see [`Limits::export_room`]).
pub const MAX_LINE: usize = 16 << 20;

/// How long an application has to send its register line once connected.
pub const REGISTER_TIMEOUT: Duration = Duration::from_secs(5);

/// How often a commit or abort the application has not confirmed is sent again while it is
/// connected (it is also sent at once when it registers again).
const RETRY: Duration = Duration::from_secs(1);

const MIB: u128 = 1 << 20;

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

    /// Time a volunteer gives its application to import sessions of `blob_lens` bytes (the
    /// same on both sides, whatever version the application speaks: the origin waits this,
    /// plus its negotiation timeout, for the acknowledgement).
    #[must_use]
    pub fn import_allowance(&self, blob_lens: impl IntoIterator<Item = usize>) -> Duration {
        self.allowance(import_line_len(blob_lens))
    }

    /// Extra length an export answer for `clients` clients may take, in its line and (version
    /// 2) in the raw bytes after it: each at most the room of version 1's base64.
    #[must_use]
    pub fn export_room(&self, clients: usize) -> usize {
        clients.saturating_mul(base64_len(self.max_session_bytes).saturating_add(128)).saturating_add(4096)
    }
}

/// About the length of a version 1 import line of sessions of `blob_lens` bytes (version 2's
/// is shorter: the allowance is the same for both).
pub fn import_line_len(blob_lens: impl IntoIterator<Item = usize>) -> u64 {
    let n = blob_lens.into_iter().fold(128usize, |sum, len| sum.saturating_add(base64_len(len)).saturating_add(72));
    u64::try_from(n).unwrap_or(u64::MAX)
}

/// The raw bytes of version 2 export answers travel from the connection's reader to the
/// exporting hand-over in pieces of this size at most, a few at a time: they go on to the
/// sibling while the application is still writing, and never sit in memory all at once.
const PIECE: usize = 1 << 16;

/// Pieces read ahead of the hand-over that takes them.
const PIECES_AHEAD: usize = 16;

/// The raw bytes after an answer's line: all of them, or (an export answer) a stream of
/// pieces that ends early if the connection breaks.
enum Raw {
    Whole(Vec<u8>),
    Stream(mpsc::Receiver<std::io::Result<Vec<u8>>>),
}

/// An answer to a request (its line, the raw bytes after it and the descriptors that came
/// with it), or why there is none.
type Reply = Result<(Vec<u8>, Raw, Vec<OwnedFd>), String>;

/// An open TCP connection going between the agent and an application (version 3): handed
/// over with an export, or given with a commit or an abort. `blob` is the application's own
/// state of it, opaque here.
pub struct AppConnection {
    pub client: IpAddr,
    pub fd: OwnedFd,
    pub blob: Vec<u8>,
}

/// The hook connection's reading half (version 3): every descriptor that comes with its bytes
/// is kept, in arrival order, for the line that announces it.
struct FdRead {
    half: OwnedReadHalf,
    fds: Arc<Mutex<VecDeque<OwnedFd>>>,
}

impl AsyncRead for FdRead {
    fn poll_read(self: Pin<&mut Self>, cx: &mut std::task::Context<'_>, buf: &mut ReadBuf<'_>) -> std::task::Poll<std::io::Result<()>> {
        let me = self.get_mut();
        loop {
            std::task::ready!(me.half.as_ref().poll_read_ready(cx))?;
            let unfilled = buf.initialize_unfilled();
            let (sock, queue) = (me.half.as_ref(), &me.fds);
            let got = sock.try_io(Interest::READABLE, || {
                let mut q = queue.lock().expect("lock");
                fds::recv_some(sock.as_fd(), unfilled, &mut q)
            });
            match got {
                Ok(n) => {
                    buf.advance(n);
                    return std::task::Poll::Ready(Ok(()));
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(e) => return std::task::Poll::Ready(Err(e)),
            }
        }
    }
}

/// The raw bytes after a request's line (version 2 blobs, written as they are, not copied
/// into one buffer first).
enum Body {
    Blobs(Vec<Vec<u8>>),
    /// `total` bytes, as they come: if they stop coming before that, zeros make up the rest
    /// (the connection stays framed; the hand-over aborts the import).
    Stream(u64, mpsc::Receiver<Vec<u8>>),
}

impl Body {
    fn len(&self) -> u64 {
        match self {
            Body::Blobs(b) => b.iter().fold(0u64, |n, b| n.saturating_add(u64::try_from(b.len()).unwrap_or(u64::MAX))),
            Body::Stream(total, _) => *total,
        }
    }
}

/// Who waits for the answer to a request, and whether it takes the raw bytes as a stream.
struct Waiter {
    reply: oneshot::Sender<Reply>,
    stream: bool,
}

/// A message to an application: its line (with the descriptors that pass with it), then its
/// raw bytes.
struct Out(Vec<u8>, Body, Vec<OwnedFd>);

struct AppConn {
    /// The version the application registered with.
    version: Version,
    tx: mpsc::Sender<Out>,
    waiters: Mutex<HashMap<u64, Waiter>>,
    next: AtomicU64,
    /// Bytes received from the application so far: progress that extends deadlines.
    received: AtomicU64,
    /// Room in the line limit for the export answers outstanding.
    export_room: AtomicUsize,
    /// Descriptors received, not taken by a line yet.
    fds: Arc<Mutex<VecDeque<OwnedFd>>>,
}

impl AppConn {
    fn fail_all(&self, why: &str) {
        for (_, w) in self.waiters.lock().expect("lock").drain() {
            let _ = w.reply.send(Err(why.to_string()));
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
    /// The services applications may register: this node's own.
    services: HashSet<SocketAddr>,
    served: Served,
    owed: Mutex<HashMap<(SocketAddr, String), Owed>>,
    /// Woken on every registration.
    registered: Notify,
    registrations: mpsc::UnboundedSender<Registration>,
    limits: Limits,
}

/// An export answer's line, checked: its sessions as the line lists them (version 2: their
/// blobs are the raw bytes after it, in order), and (version 3) the connections it hands over,
/// each client with the length of its blob (after the sessions' among the raw bytes).
pub struct CheckedExport {
    pub sessions: Vec<(IpAddr, Listed)>,
    pub connections: Vec<(IpAddr, usize)>,
}

/// Checks an export answer's line against the request: sessions (possibly none) for
/// requested clients only, each once, of at most `max` bytes; connections (version 3, only
/// when asked for) of requested clients, one descriptor each, blobs of at most `max` bytes.
/// Public for the fuzz targets (`fuzz/`).
pub fn check_export(line: &[u8], version: Version, requested: &[IpAddr], max: usize) -> anyhow::Result<CheckedExport> {
    let a = Answer::parse(line).map_err(|e| anyhow!("{e}"))?;
    let list = a.sessions.ok_or_else(|| anyhow!("the export answer has no sessions list (required, even when empty)"))?;
    let requested: HashSet<IpAddr> = requested.iter().copied().collect();
    let mut connections = Vec::new();
    let mut conn_bytes = 0u64;
    for (i, c) in a.connections.unwrap_or_default().into_iter().enumerate() {
        if !version.moves_connections() {
            bail!("connections in an export answer of version {}: only version 3 moves them", version.number());
        }
        let client = parse_client(&c.client).ok_or_else(|| anyhow!("connection #{i} is for {:?}, not an address", c.client))?;
        if !requested.contains(&client) {
            bail!("the application handed over a connection of {client}, which was not requested");
        }
        let len = usize::try_from(c.len)
            .ok()
            .filter(|l| *l <= max)
            .ok_or_else(|| anyhow!("the blob of a connection of {client} is over the limit of {max} bytes (max_session_bytes)"))?;
        conn_bytes = conn_bytes.saturating_add(c.len);
        connections.push((client, len));
    }
    if a.fds != u64::try_from(connections.len()).unwrap_or(u64::MAX) {
        bail!("the export answer lists {} connections and passes {} descriptors", connections.len(), a.fds);
    }
    let bytes = a.bytes.checked_sub(conn_bytes).ok_or_else(|| anyhow!("the connections' blobs add up to more than the {} bytes announced", a.bytes))?;
    let sessions = listed(list, bytes, version, max).map_err(|e| anyhow!("{e}"))?;
    let mut seen = HashSet::with_capacity(sessions.len());
    for (client, _) in &sessions {
        if !requested.contains(client) {
            bail!("the application exported a session for {client}, which was not requested");
        }
        if !seen.insert(*client) {
            bail!("the application exported two sessions for {client}");
        }
    }
    Ok(CheckedExport { sessions, connections })
}

/// An application's answer to an export: the sessions it lists, in order, whose blobs
/// (version 2) may still be on their way from the application.
pub struct Exported {
    service: SocketAddr,
    what: String,
    listed: VecDeque<(IpAddr, Listed)>,
    /// The raw bytes at hand, read up to `at`.
    piece: Vec<u8>,
    at: usize,
    /// The rest of them, as the connection's reader gets them.
    pieces: Option<mpsc::Receiver<std::io::Result<Vec<u8>>>>,
    /// How long the application may stop sending in the middle of its sessions.
    stall: Duration,
    /// The connections it handed over (version 3): each client and its blob's length (the
    /// raw bytes after the sessions'), and their descriptors, in order.
    conns: Vec<(IpAddr, usize)>,
    fds: Vec<OwnedFd>,
}

impl Exported {
    /// The service whose application exported.
    #[must_use]
    pub fn service(&self) -> SocketAddr {
        self.service
    }

    /// The sessions still to come: each client and the length of its blob.
    pub fn sizes(&self) -> impl Iterator<Item = (IpAddr, usize)> + '_ {
        self.listed.iter().map(|(c, l)| (*c, listed_len(l)))
    }

    /// The next sessions, in order, as many as fit in `budget` bytes (each counted with 64
    /// bytes for its address and framing; at least one); `None` once all were taken.
    pub async fn next_batch(&mut self, budget: usize) -> anyhow::Result<Option<Vec<Session>>> {
        let mut batch = Vec::new();
        let mut size = 0usize;
        while let Some((_, l)) = self.listed.front() {
            let len = listed_len(l).saturating_add(64);
            if !batch.is_empty() && size.saturating_add(len) > budget {
                break;
            }
            size = size.saturating_add(len);
            let Some((client, l)) = self.listed.pop_front() else { break };
            let blob = match l {
                Listed::Blob(b) => b,
                Listed::Len(n) => self.take(n).await?,
            };
            batch.push(Session { client, blob });
        }
        Ok(if batch.is_empty() { None } else { Some(batch) })
    }

    /// The connections handed over (version 3), each client with its socket, in order: at
    /// once, before the sessions' bytes are in (their blobs come after those).
    pub fn take_sockets(&mut self) -> Vec<(IpAddr, OwnedFd)> {
        self.conns.iter().map(|c| c.0).zip(std::mem::take(&mut self.fds)).collect()
    }

    /// The blobs of the connections handed over, in order: once every session was taken.
    pub async fn connection_blobs(&mut self) -> anyhow::Result<Vec<Vec<u8>>> {
        let lens: Vec<usize> = self.conns.iter().map(|c| c.1).collect();
        let mut out = Vec::with_capacity(lens.len());
        for n in lens {
            out.push(self.take(n).await?);
        }
        Ok(out)
    }

    /// The next `n` raw bytes.
    async fn take(&mut self, n: usize) -> anyhow::Result<Vec<u8>> {
        let mut blob = Vec::with_capacity(n);
        while blob.len() < n {
            if self.at == self.piece.len() {
                let (service, what) = (self.service, &self.what);
                // The lengths add up to the raw bytes the reader frames: a whole answer has them all.
                let Some(rx) = self.pieces.as_mut() else { bail!("the application for {service} answered {what} with fewer raw bytes than it listed") };
                self.piece = match tokio::time::timeout(self.stall, rx.recv()).await {
                    Err(_) => bail!("the application for {service} stopped sending the sessions of {what} for {} ms", self.stall.as_millis()),
                    Ok(None) => bail!("the application for {service} went away in the middle of the sessions of {what}"),
                    Ok(Some(Err(e))) => bail!("reading the sessions of {what} from the application for {service}: {e}"),
                    Ok(Some(Ok(p))) => p,
                };
                self.at = 0;
            }
            let k = (n - blob.len()).min(self.piece.len() - self.at);
            blob.extend_from_slice(&self.piece[self.at..self.at + k]);
            self.at += k;
        }
        Ok(blob)
    }
}

/// An import whose sessions are on their way ([`Apps::import_stream`]): the application has
/// its line (version 2) and takes the blobs as they are pushed; a version 1 application gets
/// the whole import once every blob is here (its line holds them).
pub struct Importing {
    inner: Streaming,
}

enum Streaming {
    Stream { sink: mpsc::Sender<Vec<u8>>, answer: tokio::task::JoinHandle<anyhow::Result<()>> },
    Gather { apps: Arc<Apps>, service: SocketAddr, handoff: String, listed: Vec<(IpAddr, usize)>, blobs: Vec<Vec<u8>> },
}

impl Importing {
    /// The next session's blob, in the order listed. An error: the import failed (its answer
    /// says why once [`Importing::finish`] is called).
    pub async fn push(&mut self, blob: Vec<u8>) -> Result<(), ()> {
        match &mut self.inner {
            Streaming::Stream { sink, .. } => sink.send(blob).await.map_err(drop),
            Streaming::Gather { blobs, .. } => {
                blobs.push(blob);
                Ok(())
            }
        }
    }

    /// Every blob was pushed: waits for the application's answer. (Dropped before that, the
    /// import is padded with zeros to its announced length; the hand-over aborts it.)
    pub async fn finish(self) -> anyhow::Result<()> {
        match self.inner {
            Streaming::Stream { sink, answer } => {
                drop(sink);
                answer.await.map_err(|e| anyhow!("import task: {e}"))?
            }
            Streaming::Gather { apps, service, handoff, listed, blobs } => {
                if blobs.len() != listed.len() {
                    bail!("{} of the {} sessions listed arrived", blobs.len(), listed.len());
                }
                let sessions = listed.into_iter().zip(blobs).map(|((client, _), blob)| Session { client, blob }).collect();
                apps.import(service, &handoff, sessions).await
            }
        }
    }
}

fn listed_len(l: &Listed) -> usize {
    match l {
        Listed::Blob(b) => b.len(),
        Listed::Len(n) => *n,
    }
}

/// The import request `id` of `sessions`: its line, and the blobs that follow it (version 2).
fn import_message(id: u64, handoff: &str, sessions: Vec<Session>, version: Version) -> (Vec<u8>, Vec<Vec<u8>>) {
    let (list, bytes) = to_wire(sessions.iter().map(|s| (s.client, s.blob.as_slice())), version);
    let line = message(&AgentMsg::Import { id, handoff: handoff.to_string(), bytes, sessions: list });
    (line, raw_parts(sessions.into_iter().map(|s| s.blob), version))
}

/// One line of an agent's message, ready to send.
fn message(msg: &AgentMsg) -> Vec<u8> {
    frame::line(msg)
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

/// Reads the `n` raw bytes that follow a line (version 2), counting them as progress. Once
/// the reader's buffer is drained, the bytes go straight from the socket into the result (one
/// copy, no zeroing first).
async fn read_raw<R: AsyncBufRead + Unpin>(r: &mut R, n: usize, received: &AtomicU64) -> std::io::Result<Vec<u8>> {
    let mut raw = Vec::with_capacity(n);
    while raw.len() < n {
        let want = u64::try_from(n - raw.len()).unwrap_or(u64::MAX);
        let got = (&mut *r).take(want).read_buf(&mut raw).await?;
        if got == 0 {
            return Err(std::io::Error::new(std::io::ErrorKind::UnexpectedEof, format!("the connection closed after {} of {n} raw bytes", raw.len())));
        }
        received.fetch_add(u64::try_from(got).unwrap_or(u64::MAX), Ordering::Relaxed);
    }
    Ok(raw)
}

impl Apps {
    /// The hook's registry for applications of `services`; registrations (with the
    /// hand-overs they report unfinished) come out of the receiver, for the agent to decide.
    #[must_use]
    pub fn new(limits: Limits, services: impl IntoIterator<Item = SocketAddr>) -> (Arc<Self>, mpsc::UnboundedReceiver<Registration>) {
        let (tx, rx) = mpsc::unbounded_channel();
        let apps = Self { services: services.into_iter().collect(), served: Served::default(), owed: Mutex::default(), registered: Notify::new(), registrations: tx, limits };
        (Arc::new(apps), rx)
    }

    /// Whether an application registered for `service`.
    #[must_use]
    pub fn has(&self, service: SocketAddr) -> bool {
        self.served.conn(service).is_some()
    }

    /// The process of the application registered for `service` (where its listening socket
    /// most likely is), if the kernel said.
    #[must_use]
    pub fn holder(&self, service: SocketAddr) -> Option<i32> {
        self.served.peer(service)?.pid
    }

    /// Whether the application registered for `service` speaks a hook version that passes
    /// open connections (3 and later).
    #[must_use]
    pub fn takes_connections(&self, service: SocketAddr) -> bool {
        self.conn(service).is_some_and(|c| c.version.moves_connections())
    }

    #[must_use]
    pub fn limits(&self) -> Limits {
        self.limits
    }

    /// Services with an application registered, and how many commits or aborts are not
    /// confirmed yet: for the status.
    #[must_use]
    pub fn status(&self) -> (Vec<String>, usize) {
        let mut services: Vec<String> = self.served.ready().iter().map(|(s, _)| s.to_string()).collect();
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
        self.served.conn(service)
    }

    /// Sends the request `make(id)` and waits for its answer: `allowance` of the line's size
    /// from now, extended by the answer's progress. `room`: extra line length its answer may
    /// take; `stream`: its raw bytes come as a stream, once its line is here.
    async fn call(
        &self,
        service: SocketAddr,
        what: &str,
        room: usize,
        stream: bool,
        make: impl FnOnce(u64, Version) -> Out,
    ) -> anyhow::Result<(Vec<u8>, Raw, Version, Vec<OwnedFd>)> {
        let conn = self.conn(service).ok_or_else(|| anyhow!("no application registered for {service}"))?;
        let id = conn.next.fetch_add(1, Ordering::Relaxed);
        let Out(line, body, passed) = make(id, conn.version);
        let (tx, rx) = oneshot::channel();
        conn.waiters.lock().expect("lock").insert(id, Waiter { reply: tx, stream });
        conn.export_room.fetch_add(room, Ordering::Relaxed);
        let _guard = WaiterGuard { conn: &conn, id, room };
        let start = Instant::now();
        let received0 = conn.received.load(Ordering::Relaxed);
        let size = u64::try_from(line.len()).unwrap_or(u64::MAX).saturating_add(body.len());
        let allowance = self.limits.allowance(size);
        let gone = || anyhow!("the application for {service} disconnected");
        // Queueing the request counts against the time too: an application that stops reading
        // never holds the agent up.
        let exchange = async {
            conn.tx.send(Out(line, body, passed)).await.map_err(|_| gone())?;
            rx.await.map_err(|_| gone())?.map_err(|e| anyhow!("the application for {service}: {e}"))
        };
        tokio::pin!(exchange);
        let (text, raw, fds) = loop {
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
        Ok((text, raw, conn.version, fds))
    }

    /// Exports (and freezes) the sessions of `clients`; checks the answer's line against the
    /// request. The blobs follow as the caller takes them ([`Exported::next_batch`]): a big
    /// export goes on to a sibling while the application is still sending it.
    /// With `connections` (and an application of version 3), it also hands over those
    /// clients' idle open connections ([`Exported::take_sockets`]).
    pub async fn export(&self, service: SocketAddr, handoff: &str, clients: &[IpAddr], connections: bool) -> anyhow::Result<Exported> {
        let names: Vec<String> = clients.iter().map(ToString::to_string).collect();
        let room = self.limits.export_room(clients.len());
        let what = format!("export {handoff}");
        let (text, raw, version, fds) = self
            .call(service, &what, room, true, |id, version| {
                let connections = connections && version.moves_connections();
                Out(message(&AgentMsg::Export { id, handoff: handoff.to_string(), clients: names, connections }), Body::Blobs(Vec::new()), Vec::new())
            })
            .await?;
        let (requested, max) = (clients.to_vec(), self.limits.max_session_bytes);
        // A version 1 answer (possibly hundreds of MiB of base64) is decoded on a blocking thread.
        let checked = tokio::task::spawn_blocking(move || check_export(&text, version, &requested, max))
            .await
            .map_err(|e| anyhow!("checking the export: {e}"))?
            .map_err(|e| anyhow!("the application for {service} answered {what}: {e:#}"))?;
        if !connections && !checked.connections.is_empty() {
            bail!("the application for {service} answered {what} with connections, which were not asked for");
        }
        let (piece, pieces) = match raw {
            Raw::Whole(r) => (r, None),
            Raw::Stream(rx) => (Vec::new(), Some(rx)),
        };
        let stall = self.limits.allowance(u64::try_from(PIECE).unwrap_or(u64::MAX));
        Ok(Exported { service, what, listed: checked.sessions.into(), piece, at: 0, pieces, stall, conns: checked.connections, fds })
    }

    /// Imports sessions moved here (tentatively, until [`Apps::settle`]). The message is
    /// encoded in place of the async worker (`block_in_place`: a multi-threaded runtime only).
    pub async fn import(&self, service: SocketAddr, handoff: &str, sessions: Vec<Session>) -> anyhow::Result<()> {
        let what = format!("import {handoff}");
        let (text, ..) = self
            .call(service, &what, 0, false, |id, version| {
                let (line, blobs) = tokio::task::block_in_place(|| import_message(id, handoff, sessions, version));
                Out(line, Body::Blobs(blobs), Vec::new())
            })
            .await?;
        Answer::parse(&text).map(drop).map_err(|e| anyhow!("the application for {service} answered {what}: {e}"))
    }

    /// Starts importing (tentatively, until [`Apps::settle`]) the sessions `listed` (each
    /// client and the length of its blob) into the application of `service`: in version 2 the
    /// import's line goes out now and the blobs follow as they are pushed, so a big import
    /// reaches the application while it is still arriving here.
    pub fn import_stream(self: &Arc<Self>, service: SocketAddr, handoff: &str, listed: Vec<(IpAddr, usize)>) -> anyhow::Result<Importing> {
        let conn = self.conn(service).ok_or_else(|| anyhow!("no application registered for {service}"))?;
        if conn.version == Version::V1 {
            let blobs = Vec::with_capacity(listed.len());
            return Ok(Importing { inner: Streaming::Gather { apps: self.clone(), service, handoff: handoff.to_string(), listed, blobs } });
        }
        let (sink, rx) = mpsc::channel(PIECES_AHEAD);
        let (apps, handoff) = (self.clone(), handoff.to_string());
        let answer = tokio::spawn(async move {
            let what = format!("import {handoff}");
            let (list, total) = lengths_to_wire(listed.iter().map(|(client, len)| (*client, u64::try_from(*len).unwrap_or(u64::MAX))));
            let (text, ..) = apps
                .call(service, &what, 0, false, |id, _| {
                    Out(message(&AgentMsg::Import { id, handoff: handoff.clone(), bytes: total, sessions: list }), Body::Stream(total, rx), Vec::new())
                })
                .await?;
            Answer::parse(&text).map(drop).map_err(|e| anyhow!("the application for {service} answered {what}: {e}"))
        });
        Ok(Importing { inner: Streaming::Stream { sink, answer } })
    }

    /// Tells the application of `service` that hand-over `handoff` committed (`true`) or
    /// aborted, until it confirms: sent again every second while it is connected and whenever
    /// it registers again. Returns once confirmed. A second call for the same hand-over waits
    /// for the first one's delivery.
    pub async fn settle(&self, service: SocketAddr, handoff: &str, commit: bool) {
        self.settle_with(service, handoff, commit, Vec::new()).await;
    }

    /// [`Apps::settle`], giving the application `conns` with the outcome (version 3): moved
    /// here, or given back. They go with the first delivery only: if it is not confirmed
    /// (the connection dropped, the application is older), they are closed.
    pub async fn settle_with(&self, service: SocketAddr, handoff: &str, commit: bool, conns: Vec<AppConnection>) {
        let mut conns = Some(conns).filter(|c| !c.is_empty());
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
                if let Some(c) = conns.take() {
                    warn!(%service, handoff, connections = c.len(), "an outcome already on its way: closing the connections that came with this one");
                }
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
                let name = handoff.to_string();
                let given = conns.take();
                let request = |id, version: Version| {
                    let given = given.unwrap_or_default();
                    if !given.is_empty() && !version.moves_connections() {
                        warn!(%service, handoff = %name, connections = given.len(), "the application speaks hook protocol version {}: closing the connections it cannot be given", version.number());
                        return Out(message(&AgentMsg::outcome(id, name, commit, Vec::new())), Body::Blobs(Vec::new()), Vec::new());
                    }
                    let list = given.iter().map(|c| WireConn { client: c.client.to_string(), len: u64::try_from(c.blob.len()).unwrap_or(u64::MAX) }).collect();
                    let (fds, blobs): (Vec<OwnedFd>, Vec<Vec<u8>>) = given.into_iter().map(|c| (c.fd, c.blob)).unzip();
                    Out(message(&AgentMsg::outcome(id, name, commit, list)), Body::Blobs(blobs), fds)
                };
                let answer = self.call(service, &what, 0, false, request).await;
                match answer.and_then(|(t, ..)| Answer::parse(&t).map_err(|e| anyhow!("the application for {service} answered {what}: {e}"))) {
                    Ok(_) => break,
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
    let peer = Peer::of(&stream);
    let who = peer.map_or_else(|| "credentials unknown".to_string(), |p| p.to_string());
    let (r, w) = stream.into_split();
    // Small blobs of an import go out together, big ones straight through.
    let mut w = tokio::io::BufWriter::with_capacity(1 << 18, w);
    let fds = Arc::new(Mutex::new(VecDeque::new()));
    let mut r = BufReader::with_capacity(1 << 16, FdRead { half: r, fds: fds.clone() });
    let received = AtomicU64::new(0);
    let mut buf = Vec::new();
    let first = tokio::time::timeout(REGISTER_TIMEOUT, read_line_capped(&mut r, &mut buf, || MAX_LINE, &received)).await;
    match first {
        Err(_) => bail!("no register line within {} s", REGISTER_TIMEOUT.as_secs()),
        Ok(Err(e)) => bail!("reading the register line: {e}"),
        Ok(Ok(false)) => bail!("closed before registering"),
        Ok(Ok(true)) => {}
    }
    let refuse = async |w: &mut tokio::io::BufWriter<_>, why: String| {
        let _ = w.write_all(&message(&AgentMsg::Error { error: why.clone() })).await;
        let _ = w.flush().await;
        anyhow!("refused a registration ({who}): {why}")
    };
    let (service, version, pending) = match Register::parse(&buf) {
        Ok(r) => (r.service, r.version, r.pending),
        Err(why) => return Err(refuse(&mut w, why).await),
    };
    buf.clear();
    if !apps.services.contains(&service) {
        let mut ours: Vec<String> = apps.services.iter().map(ToString::to_string).collect();
        ours.sort();
        return Err(refuse(&mut w, format!("{service} is not a service of this node (its services: {})", ours.join(", "))).await);
    }
    let hold = match apps.served.hold(service, peer, RECONNECT_WAIT).await {
        Ok(h) => h,
        Err(taken) => return Err(refuse(&mut w, format!("{service} is {taken}")).await),
    };
    // The agent decides the hand-overs the application did not see end before it gets any
    // new request: their clients are not exported again meanwhile.
    let n_pending = pending.len();
    let (done_tx, done_rx) = oneshot::channel();
    if apps.registrations.send(Registration { service, pending, done: done_tx }).is_ok() && tokio::time::timeout(Duration::from_secs(10), done_rx).await.is_err() {
        warn!(%service, "the agent took over 10 s to look at the unfinished hand-overs of a registration; going on");
    }
    let (tx, rx) = mpsc::channel::<Out>(64);
    let conn = Arc::new(AppConn { version, tx, waiters: Mutex::default(), next: AtomicU64::new(1), received, export_room: AtomicUsize::new(0), fds });
    // Ready before the application hears it is registered (it may ask the agent at once);
    // requests queued meanwhile go out after this line.
    hold.ready(conn.clone());
    w.write_all(&message(&AgentMsg::Registered { service: service.to_string(), version: version.number() })).await?;
    w.flush().await?;
    info!(%service, pending = n_pending, version = version.number(), peer = who, "application registered");
    apps.registered.notify_waiters();
    let writer = write_out(w, rx);
    let reader = async {
        loop {
            let Some((id, line, raw, fds)) = read_answer(&mut r, &mut buf, &conn, service).await? else { continue };
            let waiter = conn.waiters.lock().expect("lock").remove(&id);
            if let Some(w) = waiter {
                let _ = w.reply.send(Ok((line, raw, fds)));
            } else {
                warn!(%service, id, "the application answered a request that is not outstanding (answered too late?): ignored");
            }
        }
    };
    let result: anyhow::Result<()> = tokio::select! {
        r = writer => r,
        r = reader => r,
    };
    drop(hold);
    info!(%service, peer = who, "application unregistered (hook connection closed)");
    conn.fail_all("the connection closed");
    result
}

/// Writes what is queued for an application, in order.
async fn write_out(mut w: tokio::io::BufWriter<tokio::net::unix::OwnedWriteHalf>, mut rx: mpsc::Receiver<Out>) -> anyhow::Result<()> {
    while let Some(Out(line, body, passed)) = rx.recv().await {
        if passed.is_empty() {
            w.write_all(&line).await?;
        } else {
            // The descriptors go with the line's own bytes, straight to the socket after what
            // is buffered; ours are closed once they passed.
            w.flush().await?;
            send_with_fds(w.get_ref().as_ref(), &line, &passed).await?;
        }
        match body {
            Body::Blobs(blobs) => {
                for b in &blobs {
                    w.write_all(b).await?;
                }
            }
            Body::Stream(total, mut rx) => {
                let mut left = usize::try_from(total).unwrap_or(usize::MAX);
                while left > 0 {
                    if let Some(b) = rx.recv().await {
                        let n = b.len().min(left);
                        w.write_all(&b[..n]).await?;
                        left -= n;
                    } else {
                        let zeros = vec![0u8; left.min(PIECE)];
                        while left > 0 {
                            let n = left.min(zeros.len());
                            w.write_all(&zeros[..n]).await?;
                            left -= n;
                        }
                    }
                }
            }
        }
        w.flush().await?;
    }
    Ok(())
}

/// Writes `line` to `sock` with `passed` attached to its bytes, one to each `sendmsg`: the
/// application may be Node.js, which takes one per read.
async fn send_with_fds(sock: &UnixStream, line: &[u8], passed: &[OwnedFd]) -> std::io::Result<()> {
    let borrowed: Vec<std::os::fd::BorrowedFd<'_>> = passed.iter().map(std::os::fd::AsFd::as_fd).collect();
    let (mut at, mut left) = (0usize, &borrowed[..]);
    while at < line.len() {
        sock.writable().await?;
        match sock.try_io(Interest::WRITABLE, || fds::send_some(sock.as_fd(), &line[at..], &mut left, fds::ONE_PER_SEND)) {
            Ok(n) => at += n,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(e),
        }
    }
    if left.is_empty() { Ok(()) } else { Err(std::io::Error::other("a line too short to carry its descriptors")) }
}

/// Reads the application's next message: its id, line, raw bytes and descriptors. `None`: a
/// line the connection survives but that answers nothing (it failed the outstanding
/// requests), or an answer already delivered with its raw bytes as a stream; an error: the
/// connection cannot go on (it failed them too).
async fn read_answer<R: AsyncBufRead + Unpin>(r: &mut R, buf: &mut Vec<u8>, conn: &AppConn, service: SocketAddr) -> anyhow::Result<Option<(u64, Vec<u8>, Raw, Vec<OwnedFd>)>> {
    let cap = || MAX_LINE.saturating_add(conn.export_room.load(Ordering::Relaxed));
    match read_line_capped(r, buf, cap, &conn.received).await {
        Ok(true) => {}
        Ok(false) => bail!("the application closed the hook"),
        Err(e) => {
            conn.fail_all(&format!("it sent {e}: connection closed"));
            bail!("the application sent {e}: closing its connection");
        }
    }
    let line = std::mem::take(buf);
    // Only the id and the raw bytes' count are read here; the requester parses the rest. A
    // big line (a version 1 export answer) takes a while to scan: off the async workers.
    let head = if line.len() > (1 << 20) { tokio::task::block_in_place(|| frame::Head::parse(&line)) } else { frame::Head::parse(&line) };
    let head = match head {
        Ok(h) => h,
        Err(e) if conn.version == Version::V1 => {
            error!(%service, "the application sent {e}: {}; its outstanding requests fail", frame::preview(&line));
            conn.fail_all(&format!("it sent {e}"));
            return Ok(None);
        }
        Err(e) => {
            // Version 2: whether raw bytes follow is unknown, the stream cannot be read further.
            error!(%service, "the application sent {e}: {}; closing its connection", frame::preview(&line));
            conn.fail_all(&format!("it sent {e}: connection closed"));
            bail!("the application sent {e}: closing its connection");
        }
    };
    // The line's descriptors came with its bytes: they are in by now.
    let passed = match fds::take(&mut conn.fds.lock().expect("lock"), head.fds) {
        Ok(p) => p,
        Err(e) => {
            error!(%service, "the application sent {e}: closing its connection");
            conn.fail_all(&format!("it sent {e}: connection closed"));
            bail!("the application sent {e}: closing its connection");
        }
    };
    let raw = if conn.version == Version::V1 || head.bytes == 0 {
        Vec::new()
    } else {
        let cap = conn.export_room.load(Ordering::Relaxed);
        let n = usize::try_from(head.bytes).unwrap_or(usize::MAX);
        if n > cap {
            conn.fail_all(&format!("it announced {n} raw bytes, over the {cap} its outstanding exports may take: connection closed"));
            bail!("the application announced {n} raw bytes, over the {cap} its outstanding exports may take: closing its connection");
        }
        // An export's sessions go to the hand-over as they arrive.
        let streamed = head.id.and_then(|id| {
            let mut waiters = conn.waiters.lock().expect("lock");
            if waiters.get(&id).is_some_and(|w| w.stream) { waiters.remove(&id) } else { None }
        });
        if let Some(w) = streamed {
            let (tx, rx) = mpsc::channel(PIECES_AHEAD);
            let _ = w.reply.send(Ok((line, Raw::Stream(rx), passed)));
            if let Err(e) = stream_raw(r, n, &tx, &conn.received).await {
                let why = format!("reading its raw bytes: {e}");
                let _ = tx.try_send(Err(e));
                conn.fail_all(&why);
                bail!("reading the application's raw bytes: {why}");
            }
            return Ok(None);
        }
        match read_raw(r, n, &conn.received).await {
            Ok(raw) => raw,
            Err(e) => {
                conn.fail_all(&format!("reading its raw bytes: {e}"));
                bail!("reading the application's raw bytes: {e}");
            }
        }
    };
    let Some(id) = head.id else {
        error!(%service, "the application sent a line without a numeric id: {}; its outstanding requests fail", frame::preview(&line));
        conn.fail_all("it sent a line without a numeric id");
        return Ok(None);
    };
    Ok(Some((id, line, Raw::Whole(raw), passed)))
}

/// Reads the `n` raw bytes that follow a line into pieces for `tx`, counting them as
/// progress; once `tx`'s receiver is gone (the hand-over failed), the rest is read and
/// dropped, so the connection stays framed.
async fn stream_raw<R: AsyncBufRead + Unpin>(r: &mut R, n: usize, tx: &mpsc::Sender<std::io::Result<Vec<u8>>>, received: &AtomicU64) -> std::io::Result<()> {
    let mut left = n;
    while left > 0 {
        let piece = read_raw(r, left.min(PIECE), received).await?;
        left -= piece.len();
        if !tx.is_closed() {
            let _ = tx.send(Ok(piece)).await;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn a(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    /// An export answer as a hand-over takes it: its line checked, its raw bytes arriving in
    /// pieces of `piece` bytes (then the stream ends), read in batches of `budget`.
    fn exported(line: &[u8], raw: &[u8], version: Version, requested: &[IpAddr], max: usize, piece: usize) -> anyhow::Result<(Exported, mpsc::Sender<std::io::Result<Vec<u8>>>)> {
        let listed = check_export(line, version, requested, max)?;
        let (tx, rx) = mpsc::channel(raw.len() / piece + 2);
        for p in raw.chunks(piece) {
            tx.try_send(Ok(p.to_vec())).unwrap();
        }
        let e = Exported {
            service: "198.18.0.10:80".parse().unwrap(),
            what: "export h".into(),
            listed: listed.sessions.into(),
            piece: Vec::new(),
            at: 0,
            pieces: Some(rx),
            stall: Duration::from_millis(200),
            conns: listed.connections,
            fds: Vec::new(),
        };
        Ok((e, tx))
    }

    async fn batches(e: &mut Exported, budget: usize) -> anyhow::Result<Vec<Vec<Session>>> {
        let mut all = Vec::new();
        while let Some(b) = e.next_batch(budget).await? {
            all.push(b);
        }
        Ok(all)
    }

    fn parse_export(line: &[u8], raw: &[u8], version: Version, requested: &[IpAddr], max: usize) -> anyhow::Result<Vec<Session>> {
        let rt = tokio::runtime::Builder::new_current_thread().enable_time().build().unwrap();
        rt.block_on(async {
            let (mut e, tx) = exported(line, raw, version, requested, max, 2)?;
            drop(tx);
            Ok(batches(&mut e, 1).await?.concat())
        })
    }

    /// A hand-over takes an export's sessions in batches under its frame budget, whatever
    /// pieces the bytes arrive in; a stream that ends or stalls in the middle is an error.
    #[tokio::test]
    async fn exported_sessions_are_taken_in_batches_as_their_bytes_arrive() {
        let req = [a("198.18.1.5"), a("198.18.1.9"), a("2001:db8::5")];
        let line = br#"{"id":1,"ok":true,"bytes":9,"sessions":[{"client":"198.18.1.5","len":4},{"client":"198.18.1.9","len":0},{"client":"2001:db8::5","len":5}]}"#;
        for piece in [1, 3, 9] {
            let (mut e, tx) = exported(line, b"abcdhello", Version::V2, &req, 10, piece).unwrap();
            drop(tx);
            assert_eq!(e.sizes().collect::<Vec<_>>(), vec![(req[0], 4), (req[1], 0), (req[2], 5)]);
            // Each session counts 64 bytes more than its blob: 68 and 64 fit in 140, 69 does not.
            let got = batches(&mut e, 140).await.unwrap();
            let shape: Vec<Vec<(IpAddr, &[u8])>> = got.iter().map(|b| b.iter().map(|s| (s.client, s.blob.as_slice())).collect()).collect();
            assert_eq!(shape, vec![vec![(req[0], &b"abcd"[..]), (req[1], &b""[..])], vec![(req[2], &b"hello"[..])]], "pieces of {piece}");
            assert!(e.next_batch(140).await.unwrap().is_none(), "nothing after the last");
        }
        // A session bigger than the budget still goes, alone.
        let (mut e, _tx) = exported(line, b"abcdhello", Version::V2, &req, 10, 4).unwrap();
        assert_eq!(batches(&mut e, 1).await.unwrap().len(), 3);
        // The connection breaks after 6 of the 9 bytes.
        let (mut e, tx) = exported(line, b"abcdhe", Version::V2, &req, 10, 4).unwrap();
        drop(tx);
        let err = format!("{:#}", batches(&mut e, 1000).await.unwrap_err());
        assert!(err.contains("went away in the middle of the sessions of export h"), "{err}");
        // The reader failed.
        let (mut e, tx) = exported(line, b"abcdhe", Version::V2, &req, 10, 4).unwrap();
        tx.try_send(Err(std::io::Error::other("reset"))).unwrap();
        let err = format!("{:#}", batches(&mut e, 1000).await.unwrap_err());
        assert!(err.contains("reset"), "{err}");
        // The application stops sending for longer than allowed.
        let (mut e, _tx) = exported(line, b"abcdhe", Version::V2, &req, 10, 4).unwrap();
        let err = format!("{:#}", batches(&mut e, 1000).await.unwrap_err());
        assert!(err.contains("stopped sending the sessions of export h for 200 ms"), "{err}");
    }

    /// The reader hands an export's raw bytes over in pieces as they come; a hand-over that
    /// gave up on them leaves the connection framed: the next answer is read as it should be.
    #[tokio::test]
    async fn an_exports_raw_bytes_stream_and_the_connection_stays_framed() {
        let (tx, _rx) = mpsc::channel(1);
        let conn = AppConn {
            version: Version::V2,
            tx,
            waiters: Mutex::default(),
            next: AtomicU64::new(1),
            received: AtomicU64::new(0),
            export_room: AtomicUsize::new(8 << 20),
            fds: Arc::default(),
        };
        let service: SocketAddr = "198.18.0.10:80".parse().unwrap();
        let raw = vec![7u8; 3 * PIECE + 5];
        let mut data = format!("{{\"id\":1,\"ok\":true,\"bytes\":{},\"sessions\":[]}}\n", raw.len()).into_bytes();
        data.extend_from_slice(&raw);
        // More pieces than are read ahead: the reader waits for a hand-over that then gives up.
        let raw2 = vec![8u8; (PIECES_AHEAD + 4) * PIECE];
        data.extend_from_slice(format!("{{\"id\":2,\"ok\":true,\"bytes\":{},\"sessions\":[]}}\n", raw2.len()).as_bytes());
        data.extend_from_slice(&raw2);
        data.extend_from_slice(b"{\"id\":3,\"ok\":true}\n");
        let mut r = BufReader::with_capacity(1 << 10, &data[..]);
        let mut buf = Vec::new();
        let mut waiting = Vec::new();
        for (id, stream) in [(1, true), (2, true), (3, false)] {
            let (reply, rx) = oneshot::channel();
            conn.waiters.lock().unwrap().insert(id, Waiter { reply, stream });
            waiting.push(rx);
        }
        let mut waiting = waiting.into_iter();
        // Export 1 is taken piece by piece, all of it (the channel holds them all here).
        assert!(read_answer(&mut r, &mut buf, &conn, service).await.unwrap().is_none(), "delivered as a stream");
        let Ok((line, Raw::Stream(mut pieces), _)) = waiting.next().unwrap().await.unwrap() else { panic!("a stream") };
        assert!(line.starts_with(br#"{"id":1,"#));
        let mut got = Vec::new();
        while let Some(p) = pieces.recv().await {
            let p = p.unwrap();
            assert!(p.len() <= PIECE);
            got.extend(p);
        }
        assert_eq!(got, raw);
        // Export 2's hand-over gave up before its bytes came: they are read and dropped.
        let second = waiting.next().unwrap();
        let reading = tokio::spawn(async move {
            let (_, raw, _) = second.await.unwrap().unwrap();
            drop(raw);
        });
        assert!(read_answer(&mut r, &mut buf, &conn, service).await.unwrap().is_none());
        reading.await.unwrap();
        let (id, line, raw, _) = read_answer(&mut r, &mut buf, &conn, service).await.unwrap().expect("the next answer");
        assert_eq!((id, line.as_slice()), (3, &br#"{"id":3,"ok":true}"#[..]));
        assert!(matches!(raw, Raw::Whole(r) if r.is_empty()));
        assert_eq!(conn.received.load(Ordering::Relaxed), u64::try_from(data.len()).unwrap());
    }

    #[test]
    fn export_answers_are_checked_against_the_request() {
        let req = [a("198.18.1.5"), a("198.18.1.9"), a("2001:db8::5")];
        let ok = br#"{"id":1,"ok":true,"sessions":[{"client":"198.18.1.5","blob":"eA=="},{"client":"::ffff:198.18.1.9","blob":""},{"client":"2001:DB8::5","blob":"eHk="}]}"#;
        let s = parse_export(ok, b"", Version::V1, &req, 10).unwrap();
        assert_eq!(s.iter().map(|s| s.client).collect::<Vec<_>>(), req, "IPv4-mapped and upper-case forms are the same clients");
        assert_eq!(s[0].blob, b"x");
        let v2 = br#"{"id":1,"ok":true,"bytes":3,"sessions":[{"client":"198.18.1.5","len":1},{"client":"2001:db8::5","len":2}]}"#;
        let s = parse_export(v2, b"xyz", Version::V2, &req, 10).unwrap();
        assert_eq!((s[0].blob.as_slice(), s[1].blob.as_slice()), (&b"x"[..], &b"yz"[..]));
        assert!(parse_export(br#"{"id":1,"ok":true,"sessions":[]}"#, b"", Version::V1, &req, 10).unwrap().is_empty());
        let err = |t: &[u8]| format!("{:#}", parse_export(t, b"", Version::V1, &req, 10).unwrap_err());
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
        let err2 = |t: &[u8], raw: &[u8]| format!("{:#}", parse_export(t, raw, Version::V2, &req, 10).unwrap_err());
        assert!(err2(br#"{"id":1,"ok":true,"bytes":3,"sessions":[{"client":"198.18.1.5","len":2}]}"#, b"xyz").contains("add up to 2, not the 3"));
        assert!(err2(br#"{"id":1,"ok":true,"bytes":11,"sessions":[{"client":"198.18.1.5","len":11}]}"#, &[0; 11]).contains("over the limit"));
        assert!(err2(br#"{"id":1,"ok":true,"sessions":[{"client":"198.18.1.5","blob":"eA=="}]}"#, b"").contains("lacks a client or a len"), "no base64 in version 2");
    }

    /// The agent writes the requests of the shared transcripts exactly, and reads their
    /// answers as the transcripts mean them.
    #[test]
    fn the_agent_writes_and_reads_what_the_shared_transcripts_say() {
        use redirector_hook::transcript::{self, Step, same_line};
        let all = transcript::all();
        assert!(all.len() >= 4);
        for t in &all {
            let mut version = Version::V1;
            let mut last: Option<AgentMsg> = None;
            for (i, step) in t.steps.iter().enumerate() {
                let at = format!("{} step {}", t.name, i + 1);
                match step {
                    Step::Agent { msg, raw } => {
                        let Ok(m) = serde_json::from_value::<AgentMsg>(msg.clone()) else { continue };
                        let ours = match &m {
                            AgentMsg::Import { id, handoff, sessions, .. } => {
                                let blobs = redirector_hook::session::from_wire(sessions.clone(), m.bytes(), raw, version, usize::MAX).unwrap_or_default();
                                if blobs.len() != sessions.len() {
                                    continue; // a malformed import, which the agent never writes
                                }
                                let (line, raw) = import_message(*id, handoff, blobs, version);
                                [line, raw.concat()].concat()
                            }
                            other => message(other),
                        };
                        let end = ours.iter().position(|b| *b == b'\n').unwrap();
                        same_line(msg, &serde_json::from_slice(&ours[..end]).unwrap()).unwrap_or_else(|e| panic!("{at}: {e}"));
                        assert_eq!(&ours[end + 1..], raw.as_slice(), "{at}: raw bytes");
                        last = Some(m);
                    }
                    Step::App { msg, raw } => {
                        let line = serde_json::to_vec(msg).unwrap();
                        if msg.get("op").is_some() {
                            version = Register::parse(&line).unwrap_or_else(|e| panic!("{at}: {e}")).version;
                            continue;
                        }
                        match last.take() {
                            Some(AgentMsg::Export { clients, .. }) => {
                                let requested: Vec<IpAddr> = clients.iter().map(|c| c.parse().unwrap()).collect();
                                let got = parse_export(&line, raw, version, &requested, 1 << 10).unwrap_or_else(|e| panic!("{at}: {e:#}"));
                                let sent: Vec<u8> = got.iter().flat_map(|s| s.blob.clone()).collect();
                                if version == Version::V2 {
                                    assert_eq!(&sent, raw, "{at}: the sessions are the raw bytes, in order");
                                }
                            }
                            _ => assert_eq!(Answer::parse(&line).is_ok(), msg["ok"] == true, "{at}"),
                        }
                    }
                    Step::State(_) | Step::Reconnect => {}
                }
            }
        }
    }

    #[test]
    fn time_grows_with_the_data() {
        let l = Limits { timeout: Duration::from_secs(2), per_mib_ms: 100, max_session_bytes: 3 };
        assert_eq!(l.allowance(0), Duration::from_secs(2));
        assert_eq!(l.allowance(10 << 20), Duration::from_secs(3));
        assert_eq!(l.allowance(u64::MAX), Duration::from_secs(2) + Duration::from_millis(u64::try_from(u128::from(u64::MAX) * 100 / MIB).unwrap()));
        assert!(l.import_allowance([3 << 20]) >= Duration::from_millis(2400), "4 MiB of base64: {:?}", l.import_allowance([3 << 20]));
        assert_eq!(l.export_room(2), 2 * (4 + 128) + 4096);
    }

    /// A test hook: `services` configured, served at a fresh socket; registrations are let
    /// through at once (none reports pending hand-overs).
    fn hook(name: &str, services: &[SocketAddr]) -> (Arc<Apps>, std::path::PathBuf) {
        let limits = Limits { timeout: Duration::from_secs(2), per_mib_ms: 100, max_session_bytes: 1 << 20 };
        let (apps, mut registrations) = Apps::new(limits, services.iter().copied());
        tokio::spawn(async move {
            while let Some(r) = registrations.recv().await {
                let _ = r.done.send(());
            }
        });
        let path = std::env::temp_dir().join(format!("redirector-unit-{}-{name}.sock", std::process::id()));
        let _ = std::fs::remove_file(&path);
        tokio::spawn(serve(apps.clone(), bind(&path, None).unwrap()));
        (apps, path)
    }

    /// Connects to the hook at `path`, registers `service` and returns the connection with the
    /// agent's answer.
    async fn register(path: &std::path::Path, service: &str) -> (BufReader<UnixStream>, serde_json::Value) {
        let mut c = BufReader::new(UnixStream::connect(path).await.unwrap());
        c.get_mut().write_all(format!("{{\"op\":\"register\",\"service\":\"{service}\",\"version\":2}}\n").as_bytes()).await.unwrap();
        let answer = next_line(&mut c).await;
        (c, answer)
    }

    async fn next_line(c: &mut BufReader<UnixStream>) -> serde_json::Value {
        let mut line = String::new();
        tokio::time::timeout(Duration::from_secs(5), c.read_line(&mut line)).await.expect("an answer within 5 s").unwrap();
        serde_json::from_str(&line).unwrap_or(serde_json::Value::Null)
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn one_application_registers_each_configured_service_and_no_other_replaces_it() {
        let svc: SocketAddr = "198.18.0.10:80".parse().unwrap();
        let (apps, path) = hook("one-app", &[svc]);

        let (mut first, answer) = register(&path, "198.18.0.10:80").await;
        assert_eq!(answer["op"], "registered", "{answer}");
        let (_, answer) = register(&path, "198.18.0.11:80").await;
        assert!(answer["error"].as_str().is_some_and(|e| e.contains("198.18.0.11:80 is not a service of this node (its services: 198.18.0.10:80)")), "{answer}");

        // A second instance is refused while the first is connected, and says who holds it.
        let t0 = Instant::now();
        let (_, answer) = register(&path, "198.18.0.10:80").await;
        let pid = format!("pid {}", std::process::id());
        assert!(answer["error"].as_str().is_some_and(|e| e.contains("served by another application connection") && e.contains(&pid)), "{answer}");
        assert!(t0.elapsed() >= served::RECONNECT_WAIT, "it waited for the first one to go first");
        // Requests still go to the first.
        let settle = tokio::spawn({
            let apps = apps.clone();
            async move { apps.settle(svc, "a/1/b", true).await }
        });
        let req = next_line(&mut first).await;
        assert_eq!((req["op"].as_str(), req["handoff"].as_str()), (Some("commit"), Some("a/1/b")), "{req}");
        first.get_mut().write_all(format!("{{\"id\":{},\"ok\":true}}\n", req["id"]).as_bytes()).await.unwrap();
        tokio::time::timeout(Duration::from_secs(5), settle).await.expect("confirmed").unwrap();

        // An application that reconnects takes the service over as soon as its old connection
        // is gone (the agent may see the close after the new registration).
        drop(first);
        let (_second, answer) = register(&path, "198.18.0.10:80").await;
        assert_eq!(answer["op"], "registered", "{answer}");
        assert!(apps.has(svc));
        let _ = std::fs::remove_file(&path);
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
