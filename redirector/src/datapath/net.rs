//! Interface facts and sysctls the datapath needs (interface calls and /proc/sys; routes and
//! sockets are in `netlink`).

use std::{fs, net::IpAddr};

use nix::ifaddrs::getifaddrs;

use super::{Error, Result};

/// Index of interface `name` in the current network namespace.
pub fn ifindex(name: &str) -> Result<u32> {
    if name.is_empty() || name.len() > 15 || name.contains('/') {
        return Err(Error::NoInterface { name: name.into() });
    }
    nix::net::if_::if_nametoindex(name).map_err(|_| Error::NoInterface { name: name.into() })
}

/// Name of interface `ifindex` in the current network namespace.
pub fn ifname(ifindex: u32) -> Result<String> {
    let mut buf = [0 as libc::c_char; libc::IF_NAMESIZE];
    // SAFETY: buf has IF_NAMESIZE bytes, as if_indextoname requires.
    let p = unsafe { libc::if_indextoname(ifindex, buf.as_mut_ptr()) };
    if p.is_null() {
        return Err(Error::NoInterface { name: format!("#{ifindex}") });
    }
    // SAFETY: if_indextoname wrote a NUL-terminated name.
    Ok(unsafe { std::ffi::CStr::from_ptr(buf.as_ptr()) }.to_string_lossy().into_owned())
}

/// MTU of interface `name`.
pub fn mtu(name: &str) -> Result<u32> {
    ifindex(name)?;
    let sock = std::net::UdpSocket::bind("0.0.0.0:0").map_err(|e| Error::io("opening a socket for SIOCGIFMTU", e))?;
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (d, s) in req.ifr_name.iter_mut().zip(name.bytes()) {
        *d = libc::c_char::from_ne_bytes([s]);
    }
    // SAFETY: req is a valid ifreq with a NUL-terminated name.
    let rc = unsafe { libc::ioctl(std::os::fd::AsRawFd::as_raw_fd(&sock), libc::SIOCGIFMTU, &mut req) };
    if rc < 0 {
        return Err(Error::io(format!("reading the MTU of {name}"), std::io::Error::last_os_error()));
    }
    // SAFETY: SIOCGIFMTU filled the mtu member.
    Ok(u32::try_from(unsafe { req.ifr_ifru.ifru_mtu }).unwrap_or(1500))
}

fn addresses_of(name: Option<&str>) -> Result<Vec<IpAddr>> {
    let addrs = getifaddrs().map_err(|e| Error::io("listing interface addresses", e.into()))?;
    let mut out = Vec::new();
    for ifa in addrs {
        if name.is_some_and(|n| n != ifa.interface_name) {
            continue;
        }
        let Some(a) = ifa.address else { continue };
        if let Some(v4) = a.as_sockaddr_in() {
            out.push(IpAddr::V4(v4.ip()));
        } else if let Some(v6) = a.as_sockaddr_in6() {
            out.push(IpAddr::V6(v6.ip()));
        }
    }
    Ok(out)
}

/// The first address of `ifname` of `service`'s family that is not `service` itself nor
/// link-local: the host's own control address, used as the tunnel source.
pub fn control_address(ifname: &str, service: IpAddr) -> Result<IpAddr> {
    addresses_of(Some(ifname))?
        .into_iter()
        .find(|a| a.is_ipv4() == service.is_ipv4() && *a != service && !matches!(a, IpAddr::V6(v6) if (v6.segments()[0] & 0xffc0) == 0xfe80))
        .ok_or_else(|| Error::invalid(format!("{ifname} has no {} address other than the service address {service}: give --tunnel-src", super::family_name(service.is_ipv4()))))
}

/// Whether `addr` is configured on any interface of this namespace.
pub fn is_interface_address(addr: IpAddr) -> Result<bool> {
    Ok(addresses_of(None)?.contains(&addr))
}

/// The IPv4 settings a target's uplink needs, with the value each must have. The kernel uses
/// the larger of `all` and the interface's value for all of them, so only the interface's
/// value is changed (and put back when no adopted service uses the interface).
/// - `arp_ignore` 1 and `arp_announce` 2: never answer ARP for an adopted address (it is on
///   no interface), never announce it;
/// - `accept_local` 1: tunnelled packets may carry local addresses;
/// - `rp_filter` 2 (loose), in place of strict: decapsulated packets arrive on the uplink from
///   clients whose route may point elsewhere.
pub const TARGET_SYSCTLS: [(&str, u32); 4] = [("arp_ignore", 1), ("arp_announce", 2), ("accept_local", 1), ("rp_filter", 2)];

/// Whether `ifname` forwards packets of the family (`net.ipv4.conf.<ifname>.forwarding` or
/// `net.ipv6.conf.<ifname>.forwarding`): `bpf_fib_lookup`, which finds the XDP fast path's next
/// hop, answers only on an interface that does.
pub fn forwarding(ifname: &str, v6: bool) -> Result<bool> {
    ifindex(ifname)?;
    let path = format!("/proc/sys/net/ipv{}/conf/{ifname}/forwarding", if v6 { 6 } else { 4 });
    let text = fs::read_to_string(&path).map_err(|e| Error::io(format!("reading {path}"), e))?;
    Ok(text.trim() != "0")
}

fn sysctl_path(ifname: &str, name: &str) -> String {
    format!("/proc/sys/net/ipv4/conf/{ifname}/{name}")
}

/// The value of `net.ipv4.conf.<ifname>.<name>`.
pub fn read_sysctl_v4(ifname: &str, name: &str) -> Result<u32> {
    let path = sysctl_path(ifname, name);
    let text = fs::read_to_string(&path).map_err(|e| Error::io(format!("reading {path}"), e))?;
    text.trim().parse().map_err(|_| Error::invalid(format!("{path} holds {:?}, not a number", text.trim())))
}

/// Sets `net.ipv4.conf.<ifname>.<name>`.
pub fn write_sysctl_v4(ifname: &str, name: &str, value: u32) -> Result<()> {
    let path = sysctl_path(ifname, name);
    fs::write(&path, value.to_string()).map_err(|e| Error::io(format!("setting {path} to {value}"), e))
}
