//! Load counting: the application's established connections per client and in total, from the
//! `sock_ops` program, and the kernel's report of a crossed watermark.

use std::{fs, os::fd::RawFd, path::Path};

use aya::{
    maps::{Array, HashMap, MapData, RingBuf},
    programs::{CgroupAttachMode, SockOps, links::FdLink},
};
use redirector_common::{LoadCtl, LoadEvent, maps, programs};

use super::{Datapath, Error, Load, Result, links::LinkPin, types};

impl Datapath {
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
        let pin = self.link_path(LinkPin::SockOps(ino));
        if pin.exists() {
            return Ok(());
        }
        let _lock = self.lock()?;
        let prog: &mut SockOps = self.program(programs::SOCK_OPS)?;
        let id = prog.attach(&dir, CgroupAttachMode::Single).map_err(|e| Error::bpf(format!("attaching sock_ops to {}", cgroup.display()), e))?;
        let link = prog.take_link(id).map_err(|e| Error::bpf("taking the link", e))?;
        let fd_link = FdLink::try_from(link).map_err(|e| Error::bpf("sock_ops link is not an fd link", e))?;
        fd_link.pin(&pin).map_err(|e| Error::bpf(format!("pinning the link at {}", pin.display()), e))?;
        Ok(())
    }

    /// Established connections of the application(s), in total (exact, one read).
    pub fn load_total(&mut self) -> Result<u64> {
        let arr: Array<&mut MapData, i64> = self.open_map(maps::LOAD_TOTAL)?;
        let v = arr.get(&0, 0).map_err(|e| Error::bpf("reading LOAD_TOTAL", e))?;
        Ok(u64::try_from(v).unwrap_or(0))
    }

    /// The total and the established connections per client address (clients with none are
    /// left out), largest first. Per-client counts may be low for clients whose entry made room
    /// for newer ones in a full table; the total is exact.
    pub fn load(&mut self) -> Result<Load> {
        let total = self.load_total()?;
        let map: HashMap<&mut MapData, [u8; 16], i64> = self.open_map(maps::LOAD)?;
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
        let mut arr: Array<&mut MapData, LoadCtl> = self.open_map(maps::LOAD_CTL)?;
        arr.set(0, LoadCtl { high, armed: 1, _pad: 0 }, 0).map_err(|e| Error::bpf("arming LOAD_CTL", e))
    }

    /// Takes the kernel's load events (once per process): wait for its fd to be readable, then
    /// drain [`LoadEvents::next_event`].
    pub fn take_load_events(&mut self) -> Result<LoadEvents> {
        // The program that writes the ring buffer is loaded with its fd before it leaves `ebpf`.
        self.program::<SockOps>(programs::SOCK_OPS)?;
        let map = self.ebpf.take_map(maps::LOAD_EVENTS).ok_or_else(|| Error::invalid("load events already taken"))?;
        let ring = RingBuf::try_from(map).map_err(|e| Error::bpf("opening LOAD_EVENTS", e))?;
        Ok(LoadEvents { ring })
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
