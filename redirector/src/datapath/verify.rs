//! Loading every program of the embedded object into this kernel, through the verifier,
//! attaching nothing and leaving nothing behind: what `redirector doctor` checks.

use std::{fs, path::Path};

use aya::{
    EbpfLoader,
    programs::{ProgramError, SchedClassifier, SkLookup, SockOps},
};
use redirector_common::programs;

use super::{EBPF_OBJECT, Error, Result, links::Loadable};

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
    let mut verified = Vec::new();
    for (name, kind) in [(programs::INGRESS, Kind::Classifier), (programs::EGRESS, Kind::Classifier), (programs::SK_LOOKUP, Kind::SkLookup), (programs::SOCK_OPS, Kind::SockOps)] {
        let program = ebpf.program_mut(name).ok_or_else(|| Error::invalid(format!("eBPF object has no program {name}")))?;
        let loaded = match kind {
            Kind::Classifier => load::<SchedClassifier>(program),
            Kind::SkLookup => load::<SkLookup>(program),
            Kind::SockOps => load::<SockOps>(program),
        };
        loaded.map_err(|e| Error::bpf(format!("loading {name} (verifier)"), e))?;
        verified.push(name);
    }
    Ok(verified)
}

#[derive(Clone, Copy)]
enum Kind {
    Classifier,
    SkLookup,
    SockOps,
}

fn load<P: Loadable>(program: &mut aya::programs::Program) -> std::result::Result<(), ProgramError>
where
    for<'a> &'a mut P: TryFrom<&'a mut aya::programs::Program, Error = ProgramError>,
{
    let p: &mut P = program.try_into()?;
    p.load_into_kernel()
}
