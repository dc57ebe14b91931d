//! Loading every program of the embedded object into this kernel, through the verifier,
//! attaching nothing and leaving nothing behind: what `redirector doctor` checks.

use std::{fs, path::Path};

use aya::{
    EbpfLoader,
    programs::{SchedClassifier, SkLookup, SockOps, Xdp},
};
use redirector_common::programs;

use super::{EBPF_OBJECT, Error, Result, links::load_program};

/// Loads the object, with its maps pinned in a folder of its own under `bpffs` (removed
/// after), and its programs into the kernel; the names of the programs the verifier accepted.
pub fn verify_programs(bpffs: &Path) -> Result<Vec<&'static str>> {
    let dir = bpffs.join("redirector").join(format!("doctor-{}", std::process::id()));
    fs::create_dir_all(&dir).map_err(|e| Error::io(format!("creating {}", dir.display()), e))?;
    let result = load_all(&dir);
    let _ = fs::remove_dir_all(&dir);
    // The instances' parent folder too, if this made it and nothing else is in it.
    if let Some(parent) = dir.parent() {
        let _ = fs::remove_dir(parent);
    }
    result
}

fn load_all(dir: &Path) -> Result<Vec<&'static str>> {
    let mut ebpf = EbpfLoader::new().default_map_pin_directory(dir).load(EBPF_OBJECT).map_err(|e| Error::bpf("loading the eBPF object (maps)", e))?;
    load_program::<SchedClassifier>(&mut ebpf, programs::INGRESS)?;
    load_program::<SchedClassifier>(&mut ebpf, programs::EGRESS)?;
    load_program::<SkLookup>(&mut ebpf, programs::SK_LOOKUP)?;
    load_program::<SockOps>(&mut ebpf, programs::SOCK_OPS)?;
    load_program::<Xdp>(&mut ebpf, programs::XDP)?;
    Ok(vec![programs::INGRESS, programs::EGRESS, programs::SK_LOOKUP, programs::SOCK_OPS, programs::XDP])
}
