//! The bpffs the pins live in.

use std::{
    fs,
    os::unix::fs::{DirBuilderExt as _, MetadataExt as _, PermissionsExt as _},
    path::Path,
};

use nix::{
    mount::{MsFlags, mount},
    sys::statfs::{BPF_FS_MAGIC, statfs},
};

use super::{Error, Result};

/// Mounts a bpffs at `path` unless one is there already.
pub fn ensure_mounted(path: &Path) -> Result<()> {
    fs::create_dir_all(path).map_err(|e| Error::io(format!("creating {}", path.display()), e))?;
    let st = statfs(path).map_err(|e| Error::io(format!("statfs {}", path.display()), e.into()))?;
    if st.filesystem_type() == BPF_FS_MAGIC {
        return Ok(());
    }
    mount(Some("bpf"), path, Some("bpf"), MsFlags::empty(), Some("mode=0700"))
        .map_err(|e| Error::KernelFeature { what: format!("cannot mount a bpffs at {}", path.display()), source: Some(Box::new(std::io::Error::from(e))) })
}

/// Makes `dir` (and its missing parents below an existing folder) a folder only root can
/// enter: mode 0700, owned by this process's user. A folder there already with a wider mode
/// is narrowed; one owned by another user is refused (whoever owns it could replace the
/// pins, and with them the rules).
pub fn private_dir(dir: &Path) -> Result<()> {
    fs::DirBuilder::new().recursive(true).mode(0o700).create(dir).map_err(|e| Error::io(format!("creating {}", dir.display()), e))?;
    let md = fs::metadata(dir).map_err(|e| Error::io(format!("reading {}", dir.display()), e))?;
    let me = nix::unistd::geteuid().as_raw();
    if md.uid() != me {
        return Err(Error::invalid(format!("{} is owned by uid {}, not by this process's user ({me}): remove it or chown it", dir.display(), md.uid())));
    }
    if md.mode() & 0o077 != 0 {
        fs::set_permissions(dir, fs::Permissions::from_mode(0o700)).map_err(|e| Error::io(format!("chmod 700 {}", dir.display()), e))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn instance_folders_are_made_private_and_someone_elses_are_refused() {
        let base = std::env::temp_dir().join(format!("redirector-private-{}", std::process::id()));
        let dir = base.join("redirector").join("inst");
        private_dir(&dir).unwrap();
        assert_eq!(fs::metadata(&dir).unwrap().mode() & 0o777, 0o700);
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o777)).unwrap();
        private_dir(&dir).unwrap();
        assert_eq!(fs::metadata(&dir).unwrap().mode() & 0o777, 0o700, "narrowed");
        if nix::unistd::geteuid().is_root() {
            std::os::unix::fs::chown(&dir, Some(65534), None).unwrap();
            let e = private_dir(&dir).unwrap_err().to_string();
            assert!(e.contains("owned by uid 65534"), "{e}");
        }
        fs::remove_dir_all(&base).unwrap();
    }
}
