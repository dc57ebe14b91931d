//! The kernel datapath: loads and attaches the eBPF programs, pins them with their maps in a
//! bpffs, and gives typed access to the steering state.
//!
//! Everything lives under `<bpffs>/redirector/<instance>/`: the maps (re-adopted by every
//! process that opens the instance, so steering survives restarts of the agent or CLI) and
//! the program links (`links/`), which keep the programs attached while no process runs.

mod bpffs;
mod listener;
mod net;
mod probe;
pub mod testrun;
mod types;

use std::{
    fs,
    io,
    net::IpAddr,
    os::fd::{AsFd as _, AsRawFd as _},
    path::{Path, PathBuf},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, HashMap, LpmTrie, MapData, PerCpuArray, PerCpuHashMap, SockHash, lpm_trie::Key},
    programs::{
        CgroupAttachMode, SchedClassifier, SkLookup, SockOps, TcAttachType,
        links::{FdLink, LinkOrder, PinnedLink},
        tc::{SchedClassifierLink, TcAttachOptions},
    },
};
use redirector_common::{
    ADOPTED_LISTENER, AdoptedValue, Counter, RuleValue, ServiceKey, ServiceValue, SiblingValue,
    decide, maps, programs,
};
pub use types::{Load, Prefix, RuleInfo, RuleState, ServiceInfo, Stats};

pub use self::probe::ProbeError;

/// The eBPF object built by `build.rs`.
pub static EBPF_OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/redirector-ebpf"));

/// Default bpffs mount point.
pub const DEFAULT_BPFFS: &str = "/sys/fs/bpf";
/// Default drain period of a withdrawn rule.
pub const DEFAULT_DRAIN: Duration = Duration::from_mins(1);

/// Errors of the datapath API, each saying what was being done to what.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("this needs root (CAP_BPF and CAP_NET_ADMIN); run it as root")]
    NotRoot,
    #[error("interface {name} not found")]
    NoInterface { name: String },
    #[error("kernel feature missing: {what}")]
    KernelFeature { what: String, #[source] source: Option<Box<dyn std::error::Error + Send + Sync>> },
    #[error("{what}")]
    Invalid { what: String },
    #[error("{what}: {source}")]
    Bpf { what: String, #[source] source: Box<dyn std::error::Error + Send + Sync> },
    #[error("{what}: {source}")]
    Io { what: String, #[source] source: io::Error },
    #[error(transparent)]
    Probe(#[from] ProbeError),
}

impl Error {
    fn bpf(what: impl Into<String>, source: impl std::error::Error + Send + Sync + 'static) -> Self {
        Error::Bpf { what: what.into(), source: Box::new(source) }
    }
    fn io(what: impl Into<String>, source: io::Error) -> Self {
        Error::Io { what: what.into(), source }
    }
    fn invalid(what: impl Into<String>) -> Self {
        Error::Invalid { what: what.into() }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Where an instance's state lives.
#[derive(Clone, Debug)]
pub struct Location {
    /// bpffs mount point.
    pub bpffs: PathBuf,
    /// Instance name: several instances can share a bpffs.
    pub instance: String,
}

impl Default for Location {
    fn default() -> Self {
        Self { bpffs: PathBuf::from(DEFAULT_BPFFS), instance: "default".into() }
    }
}

impl Location {
    /// `<bpffs>/redirector/<instance>`.
    #[must_use]
    pub fn dir(&self) -> PathBuf {
        self.bpffs.join("redirector").join(&self.instance)
    }
}

/// An open instance: the programs loaded against the pinned maps.
pub struct Datapath {
    dir: PathBuf,
    ebpf: Ebpf,
}

impl Datapath {
    /// Opens (or creates) the instance: mounts the bpffs if needed, loads the programs and
    /// re-adopts pinned maps, creating any that are missing. Rules whose drain period ended are
    /// removed.
    pub fn open(loc: &Location) -> Result<Self> {
        if !nix::unistd::Uid::effective().is_root() {
            return Err(Error::NotRoot);
        }
        if loc.instance.is_empty()
            || !loc.instance.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        {
            return Err(Error::invalid(format!(
                "bad instance name {:?}: use letters, digits, '-' and '_'",
                loc.instance
            )));
        }
        bpffs::ensure_mounted(&loc.bpffs)?;
        let dir = loc.dir();
        fs::create_dir_all(dir.join("links"))
            .map_err(|e| Error::io(format!("creating {}", dir.display()), e))?;
        // Instances pinned by an older version have rules but no /24 bitmap yet.
        let nets_new = !dir.join(maps::NETS_V4).exists();
        let ebpf = EbpfLoader::new()
            .default_map_pin_directory(&dir)
            .load(EBPF_OBJECT)
            .map_err(|e| Error::bpf(format!("loading the eBPF object with maps pinned in {}", dir.display()), e))?;
        let mut dp = Self { dir, ebpf };
        if nets_new {
            let prefixes: Vec<Prefix> = dp.list_rules()?.into_iter().map(|r| r.prefix).collect();
            dp.mark_nets(&prefixes)?;
        }
        dp.collect_drained()?;
        Ok(dp)
    }

    /// The instance directory in the bpffs.
    #[must_use]
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn link_path(&self, name: &str) -> PathBuf {
        self.dir.join("links").join(name)
    }

    /// Attaches the ingress classifier to `ifname` (first in its TCX chain) unless it already
    /// is. With `replace`, swaps this binary's program into the existing link atomically: every
    /// packet is decided by either the old or the new program, with the same pinned maps.
    pub fn attach_ingress(&mut self, ifname: &str, replace: bool) -> Result<u32> {
        self.attach_tc(ifname, programs::INGRESS, TcAttachType::Ingress, "tc-ingress", replace)
    }

    /// Attaches the egress classifier (SYN-ACK MSS clamp of adopted services) to `ifname`.
    pub fn attach_egress(&mut self, ifname: &str, replace: bool) -> Result<u32> {
        self.attach_tc(ifname, programs::EGRESS, TcAttachType::Egress, "tc-egress", replace)
    }

    /// Classifier `name`, loaded into the kernel (verified) if it was not yet.
    pub(crate) fn classifier(&mut self, name: &str) -> Result<&mut SchedClassifier> {
        let prog: &mut SchedClassifier = self
            .ebpf
            .program_mut(name)
            .ok_or_else(|| Error::invalid(format!("eBPF object has no program {name}")))?
            .try_into()
            .map_err(|e| Error::bpf(format!("{name} is not a classifier"), e))?;
        if prog.fd().is_err() {
            prog.load().map_err(|e| Error::bpf(format!("loading {name} (verifier)"), e))?;
        }
        Ok(prog)
    }

    fn attach_tc(&mut self, ifname: &str, name: &str, hook: TcAttachType, pin_prefix: &str, replace: bool) -> Result<u32> {
        let ifindex = net::ifindex(ifname)?;
        let pin = self.link_path(&format!("{pin_prefix}-{ifindex}"));
        if pin.exists() && !replace {
            return Ok(ifindex);
        }
        let prog = self.classifier(name)?;
        if pin.exists() {
            let pinned = PinnedLink::from_pin(&pin)
                .map_err(|e| Error::bpf(format!("opening pinned link {}", pin.display()), e))?;
            let link = SchedClassifierLink::try_from(FdLink::from(pinned))
                .map_err(|e| Error::bpf("converting the pinned link", e))?;
            // The link stays pinned (bpf_link_update): only its program changes.
            prog.attach_to_link(link)
                .map_err(|e| Error::bpf(format!("replacing {name} on {ifname}"), e))?;
            return Ok(ifindex);
        }
        let id = prog
            .attach_with_options(ifname, hook, TcAttachOptions::TcxOrder(LinkOrder::first()))
            .map_err(|e| Error::bpf(format!("attaching {name} to {ifname} (TCX)"), e))?;
        let link = prog.take_link(id).map_err(|e| Error::bpf("taking the link", e))?;
        let fd_link = FdLink::try_from(link).map_err(|e| Error::bpf("TC link is not an fd link", e))?;
        fd_link
            .pin(&pin)
            .map_err(|e| Error::bpf(format!("pinning the link at {}", pin.display()), e))?;
        Ok(ifindex)
    }

    /// Replaces every attached program of this instance with this binary's, atomically per
    /// hook, keeping the pinned maps.
    pub fn upgrade(&mut self) -> Result<usize> {
        let mut replaced = 0;
        let links = fs::read_dir(self.dir.join("links")).map_err(|e| Error::io("listing links", e))?;
        let mut names: Vec<String> = links.filter_map(Result::ok).map(|e| e.file_name().to_string_lossy().into_owned()).collect();
        names.sort();
        for n in names {
            let (kind, ifindex) = match n.rsplit_once('-') {
                Some((k, i)) if k == "tc-ingress" || k == "tc-egress" => (k.to_string(), i.parse::<u32>().ok()),
                _ if n == "sk-lookup" => ("sk-lookup".to_string(), None),
                _ => continue,
            };
            if kind == "sk-lookup" {
                self.attach_sk_lookup(true)?;
            } else {
                let ifindex = ifindex.ok_or_else(|| Error::invalid(format!("bad link pin name {n}")))?;
                let ifname = net::ifname(ifindex)?;
                if kind == "tc-ingress" {
                    self.attach_ingress(&ifname, true)?;
                } else {
                    self.attach_egress(&ifname, true)?;
                }
            }
            replaced += 1;
        }
        Ok(replaced)
    }

    /// Attaches the `sk_lookup` program to the current network namespace unless it already is.
    /// With `replace`, attaches this binary's program first and then drops the old link.
    pub fn attach_sk_lookup(&mut self, replace: bool) -> Result<()> {
        let pin = self.link_path("sk-lookup");
        if pin.exists() && !replace {
            return Ok(());
        }
        let prog: &mut SkLookup = self
            .ebpf
            .program_mut(programs::SK_LOOKUP)
            .ok_or_else(|| Error::invalid("eBPF object has no sk_lookup program"))?
            .try_into()
            .map_err(|e| Error::bpf("sk_lookup program has the wrong type", e))?;
        if prog.fd().is_err() {
            prog.load().map_err(|e| Error::bpf("loading the sk_lookup program (verifier)", e))?;
        }
        let netns = fs::File::open("/proc/thread-self/ns/net")
            .map_err(|e| Error::io("opening this network namespace", e))?;
        let id = prog
            .attach(netns.as_fd())
            .map_err(|e| Error::bpf("attaching sk_lookup to the network namespace", e))?;
        let link = prog.take_link(id).map_err(|e| Error::bpf("taking the link", e))?;
        let fd_link = FdLink::from(link);
        let tmp = self.link_path("sk-lookup-new");
        let _ = fs::remove_file(&tmp);
        fd_link
            .pin(&tmp)
            .map_err(|e| Error::bpf(format!("pinning the link at {}", tmp.display()), e))?;
        // Renaming over the old pin drops the old link once the new one is attached.
        fs::rename(&tmp, &pin).map_err(|e| Error::io(format!("replacing {}", pin.display()), e))?;
        Ok(())
    }

    /// Whether the classifier is attached to `ifindex` by this instance.
    #[must_use]
    pub fn ingress_attached(&self, ifindex: u32) -> bool {
        self.link_path(&format!("tc-ingress-{ifindex}")).exists()
    }

    fn map(&mut self, name: &str) -> Result<&mut aya::maps::Map> {
        self.ebpf.map_mut(name).ok_or_else(|| Error::invalid(format!("eBPF object has no map {name}")))
    }

    fn services(&mut self) -> Result<HashMap<&mut MapData, ServiceKey, ServiceValue>> {
        HashMap::try_from(self.map(maps::SERVICES)?).map_err(|e| Error::bpf("opening SERVICES", e))
    }

    fn siblings(&mut self) -> Result<HashMap<&mut MapData, [u8; 16], SiblingValue>> {
        HashMap::try_from(self.map(maps::SIBLINGS)?).map_err(|e| Error::bpf("opening SIBLINGS", e))
    }

    fn adopted(&mut self) -> Result<HashMap<&mut MapData, ServiceKey, AdoptedValue>> {
        HashMap::try_from(self.map(maps::ADOPTED)?).map_err(|e| Error::bpf("opening ADOPTED", e))
    }

    // ---- origin side -------------------------------------------------------------------

    /// Steers `service` (this host's service address and port): attaches the classifier to
    /// `ifname` and records how to tunnel the service's packets.
    pub fn add_service(
        &mut self,
        service: (IpAddr, u16),
        ifname: &str,
        tunnel_src: Option<IpAddr>,
        mtu: Option<u32>,
    ) -> Result<ServiceInfo> {
        let (addr, port) = service;
        if port == 0 {
            return Err(Error::invalid("service port must not be 0"));
        }
        let ifindex = net::ifindex(ifname)?;
        let tunnel_src = match tunnel_src {
            Some(t) if t.is_ipv4() != addr.is_ipv4() => {
                return Err(Error::invalid(format!("tunnel source {t} and service {addr} are of different families")));
            }
            Some(t) => t,
            None => net::control_address(ifname, addr)?,
        };
        let mtu = match mtu {
            Some(m) => m,
            None => net::mtu(ifname)?,
        };
        let value = ServiceValue {
            tunnel_src: types::to16(tunnel_src),
            mss_clamp: decide::mss_clamp(mtu, addr.is_ipv6()),
            _pad: [0; 2],
            ifindex,
        };
        self.attach_ingress(ifname, false)?;
        let key = ServiceKey::new(types::to16(addr), port);
        self.services()?
            .insert(key, value, 0)
            .map_err(|e| Error::bpf(format!("adding service {}", types::sock(addr, port)), e))?;
        self.sync_ports()?;
        Ok(ServiceInfo { addr, port, tunnel_src, mss_clamp: value.mss_clamp, ifindex })
    }

    /// Stops steering `service`. Rules stay (they apply to every steered service).
    pub fn del_service(&mut self, service: (IpAddr, u16)) -> Result<()> {
        let key = ServiceKey::new(types::to16(service.0), service.1);
        self.services()?.remove(&key).map_err(|e| match e {
            aya::maps::MapError::KeyNotFound => {
                Error::invalid(format!("service {} is not steered", types::sock(service.0, service.1)))
            }
            e => Error::bpf("removing service", e),
        })?;
        self.sync_ports()
    }

    /// Rewrites the `PORTS` bitmap from `SERVICES`. A service is inserted before its port bit
    /// is set and removed before the bit is cleared, so a packet that sees the bit finds the
    /// service, and one that misses it meanwhile simply passes.
    fn sync_ports(&mut self) -> Result<()> {
        let mut words = vec![0u64; redirector_common::PORT_WORDS as usize];
        for s in self.list_services()? {
            words[usize::from(s.port >> 6)] |= 1u64 << (s.port & 63);
        }
        let mut arr: Array<&mut MapData, u64> =
            Array::try_from(self.map(maps::PORTS)?).map_err(|e| Error::bpf("opening PORTS", e))?;
        for (i, w) in words.iter().enumerate() {
            let i = u32::try_from(i).unwrap_or(u32::MAX);
            if arr.get(&i, 0).map_err(|e| Error::bpf("reading PORTS", e))? != *w {
                arr.set(i, *w, 0).map_err(|e| Error::bpf("writing PORTS", e))?;
            }
        }
        Ok(())
    }

    /// Steered services.
    pub fn list_services(&mut self) -> Result<Vec<ServiceInfo>> {
        let map = self.services()?;
        let mut out = Vec::new();
        for item in &map {
            let (k, v) = item.map_err(|e| Error::bpf("reading SERVICES", e))?;
            out.push(ServiceInfo {
                addr: types::from16(&k.addr),
                port: k.port(),
                tunnel_src: types::from16(&v.tunnel_src),
                mss_clamp: v.mss_clamp,
                ifindex: v.ifindex,
            });
        }
        out.sort_by_key(|s| (s.addr, s.port));
        Ok(out)
    }

    /// Migrates the clients of `prefix` to `target`: their new connections to every steered
    /// service of the family go there. With `probe`, the target must first answer a probe
    /// through the real tunnel for each such service (make before break).
    pub fn migrate(&mut self, prefix: Prefix, target: IpAddr, probe: Option<Duration>) -> Result<()> {
        self.migrate_many(&[prefix], target, probe)
    }

    /// [`Datapath::migrate`] for many prefixes to one target: one probe, then every rule. If a
    /// rule cannot be installed, the ones installed by this call are removed again.
    pub fn migrate_many(&mut self, prefixes: &[Prefix], target: IpAddr, probe: Option<Duration>) -> Result<()> {
        if let Some(p) = prefixes.iter().find(|p| p.addr.is_ipv4() != target.is_ipv4()) {
            return Err(Error::invalid(format!("target {target} and prefix {p} are of different families")));
        }
        if target.is_unspecified() || target.is_multicast() || target.is_loopback() {
            return Err(Error::invalid(format!("target {target} is not a unicast address")));
        }
        let services: Vec<ServiceInfo> =
            self.list_services()?.into_iter().filter(|s| s.addr.is_ipv4() == target.is_ipv4()).collect();
        if services.is_empty() {
            return Err(Error::invalid(format!(
                "no steered {} service: add one with `redirector service add` first",
                if target.is_ipv4() { "IPv4" } else { "IPv6" }
            )));
        }
        if let Some(timeout) = probe {
            for s in &services {
                let mut probes: HashMap<&mut MapData, u32, redirector_common::ProbeValue> =
                    HashMap::try_from(self.map(maps::PROBES)?).map_err(|e| Error::bpf("opening PROBES", e))?;
                probe::probe(&mut probes, s, target, timeout)?;
            }
        }
        let value = RuleValue { target: types::to16(target), drain_until_ns: 0, since_unix: unix_now() };
        // The /24 bits first: a packet that finds a rule always finds its bit.
        self.mark_nets(prefixes)?;
        for (i, p) in prefixes.iter().enumerate() {
            if let Err(e) = self.insert_rule(*p, value) {
                for done in &prefixes[..i] {
                    let _ = self.release(*done);
                }
                return Err(e);
            }
        }
        Ok(())
    }

    /// Sets the `NETS_V4` bits of every /24 the IPv4 `prefixes` touch. Bits are never cleared
    /// while the instance lives: a stale bit only sends packets down the full (correct) path.
    fn mark_nets(&mut self, prefixes: &[Prefix]) -> Result<()> {
        let mut words: std::collections::BTreeMap<u32, u64> = std::collections::BTreeMap::new();
        for p in prefixes {
            let IpAddr::V4(a) = p.addr else { continue };
            let first = u32::from(a) >> 8;
            let count: u32 = if p.len >= 24 { 1 } else { 1 << (24 - u32::from(p.len)) };
            for idx in first..first.saturating_add(count) {
                *words.entry(idx >> 6).or_default() |= 1u64 << (idx & 63);
            }
        }
        if words.is_empty() {
            return Ok(());
        }
        let mut arr: Array<&mut MapData, u64> =
            Array::try_from(self.map(maps::NETS_V4)?).map_err(|e| Error::bpf("opening NETS_V4", e))?;
        for (w, bits) in words {
            let old = arr.get(&w, 0).map_err(|e| Error::bpf("reading NETS_V4", e))?;
            if old | bits != old {
                arr.set(w, old | bits, 0).map_err(|e| Error::bpf("writing NETS_V4", e))?;
            }
        }
        Ok(())
    }

    fn insert_rule(&mut self, prefix: Prefix, value: RuleValue) -> Result<()> {
        let what = format!("installing rule {prefix}");
        match prefix.addr {
            IpAddr::V4(a) => {
                let mut trie: LpmTrie<&mut MapData, [u8; 4], RuleValue> =
                    LpmTrie::try_from(self.map(maps::MIGRATED_V4)?).map_err(|e| Error::bpf("opening MIGRATED_V4", e))?;
                trie.insert(&Key::new(u32::from(prefix.len), a.octets()), value, 0).map_err(|e| Error::bpf(what, e))
            }
            IpAddr::V6(a) => {
                let mut trie: LpmTrie<&mut MapData, [u8; 16], RuleValue> =
                    LpmTrie::try_from(self.map(maps::MIGRATED_V6)?).map_err(|e| Error::bpf("opening MIGRATED_V6", e))?;
                trie.insert(&Key::new(u32::from(prefix.len), a.octets()), value, 0).map_err(|e| Error::bpf(what, e))
            }
        }
    }

    fn get_rule(&mut self, prefix: Prefix) -> Result<Option<RuleValue>> {
        let r = match prefix.addr {
            IpAddr::V4(a) => {
                let trie: LpmTrie<&mut MapData, [u8; 4], RuleValue> =
                    LpmTrie::try_from(self.map(maps::MIGRATED_V4)?).map_err(|e| Error::bpf("opening MIGRATED_V4", e))?;
                // An exact match: the trie's lookup is longest-prefix, so compare via the listing.
                trie.iter()
                    .filter_map(Result::ok)
                    .find(|(k, _)| k.prefix_len() == u32::from(prefix.len) && k.data() == a.octets())
                    .map(|(_, v)| v)
            }
            IpAddr::V6(a) => {
                let trie: LpmTrie<&mut MapData, [u8; 16], RuleValue> =
                    LpmTrie::try_from(self.map(maps::MIGRATED_V6)?).map_err(|e| Error::bpf("opening MIGRATED_V6", e))?;
                trie.iter()
                    .filter_map(Result::ok)
                    .find(|(k, _)| k.prefix_len() == u32::from(prefix.len) && k.data() == a.octets())
                    .map(|(_, v)| v)
            }
        };
        Ok(r)
    }

    /// Withdraws the rule for `prefix` gracefully: for `period`, new connections stay here while
    /// packets of flows living on the target still go there; then the rule is inert and removed
    /// by the next `open`.
    pub fn drain(&mut self, prefix: Prefix, period: Duration) -> Result<()> {
        let Some(mut rule) = self.get_rule(prefix)? else {
            return Err(Error::invalid(format!("no rule for {prefix}")));
        };
        if period.is_zero() {
            return self.release(prefix);
        }
        let until = monotonic_ns().saturating_add(u64::try_from(period.as_nanos()).unwrap_or(u64::MAX));
        rule.drain_until_ns = if rule.drain_until_ns == 0 { until } else { rule.drain_until_ns.min(until) };
        self.insert_rule(prefix, rule)
    }

    /// [`Datapath::drain`] for many prefixes: lists the rules once, then drains each of
    /// `prefixes` that has one (others are skipped). Returns how many it drained.
    pub fn drain_many(&mut self, prefixes: &[Prefix], period: Duration) -> Result<usize> {
        let wanted: std::collections::HashSet<Prefix> = prefixes.iter().copied().collect();
        let mut found: Vec<(Prefix, RuleValue)> = Vec::new();
        if wanted.iter().any(|p| p.addr.is_ipv4()) {
            let trie: LpmTrie<&mut MapData, [u8; 4], RuleValue> =
                LpmTrie::try_from(self.map(maps::MIGRATED_V4)?).map_err(|e| Error::bpf("opening MIGRATED_V4", e))?;
            for item in &trie {
                let (k, v) = item.map_err(|e| Error::bpf("reading MIGRATED_V4", e))?;
                let p = Prefix { addr: IpAddr::from(k.data()), len: u8::try_from(k.prefix_len()).unwrap_or(32) };
                if wanted.contains(&p) {
                    found.push((p, v));
                }
            }
        }
        if wanted.iter().any(|p| p.addr.is_ipv6()) {
            let trie: LpmTrie<&mut MapData, [u8; 16], RuleValue> =
                LpmTrie::try_from(self.map(maps::MIGRATED_V6)?).map_err(|e| Error::bpf("opening MIGRATED_V6", e))?;
            for item in &trie {
                let (k, v) = item.map_err(|e| Error::bpf("reading MIGRATED_V6", e))?;
                let p = Prefix { addr: IpAddr::from(k.data()), len: u8::try_from(k.prefix_len()).unwrap_or(128) };
                if wanted.contains(&p) {
                    found.push((p, v));
                }
            }
        }
        let until = monotonic_ns().saturating_add(u64::try_from(period.as_nanos()).unwrap_or(u64::MAX));
        for (p, mut rule) in found.iter().copied() {
            if period.is_zero() {
                self.release(p)?;
            } else {
                rule.drain_until_ns = if rule.drain_until_ns == 0 { until } else { rule.drain_until_ns.min(until) };
                self.insert_rule(p, rule)?;
            }
        }
        Ok(found.len())
    }

    /// Removes the rule for `prefix` at once: flows living on the target break.
    pub fn release(&mut self, prefix: Prefix) -> Result<()> {
        let what = format!("removing rule {prefix}");
        let r = match prefix.addr {
            IpAddr::V4(a) => {
                let mut trie: LpmTrie<&mut MapData, [u8; 4], RuleValue> =
                    LpmTrie::try_from(self.map(maps::MIGRATED_V4)?).map_err(|e| Error::bpf("opening MIGRATED_V4", e))?;
                trie.remove(&Key::new(u32::from(prefix.len), a.octets()))
            }
            IpAddr::V6(a) => {
                let mut trie: LpmTrie<&mut MapData, [u8; 16], RuleValue> =
                    LpmTrie::try_from(self.map(maps::MIGRATED_V6)?).map_err(|e| Error::bpf("opening MIGRATED_V6", e))?;
                trie.remove(&Key::new(u32::from(prefix.len), a.octets()))
            }
        };
        r.map_err(|e| match e {
            aya::maps::MapError::KeyNotFound => Error::invalid(format!("no rule for {prefix}")),
            e => Error::bpf(what, e),
        })
    }

    /// All rules, active and draining.
    pub fn list_rules(&mut self) -> Result<Vec<RuleInfo>> {
        let now = monotonic_ns();
        let mut out = Vec::new();
        {
            let trie: LpmTrie<&mut MapData, [u8; 4], RuleValue> =
                LpmTrie::try_from(self.map(maps::MIGRATED_V4)?).map_err(|e| Error::bpf("opening MIGRATED_V4", e))?;
            for item in &trie {
                let (k, v) = item.map_err(|e| Error::bpf("reading MIGRATED_V4", e))?;
                let len = u8::try_from(k.prefix_len()).unwrap_or(32);
                out.push(RuleInfo::new(Prefix { addr: IpAddr::from(k.data()), len }, &v, now));
            }
        }
        {
            let trie: LpmTrie<&mut MapData, [u8; 16], RuleValue> =
                LpmTrie::try_from(self.map(maps::MIGRATED_V6)?).map_err(|e| Error::bpf("opening MIGRATED_V6", e))?;
            for item in &trie {
                let (k, v) = item.map_err(|e| Error::bpf("reading MIGRATED_V6", e))?;
                let len = u8::try_from(k.prefix_len()).unwrap_or(128);
                out.push(RuleInfo::new(Prefix { addr: IpAddr::from(k.data()), len }, &v, now));
            }
        }
        out.sort_by_key(|r| (r.prefix.addr, r.prefix.len));
        Ok(out)
    }

    /// Removes rules whose drain period has ended. Returns how many were removed.
    pub fn collect_drained(&mut self) -> Result<usize> {
        let done: Vec<Prefix> =
            self.list_rules()?.into_iter().filter(|r| r.state == RuleState::Drained).map(|r| r.prefix).collect();
        for p in &done {
            match self.release(*p) {
                Ok(()) | Err(Error::Invalid { .. }) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(done.len())
    }

    // ---- target side -------------------------------------------------------------------

    /// Accepts tunnelled packets whose outer source is `sibling`; attaches the classifier to
    /// `ifname`.
    pub fn add_sibling(&mut self, sibling: IpAddr, ifname: &str) -> Result<()> {
        if sibling.is_unspecified() || sibling.is_multicast() {
            return Err(Error::invalid(format!("sibling {sibling} is not a unicast address")));
        }
        self.attach_ingress(ifname, false)?;
        self.siblings()?
            .insert(types::to16(sibling), SiblingValue { flags: 0 }, 0)
            .map_err(|e| Error::bpf(format!("adding sibling {sibling}"), e))
    }

    /// Stops accepting tunnels from `sibling`.
    pub fn del_sibling(&mut self, sibling: IpAddr) -> Result<()> {
        self.siblings()?.remove(&types::to16(sibling)).map_err(|e| match e {
            aya::maps::MapError::KeyNotFound => Error::invalid(format!("{sibling} is not a sibling")),
            e => Error::bpf("removing sibling", e),
        })
    }

    /// Configured siblings.
    pub fn list_siblings(&mut self) -> Result<Vec<IpAddr>> {
        let map = self.siblings()?;
        let mut out: Vec<IpAddr> =
            map.keys().filter_map(Result::ok).map(|k| types::from16(&k)).collect();
        out.sort();
        Ok(out)
    }

    /// Serves a sibling's service address here: a `local` route for it (no address on any
    /// interface, so no ARP/ND answers), the sysctls delivery and DSR need, and, with
    /// `listener`, the `sk_lookup` entry that hands its connections to the listening socket
    /// bound to that local address.
    pub fn adopt(
        &mut self,
        service: (IpAddr, u16),
        ifname: &str,
        listener: Option<(IpAddr, u16)>,
        mtu: Option<u32>,
    ) -> Result<()> {
        let (addr, port) = service;
        let ifindex = net::ifindex(ifname)?;
        let mtu = match mtu {
            Some(m) => m,
            None => net::mtu(ifname)?,
        };
        if net::is_interface_address(addr)? {
            return Err(Error::invalid(format!(
                "{addr} is an address of this host: a service is adopted from a sibling, not from itself"
            )));
        }
        let listener_fd = match listener {
            Some((la, lp)) => Some(listener::find(la, lp)?),
            None => None,
        };
        self.attach_ingress(ifname, false)?;
        self.attach_egress(ifname, false)?;
        self.attach_sk_lookup(false)?;
        net::prepare_target(ifname, addr)?;
        let key = ServiceKey::new(types::to16(addr), port);
        if let Some(fd) = &listener_fd {
            let mut hash: SockHash<&mut MapData, ServiceKey> =
                SockHash::try_from(self.map(maps::LISTENERS)?).map_err(|e| Error::bpf("opening LISTENERS", e))?;
            hash.insert(key, fd.as_raw_fd(), 0).map_err(|e| Error::bpf("registering the listener", e))?;
        }
        let flags = if listener_fd.is_some() { ADOPTED_LISTENER } else { 0 };
        self.adopted()?
            .insert(key, AdoptedValue { ifindex, flags, mss_clamp: decide::mss_clamp(mtu, addr.is_ipv6()), _pad: [0; 6] }, 0)
            .map_err(|e| Error::bpf("recording the adopted service", e))
    }

    /// Gives an adopted service back: removes its listener entry, and its route once no other
    /// port of that address is adopted.
    pub fn unadopt(&mut self, service: (IpAddr, u16)) -> Result<()> {
        let (addr, port) = service;
        let key = ServiceKey::new(types::to16(addr), port);
        self.adopted()?.remove(&key).map_err(|e| match e {
            aya::maps::MapError::KeyNotFound => {
                Error::invalid(format!("service {} is not adopted", types::sock(addr, port)))
            }
            e => Error::bpf("removing adopted service", e),
        })?;
        {
            let mut hash: SockHash<&mut MapData, ServiceKey> =
                SockHash::try_from(self.map(maps::LISTENERS)?).map_err(|e| Error::bpf("opening LISTENERS", e))?;
            let _ = hash.remove(&key);
        }
        if !self.list_adopted()?.iter().any(|(a, _, _)| *a == addr) {
            net::remove_local_route(addr)?;
        }
        Ok(())
    }

    /// Adopted services: (address, port, has listener).
    pub fn list_adopted(&mut self) -> Result<Vec<(IpAddr, u16, bool)>> {
        let map = self.adopted()?;
        let mut out = Vec::new();
        for item in &map {
            let (k, v) = item.map_err(|e| Error::bpf("reading ADOPTED", e))?;
            out.push((types::from16(&k.addr), k.port(), v.flags & ADOPTED_LISTENER != 0));
        }
        out.sort();
        Ok(out)
    }

    // ---- load ----------------------------------------------------------------------------

    /// Counts the established connections of the application in cgroup v2 `cgroup` (a folder
    /// of a mounted cgroup2 hierarchy) per client address, with a `sock_ops` program. Idempotent.
    pub fn attach_load(&mut self, cgroup: &Path) -> Result<()> {
        use std::os::unix::fs::MetadataExt as _;
        let dir = fs::File::open(cgroup).map_err(|e| Error::io(format!("opening cgroup {}", cgroup.display()), e))?;
        let st = nix::sys::statfs::fstatfs(&dir).map_err(|e| Error::io("statfs of the cgroup", e.into()))?;
        if st.filesystem_type() != nix::sys::statfs::CGROUP2_SUPER_MAGIC {
            return Err(Error::invalid(format!("{} is not in a cgroup v2 hierarchy", cgroup.display())));
        }
        let ino = dir.metadata().map_err(|e| Error::io("reading the cgroup's inode", e))?.ino();
        let pin = self.link_path(&format!("sock-ops-{ino}"));
        if pin.exists() {
            return Ok(());
        }
        let prog: &mut SockOps = self
            .ebpf
            .program_mut(programs::SOCK_OPS)
            .ok_or_else(|| Error::invalid("eBPF object has no sock_ops program"))?
            .try_into()
            .map_err(|e| Error::bpf("sock_ops program has the wrong type", e))?;
        if prog.fd().is_err() {
            prog.load().map_err(|e| Error::bpf("loading the sock_ops program (verifier)", e))?;
        }
        let id = prog
            .attach(&dir, CgroupAttachMode::Single)
            .map_err(|e| Error::bpf(format!("attaching sock_ops to {}", cgroup.display()), e))?;
        let link = prog.take_link(id).map_err(|e| Error::bpf("taking the link", e))?;
        let fd_link = FdLink::try_from(link).map_err(|e| Error::bpf("sock_ops link is not an fd link", e))?;
        fd_link
            .pin(&pin)
            .map_err(|e| Error::bpf(format!("pinning the link at {}", pin.display()), e))?;
        Ok(())
    }

    /// Established connections per client address (clients with none are left out), largest
    /// first, and their total.
    pub fn load(&mut self) -> Result<Load> {
        let map: PerCpuHashMap<&mut MapData, [u8; 16], i64> =
            PerCpuHashMap::try_from(self.map(maps::LOAD)?).map_err(|e| Error::bpf("opening LOAD", e))?;
        let mut clients = Vec::new();
        for item in &map {
            let (k, v) = item.map_err(|e| Error::bpf("reading LOAD", e))?;
            let n: i64 = v.iter().sum();
            if n > 0 {
                clients.push((types::from16(&k), u64::try_from(n).unwrap_or(0)));
            }
        }
        clients.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
        Ok(Load { total: clients.iter().map(|c| c.1).sum(), clients })
    }

    // ---- both --------------------------------------------------------------------------

    /// Decision counters, summed over CPUs.
    pub fn stats(&mut self) -> Result<Stats> {
        let arr: PerCpuArray<&mut MapData, u64> =
            PerCpuArray::try_from(self.map(maps::COUNTERS)?).map_err(|e| Error::bpf("opening COUNTERS", e))?;
        let mut counters = Vec::new();
        for c in Counter::ALL {
            let v = arr.get(&(c as u32), 0).map_err(|e| Error::bpf("reading COUNTERS", e))?;
            counters.push((c.name(), v.iter().sum()));
        }
        Ok(Stats { counters })
    }

    /// Detaches everything and removes the instance's pins and routes.
    pub fn teardown(mut self) -> Result<()> {
        for (addr, port, _) in self.list_adopted()? {
            self.unadopt((addr, port))?;
        }
        let dir = self.dir.clone();
        drop(self);
        fs::remove_dir_all(&dir).map_err(|e| Error::io(format!("removing {}", dir.display()), e))
    }
}

/// `CLOCK_MONOTONIC` in ns: the clock of `bpf_ktime_get_ns`.
#[must_use]
pub fn monotonic_ns() -> u64 {
    let ts = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC).expect("CLOCK_MONOTONIC");
    u64::try_from(ts.tv_sec()).unwrap_or(0) * 1_000_000_000 + u64::try_from(ts.tv_nsec()).unwrap_or(0)
}

fn unix_now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}
