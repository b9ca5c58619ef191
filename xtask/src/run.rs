//! `cargo xtask run [-- ZTD_ARGS...]`: build, then run ztd in the foreground in audit mode with
//! the repository's policies; Ctrl-C stops it and unloads what it attached.

use std::{
    ffi::{OsStr, OsString},
    os::unix::process::ExitStatusExt as _,
    path::PathBuf,
    process::{Command, ExitStatus},
    sync::{
        atomic::{AtomicI32, Ordering},
        Arc,
    },
};

use anyhow::{Context as _, Result};
use nix::{sys::signal, unistd::Pid};

use crate::{
    setup, tasks,
    util::{self, Ctx},
};

const DEFAULT_BPFFS: &str = "/sys/fs/bpf/zt";

/// Whether `--name` occurs among ztd's arguments, and its last value (`--name V` or
/// `--name=V`).
fn flag(args: &[OsString], name: &str) -> (bool, Option<OsString>) {
    let long = format!("--{name}");
    let prefix = format!("--{name}=");
    let mut seen = false;
    let mut value = None;
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let Some(s) = a.to_str() else { continue };
        if s == "--" {
            break;
        }
        if s == long {
            seen = true;
            value = it.next().cloned();
        } else if let Some(v) = s.strip_prefix(&prefix) {
            seen = true;
            value = Some(OsString::from(v));
        }
    }
    (seen, value)
}

fn describe(status: ExitStatus) -> (String, u8) {
    if let Some(code) = status.code() {
        (format!("exit code {code}"), u8::try_from(code).unwrap_or(1))
    } else if let Some(sig) = status.signal() {
        let name = signal::Signal::try_from(sig)
            .map(|s| s.as_str().to_string())
            .unwrap_or_else(|_| sig.to_string());
        (
            format!("killed by {name}"),
            u8::try_from(128 + sig).unwrap_or(1),
        )
    } else {
        (status.to_string(), 1)
    }
}

pub fn run(ctx: &Ctx, ztd_args: Vec<OsString>) -> Result<u8> {
    setup::setup(ctx)?;
    tasks::build(ctx)?;
    util::require_root("cargo xtask run (ztd)")?;
    util::ensure_bpffs()?;

    let bin = ctx.release_dir();
    let ztd = bin.join("ztd");
    let ztctl = bin.join("ztctl");

    let (user_policy, _) = flag(&ztd_args, "policy");
    let (user_mode, mode) = flag(&ztd_args, "mode");
    let (_, cgroup) = flag(&ztd_args, "cgroup");
    let (_, bpffs) = flag(&ztd_args, "bpffs");
    let (_, socket) = flag(&ztd_args, "socket");
    let bpffs = bpffs.map_or_else(|| PathBuf::from(DEFAULT_BPFFS), PathBuf::from);

    let (user_config, _) = flag(&ztd_args, "config");
    let mut cmd = Command::new(&ztd);
    // Never an installed /etc/zt/ztd.toml: its settings (bpffs, xdp, ...) would surprise a
    // development run and its unload. `-- --config PATH` reads one on purpose.
    if !user_config {
        cmd.args(["--config", "/dev/null"]);
    }
    if !user_policy {
        cmd.arg("--policy").arg(ctx.root.join("policies"));
    }
    if !user_mode {
        cmd.args(["--mode", "audit"]);
    }
    cmd.args(&ztd_args);

    let mode = mode.unwrap_or_else(|| OsString::from("audit"));
    let mode = mode.to_string_lossy();
    match &cgroup {
        None => println!(
            "run: ztd runs in {mode} mode on the WHOLE HOST (the cgroup2 root) unless --cgroup is given (`cargo xtask run -- --cgroup <dir> --bpffs <dir> --socket <path>`)"
        ),
        Some(c) => println!(
            "run: ztd runs in {mode} mode on cgroup {}",
            PathBuf::from(c).display()
        ),
    }
    println!(
        "run: Ctrl-C stops ztd and unloads what it attached (ztctl unload --bpffs {})",
        bpffs.display()
    );

    // xtask must outlive SIGINT to unload after ztd. ztd gets the terminal's SIGINT itself
    // (same process group); forwarding it too covers a signal sent to xtask alone, and a
    // second SIGINT is harmless to ztd once it runs.
    let child_pid = Arc::new(AtomicI32::new(0));
    {
        let child_pid = Arc::clone(&child_pid);
        ctrlc::set_handler(move || {
            let pid = child_pid.load(Ordering::SeqCst);
            if pid > 0 {
                eprintln!("run: stopping ztd (pid {pid})");
                let _ = signal::kill(Pid::from_raw(pid), signal::Signal::SIGINT);
            }
        })
        .context("installing the Ctrl-C handler")?;
    }

    println!("$ {}", util::show(&cmd));
    let mut child = cmd
        .spawn()
        .with_context(|| format!("starting {}", ztd.display()))?;
    child_pid.store(i32::try_from(child.id()).unwrap_or(0), Ordering::SeqCst);
    let status = child.wait().context("waiting for ztd");
    child_pid.store(0, Ordering::SeqCst);
    let status = status?;
    let (what, code) = describe(status);
    println!("run: ztd exited ({what})");

    let unloaded = unload(&ztctl, &bpffs, socket.as_deref());
    match (code, unloaded) {
        (_, Ok(())) => Ok(code),
        (0, Err(e)) => Err(e),
        (code, Err(e)) => {
            eprintln!("xtask: error: {e:#}");
            Ok(code)
        }
    }
}

fn unload(ztctl: &std::path::Path, bpffs: &std::path::Path, socket: Option<&OsStr>) -> Result<()> {
    if !bpffs.exists() {
        println!("run: nothing to unload: {} does not exist", bpffs.display());
        return Ok(());
    }
    let mut cmd = Command::new(ztctl);
    if let Some(s) = socket {
        cmd.arg("--socket").arg(s);
    }
    cmd.arg("unload").arg("--bpffs").arg(bpffs);
    println!("run: unloading what ztd attached");
    util::run(&mut cmd)?;
    if bpffs.exists() {
        println!(
            "run: warning: {} still exists after unload",
            bpffs.display()
        );
    } else {
        println!("run: unloaded; {} removed", bpffs.display());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn os(v: &[&str]) -> Vec<OsString> {
        v.iter().map(OsString::from).collect()
    }

    #[test]
    fn flags_are_found_in_both_spellings() {
        let a = os(&["--cgroup", "/c", "--bpffs=/sys/fs/bpf/x", "--log-allowed"]);
        assert_eq!(flag(&a, "cgroup"), (true, Some(OsString::from("/c"))));
        assert_eq!(
            flag(&a, "bpffs"),
            (true, Some(OsString::from("/sys/fs/bpf/x")))
        );
        assert_eq!(flag(&a, "mode"), (false, None));
        assert_eq!(flag(&a, "log"), (false, None));
    }

    #[test]
    fn last_value_wins() {
        let a = os(&["--policy", "a", "--policy", "b"]);
        assert_eq!(flag(&a, "policy"), (true, Some(OsString::from("b"))));
    }
}
