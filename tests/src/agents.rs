//! Agents and applications as processes on the test hosts: a cgroup v2 hierarchy of the
//! topology's own, a line-protocol application per server (in its cgroup, so the kernel counts
//! its connections), cluster certificates, and `redirector agent` processes with their configs.

use std::{
    collections::HashMap,
    fs,
    net::{IpAddr, SocketAddr},
    os::unix::process::CommandExt as _,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use crate::{
    Client, Host, Topology,
    net::{client4, redirector_bin, sh},
};

/// A process killed (SIGKILL) and reaped when dropped.
pub struct Proc {
    pub child: Child,
    pub log: PathBuf,
}

impl Proc {
    /// Kills the process now (as a crash would).
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// The process's log so far.
    #[must_use]
    pub fn log(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The cgroup v2 hierarchy mounted in a temporary folder, with one cgroup per application.
///
/// There is one cgroup v2 hierarchy per host: every mount shows the same groups, those of the
/// system and of other tests running in parallel included. So only the groups made here are
/// removed.
pub struct Cgroups {
    pub root: PathBuf,
    made: std::sync::Mutex<Vec<PathBuf>>,
}

impl Cgroups {
    #[must_use]
    pub fn new(prefix: &str) -> Self {
        let root = std::env::temp_dir().join(format!("{prefix}-cgroup2"));
        fs::create_dir_all(&root).expect("cgroup2 dir");
        sh(&["mount", "-t", "cgroup2", "none", &root.to_string_lossy()]);
        Self { root, made: std::sync::Mutex::default() }
    }

    /// A cgroup for `name` (made if missing; `name` must be unique to the test).
    #[must_use]
    pub fn group(&self, name: &str) -> PathBuf {
        let g = self.root.join(name);
        if !g.exists() {
            fs::create_dir_all(&g).expect("create cgroup");
            self.made.lock().expect("lock").push(g.clone());
        }
        g
    }
}

impl Drop for Cgroups {
    fn drop(&mut self) {
        // The applications are killed by then: their (empty) groups can go, then the mount.
        for g in self.made.lock().expect("lock").drain(..) {
            let _ = fs::remove_dir(&g);
        }
        let _ = nix::mount::umount2(&self.root, nix::mount::MntFlags::MNT_DETACH);
        let _ = fs::remove_dir(&self.root);
    }
}

/// Path of a binary of this package (`redirector-test-app`), next to the test executable.
#[must_use]
pub fn sibling_bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("current exe");
    let mut dir = exe.parent().expect("exe dir").to_path_buf();
    if dir.ends_with("deps") {
        dir.pop();
    }
    dir.join(name)
}

/// Runs `cmd` (a program and its arguments) in `host`'s namespace and in `cgroup`, logging to
/// `log`, and waits until it says it is listening.
fn spawn_app(host: &Host, cgroup: &Path, cmd: &[std::ffi::OsString], log: PathBuf) -> Proc {
    let procs = cgroup.join("cgroup.procs");
    let mut c = Command::new("ip");
    c.args(["netns", "exec", &host.ns]).args(cmd).stdin(Stdio::piped()).stdout(Stdio::null()).stderr(fs::File::create(&log).expect("app log"));
    // SAFETY: only async-signal-safe work between fork and exec: one write to a file.
    unsafe {
        c.pre_exec(move || {
            fs::write(&procs, std::process::id().to_string())?;
            Ok(())
        });
    }
    let child = c.spawn().unwrap_or_else(|e| panic!("starting {cmd:?}: {e}"));
    let start = Instant::now();
    while !fs::read_to_string(&log).unwrap_or_default().contains("listening") {
        assert!(start.elapsed() < Duration::from_secs(5), "{cmd:?} did not start: {}", fs::read_to_string(&log).unwrap_or_default());
        std::thread::sleep(Duration::from_millis(10));
    }
    Proc { child, log }
}

/// Starts the test application `name` listening on `addr` in `host`'s namespace and `cgroup`.
#[must_use]
pub fn start_app(host: &Host, cgroup: &Path, name: &str, addr: SocketAddr, logs: &Path) -> Proc {
    let cmd = [sibling_bin("redirector-test-app").into_os_string(), name.into(), addr.to_string().into()];
    let family = if addr.is_ipv4() { "" } else { "-v6" };
    spawn_app(host, cgroup, &cmd, logs.join(format!("app-{name}-{}{family}.log", addr.port())))
}

/// Which demo application a cluster runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DemoApp {
    /// `examples/demo-app` (Rust, with `redirector-sdk`).
    Rust,
    /// `examples/node-demo/server.js` (plain Node.js).
    Node,
}

/// Starts the demo HTTP application `name` on `addr` in `host`'s namespace and `cgroup`,
/// connected to the hook socket `hook` (the agent's, or a test proxy's), with `extra`
/// arguments.
#[must_use]
#[expect(clippy::too_many_arguments, reason = "one application's settings")]
pub fn start_demo_app(kind: DemoApp, host: &Host, cgroup: &Path, name: &str, addr: SocketAddr, hook: &Path, logs: &Path, extra: &[String]) -> Proc {
    let mut cmd: Vec<std::ffi::OsString> = match kind {
        DemoApp::Rust => vec![sibling_bin("redirector-demo-app").into_os_string()],
        DemoApp::Node => vec!["node".into(), Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/node-demo/server.js").into_os_string()],
    };
    for a in ["--name", name, "--listen", &addr.to_string(), "--service", &addr.to_string(), "--hook"] {
        cmd.push(a.into());
    }
    cmd.push(hook.as_os_str().to_owned());
    cmd.extend(extra.iter().map(Into::into));
    let family = if addr.is_ipv4() { "" } else { "-v6" };
    spawn_app(host, cgroup, &cmd, logs.join(format!("demo-{name}{family}.log")))
}

/// The cluster's certificates: a CA and one certificate per node name, in `dir`.
pub fn make_certs(dir: &Path, names: &[&str]) {
    fs::create_dir_all(dir).expect("tls dir");
    redirector::certs::make_ca(dir, redirector::certs::CA_DAYS).expect("make CA");
    for n in names {
        redirector::certs::make_node(dir, n, redirector::certs::NODE_DAYS).expect("make node certificate");
    }
}

/// One node's agent settings for [`agent_config`].
pub struct NodeSpec<'a> {
    pub name: &'a str,
    pub host: &'a Host,
    pub service: SocketAddr,
    /// An IPv6 service too (dual stack, with the host's IPv6 control address).
    pub service6: Option<SocketAddr>,
    pub cgroup: PathBuf,
    pub high: u64,
    pub low: u64,
    /// The services keep sessions (`sessions = true`).
    pub sessions: bool,
    /// Open connections move with their clients (`live_moves = true`).
    pub live_moves: bool,
    /// More lines for this node's configuration only.
    pub extra: String,
    /// Its agent is started in its namespace already ([`Launch`]): no `netns` line.
    pub launched: bool,
    /// Membership by gossip (`[cluster] mode = "gossip"`), joining through the first of
    /// `nodes` (which starts the cluster), instead of `[[sibling]]` sections.
    pub gossip: bool,
    /// More lines for its `[cluster]` section (gossip mode).
    pub cluster: String,
}

/// Writes the TOML config of node `me` among `nodes` and returns its path.
#[must_use]
pub fn agent_config(t: &Topology, dir: &Path, me: &NodeSpec<'_>, nodes: &[&NodeSpec<'_>], extra: &str) -> PathBuf {
    let tls = dir.join("tls");
    // Short liveness, unless the test sets its own.
    let liveness = if extra.contains("liveness_ms") || me.extra.contains("liveness_ms") { "" } else { "heartbeat_ms = 200\nliveness_ms = 1500\n" };
    // Clients come home after a lull only in the tests that say so.
    let home = if extra.contains("home_after_secs") || me.extra.contains("home_after_secs") { "" } else { "home_after_secs = 0\n" };
    let mut s = format!(
        "node = \"{}\"\nlisten = \"{}:7470\"\n{}instance = \"{}\"\nbpffs = \"{}\"\nadmin_socket = \"{}\"\napp_socket = \"{}\"\nstate_dir = \"{}\"\nhigh_watermark = {}\nlow_watermark = {}\n{liveness}{home}{}{extra}\n[tls]\nca = \"{}\"\ncert = \"{}\"\nkey = \"{}\"\n",
        me.name,
        me.host.v4[0],
        if me.launched { String::new() } else { format!("netns = \"{}\"\n", me.host.ns) },
        me.host.ns,
        t.bpffs.display(),
        dir.join(format!("{}.sock", me.name)).display(),
        dir.join(format!("{}-app.sock", me.name)).display(),
        dir.join(format!("{}-state", me.name)).display(),
        me.high,
        me.low,
        me.service6.map(|_| format!("dual_stack_address = \"{}\"\n", me.host.v6[0])).unwrap_or_default() + &me.extra,
        tls.join("ca.pem").display(),
        tls.join(format!("{}.pem", me.name)).display(),
        tls.join(format!("{}.key", me.name)).display(),
    );
    if me.gossip {
        s.push_str("[cluster]\nmode = \"gossip\"\n");
        s.push_str(&me.cluster);
        if let Some(seed) = nodes.first().filter(|n| n.name != me.name) {
            s.push_str(&format!("[[cluster.seed]]\nname = \"{}\"\naddress = \"{}:7470\"\n", seed.name, seed.host.v4[0]));
        }
    }
    for n in nodes.iter().filter(|n| n.name != me.name && !me.gossip) {
        // Its services: only these are ever adopted from it.
        let services: Vec<String> = std::iter::once(n.service).chain(n.service6).map(|a| format!("\"{a}\"")).collect();
        s.push_str(&format!("[[sibling]]\nname = \"{}\"\naddress = \"{}:7470\"\nservices = [{}]\n", n.name, n.host.v4[0], services.join(", ")));
        if n.service6.is_some() {
            s.push_str(&format!("dual_stack_address = \"{}\"\n", n.host.v6[0]));
        }
    }
    for svc in std::iter::once(me.service).chain(me.service6) {
        s.push_str(&format!(
            "[[service]]\naddress = \"{svc}\"\ndev = \"eth0\"\ncgroup = \"{}\"\nsessions = {}\nlive_moves = {}\n",
            me.cgroup.display(),
            me.sessions,
            me.live_moves
        ));
    }
    let path = dir.join(format!("{}.toml", me.name));
    fs::write(&path, s).expect("write agent config");
    path
}

/// Starts `redirector agent --config CONFIG`; its log goes to `<config>.log`.
#[must_use]
pub fn start_agent(config: &Path) -> Proc {
    start_agent_with(config, None)
}

/// Like [`start_agent`], with test faults (`REDIRECTOR_TEST_FAULTS`). A previous log is kept
/// as `<config>.prev.log`.
#[must_use]
pub fn start_agent_with(config: &Path, faults: Option<&str>) -> Proc {
    let mut c = Command::new(redirector_bin());
    c.args(["agent", "--config"]).arg(config);
    spawn_agent(c, config, faults)
}

/// Starts a node's agent: as `launch` says (in its namespace, named first), else plainly.
fn start_node_agent(config: &Path, launch: Option<&(String, Launch)>, faults: Option<&str>) -> Proc {
    match launch {
        Some((ns, l)) => spawn_agent(l.command(ns, config), config, faults),
        None => start_agent_with(config, faults),
    }
}

/// Starts agent command `c` of `config`, logging to `<config>.log` (a previous log is kept as
/// `<config>.prev.log`).
fn spawn_agent(mut c: Command, config: &Path, faults: Option<&str>) -> Proc {
    let log = config.with_extension("log");
    if log.exists() {
        let _ = fs::rename(&log, config.with_extension("prev.log"));
    }
    let file = fs::File::create(&log).expect("agent log");
    c.env("RUST_LOG", "info").env_remove(redirector::agent::faults::ENV);
    if let Some(f) = faults {
        c.env(redirector::agent::faults::ENV, f);
    }
    let child = c.stdin(Stdio::null()).stdout(Stdio::null()).stderr(file).spawn().expect("start the agent");
    Proc { child, log }
}

/// The agent's [`redirector::admin::api::Status`] as JSON (tests read it by name, as scripts
/// read `redirector status --json`; it comes through the typed struct, so it has its shape).
fn query(sock: &Path) -> anyhow::Result<serde_json::Value> {
    redirector::admin::status(sock).map(|s| serde_json::to_value(s).expect("a status encodes"))
}

/// The status of the agent behind admin socket `sock`, waiting up to 30 s for it to answer
/// (many agents starting at once on two cores take a while to verify their programs).
#[must_use]
pub fn status(sock: &Path) -> serde_json::Value {
    let start = Instant::now();
    loop {
        match query(sock) {
            Ok(v) => return v,
            Err(e) => {
                if start.elapsed() >= Duration::from_secs(30) {
                    // The agent's log sits next to its socket: say why it is not answering.
                    let log = fs::read_to_string(sock.with_extension("log")).unwrap_or_default();
                    let tail: Vec<&str> = log.lines().rev().take(20).collect();
                    let tail: Vec<&str> = tail.into_iter().rev().collect();
                    panic!("agent at {} does not answer: {e:#}; the end of its log:\n{}", sock.display(), tail.join("\n"));
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }
}

/// Waits up to `secs` for `cond` on the status of the agent at `sock`.
pub fn wait_status(sock: &Path, secs: u64, what: &str, mut cond: impl FnMut(&serde_json::Value) -> bool) -> serde_json::Value {
    let start = Instant::now();
    loop {
        let v = status(sock);
        if cond(&v) {
            return v;
        }
        assert!(start.elapsed() < Duration::from_secs(secs), "timed out waiting for {what}; last status: {v}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Waits up to `secs` for the agent at `sock` to have moved at least `min` clients and
/// finished shedding: no round running, no hand-over in progress, the same clients moved for a
/// second. A status read as soon as `min` clients are moved can come between the hand-overs of
/// one round (one volunteer committed, the next not yet), so a test that acts on "who is
/// moved" waits for this.
pub fn wait_shed(sock: &Path, min: usize, secs: u64, what: &str) -> serde_json::Value {
    let mut last: Option<(Vec<(String, String)>, Instant)> = None;
    wait_status(sock, secs, what, |v| {
        let m = migrated(v);
        if m.len() < min || v["shedding"] != false || v["handoffs"]["clients_in_progress"] != 0 {
            last = None;
            return false;
        }
        match &last {
            Some((before, since)) if *before == m => since.elapsed() >= Duration::from_secs(1),
            _ => {
                last = Some((m, Instant::now()));
                false
            }
        }
    })
}

/// Waits up to `secs` for node `name`'s agent to have an application registered on its hook.
pub fn wait_registered(c: &Cluster, name: &str, secs: u64) -> serde_json::Value {
    wait_status(&c.sock(name), secs, &format!("an application to register with {name}'s agent"), |v| v["hook"]["registered"].as_array().is_some_and(|r| !r.is_empty()))
}

/// The IPv6 service of node `name` in a dual-stack cluster: A's is [`crate::net::SERVICE6`],
/// B's and C's are `2001:db8::20` and `2001:db8::30` (port 80).
#[must_use]
pub fn service6(name: &str) -> SocketAddr {
    let last = match name {
        "a" => return SocketAddr::new(std::net::IpAddr::V6(crate::net::SERVICE6), 80),
        "b" => 0x20,
        "c" => 0x30,
        other => panic!("no IPv6 service for node {other}"),
    };
    SocketAddr::new(std::net::IpAddr::V6(std::net::Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, last)), 80)
}

/// Which host, service and application name each node uses.
fn node_host<'a>(t: &'a Topology, name: &str) -> (&'a Host, SocketAddr, &'static str) {
    use crate::net::{SERVICE4, SERVICE4_B, SERVICE4_C};
    let svc = |ip| SocketAddr::new(std::net::IpAddr::V4(ip), 80);
    match name {
        "a" => (&t.a, svc(SERVICE4), "A"),
        "b" => (&t.b, svc(SERVICE4_B), "B"),
        "c" => (&t.c, svc(SERVICE4_C), "C"),
        other => {
            let i: usize = other.strip_prefix('s').and_then(|n| n.parse().ok()).unwrap_or_else(|| panic!("no host for node {other}"));
            let h = &t.extra[i - 1];
            // Each extra server's application answers with a name of its own ("S1", "S2", ...).
            (h, svc(h.v4[1]), Box::leak(format!("S{i}").into_boxed_str()))
        }
    }
}

/// A certificate for node `name` from the CA in `tls`, valid only in 2020, in a folder of its
/// own (with its key).
pub fn expired_cert(tls: &Path, name: &str) -> PathBuf {
    let ca_key = rcgen::KeyPair::from_pem(&std::fs::read_to_string(tls.join("ca.key")).expect("ca.key")).expect("CA key");
    let issuer = rcgen::Issuer::from_ca_cert_pem(&std::fs::read_to_string(tls.join("ca.pem")).expect("ca.pem"), ca_key).expect("CA");
    let key = rcgen::KeyPair::generate().expect("key");
    let mut params = rcgen::CertificateParams::new(vec![name.to_string()]).expect("params");
    params.not_before = rcgen::date_time_ymd(2020, 1, 1);
    params.not_after = rcgen::date_time_ymd(2020, 12, 31);
    params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth, rcgen::ExtendedKeyUsagePurpose::ClientAuth];
    let cert = params.signed_by(&key, &issuer).expect("signing");
    let dir = tls.with_file_name("tls-expired");
    std::fs::create_dir_all(&dir).expect("dir");
    std::fs::write(dir.join(format!("{name}.pem")), cert.pem()).expect("cert");
    std::fs::write(dir.join(format!("{name}.key")), key.serialize_pem()).expect("key");
    dir
}

/// Settings of one node of a [`Cluster`] beyond the defaults.
#[derive(Clone, Debug, Default)]
pub struct NodeOpts {
    /// Test faults for its agent (`REDIRECTOR_TEST_FAULTS`).
    pub faults: Option<String>,
    /// More lines for its agent's configuration.
    pub extra: String,
    /// More lines for its `[cluster]` section (gossip mode).
    pub cluster: String,
    /// Its demo application connects to this socket (a file name in the cluster's folder, for
    /// a [`crate::hook::HookProxy`]) instead of the agent's; the cluster does not wait for it
    /// to register.
    pub hook_via: Option<String>,
    /// More arguments for its demo application.
    pub app_args: Vec<String>,
    /// Start its agent as a service manager would (see [`Launch`]) instead of plainly.
    pub launch: Option<Launch>,
    /// Its agent is not started with the cluster: the test starts it ([`Cluster::start_again`]),
    /// as a server added later.
    pub later: bool,
}

/// How a service manager starts the agent: the arguments after the binary (`{config}` stands
/// for the configuration's path) with only `capabilities` (names as `CAP_BPF`), as root, in
/// the node's namespace entered beforehand (the configuration then has no `netns`: entering
/// one takes a capability production does not need).
#[derive(Clone, Debug)]
pub struct Launch {
    pub args: Vec<String>,
    pub capabilities: Vec<String>,
}

impl Launch {
    /// The command: `nsenter` into `netns`, then `setpriv` down to the capabilities, then the
    /// binary (each replaces the one before: the child's pid is the agent's).
    fn command(&self, netns: &str, config: &Path) -> Command {
        let caps: Vec<String> = self.capabilities.iter().map(|c| format!("+{}", c.trim_start_matches("CAP_").to_lowercase())).collect();
        let mut c = Command::new("nsenter");
        c.arg(format!("--net=/run/netns/{netns}"))
            .args(["setpriv", &format!("--bounding-set=-all,{}", caps.join(",")), "--inh-caps=-all", "--"])
            .arg(redirector_bin())
            .args(self.args.iter().map(|a| if a == "{config}" { config.as_os_str().to_owned() } else { a.into() }));
        c
    }
}

/// How to build a [`Cluster`].
#[derive(Clone, Debug, Default)]
pub struct Options {
    /// The demo HTTP application (with its hook, `sessions = true`) instead of the test app.
    pub demo: Option<DemoApp>,
    /// More lines for every agent's configuration.
    pub extra: String,
    pub dual: bool,
    /// Open connections move with their clients (`live_moves = true` on every service).
    pub live_moves: bool,
    /// Per node name.
    pub nodes: HashMap<String, NodeOpts>,
    /// Membership by gossip ([`NodeSpec::gossip`]).
    pub gossip: bool,
}

/// A topology with an application and an agent on each named server ("a", "b", "c"), with
/// certificates from one cluster CA. Everything stops and is removed when dropped.
pub struct Cluster {
    pub agents: std::collections::HashMap<String, Proc>,
    pub apps: Vec<Proc>,
    pub dir: PathBuf,
    pub cgroups: Cgroups,
    pub t: Topology,
    /// Every application's process, by node name (also in `apps`, in start order).
    pub app_of: HashMap<String, usize>,
    /// Nodes whose agents are launched as a service manager would: their namespace and how.
    launches: HashMap<String, (String, Launch)>,
}

impl Cluster {
    /// `nodes`: (name, high watermark, low watermark).
    #[must_use]
    pub fn new(clients: u16, nodes: &[(&str, u64, u64)]) -> Self {
        Self::build(clients, nodes, None, "")
    }

    /// Like [`Cluster::new`], running a demo HTTP application with its session hook.
    #[must_use]
    pub fn with_demo_app(kind: DemoApp, clients: u16, nodes: &[(&str, u64, u64)]) -> Self {
        Self::build(clients, nodes, Some(kind), "")
    }

    /// Like [`Cluster::new`], with `extra` lines in every agent's configuration.
    #[must_use]
    pub fn with_config(clients: u16, nodes: &[(&str, u64, u64)], extra: &str) -> Self {
        Self::build(clients, nodes, None, extra)
    }

    /// Like [`Cluster::new`], dual stack: every node ("a", "b", "c") also serves an IPv6
    /// service ([`service6`]) with its own application, and has its IPv6 control address as
    /// `dual_stack_address`.
    #[must_use]
    pub fn dual_stack(clients: u16, nodes: &[(&str, u64, u64)]) -> Self {
        Self::build_with(clients, nodes, None, "", true)
    }

    fn build(clients: u16, nodes: &[(&str, u64, u64)], demo: Option<DemoApp>, extra: &str) -> Self {
        Self::build_with(clients, nodes, demo, extra, false)
    }

    fn build_with(clients: u16, nodes: &[(&str, u64, u64)], demo: Option<DemoApp>, extra: &str, dual: bool) -> Self {
        Self::with_options(clients, nodes, &Options { demo, extra: extra.to_string(), dual, nodes: HashMap::new(), live_moves: false, gossip: false })
    }

    /// A cluster built with `opts`.
    #[must_use]
    pub fn with_options(clients: u16, nodes: &[(&str, u64, u64)], opts: &Options) -> Self {
        let (demo, extra, dual) = (opts.demo, opts.extra.as_str(), opts.dual);
        let none = NodeOpts::default();
        let node_opts = |n: &str| opts.nodes.get(n).unwrap_or(&none);
        let extra_servers = nodes.iter().filter(|n| n.0.starts_with('s')).count();
        let t = Topology::with_servers(clients, u8::try_from(extra_servers).expect("at most 255 extra servers"));
        let cgroups = Cgroups::new(&t.prefix);
        let dir = std::env::temp_dir().join(format!("{}-agents", t.prefix));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).expect("agents dir");
        let names: Vec<&str> = nodes.iter().map(|n| n.0).collect();
        make_certs(&dir.join("tls"), &names);
        let mut apps = Vec::new();
        let mut app_of = HashMap::new();
        let specs: Vec<NodeSpec<'_>> = nodes
            .iter()
            .map(|(name, high, low)| {
                let (host, service, app) = node_host(&t, name);
                let cgroup = cgroups.group(&format!("{}-{name}", t.prefix));
                let o = node_opts(name);
                app_of.insert((*name).to_string(), apps.len());
                if let Some(kind) = demo {
                    let hook = dir.join(o.hook_via.clone().unwrap_or_else(|| format!("{name}-app.sock")));
                    apps.push(start_demo_app(kind, host, &cgroup, app, service, &hook, &dir, &o.app_args));
                } else {
                    apps.push(start_app(host, &cgroup, app, service, &dir));
                }
                let service6 = dual.then(|| service6(name));
                if let Some(s6) = service6 {
                    if let IpAddr::V6(a) = s6.ip()
                        && !host.v6.contains(&a)
                    {
                        host.ip(&["addr", "add", &format!("{a}/64"), "dev", "eth0", "nodad"]);
                    }
                    // With the demo, the IPv6 service has a demo application of its own too (its
                    // own hook connection, the same name in its answers).
                    if let Some(kind) = demo {
                        let hook = dir.join(o.hook_via.clone().unwrap_or_else(|| format!("{name}-app.sock")));
                        apps.push(start_demo_app(kind, host, &cgroup, app, s6, &hook, &dir, &o.app_args));
                    } else {
                        apps.push(start_app(host, &cgroup, app, s6, &dir));
                    }
                }
                NodeSpec {
                    name,
                    host,
                    service,
                    service6,
                    cgroup,
                    high: *high,
                    low: *low,
                    sessions: demo.is_some(),
                    live_moves: opts.live_moves,
                    extra: o.extra.clone(),
                    launched: o.launch.is_some(),
                    gossip: opts.gossip,
                    cluster: o.cluster.clone(),
                }
            })
            .collect();
        let refs: Vec<&NodeSpec<'_>> = specs.iter().collect();
        let mut agents = std::collections::HashMap::new();
        let mut launches = HashMap::new();
        for s in &specs {
            let cfg = agent_config(&t, &dir, s, &refs, extra);
            let o = node_opts(s.name);
            if let Some(l) = o.launch.clone() {
                launches.insert(s.name.to_string(), (s.host.ns.clone(), l));
            }
            if !o.later {
                agents.insert(s.name.to_string(), start_node_agent(&cfg, launches.get(s.name), o.faults.as_deref()));
            }
        }
        drop(specs);
        let c = Self { agents, apps, dir, cgroups, t, app_of, launches };
        // Nodes started later are not waited for.
        let names: Vec<&str> = names.into_iter().filter(|n| !node_opts(n).later).collect();
        if demo.is_some() {
            for n in names.iter().filter(|n| node_opts(n).hook_via.is_none()) {
                // The agent answers first (within the budget of `status`: agents starting at
                // once on two busy cores take a while to load and verify their programs; its
                // hook socket is up by then), then its application registers (it retries
                // every half second).
                let _ = status(&c.sock(n));
                let services: Vec<String> = std::iter::once(node_host(&c.t, n).1).chain(dual.then(|| service6(n))).map(|s| s.to_string()).collect();
                wait_status(&c.sock(n), 10, &format!("{n}'s applications to register {services:?}"), |v| {
                    services.iter().all(|svc| v["hook"]["registered"].as_array().is_some_and(|r| r.iter().any(|s| s.as_str() == Some(svc.as_str()))))
                });
            }
        }
        // Every agent answers and sees all its siblings (gossip: every other member live).
        for n in &names {
            let others = names.len() - 1;
            if opts.gossip {
                wait_status(&c.sock(n), 60, &format!("{n} to see the {others} other member(s) live"), |v| members(v).len() == others);
            } else {
                wait_status(&c.sock(n), 30, &format!("{n} to see its {others} sibling(s) up"), |v| {
                    v["siblings"].as_array().is_some_and(|s| s.iter().filter(|x| x["up"] == true).count() == others)
                });
            }
        }
        c
    }

    /// Admin socket of node `name`.
    #[must_use]
    pub fn sock(&self, name: &str) -> PathBuf {
        self.dir.join(format!("{name}.sock"))
    }

    /// Status of node `name`.
    #[must_use]
    pub fn status(&self, name: &str) -> serde_json::Value {
        status(&self.sock(name))
    }

    /// Restarts node `name`'s test application (clusters with the plain TCP application): a new
    /// process with a new listening socket on the same address.
    pub fn restart_app(&mut self, name: &str) {
        let i = self.app_of[name];
        self.apps[i].kill();
        let (host, service, app) = node_host(&self.t, name);
        let cgroup = self.cgroups.group(&format!("{}-{name}", self.t.prefix));
        self.apps[i] = start_app(host, &cgroup, app, service, &self.dir);
    }

    /// Restarts node `name`'s agent (same configuration).
    pub fn restart(&mut self, name: &str) {
        self.kill_agent(name);
        self.start_again(name, None);
    }

    /// Stops node `name`'s agent gracefully (SIGTERM) and waits up to `secs` for it to exit;
    /// how long it took.
    pub fn term_agent(&mut self, name: &str, secs: u64) -> Duration {
        let a = self.agents.get_mut(name).unwrap_or_else(|| panic!("no agent {name}"));
        let pid = i32::try_from(a.child.id()).expect("pid");
        let t0 = Instant::now();
        // SAFETY: a plain syscall on our own child's pid (not reaped yet, so not reused).
        assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0, "SIGTERM to {name}'s agent");
        loop {
            if a.child.try_wait().expect("wait").is_some() {
                return t0.elapsed();
            }
            assert!(t0.elapsed() < Duration::from_secs(secs), "{name}'s agent did not exit within {secs} s of SIGTERM:\n{}", a.log());
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The namespace host of node `name`.
    #[must_use]
    pub fn host(&self, name: &str) -> &Host {
        node_host(&self.t, name).0
    }

    /// Node `name`'s (IPv4) service address.
    #[must_use]
    pub fn service(&self, name: &str) -> SocketAddr {
        node_host(&self.t, name).1
    }

    /// The rules in node `name`'s kernel (`rule list --json`).
    #[must_use]
    pub fn rules(&self, name: &str) -> Vec<serde_json::Value> {
        let v: serde_json::Value = serde_json::from_str(&self.t.redirector_ok(self.host(name), &["rule", "list", "--json"])).expect("rule list --json");
        v["rules"].as_array().cloned().unwrap_or_default()
    }

    /// Checks that every client had every request answered and its session continued; if
    /// not, prints the applications' logs and fails with the first 20 clients' problems.
    pub fn assert_intact(&self, clients: &[crate::http::HttpClient]) {
        let bad = crate::crowd::broken(clients);
        if !bad.is_empty() {
            for a in &self.apps {
                eprintln!("--- {} ---\n{}", a.log.display(), a.log());
            }
        }
        let total: u64 = clients.iter().map(|c| c.requests).sum();
        assert!(
            bad.is_empty(),
            "{} of {} clients lost a request or broke their session ({total} requests):\n{}",
            bad.len(),
            clients.len(),
            bad.iter().take(20).cloned().collect::<Vec<_>>().join("\n")
        );
    }

    /// Runs `redirector ARGS --socket <name's admin socket> --json` (a command that asks the
    /// running agent); its JSON answer, or the error it printed.
    pub fn ask_agent(&self, name: &str, args: &[String]) -> Result<serde_json::Value, String> {
        let out = Command::new(redirector_bin()).args(args).arg("--socket").arg(self.sock(name)).arg("--json").output().expect("run redirector");
        if out.status.success() {
            serde_json::from_slice(&out.stdout).map_err(|e| format!("{e}: {}", String::from_utf8_lossy(&out.stdout)))
        } else {
            Err(String::from_utf8_lossy(&out.stderr).trim().to_string())
        }
    }

    /// `redirector give-back CLIENTS` to node `name`'s agent.
    pub fn give_back(&self, name: &str, clients: &[IpAddr]) -> Result<serde_json::Value, String> {
        let mut args = vec!["give-back".to_string()];
        args.extend(clients.iter().map(ToString::to_string));
        self.ask_agent(name, &args)
    }

    /// Kills node `name`'s agent (SIGKILL, as a crash).
    pub fn kill_agent(&mut self, name: &str) {
        if let Some(a) = self.agents.get_mut(name) {
            a.kill();
        }
    }

    /// Starts node `name`'s agent again (same configuration, `faults` if any) and waits for
    /// it to answer.
    pub fn start_again(&mut self, name: &str, faults: Option<&str>) {
        let agent = start_node_agent(&self.dir.join(format!("{name}.toml")), self.launches.get(name), faults);
        self.agents.insert(name.to_string(), agent);
        let _ = status(&self.sock(name));
    }

    /// Log of node `name`'s previous agent (before the last restart).
    #[must_use]
    pub fn prev_log(&self, name: &str) -> String {
        fs::read_to_string(self.dir.join(format!("{name}.prev.log"))).unwrap_or_default()
    }

    /// Log of node `name`'s application.
    #[must_use]
    pub fn app_log(&self, name: &str) -> String {
        self.app_of.get(name).map(|i| self.apps[*i].log()).unwrap_or_default()
    }

    /// Log of node `name`'s agent.
    #[must_use]
    pub fn log(&self, name: &str) -> String {
        self.agents.get(name).map(Proc::log).unwrap_or_default()
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for a in self.agents.values_mut() {
            a.kill();
        }
        for a in &mut self.apps {
            a.kill();
        }
        if std::thread::panicking() {
            for (n, a) in &self.agents {
                eprintln!("--- agent {n} log ---\n{}", a.log());
            }
            // The applications' own account (hook events, what they did with connections).
            for a in &self.apps {
                let log = a.log();
                let tail: Vec<&str> = log.lines().rev().take(40).collect();
                eprintln!("--- application log {} (last 40 lines) ---\n{}", a.log.display(), tail.into_iter().rev().collect::<Vec<_>>().join("\n"));
            }
        }
        let _ = fs::remove_dir_all(&self.dir);
    }
}

/// Opens one connection per client in `range` (client addresses `client4(i)`) to `dst`;
/// returns them with who served each.
#[must_use]
pub fn open(c: &Cluster, range: std::ops::RangeInclusive<u16>, dst: SocketAddr) -> Vec<(u16, Client, String)> {
    range
        .map(|i| {
            let mut cl = Client::connect(&c.t.client.ns, IpAddr::V4(client4(i)), dst);
            let who = cl.who();
            assert_eq!(cl.peer(), dst, "the client always talks to the address it chose");
            (i, cl, who)
        })
        .collect()
}

/// How many of `conns` each server served.
#[must_use]
pub fn served_by(conns: &[(u16, Client, String)]) -> HashMap<String, usize> {
    let mut m = HashMap::new();
    for (_, _, w) in conns {
        *m.entry(w.clone()).or_insert(0) += 1;
    }
    m
}

/// (client, to) of every client a status lists as moved out.
#[must_use]
pub fn migrated(v: &serde_json::Value) -> Vec<(String, String)> {
    v["migrated_out"].as_array().into_iter().flatten().map(|m| (m["client"].as_str().unwrap_or_default().to_string(), m["to"].as_str().unwrap_or_default().to_string())).collect()
}

/// The other members a status says gossip holds live, by name (none without gossip).
#[must_use]
pub fn members(v: &serde_json::Value) -> Vec<String> {
    v["cluster"]["members"].as_array().map(|m| m.iter().filter_map(|x| x["name"].as_str().map(str::to_string)).collect()).unwrap_or_default()
}

/// Where a status says each moved-out client is steered (client -> sibling).
#[must_use]
pub fn moved_to(v: &serde_json::Value) -> std::collections::BTreeMap<IpAddr, String> {
    migrated(v).into_iter().map(|(c, to)| (c.parse().expect("address"), to)).collect()
}

/// Clients a status lists as adopted.
#[must_use]
pub fn adopted(v: &serde_json::Value) -> Vec<String> {
    v["adopted"].as_array().into_iter().flatten().map(|m| m["client"].as_str().unwrap_or_default().to_string()).collect()
}

/// Waits up to `secs` for `node`'s agent log to contain `needle`.
pub fn wait_log(c: &Cluster, node: &str, needle: &str, secs: u64) {
    let start = Instant::now();
    while !c.log(node).contains(needle) {
        assert!(start.elapsed() < Duration::from_secs(secs), "{node}'s log never said {needle:?}:\n{}", c.log(node));
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Waits up to `secs` for `node`'s application log to contain `needle`.
pub fn wait_app_log(c: &Cluster, node: &str, needle: &str, secs: u64) {
    let start = Instant::now();
    while !c.app_log(node).contains(needle) {
        assert!(start.elapsed() < Duration::from_secs(secs), "{node}'s application never said {needle:?}:\n{}", c.app_log(node));
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Samples the status of some agents every 50 ms on a thread until stopped: the highest load
/// each reported, and every status seen (to check invariants over time, not one snapshot).
pub struct Sampler {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<HashMap<String, Vec<serde_json::Value>>>>,
}

impl Sampler {
    /// Starts sampling the agents `nodes` of cluster `c`.
    #[must_use]
    pub fn start(c: &Cluster, nodes: &[&str]) -> Self {
        let socks: Vec<(String, PathBuf)> = nodes.iter().map(|n| ((*n).to_string(), c.sock(n))).collect();
        let stop = Arc::new(AtomicBool::new(false));
        let s = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut seen: HashMap<String, Vec<serde_json::Value>> = HashMap::new();
            while !s.load(Ordering::Relaxed) {
                for (n, sock) in &socks {
                    if let Ok(v) = query(sock) {
                        seen.entry(n.clone()).or_default().push(v);
                    }
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            seen
        });
        Self { stop, thread: Some(thread) }
    }

    /// Stops sampling; every status seen, per node.
    #[must_use]
    pub fn stop(mut self) -> HashMap<String, Vec<serde_json::Value>> {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.take().expect("running").join().expect("sampler thread")
    }
}

impl Drop for Sampler {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The highest `load` among `samples`, and how many there were.
#[must_use]
pub fn max_load(samples: &[serde_json::Value]) -> (u64, usize) {
    (samples.iter().filter_map(|v| v["load"].as_u64()).max().unwrap_or(0), samples.len())
}
