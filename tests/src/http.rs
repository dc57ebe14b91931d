//! A keep-alive HTTP/1.1 client for the demo application, checking its session counter.

use std::{
    collections::HashMap,
    io::{BufRead as _, BufReader, Read as _, Write as _},
    net::{IpAddr, SocketAddr, TcpStream},
};

use crate::app::connect_tcp;

/// One keep-alive HTTP/1.1 client, retrying once when a connection closes before a response
/// (as browsers do).
pub struct HttpClient {
    ns: String,
    pub src: IpAddr,
    dst: SocketAddr,
    conn: Option<(TcpStream, BufReader<TcpStream>)>,
    pub last: Option<u64>,
    pub servers: HashMap<String, u64>,
    pub requests: u64,
    pub failures: Vec<String>,
}

impl HttpClient {
    #[must_use]
    pub fn new(ns: &str, src: IpAddr, dst: SocketAddr) -> Self {
        Self { ns: ns.into(), src, dst, conn: None, last: None, servers: HashMap::new(), requests: 0, failures: Vec::new() }
    }

    fn try_once(&mut self) -> Result<serde_json::Value, String> {
        if self.conn.is_none() {
            let s = connect_tcp(&self.ns, self.src, self.dst).map_err(|e| format!("connect: {e}"))?;
            let r = BufReader::new(s.try_clone().map_err(|e| e.to_string())?);
            self.conn = Some((s, r));
        }
        let (s, r) = self.conn.as_mut().expect("connected");
        s.write_all(b"GET / HTTP/1.1\r\nHost: demo\r\n\r\n").map_err(|e| format!("write: {e}"))?;
        let mut len = None;
        let mut line = String::new();
        let mut first = true;
        loop {
            line.clear();
            let n = r.read_line(&mut line).map_err(|e| format!("read: {e}"))?;
            if n == 0 {
                return Err(if first { "closed before any response".into() } else { "closed mid-response".into() });
            }
            first = false;
            if line == "\r\n" {
                break;
            }
            if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                len = v.trim().parse::<usize>().ok();
            }
        }
        let mut body = vec![0u8; len.ok_or("no content-length")?];
        r.read_exact(&mut body).map_err(|e| format!("body: {e}"))?;
        serde_json::from_slice(&body).map_err(|e| format!("bad body: {e}"))
    }

    /// One request, with the single retry; checks the session counter moves by exactly one.
    pub fn request(&mut self) {
        self.requests += 1;
        let r = match self.try_once() {
            Ok(v) => Ok(v),
            Err(first) => {
                self.conn = None;
                self.try_once().map_err(|e| format!("{first}; retry: {e}"))
            }
        };
        match r {
            Ok(v) => {
                let count = v["count"].as_u64().unwrap_or(0);
                if let Some(prev) = self.last
                    && count != prev + 1
                {
                    self.failures.push(format!("{}: count {count} after {prev} (from {})", self.src, v["server"]));
                }
                self.last = Some(count);
                *self.servers.entry(v["server"].as_str().unwrap_or("?").to_string()).or_default() += 1;
            }
            Err(e) => {
                self.conn = None;
                self.failures.push(format!("{}: request {} failed: {e}", self.src, self.requests));
            }
        }
    }
}

