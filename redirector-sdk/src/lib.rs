//! The application side of redirector's session hook: connect to the local agent's Unix
//! socket, register the service, and answer its requests by implementing [`Sessions`].
//!
//! The protocol is `redirector-hook` (specified in `docs/app-protocol.md`): this crate speaks
//! version 3 (session blobs as raw bytes after their line, and clients' open TCP connections
//! moving with their sessions: [`Sessions::connections`], [`Sessions::adopt`]) and falls back
//! one version at a time (to 2, then 1) with an agent that refuses it. The application never
//! decides how a hand-over ends: when the connection to the agent drops, exported sessions stay
//! frozen and imported ones tentative; on reconnecting, the hook reports them (`pending`) and
//! the agent answers each with a commit or an abort.

use std::{
    collections::{BTreeMap, VecDeque},
    io::{BufRead as _, BufReader, BufWriter, Read, Write},
    net::{IpAddr, SocketAddr, TcpStream},
    os::{
        fd::{AsFd as _, BorrowedFd, OwnedFd},
        unix::net::UnixStream,
    },
    path::{Path, PathBuf},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    thread::JoinHandle,
    time::Duration,
};

use redirector_hook::{
    AgentMsg, Answer, fds, frame,
    msg::{ExportAnswer, WireConn},
    register::Register,
    session::{Listed, WireList, from_wire, listed, raw_parts},
};
pub use redirector_hook::{Role, Version, parse_client};

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
///
/// Version 3 adds two methods, which an application that does not move open connections leaves
/// as they are: [`Sessions::connections`] (hand over idle connections right after `export`) and
/// [`Sessions::adopt`] (connections that come with a `commit` or an `abort`).
pub trait Sessions: Send + Sync + 'static {
    fn export(&self, handoff: &str, clients: &[IpAddr]) -> Vec<(IpAddr, Vec<u8>)>;
    fn import(&self, handoff: &str, sessions: Vec<(IpAddr, Vec<u8>)>) -> Result<(), String>;
    fn commit(&self, handoff: &str);
    fn abort(&self, handoff: &str);

    /// Called right after `export` when the agent takes connections too (the export request says
    /// `connections: true`, version 3): the connections of `clients` that are idle at a request
    /// boundary (no answer being written, nothing of the next request read that is not in the
    /// blob), handed over. From now on the application neither reads nor writes them, and drops
    /// its own copies without shutting them down (the SDK closes the sockets it is given after
    /// passing them). A connection of a client that is not among `clients` is given back at
    /// once ([`Sessions::adopt`]). The default hands over none.
    fn connections(&self, handoff: &str, clients: &[IpAddr]) -> Vec<Connection> {
        let _ = (handoff, clients);
        Vec::new()
    }

    /// Connections that come with a commit or an abort (version 3): moved here (the importing
    /// side's commit), given back (the exporting side's abort, or its commit for those that
    /// could not move). Serve them as if just accepted, from their blob. Called before `commit`
    /// or `abort` of the same hand-over. The sockets are in blocking mode, as a freshly
    /// accepted [`TcpStream`]. The default closes them.
    fn adopt(&self, handoff: &str, connections: Vec<Connection>) {
        let _ = (handoff, connections);
    }
}

/// An open TCP connection of a client, moving with its session (version 3).
#[derive(Debug)]
pub struct Connection {
    /// The client whose connection it is.
    pub client: IpAddr,
    /// The connection, at a request boundary.
    pub socket: TcpStream,
    /// The application's own state of the connection, opaque to redirector: e.g. the bytes
    /// of the next request it already read. Often empty.
    pub blob: Vec<u8>,
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
    /// (the address and port clients use), in the newest protocol version the agent speaks.
    /// Reconnects every half second if the agent is away.
    pub fn start(socket: impl Into<PathBuf>, service: SocketAddr, sessions: Arc<dyn Sessions>) -> Self {
        Self::start_version(socket, service, None, sessions)
    }

    /// As [`Hook::start`], speaking `version` only if it is given.
    ///
    /// An application that may take moved connections (version 3) gets room for
    /// [`fds::TABLE_ROOM`] descriptors in its table now ([`fds::reserve_table`]): in a process
    /// with several threads, each time the kernel grows the table it waits for an RCU grace
    /// period, milliseconds that would otherwise fall inside the clients' pause of a big move.
    pub fn start_version(socket: impl Into<PathBuf>, service: SocketAddr, version: Option<Version>, sessions: Arc<dyn Sessions>) -> Self {
        let socket = socket.into();
        if version.is_none_or(Version::moves_connections)
            && let Err(e) = fds::reserve_table(fds::TABLE_ROOM)
        {
            eprintln!("redirector hook: cannot make room for descriptors in advance ({e}): a first big move of connections here will wait for it");
        }
        let stop = Arc::new(AtomicBool::new(false));
        let s = stop.clone();
        let thread = std::thread::spawn(move || {
            let unfinished = Mutex::new(Unfinished::new());
            let mut speak = version.unwrap_or(Version::NEWEST);
            while !s.load(Ordering::Relaxed) {
                match serve(&socket, service, sessions.as_ref(), &s, &unfinished, speak) {
                    Err(Ended::OlderAgent(why)) if version.is_none() && speak > Version::V1 => {
                        // One version older at a time: an agent of version 2 still moves
                        // sessions as raw bytes.
                        let older = Version::from_number(speak.number() - 1).unwrap_or(Version::V1);
                        eprintln!("redirector hook: the agent refused version {} ({why}); speaking version {}", speak.number(), older.number());
                        speak = older;
                        continue;
                    }
                    Err(e) => {
                        let n = unfinished.lock().expect("lock").len();
                        eprintln!("redirector hook: {e}; reconnecting ({n} hand-over(s) unfinished, kept as they are)");
                    }
                    Ok(()) => {}
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

/// Why a connection to the agent ended.
#[derive(Debug)]
enum Ended {
    Io(std::io::Error),
    /// The agent refused the registration's version (it speaks an older one).
    OlderAgent(String),
}

impl std::fmt::Display for Ended {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Io(e) => write!(f, "{e}"),
            Self::OlderAgent(why) => write!(f, "the agent says: {why}"),
        }
    }
}

impl From<std::io::Error> for Ended {
    fn from(e: std::io::Error) -> Self {
        Self::Io(e)
    }
}

/// The register line, with the hand-overs not seen end (sorted by name).
#[must_use]
pub fn register_line(service: SocketAddr, version: Version, unfinished: &Unfinished) -> String {
    let reg = Register::new(service, version, unfinished.iter().map(|(h, (role, clients))| (h.as_str(), *role, clients.as_slice())));
    serde_json::to_string(&reg).expect("a register line encodes")
}

/// The hook socket's reading side: every read is a `recvmsg`, and the descriptors that come
/// with the bytes (version 3) are kept in arrival order for the lines that announce them.
struct FdReader {
    sock: UnixStream,
    fds: VecDeque<OwnedFd>,
}

impl Read for FdReader {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        // A timeout (SO_RCVTIMEO) is WouldBlock, as with a plain read.
        fds::recv_some(self.sock.as_fd(), buf, &mut self.fds)
    }
}

/// Where answers go: bytes, and descriptors attached to a message's own bytes (version 3).
trait Out: Write {
    /// Whether descriptors can pass (the hook socket). When not, no connection is handed over.
    fn passes_fds(&self) -> bool;

    /// Writes `bytes` with `fds` attached to them, after everything written before.
    fn write_fds(&mut self, bytes: &[u8], fds: &[BorrowedFd<'_>]) -> std::io::Result<()>;
}

/// The hook socket's writing side: buffered, except a line that carries descriptors, which
/// goes with them in `sendmsg`s of its own once everything before it is out.
struct SocketOut<'a>(BufWriter<&'a UnixStream>);

impl Write for SocketOut<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.write(buf)
    }
    fn write_all(&mut self, buf: &[u8]) -> std::io::Result<()> {
        self.0.write_all(buf)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.0.flush()
    }
}

impl Out for SocketOut<'_> {
    fn passes_fds(&self) -> bool {
        true
    }

    fn write_fds(&mut self, bytes: &[u8], fds: &[BorrowedFd<'_>]) -> std::io::Result<()> {
        self.0.flush()?;
        // The agent reads as many as a message holds.
        fds::send_all(self.0.get_ref().as_fd(), bytes, fds, fds::MAX_PER_MESSAGE)
    }
}

/// Any writer, which descriptors cannot pass through ([`handle`]).
struct Plain<W>(W);

impl<W: Write> Write for Plain<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.write(buf)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.0.flush()
    }
}

impl<W: Write> Out for Plain<W> {
    fn passes_fds(&self) -> bool {
        false
    }

    fn write_fds(&mut self, bytes: &[u8], fds: &[BorrowedFd<'_>]) -> std::io::Result<()> {
        if !fds.is_empty() {
            return Err(std::io::Error::new(std::io::ErrorKind::Unsupported, "descriptors cannot pass through this writer"));
        }
        self.0.write_all(bytes)
    }
}

fn serve(socket: &Path, service: SocketAddr, sessions: &dyn Sessions, stop: &AtomicBool, unfinished: &Mutex<Unfinished>, version: Version) -> Result<(), Ended> {
    let stream = UnixStream::connect(socket)?;
    stream.set_read_timeout(Some(Duration::from_millis(200)))?;
    // An agent that stops reading is as good as gone: reconnect.
    stream.set_write_timeout(Some(Duration::from_mins(1)))?;
    let w = stream.try_clone()?;
    let (line, n) = {
        let u = unfinished.lock().expect("lock");
        (register_line(service, version, &u), u.len())
    };
    (&w).write_all(format!("{line}\n").as_bytes())?;
    if n > 0 {
        eprintln!("redirector hook: registering with {n} unfinished hand-over(s): the agent says how each ended");
    }
    let mut r = BufReader::with_capacity(1 << 16, FdReader { sock: stream, fds: VecDeque::new() });
    let (mut line, mut raw) = (Vec::new(), Vec::new());
    let mut registered = false;
    while !stop.load(Ordering::Relaxed) {
        // read_until keeps what it read before a timeout: a long line arrives in pieces.
        match r.read_until(b'\n', &mut line) {
            Ok(0) => return Err(eof("the agent closed the hook").into()),
            Ok(_) if line.last() == Some(&b'\n') => {}
            Ok(_) => return Err(eof("the agent closed the hook mid-line").into()),
            Err(e) if timed_out(&e) => continue,
            Err(e) => return Err(e.into()),
        }
        line.pop();
        let mut passed = Vec::new();
        if version > Version::V1 {
            let head = frame::Head::parse(&line).unwrap_or(frame::Head { id: None, bytes: 0, fds: 0 });
            // A line's descriptors are in once its last byte is (the kernel never lets a read
            // run past a message that carries some); fewer than it announces: the stream
            // cannot be trusted any further.
            passed = fds::take(&mut r.get_mut().fds, head.fds).map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))?;
            // An import's blobs are read each into its own buffer, the one the application
            // keeps: no copy, and no buffer the size of the whole import kept afterwards.
            if let Some(Listing { id, handoff, lens }) = import_listing(&line, head.bytes).filter(|_| registered) {
                let mut list = Vec::with_capacity(lens.len());
                for (client, len) in lens {
                    let mut blob = Vec::new();
                    read_raw(&mut r, len, &mut blob, stop)?;
                    list.push((client, blob));
                }
                let mut out = BufWriter::with_capacity(1 << 16, &w);
                import(sessions, unfinished, id, &handoff, list, &mut out)?;
                out.flush()?;
                line.clear();
                continue;
            }
            read_raw(&mut r, usize::try_from(head.bytes).unwrap_or(usize::MAX), &mut raw, stop)?;
        }
        if !registered {
            match serde_json::from_slice::<AgentMsg>(&line) {
                Ok(AgentMsg::Registered { .. }) => registered = true,
                Ok(AgentMsg::Error { error }) if version > Version::V1 && error.contains("version") => return Err(Ended::OlderAgent(error)),
                _ => {}
            }
        }
        let mut out = SocketOut(BufWriter::with_capacity(1 << 16, &w));
        handle_line(sessions, unfinished, version, &line, &raw, passed, &mut out)?;
        out.flush()?;
        line.clear();
        raw.clear();
    }
    Ok(())
}

fn eof(why: &str) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::UnexpectedEof, why)
}

fn timed_out(e: &std::io::Error) -> bool {
    matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut)
}

/// Reads the `n` raw bytes that follow a line into `raw`, across read timeouts (straight
/// from the socket once the reader's buffer is drained, without zeroing first).
fn read_raw(r: &mut impl Read, n: usize, raw: &mut Vec<u8>, stop: &AtomicBool) -> Result<(), Ended> {
    raw.reserve(n);
    while raw.len() < n {
        let want = u64::try_from(n - raw.len()).unwrap_or(u64::MAX);
        // On a timeout, what was read so far stays in `raw`.
        match r.by_ref().take(want).read_to_end(raw) {
            Ok(0) => return Err(eof("the agent closed the hook in the middle of a message's bytes").into()),
            Ok(_) => {}
            Err(e) if timed_out(&e) && !stop.load(Ordering::Relaxed) => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

/// Imports `list` for hand-over `handoff` (request `id`) and answers.
fn import(sessions: &dyn Sessions, unfinished: &Mutex<Unfinished>, id: u64, handoff: &str, list: Vec<(IpAddr, Vec<u8>)>, out: &mut impl Write) -> std::io::Result<()> {
    unfinished.lock().expect("lock").insert(handoff.to_string(), (Role::Import, list.iter().map(|s| s.0).collect()));
    match sessions.import(handoff, list) {
        Ok(()) => answer(out, &Answer::ok(id)),
        Err(e) => answer(out, &Answer::refused(id, e)),
    }
}

/// A version 2 import whose line lists its sessions correctly.
struct Listing {
    id: u64,
    handoff: String,
    /// Each client with the length of its blob (the raw bytes after the line, in order).
    lens: Vec<(IpAddr, usize)>,
}

fn import_listing(line: &[u8], bytes: u64) -> Option<Listing> {
    let Ok(AgentMsg::Import { id, handoff, bytes: b, sessions: list }) = serde_json::from_slice::<AgentMsg>(line) else { return None };
    let listed = listed(list, b, Version::V2, usize::MAX).ok().filter(|_| b == bytes)?;
    let lens = listed.into_iter().map(|(c, l)| match l {
        Listed::Len(n) => Some((c, n)),
        Listed::Blob(_) => None,
    });
    Some(Listing { id, handoff, lens: lens.collect::<Option<Vec<_>>>()? })
}

fn answer(out: &mut impl Write, a: &Answer) -> std::io::Result<()> {
    frame::write(out, a, [])
}

/// Handles one line from the agent (without its `\n`) and the raw bytes that followed it,
/// writing the answer (if any) to `out`. An `error` from the agent (the registration refused,
/// e.g. while another instance serves the service) is an error: the caller reconnects.
/// Descriptors cannot pass through `out`: connections are neither handed over nor adopted
/// (the hook itself answers from its socket, where they can).
pub fn handle(sessions: &dyn Sessions, unfinished: &Mutex<Unfinished>, version: Version, line: &[u8], raw: &[u8], out: &mut impl Write) -> std::io::Result<()> {
    handle_line(sessions, unfinished, version, line, raw, Vec::new(), &mut Plain(out))
}

/// [`handle`], with the descriptors that passed with the line (`passed`, as many as its `fds`
/// says) and an output that may carry descriptors.
fn handle_line(
    sessions: &dyn Sessions,
    unfinished: &Mutex<Unfinished>,
    version: Version,
    line: &[u8],
    raw: &[u8],
    passed: Vec<OwnedFd>,
    out: &mut impl Out,
) -> std::io::Result<()> {
    let msg = match serde_json::from_slice::<AgentMsg>(line) {
        Ok(m) => m,
        Err(e) => {
            if let Ok(frame::Head { id: Some(id), .. }) = frame::Head::parse(line) {
                return answer(out, &Answer::refused(id, format!("malformed or unknown request: {e}")));
            }
            eprintln!("redirector hook: ignoring a line from the agent that is not a request: {}", frame::preview(line));
            return Ok(());
        }
    };
    match msg {
        AgentMsg::Registered { .. } => Ok(()),
        AgentMsg::Error { error } => Err(std::io::Error::other(format!("the agent says: {error}"))),
        AgentMsg::Export { id, handoff, clients, connections } => {
            let clients: Vec<IpAddr> = clients.iter().filter_map(|c| parse_client(c)).collect();
            unfinished.lock().expect("lock").insert(handoff.clone(), (Role::Export, clients.clone()));
            let exported = sessions.export(&handoff, &clients);
            let moving = if connections && version.moves_connections() && out.passes_fds() { handed_over(sessions, &handoff, &clients) } else { Vec::new() };
            let listed = moving.iter().map(|c| WireConn { client: c.client.to_canonical().to_string(), len: u64::try_from(c.blob.len()).unwrap_or(u64::MAX) }).collect();
            let a = ExportAnswer::new(id, WireList { sessions: &exported, version }).with_connections(listed);
            let raw = raw_parts(exported.iter().map(|s| s.1.as_slice()).chain(moving.iter().map(|c| c.blob.as_slice())), version);
            if moving.is_empty() {
                return frame::write(out, &a, raw);
            }
            // The descriptors go with the line's own bytes; the blobs follow. Then `moving`
            // drops: this process's copies of the sockets close (silently: the agent holds
            // them, in repair mode; if the answer could not be written, the hook reconnects
            // and those clients see their idle connection closed, as in version 2).
            let fds: Vec<BorrowedFd<'_>> = moving.iter().map(|c| c.socket.as_fd()).collect();
            out.write_fds(&frame::line(&a), &fds)?;
            for r in raw {
                out.write_all(r)?;
            }
            Ok(())
        }
        AgentMsg::Import { id, handoff, bytes, sessions: list } => match from_wire(list, bytes, raw, version, usize::MAX) {
            Ok(l) => import(sessions, unfinished, id, &handoff, l.into_iter().map(|s| (s.client, s.blob)).collect(), out),
            Err(e) => answer(out, &Answer::refused(id, format!("malformed import: {e}"))),
        },
        AgentMsg::Commit { id, handoff, connections, .. } => {
            unfinished.lock().expect("lock").remove(&handoff);
            adopt(sessions, &handoff, "commit", connections, raw, passed);
            sessions.commit(&handoff);
            answer(out, &Answer::ok(id))
        }
        AgentMsg::Abort { id, handoff, connections, .. } => {
            unfinished.lock().expect("lock").remove(&handoff);
            adopt(sessions, &handoff, "abort", connections, raw, passed);
            sessions.abort(&handoff);
            answer(out, &Answer::ok(id))
        }
    }
}

/// The connections the application hands over for an export of `clients`; any of another
/// client is given back at once (the agent would refuse the whole answer).
fn handed_over(sessions: &dyn Sessions, handoff: &str, clients: &[IpAddr]) -> Vec<Connection> {
    let (moving, stray): (Vec<Connection>, Vec<Connection>) = sessions.connections(handoff, clients).into_iter().partition(|c| clients.contains(&c.client.to_canonical()));
    if !stray.is_empty() {
        eprintln!("redirector hook: export {handoff}: the application handed over {} connection(s) of clients not exported; giving them back", stray.len());
        sessions.adopt(handoff, stray);
    }
    moving
}

/// Gives the application the connections that came with a commit or an abort of `handoff`:
/// `listed` in its line, their blobs in `raw`, their descriptors `passed`. What does not add up
/// is logged and closed (the outcome is confirmed all the same).
fn adopt(sessions: &dyn Sessions, handoff: &str, op: &str, listed: Vec<WireConn>, raw: &[u8], passed: Vec<OwnedFd>) {
    match connections_of(listed, raw, passed) {
        Ok(c) if c.is_empty() => {}
        Ok(c) => sessions.adopt(handoff, c),
        Err(e) => eprintln!("redirector hook: {op} {handoff}: its connections are closed: {e}"),
    }
}

/// The connections a line lists (`listed`), from their blobs (`raw`, in list order) and their
/// descriptors (`passed`, in list order), each socket in blocking mode.
fn connections_of(listed: Vec<WireConn>, raw: &[u8], passed: Vec<OwnedFd>) -> Result<Vec<Connection>, String> {
    if listed.len() != passed.len() {
        return Err(format!("{} listed, {} descriptors passed", listed.len(), passed.len()));
    }
    let total = listed.iter().fold(0u64, |n, c| n.saturating_add(c.len));
    if u64::try_from(raw.len()).ok() != Some(total) {
        return Err(format!("their blobs add up to {total} bytes, {} followed the line", raw.len()));
    }
    let mut at = 0usize;
    let mut out = Vec::with_capacity(listed.len());
    for (c, fd) in listed.into_iter().zip(passed) {
        // In bounds: the lengths add up to `raw`'s.
        let len = usize::try_from(c.len).unwrap_or(usize::MAX);
        let blob = raw[at..at + len].to_vec();
        at += len;
        let socket = TcpStream::from(fd);
        let Some(client) = parse_client(&c.client).or_else(|| socket.peer_addr().ok().map(|a| a.ip().to_canonical())) else {
            eprintln!("redirector hook: a connection of {:?}, not an address, and without a peer: closed", c.client);
            continue;
        };
        // The agent may have left the file non-blocking; the application gets what accept gives.
        if let Err(e) = socket.set_nonblocking(false) {
            eprintln!("redirector hook: a connection of {client}: {e}: closed");
            continue;
        }
        out.push(Connection { client, socket, blob });
    }
    Ok(out)
}

#[cfg(test)]
mod tests;
