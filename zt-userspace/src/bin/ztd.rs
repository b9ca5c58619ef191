//! `ztd`: the zt daemon. See `zt::daemon`.

use std::path::PathBuf;

use clap::{Parser, ValueEnum};
use zt::{
    control::DEFAULT_SOCKET,
    daemon::{self, DaemonError, GlobalMode, Options},
    history::LogFormat,
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
    /// Decision events kept in memory for `ztctl events`.
    #[arg(long, default_value_t = 10_000)]
    history: usize,
    /// Serve Prometheus metrics at http://ADDR/metrics (e.g. 127.0.0.1:9464); off by default.
    #[arg(long, value_name = "ADDR")]
    metrics: Option<std::net::SocketAddr>,
    /// How ztd writes its lines: text, or one JSON object per line (journald, shippers).
    #[arg(long, value_name = "FORMAT", default_value = "text")]
    log_format: LogFormat,
    /// How often the kernel state (links attached, pins present) is checked and, if
    /// tampered with, repaired (e.g. 2s, 500ms; 0s: report problems in `status`, never
    /// repair).
    #[arg(long, value_name = "DURATION", default_value = "2s", value_parser = humantime::parse_duration)]
    check_interval: std::time::Duration,
    /// Do not reload when the policy files change (SIGHUP and `ztctl reload` still do).
    #[arg(long)]
    no_watch: bool,
    /// Where `unit = "NAME.service"` identities are looked up without systemd: the unit's
    /// cgroup is searched in DIR/system.slice, DIR and the slices below DIR (a cgroup2
    /// directory; default: the cgroup2 root).
    #[arg(long, value_name = "DIR")]
    units_root: Option<PathBuf>,
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
    let log_format = args.log_format;
    // Text mode prints messages as they are (`path:line:column: message` stays greppable).
    let error = |message: &str| match log_format {
        LogFormat::Text => eprintln!("{message}"),
        LogFormat::Json => eprintln!(
            "{}",
            zt::history::log_line(log_format, "error", message, &[])
        ),
    };
    let cgroup = match args.cgroup {
        Some(c) => c,
        None => match sys::cgroup2_root() {
            Ok(root) => root,
            Err(e) => {
                error(&format!("ztd: {e}"));
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
        history: args.history,
        metrics: args.metrics,
        log_format: args.log_format,
        check_interval: args.check_interval,
        watch: !args.no_watch,
        units_root: args.units_root,
    };
    match daemon::run(opts).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(DaemonError::Policy(diags)) => {
            for d in &diags {
                error(&d.to_string());
            }
            error("ztd: the policy is invalid; nothing was attached or changed");
            std::process::ExitCode::from(1)
        }
        Err(e) => {
            error(&format!("ztd: {e}"));
            std::process::ExitCode::from(1)
        }
    }
}
