//! Loading every program of the embedded object into this kernel, through the verifier,
//! attaching nothing and leaving nothing behind: what `redirector doctor` checks.

use std::{fs, path::Path};

use aya::{
    EbpfLoader,
    programs::{SchedClassifier, SkLookup, SockOps, Xdp},
};
use redirector_common::programs;

use super::{EBPF_OBJECT, Error, Result, links::load_program};

/// A program the verifier accepted, and how many instructions it processed to accept it (its
/// paths through the program, what a load costs: the kernel refuses a program past 1,000,000).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Verified {
    pub name: &'static str,
    pub instructions: u32,
}

/// Loads the object, with its maps pinned in a folder of its own under `bpffs` (removed
/// after), and its programs into the kernel; the programs the verifier accepted.
pub fn verify_programs(bpffs: &Path) -> Result<Vec<Verified>> {
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

fn load_all(dir: &Path) -> Result<Vec<Verified>> {
    let mut ebpf = EbpfLoader::new().default_map_pin_directory(dir).load(EBPF_OBJECT).map_err(|e| Error::bpf("loading the eBPF object (maps)", e))?;
    load_program::<SchedClassifier>(&mut ebpf, programs::INGRESS)?;
    load_program::<SchedClassifier>(&mut ebpf, programs::EGRESS)?;
    load_program::<SkLookup>(&mut ebpf, programs::SK_LOOKUP)?;
    load_program::<SockOps>(&mut ebpf, programs::SOCK_OPS)?;
    load_program::<Xdp>(&mut ebpf, programs::XDP)?;
    Ok([programs::INGRESS, programs::EGRESS, programs::SK_LOOKUP, programs::SOCK_OPS, programs::XDP]
        .into_iter()
        .map(|name| {
            // 0 where the kernel does not say (before Linux 5.16).
            let instructions = ebpf.program(name).and_then(|p| p.info().ok()).and_then(|i| i.verified_instruction_count()).unwrap_or(0);
            Verified { name, instructions }
        })
        .collect())
}
