//! `ztctl`: check policies offline, and talk to `ztd` (status, reload, unload).

use std::{path::PathBuf, process::ExitCode, time::Duration};

use clap::{Parser, Subcommand};
use zt::{
    control::{self, Request, Response, Status, DEFAULT_SOCKET},
    loader::{self, Layout},
    policy::{self, SystemResolver},
    sys,
};

#[derive(Debug, Parser)]
#[command(
    version,
    about = "zt control: check policies, show status, reload, unload"
)]
struct Args {
    /// ztd's control socket.
    #[arg(long, global = true, default_value = DEFAULT_SOCKET)]
    socket: PathBuf,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Validate policy files or directories offline (exit 0 valid, 1 invalid).
    Check {
        #[arg(required = true)]
        paths: Vec<PathBuf>,
    },
    /// Show the daemon's health, generation, hooks and rule counters.
    Status {
        #[arg(long)]
        json: bool,
    },
    /// Ask ztd to re-read its policy (applied only if valid in full).
    Reload,
    /// Detach and unpin everything zt pinned under DIR (works without a daemon).
    Unload {
        #[arg(long, default_value = "/sys/fs/bpf/zt")]
        bpffs: PathBuf,
    },
}

const TIMEOUT: Duration = Duration::from_secs(30);

fn main() -> ExitCode {
    // Die quietly on a closed pipe (`ztctl status | head`) like other command-line tools.
    // SAFETY: setting a signal disposition at start-up, before any thread exists.
    unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
    let args = match Args::try_parse() {
        Ok(a) => a,
        Err(e) => {
            let code = if e.use_stderr() { 2 } else { 0 };
            let _ = e.print();
            return ExitCode::from(code);
        }
    };
    match args.command {
        Command::Check { paths } => check(&paths),
        Command::Status { json } => status(&args.socket, json),
        Command::Reload => reload(&args.socket),
        Command::Unload { bpffs } => unload(&args.socket, bpffs),
    }
}

fn check(paths: &[PathBuf]) -> ExitCode {
    let cgroup_root = sys::cgroup2_root().unwrap_or_else(|_| PathBuf::from("/sys/fs/cgroup"));
    let resolver = SystemResolver { cgroup_root };
    match policy::load(paths, &resolver) {
        Ok((policy, warnings)) => {
            for w in &warnings {
                eprintln!("{w}");
            }
            match policy::compile(&policy) {
                Ok(compiled) => {
                    println!(
                        "ok: {} rules, {} identities",
                        compiled.rules.len(),
                        compiled.identities.len()
                    );
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("{e}");
                    ExitCode::from(1)
                }
            }
        }
        Err(diags) => {
            for d in &diags {
                eprintln!("{d}");
            }
            ExitCode::from(1)
        }
    }
}

fn ask(socket: &std::path::Path, req: &Request) -> Result<Response, ExitCode> {
    control::request(socket, req, TIMEOUT).map_err(|e| {
        eprintln!("ztctl: {e}");
        ExitCode::from(1)
    })
}

fn status(socket: &std::path::Path, json: bool) -> ExitCode {
    match ask(socket, &Request::Status) {
        Err(code) => code,
        Ok(Response::Status(st)) => {
            if json {
                match serde_json::to_string_pretty(&st) {
                    Ok(text) => println!("{text}"),
                    Err(e) => {
                        eprintln!("ztctl: {e}");
                        return ExitCode::from(1);
                    }
                }
            } else {
                print_status(&st);
            }
            if st.healthy {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            }
        }
        Ok(other) => unexpected(other),
    }
}

fn print_status(st: &Status) {
    println!(
        "health      {}",
        if st.healthy { "ok" } else { "UNHEALTHY" }
    );
    println!("mode        {}", st.mode);
    println!("generation  {}", st.generation);
    println!("rules       {}  identities {}", st.rules, st.identities);
    println!("cgroup      {}", st.cgroup.display());
    println!("pins        {}", st.bpffs.display());
    let d = &st.decisions;
    println!(
        "decisions   allowed {}  denied {}  audited {}  (no policy {}, exe unreadable {}, events lost {})",
        d.allowed, d.denied, d.audited, d.no_policy, d.exe_unreadable, d.events_lost
    );
    if !st.last_reload.ok {
        println!("last reload FAILED: {}", st.last_reload.message);
    }
    println!();
    println!("{:<10} {:<9} {:>8}", "HOOK", "ATTACHED", "PROG ID");
    for h in &st.hooks {
        println!(
            "{:<10} {:<9} {:>8}",
            h.hook,
            if h.attached { "yes" } else { "NO" },
            h.prog_id
        );
    }
    print_xdp(&st.xdp);
    println!();
    println!("{:>6} {:>10}  {:<40} LOCATION", "RULE", "HITS", "");
    for c in &st.counters {
        println!("{:>6} {:>10}  {:<40} {}", c.id, c.hits, c.rule, c.location);
    }
}

/// The XDP front door: one line per interface, then its counters.
fn print_xdp(xdp: &[zt::xdp::XdpStatus]) {
    if xdp.is_empty() {
        return;
    }
    println!();
    println!(
        "{:<16} {:<7} {:<9} {:>8}",
        "XDP IFACE", "MODE", "ATTACHED", "PROG ID"
    );
    for x in xdp {
        println!(
            "{:<16} {:<7} {:<9} {:>8}",
            x.iface,
            if x.mode.is_empty() { "-" } else { &x.mode },
            if x.attached { "yes" } else { "NO" },
            x.prog_id
        );
        let c = &x.counters;
        println!(
            "  passed {}  dropped: deny list {}, closed port {}, malformed {}  not judged {}  audited {}  no policy {}  (events sent {}, skipped {}, lost {})",
            c.passed,
            c.dropped_deny_list,
            c.dropped_closed_port,
            c.dropped_malformed,
            c.passed_not_judged,
            c.audited,
            c.no_policy,
            c.events_sent,
            c.events_skipped,
            c.events_lost
        );
    }
}

fn reload(socket: &std::path::Path) -> ExitCode {
    match ask(socket, &Request::Reload) {
        Err(code) => code,
        Ok(Response::Ok { message }) => {
            println!("reloaded: {message}");
            ExitCode::SUCCESS
        }
        Ok(Response::Error {
            message,
            diagnostics,
        }) => {
            for d in &diagnostics {
                eprintln!("{d}");
            }
            eprintln!("ztctl: {message}");
            ExitCode::from(1)
        }
        Ok(other) => unexpected(other),
    }
}

fn unload(socket: &std::path::Path, bpffs: PathBuf) -> ExitCode {
    // A running daemon guarding these pins is asked to unload and exit, so no fd it holds
    // keeps anything attached; then whatever is left is removed here.
    if let Ok(Response::Status(st)) = control::request(socket, &Request::Status, TIMEOUT) {
        if st.bpffs == bpffs {
            match control::request(socket, &Request::Unload, TIMEOUT) {
                Ok(Response::Ok { message }) => println!("ztd: {message}"),
                Ok(Response::Error { message, .. }) => eprintln!("ztd: {message}"),
                Ok(_) | Err(_) => {}
            }
        }
    }
    match loader::unload(&Layout {
        bpffs: bpffs.clone(),
    }) {
        Ok(removed) => {
            println!(
                "unloaded: {} pinned objects removed under {}",
                removed.len(),
                bpffs.display()
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("ztctl: unload of {} failed: {e}", bpffs.display());
            ExitCode::from(1)
        }
    }
}

fn unexpected(resp: Response) -> ExitCode {
    match resp {
        Response::Error { message, .. } => eprintln!("ztctl: {message}"),
        other => eprintln!("ztctl: unexpected answer from ztd: {other:?}"),
    }
    ExitCode::from(1)
}
