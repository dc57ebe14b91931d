//! The kernel datapath: loads and attaches the eBPF programs, pins them with their maps in a
//! bpffs, and gives typed access to the steering state.
//!
//! Everything lives under `<bpffs>/redirector/<instance>/`: the maps (re-adopted by every
//! process that opens the instance, so steering survives restarts of the agent or CLI) and
//! the program links (`links/`), which keep the programs attached while no process runs.
//! Processes that change the state take the instance's lock (`flock` on its directory), so the
//! agent and an operator's commands never interleave their updates.
//!
//! [`Datapath`] is opened here; its methods live with their side: `origin` (steered services,
//! rules, drains), `target` (siblings, adopted services), `load` (connection counting), and
//! `links` (programs and their attachments).

mod batch;
mod bpffs;
mod frozen;
mod kernel_log;
mod links;
mod listener;
mod load;
mod lock;
mod net;
mod netlink;
mod origin;
mod probe;
mod slots;
mod target;
pub mod testrun;
mod types;
mod verify;

use std::{
    fs, io,
    net::IpAddr,
    path::{Path, PathBuf},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use aya::{
    Ebpf, EbpfLoader,
    maps::{MapData, MapError, MapInfo, PerCpuArray},
};
use redirector_common::{BPF_F_MMAPABLE, Counter, HOST_SLOT_COUNT, HostData, PORT_SLOT_COUNT, PortData, maps};
pub use types::{Load, Prefix, RuleInfo, RuleState, ServiceInfo, Stats, family_name};

pub use self::{
    kernel_log::KernelLog,
    listener::Listener,
    load::LoadEvents,
    probe::ProbeError,
    verify::{Verified, verify_programs},
};
use self::{
    links::{LINKS_DIR, LinkPin},
    lock::{LOCK_WAIT, Lock},
    slots::SlotTable,
};

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
    pub(crate) fn io(what: impl Into<String>, source: io::Error) -> Self {
        Error::Io { what: what.into(), source }
    }
    pub(crate) fn invalid(what: impl Into<String>) -> Self {
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
        bpffs::private_dir(&dir)?;
        let lock = Lock::take(&dir, LOCK_WAIT)?;
        // Pins of another layout are refused here, before anything is added to the instance.
        let mut dp = Self::load_instance(dir)?;
        bpffs::private_dir(&dp.links_dir())?;
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
        Lock::take(&self.dir, LOCK_WAIT)
    }

    /// The instance directory in the bpffs.
    #[must_use]
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The folder of the pinned links.
    fn links_dir(&self) -> PathBuf {
        self.dir.join(LINKS_DIR)
    }

    fn link_path(&self, pin: LinkPin) -> PathBuf {
        self.links_dir().join(pin.to_string())
    }

    fn map(&mut self, name: &str) -> Result<&mut aya::maps::Map> {
        self.ebpf.map_mut(name).ok_or_else(|| Error::invalid(format!("eBPF object has no map {name}")))
    }

    /// Map `name` through its typed view `T` (hash map, trie, array…), which checks the sizes.
    fn open_map<'a, T>(&'a mut self, name: &str) -> Result<T>
    where
        T: TryFrom<&'a mut aya::maps::Map, Error = MapError>,
    {
        T::try_from(self.map(name)?).map_err(|e| Error::bpf(format!("opening {name}"), e))
    }

    /// Decision counters, summed over CPUs.
    pub fn stats(&mut self) -> Result<Stats> {
        let mut counters = Vec::with_capacity(Counter::ALL.len());
        for c in Counter::ALL {
            let (name, index) = match c.extra_index() {
                None => (maps::COUNTERS, c as u32),
                Some(i) => (maps::COUNTERS_EXTRA, i),
            };
            let arr: PerCpuArray<&mut MapData, u64> = self.open_map(name)?;
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
/// when the application that listens restarts (one `sock_diag` dump, unlike the process
/// scan of [`Datapath::register_listener`]).
pub fn listener_inode(listener: (IpAddr, u16)) -> Result<u64> {
    netlink::listening_inode(listener.0, listener.1)
}

/// The index of interface `name` in this network namespace (an error that names it if there
/// is none).
pub fn interface_index(name: &str) -> Result<u32> {
    net::ifindex(name)
}

/// The MTU of interface `name`.
///
/// # Errors
/// No such interface.
pub fn interface_mtu(name: &str) -> Result<u32> {
    net::mtu(name)
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
