//! Shared helpers: the workspace layout, PATH for child commands, running commands, and the
//! few host checks (root, bpffs) that `test` and `run` need.

use std::{
    ffi::OsString,
    path::{Path, PathBuf},
    process::{Command, ExitStatus, Stdio},
};

use anyhow::{anyhow, bail, Context as _, Result};

/// Where the workspace is and where cargo puts what it builds.
pub struct Ctx {
    pub root: PathBuf,
    pub target_dir: PathBuf,
}

impl Ctx {
    pub fn new() -> Result<Ctx> {
        let root = Path::new(env!("CARGO_MANIFEST_DIR"))
            .parent()
            .ok_or_else(|| anyhow!("xtask has no parent directory"))?
            .to_path_buf();
        let target_dir = target_dir(&root)?;
        Ok(Ctx { root, target_dir })
    }

    /// `target/release`, absolute.
    pub fn release_dir(&self) -> PathBuf {
        self.target_dir.join("release")
    }

    /// Scratch space of xtask itself (`target/xtask`).
    pub fn xtask_dir(&self) -> PathBuf {
        self.target_dir.join("xtask")
    }

    /// A `cargo` command run in the workspace root.
    pub fn cargo(&self) -> Command {
        let mut cmd = Command::new("cargo");
        cmd.current_dir(&self.root);
        cmd
    }
}

/// The target directory as cargo sees it (honours `CARGO_TARGET_DIR` and `build.target-dir`).
fn target_dir(root: &Path) -> Result<PathBuf> {
    let out = Command::new("cargo")
        .args(["metadata", "--format-version", "1", "--no-deps"])
        .current_dir(root)
        .stderr(Stdio::inherit())
        .output()
        .context("running `cargo metadata`")?;
    if !out.status.success() {
        bail!("`cargo metadata` failed ({})", out.status);
    }
    let meta: serde_json::Value =
        serde_json::from_slice(&out.stdout).context("parsing `cargo metadata` output")?;
    let dir = meta
        .get("target_directory")
        .and_then(|v| v.as_str())
        .ok_or_else(|| anyhow!("`cargo metadata` has no target_directory"))?;
    Ok(PathBuf::from(dir))
}

/// `~/.cargo/bin` (or `$CARGO_HOME/bin`).
pub fn cargo_bin_dir() -> Option<PathBuf> {
    if let Some(home) = std::env::var_os("CARGO_HOME").filter(|h| !h.is_empty()) {
        return Some(PathBuf::from(home).join("bin"));
    }
    std::env::var_os("HOME")
        .filter(|h| !h.is_empty())
        .map(|h| PathBuf::from(h).join(".cargo").join("bin"))
}

/// Where `setup` installs bpf-linker instead of cargo's default root (`ZT_BPF_LINKER_ROOT`);
/// used to test the install path without touching `~/.cargo/bin`.
pub fn bpf_linker_root() -> Option<PathBuf> {
    std::env::var_os("ZT_BPF_LINKER_ROOT")
        .filter(|r| !r.is_empty())
        .map(PathBuf::from)
}

/// Put `~/.cargo/bin` (and `$ZT_BPF_LINKER_ROOT/bin`, first) on this process's PATH, so every
/// child — cargo, `cargo +nightly` started by aya-build, and the `bpf-linker` it links with —
/// finds the tools even when the caller's PATH lacks them. Call before starting threads.
pub fn prepare_path() -> Result<()> {
    let current: Vec<PathBuf> = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect())
        .unwrap_or_default();
    let mut front = Vec::new();
    if let Some(root) = bpf_linker_root() {
        front.push(root.join("bin"));
    }
    if let Some(bin) = cargo_bin_dir() {
        if !current.contains(&bin) {
            front.push(bin);
        }
    }
    if front.is_empty() {
        return Ok(());
    }
    let joined: OsString =
        std::env::join_paths(front.into_iter().chain(current)).context("building PATH")?;
    // Edition 2021: `set_var` is safe; we are still single-threaded here.
    std::env::set_var("PATH", joined);
    Ok(())
}

/// A command as a shell-like line, for messages.
pub fn show(cmd: &Command) -> String {
    let mut s = cmd.get_program().to_string_lossy().into_owned();
    for a in cmd.get_args() {
        let a = a.to_string_lossy();
        s.push(' ');
        if a.is_empty() || a.contains([' ', '"', '\'', '$', '*', '?']) {
            s.push_str(&format!("'{a}'"));
        } else {
            s.push_str(&a);
        }
    }
    s
}

/// Run a command with inherited stdio, echoing it first; error if it does not succeed.
pub fn run(cmd: &mut Command) -> Result<()> {
    let line = show(cmd);
    println!("$ {line}");
    let status = cmd
        .status()
        .with_context(|| format!("could not start `{line}`"))?;
    check(status, &line)
}

pub fn check(status: ExitStatus, line: &str) -> Result<()> {
    if status.success() {
        Ok(())
    } else {
        bail!("`{line}` failed ({status})")
    }
}

pub fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

pub fn require_root(what: &str) -> Result<()> {
    if is_root() {
        Ok(())
    } else {
        bail!(
            "{what} needs root (CAP_BPF, CAP_SYS_ADMIN, CAP_NET_ADMIN: cgroups, bpffs, network namespaces); run it as root, e.g. `sudo -E env PATH=$PATH cargo xtask ...`"
        )
    }
}

pub const BPFFS: &str = "/sys/fs/bpf";

fn bpffs_mounted() -> Result<bool> {
    let text =
        std::fs::read_to_string("/proc/self/mountinfo").context("reading /proc/self/mountinfo")?;
    Ok(text.lines().any(|line| {
        let Some((left, right)) = line.split_once(" - ") else {
            return false;
        };
        right.split_whitespace().next() == Some("bpf")
            && left.split_whitespace().nth(4) == Some(BPFFS)
    }))
}

/// Mount a bpf filesystem at /sys/fs/bpf unless one is there (`mount -t bpf bpf /sys/fs/bpf`).
pub fn ensure_bpffs() -> Result<()> {
    if bpffs_mounted()? {
        return Ok(());
    }
    std::fs::create_dir_all(BPFFS).with_context(|| format!("creating {BPFFS}"))?;
    nix::mount::mount(
        Some("bpf"),
        BPFFS,
        Some("bpf"),
        nix::mount::MsFlags::empty(),
        None::<&str>,
    )
    .with_context(|| format!("mount -t bpf bpf {BPFFS}"))?;
    println!("xtask: mounted bpffs at {BPFFS}");
    Ok(())
}

/// Like [`run`], but stdout goes through xtask line by line (printed unchanged) so that the
/// caller can read it, e.g. to count cargo test's results.
pub fn run_tee(cmd: &mut Command, mut on_line: impl FnMut(&str)) -> Result<()> {
    use std::io::{BufRead as _, BufReader, Write as _};

    let line = show(cmd);
    println!("$ {line}");
    let mut child = cmd
        .stdout(Stdio::piped())
        .spawn()
        .with_context(|| format!("could not start `{line}`"))?;
    if let Some(out) = child.stdout.take() {
        let mut reader = BufReader::new(out);
        let mut buf = Vec::new();
        let stdout = std::io::stdout();
        loop {
            buf.clear();
            match reader.read_until(b'\n', &mut buf) {
                Ok(0) => break,
                Ok(_) => {
                    let mut lock = stdout.lock();
                    let _ = lock.write_all(&buf);
                    let _ = lock.flush();
                    drop(lock);
                    on_line(&String::from_utf8_lossy(&buf));
                }
                Err(e) => {
                    eprintln!("xtask: reading the output of `{line}`: {e}");
                    break;
                }
            }
        }
    }
    let status = child
        .wait()
        .with_context(|| format!("waiting for `{line}`"))?;
    check(status, &line)
}
