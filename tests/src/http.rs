//! A keep-alive HTTP/1.1 client for the demo application, checking its session on every
//! answer: the counter goes 1, 2, 3... with no gap or repeat, the history is the last counts,
//! and the client is the address it connected from.

use std::{
    collections::HashMap,
    io::{BufRead as _, BufReader, ErrorKind, Read as _, Write as _},
    net::{IpAddr, SocketAddr, TcpStream},
};

use crate::app::connect_tcp;

/// Counts in a session's history (as the demo applications keep them).
pub const HISTORY: u64 = 5;

/// One keep-alive HTTP/1.1 client. A request is retried once, on a new connection, only when
/// its connection closed before any byte of a response (as browsers do: the server closed an
/// idle keep-alive connection, or one whose session moved); any other failure (a timeout, a
/// reset or close mid-response, a bad answer) is a failed request.
pub struct HttpClient {
    ns: String,
    pub src: IpAddr,
    dst: SocketAddr,
    conn: Option<(TcpStream, BufReader<TcpStream>)>,
    /// The last count answered.
    pub last: Option<u64>,
    /// Answers per server name.
    pub servers: HashMap<String, u64>,
    /// Requests made, answered (200 with a session) and retried.
    pub requests: u64,
    pub answered: u64,
    pub retries: u64,
    /// Requests that failed (after the one retry allowed).
    pub failures: Vec<String>,
    /// Answers that broke the session: a count that is not the last one plus one (the first
    /// is 1), a wrong history, or another client's session.
    pub breaks: Vec<String>,
}

/// How one attempt at a request went.
enum Attempt {
    Answer(serde_json::Value),
    /// The connection closed (or was reset) before any byte of a response: retry.
    ClosedEarly(String),
    Failed(String),
}

fn closed(e: &std::io::Error) -> bool {
    matches!(e.kind(), ErrorKind::BrokenPipe | ErrorKind::ConnectionReset | ErrorKind::ConnectionAborted | ErrorKind::UnexpectedEof)
}

impl HttpClient {
    #[must_use]
    pub fn new(ns: &str, src: IpAddr, dst: SocketAddr) -> Self {
        Self { ns: ns.into(), src, dst, conn: None, last: None, servers: HashMap::new(), requests: 0, answered: 0, retries: 0, failures: Vec::new(), breaks: Vec::new() }
    }

    /// Closes the keep-alive connection: the next request opens a new one (which the kernel
    /// steers if this client moved).
    pub fn reconnect(&mut self) {
        self.conn = None;
    }

    fn attempt(&mut self) -> Attempt {
        if self.conn.is_none() {
            let s = match connect_tcp(&self.ns, self.src, self.dst) {
                Ok(s) => s,
                Err(e) => return Attempt::Failed(format!("connect: {e}")),
            };
            let r = match s.try_clone() {
                Ok(r) => BufReader::new(r),
                Err(e) => return Attempt::Failed(e.to_string()),
            };
            self.conn = Some((s, r));
        }
        let (s, r) = self.conn.as_mut().expect("connected");
        if let Err(e) = s.write_all(b"GET / HTTP/1.1\r\nHost: demo\r\n\r\n") {
            return if closed(&e) { Attempt::ClosedEarly(format!("write: {e}")) } else { Attempt::Failed(format!("write: {e}")) };
        }
        let mut status = String::new();
        match r.read_line(&mut status) {
            Ok(0) => return Attempt::ClosedEarly("closed before any response byte".into()),
            Ok(_) if !status.ends_with('\n') => return Attempt::Failed(format!("closed mid-response after {status:?}")),
            Ok(_) => {}
            Err(e) if status.is_empty() && closed(&e) => return Attempt::ClosedEarly(format!("{e} before any response byte")),
            Err(e) => return Attempt::Failed(format!("reading the status line: {e} (after {status:?})")),
        }
        let mut len = None;
        let mut line = String::new();
        loop {
            line.clear();
            match r.read_line(&mut line) {
                Ok(0) => return Attempt::Failed("closed mid-response".into()),
                Ok(_) => {}
                Err(e) => return Attempt::Failed(format!("reading headers: {e}")),
            }
            if line == "\r\n" {
                break;
            }
            if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                len = v.trim().parse::<usize>().ok();
            }
        }
        let Some(len) = len else { return Attempt::Failed("no content-length".into()) };
        let mut body = vec![0u8; len];
        if let Err(e) = r.read_exact(&mut body) {
            return Attempt::Failed(format!("body: {e}"));
        }
        if !status.starts_with("HTTP/1.1 200 ") {
            return Attempt::Failed(format!("{} {}", status.trim_end(), String::from_utf8_lossy(&body)));
        }
        match serde_json::from_slice(&body) {
            Ok(v) => Attempt::Answer(v),
            Err(e) => Attempt::Failed(format!("bad body: {e}")),
        }
    }

    /// One request, with the single retry allowed; checks the session it answers with.
    pub fn request(&mut self) {
        self.requests += 1;
        let r = match self.attempt() {
            Attempt::Answer(v) => Ok(v),
            Attempt::Failed(e) => Err(e),
            Attempt::ClosedEarly(first) => {
                self.conn = None;
                self.retries += 1;
                match self.attempt() {
                    Attempt::Answer(v) => Ok(v),
                    Attempt::Failed(e) | Attempt::ClosedEarly(e) => Err(format!("{first}; retry: {e}")),
                }
            }
        };
        match r {
            Ok(v) => self.check(&v),
            Err(e) => {
                self.conn = None;
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
        *self.servers.entry(server).or_default() += 1;
    }

    /// Whether every request was answered, continuing the session without a break: the last
    /// count is the number of requests.
    #[must_use]
    pub fn intact(&self) -> bool {
        self.failures.is_empty() && self.breaks.is_empty() && self.answered == self.requests && self.last == Some(self.requests)
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
