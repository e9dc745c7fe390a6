//! Builds the kernel programs in `hms-ebpf` for the BPF target with aya-build (nightly,
//! `-Z build-std=core`, bpf-linker) and leaves the object in OUT_DIR, where `redirect` embeds
//! it with `include_bytes_aligned!`. Nothing prebuilt is ever committed.
//!
//! If this fails with "bpf-linker not found" or "can't find crate for core", run
//! `cargo xtask setup`, which installs the nightly rust-src component and bpf-linker.
use anyhow::{Context as _, anyhow};

fn main() -> anyhow::Result<()> {
    let cargo_metadata::Metadata { packages, .. } = cargo_metadata::MetadataCommand::new()
        .no_deps()
        .exec()
        .context("cargo metadata")?;
    let ebpf = packages
        .into_iter()
        .find(|p| p.name.as_str() == "hms-ebpf")
        .ok_or_else(|| anyhow!("hms-ebpf package not found in the workspace"))?;
    let root_dir = ebpf
        .manifest_path
        .parent()
        .ok_or_else(|| anyhow!("no parent for {}", ebpf.manifest_path))?;
    aya_build::build_ebpf(
        [aya_build::Package {
            name: ebpf.name.as_str(),
            root_dir: root_dir.as_str(),
            ..Default::default()
        }],
        aya_build::Toolchain::default(),
    )
    .context("building the eBPF programs (run `cargo xtask setup` if a tool is missing)")
}
