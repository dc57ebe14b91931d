//! Builds the eBPF object with aya-build; `src/datapath` embeds it.
use anyhow::{Context as _, anyhow};

fn main() -> anyhow::Result<()> {
    let metadata = cargo_metadata::MetadataCommand::new().no_deps().exec().context("reading cargo metadata")?;
    let ebpf = metadata.packages.into_iter().find(|p| p.name.as_str() == "redirector-ebpf").ok_or_else(|| anyhow!("redirector-ebpf package not found"))?;
    let root = ebpf.manifest_path.parent().ok_or_else(|| anyhow!("no parent for {}", ebpf.manifest_path))?;
    aya_build::build_ebpf([aya_build::Package { name: ebpf.name.as_str(), root_dir: root.as_str(), ..Default::default() }], aya_build::Toolchain::default())
        .context("building the eBPF programs (run `cargo xtask setup` if bpf-linker or rust-src is missing)")
}
