//! Unix sockets that appear with their final mode and owner: bound in a private folder, set
//! up there, then renamed into place, so no one can connect in between (whatever the umask).
//! And how every accept loop of the agent copes with failures.

use std::{
    os::unix::fs::{DirBuilderExt as _, MetadataExt as _, PermissionsExt as _},
    path::Path,
    sync::atomic::{AtomicU64, Ordering},
    time::Duration,
};

use anyhow::Context as _;
use tracing::warn;

/// `accept` failures in a row (out of file descriptors and the like): the loop waits instead
/// of spinning, 100 ms more per failure up to a second, and says so on the first and every
/// 100th.
#[derive(Default)]
pub struct AcceptFailures {
    count: u32,
}

impl AcceptFailures {
    /// A connection was accepted: the next failure is a first one again.
    pub fn reset(&mut self) {
        self.count = 0;
    }

    /// Accepting `what` failed with `e`: logs it if due, then waits.
    pub async fn wait(&mut self, what: &str, e: &std::io::Error) {
        self.count = self.count.saturating_add(1);
        let n = self.count;
        if n == 1 || n.is_multiple_of(100) {
            warn!("accepting {what}: {e} ({n} failure(s) in a row); retrying");
        }
        tokio::time::sleep(Duration::from_millis((100 * u64::from(n)).min(1000))).await;
    }
}

static NEXT: AtomicU64 = AtomicU64::new(0);

/// Binds a Unix stream socket at `path` with `mode` and, if given, owner `(uid, gid)`. A stale
/// socket at `path` is replaced atomically. Its folder is made if missing.
pub fn bind(path: &Path, mode: u32, owner: Option<(u32, u32)>) -> anyhow::Result<std::os::unix::net::UnixListener> {
    let dir = path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or_else(|| Path::new("."));
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    check_folder(dir)?;
    // Short, so that the temporary path is no longer than the final one (sun_path is small).
    let tmp = dir.join(format!(".{}.{}", std::process::id(), NEXT.fetch_add(1, Ordering::Relaxed)));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::DirBuilder::new().mode(0o700).create(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
    let inner = tmp.join("s");
    let r = (|| {
        let l = std::os::unix::net::UnixListener::bind(&inner).with_context(|| format!("binding {}", inner.display()))?;
        std::fs::set_permissions(&inner, std::fs::Permissions::from_mode(mode)).with_context(|| format!("chmod {mode:o} {}", inner.display()))?;
        if let Some((u, g)) = owner {
            std::os::unix::fs::chown(&inner, Some(u), Some(g)).with_context(|| format!("chown {u}:{g} {}", inner.display()))?;
        }
        std::fs::rename(&inner, path).with_context(|| format!("moving the socket into place at {}", path.display()))?;
        Ok(l)
    })();
    let _ = std::fs::remove_file(&inner);
    let _ = std::fs::remove_dir(&tmp);
    r
}

/// A socket's folder must be this process's user's (or root's) and writable by no one else
/// (unless sticky, like /tmp): whoever can write there can replace the socket with their own
/// and hear what applications or operators say to the agent.
fn check_folder(dir: &Path) -> anyhow::Result<()> {
    let md = std::fs::metadata(dir).with_context(|| format!("reading {}", dir.display()))?;
    let me = nix::unistd::geteuid().as_raw();
    if md.uid() != me && md.uid() != 0 {
        anyhow::bail!("{} is owned by uid {}, neither root nor this process's user ({me}): a socket there could be replaced by its owner", dir.display(), md.uid());
    }
    let sticky = md.mode() & 0o1000 != 0;
    if md.mode() & 0o022 != 0 && !sticky {
        anyhow::bail!(
            "{} is writable by group or others (mode {:o}): anyone who can write there could replace the socket; use a folder only root can write (chmod go-w)",
            dir.display(),
            md.mode() & 0o7777
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::MetadataExt as _;

    use super::*;

    #[test]
    fn a_socket_appears_with_its_mode_and_replaces_a_stale_one() {
        let dir = std::env::temp_dir().join(format!("redirector-sock-test-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let path = dir.join("sub/app.sock");
        let first = bind(&path, 0o660, None).unwrap();
        drop(first);
        // A stale socket file stays behind; binding again replaces it.
        let l = bind(&path, 0o600, None).unwrap();
        let m = std::fs::metadata(&path).unwrap();
        assert_eq!(m.mode() & 0o777, 0o600);
        assert!(std::os::unix::net::UnixStream::connect(&path).is_ok(), "the renamed socket accepts connections");
        drop(l);
        let left: Vec<_> = std::fs::read_dir(dir.join("sub")).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(left, vec![std::ffi::OsString::from("app.sock")], "no temporary folder left");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_socket_is_not_bound_in_a_folder_others_can_write() {
        let dir = std::env::temp_dir().join(format!("redirector-sock-open-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o777)).unwrap();
        let e = bind(&dir.join("app.sock"), 0o660, None).unwrap_err();
        assert!(format!("{e:#}").contains("writable by group or others (mode 777)"), "{e:#}");
        // Sticky, like /tmp: others cannot remove or rename what is not theirs.
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o1777)).unwrap();
        assert!(bind(&dir.join("app.sock"), 0o660, None).is_ok());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
