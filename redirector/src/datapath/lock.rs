//! The instance lock: an exclusive `flock` on the instance directory, so the agent and an
//! operator's commands never interleave their updates. Taken with a deadline: a process that
//! holds it and never lets go (anyone who can open the directory can `flock` it) makes this
//! one fail with a clear error instead of hanging.

use std::{
    fs, io,
    os::fd::AsRawFd as _,
    path::Path,
    time::{Duration, Instant},
};

use super::{Error, Result};

/// How long a process waits for the instance lock. Every update under it takes milliseconds;
/// opening an instance (loading the programs) takes well under a second.
pub const LOCK_WAIT: Duration = Duration::from_secs(10);

/// The lock, released on drop.
pub struct Lock {
    _dir: fs::File,
}

impl Lock {
    /// Locks `dir`, waiting up to `wait` for whoever holds it.
    pub fn take(dir: &Path, wait: Duration) -> Result<Self> {
        let f = fs::File::open(dir).map_err(|e| Error::io(format!("opening {} to lock it", dir.display()), e))?;
        let deadline = Instant::now() + wait;
        loop {
            // SAFETY: flock on a file descriptor we own.
            if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0 {
                return Ok(Self { _dir: f });
            }
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::WouldBlock && e.raw_os_error() != Some(libc::EINTR) {
                return Err(Error::io(format!("locking {}", dir.display()), e));
            }
            if Instant::now() >= deadline {
                return Err(Error::io(
                    format!("locking {}: another process has held its lock for over {} s (see who: fuser -v {})", dir.display(), wait.as_secs_f32(), dir.display()),
                    io::Error::from(io::ErrorKind::TimedOut),
                ));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_lock_held_elsewhere_fails_in_time_and_is_taken_once_let_go() {
        let dir = std::env::temp_dir().join(format!("redirector-lock-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let other = fs::File::open(&dir).unwrap();
        // SAFETY: flock on a file descriptor we own.
        assert_eq!(unsafe { libc::flock(other.as_raw_fd(), libc::LOCK_EX) }, 0);
        let t0 = Instant::now();
        let e = Lock::take(&dir, Duration::from_millis(300)).err().expect("held elsewhere");
        assert!(t0.elapsed() < Duration::from_secs(2), "it gave up in time: {:?}", t0.elapsed());
        assert!(e.to_string().contains("another process has held its lock"), "{e}");
        drop(other);
        let held = Lock::take(&dir, Duration::from_millis(300)).expect("free again");
        drop(held);
        fs::remove_dir_all(&dir).unwrap();
    }
}
