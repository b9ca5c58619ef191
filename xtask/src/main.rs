//! zt's developer tasks: `cargo xtask setup|build|test|run|bench|install|deb|vm-test` (see the README's Development section).
//!
//! Environment:
//! - `ZT_NIGHTLY`: toolchain that setup checks for the eBPF build (default `nightly`);
//! - `ZT_BPF_LINKER_ROOT`: install/use bpf-linker under this root instead of `~/.cargo`;
//! - `ZT_TEST_THREADS`: `--test-threads` of `cargo xtask test` (default 2);
//! - `ZT_BENCH_ROUNDS`: rounds per scenario of `cargo xtask bench` (default 7, `--quick` 1);
//! - `ZT_VM_TEST_THREADS`: `--test-threads` inside the `vm-test` guest (default 2).

mod bench;
mod install;
mod mdman;
mod run;
mod setup;
mod tasks;
mod util;
mod vm;

use std::{ffi::OsString, process::ExitCode};

use anyhow::Result;
use clap::{Parser, Subcommand};

/// zt developer tasks.
#[derive(Debug, Parser)]
#[command(name = "cargo xtask", bin_name = "cargo xtask")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Install what building the eBPF programs needs (rust-src for nightly, bpf-linker);
    /// idempotent.
    Setup,
    /// setup, then release builds of ztd and ztctl (eBPF object embedded) and the test probe.
    Build,
    /// setup, fmt, clippy, build, then every test (needs root).
    Test,
    /// setup, build, then run ztd in the foreground in audit mode with ./policies on the whole
    /// host unless `-- --cgroup <dir>` is given; Ctrl-C stops it and unloads.
    Run {
        /// Arguments for ztd (after `--`); --policy/--mode/--cgroup/--bpffs/--socket given
        /// here replace xtask's defaults.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        ztd_args: Vec<OsString>,
    },
    /// setup, build, then the benchmarks (needs root; see BENCHMARKS.md); results in
    /// target/bench/results.json.
    Bench {
        /// Reduced sizes (rule counts 1, 2, 5), 1 round, no targets: the CI smoke test.
        #[arg(long)]
        quick: bool,
        /// Run only this scenario (repeatable): socket, xdp, wire, egress, apply, cost,
        /// events, memory (or a scenario id).
        #[arg(long, value_name = "SCENARIO")]
        only: Vec<String>,
    },
    /// setup, release build, then install ztd, ztctl, the systemd unit, man pages and
    /// completions under PREFIX, and the default policy and ztd.toml under ETC/zt when
    /// absent (never overwritten). Starts nothing.
    Install {
        /// Where bin/, lib/systemd/system/ and share/ go.
        #[arg(long, value_name = "DIR", default_value = "/usr/local")]
        prefix: std::path::PathBuf,
        /// Where zt/policies and zt/ztd.toml go.
        #[arg(long, value_name = "DIR", default_value = "/etc")]
        etc: std::path::PathBuf,
    },
    /// setup, release build, then a Debian package with `cargo deb` (installs cargo-deb
    /// once if missing) in target/debian/.
    Deb,
    /// The install and package checks of `test` alone (needs a release build): install into
    /// a temp dir and unpack the .deb, compare with the documented file lists.
    CheckPackaging,
    /// Boot another kernel under QEMU (TCG) with an initramfs of the release binaries and
    /// the integration tests, and run a suite inside it (see xtask/src/vm.rs). Kernels and
    /// the console log are kept under target/vm/.
    VmTest {
        /// `6.1` (Debian 12's newest 6.1, downloaded with apt-get), `host` (the running
        /// kernel's image, when it is on disk) or PATH to a vmlinuz or a linux-image .deb.
        #[arg(long, default_value = "6.1")]
        kernel: vm::Kernel,
        #[arg(long, value_enum, default_value = "smoke")]
        suite: vm::Suite,
        /// Kill the VM after this many seconds (default: 1800 for smoke and systemd, 10800 for
        /// full).
        #[arg(long, value_name = "SECS")]
        timeout: Option<u64>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match dispatch(cli.command) {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            eprintln!("xtask: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn dispatch(cmd: Cmd) -> Result<u8> {
    util::prepare_path()?;
    let ctx = util::Ctx::new;
    match cmd {
        Cmd::Setup => setup::setup(&ctx()?)?,
        Cmd::Build => {
            let ctx = ctx()?;
            setup::setup(&ctx)?;
            tasks::build(&ctx)?;
        }
        Cmd::Test => tasks::test(&ctx()?)?,
        Cmd::Run { ztd_args } => return run::run(&ctx()?, ztd_args),
        Cmd::Bench { quick, only } => bench::bench(&ctx()?, &bench::Opts { quick, only })?,
        Cmd::Install { prefix, etc } => install::install_task(&ctx()?, &prefix, &etc)?,
        Cmd::Deb => install::deb_task(&ctx()?)?,
        Cmd::CheckPackaging => {
            let ctx = ctx()?;
            install::check_install(&ctx)?;
            install::check_deb(&ctx)?;
        }
        Cmd::VmTest {
            kernel,
            suite,
            timeout,
        } => vm::vm_test(
            &ctx()?,
            &vm::Opts {
                kernel,
                suite,
                timeout,
                no_build: false,
            },
        )?,
    }
    Ok(0)
}
