//! `ztd`: the zt daemon. See `zt::daemon`.

use std::path::PathBuf;

use clap::{CommandFactory, Parser, ValueEnum};
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
#[command(
    version,
    long_about = "zt daemon: compiles the TOML policy (see zt-policy(5)) into BPF maps, attaches \
zt's eBPF programs to the guarded cgroup (default: the whole host), keeps them attached and \
pinned in bpffs, reloads the policy on SIGHUP, `ztctl reload` or when its files change, and \
reports decisions as events. Enforcement stays in the kernel when ztd stops; `ztctl unload` \
removes it. Every option can also be set in the configuration file (--config); options on \
the command line win. Needs root (CAP_BPF, CAP_NET_ADMIN, CAP_SYS_ADMIN).",
    after_help = "Exit status: 0 stopped (SIGTERM/SIGINT, ztctl unload), 1 could not start or run \
(e.g. an invalid policy: nothing attached), 2 usage or configuration file error."
)]
struct Args {
    /// Configuration file: each key a long option name (`mode = "audit"`, `xdp = ["eth1"]`,
    /// `log-allowed = true`); options on the command line win. A missing default file is
    /// fine.
    #[arg(long, value_name = "PATH", default_value = zt::config::DEFAULT_CONFIG, overrides_with = "config")]
    config: PathBuf,
    /// Policy file or directory of *.toml files (repeatable).
    #[arg(long, value_name = "PATH", default_value = "/etc/zt/policies")]
    policy: Vec<PathBuf>,
    /// Guarded cgroup (a cgroup2 directory); default: the cgroup2 root (the whole host).
    #[arg(long, value_name = "DIR")]
    cgroup: Option<PathBuf>,
    /// bpffs directory for pinned programs, links and maps.
    #[arg(long, value_name = "DIR", default_value = "/sys/fs/bpf/zt")]
    bpffs: PathBuf,
    /// Control socket for ztctl.
    #[arg(long, value_name = "PATH", default_value = DEFAULT_SOCKET)]
    socket: PathBuf,
    /// enforce: denials block (except those of policy files with `mode = "audit"`); audit:
    /// nothing is blocked, every denial is reported as `audit` (a safe first start).
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
    #[arg(long, value_name = "MODE", value_enum, default_value = "auto")]
    xdp_mode: XdpMode,
    /// Decision events kept in memory for `ztctl events`.
    #[arg(long, value_name = "N", default_value_t = 10_000)]
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
    /// Start even if this kernel cannot load some of the cgroup hooks, running without them
    /// (each named at start and in `ztctl status`); without it ztd refuses to start.
    #[arg(long)]
    allow_missing_hooks: bool,
    /// Do not reload when the policy files change (SIGHUP and `ztctl reload` still do).
    #[arg(long)]
    no_watch: bool,
    #[command(flatten)]
    flows: zt::flows::FlowArgs,
    /// Also write every decision event as one JSON line to this file, rotated by size (for
    /// Vector, Fluent Bit, Filebeat).
    #[arg(long, value_name = "PATH")]
    events_file: Option<PathBuf>,
    /// Rotate the events file before it grows past this many bytes.
    #[arg(long, value_name = "BYTES", default_value_t = zt::events_file::DEFAULT_MAX_BYTES)]
    events_file_max_bytes: u64,
    /// Rotated events files kept (PATH.1 newest … PATH.N); older ones are deleted.
    #[arg(long, value_name = "N", default_value_t = zt::events_file::DEFAULT_KEEP)]
    events_file_keep: usize,
    /// Where `unit = "NAME.service"` identities are looked up without systemd: the unit's
    /// cgroup is searched in DIR/system.slice, DIR and the slices below DIR (a cgroup2
    /// directory; default: the cgroup2 root).
    #[arg(long, value_name = "DIR")]
    units_root: Option<PathBuf>,
    /// Members of this group (a name or a gid) may read `ztctl status` and `ztctl events`;
    /// every request that changes something is accepted from root only, whatever the
    /// socket's mode (requests are authorised by the peer's credentials). Default: root only.
    #[arg(long, value_name = "GROUP")]
    control_group: Option<String>,
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
    let argv: Vec<std::ffi::OsString> = std::env::args_os().collect();
    if let Some(code) = zt::manual::generate_if_asked(Args::command(), zt::manual::Page::Ztd, &argv)
    {
        return code;
    }
    let args: Args = match zt::config::parse_with_config(argv) {
        Ok(a) => a,
        Err(zt::config::ConfigError::Clap(e)) => {
            let code = if e.use_stderr() { 2 } else { 0 };
            let _ = e.print();
            return std::process::ExitCode::from(code);
        }
        Err(e) => {
            eprintln!("ztd: {e}");
            return std::process::ExitCode::from(e.exit_code());
        }
    };
    let log_format = args.log_format;
    // Text mode prints messages as they are (`path:line:column: message` stays greppable).
    let prefix = zt::history::journal_prefix("error", daemon::stderr_is_journal());
    let error = |message: &str| match log_format {
        LogFormat::Text => eprintln!("{prefix}{message}"),
        LogFormat::Json => eprintln!(
            "{prefix}{}",
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
    if let Some(missing) = missing_capabilities() {
        error(&format!(
            "ztd: missing {missing}: ztd loads BPF programs into the kernel and needs root \
             (CAP_BPF, CAP_SYS_ADMIN, CAP_NET_ADMIN); run it as root or as the ztd.service unit"
        ));
        return std::process::ExitCode::from(1);
    }
    if let Some(path) = &args.events_file {
        match zt::events_file::EventsFile::open(
            path,
            args.events_file_max_bytes,
            args.events_file_keep,
        ) {
            Ok(f) => zt::events_file::install(f),
            Err(e) => {
                error(&format!("ztd: {e}"));
                return std::process::ExitCode::from(1);
            }
        }
    }
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
        allow_missing_hooks: args.allow_missing_hooks,
        watch: !args.no_watch,
        flows: args.flows.config(),
        units_root: args.units_root,
        control_group: args.control_group,
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

/// The capabilities ztd cannot work without that this process lacks (from
/// /proc/self/status), named for the operator; `None` if all are there or unknown.
fn missing_capabilities() -> Option<String> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let hex = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))?
        .trim();
    let eff = u64::from_str_radix(hex, 16).ok()?;
    let missing: Vec<&str> = [
        (21, "CAP_SYS_ADMIN"),
        (39, "CAP_BPF"),
        (12, "CAP_NET_ADMIN"),
    ]
    .into_iter()
    .filter(|(bit, _)| eff & (1u64 << bit) == 0)
    .map(|(_, name)| name)
    .collect();
    (!missing.is_empty()).then(|| missing.join(", "))
}
