//! `cargo xtask setup`: idempotent bootstrap of the eBPF toolchain.
//!
//! 1. the nightly toolchain (`$ZT_NIGHTLY`, default `nightly`) must exist: rustup will not
//!    install it here (`RUSTUP_AUTO_INSTALL=0`), so its absence is an error saying what to run;
//! 2. `rust-src` for it (aya-build builds with `-Z build-std=core`);
//! 3. `bpf-linker`, built with `cargo install` against the libLLVM that ships inside the nightly
//!    toolchain (no system LLVM needed). `$ZT_BPF_LINKER_ROOT` installs into another root
//!    (`cargo install --root`), to test this path without touching `~/.cargo/bin`.
//!
//! Note: `ZT_NIGHTLY` only changes what setup checks and builds bpf-linker against;
//! zt-userspace/build.rs builds the eBPF crate with the toolchain named `nightly`.

use std::{
    fs,
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use anyhow::{anyhow, bail, Context as _, Result};

use crate::util::{self, Ctx};

const BPF_LINKER_VERSION: &str = "0.13.0";

/// Collects one line per step; while nothing had to be done the "present" lines are held
/// back, so that an up-to-date machine prints the single "nothing to do" line.
struct Report {
    held: Vec<String>,
    acted: bool,
}

impl Report {
    fn present(&mut self, what: String) {
        if self.acted {
            println!("setup: {what}: present");
        } else {
            self.held.push(what);
        }
    }

    /// Print a line about something being done (flushing what was held back).
    fn act(&mut self, line: &str) {
        if !self.acted {
            self.acted = true;
            for what in self.held.drain(..) {
                println!("setup: {what}: present");
            }
        }
        println!("setup: {line}");
    }
}

pub fn nightly_name() -> String {
    std::env::var("ZT_NIGHTLY")
        .ok()
        .filter(|n| !n.is_empty())
        .unwrap_or_else(|| "nightly".to_string())
}

struct Nightly {
    name: String,
    release: String,
    llvm_version: String,
    llvm_major: u32,
    sysroot: PathBuf,
}

pub fn setup(ctx: &Ctx) -> Result<()> {
    let mut report = Report {
        held: Vec::new(),
        acted: false,
    };

    // 1. nightly
    let nightly = find_nightly(&nightly_name())?;
    report.present(format!(
        "toolchain {} (rustc {}, LLVM {})",
        nightly.name, nightly.release, nightly.llvm_version
    ));

    // 2. rust-src
    if has_rust_src(&nightly.name)? {
        report.present(format!("rust-src for {}", nightly.name));
    } else {
        report.act(&format!(
            "rust-src missing for {}: rustup component add rust-src --toolchain {}",
            nightly.name, nightly.name
        ));
        let mut cmd = Command::new("rustup");
        cmd.args(["component", "add", "rust-src", "--toolchain", &nightly.name]);
        let out = cmd.output().context("running rustup")?;
        if !out.status.success() {
            bail!("`{}` failed: {}", util::show(&cmd), first_line(&out.stderr));
        }
        if !has_rust_src(&nightly.name)? {
            bail!(
                "rust-src is still not installed for {} after adding it",
                nightly.name
            );
        }
    }

    // 3. bpf-linker
    match probe_bpf_linker(&nightly) {
        Linker::Works {
            path,
            version,
            note,
        } => {
            report.present(format!("{version} at {}{note}", path.display()));
        }
        Linker::Broken { path, why } => {
            report.act(&format!(
                "bpf-linker at {} does not run ({why}): rebuilding it",
                path.display()
            ));
            install_bpf_linker(ctx, &nightly, true)?;
            report.act(&verify_installed(&nightly)?);
        }
        Linker::Missing => {
            report.act(&format!(
                "bpf-linker missing: building bpf-linker {BPF_LINKER_VERSION} against the LLVM {} of {} (takes a few minutes)",
                nightly.llvm_major, nightly.name
            ));
            install_bpf_linker(ctx, &nightly, false)?;
            report.act(&verify_installed(&nightly)?);
        }
    }

    if report.acted {
        println!("setup: done");
    } else {
        println!("setup: nothing to do: {} present", report.held.join(", "));
    }
    Ok(())
}

fn first_line(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes)
        .lines()
        .map(str::trim)
        .find(|l| !l.is_empty())
        .unwrap_or("no output")
        .to_string()
}

fn find_nightly(name: &str) -> Result<Nightly> {
    let install = format!("rustup toolchain install {name} --component rust-src");
    let out = match Command::new("rustc")
        .arg(format!("+{name}"))
        .arg("-vV")
        .stdin(Stdio::null())
        .output()
    {
        Ok(out) => out,
        Err(e) => {
            bail!("rustc not found ({e}): install rustup (https://rustup.rs), then `{install}`")
        }
    };
    if !out.status.success() {
        bail!("the `{name}` Rust toolchain is not installed (needed for the eBPF programs): run `{install}`");
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let field = |key: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(key))
            .map(|v| v.trim().to_string())
    };
    let release = field("release:").unwrap_or_else(|| "?".to_string());
    let llvm_version = field("LLVM version:")
        .ok_or_else(|| anyhow!("`rustc +{name} -vV` reports no LLVM version"))?;
    let llvm_major: u32 = llvm_version
        .split('.')
        .next()
        .and_then(|m| m.parse().ok())
        .ok_or_else(|| anyhow!("cannot parse LLVM version {llvm_version:?} of `{name}`"))?;

    let out = Command::new("rustc")
        .arg(format!("+{name}"))
        .args(["--print", "sysroot"])
        .output()
        .context("rustc --print sysroot")?;
    if !out.status.success() {
        bail!(
            "`rustc +{name} --print sysroot` failed: {}",
            first_line(&out.stderr)
        );
    }
    let sysroot = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
    Ok(Nightly {
        name: name.to_string(),
        release,
        llvm_version,
        llvm_major,
        sysroot,
    })
}

fn has_rust_src(toolchain: &str) -> Result<bool> {
    let out = Command::new("rustup")
        .args(["component", "list", "--toolchain", toolchain, "--installed"])
        .output()
        .context("running `rustup component list`")?;
    if !out.status.success() {
        bail!(
            "`rustup component list --toolchain {toolchain} --installed` failed: {}",
            first_line(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .any(|l| l.trim() == "rust-src" || l.trim().starts_with("rust-src-")))
}

enum Linker {
    Works {
        path: PathBuf,
        version: String,
        note: String,
    },
    Broken {
        path: PathBuf,
        why: String,
    },
    Missing,
}

/// Where bpf-linker is (or would be): `$ZT_BPF_LINKER_ROOT/bin` if set, else the first on PATH
/// (which `util::prepare_path` made include `~/.cargo/bin`).
fn locate_bpf_linker() -> Option<PathBuf> {
    if let Some(root) = util::bpf_linker_root() {
        let p = root.join("bin").join("bpf-linker");
        return p.is_file().then_some(p);
    }
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join("bpf-linker"))
        .find(|p| p.is_file())
}

/// `bpf-linker --version`, optionally with the nightly toolchain's lib dir on
/// LD_LIBRARY_PATH — which is how `cargo +nightly` (a rustup proxy) runs it during the build.
fn linker_version(path: &Path, nightly_lib: Option<&Path>) -> Result<String, String> {
    let mut cmd = Command::new(path);
    cmd.arg("--version").stdin(Stdio::null());
    if let Some(lib) = nightly_lib {
        let mut dirs = vec![lib.to_path_buf()];
        if let Some(old) = std::env::var_os("LD_LIBRARY_PATH") {
            dirs.extend(std::env::split_paths(&old));
        }
        if let Ok(joined) = std::env::join_paths(dirs) {
            cmd.env("LD_LIBRARY_PATH", joined);
        }
    }
    match cmd.output() {
        Ok(out) if out.status.success() => Ok(first_line(&out.stdout)),
        Ok(out) => Err(first_line(&out.stderr)),
        Err(e) => Err(e.to_string()),
    }
}

fn probe_bpf_linker(nightly: &Nightly) -> Linker {
    let Some(path) = locate_bpf_linker() else {
        return Linker::Missing;
    };
    match linker_version(&path, None) {
        Ok(version) => Linker::Works {
            path,
            version,
            note: String::new(),
        },
        Err(plain) => match linker_version(&path, Some(&nightly.sysroot.join("lib"))) {
            // An older install whose rpath points at a vanished prefix still works under
            // `cargo +nightly`, which puts the toolchain's lib dir on LD_LIBRARY_PATH.
            Ok(version) => Linker::Works {
                version,
                path,
                note: format!(" (runs with {}'s libLLVM)", nightly.name),
            },
            Err(_) => Linker::Broken { path, why: plain },
        },
    }
}

/// The one `libLLVM.so.*` in the toolchain's lib dir (not `libLLVM-NN-rust-*.so`).
fn find_libllvm(nightly: &Nightly) -> Result<PathBuf> {
    let lib = nightly.sysroot.join("lib");
    let mut found: Vec<PathBuf> = fs::read_dir(&lib)
        .with_context(|| format!("reading {}", lib.display()))?
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().starts_with("libLLVM.so."))
        .map(|e| e.path())
        .collect();
    match found.len() {
        1 => Ok(found.remove(0)),
        0 => bail!(
            "no libLLVM.so.* in {} (the {} toolchain should ship one)",
            lib.display(),
            nightly.name
        ),
        _ => bail!("several libLLVM.so.* in {}: {:?}", lib.display(), found),
    }
}

fn install_bpf_linker(ctx: &Ctx, nightly: &Nightly, force: bool) -> Result<()> {
    let libllvm = find_libllvm(nightly)?;
    // bpf-linker's build script wants `$LLVM_PREFIX/lib/libLLVM.so`.
    let prefix = ctx.xtask_dir().join("llvm-prefix");
    let prefix_lib = prefix.join("lib");
    fs::create_dir_all(&prefix_lib)
        .with_context(|| format!("creating {}", prefix_lib.display()))?;
    let link = prefix_lib.join("libLLVM.so");
    if fs::symlink_metadata(&link).is_ok() {
        fs::remove_file(&link).with_context(|| format!("removing {}", link.display()))?;
    }
    std::os::unix::fs::symlink(&libllvm, &link)
        .with_context(|| format!("linking {} -> {}", link.display(), libllvm.display()))?;

    // The build script puts `$LLVM_PREFIX/lib` in the rpath, but that directory has only
    // `libLLVM.so`, not the soname the binary asks for, and `target/` may be cleaned: also
    // put the toolchain's own lib dir in the rpath, so the binary runs on its own.
    let mut rustflags = std::env::var("RUSTFLAGS").unwrap_or_default();
    if !rustflags.is_empty() {
        rustflags.push(' ');
    }
    rustflags.push_str(&format!(
        "-C link-arg=-Wl,-rpath,{}",
        nightly.sysroot.join("lib").display()
    ));

    let log = ctx.xtask_dir().join("bpf-linker-install.log");
    let feature = format!("llvm-{}", nightly.llvm_major);
    let mut last_err = None;
    for locked in [true, false] {
        let mut cmd = Command::new("cargo");
        cmd.args(["install", "bpf-linker", "--version", BPF_LINKER_VERSION]);
        if locked {
            cmd.arg("--locked");
        }
        cmd.args(["--no-default-features", "--features", &feature]);
        if force {
            cmd.arg("--force");
        }
        if let Some(root) = util::bpf_linker_root() {
            cmd.arg("--root").arg(root);
        }
        cmd.env("LLVM_PREFIX", &prefix)
            .env("RUSTFLAGS", &rustflags)
            .env_remove("CARGO_ENCODED_RUSTFLAGS")
            .env_remove("CARGO_TARGET_DIR")
            .current_dir(ctx.xtask_dir())
            .stdin(Stdio::null());
        let line = format!(
            "LLVM_PREFIX={} RUSTFLAGS='{rustflags}' {}",
            prefix.display(),
            util::show(&cmd)
        );
        let file = fs::File::create(&log).with_context(|| format!("creating {}", log.display()))?;
        let file2 = file.try_clone().context("cloning log file handle")?;
        cmd.stdout(file).stderr(file2);
        println!("setup: $ {line}  (log: {})", log.display());
        let status = cmd
            .status()
            .with_context(|| format!("could not start `{line}`"))?;
        if status.success() {
            return Ok(());
        }
        let tail = fs::read_to_string(&log).unwrap_or_default();
        let tail: Vec<&str> = tail.lines().rev().take(15).collect();
        eprintln!(
            "setup: `{line}` failed ({status}); last lines of {}:",
            log.display()
        );
        for l in tail.iter().rev() {
            eprintln!("    {l}");
        }
        last_err = Some(anyhow!("`{line}` failed ({status}); see {}", log.display()));
        if locked {
            println!("setup: retrying without --locked");
        }
    }
    Err(last_err.unwrap_or_else(|| anyhow!("installing bpf-linker failed")))
}

fn verify_installed(nightly: &Nightly) -> Result<String> {
    let path = locate_bpf_linker().ok_or_else(|| {
        anyhow!("bpf-linker was installed but is not found (PATH or $ZT_BPF_LINKER_ROOT/bin)")
    })?;
    let version = linker_version(&path, None)
        .map_err(|e| anyhow!("the freshly built {} does not run: {e}", path.display()))?;
    Ok(format!(
        "installed {version} at {} (LLVM {} from {})",
        path.display(),
        nightly.llvm_major,
        nightly.name
    ))
}
