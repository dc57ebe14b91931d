//! The agent's configuration: a TOML file (unknown keys rejected by name) whose values
//! command-line flags can override. `redirector config check FILE` validates without starting.

use std::{
    collections::HashSet,
    net::{IpAddr, SocketAddr},
    path::{Path, PathBuf},
};

use serde::{Deserialize, Serialize};

/// Everything an agent needs to know.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// This node's name; must match the name in its certificate.
    pub node: String,
    /// Peer channel address: this node's own *control* address, never a service address.
    pub listen: Option<SocketAddr>,
    /// Network namespace to run in (`/run/netns/<name>`), for test hosts.
    pub netns: Option<String>,
    /// bpffs for the datapath's pins.
    pub bpffs: PathBuf,
    /// Datapath instance name (default: the node name).
    pub instance: Option<String>,
    /// Admin socket of `redirector status`.
    pub admin_socket: Option<PathBuf>,
    /// Above this many established connections the node sheds clients.
    pub high_watermark: u64,
    /// Shedding moves clients until the projected load is at or below this.
    pub low_watermark: u64,
    /// Drain period of withdrawn rules, in seconds.
    pub drain_secs: u64,
    /// Heartbeat interval, in ms.
    pub heartbeat_ms: u64,
    /// A sibling silent for this long is dead: its rules are drained (clients come home).
    pub liveness_ms: u64,
    /// How long an origin waits for offers and acknowledgements, in ms.
    pub negotiate_timeout_ms: u64,
    /// How long a volunteer holds capacity reserved for an offer, in ms.
    pub lease_ms: u64,
    /// Largest peer frame accepted, in bytes.
    pub max_frame: usize,
    /// The application hook: a Unix socket the local application connects to (see
    /// docs/app-protocol.md). Default: /run/redirector/<node>-app.sock.
    pub app_socket: Option<PathBuf>,
    /// Owner of the app socket, `UID:GID` (mode 0660); default: root.
    pub app_socket_owner: Option<String>,
    /// How long the application may take to answer a hook request, in ms.
    pub app_timeout_ms: u64,
    /// Largest session blob accepted, in bytes; larger ones abort the hand-over.
    pub max_session_bytes: usize,
    pub tls: TlsFiles,
    #[serde(rename = "sibling")]
    pub siblings: Vec<Sibling>,
    #[serde(rename = "service")]
    pub services: Vec<Service>,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            node: String::new(),
            listen: None,
            netns: None,
            bpffs: PathBuf::from(crate::datapath::DEFAULT_BPFFS),
            instance: None,
            admin_socket: None,
            high_watermark: 1000,
            low_watermark: 800,
            drain_secs: 60,
            heartbeat_ms: 500,
            liveness_ms: 3000,
            negotiate_timeout_ms: 1000,
            lease_ms: 2000,
            max_frame: 1 << 20,
            app_socket: None,
            app_socket_owner: None,
            app_timeout_ms: 2000,
            max_session_bytes: 256 << 10,
            tls: TlsFiles::default(),
            siblings: Vec::new(),
            services: Vec::new(),
        }
    }
}

/// Certificate files of the cluster.
#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct TlsFiles {
    /// The cluster CA certificate (PEM).
    pub ca: PathBuf,
    /// This node's certificate (PEM), issued by the CA for the node's name.
    pub cert: PathBuf,
    /// This node's private key (PEM).
    pub key: PathBuf,
}

/// A sibling server.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Sibling {
    pub name: String,
    /// Its peer channel address (its control address).
    pub address: SocketAddr,
}

/// A service this node serves.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Service {
    /// The address and port clients connect to.
    pub address: SocketAddr,
    /// Uplink interface the clients' packets arrive on.
    pub dev: String,
    /// cgroup v2 folder of the application (its connections are the node's load).
    pub cgroup: PathBuf,
    /// Where the local application listens (default: `address`). A sibling's service on
    /// the same port is adopted onto this listener.
    #[serde(default)]
    pub listener: Option<SocketAddr>,
}

impl Service {
    #[must_use]
    pub fn listener(&self) -> SocketAddr {
        self.listener.unwrap_or(self.address)
    }
}

impl Config {
    /// Reads and validates a config file.
    pub fn load(path: &Path) -> anyhow::Result<Self> {
        use anyhow::Context as _;
        let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        let cfg: Self = toml::from_str(&text).map_err(|e| anyhow::anyhow!("{}: {}", path.display(), e.message()))?;
        Ok(cfg)
    }

    /// The datapath instance name.
    #[must_use]
    pub fn instance(&self) -> String {
        self.instance.clone().unwrap_or_else(|| self.node.clone())
    }

    /// The admin socket path.
    #[must_use]
    pub fn admin_socket(&self) -> PathBuf {
        self.admin_socket.clone().unwrap_or_else(|| PathBuf::from(format!("/run/redirector/{}.sock", self.node)))
    }

    /// The application hook socket path.
    #[must_use]
    pub fn app_socket(&self) -> PathBuf {
        self.app_socket.clone().unwrap_or_else(|| PathBuf::from(format!("/run/redirector/{}-app.sock", self.node)))
    }

    /// The app socket's owner, if configured: (uid, gid).
    pub fn app_socket_owner(&self) -> Result<Option<(u32, u32)>, String> {
        let Some(o) = &self.app_socket_owner else { return Ok(None) };
        let (u, g) = o.split_once(':').ok_or_else(|| format!("app_socket_owner {o:?}: expected UID:GID"))?;
        let u = u.parse().map_err(|_| format!("app_socket_owner {o:?}: bad uid"))?;
        let g = g.parse().map_err(|_| format!("app_socket_owner {o:?}: bad gid"))?;
        Ok(Some((u, g)))
    }

    /// Every problem with the configuration, one line each (empty: valid).
    #[must_use]
    pub fn problems(&self) -> Vec<String> {
        let mut p = Vec::new();
        if self.node.is_empty() || !self.node.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_') {
            p.push(format!("node: {:?} must be a non-empty name of letters, digits, '-' and '_'", self.node));
        }
        let Some(listen) = self.listen else {
            p.push("listen: the peer channel address (this node's control address) is required".into());
            return p;
        };
        if self.low_watermark == 0 || self.low_watermark >= self.high_watermark {
            p.push(format!(
                "low_watermark ({}) must be above 0 and below high_watermark ({})",
                self.low_watermark, self.high_watermark
            ));
        }
        if self.heartbeat_ms == 0 || self.liveness_ms <= self.heartbeat_ms {
            p.push(format!("liveness_ms ({}) must exceed heartbeat_ms ({})", self.liveness_ms, self.heartbeat_ms));
        }
        if self.max_frame < 1024 {
            p.push(format!("max_frame ({}) must be at least 1024", self.max_frame));
        }
        if self.max_session_bytes == 0 || self.max_session_bytes + 4096 > self.max_frame {
            p.push(format!(
                "max_session_bytes ({}) must be above 0 and leave 4096 bytes of room under max_frame ({})",
                self.max_session_bytes, self.max_frame
            ));
        }
        if let Err(e) = self.app_socket_owner() {
            p.push(e);
        }
        for (name, f) in [("tls.ca", &self.tls.ca), ("tls.cert", &self.tls.cert), ("tls.key", &self.tls.key)] {
            if f.as_os_str().is_empty() {
                p.push(format!("{name}: required (make them with `redirector tls ca` and `redirector tls node`)"));
            }
        }
        if self.services.is_empty() {
            p.push("service: at least one [[service]] is required".into());
        }
        let service_ips: HashSet<IpAddr> = self.services.iter().map(|s| s.address.ip()).collect();
        if service_ips.contains(&listen.ip()) {
            p.push(format!("listen: {listen} is a service address; the peer channel needs the node's own control address"));
        }
        let mut names = HashSet::new();
        for s in &self.siblings {
            if s.name == self.node {
                p.push(format!("sibling {}: that is this node's own name", s.name));
            }
            if !names.insert(&s.name) {
                p.push(format!("sibling {}: listed twice", s.name));
            }
            if service_ips.contains(&s.address.ip()) {
                p.push(format!(
                    "sibling {}: {} is a service address; siblings are reached on their control addresses (a volunteer treats service addresses as local)",
                    s.name, s.address
                ));
            }
            if s.address.ip().is_ipv4() != listen.ip().is_ipv4() {
                p.push(format!("sibling {}: {} is not of the same family as listen ({listen})", s.name, s.address));
            }
        }
        for s in &self.services {
            if s.address.port() == 0 {
                p.push(format!("service {}: port must not be 0", s.address));
            }
            if s.dev.is_empty() {
                p.push(format!("service {}: dev (uplink interface) is required", s.address));
            }
            if s.cgroup.as_os_str().is_empty() {
                p.push(format!("service {}: cgroup (the application's cgroup v2 folder) is required", s.address));
            }
            if s.listener().port() != s.address.port() {
                p.push(format!("service {}: listener {} must use the same port", s.address, s.listener()));
            }
        }
        p
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
node = "a"
listen = "198.18.0.1:7470"
high_watermark = 100
low_watermark = 70
[tls]
ca = "ca.pem"
cert = "a.pem"
key = "a.key"
[[sibling]]
name = "b"
address = "198.18.0.2:7470"
[[service]]
address = "198.18.0.10:80"
dev = "eth0"
cgroup = "/sys/fs/cgroup/app"
"#;

    #[test]
    fn a_good_config_has_no_problems_and_defaults() {
        let c: Config = toml::from_str(GOOD).unwrap();
        assert!(c.problems().is_empty(), "{:?}", c.problems());
        assert_eq!(c.drain_secs, 60);
        assert_eq!(c.liveness_ms, 3000);
        assert_eq!(c.instance(), "a");
        assert_eq!(c.services[0].listener(), "198.18.0.10:80".parse().unwrap());
    }

    #[test]
    fn unknown_keys_are_rejected_by_name() {
        let e = toml::from_str::<Config>(&format!("{GOOD}\nhigh_watermrk = 5\n")).unwrap_err();
        assert!(e.message().contains("high_watermrk"), "{e}");
        let e = toml::from_str::<Config>(&GOOD.replace("dev = \"eth0\"", "dev = \"eth0\"\ncgrp = \"x\"")).unwrap_err();
        assert!(e.message().contains("cgrp"), "{e}");
    }

    #[test]
    fn a_sibling_on_a_service_address_is_refused() {
        let c: Config = toml::from_str(&GOOD.replace("198.18.0.2:7470", "198.18.0.10:7470")).unwrap();
        let p = c.problems();
        assert!(p.iter().any(|l| l.contains("sibling b") && l.contains("service address")), "{p:?}");
    }

    #[test]
    fn watermarks_and_names_are_checked() {
        let c: Config = toml::from_str(&GOOD.replace("low_watermark = 70", "low_watermark = 100")).unwrap();
        assert!(c.problems().iter().any(|l| l.contains("low_watermark")));
        let c: Config = toml::from_str(&GOOD.replace("name = \"b\"", "name = \"a\"")).unwrap();
        assert!(c.problems().iter().any(|l| l.contains("own name")));
        let c: Config = toml::from_str(&GOOD.replace("listen = \"198.18.0.1:7470\"", "listen = \"198.18.0.10:7470\"")).unwrap();
        assert!(c.problems().iter().any(|l| l.starts_with("listen:")));
    }
}
