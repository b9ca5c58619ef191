//! `cargo xtask build` and `cargo xtask test`.

use std::{cell::Cell, process::Command, rc::Rc, time::Instant};

use anyhow::{bail, Context as _, Result};

use crate::{
    install, setup,
    util::{self, Ctx},
};

/// Release builds of ztd and ztctl (with the eBPF object embedded by zt-userspace/build.rs)
/// and of the integration tests' probe binary.
pub fn build(ctx: &Ctx) -> Result<()> {
    util::run(ctx.cargo().args([
        "build",
        "--release",
        "-p",
        "zt-userspace",
        "-p",
        "zt-integration",
        "--bins",
    ]))?;
    let dir = ctx.release_dir();
    for bin in ["ztd", "ztctl"] {
        let p = dir.join(bin);
        if !p.is_file() {
            bail!("the build succeeded but {} is missing", p.display());
        }
        println!("build: {}", p.display());
    }
    Ok(())
}

fn test_threads() -> Result<String> {
    match std::env::var("ZT_TEST_THREADS") {
        Ok(n) if !n.is_empty() => match n.parse::<u32>() {
            Ok(v) if v > 0 => Ok(v.to_string()),
            _ => bail!("ZT_TEST_THREADS must be a positive integer, not {n:?}"),
        },
        _ => Ok("2".to_string()),
    }
}

type StepFn = Box<dyn Fn(&Ctx) -> Result<()>>;

struct Step {
    name: &'static str,
    run: StepFn,
}

fn step(name: &'static str, run: impl Fn(&Ctx) -> Result<()> + 'static) -> Step {
    Step {
        name,
        run: Box::new(run),
    }
}

/// Totals of cargo test's `test result:` lines.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Counts {
    pub passed: u64,
    pub failed: u64,
    pub ignored: u64,
}

impl Counts {
    /// Add a libtest summary line:
    /// `test result: ok. 11 passed; 0 failed; 1 ignored; 0 measured; 0 filtered out; ...`.
    pub fn add_line(&mut self, line: &str) {
        let Some(rest) = line.trim().strip_prefix("test result:") else {
            return;
        };
        for part in rest.split(';') {
            let mut words = part.split_whitespace().rev();
            let (Some(what), Some(n)) = (words.next(), words.next()) else {
                continue;
            };
            let Ok(n) = n.parse::<u64>() else { continue };
            match what {
                "passed" => self.passed += n,
                "failed" => self.failed += n,
                "ignored" => self.ignored += n,
                _ => {}
            }
        }
    }

    /// The plain closing line: "tests: N passed, N failed, N skipped".
    fn line(&self) -> String {
        format!(
            "tests: {} passed, {} failed, {} skipped",
            self.passed, self.failed, self.ignored
        )
    }
}

/// Every check, in order; the first failure stops the run.
pub fn test(ctx: &Ctx) -> Result<()> {
    let threads = format!("--test-threads={}", test_threads()?);
    let counts = Rc::new(Cell::new(None::<Counts>));
    let tally = Rc::clone(&counts);
    let steps = [
        step("setup", setup::setup),
        step("fmt", |ctx| {
            util::run(ctx.cargo().args(["fmt", "--all", "--check"]))
        }),
        step("clippy (workspace, host)", |ctx| {
            // zt-ebpf is no_std/no_main and only builds for bpfel-unknown-none: on the host
            // target it fails ("unwinding panics are not supported without std"), so it is
            // linted by the next step instead.
            util::run(ctx.cargo().args([
                "clippy",
                "--workspace",
                "--exclude",
                "zt-ebpf",
                "--all-targets",
                "--",
                "-D",
                "warnings",
            ]))
        }),
        step("clippy (zt-ebpf, bpfel-unknown-none)", |ctx| {
            let nightly = format!("+{}", setup::nightly_name());
            util::run(ctx.cargo().args([
                nightly.as_str(),
                "clippy",
                "-p",
                "zt-ebpf",
                "--target",
                "bpfel-unknown-none",
                "-Z",
                "build-std=core",
                "--",
                "-D",
                "warnings",
            ]))
        }),
        step("build (release)", build),
        step(
            "install layout (xtask install into a temp dir)",
            install::check_install,
        ),
        step("Debian package (cargo deb, dpkg -x)", install::check_deb),
        step("prepare kernel (root, bpffs)", |_| {
            util::require_root("cargo xtask test (the integration tests)")?;
            util::ensure_bpffs()?;
            println!("test: running as root; bpffs mounted at {}", util::BPFFS);
            Ok(())
        }),
        step("cargo test", move |ctx| {
            let bin_dir = ctx.release_dir();
            let mut cmd: Command = ctx.cargo();
            cmd.args([
                "test",
                "--workspace",
                "--exclude",
                "zt-ebpf",
                "--",
                &threads,
            ])
            .env("ZT_BIN_DIR", &bin_dir);
            println!("test: ZT_BIN_DIR={}", bin_dir.display());
            let mut c = Counts::default();
            let result = util::run_tee(&mut cmd, |line| c.add_line(line));
            tally.set(Some(c));
            result
        }),
        // Debian 12's kernel under QEMU: the smoke suite of the integration tests inside a
        // guest (xtask/src/vm.rs); the host's cgroups, bpffs and interfaces are not touched.
        step("vm-test (Debian 6.1 under QEMU, smoke suite)", |ctx| {
            crate::vm::vm_test(
                ctx,
                &crate::vm::Opts {
                    kernel: crate::vm::Kernel::Debian61,
                    suite: crate::vm::Suite::Smoke,
                    timeout: None,
                    no_build: true,
                },
            )
        }),
        // The .deb on a Debian 12 root with systemd as PID 1 (xtask/src/vm/systemd.rs): the
        // unit's life cycle, reload, tamper findings in the journal, remove and purge.
        step("vm-test (the package under systemd, Debian 6.1)", |ctx| {
            crate::vm::vm_test(
                ctx,
                &crate::vm::Opts {
                    kernel: crate::vm::Kernel::Debian61,
                    suite: crate::vm::Suite::Systemd,
                    timeout: None,
                    no_build: true,
                },
            )
        }),
        // Last: every benchmark scenario runs end to end with reduced sizes (no thresholds).
        step("bench --quick (smoke test)", |ctx| {
            crate::bench::bench(
                ctx,
                &crate::bench::Opts {
                    quick: true,
                    only: Vec::new(),
                },
            )
        }),
    ];

    let total = steps.len();
    let started = Instant::now();
    let mut done: Vec<(&str, f64)> = Vec::new();
    for (i, s) in steps.iter().enumerate() {
        println!();
        println!("==> xtask test [{}/{total}] {}", i + 1, s.name);
        let t = Instant::now();
        let result = (s.run)(ctx);
        let secs = t.elapsed().as_secs_f64();
        if let Err(e) = result {
            println!();
            println!("==> xtask test summary:");
            for (name, secs) in &done {
                println!("    ok      {name} ({secs:.0}s)");
            }
            println!("    FAILED  {} ({secs:.0}s): {e:#}", s.name);
            for rest in &steps[i + 1..] {
                println!("    not run {}", rest.name);
            }
            if let Some(c) = counts.get() {
                println!("{}", c.line());
            }
            return Err(e).context(format!("xtask test: step `{}` failed", s.name));
        }
        done.push((s.name, secs));
    }
    println!();
    println!("==> xtask test summary:");
    for (name, secs) in &done {
        println!("    ok      {name} ({secs:.0}s)");
    }
    println!(
        "==> xtask test: all {total} steps succeeded in {:.0}s",
        started.elapsed().as_secs_f64()
    );
    // Last, so that it is the run's closing line (cargo test ends with the doc-tests' "0
    // passed" lines otherwise).
    if let Some(c) = counts.get() {
        println!("{}", c.line());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn libtest_summaries_are_added_up() {
        let mut c = Counts::default();
        c.add_line("test result: ok. 11 passed; 0 failed; 1 ignored; 0 measured; 0 filtered out; finished in 5.69s\n");
        c.add_line("test result: FAILED. 3 passed; 2 failed; 0 ignored; 0 measured; 0 filtered out; finished in 0.01s");
        c.add_line("test foo ... ok");
        assert_eq!(
            c,
            Counts {
                passed: 14,
                failed: 2,
                ignored: 1
            }
        );
        assert_eq!(c.line(), "tests: 14 passed, 2 failed, 1 skipped");
    }
}
