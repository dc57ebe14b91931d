//! The admin socket: a Unix socket (mode 0600) answering `status` with one JSON document.

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
                other => serde_json::json!({ "error": format!("unknown request {other:?}: try status") }),
            };
            let _ = w.write_all(format!("{answer}\n").as_bytes()).await;
        });
    }
}

/// JSON requests: `{"op":"move","clients":["198.18.1.5",...]}` moves those clients now
/// (one connection each assumed), as shedding would; answers `{"moved":N,"ms":T}`.
async fn request(agent: Arc<Agent>, req: &str) -> serde_json::Value {
    let Ok(v) = serde_json::from_str::<serde_json::Value>(req) else {
        return serde_json::json!({ "error": "malformed request" });
    };
    match v["op"].as_str() {
        Some("move") => {
            let clients: Vec<(std::net::IpAddr, u64)> = v["clients"].as_array().into_iter().flatten().filter_map(|c| c.as_str()?.parse().ok()).map(|a| (a, 1)).collect();
            let t0 = std::time::Instant::now();
            match agent.move_clients(clients).await {
                Ok(n) => serde_json::json!({ "moved": n, "ms": t0.elapsed().as_secs_f64() * 1000.0 }),
                Err(e) => serde_json::json!({ "error": format!("{e:#}") }),
            }
        }
        other => serde_json::json!({ "error": format!("unknown op {other:?}") }),
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
