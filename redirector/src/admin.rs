//! The admin socket: a Unix socket (mode 0600) answering `status` with one JSON document, and
//! JSON requests that ask the running agent to move clients (with their sessions).

use std::sync::Arc;

use anyhow::Context as _;
use tokio::{
    io::{AsyncBufReadExt as _, AsyncWriteExt as _, BufReader},
    net::UnixListener,
};
use tracing::warn;

use crate::agent::Agent;

/// Serves the admin socket until the process ends.
pub async fn serve(agent: Arc<Agent>) {
    if let Err(e) = serve_inner(agent).await {
        warn!("admin socket: {e:#}");
    }
}

async fn serve_inner(agent: Arc<Agent>) -> anyhow::Result<()> {
    let path = agent.admin_socket();
    // Mode 0600 from the start: the socket appears only once set up.
    let listener = crate::sock::bind(&path, 0o600, None)?;
    listener.set_nonblocking(true).context("admin socket")?;
    let listener = UnixListener::from_std(listener).context("admin socket")?;
    let mut failures = crate::sock::AcceptFailures::default();
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => {
                failures.reset();
                stream
            }
            Err(e) => {
                failures.wait("admin connections", &e).await;
                continue;
            }
        };
        let agent = agent.clone();
        tokio::spawn(async move {
            let (r, mut w) = stream.into_split();
            let mut line = String::new();
            // A client that never says anything does not hold a task forever.
            match tokio::time::timeout(std::time::Duration::from_secs(5), BufReader::new(r).read_line(&mut line)).await {
                Ok(Ok(_)) => {}
                _ => return,
            }
            let answer = match line.trim() {
                "status" => agent.status().await,
                req if req.starts_with('{') => request(agent, req).await,
                other => serde_json::json!({ "error": format!("unknown request {other:?}: try status, or a JSON request") }),
            };
            let _ = w.write_all(format!("{answer}\n").as_bytes()).await;
        });
    }
}

/// A JSON request to the agent (one line).
#[derive(Debug, serde::Deserialize)]
#[serde(tag = "op", rename_all = "kebab-case", deny_unknown_fields)]
enum Request {
    /// Move these clients to siblings with room now, as shedding would (one connection each
    /// assumed): `{"op":"move","clients":["198.18.1.5",...]}`, answered `{"moved":N,"ms":T}`.
    Move { clients: Vec<String> },
    /// Bring these clients back with their sessions: moved-out ones come home from their
    /// volunteer, adopted ones go back to their origin:
    /// `{"op":"give-back","clients":[...]}`, answered `{"given_back":N,"asked":M,"ms":T}`.
    GiveBack { clients: Vec<String> },
}

/// The addresses of a request, or which one is not an address.
fn addresses(clients: &[String]) -> Result<Vec<std::net::IpAddr>, String> {
    clients.iter().map(|c| crate::app::parse_client(c).ok_or_else(|| format!("{c:?} is not an address"))).collect()
}

async fn request(agent: Arc<Agent>, req: &str) -> serde_json::Value {
    let req: Request = match serde_json::from_str(req) {
        Ok(r) => r,
        Err(e) => return serde_json::json!({ "error": format!("malformed request: {e}") }),
    };
    let t0 = std::time::Instant::now();
    let ms = || t0.elapsed().as_secs_f64() * 1000.0;
    match req {
        Request::Move { clients } => match addresses(&clients) {
            Err(e) => serde_json::json!({ "error": e }),
            Ok(c) => match agent.move_clients(c.into_iter().map(|a| (a, 1)).collect()).await {
                Ok(n) => serde_json::json!({ "moved": n, "ms": ms() }),
                Err(e) => serde_json::json!({ "error": format!("{e:#}") }),
            },
        },
        Request::GiveBack { clients } => match addresses(&clients) {
            Err(e) => serde_json::json!({ "error": e }),
            Ok(c) => match agent.give_back_clients(c).await {
                Ok(n) => serde_json::json!({ "given_back": n, "asked": clients.len(), "ms": ms() }),
                Err(e) => serde_json::json!({ "error": format!("{e:#}") }),
            },
        },
    }
}

/// Sends one request line to a running agent and returns its answer.
pub fn ask(path: &std::path::Path, line: &str, timeout: std::time::Duration) -> anyhow::Result<serde_json::Value> {
    use std::io::{BufRead as _, Write as _};
    let mut s = std::os::unix::net::UnixStream::connect(path).with_context(|| format!("connecting to the agent's admin socket {} (is the agent running?)", path.display()))?;
    s.set_read_timeout(Some(timeout))?;
    s.write_all(line.as_bytes())?;
    s.write_all(b"\n")?;
    let mut answer = String::new();
    std::io::BufReader::new(s).read_line(&mut answer).context("reading the agent's answer")?;
    serde_json::from_str(&answer).context("parsing the agent's answer")
}

/// `redirector status`: asks a running agent.
pub fn query(path: &std::path::Path) -> anyhow::Result<serde_json::Value> {
    use std::io::{BufRead as _, Write as _};
    let mut s = std::os::unix::net::UnixStream::connect(path).with_context(|| format!("connecting to the agent's admin socket {} (is the agent running?)", path.display()))?;
    s.set_read_timeout(Some(std::time::Duration::from_secs(5)))?;
    s.write_all(b"status\n")?;
    let mut line = String::new();
    std::io::BufReader::new(s).read_line(&mut line).context("reading the agent's answer")?;
    serde_json::from_str(&line).context("parsing the agent's answer")
}
