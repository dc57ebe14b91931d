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

/// Sets option `name` of `level` to `value` (the kernel reads `size_of::<T>()` bytes).
///
/// # Errors
/// The kernel's.
pub fn set<T>(fd: &impl AsRawFd, level: libc::c_int, name: libc::c_int, value: &T) -> io::Result<()> {
    let len = libc::socklen_t::try_from(size_of::<T>()).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    // SAFETY: `value` is valid for `len` bytes for the duration of the call.
    check(unsafe { libc::setsockopt(fd.as_raw_fd(), level, name, std::ptr::from_ref(value).cast(), len) }).map(drop)
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
