//! Asking a running agent over its admin socket (the CLI, scripts through it, the tests).

use std::{
    io::{BufRead as _, Write as _},
    net::IpAddr,
    path::Path,
    time::Duration,
};

use anyhow::{Context as _, bail};
use serde::de::DeserializeOwned;

use super::api::{DrainState, GivenBack, MAX_REQUEST, Moved, ProbeSent, Request, Status};

/// How long a status may take to come.
const STATUS_TIMEOUT: Duration = Duration::from_secs(5);

/// Sends `req` to the agent behind `path` and reads its answer as a `T`, waiting at most
/// `timeout` for it.
///
/// # Errors
/// No agent answers there, the agent refused the request (its reason), or its answer is not a
/// `T`.
pub fn ask<T: DeserializeOwned>(path: &Path, req: &Request, timeout: Duration) -> anyhow::Result<T> {
    let mut line = serde_json::to_string(req).context("encoding the request")?;
    line.push('\n');
    if line.len() > MAX_REQUEST {
        bail!("the request takes {} MiB, more than the agent reads ({} MiB): ask about fewer clients at once", line.len().div_ceil(1 << 20), MAX_REQUEST >> 20);
    }
    let mut s = std::os::unix::net::UnixStream::connect(path).with_context(|| format!("connecting to the agent's admin socket {} (is the agent running?)", path.display()))?;
    s.set_read_timeout(Some(timeout))?;
    s.write_all(line.as_bytes()).context("sending the request to the agent")?;
    let mut answer = String::new();
    std::io::BufReader::new(s).read_line(&mut answer).context("reading the agent's answer")?;
    let v: serde_json::Value = serde_json::from_str(&answer).with_context(|| format!("the agent's answer is not JSON: {:?}", answer.chars().take(200).collect::<String>()))?;
    if let Some(e) = v.get("error") {
        bail!("the agent says: {}", e.as_str().unwrap_or_default());
    }
    serde_json::from_value(v).context("reading the agent's answer (is it another version?)")
}

/// The status of the agent behind `path`.
///
/// # Errors
/// As [`ask`].
pub fn status(path: &Path) -> anyhow::Result<Status> {
    ask(path, &Request::Status, STATUS_TIMEOUT)
}

/// Asks the agent behind `path` to move `clients` now, with their sessions.
///
/// # Errors
/// As [`ask`].
pub fn move_clients(path: &Path, clients: Vec<IpAddr>, timeout: Duration) -> anyhow::Result<Moved> {
    move_clients_to(path, clients, None, timeout)
}

/// Asks the agent at `path` to move `clients` with their sessions, to sibling `to` only if
/// one is named.
pub fn move_clients_to(path: &Path, clients: Vec<IpAddr>, to: Option<&str>, timeout: Duration) -> anyhow::Result<Moved> {
    ask(path, &Request::Move { clients, to: to.map(str::to_string) }, timeout)
}

/// Asks the agent behind `path` to bring `clients` back, with their sessions.
///
/// # Errors
/// As [`ask`].
pub fn give_back(path: &Path, clients: Vec<IpAddr>, timeout: Duration) -> anyhow::Result<GivenBack> {
    ask(path, &Request::GiveBack { clients }, timeout)
}

/// Asks the agent behind `path` to drain its node (`drain`) or take load again.
///
/// # Errors
/// As [`ask`].
pub fn drain(path: &Path, drain: bool) -> anyhow::Result<DrainState> {
    ask(path, if drain { &Request::Drain {} } else { &Request::Undrain {} }, STATUS_TIMEOUT)
}

/// Asks the agent behind `path` to have sibling `sibling` send the direct-server-return probe
/// from `service` to this node's port `port`, holding `token`.
///
/// # Errors
/// As [`ask`].
pub fn probe(path: &Path, sibling: &str, service: std::net::SocketAddr, port: u16, token: u64) -> anyhow::Result<ProbeSent> {
    ask(path, &Request::Probe { sibling: sibling.to_string(), service, port, token }, STATUS_TIMEOUT)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_request_longer_than_the_agent_reads_is_refused_before_it_is_sent() {
        // 600,000 IPv6 clients: about 24 MiB of JSON. No agent listens at the path: the size
        // is checked first.
        let clients: Vec<IpAddr> = (0..600_000u128).map(|i| IpAddr::V6(std::net::Ipv6Addr::from((0x2001_0db8_ffff_ffff_ffff_ffff_u128 << 64) | i))).collect();
        let e = move_clients(Path::new("/nonexistent/agent.sock"), clients, Duration::from_secs(1)).expect_err("too long");
        assert!(e.to_string().contains("fewer clients"), "{e:#}");
        // 100,000 IPv4 clients fit.
        let clients: Vec<IpAddr> = (0..100_000u32).map(|i| IpAddr::V4(std::net::Ipv4Addr::from(0xc612_4000 + i))).collect();
        let e = move_clients(Path::new("/nonexistent/agent.sock"), clients, Duration::from_secs(1)).expect_err("no agent");
        assert!(e.to_string().contains("is the agent running"), "{e:#}");
    }
}
