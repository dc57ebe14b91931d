//! Network namespaces, veth pairs and a bridge, removed when the guard drops.

use std::{
    fs,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    path::PathBuf,
    process::{Command, Output},
    sync::atomic::{AtomicU32, Ordering},
};

static NEXT: AtomicU32 = AtomicU32::new(0);

/// Runs a command, panicking with its stderr if it fails.
pub fn sh(args: &[&str]) -> String {
    let out = Command::new(args[0]).args(&args[1..]).output().unwrap_or_else(|e| panic!("running {args:?}: {e}"));
    assert!(out.status.success(), "{args:?} failed: {}", String::from_utf8_lossy(&out.stderr).trim());
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Runs `f` on a thread inside network namespace `ns`; sockets it makes stay in `ns`.
pub fn in_netns<T: Send + 'static>(ns: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    let path = format!("/run/netns/{ns}");
    let h = std::thread::spawn(move || {
        let file = fs::File::open(&path).unwrap_or_else(|e| panic!("opening {path}: {e}"));
        nix::sched::setns(file, nix::sched::CloneFlags::CLONE_NEWNET).unwrap_or_else(|e| panic!("setns {path}: {e}"));
        f()
    });
    match h.join() {
        Ok(v) => v,
        Err(p) => std::panic::resume_unwind(p),
    }
}

/// One test host: a namespace with `eth0` on the bridge.
#[derive(Clone, Debug)]
pub struct Host {
    pub ns: String,
    pub v4: Vec<Ipv4Addr>,
    pub v6: Vec<Ipv6Addr>,
}

impl Host {
    /// `ip -n <ns> ARGS`.
    pub fn ip(&self, args: &[&str]) -> String {
        let mut a = vec!["ip", "-n", &self.ns];
        a.extend_from_slice(args);
        sh(&a)
    }

    /// `ip netns exec <ns> ARGS`.
    pub fn exec(&self, args: &[&str]) -> String {
        let mut a = vec!["ip", "netns", "exec", &self.ns];
        a.extend_from_slice(args);
        sh(&a)
    }

    /// Sets a sysctl inside the namespace (`net.ipv4.tcp_syncookies` style key).
    pub fn sysctl(&self, key: &str, value: &str) {
        let path = format!("/proc/sys/{}", key.replace('.', "/"));
        let value = value.to_string();
        // /proc/sys/net shows the namespace of the thread that opens it.
        in_netns(&self.ns, move || fs::write(&path, &value).unwrap_or_else(|e| panic!("writing {path}: {e}")));
    }

    /// MAC address of `eth0`.
    pub fn mac(&self) -> String {
        let out = self.ip(&["-br", "link", "show", "eth0"]);
        out.split_whitespace().nth(2).unwrap_or_default().to_string()
    }
}

/// A switch namespace with a bridge and hosts A, B, C (servers) and one client host.
///
/// Plan (one L2 segment): A 198.18.0.1 (+ service 198.18.0.10), B .0.2 (+ .0.20), C .0.3 (+ .0.30),
/// clients 198.18.1.1..=N; IPv6 2001:db8::1 (+ ::10), ::2, ::3, clients 2001:db8::1:1..=N.
/// Everything is deleted when the topology drops, even after a panic.
pub struct Topology {
    pub prefix: String,
    pub switch: String,
    pub a: Host,
    pub b: Host,
    pub c: Host,
    pub client: Host,
    /// More servers (`s1`, `s2`, …) for benchmarks: control 198.18.0.100+i, service 198.18.3.i.
    pub extra: Vec<Host>,
    /// A bpffs of this topology's own, mounted in the host's mount namespace.
    pub bpffs: PathBuf,
    created: Vec<String>,
    mounted: bool,
}

pub const SERVICE4: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 10);
/// B's and C's own service addresses (clients of B and C use these).
pub const SERVICE4_B: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 20);
pub const SERVICE4_C: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 30);
pub const SERVICE6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 0x10);

/// The `i`-th client address (1-based) of each family.
#[must_use]
pub fn client4(i: u16) -> Ipv4Addr {
    let [hi, lo] = i.to_be_bytes();
    Ipv4Addr::new(198, 18, 1 + hi, lo)
}

#[must_use]
pub fn client6(i: u16) -> Ipv6Addr {
    Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 1, i)
}

impl Topology {
    /// Builds the topology with `clients` client addresses of each family.
    #[must_use]
    pub fn new(clients: u16) -> Self {
        Self::with_servers(clients, 0)
    }

    /// Like [`Topology::new`], with `extra` more servers.
    #[must_use]
    pub fn with_servers(clients: u16, extra: u8) -> Self {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let prefix = format!("rd{}x{n}", std::process::id() % 100_000);
        let host = |name: &str, v4: Vec<Ipv4Addr>, v6: Vec<Ipv6Addr>| Host { ns: format!("{prefix}{name}"), v4, v6 };
        let mut t = Self {
            switch: format!("{prefix}s"),
            a: host("a", vec![Ipv4Addr::new(198, 18, 0, 1), SERVICE4], vec![Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 1), SERVICE6]),
            // Control addresses first, then each server's own service address.
            b: host("b", vec![Ipv4Addr::new(198, 18, 0, 2), SERVICE4_B], vec![Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 2)]),
            c: host("c", vec![Ipv4Addr::new(198, 18, 0, 3), SERVICE4_C], vec![Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 3)]),
            client: host("k", (1..=clients).map(client4).collect(), (1..=clients).map(client6).collect()),
            extra: (1..=extra).map(|i| host(&format!("s{i}"), vec![Ipv4Addr::new(198, 18, 0, 100 + i), Ipv4Addr::new(198, 18, 3, i)], vec![])).collect(),
            bpffs: std::env::temp_dir().join(format!("{prefix}-bpffs")),
            prefix,
            created: Vec::new(),
            mounted: false,
        };
        t.build();
        t
    }

    fn add_ns(&mut self, ns: &str) {
        let _ = Command::new("ip").args(["netns", "del", ns]).output();
        sh(&["ip", "netns", "add", ns]);
        self.created.push(ns.to_string());
    }

    fn build(&mut self) {
        let sw = self.switch.clone();
        self.add_ns(&sw);
        sh(&["ip", "-n", &sw, "link", "add", "br0", "type", "bridge"]);
        sh(&["ip", "-n", &sw, "link", "set", "br0", "up"]);
        let mut hosts = vec![self.a.clone(), self.b.clone(), self.c.clone(), self.client.clone()];
        hosts.extend(self.extra.iter().cloned());
        for h in hosts {
            self.add_ns(&h.ns);
            // No duplicate address detection, for the link-local address of the interface
            // made next too (`default`: `all` does not lower an interface's own setting): a
            // host whose link-local address is still tentative cannot ask for its neighbours,
            // and what it sends to a client waits about a second (a server answering a client
            // it has not heard from, as a target does, asks from its link-local address).
            h.sysctl("net.ipv6.conf.default.accept_dad", "0");
            h.sysctl("net.ipv6.conf.all.accept_dad", "0");
            // The switch-side end is named after the host namespace (unique, <= 15 chars).
            sh(&["ip", "-n", &h.ns, "link", "add", "eth0", "type", "veth", "peer", "name", &h.ns, "netns", &sw]);
            sh(&["ip", "-n", &sw, "link", "set", &h.ns, "master", "br0", "up"]);
            h.ip(&["link", "set", "lo", "up"]);
            h.ip(&["link", "set", "eth0", "up"]);
            let batch: String = h.v4.iter().map(|a| format!("addr add {a}/16 dev eth0\n")).chain(h.v6.iter().map(|a| format!("addr add {a}/64 dev eth0 nodad\n"))).collect();
            let file = std::env::temp_dir().join(format!("{}-addrs", h.ns));
            fs::write(&file, batch).expect("write ip batch");
            sh(&["ip", "-n", &h.ns, "-batch", &file.to_string_lossy()]);
            let _ = fs::remove_file(file);
        }
        fs::create_dir_all(&self.bpffs).expect("bpffs dir");
        sh(&["mount", "-t", "bpf", "bpf", &self.bpffs.to_string_lossy()]);
        self.mounted = true;
    }

    /// Runs the `redirector` CLI on `host` (its namespace, this topology's bpffs, an instance
    /// named after the host).
    pub fn redirector(&self, host: &Host, args: &[&str]) -> Output {
        let bin = redirector_bin();
        let bpffs = self.bpffs.to_string_lossy().into_owned();
        let mut a: Vec<&str> = vec!["--netns", &host.ns, "--bpffs", &bpffs, "--instance", &host.ns];
        a.extend_from_slice(args);
        Command::new(&bin).args(&a).output().unwrap_or_else(|e| panic!("running {}: {e}", bin.display()))
    }

    /// Like [`Topology::redirector`], panicking with the error when it fails; returns stdout.
    pub fn redirector_ok(&self, host: &Host, args: &[&str]) -> String {
        let out = self.redirector(host, args);
        assert!(out.status.success(), "redirector {args:?} on {} failed: {}", host.ns, String::from_utf8_lossy(&out.stderr).trim());
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// [`Topology::steer_a_to_b`] for IPv4 only.
    pub fn steer_a_to_b_v4(&self, port: u16, b_port: u16) {
        let p = port.to_string();
        self.redirector_ok(&self.a, &["service", "add", &format!("{SERVICE4}:{p}"), "--dev", "eth0"]);
        self.redirector_ok(&self.b, &["sibling", "add", &self.a.v4[0].to_string(), "--dev", "eth0"]);
        self.redirector_ok(&self.b, &["adopt", "add", &format!("{SERVICE4}:{p}"), "--dev", "eth0", "--listener", &format!("{}:{b_port}", self.b.v4[0])]);
    }

    /// Migrates `client` (an address or prefix) from A to `target` with `rule add` on A.
    pub fn migrate(&self, client: &str, target: IpAddr) {
        self.redirector_ok(&self.a, &["rule", "add", client, "--to", &target.to_string()]);
    }

    /// The IPv4 scenario most tests start from: A serves `SERVICE4:port`, B serves the same
    /// port on its own address only, A steers the service and B adopted it.
    #[must_use]
    pub fn steered_v4(&self, port: u16) -> (crate::Server, crate::Server) {
        let a = crate::Server::start(&self.a.ns, "A", std::net::SocketAddr::new(IpAddr::V4(SERVICE4), port));
        let b = crate::Server::start(&self.b.ns, "B", std::net::SocketAddr::new(IpAddr::V4(self.b.v4[0]), port));
        self.steer_a_to_b_v4(port, port);
        (a, b)
    }

    /// One counter of `host`'s datapath.
    pub fn counter(&self, host: &Host, name: &str) -> u64 {
        let out = self.redirector_ok(host, &["stats", "--json"]);
        let v: serde_json::Value = serde_json::from_str(&out).expect("stats JSON");
        v["counters"][name].as_u64().unwrap_or_else(|| panic!("no counter {name} in {out}"))
    }

    /// The usual scenario: A steers `service` (its service address, port 80 of both families),
    /// B accepts A's tunnels and adopts the service with its own listener on `b_port`.
    pub fn steer_a_to_b(&self, port: u16, b_port: u16) {
        self.steer_a_to_b_with(port, b_port, &[]);
    }

    /// [`Topology::steer_a_to_b`] with more flags for A's `service add` (such as `--xdp`).
    pub fn steer_a_to_b_with(&self, port: u16, b_port: u16, service_flags: &[&str]) {
        let p = port.to_string();
        for service in [format!("{SERVICE4}:{p}"), format!("[{SERVICE6}]:{p}")] {
            let mut args = vec!["service", "add", &service, "--dev", "eth0"];
            args.extend_from_slice(service_flags);
            self.redirector_ok(&self.a, &args);
        }
        self.redirector_ok(&self.b, &["sibling", "add", &self.a.v4[0].to_string(), "--dev", "eth0"]);
        self.redirector_ok(&self.b, &["adopt", "add", &format!("{SERVICE4}:{p}"), "--dev", "eth0", "--listener", &format!("{}:{b_port}", self.b.v4[0])]);
        self.redirector_ok(&self.b, &["sibling", "add", &self.a.v6[0].to_string(), "--dev", "eth0"]);
        self.redirector_ok(&self.b, &["adopt", "add", &format!("[{SERVICE6}]:{p}"), "--dev", "eth0", "--listener", &format!("[{}]:{b_port}", self.b.v6[0])]);
    }
}

/// `SIOCETHTOOL` command of [`ethtool_set`]: transmit checksum offload.
pub const ETHTOOL_STXCSUM: u32 = 0x17;

/// Sets one on/off feature of `ifname` in namespace `ns` with `SIOCETHTOOL` (`ethtool -K`,
/// which these hosts do not have): `cmd` is one of the `ETHTOOL_S*` commands above.
pub fn ethtool_set(ns: &str, ifname: &str, cmd: u32, on: bool) {
    let (ns_name, ifname) = (ns.to_string(), ifname.to_string());
    in_netns(ns, move || {
        let sock = std::net::UdpSocket::bind("0.0.0.0:0").expect("a socket for SIOCETHTOOL");
        // struct ethtool_value { cmd, data }.
        let mut value = [cmd, u32::from(on)];
        // SAFETY: an all-zero ifreq is valid.
        let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
        for (d, s) in req.ifr_name.iter_mut().zip(ifname.bytes().take(libc::IFNAMSIZ - 1)) {
            *d = libc::c_char::from_ne_bytes([s]);
        }
        req.ifr_ifru.ifru_data = value.as_mut_ptr().cast();
        // SAFETY: a valid ifreq whose data points at an ethtool_value that outlives the call.
        let rc = unsafe { libc::ioctl(std::os::fd::AsRawFd::as_raw_fd(&sock), libc::SIOCETHTOOL, &mut req) };
        assert!(rc == 0, "SIOCETHTOOL {cmd:#x}={on} on {ifname} in {ns_name}: {}", std::io::Error::last_os_error());
    });
}

/// An XDP program that passes every packet, attached to an interface while this lives.
pub struct PassXdp {
    _ebpf: aya::Ebpf,
}

impl Topology {
    /// Makes A's uplink ready for the XDP fast path, as a real uplink is: forwarding on `eth0`
    /// (both families: `bpf_fib_lookup` answers only there); on veth, a frame sent back with
    /// `XDP_TX` is delivered by the peer only when the peer runs XDP itself, so the switch's
    /// end of A's veth gets a program that passes everything (as the kernel's own veth XDP
    /// tests do); and the client sends complete checksums (a veth sender's offloaded, partial
    /// checksum does not survive `XDP_TX`, which turns the packet into a frame without that
    /// note). Keep the guard while the fast path is used.
    #[must_use]
    pub fn xdp_ready(&self) -> PassXdp {
        self.a.sysctl("net.ipv4.conf.eth0.forwarding", "1");
        self.a.sysctl("net.ipv6.conf.eth0.forwarding", "1");
        ethtool_set(&self.client.ns, "eth0", ETHTOOL_STXCSUM, false);
        let pins = self.bpffs.join("switch-xdp");
        fs::create_dir_all(&pins).expect("a folder for the switch's XDP maps");
        let port = self.a.ns.clone();
        in_netns(&self.switch, move || {
            use aya::programs::{Xdp, XdpMode};
            let mut ebpf = aya::EbpfLoader::new().default_map_pin_directory(&pins).load(redirector::datapath::EBPF_OBJECT).expect("loading the eBPF object");
            let prog: &mut Xdp = ebpf.program_mut(redirector_common::programs::XDP_EMPTY).expect("the empty XDP program").try_into().expect("an XDP program");
            prog.load().expect("loading the empty XDP program");
            prog.attach(&port, XdpMode::Driver).unwrap_or_else(|e| panic!("attaching XDP to the switch's port {port}: {e}"));
            PassXdp { _ebpf: ebpf }
        })
    }
}

/// Makes this thread's network namespace (a fresh one) an origin's uplink for the XDP fast
/// path under `BPF_PROG_TEST_RUN`: loopback up, a veth `v0` (peer `v1`) with A's control and
/// service addresses of both families, forwarding on, and the target's addresses (198.18.0.2,
/// 2001:db8::2) resolved to `02:00:00:00:00:02`, so that XDP's next-hop lookup answers. Returns
/// `v0`'s index.
#[must_use]
pub fn xdp_uplink_here() -> u32 {
    sh(&["ip", "link", "set", "lo", "up"]);
    sh(&["ip", "link", "add", "v0", "type", "veth", "peer", "name", "v1"]);
    sh(&["ip", "link", "set", "v0", "up"]);
    sh(&["ip", "link", "set", "v1", "up"]);
    for a in ["198.18.0.1/16", &format!("{SERVICE4}/32")] {
        sh(&["ip", "addr", "add", a, "dev", "v0"]);
    }
    for a in ["2001:db8::1/64", &format!("{SERVICE6}/128")] {
        sh(&["ip", "-6", "addr", "add", a, "dev", "v0", "nodad"]);
    }
    sh(&["ip", "neigh", "replace", "198.18.0.2", "lladdr", "02:00:00:00:00:02", "dev", "v0", "nud", "permanent"]);
    sh(&["ip", "-6", "neigh", "replace", "2001:db8::2", "lladdr", "02:00:00:00:00:02", "dev", "v0", "nud", "permanent"]);
    for family in ["ipv4", "ipv6"] {
        let path = format!("/proc/sys/net/{family}/conf/v0/forwarding");
        fs::write(&path, "1").unwrap_or_else(|e| panic!("writing {path}: {e}"));
    }
    redirector::datapath::interface_index("v0").expect("v0")
}

/// Path of the `redirector` binary: `$REDIRECTOR_BIN`, else `target/debug/redirector`.
#[must_use]
pub fn redirector_bin() -> PathBuf {
    std::env::var_os("REDIRECTOR_BIN").map_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/debug/redirector"), PathBuf::from)
}

impl Drop for Topology {
    fn drop(&mut self) {
        if self.mounted {
            let _ = nix::mount::umount2(&self.bpffs, nix::mount::MntFlags::MNT_DETACH);
        }
        let _ = fs::remove_dir(&self.bpffs);
        // Deleting a namespace deletes its veth ends; the switch goes last.
        for ns in self.created.iter().rev() {
            let _ = Command::new("ip").args(["netns", "del", ns]).output();
        }
    }
}

/// Whether `ns` still exists (for cleanup tests).
#[must_use]
pub fn netns_exists(ns: &str) -> bool {
    std::path::Path::new("/run/netns").join(ns).exists()
}

/// Helper for IP literals in test output.
#[must_use]
pub fn sock(ip: IpAddr, port: u16) -> String {
    std::net::SocketAddr::new(ip, port).to_string()
}

/// Offload state of an interface (ETHTOOL_GTSO / ETHTOOL_GGSO).
#[derive(Clone, Copy, Debug)]
pub struct Offloads {
    pub tso: bool,
    pub gso: bool,
}

/// Reads TSO and GSO of `ifname` inside namespace `ns`.
#[must_use]
pub fn offloads(ns: &str, ifname: &str) -> Offloads {
    let ifname = ifname.to_string();
    in_netns(ns, move || {
        let get = |cmd: u32| -> bool {
            let sock = std::net::UdpSocket::bind("0.0.0.0:0").expect("socket");
            #[repr(C)]
            struct Value {
                cmd: u32,
                data: u32,
            }
            let mut v = Value { cmd, data: 0 };
            // SAFETY: a zeroed ifreq with the name and a pointer to v, as SIOCETHTOOL expects.
            let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
            for (d, s) in req.ifr_name.iter_mut().zip(ifname.bytes()) {
                *d = s as libc::c_char;
            }
            req.ifr_ifru.ifru_data = (&raw mut v).cast();
            let rc = unsafe { libc::ioctl(std::os::fd::AsRawFd::as_raw_fd(&sock), libc::SIOCETHTOOL, &mut req) };
            assert!(rc == 0, "SIOCETHTOOL {cmd:#x} on {ifname}: {}", std::io::Error::last_os_error());
            v.data != 0
        };
        Offloads { tso: get(0x1e), gso: get(0x23) }
    })
}

/// Sends `payload` from namespace `ns` over a raw IPv4 socket of protocol `proto` bound to
/// `src` (the kernel adds the IP header).
pub fn send_raw4(ns: &str, proto: i32, src: Ipv4Addr, dst: Ipv4Addr, payload: Vec<u8>) {
    send_raw4_burst(ns, proto, src, dst, payload, 1);
}

/// [`send_raw4`] `copies` times back to back, from one socket.
pub fn send_raw4_burst(ns: &str, proto: i32, src: Ipv4Addr, dst: Ipv4Addr, payload: Vec<u8>, copies: usize) {
    in_netns(ns, move || {
        // SAFETY: plain socket calls on a fresh descriptor, closed at the end.
        unsafe {
            let fd = libc::socket(libc::AF_INET, libc::SOCK_RAW | libc::SOCK_CLOEXEC, proto);
            assert!(fd >= 0, "raw socket: {}", std::io::Error::last_os_error());
            let bind = nix::sys::socket::SockaddrIn::from(std::net::SocketAddrV4::new(src, 0));
            let rc = libc::bind(fd, nix::sys::socket::SockaddrLike::as_ptr(&bind), nix::sys::socket::SockaddrLike::len(&bind));
            assert_eq!(rc, 0, "bind raw socket to {src}: {}", std::io::Error::last_os_error());
            let to = nix::sys::socket::SockaddrIn::from(std::net::SocketAddrV4::new(dst, 0));
            for _ in 0..copies {
                let n = libc::sendto(fd, payload.as_ptr().cast(), payload.len(), 0, nix::sys::socket::SockaddrLike::as_ptr(&to), nix::sys::socket::SockaddrLike::len(&to));
                assert!(n >= 0, "sendto {dst}: {}", std::io::Error::last_os_error());
            }
            libc::close(fd);
        }
    });
}

/// The id of the program a pinned BPF link runs (raw `bpf()` calls: `BPF_OBJ_GET`, then
/// `BPF_OBJ_GET_INFO_BY_FD` for `struct bpf_link_info`, whose third word is `prog_id`).
#[must_use]
pub fn pinned_link_program(pin: &std::path::Path) -> u32 {
    let c = std::ffi::CString::new(pin.as_os_str().as_encoded_bytes()).expect("path");
    let mut get = [0u64; 2];
    get[0] = c.as_ptr() as u64;
    // SAFETY: a valid bpf_attr for BPF_OBJ_GET (cmd 7); the path outlives the call.
    let fd = unsafe { libc::syscall(libc::SYS_bpf, 7, get.as_mut_ptr(), std::mem::size_of_val(&get)) };
    assert!(fd >= 0, "opening {}: {}", pin.display(), std::io::Error::last_os_error());
    let fd = i32::try_from(fd).expect("fd");
    let mut info = [0u32; 64];
    let mut attr = [0u64; 2];
    attr[0] = u64::from(fd.cast_unsigned()) | (u64::try_from(std::mem::size_of_val(&info)).expect("size") << 32);
    attr[1] = info.as_mut_ptr() as u64;
    // SAFETY: a valid bpf_attr for BPF_OBJ_GET_INFO_BY_FD (cmd 15); info outlives the call.
    let rc = unsafe { libc::syscall(libc::SYS_bpf, 15, attr.as_mut_ptr(), std::mem::size_of_val(&attr)) };
    // SAFETY: closing the fd opened above.
    unsafe { libc::close(fd) };
    assert_eq!(rc, 0, "reading the link at {}: {}", pin.display(), std::io::Error::last_os_error());
    info[2]
}

/// A packet seen by a [`Tap`].
#[derive(Clone, Debug)]
pub struct Seen {
    /// Sent by this host (else received).
    pub outgoing: bool,
    /// The Ethernet source address.
    pub from_mac: [u8; 6],
    /// From the IP header on.
    pub ip: Vec<u8>,
}

/// A packet socket on one interface of a namespace: sees every IP packet it sends and
/// receives, and sends IP packets to a chosen MAC address (no routing, no neighbour lookup).
pub struct Tap {
    fd: std::os::fd::OwnedFd,
    ifindex: i32,
}

const ETH_P_ALL: u16 = 0x0003;

/// A `sockaddr_ll` for `ifindex`, protocol `proto` (host order) and, when sending, `mac`.
fn sockaddr_ll(ifindex: i32, proto: u16, mac: [u8; 6]) -> libc::sockaddr_ll {
    // SAFETY: sockaddr_ll is plain data; all-zero is valid.
    let mut a: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    a.sll_family = u16::try_from(libc::AF_PACKET).expect("AF_PACKET");
    a.sll_protocol = proto.to_be();
    a.sll_ifindex = ifindex;
    a.sll_halen = 6;
    a.sll_addr[..6].copy_from_slice(&mac);
    a
}

impl Tap {
    /// Opens a tap on `ifname` in namespace `ns`; it sees what happens from now on.
    #[must_use]
    pub fn open(ns: &str, ifname: &str) -> Self {
        let ifname = ifname.to_string();
        in_netns(ns, move || {
            let name = std::ffi::CString::new(ifname.as_str()).expect("name");
            // SAFETY: a NUL-terminated name.
            let ifindex = i32::try_from(unsafe { libc::if_nametoindex(name.as_ptr()) }).expect("ifindex");
            assert!(ifindex > 0, "no interface {ifname}");
            // SAFETY: a fresh socket, owned below; the address is a valid sockaddr_ll.
            unsafe {
                let fd = libc::socket(libc::AF_PACKET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, i32::from(ETH_P_ALL.to_be()));
                assert!(fd >= 0, "packet socket: {}", std::io::Error::last_os_error());
                let fd = <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd);
                let a = sockaddr_ll(ifindex, ETH_P_ALL, [0; 6]);
                let rc = libc::bind(std::os::fd::AsRawFd::as_raw_fd(&fd), (&raw const a).cast(), u32::try_from(std::mem::size_of_val(&a)).expect("size"));
                assert_eq!(rc, 0, "binding the packet socket to {ifname}: {}", std::io::Error::last_os_error());
                Self { fd, ifindex }
            }
        })
    }

    /// Sends `ip_packet` (from its IP header on) out of the interface to `mac` ("02:..").
    pub fn send(&self, ip_packet: &[u8], mac: &str) {
        let mut m = [0u8; 6];
        for (b, part) in m.iter_mut().zip(mac.split(':')) {
            *b = u8::from_str_radix(part, 16).unwrap_or_else(|e| panic!("MAC {mac}: {e}"));
        }
        let proto = if ip_packet[0] >> 4 == 4 { 0x0800 } else { 0x86dd };
        let to = sockaddr_ll(self.ifindex, proto, m);
        // SAFETY: a valid buffer and sockaddr_ll.
        let n = unsafe {
            libc::sendto(
                std::os::fd::AsRawFd::as_raw_fd(&self.fd),
                ip_packet.as_ptr().cast(),
                ip_packet.len(),
                0,
                (&raw const to).cast(),
                u32::try_from(std::mem::size_of_val(&to)).expect("size"),
            )
        };
        assert!(n >= 0, "sending {} bytes to {mac}: {}", ip_packet.len(), std::io::Error::last_os_error());
    }

    /// Forgets the packets seen so far.
    pub fn drain(&self) {
        let _ = self.next(std::time::Duration::ZERO, |_| false);
    }

    /// The next packet `pick` accepts, waiting at most `timeout`; `None` if none came. Packets
    /// before it are consumed.
    pub fn next(&self, timeout: std::time::Duration, mut pick: impl FnMut(&Seen) -> bool) -> Option<Seen> {
        let fd = std::os::fd::AsRawFd::as_raw_fd(&self.fd);
        let end = std::time::Instant::now() + timeout;
        loop {
            let left = end.saturating_duration_since(std::time::Instant::now());
            let mut pfd = [libc::pollfd { fd, events: libc::POLLIN, revents: 0 }];
            // SAFETY: pfd is a valid array of one pollfd.
            let ready = unsafe { libc::poll(pfd.as_mut_ptr(), 1, i32::try_from(left.as_millis()).unwrap_or(i32::MAX)) };
            if ready <= 0 {
                return None;
            }
            let mut buf = vec![0u8; 65_536];
            // SAFETY: sockaddr_ll is plain data; all-zero is valid.
            let mut from: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
            let mut len = u32::try_from(std::mem::size_of_val(&from)).expect("size");
            // SAFETY: valid buffers of the lengths given.
            let n = unsafe { libc::recvfrom(fd, buf.as_mut_ptr().cast(), buf.len(), 0, (&raw mut from).cast(), &raw mut len) };
            let Ok(n) = usize::try_from(n) else { panic!("reading the tap: {}", std::io::Error::last_os_error()) };
            buf.truncate(n);
            let mut from_mac = [0u8; 6];
            from_mac.copy_from_slice(&from.sll_addr[..6]);
            let seen = Seen { outgoing: from.sll_pkttype == libc::PACKET_OUTGOING, from_mac, ip: buf };
            if pick(&seen) {
                return Some(seen);
            }
        }
    }
}

/// A MAC address as `ip link` prints it.
#[must_use]
pub fn mac_string(mac: [u8; 6]) -> String {
    mac.iter().map(|b| format!("{b:02x}")).collect::<Vec<_>>().join(":")
}
