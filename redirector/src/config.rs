//! The agent's configuration: a TOML file (unknown keys rejected by name) whose values
//! command-line flags can override. `redirector config check FILE` validates without starting.

use std::{
    collections::{HashMap, HashSet},
    net::{IpAddr, SocketAddr},
    path::{Path, PathBuf},
};

use serde::{Deserialize, Serialize};

mod cluster;

pub use self::cluster::{Cluster, Mode, Seed};

/// Everything an agent needs to know.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// This node's name; must match the name in its certificate.
    pub node: String,
    /// Peer channel address: this node's own *control* address (a specific address, never a
    /// service address). Siblings steer clients to it and accept tunnels from it.
    pub listen: Option<SocketAddr>,
    /// This node's control address of the other IP family, for dual-stack services: the tunnel
    /// source (and steering target) for clients of that family.
    pub dual_stack_address: Option<IpAddr>,
    /// Network namespace to run in (`/run/netns/<name>`), for test hosts.
    pub netns: Option<String>,
    /// bpffs for the datapath's pins.
    pub bpffs: PathBuf,
    /// Datapath instance name (default: the node name).
    pub instance: Option<String>,
    /// Admin socket of `redirector status`.
    pub admin_socket: Option<PathBuf>,
    /// Where to serve `/metrics` (Prometheus) and `/healthz` over HTTP, such as
    /// `127.0.0.1:9477`. Default: nowhere. Anyone who can reach it can read the node's load,
    /// siblings and counters: keep it on a local or management address.
    pub metrics_listen: Option<SocketAddr>,
    /// Above this many established connections the node sheds clients.
    pub high_watermark: u64,
    /// Shedding moves clients until the projected load is at or below this.
    pub low_watermark: u64,
    /// Drain period of withdrawn rules, in seconds.
    pub drain_secs: u64,
    /// Heartbeat interval, in ms.
    pub heartbeat_ms: u64,
    /// A sibling silent this long (no frame on any connection, counted from when this agent
    /// started or a link came up, if later) is suspected: the clients moved to it are taken
    /// home with their sessions; if it cannot be reached for that, its rules are drained (the
    /// clients come home without their sessions, which are counted as lost).
    pub liveness_ms: u64,
    /// How long an origin waits for offers and acknowledgements, in ms.
    pub negotiate_timeout_ms: u64,
    /// How long a volunteer holds capacity reserved for an offer, in ms.
    pub lease_ms: u64,
    /// Largest peer frame accepted, in bytes.
    pub max_frame: usize,
    /// How long a volunteer keeps sessions and clients received ahead of a `Transfer` that
    /// never comes, in ms. (An acknowledged transfer whose `Commit` or `Abort` does not come
    /// is never settled by a guess: the volunteer asks its origin.)
    pub handoff_expiry_ms: u64,
    /// How long a volunteer keeps an adopted client that its origin never released and that
    /// has had no connection here, in seconds. Until then the room promised to it stays
    /// reserved.
    pub adopted_expiry_secs: u64,
    /// How long a volunteer keeps an adopted service (its local route and listener entry)
    /// that nothing needs any more, in seconds: no client of its origin is adopted, no
    /// hand-over with that origin is under way, no given-back client's connection goes on
    /// here. Then it goes back, so that the address is not local here for ever.
    pub unadopt_after_secs: u64,
    /// The application hook: a Unix socket the local application connects to (see
    /// docs/app-protocol.md). Default: /run/redirector/<node>-app.sock.
    pub app_socket: Option<PathBuf>,
    /// Owner of the app socket, `UID:GID` (mode 0660); default: root.
    pub app_socket_owner: Option<String>,
    /// How long the application may take to answer a hook request, in ms, before the data's
    /// own allowance (`app_timeout_per_mib_ms`).
    pub app_timeout_ms: u64,
    /// More time for big hook requests and answers: this many ms per MiB of the request line
    /// and per MiB of answer received so far (10 MiB/s at the default). The origin's wait for
    /// a transfer's acknowledgement grows by the volunteer's import allowance too.
    pub app_timeout_per_mib_ms: u64,
    /// Largest session blob accepted, in bytes; larger ones abort the hand-over.
    pub max_session_bytes: usize,
    /// Where the origin records each hand-over it starts (its clients, then how it ended), so
    /// that an agent restarted in the middle of one finishes it the same way whoever asks
    /// first. Default: /run/redirector/<instance> (gone at reboot, like the pinned rules).
    pub state_dir: Option<PathBuf>,
    /// An origin whose load has stayed at or under `low_watermark` this long takes moved
    /// clients home (with their sessions), as many as keep it at or under the low watermark,
    /// in seconds; 0: never.
    pub home_after_secs: u64,
    /// On SIGTERM or ctrl-c, give adopted clients back to their origins and take moved
    /// clients home, with their sessions, before exiting (within `exit_timeout_ms`). false:
    /// exit at once and leave everything steered by the pinned rules (the next agent takes
    /// them over): for restarts that must not move anyone.
    pub hand_back_on_exit: bool,
    /// How long the hand-backs on exit may take, in ms; what is left is logged and stays
    /// steered by the pinned rules.
    pub exit_timeout_ms: u64,
    /// The control port closes connections from anything but a configured sibling's control
    /// address at once, before any TLS (false: they are refused after the handshake, with the
    /// reason, which helps find a misconfigured sibling).
    pub control_siblings_only: bool,
    pub tls: TlsFiles,
    /// How siblings are known: the `[[sibling]]` lists, or gossip.
    pub cluster: Cluster,
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
            dual_stack_address: None,
            netns: None,
            bpffs: PathBuf::from(crate::datapath::DEFAULT_BPFFS),
            instance: None,
            admin_socket: None,
            metrics_listen: None,
            high_watermark: 1000,
            low_watermark: 800,
            drain_secs: 60,
            heartbeat_ms: 500,
            liveness_ms: 3000,
            negotiate_timeout_ms: 1000,
            lease_ms: 2000,
            max_frame: 1 << 20,
            handoff_expiry_ms: 60_000,
            adopted_expiry_secs: 3600,
            unadopt_after_secs: 60,
            app_socket: None,
            app_socket_owner: None,
            app_timeout_ms: 2000,
            app_timeout_per_mib_ms: 100,
            max_session_bytes: 256 << 10,
            state_dir: None,
            home_after_secs: 60,
            hand_back_on_exit: true,
            exit_timeout_ms: 10_000,
            control_siblings_only: false,
            tls: TlsFiles::default(),
            cluster: Cluster::default(),
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
    /// SHA-256 fingerprints of certificates refused although the CA issued them (a node's key
    /// that leaked, a node retired before its certificate expires), either way.
    pub deny: Vec<String>,
}

impl TlsFiles {
    /// Whether `cert` is on the deny list.
    #[must_use]
    pub fn denies(&self, cert: &rustls::pki_types::CertificateDer<'_>) -> bool {
        let f = crate::peer::tls::fingerprint(cert);
        self.deny.iter().any(|d| crate::peer::tls::parse_fingerprint(d).is_some_and(|d| d == f))
    }
}

/// A sibling server.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Sibling {
    pub name: String,
    /// Its peer channel address (its control address).
    pub address: SocketAddr,
    /// Its control address of the other IP family, if it has dual-stack services.
    #[serde(default)]
    pub dual_stack_address: Option<IpAddr>,
    /// Its service addresses, if known: this node then adopts nothing else from it.
    #[serde(default)]
    pub services: Vec<SocketAddr>,
}

impl Sibling {
    /// A sibling known by name and control address only.
    #[must_use]
    pub fn new(name: &str, address: SocketAddr) -> Self {
        Self { name: name.to_string(), address, dual_stack_address: None, services: Vec::new() }
    }

    /// Its control addresses: the peer channel's, then the other family's.
    #[must_use]
    pub fn control_addresses(&self) -> Vec<IpAddr> {
        std::iter::once(self.address.ip()).chain(self.dual_stack_address).collect()
    }

    /// Its control address of the family of `of`, if it has one.
    #[must_use]
    pub fn control_address(&self, of: IpAddr) -> Option<IpAddr> {
        self.control_addresses().into_iter().find(|a| a.is_ipv4() == of.is_ipv4())
    }
}

/// The one of `siblings` whose control address is `ip` (configured siblings, or the members
/// gossip brought).
pub fn sibling_at<'a>(siblings: impl IntoIterator<Item = &'a Sibling>, ip: IpAddr) -> Option<&'a Sibling> {
    siblings.into_iter().find(|s| s.control_addresses().contains(&ip))
}

/// Whether `name` can name a node: it goes into certificates as a DNS name, so letters,
/// digits and '-' (not first or last), at most 63 characters. One rule for `tls node`,
/// `node` and every `[[sibling]]`.
pub fn check_name(name: &str) -> Result<(), String> {
    let ok = !name.is_empty() && name.len() <= 63 && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '-') && !name.starts_with('-') && !name.ends_with('-');
    if !ok {
        return Err(format!("{name:?} is not a node name: use 1 to 63 letters, digits and '-' (not first or last)"));
    }
    // Siblings check each other's certificates for the name as a TLS server name, which an
    // all-numeric name (`123`) cannot be: refused here rather than never linking.
    match rustls::pki_types::ServerName::try_from(name) {
        Ok(rustls::pki_types::ServerName::DnsName(_)) => Ok(()),
        _ => Err(format!("{name:?} is not a node name: it cannot be a TLS server name (a name of digits only is not; add a letter)")),
    }
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
    /// The application keeps per-client sessions that must move with the clients: then no
    /// client of this service's family moves while no application is registered on the hook
    /// for it (the round says why), instead of moving without its session. Default false.
    #[serde(default)]
    pub sessions: bool,
    /// Clients' open connections move with their sessions (`TCP_REPAIR`): applications that
    /// speak hook protocol version 3 hand over their idle connections, which carry on at the
    /// other server. Its SYN-ACKs then announce an MSS that leaves room for the tunnel.
    /// Default false: open connections stay and the application closes them after the commit.
    #[serde(default)]
    pub live_moves: bool,
    /// The XDP fast path on `dev` forwards the migrated clients' packets before the stack
    /// (`redirector service add --xdp`). Needs native XDP and forwarding on `dev`; otherwise the
    /// agent warns and the classifier alone steers. Default false.
    #[serde(default)]
    pub xdp: bool,
}

impl Service {
    #[must_use]
    pub fn listener(&self) -> SocketAddr {
        self.listener.unwrap_or(self.address)
    }
}

impl Config {
    /// Reads a config file (unknown keys are refused); [`Config::validate`] checks its values.
    ///
    /// # Errors
    /// The file cannot be read or is not such a configuration.
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

    /// The folder of the origin's hand-over records.
    #[must_use]
    pub fn state_dir(&self) -> PathBuf {
        self.state_dir.clone().unwrap_or_else(|| PathBuf::from(format!("/run/redirector/{}", self.instance())))
    }

    /// The app socket's owner, if configured: (uid, gid).
    pub fn app_socket_owner(&self) -> Result<Option<(u32, u32)>, String> {
        let Some(o) = &self.app_socket_owner else { return Ok(None) };
        let (u, g) = o.split_once(':').ok_or_else(|| format!("app_socket_owner {o:?}: expected UID:GID"))?;
        let u = u.parse().map_err(|_| format!("app_socket_owner {o:?}: bad uid"))?;
        let g = g.parse().map_err(|_| format!("app_socket_owner {o:?}: bad gid"))?;
        Ok(Some((u, g)))
    }

    /// This node's control addresses: the peer channel's, then the other family's.
    #[must_use]
    pub fn control_addresses(&self) -> Vec<IpAddr> {
        self.listen.map(|l| l.ip()).into_iter().chain(self.dual_stack_address).collect()
    }

    /// This node's control address of the family of `of`, if it has one.
    #[must_use]
    pub fn control_address(&self, of: IpAddr) -> Option<IpAddr> {
        self.control_addresses().into_iter().find(|a| a.is_ipv4() == of.is_ipv4())
    }

    /// The sibling named `name`.
    #[must_use]
    pub fn sibling(&self, name: &str) -> Option<&Sibling> {
        self.siblings.iter().find(|s| s.name == name)
    }

    /// The local service that serves clients of `svc` (a sibling's service) here: the one of
    /// the same port and family.
    #[must_use]
    pub fn serving(&self, svc: SocketAddr) -> Option<&Service> {
        self.services.iter().find(|s| s.address.port() == svc.port() && s.address.is_ipv4() == svc.is_ipv4())
    }

    /// The sibling whose control address is `ip`.
    #[must_use]
    pub fn sibling_at(&self, ip: IpAddr) -> Option<&Sibling> {
        sibling_at(&self.siblings, ip)
    }

    /// Whether this node may serve `svc` for sibling `origin`: one of the services this
    /// configuration lists for that sibling (nothing when it lists none), a unicast address
    /// that is not link-local, broadcast or IPv4-mapped, none of this node's own addresses, no
    /// sibling's control address and no other sibling's service. A sibling cannot make this
    /// node take over an address that is not its to give (adopting an address makes it local
    /// here, for every port).
    pub fn check_adoptable(&self, origin: &Sibling, svc: SocketAddr) -> Result<(), String> {
        self.check_adoptable_among(&self.siblings, origin, svc)
    }

    /// [`Config::check_adoptable`] among `siblings` (the configured ones, or the members
    /// gossip brought).
    pub fn check_adoptable_among(&self, siblings: &[Sibling], origin: &Sibling, svc: SocketAddr) -> Result<(), String> {
        let ip = svc.ip();
        let special = match ip {
            IpAddr::V4(a) => a.is_link_local().then_some("link-local").or(a.is_broadcast().then_some("broadcast")).or((a.octets()[0] == 0).then_some("\"this network\"")),
            IpAddr::V6(a) => a.is_unicast_link_local().then_some("link-local").or(a.to_ipv4_mapped().is_some().then_some("IPv4-mapped")),
        };
        if let Some(kind) = special {
            return Err(format!("{svc} is a {kind} address, never a sibling's service"));
        }
        if ip.is_unspecified() || ip.is_loopback() || ip.is_multicast() || svc.port() == 0 {
            return Err(format!("{svc} is not a unicast service address"));
        }
        if self.control_addresses().contains(&ip) {
            return Err(format!("{svc} is this node's own control address"));
        }
        if self.services.iter().any(|s| s.address.ip() == ip || s.listener().ip() == ip) {
            return Err(format!("{svc} is one of this node's own service addresses"));
        }
        if let Some(s) = sibling_at(siblings, ip) {
            return Err(format!("{svc} is the control address of sibling {}", s.name));
        }
        if let Some(s) = siblings.iter().find(|s| s.name != origin.name && s.services.iter().any(|x| x.ip() == ip)) {
            return Err(format!("{svc} is an address of sibling {}'s services, not {}'s", s.name, origin.name));
        }
        if origin.services.is_empty() {
            return Err(format!("this node's configuration lists no services for {}: nothing is adopted from it ([[sibling]] services)", origin.name));
        }
        if !origin.services.contains(&svc) {
            return Err(format!("{svc} is not one of {}'s configured services", origin.name));
        }
        Ok(())
    }

    /// Checks the configuration once, for the agent: the configuration with what the checks
    /// proved, or every problem with it, one line each, in file order.
    ///
    /// # Errors
    /// [`Invalid`], with every problem found.
    #[expect(clippy::too_many_lines, reason = "one short check per rule, in file order")]
    pub fn validate(self) -> Result<Valid, Invalid> {
        let mut p = Vec::new();
        if let Err(e) = check_name(&self.node) {
            p.push(format!("node: {e}"));
        }
        let Some(listen) = self.listen else {
            p.push("listen: the peer channel address (this node's control address) is required".into());
            return Err(Invalid { problems: p });
        };
        if listen.ip().is_unspecified() || listen.ip().is_multicast() {
            p.push(format!(
                "listen: {listen} is not a specific address: the peer channel runs on this node's own control address, which siblings steer clients to and accept tunnels from"
            ));
        }
        if let Some(d) = self.dual_stack_address
            && (d.is_ipv4() == listen.is_ipv4() || d.is_unspecified() || d.is_multicast())
        {
            p.push(format!("dual_stack_address: {d} must be a specific address of the other family than listen ({listen})"));
        }
        p.extend(self.cluster.problems(&self.node, self.siblings.len(), self.control_siblings_only));
        if self.exit_timeout_ms == 0 {
            p.push("exit_timeout_ms must be above 0".into());
        }
        if self.handoff_expiry_ms == 0 || self.adopted_expiry_secs == 0 || self.unadopt_after_secs == 0 {
            p.push("handoff_expiry_ms, adopted_expiry_secs and unadopt_after_secs must be above 0".into());
        }
        if self.low_watermark == 0 || self.low_watermark >= self.high_watermark {
            p.push(format!("low_watermark ({}) must be above 0 and below high_watermark ({})", self.low_watermark, self.high_watermark));
        }
        if self.heartbeat_ms == 0 || self.liveness_ms <= self.heartbeat_ms {
            p.push(format!("liveness_ms ({}) must exceed heartbeat_ms ({})", self.liveness_ms, self.heartbeat_ms));
        }
        if self.max_frame < 1024 {
            p.push(format!("max_frame ({}) must be at least 1024", self.max_frame));
        }
        if self.max_session_bytes == 0 || self.max_session_bytes + 4096 > self.max_frame {
            p.push(format!("max_session_bytes ({}) must be above 0 and leave 4096 bytes of room under max_frame ({})", self.max_session_bytes, self.max_frame));
        }
        let app_socket_owner = self.app_socket_owner().unwrap_or_else(|e| {
            p.push(e);
            None
        });
        for (name, f) in [("tls.ca", &self.tls.ca), ("tls.cert", &self.tls.cert), ("tls.key", &self.tls.key)] {
            if f.as_os_str().is_empty() {
                p.push(format!("{name}: required (make them with `redirector tls ca` and `redirector tls node`)"));
            }
        }
        for d in self.tls.deny.iter().filter(|d| crate::peer::tls::parse_fingerprint(d).is_none()) {
            p.push(format!("tls.deny: {d:?} is not a SHA-256 fingerprint (64 hex digits, colons allowed: `openssl x509 -noout -fingerprint -sha256 -in NODE.pem`)"));
        }
        if self.services.is_empty() {
            p.push("service: at least one [[service]] is required".into());
        }
        let service_ips: HashSet<IpAddr> = self.services.iter().map(|s| s.address.ip()).collect();
        for c in self.control_addresses() {
            if service_ips.contains(&c) {
                p.push(format!("{c} is a service address; the peer channel and tunnels need the node's own control addresses"));
            }
        }
        let mut names = HashSet::new();
        // Rules and tunnels know a sibling by its IP address only: one IP, one node.
        let mut ips: HashMap<IpAddr, &str> = self.control_addresses().into_iter().map(|a| (a, self.node.as_str())).collect();
        for s in &self.siblings {
            if let Err(e) = check_name(&s.name) {
                p.push(format!("sibling {e}"));
            }
            if s.name == self.node {
                p.push(format!("sibling {}: that is this node's own name", s.name));
            }
            if !names.insert(&s.name) {
                p.push(format!("sibling {}: listed twice", s.name));
            }
            for a in s.control_addresses() {
                if a.is_unspecified() || a.is_multicast() {
                    p.push(format!("sibling {}: {a} is not a specific address", s.name));
                }
                if service_ips.contains(&a) {
                    p.push(format!(
                        "sibling {}: {a} is a service address; siblings are reached on their control addresses (a volunteer treats service addresses as local)",
                        s.name
                    ));
                }
                if let Some(other) = ips.insert(a, &s.name) {
                    p.push(format!("sibling {}: {a} is also {other}'s address; rules and tunnels identify a node by its IP address, so every node needs its own", s.name));
                }
            }
            if s.address.ip().is_ipv4() != listen.ip().is_ipv4() {
                p.push(format!("sibling {}: {} is not of the same family as listen ({listen})", s.name, s.address));
            }
            if let Some(d) = s.dual_stack_address
                && d.is_ipv4() == s.address.is_ipv4()
            {
                p.push(format!("sibling {}: dual_stack_address {d} must be of the other family than its address", s.name));
            }
        }
        // Every service siblings may hand over can be adopted at once: the kernel's table of
        // adopted services never fills.
        let adoptable: HashSet<SocketAddr> = self.siblings.iter().flat_map(|s| s.services.iter().copied()).collect();
        if adoptable.len() > redirector_common::MAX_LISTENERS as usize {
            p.push(format!("sibling services: {} listed in all, more than the {} services a node can adopt at once", adoptable.len(), redirector_common::MAX_LISTENERS));
        }
        let mut tunnel_sources = Vec::with_capacity(self.services.len());
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
            match self.control_address(s.address.ip()) {
                Some(c) => tunnel_sources.push(c),
                None => p.push(format!(
                    "service {}: this node has no {} control address (listen is {listen}; set dual_stack_address), so its clients could never move",
                    s.address,
                    crate::datapath::family_name(s.address.is_ipv4())
                )),
            }
        }
        if !p.is_empty() {
            return Err(Invalid { problems: p });
        }
        Ok(Valid { config: self, listen, app_socket_owner, tunnel_sources })
    }
}

/// A configuration without problems ([`Config::validate`]), with the values its checks
/// proved. It reads as the [`Config`] it was made from, which it never changes, so what was
/// proved stays true.
#[derive(Clone, Debug)]
pub struct Valid {
    config: Config,
    listen: SocketAddr,
    app_socket_owner: Option<(u32, u32)>,
    /// The tunnel source of each service, in the order of `config.services`.
    tunnel_sources: Vec<IpAddr>,
}

impl Valid {
    /// The peer channel address.
    #[must_use]
    pub fn listen(&self) -> SocketAddr {
        self.listen
    }

    /// The app socket's owner, if configured: (uid, gid).
    #[must_use]
    pub fn app_socket_owner(&self) -> Option<(u32, u32)> {
        self.app_socket_owner
    }

    /// Each service with its tunnel source: this node's control address of its family.
    pub fn services_with_tunnel_source(&self) -> impl Iterator<Item = (&Service, IpAddr)> {
        self.config.services.iter().zip(self.tunnel_sources.iter().copied())
    }
}

/// The agent reads every other value as the file (and flags) gave it.
impl std::ops::Deref for Valid {
    type Target = Config;

    fn deref(&self) -> &Config {
        &self.config
    }
}

/// Why a configuration cannot run an agent: every problem, one line each.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("invalid configuration: {}", problems.join("; "))]
pub struct Invalid {
    pub problems: Vec<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The keys a table of docs/operations.md lists (the first column of the table under
    /// `heading`).
    fn documented(heading: &str) -> std::collections::BTreeSet<String> {
        let doc = include_str!("../../docs/operations.md");
        let start = doc.find(&format!("### {heading}")).unwrap_or_else(|| panic!("docs/operations.md has no section {heading}"));
        let section = &doc[start + 4..];
        let section = &section[..section.find("\n#").unwrap_or(section.len())];
        section.lines().filter_map(|l| l.strip_prefix("| `")).filter_map(|l| l.split('`').next()).map(str::to_string).collect()
    }

    /// The keys the parser accepts in the table that `probe` (with an unknown key) opens, as
    /// its refusal lists them.
    fn accepted(probe: &str) -> std::collections::BTreeSet<String> {
        let e = toml::from_str::<Config>(probe).expect_err("an unknown key is refused").to_string();
        let expected = e.split_once("expected").unwrap_or_else(|| panic!("the refusal lists the keys: {e}")).1;
        expected.split('`').skip(1).step_by(2).map(str::to_string).filter(|k| !["tls", "cluster", "seed", "sibling", "service"].contains(&k.as_str())).collect()
    }

    #[test]
    fn the_operations_guide_lists_exactly_the_keys_the_parser_accepts() {
        for (heading, probe) in [
            ("Top level", "zzz = 1\n"),
            ("`[tls]`", "[tls]\nzzz = 1\n"),
            ("`[[sibling]]`", "[[sibling]]\nzzz = 1\n"),
            ("`[[service]]`", "[[service]]\nzzz = 1\n"),
            ("`[cluster]`", "[cluster]\nzzz = 1\n"),
            ("`[[cluster.seed]]`", "[[cluster.seed]]\nzzz = 1\n"),
        ] {
            let (doc, parser) = (documented(heading), accepted(probe));
            assert!(parser.len() >= 2, "{heading}: read the parser's keys: {parser:?}");
            assert_eq!(doc, parser, "{heading}: docs/operations.md (left) and the parser (right) disagree");
        }
    }

    /// Every problem `c` has, as `config check` lists them (empty: valid).
    fn problems(c: &Config) -> Vec<String> {
        c.clone().validate().err().map(|e| e.problems).unwrap_or_default()
    }

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
        assert!(problems(&c).is_empty(), "{:?}", problems(&c));
        assert_eq!(c.drain_secs, 60);
        assert_eq!(c.liveness_ms, 3000);
        assert_eq!(c.instance(), "a");
        assert_eq!(c.services[0].listener(), "198.18.0.10:80".parse().unwrap());
        assert!(!c.services[0].sessions, "clients move without sessions unless a service says otherwise");
        assert_eq!((c.app_timeout_ms, c.app_timeout_per_mib_ms), (2000, 100));
        let c: Config = toml::from_str(&GOOD.replace("cgroup = \"/sys/fs/cgroup/app\"", "cgroup = \"/sys/fs/cgroup/app\"\nsessions = true")).unwrap();
        assert!(c.services[0].sessions);
    }

    /// What validation proved is there to read, without a second check.
    #[test]
    fn a_valid_config_carries_what_was_checked() {
        let v = toml::from_str::<Config>(&GOOD.replace("node = \"a\"", "node = \"a\"\napp_socket_owner = \"1000:1001\"")).unwrap().validate().unwrap();
        assert_eq!(v.listen(), "198.18.0.1:7470".parse().unwrap());
        assert_eq!(v.app_socket_owner(), Some((1000, 1001)));
        let tunnel: Vec<_> = v.services_with_tunnel_source().map(|(s, t)| (s.address, t)).collect();
        assert_eq!(tunnel, ["198.18.0.10:80".parse().unwrap()].into_iter().zip(["198.18.0.1".parse().unwrap()]).collect::<Vec<(SocketAddr, IpAddr)>>());
        assert_eq!(v.node, "a", "the file's values read through");
        let e = toml::from_str::<Config>(&GOOD.replace("low_watermark = 70", "low_watermark = 100\napp_socket_owner = \"x\"")).unwrap().validate().unwrap_err();
        assert_eq!(e.problems.len(), 2, "{e}");
        assert!(e.to_string().starts_with("invalid configuration: low_watermark (100) must be above 0 and below high_watermark (100); app_socket_owner"), "{e}");
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
        let p = problems(&c);
        assert!(p.iter().any(|l| l.contains("sibling b") && l.contains("service address")), "{p:?}");
    }

    #[test]
    fn watermarks_and_names_are_checked() {
        let c: Config = toml::from_str(&GOOD.replace("low_watermark = 70", "low_watermark = 100")).unwrap();
        assert!(problems(&c).iter().any(|l| l.contains("low_watermark")));
        let c: Config = toml::from_str(&GOOD.replace("name = \"b\"", "name = \"a\"")).unwrap();
        assert!(problems(&c).iter().any(|l| l.contains("own name")));
        let c: Config = toml::from_str(&GOOD.replace("listen = \"198.18.0.1:7470\"", "listen = \"198.18.0.10:7470\"")).unwrap();
        assert!(problems(&c).iter().any(|l| l.contains("198.18.0.10 is a service address")), "{:?}", problems(&c));
    }

    /// `tls node` and `config check` agree on names: '_' makes no certificate, so no config.
    #[test]
    fn node_and_sibling_names_follow_the_certificate_rule() {
        for bad in ["a_b", "", "-a", "a-", "a.b", &"x".repeat(64), "123", "7"] {
            assert!(check_name(bad).is_err(), "{bad:?}");
            let c: Config = toml::from_str(&GOOD.replace("node = \"a\"", &format!("node = {bad:?}"))).unwrap();
            assert!(problems(&c).iter().any(|l| l.starts_with("node:")), "node {bad:?}: {:?}", problems(&c));
            let c: Config = toml::from_str(&GOOD.replace("name = \"b\"", &format!("name = {bad:?}"))).unwrap();
            assert!(problems(&c).iter().any(|l| l.starts_with("sibling")), "sibling {bad:?}: {:?}", problems(&c));
        }
        for good in ["a", "node-1", "B2", "1a", "10-0-0-1x"] {
            assert!(check_name(good).is_ok(), "{good:?}");
        }
    }

    #[test]
    fn the_peer_channel_needs_a_specific_control_address() {
        for any in ["0.0.0.0:7470", "[::]:7470"] {
            let c: Config = toml::from_str(&GOOD.replace("198.18.0.1:7470", any)).unwrap();
            assert!(problems(&c).iter().any(|l| l.starts_with("listen:") && l.contains("not a specific address")), "{any}: {:?}", problems(&c));
        }
    }

    #[test]
    fn two_nodes_on_one_ip_are_refused() {
        let c: Config = toml::from_str(&format!("{GOOD}\n[[sibling]]\nname = \"c\"\naddress = \"198.18.0.2:7471\"\n")).unwrap();
        assert!(problems(&c).iter().any(|l| l.contains("also b's address")), "{:?}", problems(&c));
        let c: Config = toml::from_str(&GOOD.replace("198.18.0.2:7470", "198.18.0.1:7471")).unwrap();
        assert!(problems(&c).iter().any(|l| l.contains("also a's address")), "{:?}", problems(&c));
    }

    #[test]
    fn a_service_of_a_family_without_control_address_is_refused() {
        let v6 = format!("{GOOD}\n[[service]]\naddress = \"[2001:db8::10]:80\"\ndev = \"eth0\"\ncgroup = \"/sys/fs/cgroup/app\"\n");
        let c: Config = toml::from_str(&v6).unwrap();
        assert!(problems(&c).iter().any(|l| l.contains("no IPv6 control address")), "{:?}", problems(&c));
        let c: Config = toml::from_str(&v6.replace("listen = ", "dual_stack_address = \"2001:db8::1\"\nlisten = ")).unwrap();
        assert!(problems(&c).is_empty(), "{:?}", problems(&c));
        assert_eq!(c.control_address("2001:db8::5".parse().unwrap()), Some("2001:db8::1".parse().unwrap()));
        let c: Config = toml::from_str(&v6.replace("listen = ", "dual_stack_address = \"198.18.0.9\"\nlisten = ")).unwrap();
        assert!(problems(&c).iter().any(|l| l.starts_with("dual_stack_address")), "{:?}", problems(&c));
    }

    #[test]
    fn a_volunteer_adopts_only_what_is_the_origins_to_give() {
        let mut c: Config = toml::from_str(&format!("{GOOD}\n[[sibling]]\nname = \"c\"\naddress = \"198.18.0.3:7470\"\nservices = [\"198.18.0.30:80\"]\n")).unwrap();
        let ok = |c: &Config, a: &str| c.check_adoptable(&c.siblings[0].clone(), a.parse().unwrap());
        // A sibling whose services this configuration does not list gets nothing adopted.
        assert!(c.siblings[0].services.is_empty());
        assert!(ok(&c, "198.18.0.20:80").unwrap_err().contains("lists no services for b"));
        c.siblings[0].services = ["198.18.0.20:80", "169.254.169.254:80", "[fe80::1]:80", "255.255.255.255:80", "[::ffff:198.18.0.20]:80", "198.18.0.30:80", "0.1.2.3:80"]
            .iter()
            .map(|a| a.parse().unwrap())
            .collect();
        assert!(ok(&c, "198.18.0.20:80").is_ok());
        assert!(ok(&c, "198.18.0.21:80").unwrap_err().contains("not one of b's configured services"));
        // Whatever the configuration lists, some addresses are never a sibling's to give.
        assert!(ok(&c, "198.18.0.1:80").unwrap_err().contains("own control address"));
        assert!(ok(&c, "198.18.0.10:80").unwrap_err().contains("own service"));
        assert!(ok(&c, "198.18.0.3:80").unwrap_err().contains("sibling c"));
        assert!(ok(&c, "198.18.0.2:80").unwrap_err().contains("sibling b"));
        assert!(ok(&c, "198.18.0.30:80").unwrap_err().contains("sibling c's services"), "another sibling's service");
        assert!(ok(&c, "169.254.169.254:80").unwrap_err().contains("link-local"), "a metadata address");
        assert!(ok(&c, "[fe80::1]:80").unwrap_err().contains("link-local"));
        assert!(ok(&c, "255.255.255.255:80").unwrap_err().contains("broadcast"));
        assert!(ok(&c, "[::ffff:198.18.0.20]:80").unwrap_err().contains("IPv4-mapped"));
        assert!(ok(&c, "0.1.2.3:80").unwrap_err().contains("this network"));
        assert!(ok(&c, "0.0.0.0:80").is_err());
        assert!(ok(&c, "127.0.0.1:80").is_err());
        assert!(ok(&c, "[::1]:80").is_err());
        assert!(ok(&c, "224.0.0.1:80").is_err());
        // No more services than the kernel's table of adopted services holds.
        // (c lists one.)
        c.siblings[0].services = (0..1024u16).map(|p| SocketAddr::from(([198, 18, 0, 20], p + 1))).collect();
        assert!(problems(&c).iter().any(|p| p.contains("1025 listed in all, more than the 1024")), "{:?}", problems(&c));
        c.siblings[0].services.truncate(1023);
        assert!(!problems(&c).iter().any(|p| p.contains("listed in all")), "{:?}", problems(&c));
    }
}
