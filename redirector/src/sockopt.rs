//! Raw socket calls the `nix` crate does not wrap (transparent IPv6 sockets, packet filters,
//! the `TCP_REPAIR` family): socket options of any plain type, ioctls that read an int, and
//! sockets owned from the start. One place for the `unsafe` they take.

use std::{
    io,
    mem::{MaybeUninit, size_of},
    os::fd::{AsRawFd, FromRawFd as _, OwnedFd},
};

fn check(r: libc::c_int) -> io::Result<libc::c_int> {
    if r < 0 { Err(io::Error::last_os_error()) } else { Ok(r) }
}

/// A new socket of `socket(2)` (close-on-exec), owned.
///
/// # Errors
/// The kernel's.
pub fn socket(domain: libc::c_int, ty: libc::c_int, protocol: libc::c_int) -> io::Result<OwnedFd> {
    // SAFETY: a plain syscall; the descriptor it returns is owned from here on.
    let fd = check(unsafe { libc::socket(domain, ty | libc::SOCK_CLOEXEC, protocol) })?;
    // SAFETY: `fd` was just opened and nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Disconnects a socket (`connect` to an `AF_UNSPEC` address): a TCP connection ends here and
/// now, whatever other references to the socket live on (closing ends it with the last).
///
/// # Errors
/// The kernel's.
pub fn disconnect(fd: &impl AsRawFd) -> io::Result<()> {
    let unspec = libc::sockaddr { sa_family: libc::sa_family_t::try_from(libc::AF_UNSPEC).expect("AF_UNSPEC fits"), sa_data: [0; 14] };
    let size = libc::socklen_t::try_from(size_of::<libc::sockaddr>()).expect("fits");
    // SAFETY: `unspec` is a valid sockaddr of `size` bytes (the kernel reads its family).
    check(unsafe { libc::connect(fd.as_raw_fd(), &raw const unspec, size) }).map(drop)
}

/// Sets option `name` of `level` to `value` (the kernel reads `size_of::<T>()` bytes).
///
/// # Errors
/// The kernel's.
pub fn set<T>(fd: &impl AsRawFd, level: libc::c_int, name: libc::c_int, value: &T) -> io::Result<()> {
    let len = libc::socklen_t::try_from(size_of::<T>()).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    // SAFETY: `value` is valid for `len` bytes for the duration of the call.
    check(unsafe { libc::setsockopt(fd.as_raw_fd(), level, name, std::ptr::from_ref(value).cast(), len) }).map(drop)
}

/// Asks for a receive buffer of `bytes`: past `net.core.rmem_max` where allowed
/// (`SO_RCVBUFFORCE`, `CAP_NET_ADMIN`), else as far as that limit lets (`SO_RCVBUF`).
///
/// # Errors
/// The kernel's, for `SO_RCVBUF`.
pub fn receive_buffer(fd: &impl AsRawFd, bytes: libc::c_int) -> io::Result<()> {
    if set(fd, libc::SOL_SOCKET, libc::SO_RCVBUFFORCE, &bytes).is_err() {
        set(fd, libc::SOL_SOCKET, libc::SO_RCVBUF, &bytes)?;
    }
    Ok(())
}

/// Sets option `name` of `level` to the array `values`.
///
/// # Errors
/// The kernel's.
pub fn set_slice<T>(fd: &impl AsRawFd, level: libc::c_int, name: libc::c_int, values: &[T]) -> io::Result<()> {
    let len = libc::socklen_t::try_from(size_of_val(values)).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    // SAFETY: `values` is valid for `len` bytes for the duration of the call.
    check(unsafe { libc::setsockopt(fd.as_raw_fd(), level, name, values.as_ptr().cast(), len) }).map(drop)
}

/// Reads option `name` of `level` as a `T`, a plain type any bytes are a value of (the
/// kernel may fill less of it than its size, e.g. an older `tcp_info`: the rest stays zero).
///
/// # Errors
/// The kernel's.
pub fn get<T: Copy>(fd: &impl AsRawFd, level: libc::c_int, name: libc::c_int) -> io::Result<T> {
    let mut value = MaybeUninit::<T>::zeroed();
    let mut len = libc::socklen_t::try_from(size_of::<T>()).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    // SAFETY: `value` is writable for `len` bytes; the kernel writes at most that.
    check(unsafe { libc::getsockopt(fd.as_raw_fd(), level, name, value.as_mut_ptr().cast(), &raw mut len) })?;
    // SAFETY: zeroed, then (partly) written by the kernel: every `T` this is used with (ints,
    // C structs of ints) is valid for any bytes.
    Ok(unsafe { value.assume_init() })
}

/// An ioctl that reads an int (`SIOCINQ`, `SIOCOUTQ`, ...).
///
/// # Errors
/// The kernel's.
pub fn ioctl_int(fd: &impl AsRawFd, request: libc::Ioctl) -> io::Result<libc::c_int> {
    let mut v: libc::c_int = 0;
    // SAFETY: these requests write one int.
    check(unsafe { libc::ioctl(fd.as_raw_fd(), request, &raw mut v) })?;
    Ok(v)
}

/// A packet socket (`AF_PACKET`, from the network header on) for ethertype `proto`
/// (`ETH_P_IP`, `ETH_P_ALL`, ...) arriving on the interface of index `interface` (on every
/// interface with `None`), with the classic BPF filter `code` attached, so that only what it
/// passes is queued.
///
/// # Errors
/// No `CAP_NET_RAW`, a filter the kernel refuses, or no such interface.
pub fn packet_socket(proto: libc::c_int, code: &[libc::sock_filter], interface: Option<u32>) -> io::Result<OwnedFd> {
    let proto = u16::try_from(proto).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?.to_be();
    // One for an interface is made deaf (protocol 0) and hears from its bind on: a socket
    // that hears already is unhooked to be bound, and unhooking waits for the kernel's
    // network-wide grace period (8 ms and more here, against 0.06 ms).
    let deaf = if interface.is_some() { 0 } else { proto };
    let fd = socket(libc::AF_PACKET, libc::SOCK_DGRAM, libc::c_int::from(deaf)).map_err(|e| io::Error::new(e.kind(), format!("opening a packet socket (CAP_NET_RAW): {e}")))?;
    let len = u16::try_from(code.len()).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    let prog = libc::sock_fprog { len, filter: code.as_ptr().cast_mut() };
    // `prog` points at `code`, alive for the call; the kernel copies it.
    set(&fd, libc::SOL_SOCKET, libc::SO_ATTACH_FILTER, &prog).map_err(|e| io::Error::new(e.kind(), format!("attaching the packet filter: {e}")))?;
    if let Some(index) = interface {
        // SAFETY: an all-zero sockaddr_ll is valid; the fields set make it this interface's.
        let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        sll.sll_family = u16::try_from(libc::AF_PACKET).expect("AF_PACKET fits");
        sll.sll_protocol = proto;
        sll.sll_ifindex = i32::try_from(index).map_err(|_| io::Error::other("interface index out of range"))?;
        let size = libc::socklen_t::try_from(size_of::<libc::sockaddr_ll>()).expect("fits");
        // SAFETY: `sll` is a valid sockaddr_ll of `size` bytes.
        check(unsafe { libc::bind(fd.as_raw_fd(), (&raw const sll).cast(), size) })?;
    }
    Ok(fd)
}

/// Classic BPF, for [`packet_socket`]'s filters: the opcodes they use and one instruction.
pub mod cbpf {
    /// `ld [k]`, a byte.
    pub const LDB: u16 = 0x30;
    /// `ld [k]`, a half word.
    pub const LDH: u16 = 0x28;
    /// `ldx 4 * ([k] & 0xf)`: an IPv4 header's length.
    pub const LDXB_MSH: u16 = 0xb1;
    /// `ld [x + k]`, a half word.
    pub const LDH_IND: u16 = 0x48;
    pub const JEQ: u16 = 0x15;
    pub const JSET: u16 = 0x45;
    pub const RET: u16 = 0x06;
    /// The `k` of a load of `skb->protocol` (`SKF_AD_OFF + SKF_AD_PROTOCOL`).
    pub const SKF_AD_PROTOCOL: u32 = 0xffff_f000;

    /// One instruction.
    #[must_use]
    pub const fn op(code: u16, jt: u8, jf: u8, k: u32) -> libc::sock_filter {
        libc::sock_filter { code, jt, jf, k }
    }
}
