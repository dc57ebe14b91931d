//! An HTTP/1.1 client for the demo application, checking its session on every answer: the
//! counter goes 1, 2, 3... with no gap or repeat, the history is the last counts, and the
//! client is the address it connected from. It keeps one keep-alive connection, or opens a new
//! one every few requests ([`Churn`]). Also: reading one response ([`read_response`]), for
//! tests that speak HTTP by hand.

use std::{
    collections::HashMap,
    io::{BufRead, BufReader, ErrorKind, Read, Write as _},
    net::{IpAddr, SocketAddr, TcpStream},
    os::fd::AsFd,
    time::{Duration, Instant},
};

use crate::{app::connect_tcp, io::Patient};

/// Counts in a session's history (as the demo applications keep them).
pub const HISTORY: u64 = 5;

/// How long a client waits for an answer (or for the server's close it asked for) unless set
/// with [`HttpClient::timeout`].
pub const TIMEOUT: Duration = Duration::from_secs(15);

/// One response as read: its status line and headers (names in lower case) and its body.
#[derive(Clone)]
pub struct Response {
    pub status: String,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl std::fmt::Debug for Response {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Response").field("status", &self.status).field("headers", &self.headers).field("body", &String::from_utf8_lossy(&self.body)).finish()
    }
}

impl Response {
    /// The first value of header `name` (lower case).
    #[must_use]
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(n, _)| n == name).map(|(_, v)| v.as_str())
    }

    /// Whether the server ends the connection after this response (RFC 9112 section 9.3):
    /// it says `Connection: close`, or it is HTTP/1.0 without `Connection: keep-alive`.
    #[must_use]
    pub fn closes(&self) -> bool {
        let tokens: Vec<String> = self.headers.iter().filter(|(n, _)| n == "connection").flat_map(|(_, v)| v.split(',').map(|t| t.trim().to_ascii_lowercase())).collect();
        tokens.iter().any(|t| t == "close") || (self.status.starts_with("HTTP/1.0 ") && !tokens.iter().any(|t| t == "keep-alive"))
    }
}

/// Why reading a response failed.
#[derive(Debug)]
pub enum ReadError {
    /// The connection closed (or was reset) before any byte of a response.
    ClosedEarly(String),
    /// No byte (or not the rest) came within the read timeout.
    TimedOut(String),
    /// Anything else: closed mid-response, a bad response.
    Failed(String),
}

impl std::fmt::Display for ReadError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::ClosedEarly(e) | Self::Failed(e) => f.write_str(e),
            Self::TimedOut(e) => write!(f, "timed out {e}"),
        }
    }
}

fn closed(e: &std::io::Error) -> bool {
    matches!(e.kind(), ErrorKind::BrokenPipe | ErrorKind::ConnectionReset | ErrorKind::ConnectionAborted | ErrorKind::UnexpectedEof)
}

fn timed_out(e: &std::io::Error) -> bool {
    matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut)
}

/// An I/O error while reading `what`.
fn io_error(e: &std::io::Error, what: &str) -> ReadError {
    if timed_out(e) { ReadError::TimedOut(format!("reading {what} ({e})")) } else { ReadError::Failed(format!("reading {what}: {e}")) }
}

/// Reads one response (with a `Content-Length` body) from `r`.
///
/// # Errors
/// Why it could not: see [`ReadError`].
pub fn read_response(r: &mut impl BufRead) -> Result<Response, ReadError> {
    let mut status = String::new();
    match r.read_line(&mut status) {
        Ok(0) => return Err(ReadError::ClosedEarly("closed before any response byte".into())),
        Ok(_) if !status.ends_with('\n') => return Err(ReadError::Failed(format!("closed mid-response after {status:?}"))),
        Ok(_) => {}
        Err(e) if status.is_empty() && closed(&e) => return Err(ReadError::ClosedEarly(format!("{e} before any response byte"))),
        Err(e) if status.is_empty() && timed_out(&e) => return Err(ReadError::TimedOut(format!("waiting for the answer ({e})"))),
        Err(e) => return Err(io_error(&e, &format!("the status line (after {status:?})"))),
    }
    let mut headers = Vec::new();
    let mut line = String::new();
    loop {
        line.clear();
        match r.read_line(&mut line) {
            Ok(0) => return Err(ReadError::Failed("closed mid-response".into())),
            Ok(_) => {}
            Err(e) => return Err(io_error(&e, "headers")),
        }
        if line == "\r\n" {
            break;
        }
        if let Some((n, v)) = line.split_once(':') {
            headers.push((n.trim().to_ascii_lowercase(), v.trim().to_string()));
        }
    }
    let status = status.trim_end().to_string();
    let mut resp = Response { status, headers, body: Vec::new() };
    let Some(len) = resp.header("content-length").and_then(|v| v.parse::<usize>().ok()) else { return Err(ReadError::Failed("no content-length".into())) };
    resp.body = vec![0u8; len];
    if let Err(e) = r.read_exact(&mut resp.body) {
        return Err(io_error(&e, "the body"));
    }
    Ok(resp)
}

/// Waits (at most the connection's read timeout) for the server to close the connection
/// after its last answer.
///
/// # Errors
/// The connection stayed open ([`ReadError::TimedOut`]), or more bytes came.
pub fn expect_close<S: Read + AsFd>(r: &mut BufReader<Patient<S>>) -> Result<(), ReadError> {
    let start = Instant::now();
    match r.fill_buf() {
        Ok([]) => Ok(()),
        Err(e) if closed(&e) => Ok(()),
        Ok(more) => Err(ReadError::Failed(format!("{} more bytes after the answer: {:?}", more.len(), String::from_utf8_lossy(&more[..more.len().min(64)])))),
        Err(e) if timed_out(&e) => Err(ReadError::TimedOut(format!("waiting for the server to close: it kept the connection open {:?} after the answer", start.elapsed()))),
        Err(e) => Err(ReadError::Failed(format!("waiting for the server's close: {e}"))),
    }
}

/// How a client uses its connections.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Churn {
    /// One keep-alive connection for as long as the server keeps it (the default).
    KeepAlive,
    /// A new connection every `n` requests: the client closes the old one first.
    ClientCloses(u64),
    /// Every `n`th request on a connection asks `Connection: close`: the server answers, then
    /// closes first (so its side of the connection goes to TIME_WAIT); the client checks it
    /// does within its timeout, and opens its next connection at once (so that, like a
    /// keep-alive client, it holds one connection nearly all the time: the server's load).
    ServerCloses(u64),
}

/// A connection a client opened, for failure reports.
#[derive(Clone, Debug)]
pub struct Opened {
    /// Its local port.
    pub port: u16,
    /// The server of its first answer, if any.
    pub server: Option<String>,
}

/// The connection a client has open.
struct Conn {
    stream: TcpStream,
    reader: BufReader<Patient<TcpStream>>,
    /// Requests answered on it.
    answered: u64,
}

/// One HTTP/1.1 client. A request is retried once, on a new connection, only when its
/// connection closed before any byte of a response (as browsers do: the server closed an idle
/// keep-alive connection, or one whose session moved); any other failure (a timeout, a reset
/// or close mid-response, a bad answer) is a failed request.
pub struct HttpClient {
    ns: String,
    pub src: IpAddr,
    dst: SocketAddr,
    churn: Churn,
    timeout: Duration,
    conn: Option<Conn>,
    /// Every connection opened, in order (the open one, if any, last).
    pub opened: Vec<Opened>,
    /// The last count answered, and who answered it.
    pub last: Option<u64>,
    pub last_server: Option<String>,
    /// Answers per server name.
    pub servers: HashMap<String, u64>,
    /// Requests made, answered (200 with a session) and retried.
    pub requests: u64,
    pub answered: u64,
    pub retries: u64,
    /// Requests that failed (after the one retry allowed), and how many of them timed out.
    pub failures: Vec<String>,
    pub timeouts: u64,
    /// Answers that broke the session: a count that is not the last one plus one (the first
    /// is 1), a wrong history, or another client's session.
    pub breaks: Vec<String>,
}

/// How one attempt at a request went.
enum Attempt {
    Answer(serde_json::Value),
    /// The connection closed (or was reset) before any byte of a response: retry.
    ClosedEarly(String),
    Failed {
        error: String,
        timed_out: bool,
    },
}

impl Attempt {
    fn failed(error: String) -> Self {
        Self::Failed { error, timed_out: false }
    }
}

impl From<ReadError> for Attempt {
    fn from(e: ReadError) -> Self {
        match e {
            ReadError::ClosedEarly(e) => Self::ClosedEarly(e),
            ReadError::TimedOut(_) => Self::Failed { error: e.to_string(), timed_out: true },
            ReadError::Failed(e) => Self::failed(e),
        }
    }
}

impl HttpClient {
    /// A keep-alive client ([`Churn::KeepAlive`]) with the default [`TIMEOUT`].
    #[must_use]
    pub fn new(ns: &str, src: IpAddr, dst: SocketAddr) -> Self {
        Self {
            ns: ns.into(),
            src,
            dst,
            churn: Churn::KeepAlive,
            timeout: TIMEOUT,
            conn: None,
            opened: Vec::new(),
            last: None,
            last_server: None,
            servers: HashMap::new(),
            requests: 0,
            answered: 0,
            retries: 0,
            failures: Vec::new(),
            timeouts: 0,
            breaks: Vec::new(),
        }
    }

    /// Uses connections as `churn` says.
    #[must_use]
    pub fn churn(mut self, churn: Churn) -> Self {
        self.churn = churn;
        self
    }

    /// Waits at most `timeout` for each read and write (an answer, the server's close): then
    /// the request failed (timed out).
    #[must_use]
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// Closes the keep-alive connection: the next request opens a new one (which the kernel
    /// steers if this client moved).
    pub fn reconnect(&mut self) {
        self.conn = None;
    }

    /// Connections opened so far.
    #[must_use]
    pub fn connections(&self) -> usize {
        self.opened.len()
    }

    /// Where the current connection stands, for a failure report: which one it is, its port,
    /// and the earlier connections from the same port (whose 4-tuple it reuses).
    fn on(&self) -> String {
        let last = self.last_server.as_deref().unwrap_or("nobody");
        let (Some(c), Some(now)) = (&self.conn, self.opened.last()) else { return format!("before connecting (last answer from {last})") };
        let n = self.opened.len();
        let before: Vec<String> = self.opened[..n - 1]
            .iter()
            .enumerate()
            .filter(|(_, o)| o.port == now.port)
            .map(|(i, o)| format!("connection {} (answered by {})", i + 1, o.server.as_deref().unwrap_or("nobody")))
            .collect();
        format!(
            "on connection {n} from port {} ({} answered on it; the same port earlier: {}; last answer from {last})",
            now.port,
            c.answered,
            if before.is_empty() { "none".to_string() } else { before.join(", ") }
        )
    }

    /// Opens a new connection (replacing the current one, if any).
    fn open(&mut self) -> Result<(), Attempt> {
        self.conn = None;
        let stream = connect_tcp(&self.ns, self.src, self.dst).map_err(|e| Attempt::Failed { timed_out: timed_out(&e), error: format!("connect: {e}") })?;
        stream.set_read_timeout(Some(self.timeout)).and_then(|()| stream.set_write_timeout(Some(self.timeout))).map_err(|e| Attempt::failed(format!("setting timeouts: {e}")))?;
        let reader = BufReader::new(Patient(stream.try_clone().map_err(|e| Attempt::failed(e.to_string()))?));
        self.opened.push(Opened { port: stream.local_addr().map_or(0, |a| a.port()), server: None });
        self.conn = Some(Conn { stream, reader, answered: 0 });
        Ok(())
    }

    fn attempt(&mut self) -> Attempt {
        if let Churn::ClientCloses(n) = self.churn
            && self.conn.as_ref().is_some_and(|c| c.answered >= n)
        {
            self.conn = None;
        }
        if self.conn.is_none()
            && let Err(a) = self.open()
        {
            return a;
        }
        let close = matches!(self.churn, Churn::ServerCloses(n) if self.conn.as_ref().is_some_and(|c| c.answered + 1 >= n));
        let request: &[u8] = if close { b"GET / HTTP/1.1\r\nHost: demo\r\nConnection: close\r\n\r\n" } else { b"GET / HTTP/1.1\r\nHost: demo\r\n\r\n" };
        let conn = self.conn.as_mut().expect("connected");
        if let Err(e) = conn.stream.write_all(request) {
            return if closed(&e) { Attempt::ClosedEarly(format!("write: {e}")) } else { Attempt::Failed { timed_out: timed_out(&e), error: format!("write: {e}") } };
        }
        let resp = match read_response(&mut conn.reader) {
            Ok(r) => r,
            Err(e) => return e.into(),
        };
        conn.answered += 1;
        if !resp.status.starts_with("HTTP/1.1 200 ") {
            return Attempt::failed(format!("{} {}", resp.status, String::from_utf8_lossy(&resp.body)));
        }
        if close && !resp.closes() {
            return Attempt::failed(format!("asked Connection: close, answered {:?}", resp.header("connection")));
        }
        let v: serde_json::Value = match serde_json::from_slice(&resp.body) {
            Ok(v) => v,
            Err(e) => return Attempt::failed(format!("bad body: {e}")),
        };
        if let Some(o) = self.opened.last_mut()
            && o.server.is_none()
        {
            o.server = v["server"].as_str().map(str::to_string);
        }
        if resp.closes() {
            // The server closes first: wait for it.
            if let Err(e) = expect_close(&mut conn.reader) {
                return e.into();
            }
            self.conn = None;
            if matches!(self.churn, Churn::ServerCloses(_)) {
                // The next connection at once; if it cannot be opened, the next request tries
                // again (and fails if it cannot either).
                let _ = self.open();
            }
        }
        Attempt::Answer(v)
    }

    /// One request, with the single retry allowed; checks the session it answers with.
    pub fn request(&mut self) {
        self.requests += 1;
        let r = match self.attempt() {
            Attempt::Answer(v) => Ok(v),
            Attempt::Failed { error, timed_out } => Err((format!("{error} {}", self.on()), timed_out)),
            Attempt::ClosedEarly(first) => {
                let first = format!("{first} {}", self.on());
                self.conn = None;
                self.retries += 1;
                match self.attempt() {
                    Attempt::Answer(v) => Ok(v),
                    Attempt::Failed { error, timed_out } => Err((format!("{first}; retry: {error} {}", self.on()), timed_out)),
                    Attempt::ClosedEarly(e) => Err((format!("{first}; retry: {e} {}", self.on()), false)),
                }
            }
        };
        match r {
            Ok(v) => self.check(&v),
            Err((e, timed_out)) => {
                self.conn = None;
                self.timeouts += u64::from(timed_out);
                self.failures.push(format!("{}: request {} failed: {e}", self.src, self.requests));
            }
        }
    }

    fn check(&mut self, v: &serde_json::Value) {
        let server = v["server"].as_str().unwrap_or("?").to_string();
        let count = v["count"].as_u64().unwrap_or(0);
        let expected = self.last.map_or(1, |p| p + 1);
        let mut wrong = Vec::new();
        if count != expected {
            wrong.push(format!("count {count} after {:?} (expected {expected})", self.last));
        }
        let history: Vec<u64> = v["history"].as_array().into_iter().flatten().filter_map(serde_json::Value::as_u64).collect();
        let want: Vec<u64> = (count.saturating_sub(HISTORY - 1).max(1)..=count).collect();
        if history != want {
            wrong.push(format!("history {history:?} (expected {want:?})"));
        }
        if v["client"].as_str() != Some(self.src.to_string().as_str()) {
            wrong.push(format!("client {} (expected {})", v["client"], self.src));
        }
        if !wrong.is_empty() {
            self.breaks.push(format!("{}: request {} answered by {server}: {}", self.src, self.requests, wrong.join(", ")));
        }
        self.last = Some(count);
        self.answered += 1;
        *self.servers.entry(server.clone()).or_default() += 1;
        self.last_server = Some(server);
    }

    /// Whether every request was answered, continuing the session without a break: the last
    /// count is the number of requests.
    #[must_use]
    pub fn intact(&self) -> bool {
        self.failures.is_empty() && self.breaks.is_empty() && self.answered == self.requests && self.last == Some(self.requests)
    }

    /// Its story, for a test's message: requests, answers per server, every connection opened
    /// (its port and who answered on it) and what went wrong.
    #[must_use]
    pub fn history(&self) -> String {
        let conns: Vec<String> = self.opened.iter().map(|o| format!("{}:{}", o.port, o.server.as_deref().unwrap_or("-"))).collect();
        let problems = self.problems();
        format!(
            "{}: {} requests, {} answered, {} retried, last count {:?} from {:?}, servers {:?}, connections [{}]{}",
            self.src,
            self.requests,
            self.answered,
            self.retries,
            self.last,
            self.last_server,
            self.servers,
            conns.join(" "),
            if problems.is_empty() { String::new() } else { format!("; {problems}") }
        )
    }

    /// What went wrong, for a test's message.
    #[must_use]
    pub fn problems(&self) -> String {
        let mut p: Vec<String> = self.failures.iter().chain(&self.breaks).cloned().collect();
        if p.is_empty() && !self.intact() {
            p.push(format!("{}: {} requests, {} answered, last count {:?}", self.src, self.requests, self.answered, self.last));
        }
        p.join("\n")
    }
}
