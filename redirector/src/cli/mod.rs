//! The operator CLI (see docs/cli.md): one module per command group, each doing its work with
//! the library and returning a [`render::Report`], which [`render`] prints as text for people
//! or as JSON for scripts.

mod adopt;
mod agent;
mod ask;
mod config;
mod doctor;
mod drain;
mod generate;
mod instance;
mod render;
mod rule;
mod service;
mod sibling;
mod tls;

use std::path::PathBuf;

use anyhow::{Context as _, bail};
use clap::{Args, Parser, Subcommand};

pub use self::{adopt::AdoptCmd, agent::AgentArgs, ask::AgentSocket, config::ConfigCmd, rule::RuleCmd, service::ServiceCmd, sibling::SiblingCmd, tls::TlsCmd};

/// redirector: servers that share load among themselves. Operator commands on the kernel
/// datapath's pinned state.
#[derive(Debug, Parser)]
#[command(name = "redirector", version, about)]
pub struct Cli {
    #[command(flatten)]
    pub global: Global,
    #[command(subcommand)]
    pub command: Command,
}

/// Flags every command takes.
#[derive(Debug, Args)]
pub struct Global {
    /// bpffs to pin in, mounted there if it is not a bpffs yet [default: /sys/fs/bpf].
    #[arg(long, global = true)]
    pub bpffs: Option<PathBuf>,
    /// Instance name: pins live in <bpffs>/redirector/<instance>/ [default: default; for the
    /// agent, its node name].
    #[arg(long, global = true)]
    pub instance: Option<String>,
    /// Enter network namespace /run/netns/<NAME> first (like `ip -n`).
    #[arg(long, global = true)]
    pub netns: Option<String>,
    /// Print one JSON document instead of a table.
    #[arg(long, global = true)]
    pub json: bool,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Services this host steers (origin side).
    #[command(subcommand)]
    Service(ServiceCmd),
    /// Migrated client prefixes (origin side).
    #[command(subcommand)]
    Rule(RuleCmd),
    /// Siblings allowed to send tunnelled packets here (target side).
    #[command(subcommand)]
    Sibling(SiblingCmd),
    /// Siblings' services served here (target side).
    #[command(subcommand)]
    Adopt(AdoptCmd),
    /// Per-decision counters of the kernel programs.
    Stats,
    /// Established connections per client, counted in the kernel for the application's cgroup.
    Load {
        /// Start counting for the application in this cgroup v2 folder (idempotent).
        #[arg(long)]
        cgroup: Option<PathBuf>,
    },
    /// Load and attach the programs (idempotent); --replace swaps in this binary's programs.
    Attach {
        /// Uplink interface.
        #[arg(long)]
        dev: String,
        /// Replace the attached programs atomically, keeping the pinned maps.
        #[arg(long)]
        replace: bool,
    },
    /// Detach everything, give adopted services back (routes, interface settings) and remove
    /// the instance's pins.
    Teardown {
        /// Only remove the pins (detaching the programs), without reading the maps: for an
        /// instance this version cannot open. Routes of services it adopted stay.
        #[arg(long)]
        force: bool,
    },
    /// Run the agent: negotiate with siblings and shed load by itself.
    Agent(AgentArgs),
    /// Validate an agent configuration file.
    #[command(subcommand)]
    Config(ConfigCmd),
    /// Make the cluster CA and node certificates for the peer channel.
    #[command(subcommand)]
    Tls(TlsCmd),
    /// Ask a running agent for its status (admin socket).
    Status {
        #[command(flatten)]
        agent: AgentSocket,
    },
    /// Ask the running agent to move clients to siblings with room now, with their sessions
    /// (never a client adopted here, nor one already moved out).
    Move {
        /// Client addresses.
        #[arg(required = true)]
        clients: Vec<std::net::IpAddr>,
        /// Move them to this sibling (a node name), and no other.
        #[arg(long, value_name = "NODE")]
        to: Option<String>,
        #[command(flatten)]
        agent: AgentSocket,
    },
    /// Ask the running agent to bring clients back with their sessions: clients moved out
    /// from here come home, clients adopted here go back to their origin. (`rule del` changes
    /// the pinned rules without an agent: the clients come home without their sessions.)
    GiveBack {
        /// Client addresses.
        #[arg(required = true)]
        clients: Vec<std::net::IpAddr>,
        #[command(flatten)]
        agent: AgentSocket,
    },
    /// Ask the running agent to drain this node: move every client to siblings with its
    /// session, give adopted clients back, offer no room and take no client home, until
    /// `undrain` (kept across restarts of the agent). Waits until nothing is left to move
    /// (up to --timeout-secs), showing the progress on a terminal.
    Drain {
        /// Only ask; do not wait (`status` shows the progress).
        #[arg(long)]
        no_wait: bool,
        #[command(flatten)]
        agent: AgentSocket,
    },
    /// Ask the running agent to take load again after a drain: it offers room at once, and
    /// its moved clients come home after `home_after_secs` (or now with `give-back`).
    Undrain {
        #[command(flatten)]
        agent: AgentSocket,
    },
    /// Check that this host has what the agent needs (kernel, BPF, cgroup, uplink MTU,
    /// neighbour table, certificates, siblings), each failure with its fix; exit 1 if any fails.
    Doctor {
        /// The agent's configuration: also check its services, certificates and siblings.
        #[arg(long)]
        config: Option<PathBuf>,
    },
    /// Print the shell completion script for SHELL (docs/cli.md says where to put it).
    Completions {
        /// bash, zsh, fish, elvish or powershell.
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Print the manual page, or write one page per command into --dir.
    Man {
        /// Folder to write redirector.1, redirector-rule.1, ... into (created if missing).
        #[arg(long)]
        dir: Option<PathBuf>,
    },
}

/// Runs one CLI command and prints what it reports.
///
/// # Errors
/// The command failed: the error says what was being done.
pub fn run(cli: Cli) -> anyhow::Result<()> {
    let Cli { global, command } = cli;
    let report = match command {
        Command::Agent(args) => return agent::execute(&args, &global),
        Command::Doctor { config } => doctor::execute(config.as_deref(), &global)?,
        Command::Completions { shell } => return generate::completions(shell),
        Command::Man { dir } => return generate::man(dir.as_deref()),
        Command::Config(cmd) => cmd.execute()?,
        Command::Tls(cmd) => cmd.execute()?,
        Command::Status { agent } => ask::status(&agent)?,
        Command::Move { clients, to, agent } => ask::move_clients(&agent, clients, to.as_deref())?,
        Command::GiveBack { clients, agent } => ask::give_back(&agent, clients)?,
        Command::Drain { no_wait, agent } => drain::drain(&agent, no_wait, global.json)?,
        Command::Undrain { agent } => drain::undrain(&agent)?,
        Command::Service(cmd) => cmd.execute(&global)?,
        Command::Rule(cmd) => cmd.execute(&global)?,
        Command::Sibling(cmd) => cmd.execute(&global)?,
        Command::Adopt(cmd) => cmd.execute(&global)?,
        Command::Stats => instance::stats(&global)?,
        Command::Load { cgroup } => instance::load(&global, cgroup.as_deref())?,
        Command::Attach { dev, replace } => instance::attach(&global, &dev, replace)?,
        Command::Teardown { force } => instance::teardown(&global, force)?,
    };
    render::print(&report, global.json)?;
    if let render::Report::Doctor(checks) = &report {
        doctor::verdict(checks)?;
    }
    // The agent answered, and its answer is printed, but it did nothing.
    if let render::Report::GivenBack(g) = &report
        && g.given_back == 0
    {
        bail!("no client was given back (see the agent's log for why)");
    }
    Ok(())
}

/// Enters network namespace /run/netns/`name`, for this thread and the ones it starts after.
fn enter_netns(name: &str) -> anyhow::Result<()> {
    if name.is_empty() || name.contains('/') {
        bail!("bad network namespace name {name:?}");
    }
    let path = format!("/run/netns/{name}");
    let f = std::fs::File::open(&path).with_context(|| format!("network namespace {name} not found ({path})"))?;
    nix::sched::setns(f, nix::sched::CloneFlags::CLONE_NEWNET).with_context(|| format!("entering network namespace {name}"))?;
    Ok(())
}
