//! `cargo xtask vm-test --suite systemd`: the Debian package under a real systemd.
//!
//! The unit and the maintainer scripts are what users run, and nothing else exercises them:
//! `systemd-analyze verify` reads the unit but starts nothing. This builds a Debian 12 root
//! from Debian's own packages with `mmdebstrap` (cached under `target/vm/systemd/`), packs
//! it as an initramfs together with `target/debian/zt_*.deb` and `systemd-check.sh`, and
//! boots it with systemd as PID 1 (`rdinit=/lib/systemd/systemd`). A oneshot unit in
//! `multi-user.target.wants` runs the checks with its output on the serial console, then
//! powers off. The guest has no network: the package's dependencies are in the root.
//!
//! Each check prints `ZT-CHECK: PASS|FAIL NAME`; the suite passes only when every name in
//! [`CHECKS`] passed (a check that never ran fails it too).

use std::{
    io::Write as _,
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{anyhow, bail, Context as _, Result};

use super::{boot, cpio, ensure_tool, resolve_kernel, Opts};
use crate::{
    install, setup,
    util::{self, Ctx},
};

/// Debian packages of the guest's root beyond `minbase`: systemd as init, the bus systemctl
/// talks over, what zt's package depends on, and bpftool (the checks read the programs
/// attached to the root cgroup with it).
const PACKAGES: &[&str] = &[
    "systemd",
    "systemd-sysv",
    "dbus",
    "iproute2",
    "bpftool",
    "libgcc-s1",
];

/// The Debian release of the root.
const SUITE: &str = "bookworm";

/// Every check `systemd-check.sh` makes, in order.
const CHECKS: &[&str] = &[
    "install",
    "install-starts-nothing",
    "enable-now",
    "audit-default",
    "reload-valid",
    "reload-invalid",
    "reload-restore",
    "tamper-journal",
    "tamper-repaired",
    "stop",
    "stop-keeps",
    "restart-adopts",
    "remove-unloads",
    "purge-leaves-nothing",
];

const CHECK_SCRIPT: &str = include_str!("systemd-check.sh");

const CHECK_UNIT: &str = "[Unit]
Description=zt systemd suite (cargo xtask vm-test --suite systemd)
After=multi-user.target

[Service]
Type=oneshot
ExecStart=/zt/check.sh
StandardOutput=tty
StandardError=tty
TTYPath=/dev/ttyS0
TimeoutStartSec=infinity
";

const EXPOSURE: &str = "ZT-SD-EXPOSURE: ";

pub fn vm_test(ctx: &Ctx, opts: &Opts) -> Result<()> {
    let started = Instant::now();
    let qemu = ensure_tool("qemu-system-x86_64", "qemu-system-x86")?;
    let cpio_tool = ensure_tool("cpio", "cpio")?;
    let mmdebstrap = ensure_tool("mmdebstrap", "mmdebstrap")?;
    let dir = ctx.target_dir.join("vm").join("systemd");
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let kernel = resolve_kernel(ctx, &opts.kernel)?;
    println!(
        "vm-test: kernel {} ({})",
        kernel.release,
        kernel.vmlinuz.display()
    );
    if !opts.no_build {
        setup::setup(ctx)?;
        install::build_release(ctx)?;
    }
    let deb = install::deb(ctx)?;
    let root = debian_root(&dir, &mmdebstrap, &cpio_tool)?;

    // The cached root, then what this run adds: the kernel unpacks archives one after the
    // other, later entries over earlier ones.
    let mut t = cpio::Tree::default();
    let deb_name = deb
        .file_name()
        .and_then(|n| n.to_str())
        .ok_or_else(|| anyhow!("{}: no file name", deb.display()))?;
    t.file(&format!("/zt/{deb_name}"), &deb)?;
    t.data("/zt/check.sh", CHECK_SCRIPT, 0o755)?;
    t.data("/etc/systemd/system/zt-check.service", CHECK_UNIT, 0o644)?;
    t.symlink(
        "/etc/systemd/system/multi-user.target.wants/zt-check.service",
        "/etc/systemd/system/zt-check.service",
    )?;
    // No login prompt over the checks' output.
    t.symlink(
        "/etc/systemd/system/serial-getty@ttyS0.service",
        "/dev/null",
    )?;
    let overlay = dir.join("overlay.cpio");
    t.write(&overlay)?;
    let initrd = dir.join("initramfs.cpio");
    concat(&[&root, &overlay], &initrd)?;
    let size = std::fs::metadata(&initrd)?.len();
    println!(
        "vm-test: initramfs {} ({} MiB)",
        initrd.display(),
        size >> 20
    );

    let timeout = Duration::from_secs(opts.timeout.unwrap_or(30 * 60));
    let log = dir.join(format!("console-{}.log", kernel.release));
    let run = boot(
        &qemu,
        &kernel,
        &initrd,
        3072,
        "console=ttyS0 rdinit=/lib/systemd/systemd panic=-1 quiet",
        timeout,
        &log,
    )?;
    let console = std::fs::read_to_string(&log).unwrap_or_default();
    let checks = parse_checks(&console);
    let exposure = console
        .lines()
        .find_map(|l| l.split_once(EXPOSURE).map(|(_, s)| s.trim().to_string()));
    let failed: Vec<&str> = CHECKS
        .iter()
        .copied()
        .filter(|c| checks.iter().find(|(n, _)| n == c).map(|(_, ok)| *ok) != Some(true))
        .collect();
    let unknown: Vec<&str> = checks
        .iter()
        .filter(|(n, _)| !CHECKS.contains(&n.as_str()))
        .map(|(n, _)| n.as_str())
        .collect();
    let passed = CHECKS.len() - failed.len();
    let verdict = if run.timed_out {
        Err(anyhow!(
            "the VM did not finish within {}s (hard timeout; killed)",
            timeout.as_secs()
        ))
    } else if run.result.is_none() {
        Err(anyhow!(
            "the VM stopped without a verdict (crash or panic?)"
        ))
    } else if !failed.is_empty() || run.result.as_deref() != Some("PASS") {
        Err(anyhow!(
            "checks failed or missing: {failed:?} (verdict {:?})",
            run.result
        ))
    } else if !unknown.is_empty() {
        Err(anyhow!(
            "the guest ran checks xtask does not know: {unknown:?} (add them to CHECKS in xtask/src/vm/systemd.rs)"
        ))
    } else {
        Ok(())
    };
    let summary = format!(
        "vm-test: systemd suite on kernel {}: {passed} of {} checks passed; systemd-analyze security ztd: {}; VM boot {}, VM total {:.0}s, vm-test total {:.0}s",
        kernel.release,
        CHECKS.len(),
        exposure.as_deref().unwrap_or("?"),
        run.booted
            .map(|d| format!("{:.0}s", d.as_secs_f64()))
            .as_deref()
            .unwrap_or("?"),
        run.elapsed.as_secs_f64(),
        started.elapsed().as_secs_f64()
    );
    if let Err(e) = verdict {
        println!();
        println!(
            "vm-test: console tail ({} lines; all of it in {}):",
            run.tail.len(),
            log.display()
        );
        for l in &run.tail {
            println!("  | {l}");
        }
        println!("{summary}");
        return Err(e.context(format!(
            "vm-test --suite systemd on kernel {}",
            kernel.release
        )));
    }
    println!("{summary}");
    Ok(())
}

/// `(name, passed)` of every `ZT-CHECK:` line; a name seen twice counts as failed unless
/// every line of it passed.
fn parse_checks(console: &str) -> Vec<(String, bool)> {
    let mut out: Vec<(String, bool)> = Vec::new();
    for l in console.lines() {
        let Some((_, rest)) = l.split_once("ZT-CHECK: ") else {
            continue;
        };
        let (ok, rest) = if let Some(r) = rest.strip_prefix("PASS ") {
            (true, r)
        } else if let Some(r) = rest.strip_prefix("FAIL ") {
            (false, r)
        } else {
            continue;
        };
        let name = rest.split(':').next().unwrap_or("").trim().to_string();
        match out.iter_mut().find(|(n, _)| *n == name) {
            Some((_, prev)) => *prev &= ok,
            None => out.push((name, ok)),
        }
    }
    out
}

/// The Debian root as a newc archive, built once per package list (`root.packages` says
/// which) with `mmdebstrap` into a directory (as root: ownership and device nodes are
/// kept), then packed with `cpio`.
fn debian_root(dir: &Path, mmdebstrap: &Path, cpio_tool: &Path) -> Result<PathBuf> {
    let archive = dir.join("root.cpio");
    let stamp = dir.join("root.packages");
    let want = format!("{SUITE} minbase {}\n", PACKAGES.join(","));
    if archive.is_file() && std::fs::read_to_string(&stamp).ok().as_deref() == Some(&want) {
        println!("vm-test: Debian root cached: {}", archive.display());
        return Ok(archive);
    }
    if !util::is_root() {
        bail!("building the guest's Debian root (mmdebstrap into a directory) needs root");
    }
    let tree = dir.join("root.unpacking");
    if tree.exists() {
        std::fs::remove_dir_all(&tree).with_context(|| format!("removing {}", tree.display()))?;
    }
    let t = Instant::now();
    util::run(
        Command::new(mmdebstrap)
            .args(["--variant=minbase", "--quiet"])
            .arg(format!("--include={}", PACKAGES.join(",")))
            .arg(SUITE)
            .arg(&tree),
    )?;
    let tmp = dir.join("root.cpio.tmp");
    let out = std::fs::File::create(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
    // `find` lists parents before their contents, which cpio needs.
    let status = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "find . -print0 | LC_ALL=C sort -z | '{}' --null -o -H newc --quiet",
            cpio_tool.display()
        ))
        .current_dir(&tree)
        .stdout(out)
        .status()
        .context("running find | cpio")?;
    util::check(status, "find . | cpio -o -H newc")?;
    std::fs::rename(&tmp, &archive)?;
    std::fs::write(&stamp, want)?;
    std::fs::remove_dir_all(&tree).with_context(|| format!("removing {}", tree.display()))?;
    println!(
        "vm-test: Debian root built in {:.0}s: {}",
        t.elapsed().as_secs_f64(),
        archive.display()
    );
    Ok(archive)
}

/// `parts` one after the other into `out`, each starting on a 4-byte boundary (the kernel
/// looks for the next archive's magic there).
fn concat(parts: &[&Path], out: &Path) -> Result<()> {
    let mut w = std::io::BufWriter::new(
        std::fs::File::create(out).with_context(|| format!("creating {}", out.display()))?,
    );
    let mut pos = 0u64;
    for p in parts {
        let mut f = std::fs::File::open(p).with_context(|| format!("opening {}", p.display()))?;
        pos += std::io::copy(&mut f, &mut w)?;
        let pad = (4 - pos % 4) % 4;
        w.write_all(&vec![0u8; pad as usize])?;
        pos += pad;
    }
    w.flush()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_check_of_the_script_is_known_and_in_order() {
        let mut named = Vec::new();
        for l in CHECK_SCRIPT.lines() {
            let l = l.trim_start();
            for prefix in ["check ", "pass ", "fail "] {
                if let Some(rest) = l.strip_prefix(prefix) {
                    let name = rest.split_whitespace().next().unwrap_or("");
                    if !name.starts_with('"') && !name.starts_with('$') && !named.contains(&name) {
                        named.push(name);
                    }
                }
            }
        }
        assert_eq!(named, CHECKS);
    }

    #[test]
    fn a_check_passes_only_if_every_line_of_it_passed() {
        let console = "x\nZT-CHECK: PASS install: ok\n\u{1b}[0mZT-CHECK: FAIL stop: no\nZT-CHECK: PASS stop: yes\nZT-CHECK: PASS enable-now: returned after 3s: 9 programs\n";
        assert_eq!(
            parse_checks(console),
            [
                ("install".to_string(), true),
                ("stop".to_string(), false),
                ("enable-now".to_string(), true)
            ]
        );
    }
}
