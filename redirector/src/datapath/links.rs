//! The programs and their attachments: loading a program, attaching it, pinning its link
//! under `<instance>/links/` (the link's name says what is attached where) and swapping this
//! binary's programs into every pinned link on upgrade.

use std::{
    fmt, fs, io,
    os::fd::{AsFd as _, AsRawFd as _, RawFd},
    path::Path,
};

use aya::programs::{
    Program, ProgramError, SchedClassifier, SkLookup, SockOps, TcAttachType, Xdp, XdpMode,
    links::{FdLink, LinkOrder, PinnedLink},
    tc::{SchedClassifierLink, TcAttachOptions},
    xdp::XdpLink,
};
use redirector_common::programs;

use super::{Datapath, Error, Result, net};

/// The folder of the instance directory that holds the pinned links.
pub(crate) const LINKS_DIR: &str = "links";

/// One attachment of a program, as its pinned link is named.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum LinkPin {
    /// The ingress classifier on the interface with this index.
    Ingress(u32),
    /// The egress classifier on the interface with this index.
    Egress(u32),
    /// `sk_lookup` on the instance's network namespace.
    SkLookup,
    /// `sock_ops` on the cgroup with this inode.
    SockOps(u64),
    /// The XDP fast path on the interface with this index.
    Xdp(u32),
}

const INGRESS: &str = "tc-ingress-";
const EGRESS: &str = "tc-egress-";
const SK_LOOKUP: &str = "sk-lookup";
const SOCK_OPS: &str = "sock-ops-";
const XDP: &str = "xdp-";

impl fmt::Display for LinkPin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            LinkPin::Ingress(ifindex) => write!(f, "{INGRESS}{ifindex}"),
            LinkPin::Egress(ifindex) => write!(f, "{EGRESS}{ifindex}"),
            LinkPin::SkLookup => f.write_str(SK_LOOKUP),
            LinkPin::SockOps(ino) => write!(f, "{SOCK_OPS}{ino}"),
            LinkPin::Xdp(ifindex) => write!(f, "{XDP}{ifindex}"),
        }
    }
}

impl LinkPin {
    /// The attachment a pin file name stands for: `None` for a name that is no attachment (a
    /// replacement being staged), an error for one of ours with a bad number.
    pub(crate) fn parse(name: &str) -> Result<Option<Self>> {
        let bad = || Error::invalid(format!("bad link pin name {name}"));
        if name == SK_LOOKUP {
            Ok(Some(LinkPin::SkLookup))
        } else if let Some(i) = name.strip_prefix(INGRESS) {
            Ok(Some(LinkPin::Ingress(i.parse().map_err(|_| bad())?)))
        } else if let Some(i) = name.strip_prefix(EGRESS) {
            Ok(Some(LinkPin::Egress(i.parse().map_err(|_| bad())?)))
        } else if let Some(i) = name.strip_prefix(SOCK_OPS) {
            Ok(Some(LinkPin::SockOps(i.parse().map_err(|_| bad())?)))
        } else if let Some(i) = name.strip_prefix(XDP) {
            Ok(Some(LinkPin::Xdp(i.parse().map_err(|_| bad())?)))
        } else {
            Ok(None)
        }
    }

    /// The name a replacement link is pinned under before it is renamed over this one.
    pub(crate) fn staging_name(self) -> String {
        format!("{self}-new")
    }
}

impl Datapath {
    /// Attaches the ingress classifier to `ifname` (first in its TCX chain) unless it already
    /// is. With `replace`, swaps this binary's program into the existing link atomically: every
    /// packet is decided by either the old or the new program, with the same pinned maps.
    pub fn attach_ingress(&mut self, ifname: &str, replace: bool) -> Result<u32> {
        self.attach_tc(ifname, programs::INGRESS, TcAttachType::Ingress, LinkPin::Ingress, replace)
    }

    /// Attaches the egress classifier (SYN-ACK MSS clamp of adopted services) to `ifname`.
    pub fn attach_egress(&mut self, ifname: &str, replace: bool) -> Result<u32> {
        self.attach_tc(ifname, programs::EGRESS, TcAttachType::Egress, LinkPin::Egress, replace)
    }

    /// Attaches the XDP fast path to `ifname` in native (driver) mode unless it already is; with
    /// `replace`, swaps this binary's program into the existing link atomically. An interface
    /// whose driver has no native XDP is refused (generic XDP would run after the socket
    /// buffer is made, no faster than the classifier).
    pub fn attach_xdp(&mut self, ifname: &str, replace: bool) -> Result<u32> {
        let ifindex = net::ifindex(ifname)?;
        let pin = self.link_path(LinkPin::Xdp(ifindex));
        if pin.exists() && !replace {
            return Ok(ifindex);
        }
        let prog: &mut Xdp = self.program(programs::XDP)?;
        if pin.exists() {
            let pinned = PinnedLink::from_pin(&pin).map_err(|e| Error::bpf(format!("opening pinned link {}", pin.display()), e))?;
            let link = XdpLink::try_from(FdLink::from(pinned)).map_err(|e| Error::bpf("converting the pinned link", e))?;
            prog.attach_to_link(link).map_err(|e| Error::bpf(format!("replacing {} on {ifname}", programs::XDP), e))?;
            return Ok(ifindex);
        }
        let id = prog
            .attach(ifname, XdpMode::Driver)
            .map_err(|e| Error::KernelFeature { what: format!("native XDP on {ifname} (its driver runs no XDP program)"), source: Some(Box::new(e)) })?;
        let link = prog.take_link(id).map_err(|e| Error::bpf("taking the link", e))?;
        // A netlink attachment (no BPF link on this kernel) cannot be pinned: dropping it here
        // detaches it.
        let fd_link = FdLink::try_from(link).map_err(|e| Error::KernelFeature { what: format!("an XDP link on {ifname} (Linux 5.9 or newer)"), source: Some(Box::new(e)) })?;
        fd_link.pin(&pin).map_err(|e| Error::bpf(format!("pinning the link at {}", pin.display()), e))?;
        Ok(ifindex)
    }

    /// Detaches the XDP fast path from interface `ifindex` (its pinned link is the last
    /// reference). Nothing to do when it is not attached.
    pub(crate) fn detach_xdp(&mut self, ifindex: u32) -> Result<()> {
        let pin = self.link_path(LinkPin::Xdp(ifindex));
        match fs::remove_file(&pin) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(Error::io(format!("removing {}", pin.display()), e)),
        }
    }

    /// The interfaces the XDP fast path is attached to by this instance.
    pub fn xdp_interfaces(&self) -> Result<Vec<u32>> {
        let mut out = Vec::new();
        for entry in fs::read_dir(self.links_dir()).map_err(|e| Error::io("listing links", e))? {
            let entry = entry.map_err(|e| Error::io("listing links", e))?;
            if let Some(LinkPin::Xdp(ifindex)) = LinkPin::parse(&entry.file_name().to_string_lossy())? {
                out.push(ifindex);
            }
        }
        out.sort_unstable();
        Ok(out)
    }

    /// Program `name` as its type `P`, loaded into the kernel (verified) if it was not yet.
    pub(crate) fn program<P: Loadable>(&mut self, name: &str) -> Result<&mut P>
    where
        for<'a> &'a mut P: TryFrom<&'a mut Program, Error = ProgramError>,
    {
        load_program(&mut self.ebpf, name)
    }

    fn attach_tc(&mut self, ifname: &str, name: &str, hook: TcAttachType, pin: fn(u32) -> LinkPin, replace: bool) -> Result<u32> {
        let ifindex = net::ifindex(ifname)?;
        let pin = self.link_path(pin(ifindex));
        if pin.exists() && !replace {
            return Ok(ifindex);
        }
        let prog: &mut SchedClassifier = self.program(name)?;
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
        let links = fs::read_dir(self.links_dir()).map_err(|e| Error::io("listing links", e))?;
        let mut names: Vec<String> = links.filter_map(Result::ok).map(|e| e.file_name().to_string_lossy().into_owned()).collect();
        names.sort();
        for n in names {
            let Some(pin) = LinkPin::parse(&n)? else { continue };
            match pin {
                LinkPin::SkLookup => self.attach_sk_lookup(true)?,
                LinkPin::Ingress(ifindex) => {
                    self.attach_ingress(&net::ifname(ifindex)?, true)?;
                }
                LinkPin::Egress(ifindex) => {
                    self.attach_egress(&net::ifname(ifindex)?, true)?;
                }
                LinkPin::Xdp(ifindex) => {
                    self.attach_xdp(&net::ifname(ifindex)?, true)?;
                }
                LinkPin::SockOps(_) => {
                    let prog: &mut SockOps = self.program(programs::SOCK_OPS)?;
                    let prog_fd = prog.fd().map_err(|e| Error::bpf("sock_ops program fd", e))?.as_fd().as_raw_fd();
                    let link = obj_get(&self.link_path(pin)).map_err(|e| Error::io(format!("opening pinned link {n}"), e))?;
                    link_update(link.as_raw_fd(), prog_fd).map_err(|e| Error::io(format!("replacing the sock_ops program of {n}"), e))?;
                }
            }
            replaced += 1;
        }
        Ok(replaced)
    }

    /// Attaches the `sk_lookup` program to the current network namespace unless it already is.
    /// With `replace`, attaches this binary's program first and then drops the old link.
    pub fn attach_sk_lookup(&mut self, replace: bool) -> Result<()> {
        let pin = self.link_path(LinkPin::SkLookup);
        if pin.exists() && !replace {
            return Ok(());
        }
        let prog: &mut SkLookup = self.program(programs::SK_LOOKUP)?;
        let netns = fs::File::open("/proc/thread-self/ns/net").map_err(|e| Error::io("opening this network namespace", e))?;
        let id = prog.attach(netns.as_fd()).map_err(|e| Error::bpf("attaching sk_lookup to the network namespace", e))?;
        let link = prog.take_link(id).map_err(|e| Error::bpf("taking the link", e))?;
        let fd_link = FdLink::from(link);
        let tmp = self.links_dir().join(LinkPin::SkLookup.staging_name());
        let _ = fs::remove_file(&tmp);
        fd_link.pin(&tmp).map_err(|e| Error::bpf(format!("pinning the link at {}", tmp.display()), e))?;
        // Renaming over the old pin drops the old link once the new one is attached.
        fs::rename(&tmp, &pin).map_err(|e| Error::io(format!("replacing {}", pin.display()), e))?;
        Ok(())
    }

    /// Whether the classifier is attached to interface `ifname` by this instance.
    pub fn ingress_attached_to(&self, ifname: &str) -> Result<bool> {
        Ok(self.ingress_attached(net::ifindex(ifname)?))
    }

    /// Whether the classifier is attached to `ifindex` by this instance.
    #[must_use]
    pub fn ingress_attached(&self, ifindex: u32) -> bool {
        self.link_path(LinkPin::Ingress(ifindex)).exists()
    }
}

/// A program type this instance loads: each has its own `load` (none takes arguments here).
/// Program `name` of `ebpf` as its type `P`, loaded into the kernel (verified) if it was not
/// yet.
pub(crate) fn load_program<'e, P: Loadable>(ebpf: &'e mut aya::Ebpf, name: &str) -> Result<&'e mut P>
where
    for<'a> &'a mut P: TryFrom<&'a mut Program, Error = ProgramError>,
{
    let program = ebpf.program_mut(name).ok_or_else(|| Error::invalid(format!("eBPF object has no program {name}")))?;
    let loaded = program.fd().is_ok();
    let prog: &mut P = program.try_into().map_err(|e| Error::bpf(format!("{name} is not a {} program", P::KIND), e))?;
    if !loaded {
        verify_patiently(|| prog.load_into_kernel(), interrupted).map_err(|e| Error::bpf(format!("loading {name} (verifier)"), e))?;
    }
    Ok(prog)
}

/// How many times a program is given to the verifier while signals keep interrupting it.
const VERIFY_TRIES: usize = 5;

/// Whether the verifier gave up because a signal was pending (EAGAIN): a stop and continue
/// (SIGSTOP and SIGCONT, a frozen cgroup) is one. libbpf tries such loads again too.
fn interrupted(e: &ProgramError) -> bool {
    matches!(e, ProgramError::LoadError { io_error, .. } if io_error.raw_os_error() == Some(libc::EAGAIN))
}

/// Runs `load` (`BPF_PROG_LOAD`) again, up to [`VERIFY_TRIES`] times in all, while it fails
/// as `interrupted` says ([`interrupted`] for a program).
fn verify_patiently<E>(mut load: impl FnMut() -> Result<(), E>, interrupted: impl Fn(&E) -> bool) -> Result<(), E> {
    let mut tries = 1;
    loop {
        match load() {
            Err(e) if interrupted(&e) && tries < VERIFY_TRIES => tries += 1,
            done => return done,
        }
    }
}

pub(crate) trait Loadable {
    /// What the type is called in messages.
    const KIND: &'static str;
    fn load_into_kernel(&mut self) -> Result<(), ProgramError>;
}

impl Loadable for SchedClassifier {
    const KIND: &'static str = "classifier";
    fn load_into_kernel(&mut self) -> Result<(), ProgramError> {
        self.load()
    }
}

impl Loadable for Xdp {
    const KIND: &'static str = "XDP";
    fn load_into_kernel(&mut self) -> Result<(), ProgramError> {
        self.load()
    }
}

impl Loadable for SkLookup {
    const KIND: &'static str = "sk_lookup";
    fn load_into_kernel(&mut self) -> Result<(), ProgramError> {
        self.load()
    }
}

impl Loadable for SockOps {
    const KIND: &'static str = "sock_ops";
    fn load_into_kernel(&mut self) -> Result<(), ProgramError> {
        self.load()
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        for pin in [LinkPin::Ingress(3), LinkPin::Egress(17), LinkPin::SkLookup, LinkPin::SockOps(1 << 40), LinkPin::Xdp(5)] {
            assert_eq!(LinkPin::parse(&pin.to_string()).unwrap(), Some(pin), "{pin}");
        }
        assert_eq!(LinkPin::Ingress(3).to_string(), "tc-ingress-3", "the names of pins that exist on hosts");
        assert_eq!(LinkPin::Egress(3).to_string(), "tc-egress-3");
        assert_eq!(LinkPin::SkLookup.to_string(), "sk-lookup");
        assert_eq!(LinkPin::SockOps(9).to_string(), "sock-ops-9");
        assert_eq!(LinkPin::Xdp(3).to_string(), "xdp-3");
    }

    /// [`verify_patiently`] over a load whose `n`th call (from 1) returns `outcome(n)`, EAGAIN
    /// counting as interrupted: its result and how many calls it made.
    fn verify_counting(outcome: impl Fn(usize) -> io::Result<()>) -> (io::Result<()>, usize) {
        let mut calls = 0;
        let got = verify_patiently(
            || {
                calls += 1;
                outcome(calls)
            },
            |e: &io::Error| e.raw_os_error() == Some(libc::EAGAIN),
        );
        (got, calls)
    }

    /// A verifier interrupted by a signal is asked again, a few times; any other error is
    /// final at once.
    #[test]
    fn an_interrupted_verifier_is_asked_again() {
        let fail = |errno| Err(io::Error::from_raw_os_error(errno));
        let (twice, calls) = verify_counting(|n| if n <= 2 { fail(libc::EAGAIN) } else { Ok(()) });
        assert!(twice.is_ok() && calls == 3, "loaded on the third try: {twice:?} after {calls}");
        let (always, calls) = verify_counting(|_| fail(libc::EAGAIN));
        assert!(always.is_err() && calls == VERIFY_TRIES, "gives up after {VERIFY_TRIES}: {always:?} after {calls}");
        let (refused, calls) = verify_counting(|_| fail(libc::EACCES));
        assert!(refused.is_err() && calls == 1, "a refusal is final: {refused:?} after {calls}");
    }

    #[test]
    fn staged_and_bad_names() {
        assert_eq!(LinkPin::parse(&LinkPin::SkLookup.staging_name()).unwrap(), None);
        assert!(LinkPin::parse("tc-ingress-x").is_err());
        assert!(LinkPin::parse("sock-ops-").is_err());
    }
}
