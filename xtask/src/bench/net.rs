//! Network namespaces, veth pairs and nftables rulesets for the bench — always inside
//! namespaces made for the run (`zt-bench-<pid>-<label>`), never in the main one — and the
//! Debian tools the comparisons need.
//!
//! Commands run in a namespace through `nsenter --net=/run/netns/NAME`, not `ip netns exec`:
//! the latter remounts /sys, which hides bpffs (xdp-filter pins there) and the cgroup tree
//! (nft resolves `socket cgroupv2` paths under /sys/fs/cgroup).

use std::{
    path::{Path, PathBuf},
    process::{Command, Output, Stdio},
    time::{Duration, Instant},
};

use anyhow::{ensure, Context as _, Result};

use crate::util;

/// (command, Debian package) pairs the comparisons use.
const TOOLS: &[(&str, &str)] = &[
    ("nft", "nftables"),
    ("xdp-filter", "xdp-tools"),
    ("trafgen", "netsniff-ng"),
];

/// Whether `cmd` is on PATH.
pub fn have(cmd: &str) -> bool {
    std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join(cmd).is_file()))
        .unwrap_or(false)
}

/// Install the missing tools with apt-get (root only); a failure is reported, not fatal:
/// the rows that need the tool say they were skipped.
pub fn ensure_tools() {
    let missing: Vec<&str> = TOOLS
        .iter()
        .filter(|(cmd, _)| !have(cmd))
        .map(|(_, pkg)| *pkg)
        .collect();
    if missing.is_empty() || !nix::unistd::Uid::effective().is_root() {
        return;
    }
    println!("bench: installing {} (apt-get)", missing.join(" "));
    let install = || {
        Command::new("apt-get")
            .args(["install", "-y", "-qq", "--no-install-recommends"])
            .args(&missing)
            .env("DEBIAN_FRONTEND", "noninteractive")
            .stdin(Stdio::null())
            .status()
            .map(|s| s.success())
            .unwrap_or(false)
    };
    if !install() {
        // The package lists may be missing or stale (a fresh machine): update once, retry.
        let _ = Command::new("apt-get")
            .args(["update", "-qq"])
            .stdin(Stdio::null())
            .status();
        let ok = install();
        if !ok {
            println!(
                "bench: warning: could not install {}: the rows that need them are skipped",
                missing.join(" ")
            );
        }
    }
}

/// Run `cmd`; its output, or an error with its stderr.
pub fn output(cmd: &mut Command) -> Result<Output> {
    let line = util::show(cmd);
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("running `{line}`"))?;
    ensure!(
        out.status.success(),
        "`{line}` failed ({}): {}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout).trim(),
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(out)
}

/// A network namespace made for this run; deleted on drop (with everything in it: veths,
/// nft tables, XDP programs attached there).
pub struct Netns {
    pub name: String,
}

impl Netns {
    pub fn new(tag: &str, label: &str) -> Result<Netns> {
        let name = format!("{tag}-{label}");
        ensure!(
            !Path::new("/run/netns").join(&name).exists(),
            "network namespace {name} exists already"
        );
        output(Command::new("ip").args(["netns", "add", &name]))?;
        let ns = Netns { name };
        ns.cmd("ip", &["link", "set", "lo", "up"])?;
        Ok(ns)
    }

    pub fn path(&self) -> PathBuf {
        Path::new("/run/netns").join(&self.name)
    }

    /// A command that runs inside the namespace.
    pub fn command(&self, program: &str) -> Command {
        let mut c = Command::new("nsenter");
        c.arg(format!("--net={}", self.path().display()))
            .arg("--")
            .arg(program);
        c
    }

    /// Run `program args` inside the namespace; its stdout.
    pub fn cmd(&self, program: &str, args: &[&str]) -> Result<String> {
        super::interrupted()?;
        let out = output(self.command(program).args(args))?;
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// `sysctl -w` inside the namespace (per-namespace keys only).
    pub fn sysctl(&self, key: &str, value: &str) -> Result<()> {
        self.cmd("sysctl", &["-qw", &format!("{key}={value}")])
            .map(|_| ())
    }

    /// `nft -f FILE` inside the namespace; the wall time it took.
    pub fn nft_file(&self, file: &Path) -> Result<Duration> {
        super::interrupted()?;
        let t = Instant::now();
        output(self.command("nft").arg("-f").arg(file))?;
        Ok(t.elapsed())
    }

    /// A field of `/proc/net/snmp` in this namespace (e.g. `Udp`, `NoPorts`).
    pub fn snmp(&self, proto: &str, field: &str) -> Result<u64> {
        let text = self.cmd("cat", &["/proc/net/snmp"])?;
        let prefix = format!("{proto}:");
        let mut lines = text.lines().filter(|l| l.starts_with(&prefix));
        let (Some(names), Some(values)) = (lines.next(), lines.next()) else {
            anyhow::bail!("no {proto} lines in /proc/net/snmp");
        };
        names
            .split_whitespace()
            .zip(values.split_whitespace())
            .find(|(n, _)| *n == field)
            .and_then(|(_, v)| v.parse().ok())
            .with_context(|| format!("no {proto} {field} in /proc/net/snmp"))
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let ok = Command::new("ip")
            .args(["netns", "del", &self.name])
            .stdin(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
        if !ok && self.path().exists() {
            eprintln!(
                "bench: warning: could not delete network namespace {}",
                self.name
            );
        }
    }
}

/// A veth pair between two namespaces of the run, addressed 10.254.0.1/30 (a) and
/// 10.254.0.2/30 (b), both up.
pub fn veth(a: &Netns, a_if: &str, b: &Netns, b_if: &str) -> Result<()> {
    output(Command::new("ip").args([
        "-n", &a.name, "link", "add", a_if, "type", "veth", "peer", "name", b_if, "netns", &b.name,
    ]))?;
    a.cmd("ip", &["addr", "add", "10.254.0.1/30", "dev", a_if])?;
    b.cmd("ip", &["addr", "add", "10.254.0.2/30", "dev", b_if])?;
    a.cmd("ip", &["link", "set", a_if, "up"])?;
    b.cmd("ip", &["link", "set", b_if, "up"])?;
    Ok(())
}

/// A cgroup's path for nft's `socket cgroupv2` (relative to /sys/fs/cgroup, where nft looks)
/// and its level (depth below the cgroup2 root).
pub fn nft_cgroup(cgroup2_root: &Path, cgroup: &Path) -> Option<(String, usize)> {
    let rel = cgroup.strip_prefix("/sys/fs/cgroup").ok()?;
    let level = cgroup.strip_prefix(cgroup2_root).ok()?.components().count();
    Some((rel.display().to_string(), level))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nft_cgroup_paths_are_relative_to_sys_fs_cgroup() {
        let root = Path::new("/sys/fs/cgroup/unified");
        assert_eq!(
            nft_cgroup(
                root,
                Path::new("/sys/fs/cgroup/unified/zt-bench-1/egress-nft")
            ),
            Some(("unified/zt-bench-1/egress-nft".to_string(), 2))
        );
        assert_eq!(
            nft_cgroup(Path::new("/sys/fs/cgroup"), Path::new("/sys/fs/cgroup/a")),
            Some(("a".to_string(), 1))
        );
        assert_eq!(nft_cgroup(Path::new("/cg"), Path::new("/cg/a")), None);
    }
}
