//! The kernel datapath: loads and attaches the eBPF programs, pins them with their maps in a
//! bpffs, and gives typed access to the steering state.
//!
//! Everything lives under `<bpffs>/redirector/<instance>/`: the maps (re-adopted by every
//! process that opens the instance, so steering survives restarts of the agent or CLI) and
//! the program links (`links/`), which keep the programs attached while no process runs.
//! Processes that change the state take the instance's lock (`flock` on its directory), so the
//! agent and an operator's commands never interleave their updates.

mod bpffs;
mod listener;
mod net;
mod probe;
mod slots;
pub mod testrun;
mod types;

use std::{
    collections::{BTreeMap, HashMap as StdHashMap},
    fs, io,
    net::IpAddr,
    os::fd::{AsFd as _, AsRawFd as _, RawFd},
    path::{Path, PathBuf},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, HashMap, LpmTrie, MapData, MapInfo, PerCpuArray, RingBuf, SockHash, lpm_trie::Key},
    programs::{
        CgroupAttachMode, SchedClassifier, SkLookup, SockOps, TcAttachType,
        links::{FdLink, LinkOrder, PinnedLink},
        tc::{SchedClassifierLink, TcAttachOptions},
    },
};
use redirector_common::{
    ADOPTED_LISTENER, AdoptedValue, BPF_F_MMAPABLE, Counter, HOST_SLOT_COUNT, HostData, LoadCtl, LoadEvent, PORT_SLOT_COUNT, PortData, RuleValue, ServiceKey, ServiceValue,
    SiblingValue, as_v4, decide, maps, programs,
};
pub use types::{Load, Prefix, RuleInfo, RuleState, ServiceInfo, Stats, family_name};

pub use self::probe::ProbeError;
use self::slots::{SlotTable, Want};

/// The eBPF object built by `build.rs`.
pub static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/redirector-ebpf"));

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
    KernelFeature {
        what: String,
        #[source]
        source: Option<Box<dyn std::error::Error + Send + Sync>>,
    },
    #[error("{what}")]
    Invalid { what: String },
    #[error("no redirector instance at {dir} (nothing is set up there yet)")]
    NoInstance { dir: PathBuf },
    #[error(
        "the instance at {dir} was set up by an incompatible version of redirector ({what}): `redirector teardown --force` removes it (its migrated clients come home), then set it up again"
    )]
    Incompatible { dir: PathBuf, what: String },
    #[error("{what}: {source}")]
    Bpf {
        what: String,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: io::Error,
    },
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

/// The instance lock: an exclusive `flock` on the instance directory, released on drop.
struct Lock {
    _dir: fs::File,
}

impl Lock {
    fn take(dir: &Path) -> Result<Self> {
        let f = fs::File::open(dir).map_err(|e| Error::io(format!("opening {} to lock it", dir.display()), e))?;
        // SAFETY: flock on a file descriptor we own.
        if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX) } != 0 {
            return Err(Error::io(format!("locking {}", dir.display()), io::Error::last_os_error()));
        }
        Ok(Self { _dir: f })
    }
}

/// Migrations whose rules a call changes, with what was there before (for rollback).
type Previous = Vec<(Prefix, Option<RuleValue>)>;

/// An open instance: the programs loaded against the pinned maps.
pub struct Datapath {
    dir: PathBuf,
    ports_v4: SlotTable<PortData>,
    ports_v6: SlotTable<PortData>,
    hosts_v4: SlotTable<HostData>,
    hosts_v6: SlotTable<HostData>,
    ebpf: Ebpf,
}

impl Datapath {
    /// Opens (or creates) the instance: mounts the bpffs if needed, loads the programs against
    /// the pinned maps (creating any that are missing), removes rules whose drain period ended
    /// and brings the fast lookup tables in line with the rules and services.
    pub fn open(loc: &Location) -> Result<Self> {
        check_root_and_name(loc)?;
        bpffs::ensure_mounted(&loc.bpffs)?;
        let dir = loc.dir();
        fs::create_dir_all(&dir).map_err(|e| Error::io(format!("creating {}", dir.display()), e))?;
        let lock = Lock::take(&dir)?;
        // Pins of another layout are refused here, before anything is added to the instance.
        let mut dp = Self::load_instance(dir)?;
        fs::create_dir_all(dp.dir.join("links")).map_err(|e| Error::io(format!("creating {}", dp.dir.display()), e))?;
        dp.sync_ports()?;
        dp.remove_drained_and_sync()?;
        drop(lock);
        Ok(dp)
    }

    /// [`Datapath::open`] for an instance that exists: creates nothing (no bpffs mount, no
    /// pins) when there is none.
    pub fn open_existing(loc: &Location) -> Result<Self> {
        check_root_and_name(loc)?;
        let dir = loc.dir();
        if !dir.join(maps::SERVICES).exists() {
            return Err(Error::NoInstance { dir });
        }
        Self::open(loc)
    }

    fn load_instance(dir: PathBuf) -> Result<Self> {
        check_pins(&dir)?;
        for old in maps::OBSOLETE {
            let _ = fs::remove_file(dir.join(old));
        }
        let ebpf = EbpfLoader::new()
            .default_map_pin_directory(&dir)
            .load(EBPF_OBJECT)
            .map_err(|e| Error::bpf(format!("loading the eBPF object with maps pinned in {}", dir.display()), e))?;
        // The maps stay in `ebpf`: programs load later with their fds.
        let table = |name: &str| -> Result<&MapData> {
            match ebpf.map(name) {
                Some(aya::maps::Map::Array(m)) => Ok(m),
                _ => Err(Error::invalid(format!("eBPF object has no array {name}"))),
            }
        };
        let ports_v4 = SlotTable::new(table(maps::PORT_SLOTS_V4)?, maps::PORT_SLOTS_V4, PORT_SLOT_COUNT)?;
        let ports_v6 = SlotTable::new(table(maps::PORT_SLOTS_V6)?, maps::PORT_SLOTS_V6, PORT_SLOT_COUNT)?;
        let hosts_v4 = SlotTable::new(table(maps::HOSTS_V4)?, maps::HOSTS_V4, HOST_SLOT_COUNT)?;
        let hosts_v6 = SlotTable::new(table(maps::HOSTS_V6)?, maps::HOSTS_V6, HOST_SLOT_COUNT)?;
        Ok(Self { dir, ports_v4, ports_v6, hosts_v4, hosts_v6, ebpf })
    }

    fn lock(&self) -> Result<Lock> {
        Lock::take(&self.dir)
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
            let pinned = PinnedLink::from_pin(&pin).map_err(|e| Error::bpf(format!("opening pinned link {}", pin.display()), e))?;
            let link = SchedClassifierLink::try_from(FdLink::from(pinned)).map_err(|e| Error::bpf("converting the pinned link", e))?;
            // The link stays pinned (bpf_link_update): only its program changes.
            prog.attach_to_link(link).map_err(|e| Error::bpf(format!("replacing {name} on {ifname}"), e))?;
            return Ok(ifindex);
        }
        let id = prog
            .attach_with_options(ifname, hook, TcAttachOptions::TcxOrder(LinkOrder::first()))
            .map_err(|e| Error::KernelFeature { what: format!("attaching {name} to {ifname} with TCX (Linux 6.6 or newer)"), source: Some(Box::new(e)) })?;
        let link = prog.take_link(id).map_err(|e| Error::bpf("taking the link", e))?;
        let fd_link = FdLink::try_from(link).map_err(|e| Error::bpf("TC link is not an fd link", e))?;
        fd_link.pin(&pin).map_err(|e| Error::bpf(format!("pinning the link at {}", pin.display()), e))?;
        Ok(ifindex)
    }

    /// Replaces every attached program of this instance with this binary's, atomically per
    /// hook, keeping the pinned maps.
    pub fn upgrade(&mut self) -> Result<usize> {
        let _lock = self.lock()?;
        let mut replaced = 0;
        let links = fs::read_dir(self.dir.join("links")).map_err(|e| Error::io("listing links", e))?;
        let mut names: Vec<String> = links.filter_map(Result::ok).map(|e| e.file_name().to_string_lossy().into_owned()).collect();
        names.sort();
        for n in names {
            if n == "sk-lookup" {
                self.attach_sk_lookup(true)?;
            } else if let Some(i) = n.strip_prefix("tc-ingress-") {
                let ifname = net::ifname(i.parse().map_err(|_| Error::invalid(format!("bad link pin name {n}")))?)?;
                self.attach_ingress(&ifname, true)?;
            } else if let Some(i) = n.strip_prefix("tc-egress-") {
                let ifname = net::ifname(i.parse().map_err(|_| Error::invalid(format!("bad link pin name {n}")))?)?;
                self.attach_egress(&ifname, true)?;
            } else if n.starts_with("sock-ops-") {
                let prog = self.sock_ops_prog()?;
                let prog_fd = prog.fd().map_err(|e| Error::bpf("sock_ops program fd", e))?.as_fd().as_raw_fd();
                let link = obj_get(&self.link_path(&n)).map_err(|e| Error::io(format!("opening pinned link {n}"), e))?;
                link_update(link.as_raw_fd(), prog_fd).map_err(|e| Error::io(format!("replacing the sock_ops program of {n}"), e))?;
            } else {
                continue;
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
        let netns = fs::File::open("/proc/thread-self/ns/net").map_err(|e| Error::io("opening this network namespace", e))?;
        let id = prog.attach(netns.as_fd()).map_err(|e| Error::bpf("attaching sk_lookup to the network namespace", e))?;
        let link = prog.take_link(id).map_err(|e| Error::bpf("taking the link", e))?;
        let fd_link = FdLink::from(link);
        let tmp = self.link_path("sk-lookup-new");
        let _ = fs::remove_file(&tmp);
        fd_link.pin(&tmp).map_err(|e| Error::bpf(format!("pinning the link at {}", tmp.display()), e))?;
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

    fn listeners(&mut self) -> Result<SockHash<&mut MapData, ServiceKey>> {
        SockHash::try_from(self.map(maps::LISTENERS)?).map_err(|e| Error::bpf("opening LISTENERS", e))
    }

    /// The key and value of adopted `service`, or an error saying it is not adopted.
    fn adopted_value(&mut self, service: (IpAddr, u16)) -> Result<(ServiceKey, AdoptedValue)> {
        let key = ServiceKey::new(types::to16(service.0), service.1);
        let value = self.adopted()?.get(&key, 0).map_err(|e| match e {
            aya::maps::MapError::KeyNotFound => Error::invalid(format!("service {} is not adopted", types::sock(service.0, service.1))),
            e => Error::bpf("reading ADOPTED", e),
        })?;
        Ok((key, value))
    }

    fn sysctls(&mut self) -> Result<HashMap<&mut MapData, u32, u32>> {
        HashMap::try_from(self.map(maps::SYSCTLS)?).map_err(|e| Error::bpf("opening SYSCTLS", e))
    }

    // ---- origin side -------------------------------------------------------------------

    /// Steers `service` (this host's service address and port): attaches the classifier to
    /// `ifname` and records how to tunnel the service's packets.
    pub fn add_service(&mut self, service: (IpAddr, u16), ifname: &str, tunnel_src: Option<IpAddr>, mtu: Option<u32>) -> Result<ServiceInfo> {
        let (addr, port) = service;
        if port == 0 {
            return Err(Error::invalid("service port must not be 0"));
        }
        if addr.is_unspecified() || addr.is_multicast() {
            return Err(Error::invalid(format!("service address {addr} is not a unicast address")));
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
        let value = ServiceValue { tunnel_src: types::to16(tunnel_src), mss_clamp: decide::mss_clamp(mtu, addr.is_ipv6()), _pad: [0; 2], ifindex };
        let _lock = self.lock()?;
        self.attach_ingress(ifname, false)?;
        let key = ServiceKey::new(types::to16(addr), port);
        self.services()?.insert(key, value, 0).map_err(|e| Error::bpf(format!("adding service {}", types::sock(addr, port)), e))?;
        self.sync_ports()?;
        Ok(ServiceInfo { addr, port, tunnel_src, mss_clamp: value.mss_clamp, ifindex })
    }

    /// Stops steering `service`. Rules stay (they apply to every steered service).
    pub fn del_service(&mut self, service: (IpAddr, u16)) -> Result<()> {
        let _lock = self.lock()?;
        let key = ServiceKey::new(types::to16(service.0), service.1);
        self.services()?.remove(&key).map_err(|e| match e {
            aya::maps::MapError::KeyNotFound => Error::invalid(format!("service {} is not steered", types::sock(service.0, service.1))),
            e => Error::bpf("removing service", e),
        })?;
        self.sync_ports()
    }

    /// Brings `PORT_SLOTS_*` in line with `SERVICES`: a port with one service (of the table's
    /// family) holds it, a port with several sends the classifier to `SERVICES`.
    fn sync_ports(&mut self) -> Result<()> {
        let entries = self.service_entries()?;
        for v6 in [false, true] {
            let mut wanted: BTreeMap<u32, Want<PortData>> = BTreeMap::new();
            for (k, v) in entries.iter().filter(|(k, _)| as_v4(&k.addr).is_none() == v6) {
                let one = Want::One(PortData { addr: k.addr, service: *v });
                wanted.entry(u32::from(k.port())).and_modify(|w| *w = Want::Many).or_insert(one);
            }
            if v6 { &self.ports_v6 } else { &self.ports_v4 }.apply(&wanted);
        }
        Ok(())
    }

    /// Brings `HOSTS_V4` and `HOSTS_V6` in line with `rules` (all rules of the instance).
    fn sync_hosts(&mut self, rules: &[(Prefix, RuleValue)]) {
        self.hosts_v4.apply(&slots::want_hosts(rules, false));
        self.hosts_v6.apply(&slots::want_hosts(rules, true));
    }

    /// Every entry of `SERVICES`, as stored.
    fn service_entries(&mut self) -> Result<Vec<(ServiceKey, ServiceValue)>> {
        let map = self.services()?;
        map.iter().map(|item| item.map_err(|e| Error::bpf("reading SERVICES", e))).collect()
    }

    /// Steered services.
    pub fn list_services(&mut self) -> Result<Vec<ServiceInfo>> {
        let mut out = Vec::new();
        for (k, v) in self.service_entries()? {
            out.push(ServiceInfo { addr: types::from16(&k.addr), port: k.port(), tunnel_src: types::from16(&v.tunnel_src), mss_clamp: v.mss_clamp, ifindex: v.ifindex });
        }
        out.sort_by_key(|s| (s.addr, s.port));
        Ok(out)
    }

    /// Migrates the clients of `prefix` to `target`: their new connections to every steered
    /// service of the family go there. With `probe`, the target must first answer a probe
    /// through the real tunnel for each such service (make before break).
    pub fn migrate(&mut self, prefix: Prefix, target: IpAddr, probe: Option<Duration>) -> Result<()> {
        self.migrate_many(&[prefix], target, probe, false)
    }

    /// [`Datapath::migrate`] for many prefixes to one target: one probe, then every rule, all or
    /// nothing. A prefix already migrated to `target` stays (a draining one becomes active
    /// again); one migrated elsewhere is refused unless `replace` (its flows living on the
    /// other target would break).
    pub fn migrate_many(&mut self, prefixes: &[Prefix], target: IpAddr, probe: Option<Duration>, replace: bool) -> Result<()> {
        if let Some(p) = prefixes.iter().find(|p| p.addr.is_ipv4() != target.is_ipv4()) {
            return Err(Error::invalid(format!("target {target} and prefix {p} are of different families")));
        }
        // The probe runs before the lock: it can take up to its timeout per service.
        match probe {
            Some(timeout) => self.probe_target(target, timeout)?,
            None => {
                self.steered_services(target)?;
            }
        }
        let _lock = self.lock()?;
        let mut rules: StdHashMap<Prefix, RuleValue> = self.rules()?.into_iter().collect();
        let target16 = types::to16(target);
        let now = unix_now();
        let mut changes = Vec::new();
        for p in prefixes {
            let value = match rules.get(p) {
                Some(old) if old.target == target16 && old.drain_until_ns == 0 => continue,
                Some(old) if old.target == target16 => RuleValue { drain_until_ns: 0, ..*old },
                Some(old) if !replace => {
                    return Err(Error::invalid(format!(
                        "{p} is already migrated to {}{}: withdraw it first (`rule del`), or replace it (its flows living there break)",
                        types::from16(&old.target),
                        if old.drain_until_ns == 0 { "" } else { " (draining)" }
                    )));
                }
                _ => RuleValue { target: target16, drain_until_ns: 0, since_unix: now },
            };
            changes.push((*p, value));
        }
        let mut previous: Previous = Vec::new();
        for (p, value) in &changes {
            if let Err(e) = self.insert_rule(*p, *value) {
                self.restore(&previous);
                return Err(e);
            }
            previous.push((*p, rules.insert(*p, *value)));
        }
        let all: Vec<(Prefix, RuleValue)> = rules.into_iter().collect();
        self.sync_hosts(&all);
        Ok(())
    }

    /// The steered services of `target`'s family (an error if there is none, or `target` is
    /// not a unicast address).
    fn steered_services(&mut self, target: IpAddr) -> Result<Vec<ServiceInfo>> {
        if target.is_unspecified() || target.is_multicast() || target.is_loopback() {
            return Err(Error::invalid(format!("target {target} is not a unicast address")));
        }
        let services: Vec<ServiceInfo> = self.list_services()?.into_iter().filter(|s| s.addr.is_ipv4() == target.is_ipv4()).collect();
        if services.is_empty() {
            return Err(Error::invalid(format!("no steered {} service: add one with `redirector service add` first", family_name(target.is_ipv4()))));
        }
        Ok(services)
    }

    /// Probes `target` through the real tunnel, for every steered service of its family: Ok
    /// once its listener answered each (its datapath serves those services; a reset means
    /// nothing listens there, silence that the target is not ready or gone).
    pub fn probe_target(&mut self, target: IpAddr, timeout: Duration) -> Result<()> {
        for s in &self.steered_services(target)? {
            let mut probes: HashMap<&mut MapData, u32, redirector_common::ProbeValue> = HashMap::try_from(self.map(maps::PROBES)?).map_err(|e| Error::bpf("opening PROBES", e))?;
            probe::probe(&mut probes, s, target, timeout)?;
        }
        Ok(())
    }

    /// Puts back what a failed call changed.
    fn restore(&mut self, previous: &Previous) {
        for (p, old) in previous.iter().rev() {
            let _ = match old {
                Some(v) => self.insert_rule(*p, *v),
                None => self.remove_rule(*p),
            };
        }
    }

    fn insert_rule(&mut self, prefix: Prefix, value: RuleValue) -> Result<()> {
        let what = format!("installing rule {prefix}");
        match prefix.addr {
            IpAddr::V4(a) => {
                let mut trie: LpmTrie<&mut MapData, [u8; 4], RuleValue> = LpmTrie::try_from(self.map(maps::MIGRATED_V4)?).map_err(|e| Error::bpf("opening MIGRATED_V4", e))?;
                trie.insert(&Key::new(u32::from(prefix.len), a.octets()), value, 0).map_err(|e| Error::bpf(what, e))
            }
            IpAddr::V6(a) => {
                let mut trie: LpmTrie<&mut MapData, [u8; 16], RuleValue> = LpmTrie::try_from(self.map(maps::MIGRATED_V6)?).map_err(|e| Error::bpf("opening MIGRATED_V6", e))?;
                trie.insert(&Key::new(u32::from(prefix.len), a.octets()), value, 0).map_err(|e| Error::bpf(what, e))
            }
        }
    }

    fn remove_rule(&mut self, prefix: Prefix) -> Result<()> {
        let what = format!("removing rule {prefix}");
        let r = match prefix.addr {
            IpAddr::V4(a) => {
                let mut trie: LpmTrie<&mut MapData, [u8; 4], RuleValue> = LpmTrie::try_from(self.map(maps::MIGRATED_V4)?).map_err(|e| Error::bpf("opening MIGRATED_V4", e))?;
                trie.remove(&Key::new(u32::from(prefix.len), a.octets()))
            }
            IpAddr::V6(a) => {
                let mut trie: LpmTrie<&mut MapData, [u8; 16], RuleValue> = LpmTrie::try_from(self.map(maps::MIGRATED_V6)?).map_err(|e| Error::bpf("opening MIGRATED_V6", e))?;
                trie.remove(&Key::new(u32::from(prefix.len), a.octets()))
            }
        };
        r.map_err(|e| match e {
            aya::maps::MapError::KeyNotFound => Error::invalid(format!("no rule for {prefix}")),
            e => Error::bpf(what, e),
        })
    }

    /// Every rule of both tries, as stored.
    fn rules(&mut self) -> Result<Vec<(Prefix, RuleValue)>> {
        let mut out = Vec::new();
        {
            let trie: LpmTrie<&mut MapData, [u8; 4], RuleValue> = LpmTrie::try_from(self.map(maps::MIGRATED_V4)?).map_err(|e| Error::bpf("opening MIGRATED_V4", e))?;
            for item in &trie {
                let (k, v) = item.map_err(|e| Error::bpf("reading MIGRATED_V4", e))?;
                let len = u8::try_from(k.prefix_len()).unwrap_or(32);
                out.push((Prefix { addr: IpAddr::from(k.data()), len }, v));
            }
        }
        {
            let trie: LpmTrie<&mut MapData, [u8; 16], RuleValue> = LpmTrie::try_from(self.map(maps::MIGRATED_V6)?).map_err(|e| Error::bpf("opening MIGRATED_V6", e))?;
            for item in &trie {
                let (k, v) = item.map_err(|e| Error::bpf("reading MIGRATED_V6", e))?;
                let len = u8::try_from(k.prefix_len()).unwrap_or(128);
                out.push((Prefix { addr: IpAddr::from(k.data()), len }, v));
            }
        }
        Ok(out)
    }

    /// Withdraws the rule for `prefix` gracefully: for `period`, new connections stay here while
    /// packets of flows living on the target still go there; then the rule is inert and removed
    /// by the next `collect_drained` (the agent runs it every few seconds, every command on open).
    pub fn drain(&mut self, prefix: Prefix, period: Duration) -> Result<()> {
        if self.drain_many(&[prefix], period)? == 0 {
            return Err(Error::invalid(format!("no rule for {prefix}")));
        }
        Ok(())
    }

    /// [`Datapath::drain`] for many prefixes at once (those without a rule are skipped).
    /// Returns how many rules drain now.
    pub fn drain_many(&mut self, prefixes: &[Prefix], period: Duration) -> Result<usize> {
        if period.is_zero() {
            return self.release_many(prefixes);
        }
        let _lock = self.lock()?;
        let mut rules: StdHashMap<Prefix, RuleValue> = self.rules()?.into_iter().collect();
        let until = monotonic_ns().saturating_add(u64::try_from(period.as_nanos()).unwrap_or(u64::MAX));
        let mut previous: Previous = Vec::new();
        for p in prefixes {
            let Some(old) = rules.get(p).copied() else { continue };
            let value = RuleValue { drain_until_ns: if old.drain_until_ns == 0 { until } else { old.drain_until_ns.min(until) }, ..old };
            if let Err(e) = self.insert_rule(*p, value) {
                self.restore(&previous);
                return Err(e);
            }
            previous.push((*p, rules.insert(*p, value)));
        }
        let all: Vec<(Prefix, RuleValue)> = rules.into_iter().collect();
        self.sync_hosts(&all);
        Ok(previous.len())
    }

    /// Removes the rule for `prefix` at once: flows living on the target break.
    pub fn release(&mut self, prefix: Prefix) -> Result<()> {
        if self.release_many(&[prefix])? == 0 {
            return Err(Error::invalid(format!("no rule for {prefix}")));
        }
        Ok(())
    }

    /// [`Datapath::release`] for many prefixes (those without a rule are skipped). Returns how
    /// many were removed.
    pub fn release_many(&mut self, prefixes: &[Prefix]) -> Result<usize> {
        let _lock = self.lock()?;
        let mut rules: StdHashMap<Prefix, RuleValue> = self.rules()?.into_iter().collect();
        let mut n = 0;
        for p in prefixes {
            if rules.remove(p).is_some() {
                self.remove_rule(*p)?;
                n += 1;
            }
        }
        let all: Vec<(Prefix, RuleValue)> = rules.into_iter().collect();
        self.sync_hosts(&all);
        Ok(n)
    }

    /// All rules, active and draining, sorted by prefix.
    pub fn list_rules(&mut self) -> Result<Vec<RuleInfo>> {
        let now = monotonic_ns();
        let mut out: Vec<RuleInfo> = self.rules()?.into_iter().map(|(p, v)| RuleInfo::new(p, &v, now)).collect();
        out.sort_by_key(|r| (r.prefix.addr, r.prefix.len));
        Ok(out)
    }

    /// Removes rules whose drain period has ended. Returns how many were removed.
    pub fn collect_drained(&mut self) -> Result<usize> {
        let now = monotonic_ns();
        // Cheap check first, without the lock: most calls find nothing to do.
        if !self.rules()?.iter().any(|(_, v)| is_drained(v, now)) {
            return Ok(0);
        }
        let _lock = self.lock()?;
        self.remove_drained_and_sync()
    }

    /// Under the instance lock: removes rules whose drain ended and brings the host tables in
    /// line with the rest. Returns how many were removed.
    fn remove_drained_and_sync(&mut self) -> Result<usize> {
        let now = monotonic_ns();
        let (live, drained): (Vec<_>, Vec<_>) = self.rules()?.into_iter().partition(|(_, v)| !is_drained(v, now));
        for (p, _) in &drained {
            match self.remove_rule(*p) {
                Ok(()) | Err(Error::Invalid { .. }) => {}
                Err(e) => return Err(e),
            }
        }
        self.sync_hosts(&live);
        Ok(drained.len())
    }

    // ---- target side -------------------------------------------------------------------

    /// Accepts tunnelled packets whose outer source is `sibling`; attaches the classifier to
    /// `ifname`.
    pub fn add_sibling(&mut self, sibling: IpAddr, ifname: &str) -> Result<()> {
        if sibling.is_unspecified() || sibling.is_multicast() {
            return Err(Error::invalid(format!("sibling {sibling} is not a unicast address")));
        }
        net::ifindex(ifname)?;
        let _lock = self.lock()?;
        self.attach_ingress(ifname, false)?;
        self.siblings()?.insert(types::to16(sibling), SiblingValue { flags: 0 }, 0).map_err(|e| Error::bpf(format!("adding sibling {sibling}"), e))
    }

    /// Stops accepting tunnels from `sibling`.
    pub fn del_sibling(&mut self, sibling: IpAddr) -> Result<()> {
        let _lock = self.lock()?;
        self.siblings()?.remove(&types::to16(sibling)).map_err(|e| match e {
            aya::maps::MapError::KeyNotFound => Error::invalid(format!("{sibling} is not a sibling")),
            e => Error::bpf("removing sibling", e),
        })
    }

    /// Configured siblings.
    pub fn list_siblings(&mut self) -> Result<Vec<IpAddr>> {
        let map = self.siblings()?;
        let mut out: Vec<IpAddr> = map.keys().filter_map(Result::ok).map(|k| types::from16(&k)).collect();
        out.sort();
        Ok(out)
    }

    /// Serves a sibling's service address here: a `local` route for it (no address on any
    /// interface, so no ARP/ND answers), the interface settings delivery and DSR need (the
    /// originals are kept and put back when the last adopted service of the interface goes),
    /// and, with `listener`, the `sk_lookup` entry that hands its connections to the listening
    /// socket bound to that local address. On failure, nothing of it stays.
    pub fn adopt(&mut self, service: (IpAddr, u16), ifname: &str, listener: Option<(IpAddr, u16)>, mtu: Option<u32>) -> Result<()> {
        let (addr, port) = service;
        if port == 0 || addr.is_unspecified() || addr.is_multicast() {
            return Err(Error::invalid(format!("{} is not a service address", types::sock(addr, port))));
        }
        let ifindex = net::ifindex(ifname)?;
        let mtu = match mtu {
            Some(m) => m,
            None => net::mtu(ifname)?,
        };
        if net::is_interface_address(addr)? {
            return Err(Error::invalid(format!("{addr} is an address of this host: a service is adopted from a sibling, not from itself")));
        }
        let listener_fd = match listener {
            Some((la, lp)) => Some(listener::find(la, lp)?),
            None => None,
        };
        let _lock = self.lock()?;
        self.attach_ingress(ifname, false)?;
        self.attach_egress(ifname, false)?;
        self.attach_sk_lookup(false)?;
        let key = ServiceKey::new(types::to16(addr), port);
        let had_route = self.list_adopted()?.iter().any(|(a, _, _)| *a == addr);
        let result = (|| -> Result<()> {
            self.save_and_set_sysctls(ifname, ifindex, addr)?;
            net::add_local_route(addr)?;
            if let Some(fd) = &listener_fd {
                self.listeners()?.insert(key, fd.as_raw_fd(), 0).map_err(|e| Error::bpf("registering the listener", e))?;
            }
            let flags = if listener_fd.is_some() { ADOPTED_LISTENER } else { 0 };
            let value = AdoptedValue { ifindex, flags, mss_clamp: decide::mss_clamp(mtu, addr.is_ipv6()), _pad: [0; 6] };
            self.adopted()?.insert(key, value, 0).map_err(|e| Error::bpf("recording the adopted service", e))
        })();
        if let Err(e) = result {
            if !had_route {
                let _ = net::remove_local_route(addr);
            }
            let _ = self.restore_sysctls_if_unused(ifindex);
            return Err(e);
        }
        Ok(())
    }

    /// (Re)registers `listener`, the listening socket bound to that local address, for the
    /// adopted `service`: an application that restarted has a new socket, and its old one left
    /// the `sk_lookup` map when it closed. Idempotent.
    pub fn register_listener(&mut self, service: (IpAddr, u16), listener: (IpAddr, u16)) -> Result<()> {
        let fd = listener::find(listener.0, listener.1)?;
        let _lock = self.lock()?;
        let (key, mut value) = self.adopted_value(service)?;
        self.listeners()?.insert(key, fd.as_raw_fd(), 0).map_err(|e| Error::bpf("registering the listener", e))?;
        if value.flags & ADOPTED_LISTENER == 0 {
            value.flags |= ADOPTED_LISTENER;
            self.adopted()?.insert(key, value, 0).map_err(|e| Error::bpf("recording the listener", e))?;
        }
        Ok(())
    }

    /// Gives an adopted service back: removes its listener entry, its route once no other
    /// port of that address is adopted, and puts back the interface's settings once no adopted
    /// service uses it.
    pub fn unadopt(&mut self, service: (IpAddr, u16)) -> Result<()> {
        let _lock = self.lock()?;
        self.unadopt_locked(service)
    }

    fn unadopt_locked(&mut self, service: (IpAddr, u16)) -> Result<()> {
        let addr = service.0;
        let (key, old) = self.adopted_value(service)?;
        self.adopted()?.remove(&key).map_err(|e| Error::bpf("removing adopted service", e))?;
        let _ = self.listeners()?.remove(&key);
        if !self.list_adopted()?.iter().any(|(a, _, _)| *a == addr) {
            net::remove_local_route(addr)?;
        }
        self.restore_sysctls_if_unused(old.ifindex)
    }

    /// Adopted services: (address, port, has listener).
    pub fn list_adopted(&mut self) -> Result<Vec<(IpAddr, u16, bool)>> {
        Ok(self.adopted_values()?.into_iter().map(|(a, p, v)| (a, p, v.flags & ADOPTED_LISTENER != 0)).collect())
    }

    fn adopted_values(&mut self) -> Result<Vec<(IpAddr, u16, AdoptedValue)>> {
        let map = self.adopted()?;
        let mut out = Vec::new();
        for item in &map {
            let (k, v) = item.map_err(|e| Error::bpf("reading ADOPTED", e))?;
            out.push((types::from16(&k.addr), k.port(), v));
        }
        out.sort_by_key(|(a, p, _)| (*a, *p));
        Ok(out)
    }

    /// Sets what a target needs on `ifname` (IPv4: no ARP answers for adopted addresses,
    /// tunnelled packets with local source addresses accepted, loose reverse-path filter),
    /// keeping each original value in `SYSCTLS` the first time.
    fn save_and_set_sysctls(&mut self, ifname: &str, ifindex: u32, addr: IpAddr) -> Result<()> {
        if !addr.is_ipv4() {
            return Ok(());
        }
        for (i, (name, value)) in net::TARGET_SYSCTLS.iter().enumerate() {
            let key = (ifindex << 8) | u32::try_from(i).unwrap_or(0);
            let current = net::read_sysctl_v4(ifname, name)?;
            if current == *value {
                continue;
            }
            let mut saved = self.sysctls()?;
            if saved.get(&key, 0).is_err() {
                saved.insert(key, current, 0).map_err(|e| Error::bpf("saving a sysctl", e))?;
            }
            net::write_sysctl_v4(ifname, name, *value)?;
        }
        Ok(())
    }

    /// Puts back the saved settings of interface `ifindex` if no adopted service uses it.
    fn restore_sysctls_if_unused(&mut self, ifindex: u32) -> Result<()> {
        if self.adopted_values()?.iter().any(|(_, _, v)| v.ifindex == ifindex) {
            return Ok(());
        }
        let saved: Vec<(u32, u32)> = self.sysctls()?.iter().filter_map(Result::ok).filter(|(k, _)| k >> 8 == ifindex).collect();
        if saved.is_empty() {
            return Ok(());
        }
        let ifname = net::ifname(ifindex)?;
        for (key, value) in saved {
            if let Some((name, _)) = net::TARGET_SYSCTLS.get((key & 0xff) as usize) {
                net::write_sysctl_v4(&ifname, name, value)?;
            }
            let _ = self.sysctls()?.remove(&key);
        }
        Ok(())
    }

    // ---- load ----------------------------------------------------------------------------

    fn sock_ops_prog(&mut self) -> Result<&mut SockOps> {
        let prog: &mut SockOps = self
            .ebpf
            .program_mut(programs::SOCK_OPS)
            .ok_or_else(|| Error::invalid("eBPF object has no sock_ops program"))?
            .try_into()
            .map_err(|e| Error::bpf("sock_ops program has the wrong type", e))?;
        if prog.fd().is_err() {
            prog.load().map_err(|e| Error::bpf("loading the sock_ops program (verifier)", e))?;
        }
        Ok(prog)
    }

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
        let _lock = self.lock()?;
        let prog = self.sock_ops_prog()?;
        let id = prog.attach(&dir, CgroupAttachMode::Single).map_err(|e| Error::bpf(format!("attaching sock_ops to {}", cgroup.display()), e))?;
        let link = prog.take_link(id).map_err(|e| Error::bpf("taking the link", e))?;
        let fd_link = FdLink::try_from(link).map_err(|e| Error::bpf("sock_ops link is not an fd link", e))?;
        fd_link.pin(&pin).map_err(|e| Error::bpf(format!("pinning the link at {}", pin.display()), e))?;
        Ok(())
    }

    /// Established connections of the application(s), in total (exact, one read).
    pub fn load_total(&mut self) -> Result<u64> {
        let arr: Array<&mut MapData, i64> = Array::try_from(self.map(maps::LOAD_TOTAL)?).map_err(|e| Error::bpf("opening LOAD_TOTAL", e))?;
        let v = arr.get(&0, 0).map_err(|e| Error::bpf("reading LOAD_TOTAL", e))?;
        Ok(u64::try_from(v).unwrap_or(0))
    }

    /// The total and the established connections per client address (clients with none are
    /// left out), largest first. Per-client counts may be low for clients whose entry made room
    /// for newer ones in a full table; the total is exact.
    pub fn load(&mut self) -> Result<Load> {
        let total = self.load_total()?;
        let map: HashMap<&mut MapData, [u8; 16], i64> = HashMap::try_from(self.map(maps::LOAD)?).map_err(|e| Error::bpf("opening LOAD", e))?;
        let mut clients = Vec::new();
        for item in &map {
            let (k, n) = item.map_err(|e| Error::bpf("reading LOAD", e))?;
            if n > 0 {
                clients.push((types::from16(&k), u64::try_from(n).unwrap_or(0)));
            }
        }
        clients.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
        Ok(Load { total, clients })
    }

    /// Asks the kernel for one [`LoadEvent`] as soon as the total exceeds `high` (the crossing
    /// connection's time, not the next poll's). Arm again after each event.
    pub fn arm_load_event(&mut self, high: u64) -> Result<()> {
        let mut arr: Array<&mut MapData, LoadCtl> = Array::try_from(self.map(maps::LOAD_CTL)?).map_err(|e| Error::bpf("opening LOAD_CTL", e))?;
        arr.set(0, LoadCtl { high, armed: 1, _pad: 0 }, 0).map_err(|e| Error::bpf("arming LOAD_CTL", e))
    }

    /// Takes the kernel's load events (once per process): wait for its fd to be readable, then
    /// drain [`LoadEvents::next_event`].
    pub fn take_load_events(&mut self) -> Result<LoadEvents> {
        // The program that writes the ring buffer is loaded with its fd before it leaves `ebpf`.
        self.sock_ops_prog()?;
        let map = self.ebpf.take_map(maps::LOAD_EVENTS).ok_or_else(|| Error::invalid("load events already taken"))?;
        let ring = RingBuf::try_from(map).map_err(|e| Error::bpf("opening LOAD_EVENTS", e))?;
        Ok(LoadEvents { ring })
    }

    // ---- both --------------------------------------------------------------------------

    /// Decision counters, summed over CPUs.
    pub fn stats(&mut self) -> Result<Stats> {
        let mut counters = Vec::with_capacity(Counter::ALL.len());
        for c in Counter::ALL {
            let (name, index) = match c.extra_index() {
                None => (maps::COUNTERS, c as u32),
                Some(i) => (maps::COUNTERS_EXTRA, i),
            };
            let arr: PerCpuArray<&mut MapData, u64> = PerCpuArray::try_from(self.map(name)?).map_err(|e| Error::bpf(format!("opening {name}"), e))?;
            let v = arr.get(&index, 0).map_err(|e| Error::bpf(format!("reading {name}"), e))?;
            counters.push((c.name(), v.iter().sum()));
        }
        Ok(Stats { counters })
    }

    /// Detaches everything, gives back adopted services (routes, interface settings) and
    /// removes the instance's pins.
    pub fn teardown(mut self) -> Result<()> {
        let lock = self.lock()?;
        for (addr, port, _) in self.list_adopted()? {
            self.unadopt_locked((addr, port))?;
        }
        let dir = self.dir.clone();
        drop(self);
        let r = fs::remove_dir_all(&dir).map_err(|e| Error::io(format!("removing {}", dir.display()), e));
        drop(lock);
        r
    }
}

/// The kernel's load events (see [`Datapath::arm_load_event`]).
pub struct LoadEvents {
    ring: RingBuf<MapData>,
}

impl LoadEvents {
    /// The next event, if one is waiting.
    pub fn next_event(&mut self) -> Option<LoadEvent> {
        let item = self.ring.next()?;
        (item.len() >= size_of::<LoadEvent>())
            // SAFETY: the kernel wrote a LoadEvent; read_unaligned copes with any alignment.
            .then(|| unsafe { std::ptr::read_unaligned(item.as_ptr().cast::<LoadEvent>()) })
    }
}

impl std::os::fd::AsRawFd for LoadEvents {
    fn as_raw_fd(&self) -> RawFd {
        self.ring.as_raw_fd()
    }
}

fn check_root_and_name(loc: &Location) -> Result<()> {
    if !nix::unistd::Uid::effective().is_root() {
        return Err(Error::NotRoot);
    }
    if loc.instance.is_empty() || !loc.instance.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_') {
        return Err(Error::invalid(format!("bad instance name {:?}: use letters, digits, '-' and '_'", loc.instance)));
    }
    Ok(())
}

/// Refuses pinned maps this version cannot use (another layout): reusing them would make the
/// programs read garbage.
fn check_pins(dir: &Path) -> Result<()> {
    let obj = aya_obj::Object::parse(EBPF_OBJECT).map_err(|e| Error::bpf("parsing the eBPF object", e))?;
    for (name, def) in &obj.maps {
        let pin = dir.join(name);
        if !pin.exists() {
            continue;
        }
        let info = MapInfo::from_pin(&pin).map_err(|e| Error::bpf(format!("reading pinned map {}", pin.display()), e))?;
        let mmap_pinned = info.map_flags() & BPF_F_MMAPABLE != 0;
        let mmap_wanted = def.map_flags() & BPF_F_MMAPABLE != 0;
        if info.key_size() != def.key_size() || info.value_size() != def.value_size() || info.max_entries() != def.max_entries() || mmap_pinned != mmap_wanted {
            return Err(Error::Incompatible {
                dir: dir.to_path_buf(),
                what: format!(
                    "map {name} has keys of {} bytes, values of {} bytes and {} entries; this version needs {}, {} and {}",
                    info.key_size(),
                    info.value_size(),
                    info.max_entries(),
                    def.key_size(),
                    def.value_size(),
                    def.max_entries()
                ),
            });
        }
    }
    Ok(())
}

/// `BPF_OBJ_GET`: opens a pinned object.
fn obj_get(path: &Path) -> io::Result<std::os::fd::OwnedFd> {
    use std::os::{fd::FromRawFd as _, unix::ffi::OsStrExt as _};
    let c = std::ffi::CString::new(path.as_os_str().as_bytes()).map_err(io::Error::other)?;
    // union bpf_attr, obj_get: pathname (u64), bpf_fd, file_flags.
    let mut attr = [0u64; 2];
    attr[0] = c.as_ptr() as u64;
    let cmd = aya_obj::generated::bpf_cmd::BPF_OBJ_GET as libc::c_long;
    // SAFETY: a valid bpf_attr for BPF_OBJ_GET; the path outlives the call.
    let rc = unsafe { libc::syscall(libc::SYS_bpf, cmd, attr.as_mut_ptr(), size_of_val(&attr)) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the kernel returned a new fd we own.
    Ok(unsafe { std::os::fd::OwnedFd::from_raw_fd(i32::try_from(rc).map_err(io::Error::other)?) })
}

/// `BPF_LINK_UPDATE`: puts program `prog_fd` into link `link_fd` atomically.
fn link_update(link_fd: RawFd, prog_fd: RawFd) -> io::Result<()> {
    // union bpf_attr, link_update: link_fd, new_prog_fd, flags, old_prog_fd.
    let mut attr = [0u32; 8];
    attr[0] = u32::try_from(link_fd).map_err(|_| io::Error::other("bad link fd"))?;
    attr[1] = u32::try_from(prog_fd).map_err(|_| io::Error::other("bad program fd"))?;
    let cmd = aya_obj::generated::bpf_cmd::BPF_LINK_UPDATE as libc::c_long;
    // SAFETY: a valid bpf_attr for BPF_LINK_UPDATE.
    let rc = unsafe { libc::syscall(libc::SYS_bpf, cmd, attr.as_mut_ptr(), size_of_val(&attr)) };
    if rc < 0 { Err(io::Error::last_os_error()) } else { Ok(()) }
}

fn is_drained(v: &RuleValue, now_ns: u64) -> bool {
    v.drain_until_ns != 0 && v.drain_until_ns <= now_ns
}

/// Removes an instance's pins without opening its maps (for an instance this version cannot
/// open): the programs detach with their links; routes of services it adopted stay.
pub fn remove_instance(loc: &Location) -> Result<()> {
    check_root_and_name(loc)?;
    let dir = loc.dir();
    if !dir.exists() {
        return Err(Error::NoInstance { dir });
    }
    fs::remove_dir_all(&dir).map_err(|e| Error::io(format!("removing {}", dir.display()), e))
}

/// The inode of the TCP socket listening on `listener` in this network namespace: it changes
/// when the application that listens restarts (one read of `/proc/net/tcp`, unlike the process
/// scan of [`Datapath::register_listener`]).
pub fn listener_inode(listener: (IpAddr, u16)) -> Result<u64> {
    listener::listening_inode(listener.0, listener.1)
}

/// The index of interface `name` in this network namespace (an error that names it if there
/// is none).
pub fn interface_index(name: &str) -> Result<u32> {
    net::ifindex(name)
}

/// `CLOCK_MONOTONIC` in ns: the clock of `bpf_ktime_get_ns`.
#[must_use]
pub fn monotonic_ns() -> u64 {
    let ts = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC).expect("CLOCK_MONOTONIC");
    u64::try_from(ts.tv_sec()).unwrap_or(0) * 1_000_000_000 + u64::try_from(ts.tv_nsec()).unwrap_or(0)
}

/// The Unix time in seconds (0 before 1970).
#[must_use]
pub fn unix_now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}
