//! The operator CLI on the pinned state (see docs/cli.md).

use std::{
    net::{IpAddr, SocketAddr},
    path::PathBuf,
    time::Duration,
};

use anyhow::{Context as _, bail};
use clap::{Args, Parser, Subcommand};
use serde_json::json;

use crate::{
    admin::api::Status,
    config::Config,
    datapath::{self, Datapath, Location, Prefix},
};

/// The status of an agent as tables for people; `now` is the current Unix time (ages are
/// counted from it).
fn format_status(s: &Status, now: u64) -> String {
    use std::fmt::Write as _;

    use crate::agent::ago;
    let mut out = String::new();
    let since = |t: u64| ago(now.saturating_sub(t));
    let ms_ago = |x: Option<u64>| x.map_or_else(|| "never".to_string(), |m| if m < 10_000 { format!("{}.{}s ago", m / 1000, m % 1000 / 100) } else { ago(m / 1000) });
    let _ = writeln!(out, "node {}  load {} (high {}, low {}){}", s.node, s.load, s.high_watermark, s.low_watermark, if s.shedding { "  shedding" } else { "" });
    if let Some(r) = &s.last_round {
        let _ = writeln!(out, "last shedding round: {r}");
    }
    if s.promised > 0 {
        let _ = writeln!(out, "room promised to adopted clients not arrived yet: {} connections", s.promised);
    }
    let apps = &s.hook.registered;
    let _ = writeln!(out, "applications registered: {}", if apps.is_empty() { "none".to_string() } else { apps.join(", ") });
    let (unconfirmed, h) = (s.hook.unconfirmed, &s.handoffs);
    if unconfirmed + h.awaiting_outcome + h.undecided + h.clients_in_progress > 0 {
        let _ = writeln!(
            out,
            "hand-overs unfinished: {} in progress here, {} awaiting their origin's outcome, {unconfirmed} outcomes not confirmed by an application yet ({} clients held)",
            h.undecided, h.awaiting_outcome, h.clients_in_progress
        );
    }
    if h.handed_back > 0 {
        let _ = writeln!(out, "clients that came home with their sessions: {}", h.handed_back);
    }
    if s.sessions_lost > 0 {
        let _ = writeln!(out, "sessions lost (their clients came home from a sibling that stayed unreachable): {}", s.sessions_lost);
    }
    if s.leaving {
        let _ = writeln!(out, "stopping: handing clients back");
    }
    let mut rows = vec![vec!["SIBLING".into(), "ADDRESS".into(), "UP".into(), "LAST-HEARTBEAT".into(), "LOAD".into()]];
    for x in &s.siblings {
        rows.push(vec![x.name.clone(), x.address.to_string(), if x.up { "up".into() } else { "down".into() }, ms_ago(x.last_heartbeat_ms), x.load.to_string()]);
    }
    out.push_str(&table(&rows));
    let mut rows = vec![vec!["MIGRATED-OUT".into(), "TO".into(), "SINCE".into(), "CONNECTIONS".into()]];
    for m in &s.migrated_out {
        rows.push(vec![m.client.to_string(), m.to.clone(), since(m.since_unix), m.connections.to_string()]);
    }
    out.push_str(&table(&rows));
    let mut rows = vec![vec!["ADOPTED".into(), "FROM".into(), "SINCE".into(), "PROMISED".into(), "HERE".into()]];
    for a in &s.adopted {
        rows.push(vec![a.client.to_string(), a.from.clone(), since(a.since_unix), a.promised.to_string(), a.connections.to_string()]);
    }
    out.push_str(&table(&rows));
    if s.draining > 0 {
        let _ = writeln!(out, "rules draining: {}", s.draining);
    }
    if !s.orphaned.is_empty() {
        let mut rows = vec![vec!["ORPHANED-RULE".into(), "TARGET".into(), "WHY".into()]];
        for o in &s.orphaned {
            rows.push(vec![o.prefix.clone(), o.target.to_string(), o.why.clone()]);
        }
        out.push_str(&table(&rows));
    }
    let mut rows = vec![vec!["COUNTER".into(), "PACKETS".into()]];
    rows.extend(s.counters.iter().map(|(n, c)| vec![n.clone(), c.to_string()]));
    out.push_str(&table(&rows));
    out
}

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
        clients: Vec<IpAddr>,
        #[command(flatten)]
        agent: AgentSocket,
    },
    /// Ask the running agent to bring clients back with their sessions: clients moved out
    /// from here come home, clients adopted here go back to their origin. (`rule del` changes
    /// the pinned rules without an agent: the clients come home without their sessions.)
    GiveBack {
        /// Client addresses.
        #[arg(required = true)]
        clients: Vec<IpAddr>,
        #[command(flatten)]
        agent: AgentSocket,
    },
}

/// Which running agent to ask.
#[derive(Debug, Args)]
pub struct AgentSocket {
    /// The agent's admin socket.
    #[arg(long, conflicts_with = "config")]
    socket: Option<PathBuf>,
    /// Or the agent's configuration file, to find its admin socket.
    #[arg(long)]
    config: Option<PathBuf>,
    /// How long to wait for the agent's answer, in seconds (moving big sessions takes a while).
    #[arg(long, default_value_t = 120)]
    timeout_secs: u64,
}

impl AgentSocket {
    fn path(&self) -> anyhow::Result<PathBuf> {
        match (&self.socket, &self.config) {
            (Some(s), _) => Ok(s.clone()),
            (None, Some(c)) => Ok(Config::load(c)?.admin_socket()),
            (None, None) => bail!("give the agent's --socket or its --config"),
        }
    }

    /// How long to wait for the agent's answer.
    fn timeout(&self) -> Duration {
        Duration::from_secs(self.timeout_secs)
    }
}

/// `redirector agent`: the config file, and flags that override it.
#[derive(Debug, Args)]
pub struct AgentArgs {
    /// TOML configuration file (see examples/redirector.toml).
    #[arg(long)]
    pub config: PathBuf,
    /// Override `node`.
    #[arg(long)]
    pub node: Option<String>,
    /// Override `listen` (the peer channel address).
    #[arg(long)]
    pub listen: Option<SocketAddr>,
    /// Override `high_watermark`.
    #[arg(long)]
    pub high_watermark: Option<u64>,
    /// Override `low_watermark`.
    #[arg(long)]
    pub low_watermark: Option<u64>,
    /// Override `admin_socket`.
    #[arg(long)]
    pub admin_socket: Option<PathBuf>,
    /// Override `drain_secs`.
    #[arg(long)]
    pub drain_secs: Option<u64>,
    /// Override `tls.ca`.
    #[arg(long)]
    pub tls_ca: Option<PathBuf>,
    /// Override `tls.cert`.
    #[arg(long)]
    pub tls_cert: Option<PathBuf>,
    /// Override `tls.key`.
    #[arg(long)]
    pub tls_key: Option<PathBuf>,
    /// Replace the siblings: NAME=ADDR:PORT, repeatable.
    #[arg(long = "sibling", value_parser = parse_sibling)]
    pub siblings: Vec<crate::config::Sibling>,
    /// Replace the services: ADDR:PORT,DEV,CGROUP[,LISTENER][,sessions], repeatable
    /// (`sessions`: the service's clients never move without their sessions).
    #[arg(long = "service", value_parser = parse_service)]
    pub services: Vec<crate::config::Service>,
}

fn parse_sibling(s: &str) -> Result<crate::config::Sibling, String> {
    let (name, addr) = s.split_once('=').ok_or_else(|| format!("{s:?}: expected NAME=ADDR:PORT"))?;
    let address = addr.parse().map_err(|_| format!("{s:?}: {addr:?} is not ADDR:PORT"))?;
    Ok(crate::config::Sibling::new(name, address))
}

fn parse_service(s: &str) -> Result<crate::config::Service, String> {
    let mut parts: Vec<&str> = s.split(',').collect();
    let sessions = parts.len() > 3 && parts.last() == Some(&"sessions");
    if sessions {
        parts.pop();
    }
    let (addr, dev, cgroup, listener) = match parts.as_slice() {
        [addr, dev, cgroup] => (*addr, *dev, *cgroup, None),
        [addr, dev, cgroup, listener] => (*addr, *dev, *cgroup, Some(*listener)),
        _ => return Err(format!("{s:?}: expected ADDR:PORT,DEV,CGROUP[,LISTENER][,sessions]")),
    };
    Ok(crate::config::Service {
        address: addr.parse().map_err(|_| format!("{s:?}: {addr:?} is not ADDR:PORT"))?,
        dev: dev.to_string(),
        cgroup: PathBuf::from(cgroup),
        listener: listener.map(|l| l.parse().map_err(|_| format!("{s:?}: {l:?} is not ADDR:PORT"))).transpose()?,
        sessions,
    })
}

#[derive(Debug, Subcommand)]
pub enum ConfigCmd {
    /// Check FILE without starting anything: one line per problem.
    Check { file: PathBuf },
}

#[derive(Debug, Subcommand)]
pub enum TlsCmd {
    /// Make a cluster CA (ca.pem, ca.key) in DIR.
    Ca {
        #[arg(long, default_value = ".")]
        dir: PathBuf,
    },
    /// Make the certificate of node NAME (NAME.pem, NAME.key), signed by the CA in DIR.
    Node {
        name: String,
        #[arg(long, default_value = ".")]
        dir: PathBuf,
    },
}

#[derive(Debug, Subcommand)]
pub enum ServiceCmd {
    /// Steer TCP service ADDR:PORT (this host's service address).
    Add {
        service: SocketAddr,
        /// Uplink interface the clients' packets arrive on.
        #[arg(long)]
        dev: String,
        /// Outer source of tunnelled packets: this host's control address.
        #[arg(long)]
        tunnel_src: Option<IpAddr>,
        /// Uplink MTU for the MSS clamp (default: the interface's).
        #[arg(long)]
        mtu: Option<u32>,
    },
    /// Stop steering a service.
    Del { service: SocketAddr },
    /// List steered services.
    List,
}

#[derive(Debug, Subcommand)]
pub enum RuleCmd {
    /// Migrate a client address or prefix to a target.
    Add {
        prefix: Prefix,
        /// Target's control address.
        #[arg(long)]
        to: IpAddr,
        /// Skip the readiness probe through the tunnel.
        #[arg(long)]
        no_probe: bool,
        /// How long to wait for the probe's answer.
        #[arg(long, default_value_t = 2000)]
        probe_timeout_ms: u64,
        /// Replace a rule that sends the prefix to another target (its flows living there
        /// break); without it, such a rule is refused.
        #[arg(long)]
        replace: bool,
    },
    /// Withdraw a rule: drain (default 60 s) or remove at once.
    Del {
        prefix: Prefix,
        /// Drain period in seconds.
        #[arg(long, conflicts_with = "now")]
        drain: Option<u64>,
        /// Remove at once (flows living on the target break).
        #[arg(long)]
        now: bool,
    },
    /// List rules.
    List,
}

#[derive(Debug, Subcommand)]
pub enum SiblingCmd {
    /// Accept tunnels whose outer source is ADDR.
    Add {
        addr: IpAddr,
        #[arg(long)]
        dev: String,
    },
    /// Stop accepting tunnels from ADDR.
    Del { addr: IpAddr },
    /// List siblings.
    List,
}

#[derive(Debug, Subcommand)]
pub enum AdoptCmd {
    /// Serve a sibling's service ADDR:PORT here.
    Add {
        service: SocketAddr,
        #[arg(long)]
        dev: String,
        /// Local listening socket (bound to LADDR:LPORT) that receives the connections.
        #[arg(long)]
        listener: Option<SocketAddr>,
        /// Uplink MTU for the SYN-ACK MSS clamp (default: the interface's).
        #[arg(long)]
        mtu: Option<u32>,
    },
    /// Give an adopted service back.
    Del { service: SocketAddr },
    /// List adopted services.
    List,
}

fn enter_netns(name: &str) -> anyhow::Result<()> {
    if name.is_empty() || name.contains('/') {
        bail!("bad network namespace name {name:?}");
    }
    let path = format!("/run/netns/{name}");
    let f = std::fs::File::open(&path).with_context(|| format!("network namespace {name} not found ({path})"))?;
    nix::sched::setns(f, nix::sched::CloneFlags::CLONE_NEWNET).with_context(|| format!("entering network namespace {name}"))?;
    Ok(())
}

fn print_table(rows: &[Vec<String>]) {
    print!("{}", table(rows));
}

/// Rows as aligned columns, one line each.
fn table(rows: &[Vec<String>]) -> String {
    let Some(first) = rows.first() else { return String::new() };
    let mut widths = vec![0; first.len()];
    for r in rows {
        for (w, c) in widths.iter_mut().zip(r) {
            *w = (*w).max(c.len());
        }
    }
    let mut out = String::new();
    for r in rows {
        let line: Vec<String> = r.iter().zip(&widths).map(|(c, w)| format!("{c:<w$}")).collect();
        out.push_str(line.join("  ").trim_end());
        out.push('\n');
    }
    out
}

fn agent_config(args: &AgentArgs, global: &Global) -> anyhow::Result<Config> {
    let mut cfg = Config::load(&args.config)?;
    if let Some(v) = &args.node {
        cfg.node.clone_from(v);
    }
    if let Some(v) = args.listen {
        cfg.listen = Some(v);
    }
    if let Some(v) = args.high_watermark {
        cfg.high_watermark = v;
    }
    if let Some(v) = args.low_watermark {
        cfg.low_watermark = v;
    }
    if let Some(v) = &args.admin_socket {
        cfg.admin_socket = Some(v.clone());
    }
    if let Some(v) = args.drain_secs {
        cfg.drain_secs = v;
    }
    if let Some(v) = &args.tls_ca {
        cfg.tls.ca.clone_from(v);
    }
    if let Some(v) = &args.tls_cert {
        cfg.tls.cert.clone_from(v);
    }
    if let Some(v) = &args.tls_key {
        cfg.tls.key.clone_from(v);
    }
    if !args.siblings.is_empty() {
        cfg.siblings.clone_from(&args.siblings);
    }
    if !args.services.is_empty() {
        cfg.services.clone_from(&args.services);
    }
    if let Some(v) = &global.bpffs {
        cfg.bpffs.clone_from(v);
    }
    if let Some(v) = &global.instance {
        cfg.instance = Some(v.clone());
    }
    if let Some(v) = &global.netns {
        cfg.netns = Some(v.clone());
    }
    Ok(cfg)
}

fn run_agent(cfg: Config) -> anyhow::Result<()> {
    let problems = cfg.problems();
    if !problems.is_empty() {
        bail!("invalid configuration: {}", problems.join("; "));
    }
    if !nix::unistd::Uid::effective().is_root() {
        bail!("{}", datapath::Error::NotRoot);
    }
    // Before the runtime starts its threads, so they all live in the namespace.
    if let Some(ns) = &cfg.netns {
        enter_netns(ns)?;
    }
    let admin_socket = cfg.admin_socket();
    let agent = crate::agent::Agent::new(cfg)?;
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    let ran = rt.block_on(async {
        let (a, path) = (agent.clone(), admin_socket.clone());
        tokio::spawn(async move {
            a.running().await;
            crate::admin::serve(a, path).await;
        });
        agent.run().await
    });
    let _ = std::fs::remove_file(&admin_socket);
    ran
}

/// Runs one CLI command.
#[expect(clippy::too_many_lines, reason = "one short arm per command")]
pub fn run(cli: Cli) -> anyhow::Result<()> {
    match &cli.command {
        Command::Agent(args) => return run_agent(agent_config(args, &cli.global)?),
        Command::Config(ConfigCmd::Check { file }) => {
            let cfg = Config::load(file)?;
            let problems = cfg.problems();
            if problems.is_empty() {
                println!("{}: ok (node {}, {} sibling(s), {} service(s))", file.display(), cfg.node, cfg.siblings.len(), cfg.services.len());
                return Ok(());
            }
            for p in &problems {
                eprintln!("{}: {p}", file.display());
            }
            bail!("{}: {} problem(s)", file.display(), problems.len());
        }
        Command::Tls(TlsCmd::Ca { dir }) => {
            crate::peer::make_ca(dir)?;
            println!("cluster CA written to {}/ca.pem and ca.key (keep ca.key secret)", dir.display());
            return Ok(());
        }
        Command::Tls(TlsCmd::Node { name, dir }) => {
            crate::peer::make_node(dir, name)?;
            println!("certificate for {name} written to {}/{name}.pem and {name}.key", dir.display());
            return Ok(());
        }
        Command::Status { agent } => {
            let s = crate::admin::status(&agent.path()?)?;
            if cli.global.json {
                println!("{}", serde_json::to_string(&s)?);
            } else {
                print!("{}", format_status(&s, datapath::unix_now()));
            }
            return Ok(());
        }
        Command::Move { clients, agent } => {
            let m = crate::admin::move_clients(&agent.path()?, clients.clone(), agent.timeout())?;
            if cli.global.json {
                println!("{}", serde_json::to_string(&m)?);
            } else {
                println!("moved {} of {} client(s) with their sessions in {:.0} ms", m.moved, clients.len(), m.ms);
            }
            return Ok(());
        }
        Command::GiveBack { clients, agent } => {
            let g = crate::admin::give_back(&agent.path()?, clients.clone(), agent.timeout())?;
            if cli.global.json {
                println!("{}", serde_json::to_string(&g)?);
            } else {
                println!("{} of {} client(s) given back with their sessions in {:.0} ms", g.given_back, g.asked, g.ms);
            }
            if g.given_back == 0 {
                bail!("no client was given back (see the agent's log for why)");
            }
            return Ok(());
        }
        _ => {}
    }
    if !nix::unistd::Uid::effective().is_root() {
        bail!("{}", datapath::Error::NotRoot);
    }
    if let Some(ns) = &cli.global.netns {
        enter_netns(ns)?;
    }
    let loc = Location {
        bpffs: cli.global.bpffs.clone().unwrap_or_else(|| PathBuf::from(datapath::DEFAULT_BPFFS)),
        instance: cli.global.instance.clone().unwrap_or_else(|| "default".into()),
    };
    let json = cli.global.json;
    // Only the set-up commands create an instance, once their interface is known to exist;
    // every other command needs one, so a typo never leaves pins and programs behind.
    let dev = match &cli.command {
        Command::Service(ServiceCmd::Add { dev, .. }) | Command::Sibling(SiblingCmd::Add { dev, .. }) | Command::Adopt(AdoptCmd::Add { dev, .. }) | Command::Attach { dev, .. } => {
            Some(dev.as_str())
        }
        _ => None,
    };
    let creates = dev.is_some() || matches!(cli.command, Command::Load { cgroup: Some(_) });
    if matches!(cli.command, Command::Teardown { force: true }) {
        datapath::remove_instance(&loc)?;
        return Ok(());
    }
    if let Some(dev) = dev {
        datapath::interface_index(dev)?;
    }
    let mut dp = if creates { Datapath::open(&loc)? } else { Datapath::open_existing(&loc)? };
    match cli.command {
        Command::Service(ServiceCmd::Add { service, dev, tunnel_src, mtu }) => {
            let s = dp.add_service((service.ip(), service.port()), &dev, tunnel_src, mtu)?;
            if json {
                println!("{}", json!({"service": s.service(), "tunnel_src": s.tunnel_src, "mss_clamp": s.mss_clamp}));
            } else {
                println!("steering {} on {dev} (tunnel source {}, MSS clamp {})", s.service(), s.tunnel_src, s.mss_clamp);
            }
        }
        Command::Service(ServiceCmd::Del { service }) => dp.del_service((service.ip(), service.port()))?,
        Command::Service(ServiceCmd::List) => {
            let list = dp.list_services()?;
            if json {
                let v: Vec<_> = list.iter().map(|s| json!({"service": s.service(), "tunnel_src": s.tunnel_src, "mss_clamp": s.mss_clamp, "ifindex": s.ifindex})).collect();
                println!("{}", json!({ "services": v }));
            } else {
                let mut rows = vec![vec!["SERVICE".into(), "TUNNEL-SRC".into(), "MSS-CLAMP".into(), "IFINDEX".into()]];
                rows.extend(list.iter().map(|s| vec![s.service(), s.tunnel_src.to_string(), s.mss_clamp.to_string(), s.ifindex.to_string()]));
                print_table(&rows);
            }
        }
        Command::Rule(RuleCmd::Add { prefix, to, no_probe, probe_timeout_ms, replace }) => {
            let probe = (!no_probe).then(|| Duration::from_millis(probe_timeout_ms));
            dp.migrate_many(&[prefix], to, probe, replace)?;
            if !json {
                println!("{prefix} -> {to}");
            }
        }
        Command::Rule(RuleCmd::Del { prefix, drain, now }) => {
            if now {
                dp.release(prefix)?;
            } else {
                let period = drain.map_or(datapath::DEFAULT_DRAIN, Duration::from_secs);
                dp.drain(prefix, period)?;
                if !json {
                    println!("{prefix} draining for {} s", period.as_secs());
                }
            }
        }
        Command::Rule(RuleCmd::List) => {
            let rules = dp.list_rules()?;
            if json {
                println!("{}", json!({ "rules": rules }));
            } else {
                let mut rows = vec![vec!["PREFIX".into(), "TARGET".into(), "STATE".into(), "DRAIN-LEFT".into()]];
                rows.extend(rules.iter().map(|r| {
                    vec![
                        r.prefix.to_string(),
                        r.target.to_string(),
                        format!("{:?}", r.state).to_lowercase(),
                        if r.drain_left_ms > 0 { format!("{}.{}s", r.drain_left_ms / 1000, r.drain_left_ms % 1000 / 100) } else { "-".into() },
                    ]
                }));
                print_table(&rows);
            }
        }
        Command::Sibling(SiblingCmd::Add { addr, dev }) => dp.add_sibling(addr, &dev)?,
        Command::Sibling(SiblingCmd::Del { addr }) => dp.del_sibling(addr)?,
        Command::Sibling(SiblingCmd::List) => {
            let list = dp.list_siblings()?;
            if json {
                println!("{}", json!({ "siblings": list }));
            } else {
                for s in list {
                    println!("{s}");
                }
            }
        }
        Command::Adopt(AdoptCmd::Add { service, dev, listener, mtu }) => {
            dp.adopt((service.ip(), service.port()), &dev, listener.map(|l| (l.ip(), l.port())), mtu)?;
        }
        Command::Adopt(AdoptCmd::Del { service }) => dp.unadopt((service.ip(), service.port()))?,
        Command::Adopt(AdoptCmd::List) => {
            let list = dp.list_adopted()?;
            if json {
                let v: Vec<_> = list.iter().map(|(a, p, l)| json!({"service": SocketAddr::new(*a, *p).to_string(), "listener": l})).collect();
                println!("{}", json!({ "adopted": v }));
            } else {
                for (a, p, l) in list {
                    println!("{}{}", SocketAddr::new(a, p), if l { "  (listener)" } else { "" });
                }
            }
        }
        Command::Stats => {
            let s = dp.stats()?;
            if json {
                let m: serde_json::Map<String, serde_json::Value> = s.counters.iter().map(|(n, v)| ((*n).to_string(), json!(v))).collect();
                println!("{}", json!({ "counters": m }));
            } else {
                let mut rows = vec![vec!["COUNTER".into(), "PACKETS".into()]];
                rows.extend(s.counters.iter().map(|(n, v)| vec![(*n).to_string(), v.to_string()]));
                print_table(&rows);
            }
        }
        Command::Attach { dev, replace } => {
            dp.attach_ingress(&dev, false)?;
            if replace {
                let n = dp.upgrade()?;
                if !json {
                    println!("replaced {n} attached program(s)");
                }
            }
        }
        Command::Load { cgroup } => {
            if let Some(cg) = cgroup {
                dp.attach_load(&cg)?;
            }
            let load = dp.load()?;
            if json {
                println!("{}", serde_json::to_string(&load)?);
            } else {
                println!("total {}", load.total);
                let mut rows = vec![vec!["CLIENT".into(), "CONNECTIONS".into()]];
                rows.extend(load.clients.iter().map(|(a, n)| vec![a.to_string(), n.to_string()]));
                print_table(&rows);
            }
        }
        Command::Teardown { .. } => dp.teardown()?,
        Command::Agent(_) | Command::Config(_) | Command::Tls(_) | Command::Status { .. } | Command::Move { .. } | Command::GiveBack { .. } => unreachable!("handled above"),
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use clap::Parser as _;

    use super::*;

    #[test]
    fn agent_flags_override_the_file() {
        let dir = std::env::temp_dir().join(format!("redirector-cli-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("a.toml");
        std::fs::write(&file, "node = \"a\"\nlisten = \"198.18.0.1:7470\"\nhigh_watermark = 100\nlow_watermark = 50\n[[sibling]]\nname = \"b\"\naddress = \"198.18.0.2:7470\"\n")
            .unwrap();
        let cli = Cli::try_parse_from([
            "redirector",
            "agent",
            "--config",
            file.to_str().unwrap(),
            "--node",
            "x",
            "--high-watermark",
            "300",
            "--sibling",
            "c=198.18.0.3:7470",
            "--sibling",
            "d=198.18.0.4:7470",
            "--service",
            "198.18.0.10:80,eth0,/sys/fs/cgroup/app",
            "--tls-ca",
            "/ca.pem",
        ])
        .unwrap();
        let Command::Agent(args) = &cli.command else { panic!("agent") };
        let cfg = agent_config(args, &cli.global).unwrap();
        assert_eq!(cfg.node, "x");
        assert_eq!(cfg.high_watermark, 300);
        assert_eq!(cfg.low_watermark, 50, "not overridden: from the file");
        assert_eq!(cfg.siblings.iter().map(|s| s.name.as_str()).collect::<Vec<_>>(), ["c", "d"]);
        assert_eq!(cfg.services[0].dev, "eth0");
        assert_eq!(cfg.tls.ca, PathBuf::from("/ca.pem"));
        assert!(Cli::try_parse_from(["redirector", "agent", "--config", "x", "--sibling", "nonsense"]).is_err());
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// The status table says ages as people do and shows the datapath's counters.
    #[test]
    fn status_tables_show_ages_and_counters() {
        let v = json!({
            "node": "a", "load": 12, "high_watermark": 20, "low_watermark": 10, "shedding": false,
            "last_round": "moved 3 client(s)", "promised": 0, "draining": 1,
            "siblings": [{"name": "b", "address": "198.18.0.2:7470", "up": true, "last_heartbeat_ms": 230, "load": 4}],
            "migrated_out": [{"client": "198.18.1.5", "to": "b", "since_unix": 1000, "connections": 2}],
            "adopted": [{"client": "198.18.1.9", "from": "c", "since_unix": 925, "promised": 1, "connections": 0}],
            "orphaned": [{"prefix": "198.18.1.39/32", "target": "198.18.0.99", "why": "target 198.18.0.99 is not a configured sibling"}],
            "counters": {"forwarded-new": 17, "passed": 3},
            "hook": {"registered": ["198.18.0.10:80"], "unconfirmed": 1},
            "handoffs": {"clients_in_progress": 2, "awaiting_outcome": 0, "undecided": 0, "handed_back": 0},
            "sessions_lost": 0, "leaving": false,
        });
        let s: Status = serde_json::from_value(v).expect("a status as the agent writes it");
        let t = format_status(&s, 1012);
        for want in [
            "0.2s ago",
            "198.18.1.5    b   12s ago",
            "1m27s ago",
            "forwarded-new  17",
            "198.18.1.39/32",
            "rules draining: 1",
            "moved 3 client(s)",
            "applications registered: 198.18.0.10:80",
            "1 outcomes not confirmed by an application yet (2 clients held)",
        ] {
            assert!(t.contains(want), "{want:?} in:\n{t}");
        }
        assert!(!t.contains("1000"), "no raw Unix times:\n{t}");
    }
}
