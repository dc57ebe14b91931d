//! `drain` and `undrain`: asking the running agent to move every client of its node away
//! (and waiting for it, showing the progress on a terminal), or to take load again.

use std::{
    io::{IsTerminal as _, Write as _},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use serde::Serialize;

use super::{ask::AgentSocket, render::Report};
use crate::admin;

/// How often the progress is asked for.
const POLL: Duration = Duration::from_millis(250);

/// What a finished drain did, for people and scripts.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub(super) struct DrainSummary {
    /// The node was drained already when asked.
    pub already: bool,
    /// Clients of this node on siblings now.
    pub moved_out: usize,
    /// Clients adopted from siblings still here (none once done).
    pub adopted: usize,
    /// Connections still finishing here (clients that moved keep their open ones).
    pub connections_finishing: u64,
    /// From the request to nothing left to move, in seconds.
    pub seconds: f64,
}

/// `drain`: drains the node, then (unless `no_wait`) waits until nothing is left to move,
/// within the socket's timeout; the progress goes to standard error when it is a terminal
/// and the output is not JSON.
pub(super) fn drain(agent: &AgentSocket, no_wait: bool, json: bool) -> anyhow::Result<Report> {
    let path = agent.path()?;
    let t0 = Instant::now();
    let state = admin::drain(&path, true)?;
    if no_wait {
        return Ok(Report::DrainState(state));
    }
    let show = !json && std::io::stderr().is_terminal();
    let deadline = t0 + agent.timeout();
    loop {
        let s = admin::status(&path).context("asking the agent how far the drain got")?;
        let Some(d) = s.drain else { bail!("the node was undrained meanwhile (`redirector undrain`)") };
        if show {
            let mut err = std::io::stderr().lock();
            let _ = write!(
                err,
                "\r\x1b[2Kdraining: {} client(s) left ({} connections), {} moved out, {} held by hand-overs, {:.0} s",
                d.clients_left,
                d.connections_left,
                s.migrated_out.len(),
                s.handoffs.clients_in_progress,
                t0.elapsed().as_secs_f64()
            );
            let _ = err.flush();
        }
        if d.done {
            if show {
                eprintln!();
            }
            return Ok(Report::Drained(DrainSummary {
                already: state.already,
                moved_out: s.migrated_out.len(),
                adopted: s.adopted.len(),
                connections_finishing: s.load,
                seconds: t0.elapsed().as_secs_f64(),
            }));
        }
        if Instant::now() >= deadline {
            if show {
                eprintln!();
            }
            let why = s.last_round.map(|r| format!(" (last round: {r})")).unwrap_or_default();
            bail!(
                "the drain is not done after {} s: {} client(s) with {} connections left{why}; the node stays drained and goes on moving them (`redirector status`; `--timeout-secs` to wait longer)",
                agent.timeout().as_secs(),
                d.clients_left,
                d.connections_left
            );
        }
        std::thread::sleep(POLL);
    }
}

/// `undrain`: the node takes load again.
pub(super) fn undrain(agent: &AgentSocket) -> anyhow::Result<Report> {
    Ok(Report::DrainState(admin::drain(&agent.path()?, false)?))
}
