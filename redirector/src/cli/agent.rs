//! `agent`: running the agent, from its configuration file and the flags that override it.

use std::{net::SocketAddr, path::PathBuf};

use anyhow::{Context as _, bail};
use clap::Args;

use super::Global;
use crate::{
    config::{Config, Service, Sibling},
    datapath,
};

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
    pub siblings: Vec<Sibling>,
    /// Replace the services: ADDR:PORT,DEV,CGROUP[,LISTENER][,sessions][,live-moves][,xdp], repeatable
    /// (`sessions`: the service's clients never move without their sessions).
    #[arg(long = "service", value_parser = parse_service)]
    pub services: Vec<Service>,
}

fn parse_sibling(s: &str) -> Result<Sibling, String> {
    let (name, addr) = s.split_once('=').ok_or_else(|| format!("{s:?}: expected NAME=ADDR:PORT"))?;
    let address = addr.parse().map_err(|_| format!("{s:?}: {addr:?} is not ADDR:PORT"))?;
    Ok(Sibling::new(name, address))
}

fn parse_service(s: &str) -> Result<Service, String> {
    let mut parts: Vec<&str> = s.split(',').collect();
    let (mut sessions, mut live_moves, mut xdp) = (false, false, false);
    while parts.len() > 3 {
        match parts.last() {
            Some(&"sessions") => sessions = true,
            Some(&"live-moves") => live_moves = true,
            Some(&"xdp") => xdp = true,
            _ => break,
        }
        parts.pop();
    }
    let (addr, dev, cgroup, listener) = match parts.as_slice() {
        [addr, dev, cgroup] => (*addr, *dev, *cgroup, None),
        [addr, dev, cgroup, listener] => (*addr, *dev, *cgroup, Some(*listener)),
        _ => return Err(format!("{s:?}: expected ADDR:PORT,DEV,CGROUP[,LISTENER][,sessions][,live-moves][,xdp]")),
    };
    Ok(Service {
        address: addr.parse().map_err(|_| format!("{s:?}: {addr:?} is not ADDR:PORT"))?,
        dev: dev.to_string(),
        cgroup: PathBuf::from(cgroup),
        listener: listener.map(|l| l.parse().map_err(|_| format!("{s:?}: {l:?} is not ADDR:PORT"))).transpose()?,
        sessions,
        live_moves,
        xdp,
    })
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

/// Runs the agent of `args` until it is told to stop. The admin server is started here, next
/// to the agent, which does not know who watches it.
pub(super) fn execute(args: &AgentArgs, global: &Global) -> anyhow::Result<()> {
    let cfg = agent_config(args, global)?.validate()?;
    if !nix::unistd::Uid::effective().is_root() {
        bail!("{}", datapath::Error::NotRoot);
    }
    // Before the runtime starts its threads, so they all live in the namespace.
    if let Some(ns) = &cfg.netns {
        super::enter_netns(ns)?;
    }
    let admin_socket = cfg.admin_socket();
    // Bound before anything starts: an address the operator asked for that cannot be had
    // stops the agent with the reason.
    let metrics = cfg.metrics_listen.map(|a| std::net::TcpListener::bind(a).with_context(|| format!("metrics_listen: binding {a}"))).transpose()?;
    let agent = crate::agent::Agent::new(cfg)?;
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    let ran = rt.block_on(async {
        let (a, path) = (agent.clone(), admin_socket.clone());
        tokio::spawn(async move {
            a.running().await;
            crate::admin::serve(a, path).await;
        });
        if let Some(listener) = metrics {
            tokio::spawn(crate::metrics::serve(agent.clone(), listener));
        }
        agent.run().await
    });
    let _ = std::fs::remove_file(&admin_socket);
    ran
}

#[cfg(test)]
mod tests {
    use clap::Parser as _;

    use super::*;
    use crate::cli::{Cli, Command};

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

    #[test]
    fn service_flags_are_read_in_any_order() {
        let s = parse_service("198.18.0.10:80,eth0,/sys/fs/cgroup/app,198.18.0.11:8080,xdp,sessions").unwrap();
        assert!(s.xdp && s.sessions && !s.live_moves);
        assert_eq!(s.listener, Some("198.18.0.11:8080".parse().unwrap()));
        let s = parse_service("198.18.0.10:80,eth0,/sys/fs/cgroup/app").unwrap();
        assert!(!s.xdp, "off unless asked for");
        let cfg: Config = toml::from_str("[[service]]\naddress = \"198.18.0.10:80\"\ndev = \"eth0\"\ncgroup = \"/app\"\nxdp = true\n").unwrap();
        assert!(cfg.services[0].xdp);
    }
}
