//! Builds the eBPF programs of `zt-ebpf` with the nightly toolchain (aya-build) and embeds
//! the object in the binaries (`include_bytes_aligned!(concat!(env!("OUT_DIR"), "/zt"))`).

use anyhow::{anyhow, Context as _};
use aya_build::Toolchain;

fn main() -> anyhow::Result<()> {
    let metadata = cargo_metadata::MetadataCommand::new()
        .no_deps()
        .exec()
        .context("cargo metadata")?;
    let ebpf = metadata
        .packages
        .into_iter()
        .find(|p| p.name.as_str() == "zt-ebpf")
        .ok_or_else(|| anyhow!("zt-ebpf package not found in the workspace"))?;
    let root_dir = ebpf
        .manifest_path
        .parent()
        .ok_or_else(|| anyhow!("zt-ebpf manifest has no parent directory"))?;
    // zt-common is shared with the eBPF crate: rebuild when it changes.
    println!(
        "cargo:rerun-if-changed={}",
        root_dir.join("../zt-common/src")
    );
    aya_build::build_ebpf(
        [aya_build::Package {
            name: ebpf.name.as_str(),
            root_dir: root_dir.as_str(),
            ..Default::default()
        }],
        Toolchain::Nightly,
    )
}
