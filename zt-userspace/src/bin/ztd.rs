//! `ztd`: the zt daemon. See `zt::daemon`.

use std::path::PathBuf;

use clap::{Parser, ValueEnum};
use zt::{
    control::DEFAULT_SOCKET,
    daemon::{self, DaemonError, GlobalMode, Options},
    sys,
    xdp::XdpModePref,
};

#[derive(Clone, Copy, Debug, ValueEnum)]
enum Mode {
    /// Denials are enforced (except in files with `mode = "audit"`).
    Enforce,
    /// Every denial is reported as `audit` and allowed.
    Audit,
}

/// zt daemon: compiles the policy into the kernel, keeps its programs attached and pinned,
/// and reports decisions.
#[derive(Debug, Parser)]
#[command(version)]
struct Args {
    /// Policy file or directory of *.toml files (repeatable).
    #[arg(long, default_value = "/etc/zt/policies")]
    policy: Vec<PathBuf>,
    /// Guarded cgroup (a cgroup2 directory); default: the cgroup2 root (the whole host).
    #[arg(long)]
    cgroup: Option<PathBuf>,
    /// bpffs directory for pinned programs, links and maps.
    #[arg(long, default_value = "/sys/fs/bpf/zt")]
    bpffs: PathBuf,
    /// Control socket for ztctl.
    #[arg(long, default_value = DEFAULT_SOCKET)]
    socket: PathBuf,
    /// Global mode.
    #[arg(long, value_enum, default_value = "enforce")]
    mode: Mode,
    /// Also report allowed decisions as events.
    #[arg(long)]
    log_allowed: bool,
    /// Attach the XDP front door to this network interface (repeatable): inbound packets no
    /// ingress rule could allow are dropped before the network stack.
    #[arg(long, value_name = "IFACE")]
    xdp: Vec<String>,
    /// XDP attach mode: `auto` tries native (driver) mode, then generic (skb) mode.
    #[arg(long, value_enum, default_value = "auto")]
    xdp_mode: XdpMode,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum XdpMode {
    /// Native (driver) mode if the driver supports it, else generic (skb) mode.
    Auto,
    /// Native mode only.
    Driver,
    /// Generic mode only (works on every interface; slower).
    Skb,
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let args = Args::parse();
    let cgroup = match args.cgroup {
        Some(c) => c,
        None => match sys::cgroup2_root() {
            Ok(root) => root,
            Err(e) => {
                eprintln!("ztd: {e}");
                return std::process::ExitCode::from(1);
            }
        },
    };
    let opts = Options {
        policy: args.policy,
        cgroup,
        bpffs: args.bpffs,
        socket: args.socket,
        mode: match args.mode {
            Mode::Enforce => GlobalMode::Enforce,
            Mode::Audit => GlobalMode::Audit,
        },
        log_allowed: args.log_allowed,
        xdp: args.xdp,
        xdp_mode: match args.xdp_mode {
            XdpMode::Auto => XdpModePref::Auto,
            XdpMode::Driver => XdpModePref::Driver,
            XdpMode::Skb => XdpModePref::Skb,
        },
    };
    match daemon::run(opts).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(DaemonError::Policy(diags)) => {
            for d in &diags {
                eprintln!("{d}");
            }
            eprintln!("ztd: the policy is invalid; nothing was attached or changed");
            std::process::ExitCode::from(1)
        }
        Err(e) => {
            eprintln!("ztd: {e}");
            std::process::ExitCode::from(1)
        }
    }
}
