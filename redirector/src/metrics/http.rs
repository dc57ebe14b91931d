//! The smallest HTTP/1.1 server that Prometheus and a health check need: `GET /metrics` and
//! `GET /healthz`, one request per connection, then close. Anyone who can reach
//! `metrics_listen` can ask, so it holds no secret and does little per request: a bounded
//! request head, a deadline, a few connections at once.

use std::{sync::Arc, time::Duration};

use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::{TcpListener, TcpStream},
    sync::Semaphore,
};
use tracing::{info, warn};

use crate::agent::Agent;

/// Largest request head read (request line and headers).
const MAX_HEAD: usize = 8 << 10;
/// How long a client has to send its request and read the answer.
const DEADLINE: Duration = Duration::from_secs(5);
/// Requests served at once; more connections wait in the kernel's backlog.
const AT_ONCE: usize = 8;

/// Serves `listener` (bound by the caller, so that a bad address stops the agent's start)
/// until the process ends.
pub async fn serve(agent: Arc<Agent>, listener: std::net::TcpListener) {
    let listener = match listener.set_nonblocking(true).and_then(|()| TcpListener::from_std(listener)) {
        Ok(l) => l,
        Err(e) => return warn!("metrics: {e}"),
    };
    if let Ok(a) = listener.local_addr() {
        info!(address = %a, "metrics and health served over HTTP (/metrics, /healthz)");
    }
    let slots = Arc::new(Semaphore::new(AT_ONCE));
    loop {
        let Ok(permit) = slots.clone().acquire_owned().await else { return };
        let conn = match listener.accept().await {
            Ok((c, _)) => c,
            Err(e) => {
                warn!("metrics: accepting a connection: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let agent = agent.clone();
        tokio::spawn(async move {
            let _ = tokio::time::timeout(DEADLINE, answer(&agent, conn)).await;
            drop(permit);
        });
    }
}

async fn answer(agent: &Arc<Agent>, mut conn: TcpStream) -> std::io::Result<()> {
    let (status, kind, body) = match read_head(&mut conn).await? {
        Err(why) => ("400 Bad Request", "text/plain", format!("{why}\n")),
        Ok(Target::Metrics) => {
            let (status, health) = (agent.status().await, agent.health().await);
            ("200 OK", "application/openmetrics-text; version=1.0.0; charset=utf-8", super::render(&status, agent.tally(), health.is_empty()))
        }
        Ok(Target::Health) => match agent.health().await {
            problems if problems.is_empty() => ("200 OK", "text/plain", "ok\n".to_string()),
            problems => ("503 Service Unavailable", "text/plain", problems.join("\n") + "\n"),
        },
        Ok(Target::Other(path)) => ("404 Not Found", "text/plain", format!("nothing at {path}: try /metrics or /healthz\n")),
        Ok(Target::NotGet) => ("405 Method Not Allowed", "text/plain", "only GET\n".to_string()),
    };
    let head = format!("HTTP/1.1 {status}\r\nContent-Type: {kind}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n", body.len());
    conn.write_all(head.as_bytes()).await?;
    conn.write_all(body.as_bytes()).await?;
    conn.shutdown().await
}

/// What a request asks for.
#[derive(Debug, PartialEq, Eq)]
enum Target {
    Metrics,
    Health,
    Other(String),
    NotGet,
}

/// Reads a request head (up to its blank line, at most [`MAX_HEAD`] bytes) and what it asks
/// for; `Err` says why it cannot be served.
async fn read_head(conn: &mut TcpStream) -> std::io::Result<Result<Target, String>> {
    let mut head = Vec::with_capacity(1024);
    let mut buf = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        if head.len() >= MAX_HEAD {
            return Ok(Err(format!("request head over {MAX_HEAD} bytes")));
        }
        let n = conn.read(&mut buf).await?;
        if n == 0 {
            return Ok(Err("the request ended before its blank line".into()));
        }
        head.extend_from_slice(&buf[..n]);
    }
    Ok(parse(&head))
}

fn parse(head: &[u8]) -> Result<Target, String> {
    let line = head.split(|b| *b == b'\n').next().unwrap_or_default();
    let line = std::str::from_utf8(line).map_err(|_| "the request line is not text".to_string())?.trim_end();
    let mut words = line.split(' ');
    let (Some(method), Some(target), Some(version), None) = (words.next(), words.next(), words.next(), words.next()) else {
        return Err("not an HTTP request line".into());
    };
    if !version.starts_with("HTTP/1.") {
        return Err(format!("{version} is not HTTP/1.x"));
    }
    if method != "GET" {
        return Ok(Target::NotGet);
    }
    // The query, if any, is ignored (Prometheus may add one).
    let path = target.split('?').next().unwrap_or_default();
    Ok(match path {
        "/metrics" => Target::Metrics,
        "/healthz" => Target::Health,
        other => Target::Other(other.chars().take(100).collect()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_are_read_for_their_path_only() {
        assert_eq!(parse(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n"), Ok(Target::Metrics));
        assert_eq!(parse(b"GET /healthz?x=1 HTTP/1.0\r\n\r\n"), Ok(Target::Health));
        assert_eq!(parse(b"POST /metrics HTTP/1.1\r\n\r\n"), Ok(Target::NotGet));
        assert_eq!(parse(b"GET /x HTTP/1.1\r\n\r\n"), Ok(Target::Other("/x".into())));
        for bad in [&b"GET /metrics\r\n\r\n"[..], b"GET /metrics SPDY/3\r\n\r\n", b"\xff\xfe\r\n\r\n", b"GET  /metrics HTTP/1.1\r\n\r\n"] {
            assert!(parse(bad).is_err(), "{bad:?}");
        }
    }
}
