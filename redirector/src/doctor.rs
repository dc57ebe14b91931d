//! `redirector doctor`: whether this host has what the agent needs, one check per
//! requirement, each that fails saying what to do about it.

use std::{
    net::IpAddr,
    path::{Path, PathBuf},
    time::Duration,
};

use serde::Serialize;

use crate::{config::Valid, datapath, peer::tls};

/// How a check came out.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Outcome {
    Pass,
    /// Works, but something will hurt under some conditions.
    Warn,
    /// The agent will not work (or not fully) until it is fixed.
    Fail,
}

/// One requirement, checked.
#[derive(Clone, Debug, Serialize)]
pub struct Check {
    /// What was checked, e.g. `kernel` or `uplink eth0`.
    pub name: String,
    pub outcome: Outcome,
    /// What was found.
    pub detail: String,
    /// What to do, when it did not pass.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fix: Option<String>,
}

impl Check {
    fn pass(name: impl Into<String>, detail: impl Into<String>) -> Self {
        Self { name: name.into(), outcome: Outcome::Pass, detail: detail.into(), fix: None }
    }

    fn warn(name: impl Into<String>, detail: impl Into<String>, fix: impl Into<String>) -> Self {
        Self { name: name.into(), outcome: Outcome::Warn, detail: detail.into(), fix: Some(fix.into()) }
    }

    pub(crate) fn fail(name: impl Into<String>, detail: impl Into<String>, fix: impl Into<String>) -> Self {
        Self { name: name.into(), outcome: Outcome::Fail, detail: detail.into(), fix: Some(fix.into()) }
    }
}

/// The oldest kernel with everything the datapath uses (TCX links: 6.6).
const KERNEL: (u32, u32) = (6, 6);
/// The smallest MSS a tunnelled segment may be clamped to before clients suffer (RFC 9293's
/// default MSS for IPv4).
const MIN_MSS: u16 = 536;
/// How long a sibling has to complete the TLS handshake.
const SIBLING_TIMEOUT: Duration = Duration::from_secs(2);

/// The checks of what is host-wide: the kernel, BTF, and (with `cfg`) the neighbour table's
/// limits, which only the initial network namespace shows: run these before entering `cfg`'s.
#[must_use]
pub fn host(cfg: Option<&Valid>) -> Vec<Check> {
    let mut checks = vec![kernel(), btf()];
    if let Some(cfg) = cfg {
        checks.extend(neighbours(cfg.high_watermark));
    }
    checks
}

/// The checks of this network namespace and mounts: the bpffs and the programs, then (with
/// `cfg`) its services, certificates and siblings. Run them in `cfg`'s namespace.
#[must_use]
pub fn run(bpffs: &Path, cfg: Option<&Valid>) -> Vec<Check> {
    let fs = bpffs_check(bpffs);
    let fs_ok = fs.outcome == Outcome::Pass;
    let mut checks = vec![fs];
    if fs_ok {
        checks.push(match datapath::verify_programs(bpffs) {
            Ok(programs) => {
                let each: Vec<String> = programs.iter().map(|p| format!("{} {}", p.name, p.instructions)).collect();
                Check::pass("programs", format!("the verifier accepts all {} programs on this kernel (instructions processed: {})", programs.len(), each.join(", ")))
            }
            Err(e) => Check::fail(
                "programs",
                tail(&e.to_string(), 600),
                "a kernel with BTF, TCX, sk_lookup, sock_ops and ring buffers (Linux 6.6 or newer), and CAP_BPF with CAP_PERFMON (or root)",
            ),
        });
    }
    if let Some(cfg) = cfg {
        for s in &cfg.services {
            checks.push(cgroup(&s.cgroup));
            checks.push(uplink(&s.dev, s.address.ip()));
        }
        let cert = tls::check_node_cert(&cfg.tls.ca, &cfg.tls.cert, &cfg.node);
        checks.push(match &cert {
            Ok(()) => Check::pass("certificate", format!("{} is issued by the cluster CA for {} and valid now", cfg.tls.cert.display(), cfg.node)),
            Err(why) => Check::fail("certificate", why.clone(), format!("issue a new one: redirector tls node {} --dir DIR (with the cluster CA)", cfg.node)),
        });
        match (cert, tls::Tls::load(&cfg.tls.ca, &cfg.tls.cert, &cfg.tls.key)) {
            (Ok(()), Ok(material)) => {
                for s in &cfg.siblings {
                    let check = handshake(&material, format!("sibling {}", s.name), &s.name, s.address);
                    let passed = check.outcome == Outcome::Pass;
                    checks.push(check);
                    if passed {
                        checks.extend(direct_server_return(cfg, &s.name));
                    }
                }
                // Gossip mode: the seeds a node joins through answer as themselves.
                checks.extend(cfg.cluster.seeds.iter().map(|s| handshake(&material, format!("seed {}", s.name), &s.name, s.address)));
            }
            (Ok(()), Err(e)) => checks.push(Check::fail("key", format!("{e:#}"), format!("the key {} must be the certificate's", cfg.tls.key.display()))),
            (Err(_), _) => {}
        }
    }
    checks
}

/// Check `what`: node `name`'s agent at `addr` completes a mutual TLS handshake with this
/// node's certificate.
fn handshake(material: &tls::Tls, what: String, name: &str, addr: std::net::SocketAddr) -> Check {
    match tls::handshake(material, name, addr, SIBLING_TIMEOUT) {
        Ok(()) => Check::pass(what, format!("{addr} answers with a certificate of the cluster CA for {name} and accepts this node's")),
        Err(e) => Check::fail(what, format!("{e:#}"), format!("start its agent, or open TCP port {} from this node to it", addr.port())),
    }
}

/// Whether sibling `sibling` can send with this node's service addresses as source (one
/// service per family), as a volunteer's replies to this node's clients do: the running
/// agent here asks the sibling's to send the probe ([`crate::probe`]) and this watches for it.
/// Without a running agent here there is nothing to ask with: a warning.
fn direct_server_return(cfg: &Valid, sibling: &str) -> Vec<Check> {
    let mut checks = Vec::new();
    for v4 in [true, false] {
        let Some(service) = cfg.services.iter().find(|s| s.address.is_ipv4() == v4).map(|s| s.address) else { continue };
        let name = format!("direct server return via {sibling} ({})", datapath::family_name(v4));
        checks.push(match dsr_probe(cfg, sibling, service) {
            Ok(Some(ms)) => Check::pass(name, format!("a datagram {sibling} sent with source {} reached this node ({ms:.0} ms)", service.ip())),
            Ok(None) => Check::fail(
                name,
                format!("{sibling} sent a datagram with this node's service address {} as its source; it did not arrive within {} ms: the network drops what a sibling sends as this node, so its answers to moved clients would be lost", service.ip(), PROBE_WAIT.as_millis()),
                format!("let {sibling} send with source {}: turn off source/destination checking or anti-spoofing for it (cloud: the instance's or interface's source/destination check; switch: IP source guard, uRPF on its port)", service.ip()),
            ),
            Err(Skip(why)) => Check::warn(name, why, "start this node's agent (and the sibling's), then run doctor again"),
        });
    }
    checks
}

/// Why the probe could not be tried.
struct Skip(String);

/// How long the probe may take to arrive once the sibling sent it.
const PROBE_WAIT: Duration = Duration::from_secs(1);

/// Asks sibling `sibling` (through this node's agent) for the probe from `service`; how long
/// it took to arrive, or none if it did not.
fn dsr_probe(cfg: &Valid, sibling: &str, service: std::net::SocketAddr) -> Result<Option<f64>, Skip> {
    use std::hash::{BuildHasher as _, Hasher as _};
    let token = std::collections::hash_map::RandomState::new().build_hasher().finish();
    let port = 40_000 + u16::try_from(token % 20_000).unwrap_or(0);
    let capture = crate::probe::Capture::open(service.is_ipv4(), port).map_err(|e| Skip(format!("cannot watch for the probe: {e}")))?;
    let t0 = std::time::Instant::now();
    let sock = cfg.admin_socket();
    crate::admin::probe(&sock, sibling, service, port, token).map_err(|e| Skip(format!("the probe could not be sent: {e:#}")))?;
    match capture.wait(service.ip(), token, PROBE_WAIT) {
        Ok(true) => Ok(Some(t0.elapsed().as_secs_f64() * 1000.0)),
        Ok(false) => Ok(None),
        Err(e) => Err(Skip(format!("watching for the probe: {e}"))),
    }
}

fn kernel() -> Check {
    let release = nix::sys::utsname::uname().map(|u| u.release().to_string_lossy().into_owned()).unwrap_or_default();
    let mut nums = release.split(|c: char| !c.is_ascii_digit()).filter_map(|n| n.parse::<u32>().ok());
    let version = (nums.next().unwrap_or(0), nums.next().unwrap_or(0));
    if version >= KERNEL {
        Check::pass("kernel", format!("Linux {release} (TCX links need {}.{})", KERNEL.0, KERNEL.1))
    } else {
        Check::fail("kernel", format!("Linux {release}: TCX links need {}.{}", KERNEL.0, KERNEL.1), format!("a kernel {}.{} or newer", KERNEL.0, KERNEL.1))
    }
}

fn btf() -> Check {
    let path = Path::new("/sys/kernel/btf/vmlinux");
    if path.exists() {
        Check::pass("btf", format!("{} is there", path.display()))
    } else {
        Check::fail("btf", format!("no {}", path.display()), "a kernel built with CONFIG_DEBUG_INFO_BTF=y")
    }
}

/// Whether `bpffs` is a mounted bpffs (the pins need one).
fn bpffs_check(bpffs: &Path) -> Check {
    match nix::sys::statfs::statfs(bpffs) {
        Ok(st) if st.filesystem_type() == nix::sys::statfs::BPF_FS_MAGIC => Check::pass("bpffs", format!("{} is a bpffs", bpffs.display())),
        Ok(_) => Check::fail(
            "bpffs",
            format!("{} is not a bpffs", bpffs.display()),
            format!("mount -t bpf bpf {} (the agent mounts it itself only with CAP_SYS_ADMIN)", bpffs.display()),
        ),
        Err(e) => Check::fail("bpffs", format!("{}: {e}", bpffs.display()), format!("mkdir -p {0} && mount -t bpf bpf {0}", bpffs.display())),
    }
}

fn cgroup(path: &PathBuf) -> Check {
    let name = format!("cgroup {}", path.display());
    match nix::sys::statfs::statfs(path) {
        Ok(st) if st.filesystem_type() == nix::sys::statfs::CGROUP2_SUPER_MAGIC => Check::pass(name, "a cgroup v2 folder: the load is counted there"),
        Ok(_) => Check::fail(name, "not in a cgroup v2 hierarchy", "mount cgroup2 (mount -t cgroup2 none /sys/fs/cgroup) and name the application's folder in it"),
        Err(e) => Check::fail(name, e.to_string(), "create it and put the application in it, or name the application's own (systemctl show -P ControlGroup UNIT)"),
    }
}

/// The uplink exists and its MTU leaves tunnelled segments a usable MSS.
fn uplink(dev: &str, service: IpAddr) -> Check {
    let name = format!("uplink {dev}");
    let mtu = match datapath::interface_mtu(dev) {
        Ok(m) => m,
        Err(e) => return Check::fail(name, e.to_string(), format!("name the interface the clients' packets arrive on ({dev} does not exist here)")),
    };
    let mss = redirector_common::decide::mss_clamp(mtu, service.is_ipv6());
    if mss < MIN_MSS {
        Check::fail(name, format!("MTU {mtu}: tunnelled segments would need an MSS of {mss} (under {MIN_MSS})"), format!("raise the MTU of {dev} (ip link set {dev} mtu 1500)"))
    } else {
        Check::pass(name, format!("MTU {mtu}: SYNs of moved clients are clamped to MSS {mss} for the tunnel"))
    }
}

/// Every client a server answers directly on its own segment needs a neighbour entry: past
/// `gc_thresh3` the kernel drops replies (host-wide).
fn neighbours(high_watermark: u64) -> Vec<Check> {
    ["ipv4", "ipv6"]
        .into_iter()
        .map(|family| {
            let path = format!("/proc/sys/net/{family}/neigh/default/gc_thresh3");
            let name = format!("neighbours {family}");
            match std::fs::read_to_string(&path).ok().and_then(|v| v.trim().parse::<u64>().ok()) {
                Some(n) if n >= high_watermark => Check::pass(name, format!("gc_thresh3 {n} >= high_watermark {high_watermark}")),
                Some(n) => Check::warn(
                    name,
                    format!("gc_thresh3 {n} < high_watermark {high_watermark}: clients on this server's own segment beyond {n} get no replies"),
                    format!("sysctl -w net.{family}.neigh.default.gc_thresh3={} (and gc_thresh2 a little lower)", high_watermark.next_power_of_two().max(1024) * 2),
                ),
                None => Check::warn(
                    name,
                    format!("cannot read {path} (the host-wide limits show in the initial network namespace only)"),
                    "run doctor from the initial network namespace, or check the limits by hand",
                ),
            }
        })
        .collect()
}

/// The end of a long message (a verifier log says what went wrong at its end).
fn tail(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_string();
    }
    let start = s.char_indices().map(|(i, _)| i).find(|i| *i >= s.len() - max).unwrap_or(0);
    format!("[...] {}", &s[start..])
}
