//! Reading a kernel ring buffer as it fills (the load events, the programs' log lines).

use std::os::fd::AsRawFd;

use tracing::warn;

/// Calls `drain` on `ring` each time its fd turns readable, for as long as the runtime runs.
pub(super) async fn each_time_readable<T: AsRawFd>(what: &str, ring: T, mut drain: impl FnMut(&mut T)) {
    // SAFETY: a ring buffer owns its fd for its whole life and always returns that same fd;
    // the AsyncFd owns the ring buffer.
    let mut fd = match unsafe { tokio::io::unix::AsyncFd::register_with_interest(ring, tokio::io::Interest::READABLE) } {
        Ok(fd) => fd,
        Err(e) => return warn!("watching {what}: {e}"),
    };
    loop {
        let Ok(mut ready) = fd.readable_mut().await else { return };
        // Cleared before draining: a record that comes while `drain` runs wakes the next
        // round (at worst for nothing) instead of waiting for the one after it.
        ready.clear_ready();
        drain(ready.get_inner_mut());
    }
}
