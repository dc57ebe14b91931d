//! The admin socket's server: a Unix socket (mode 0600 from the start) answering one request
//! per connection (`api`), by asking the agent.

use std::{path::PathBuf, sync::Arc, time::Duration};

use anyhow::Context as _;
use serde::Serialize;
use tokio::{
    io::{AsyncBufReadExt as _, AsyncReadExt as _, AsyncWriteExt as _, BufReader},
    net::UnixListener,
};
use tracing::warn;

use super::api::{GivenBack, MAX_REQUEST, Moved, ProbeSent, Refused, Request};
use crate::agent::Agent;

/// How long a client may take to send its request: one that says nothing does not hold a
/// task forever.
const READ_TIMEOUT: Duration = Duration::from_secs(5);

/// Serves the admin socket at `path` for `agent` until the process ends.
pub async fn serve(agent: Arc<Agent>, path: PathBuf) {
    if let Err(e) = serve_inner(agent, path).await {
        warn!("admin socket: {e:#}");
    }
}

async fn serve_inner(agent: Arc<Agent>, path: PathBuf) -> anyhow::Result<()> {
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
            let limit = u64::try_from(MAX_REQUEST).unwrap_or(u64::MAX);
            match tokio::time::timeout(READ_TIMEOUT, BufReader::new(r.take(limit)).read_line(&mut line)).await {
                Ok(Ok(_)) => {}
                _ => return,
            }
            if line.len() == MAX_REQUEST && !line.ends_with('\n') {
                let error = format!("request longer than {} MiB: ask about fewer clients at once", MAX_REQUEST >> 20);
                let _ = w.write_all(to_line(&Refused { error }).as_bytes()).await;
                return;
            }
            let answer = match Request::parse(&line) {
                Ok(req) => answer(&agent, req).await,
                Err(error) => to_line(&Refused { error }),
            };
            let _ = w.write_all(answer.as_bytes()).await;
        });
    }
}

/// One answer line.
fn to_line(answer: &impl Serialize) -> String {
    let mut line = serde_json::to_string(answer).unwrap_or_else(|e| format!(r#"{{"error":"encoding the answer: {e}"}}"#));
    line.push('\n');
    line
}

async fn answer(agent: &Arc<Agent>, req: Request) -> String {
    let t0 = std::time::Instant::now();
    let ms = || t0.elapsed().as_secs_f64() * 1000.0;
    let refused = |e: anyhow::Error| to_line(&Refused { error: format!("{e:#}") });
    match req {
        Request::Status => to_line(&agent.status().await),
        // Addresses in the agent's form: an IPv4-mapped IPv6 address is the IPv4 client.
        Request::Move { clients, to } => match agent.clone().move_clients(clients.iter().map(|c| (c.to_canonical(), 1)).collect(), to.as_deref()).await {
            Ok(moved) => to_line(&Moved { moved, ms: ms() }),
            Err(e) => refused(e),
        },
        Request::Probe { sibling, service, port, token } => match agent.probe_via(&sibling, service, port, token).await {
            Ok(()) => to_line(&ProbeSent { ms: ms() }),
            Err(e) => refused(e),
        },
        Request::Drain {} => agent.drain().map_or_else(refused, |d| to_line(&d)),
        Request::Undrain {} => agent.undrain().map_or_else(refused, |d| to_line(&d)),
        Request::GiveBack { clients } => {
            let asked = clients.len();
            match agent.give_back_clients(clients.iter().map(std::net::IpAddr::to_canonical).collect()).await {
                Ok(given_back) => to_line(&GivenBack { given_back, asked, ms: ms() }),
                Err(e) => refused(e),
            }
        }
    }
}
