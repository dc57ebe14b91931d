//! The bpffs the pins live in.

use std::{fs, path::Path};

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
