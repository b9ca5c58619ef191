//! `ztctl`: check policies offline, and talk to `ztd` (status, reload, unload).

use std::{path::PathBuf, process::ExitCode, time::Duration};

use clap::{Parser, Subcommand};
use zt::{
    control::{self, Request, Response, Status, DEFAULT_SOCKET},
    history::{format_text, text_header, EventFilter, FollowItem},
    loader::{self, Layout},
    policy::{self, SystemResolver},
    sys,
};

#[derive(Debug, Parser)]
#[command(
    version,
    about = "zt control: check policies, show status, reload, unload",
    long_about = "zt control: check policy files offline (no daemon, no root needed), and talk to \
a running ztd over its control socket: status and rule counters, decision events, reload, \
apply with rollback, explain a verdict, unload. The policy format is described in zt-policy(5).",
    after_help = "Exit status: 0 success, 1 failure (invalid policy, ztd unreachable or unhealthy, \
request refused), 2 usage error."
)]
struct Args {
    /// ztd's control socket (as ztd's --socket; default: `socket` of /etc/zt/ztd.toml if set).
    #[arg(long, global = true, value_name = "PATH", default_value = DEFAULT_SOCKET)]
    socket: PathBuf,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Validate policy files or directories offline (exit 0 valid, 1 invalid).
    Check {
        /// Policy files or directories of *.toml files, checked together as one policy.
        #[arg(required = true, value_name = "PATH")]
        paths: Vec<PathBuf>,
        /// Do not refuse files a non-root user could change (for checking a working copy as
        /// a developer; ztd always refuses them).
        #[arg(long)]
        no_owner_check: bool,
    },
    /// Show the daemon's health, generation, hooks and rule counters.
    Status {
        #[arg(long)]
        json: bool,
    },
    /// Ask ztd to re-read its policy (applied only if valid in full).
    Reload,
    /// Apply the policy at PATH (file or directory) now, and roll it back unless
    /// `ztctl confirm` follows within DURATION (anti-lockout).
    Apply {
        path: PathBuf,
        /// Roll back unless confirmed within this long (e.g. 60s, 5m).
        #[arg(long, value_name = "DURATION", default_value = "60s", value_parser = humantime::parse_duration)]
        confirm_within: Duration,
    },
    /// Keep the policy of the pending `ztctl apply` (it becomes ztd's policy path).
    Confirm,
    /// Decision events from ztd's history, oldest first; with --follow, then live.
    Events {
        /// Keep printing new events until interrupted.
        #[arg(long)]
        follow: bool,
        /// One JSON object per line (stable field names; see the README).
        #[arg(long)]
        json: bool,
        /// Only this verdict: deny, allow or audit.
        #[arg(long)]
        verdict: Option<String>,
        /// Only this executable: a full path, or a file name.
        #[arg(long)]
        exe: Option<String>,
        /// Only this (effective) uid.
        #[arg(long)]
        uid: Option<u32>,
        /// Only peers in this CIDR (or this address).
        #[arg(long)]
        peer: Option<String>,
        /// Only events of the last DURATION (e.g. 90s, 15m, 1h, 2d).
        #[arg(long)]
        since: Option<String>,
    },
    /// A live, refreshing view of the busiest rules and denied flows.
    Top {
        /// Seconds between frames.
        #[arg(long, default_value_t = 2)]
        interval: u64,
        /// Stop after this many frames (default: until interrupted).
        #[arg(long)]
        iterations: Option<u64>,
    },
    /// Explain the verdict zt would give a connection, from the policy (offline): the
    /// verdict, the rule that decides and every rule that matches (exit 0 whatever the verdict).
    Explain(ExplainArgs),
    /// Write a least-privilege policy that allows exactly the flows ztd recorded (learning
    /// mode: run ztd in audit mode first).
    Suggest(zt::learn::SuggestArgs),
    /// Which recorded flows each of two policies allows that the other denies (exit 0 none,
    /// 1 some, 2 trouble).
    Diff(zt::learn::DiffArgs),
    /// Detach and unpin everything zt pinned under DIR (works without a daemon).
    Unload {
        /// ztd's pin directory (as ztd's --bpffs; default: `bpffs` of /etc/zt/ztd.toml if set).
        #[arg(long, value_name = "DIR", default_value = "/sys/fs/bpf/zt")]
        bpffs: PathBuf,
    },
}

const TIMEOUT: Duration = Duration::from_secs(30);

fn main() -> ExitCode {
    // Die quietly on a closed pipe (`ztctl status | head`) like other command-line tools.
    // SAFETY: setting a signal disposition at start-up, before any thread exists.
    unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
    let argv: Vec<std::ffi::OsString> = std::env::args_os().collect();
    if let Some(code) = zt::manual::generate_if_asked(
        <Args as clap::CommandFactory>::command(),
        zt::manual::Page::Ztctl,
        &argv,
    ) {
        return code;
    }
    let parsed = <Args as clap::CommandFactory>::command()
        .try_get_matches_from(argv)
        .and_then(|m| <Args as clap::FromArgMatches>::from_arg_matches(&m).map(|a| (m, a)));
    let (matches, mut args) = match parsed {
        Ok(x) => x,
        Err(e) => {
            let code = if e.use_stderr() { 2 } else { 0 };
            let _ = e.print();
            return ExitCode::from(code);
        }
    };
    // Not given: the socket and pin directory the installed /etc/zt/ztd.toml sets, if any.
    installed_default(&matches, "socket", &mut args.socket);
    if let (Command::Unload { bpffs }, Some(("unload", sub))) =
        (&mut args.command, matches.subcommand())
    {
        installed_default(sub, "bpffs", bpffs);
    }
    match args.command {
        Command::Check {
            paths,
            no_owner_check,
        } => check(&paths, !no_owner_check),
        Command::Status { json } => status(&args.socket, json),
        Command::Reload => reload(&args.socket),
        Command::Apply {
            path,
            confirm_within,
        } => apply(&args.socket, &path, confirm_within),
        Command::Confirm => confirm(&args.socket),
        Command::Events {
            follow,
            json,
            verdict,
            exe,
            uid,
            peer,
            since,
        } => {
            let filter = match EventFilter::from_args(
                verdict.as_deref(),
                exe.as_deref(),
                uid,
                peer.as_deref(),
                since.as_deref(),
            ) {
                Ok(f) => f,
                Err(e) => {
                    eprintln!("ztctl: {e}");
                    return ExitCode::from(2);
                }
            };
            events(&args.socket, filter, follow, json)
        }
        Command::Top {
            interval,
            iterations,
        } => top(&args.socket, interval.max(1), iterations),
        Command::Unload { bpffs } => unload(&args.socket, bpffs),
        Command::Explain(a) => explain(&args.socket, &a),
        Command::Suggest(a) => zt::learn::suggest_main(&a),
        Command::Diff(a) => zt::learn::diff_main(&a),
    }
}

fn installed_default(matches: &clap::ArgMatches, id: &str, value: &mut PathBuf) {
    if matches.value_source(id) != Some(clap::parser::ValueSource::CommandLine) {
        if let Some(v) = zt::config::installed_setting(id) {
            *value = PathBuf::from(v);
        }
    }
}

fn check(paths: &[PathBuf], owners: bool) -> ExitCode {
    if owners {
        // What ztd refuses (sshd's StrictModes): files a non-root user could change.
        let untrusted = policy::untrusted_files(paths);
        if !untrusted.is_empty() {
            for d in &untrusted {
                eprintln!("{d}");
            }
            return ExitCode::from(1);
        }
    }
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
    println!(
        "packets     dropped: backstop {}  unparsed {}   replies allowed {} (peers recorded {})",
        d.backstop_dropped, d.unparsed_dropped, d.replies_allowed, d.replies_recorded
    );
    println!(
        "exec ids    {} decisions for callers with no exec record (exe identities match only processes that exec'd after zt first started), {} records not stored",
        d.no_exec_record, d.exec_record_failed
    );
    let e = &st.events;
    println!(
        "events      produced {}  delivered {}  lost (kernel {}, daemon {})  suppressed {}  ring {} / {} bytes  history {} / {}",
        e.produced,
        e.delivered,
        e.lost_kernel,
        e.lost_daemon,
        e.suppressed,
        e.ring_fill_bytes,
        e.ring_size_bytes,
        e.history,
        e.history_capacity
    );
    if let Some(f) = &st.flows {
        println!("flows       {}", f.summary());
    }
    if !st.last_reload.ok {
        println!("last reload FAILED: {}", st.last_reload.message);
    }
    for p in &st.problems {
        println!("problem     {p}");
    }
    for w in &st.warnings {
        println!("warning     {}", zt::trust::escape(w));
    }
    for m in &st.degraded {
        println!("DEGRADED    {m}");
    }
    if !st.lsm.is_empty() {
        println!("lsm         {}", st.lsm);
    }
    if st.repairs > 0 {
        println!("repairs     {}  last: {}", st.repairs, st.last_repair);
    }
    if let Some(p) = &st.pending_apply {
        println!(
            "pending     apply of {} (generation {}): rolled back in {} s unless `ztctl confirm`",
            p.path.display(),
            p.generation,
            p.remaining_secs
        );
    }
    if !st.top_denied.is_empty() {
        println!();
        println!(
            "{:>8}  {:<40} PEER (denied or audited, last 5 minutes)",
            "COUNT", "IDENTITY"
        );
        for f in &st.top_denied {
            println!(
                "{:>8}  {:<40} {}",
                f.count,
                zt::trust::escape(&f.identity),
                f.peer
            );
        }
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
    print_identities(&st.identities_resolved);
    println!();
    println!("{:>6} {:>10}  {:<40} LOCATION", "RULE", "HITS", "");
    for c in &st.counters {
        println!("{:>6} {:>10}  {:<40} {}", c.id, c.hits, c.rule, c.location);
    }
}

/// Each identity: what its names resolved to, and whether it can match now.
fn print_identities(ids: &[zt::control::IdentityStatus]) {
    if ids.is_empty() {
        return;
    }
    println!();
    println!("{:<20} {:<10} RESOLVED TO", "IDENTITY", "MATCHABLE");
    for i in ids {
        let mut parts = Vec::new();
        if let Some(exe) = &i.exe {
            let real = i
                .exe_real
                .as_ref()
                .map(|r| format!(" -> {}", r.display()))
                .unwrap_or_default();
            match (&i.exe_dev, i.exe_ino) {
                (Some(dev), Some(ino)) => {
                    parts.push(format!("exe {}{real} = {dev}:{ino}", exe.display()))
                }
                _ => parts.push(format!("exe {} = missing", exe.display())),
            }
        }
        if let Some(sum) = &i.sha256 {
            parts.push(format!("sha256 {}…", &sum[..sum.len().min(12)]));
        }
        match (&i.user, i.uid) {
            (Some(name), Some(uid)) => parts.push(format!("user {name} = uid {uid}")),
            (None, Some(uid)) => parts.push(format!("uid {uid}")),
            _ => {}
        }
        match (&i.group, i.gid) {
            (Some(name), Some(gid)) => parts.push(format!("group {name} = gid {gid}")),
            (None, Some(gid)) => parts.push(format!("gid {gid}")),
            _ => {}
        }
        if let Some(cg) = &i.cgroup {
            let id = i
                .cgroup_id
                .map_or("absent".to_string(), |id| format!("id {id}"));
            match &i.unit {
                Some(unit) => parts.push(format!("unit {unit} = {cg} ({id})")),
                None => parts.push(format!("cgroup {cg} ({id})")),
            }
        }
        println!(
            "{:<20} {:<10} {}",
            i.name,
            if i.matchable { "yes" } else { "NO" },
            parts.join("; ")
        );
        if let Some(p) = &i.problem {
            println!("{:<20} {:<10} problem: {p}", "", "");
        }
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
            "  passed {}  dropped: deny list {}, closed port {}, malformed {}, unparsed {}  not judged {}  audited {}  no policy {}  (events sent {}, skipped {}, lost {})",
            c.passed,
            c.dropped_deny_list,
            c.dropped_closed_port,
            c.dropped_malformed,
            c.dropped_unparsed,
            c.passed_not_judged,
            c.audited,
            c.no_policy,
            c.events_sent,
            c.events_skipped,
            c.events_lost
        );
    }
}

fn apply(socket: &std::path::Path, path: &std::path::Path, within: Duration) -> ExitCode {
    // ztd runs elsewhere: send an absolute path.
    let path = match std::path::absolute(path) {
        Ok(p) => p,
        Err(e) => {
            eprintln!("ztctl: {}: {e}", path.display());
            return ExitCode::from(1);
        }
    };
    let req = Request::Apply {
        path,
        confirm_within_ms: u64::try_from(within.as_millis()).unwrap_or(u64::MAX),
    };
    answer(ask(socket, &req), "applied")
}

fn confirm(socket: &std::path::Path) -> ExitCode {
    answer(ask(socket, &Request::Confirm), "confirmed")
}

/// Print an `Ok`/`Error` answer: exit 0, or 1 with its diagnostics.
fn answer(resp: Result<Response, ExitCode>, done: &str) -> ExitCode {
    match resp {
        Err(code) => code,
        Ok(Response::Ok { message }) => {
            println!("{done}: {message}");
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

fn events(socket: &std::path::Path, filter: EventFilter, follow: bool, json: bool) -> ExitCode {
    use std::io::Write as _;
    if !json {
        println!("{}", text_header());
    }
    let mut failed = None;
    let result = control::stream(socket, &Request::Events { filter, follow }, |line| {
        match serde_json::from_str::<FollowItem>(line) {
            Ok(FollowItem::Event(record)) => {
                let out = if json {
                    serde_json::to_string(&record).unwrap_or_default()
                } else {
                    format_text(&record)
                };
                let mut stdout = std::io::stdout().lock();
                let _ = writeln!(stdout, "{out}");
                let _ = stdout.flush();
                true
            }
            Ok(FollowItem::Notice { notice }) => {
                let out = if json {
                    serde_json::to_string(&FollowItem::Notice { notice }).unwrap_or_default()
                } else {
                    notice.text()
                };
                let mut stdout = std::io::stdout().lock();
                let _ = writeln!(stdout, "{out}");
                let _ = stdout.flush();
                true
            }
            Ok(FollowItem::Missed { missed }) => {
                eprintln!("ztctl: missed {missed} events while catching up; they are in the history (run again without --follow)");
                true
            }
            Err(_) => {
                match serde_json::from_str::<Response>(line) {
                    Ok(Response::Error { message, .. }) => failed = Some(message),
                    _ => failed = Some(format!("unexpected answer from ztd: {line}")),
                }
                false
            }
        }
    });
    if let Err(e) = result {
        eprintln!("ztctl: {e}");
        return ExitCode::from(1);
    }
    match failed {
        Some(message) => {
            eprintln!("ztctl: {message}");
            ExitCode::from(1)
        }
        None => ExitCode::SUCCESS,
    }
}

fn top(socket: &std::path::Path, interval: u64, iterations: Option<u64>) -> ExitCode {
    let mut frame = 0;
    loop {
        let st = match ask(socket, &Request::Status) {
            Err(code) => return code,
            Ok(Response::Status(st)) => st,
            Ok(other) => return unexpected(other),
        };
        // Clear the screen and go home, like top(1).
        print!("\x1b[2J\x1b[H");
        println!(
            "zt top — generation {}  {}  allowed {}  denied {}  audited {}  events lost {}",
            st.generation,
            if st.healthy { "healthy" } else { "UNHEALTHY" },
            st.decisions.allowed,
            st.decisions.denied,
            st.decisions.audited,
            st.events.lost_kernel + st.events.lost_daemon
        );
        println!();
        println!(
            "{:>6} {:>10}  {:<44} LOCATION",
            "RULE", "HITS", "BUSIEST RULES"
        );
        let mut rules = st.counters.clone();
        rules.sort_by(|a, b| b.hits.cmp(&a.hits).then(a.id.cmp(&b.id)));
        for c in rules.iter().filter(|c| c.hits > 0).take(10) {
            println!("{:>6} {:>10}  {:<44} {}", c.id, c.hits, c.rule, c.location);
        }
        println!();
        println!(
            "{:>8}  {:<40} DENIED FLOWS (last 5 minutes)",
            "COUNT", "IDENTITY"
        );
        for f in st.top_denied.iter().take(10) {
            println!(
                "{:>8}  {:<40} {}",
                f.count,
                zt::trust::escape(&f.identity),
                f.peer
            );
        }
        frame += 1;
        if iterations.is_some_and(|n| frame >= n) {
            return ExitCode::SUCCESS;
        }
        std::thread::sleep(Duration::from_secs(interval));
    }
}

#[derive(Debug, clap::Args)]
struct ExplainArgs {
    /// The executable making the connection (resolved to device and inode, as the policy's
    /// `exe` is).
    #[arg(long)]
    exe: PathBuf,
    /// Effective uid.
    #[arg(long, default_value_t = 0)]
    uid: u32,
    /// Effective gid.
    #[arg(long, default_value_t = 0)]
    gid: u32,
    /// The task's cgroup: relative to the cgroup2 root, or a path under its mount (default:
    /// the root).
    #[arg(long)]
    cgroup: Option<String>,
    /// The peer: IP:PORT ([IPv6]:PORT), or IP (port 0, for icmp). Egress: the destination;
    /// ingress: the remote source, and PORT the local port.
    #[arg(long)]
    peer: String,
    /// tcp, udp, icmp or other.
    #[arg(long)]
    proto: policy::eval::Proto,
    #[arg(long, value_parser = ["egress", "ingress"], default_value = "egress")]
    direction: String,
    /// Policy file or directory (repeatable); default: the running ztd's.
    #[arg(long)]
    policy: Vec<PathBuf>,
    /// Global mode (ztd's `--mode`); default: the running ztd's, else enforce.
    #[arg(long, value_parser = ["enforce", "audit"])]
    mode: Option<String>,
    /// Print one JSON object.
    #[arg(long)]
    json: bool,
}

fn explain(socket: &std::path::Path, a: &ExplainArgs) -> ExitCode {
    let usage = |msg: String| {
        eprintln!("ztctl explain: {msg}");
        ExitCode::from(2)
    };
    let (peer, port) = match a.peer.parse::<std::net::SocketAddr>() {
        Ok(sa) => (sa.ip(), sa.port()),
        Err(_) => match a.peer.parse::<std::net::IpAddr>() {
            Ok(ip) => (ip, 0),
            Err(_) => return usage(format!("bad --peer `{}`: expected IP:PORT", a.peer)),
        },
    };
    let (paths, daemon_mode) = if a.policy.is_empty() {
        match control::request(socket, &Request::Status, TIMEOUT) {
            Ok(Response::Status(st)) => (st.policy.clone(), Some(st.mode.clone())),
            Ok(other) => return usage(format!("unexpected answer from ztd: {other:?}")),
            Err(e) => {
                return usage(format!(
                    "no --policy given and ztd is not reachable on {}: {e}",
                    socket.display()
                ))
            }
        }
    } else {
        (a.policy.clone(), None)
    };
    let global_audit = a.mode.as_deref().or(daemon_mode.as_deref()) == Some("audit");
    let cgroup_root = sys::cgroup2_root().unwrap_or_else(|_| PathBuf::from("/sys/fs/cgroup"));
    let resolver = SystemResolver {
        cgroup_root: cgroup_root.clone(),
    };
    let exe = match policy::Resolve::exe(&resolver, &a.exe) {
        Ok(k) => k,
        Err(e) => return usage(format!("--exe {}: {e}", a.exe.display())),
    };
    let cgroup = match &a.cgroup {
        None => String::new(),
        Some(c) => {
            let p = std::path::Path::new(c);
            let rel = p.strip_prefix(&cgroup_root).unwrap_or(p);
            rel.to_string_lossy().trim_matches('/').to_string()
        }
    };
    let loaded = match policy::load(&paths, &resolver) {
        Ok((p, _warnings)) => p,
        Err(diags) => {
            for d in &diags {
                eprintln!("{d}");
            }
            return ExitCode::from(1);
        }
    };
    let q = policy::eval::Query {
        exe: Some(exe),
        uid: a.uid,
        gid: a.gid,
        cgroup,
        peer,
        port,
        proto: a.proto,
        direction: if a.direction == "ingress" {
            policy::Direction::Ingress
        } else {
            policy::Direction::Egress
        },
    };
    let e = policy::explain(&loaded, &q, global_audit);
    if a.json {
        match serde_json::to_string(&e) {
            Ok(text) => println!("{text}"),
            Err(err) => {
                eprintln!("ztctl: {err}");
                return ExitCode::from(1);
            }
        }
    } else {
        print!("{e}");
    }
    ExitCode::SUCCESS
}

#[cfg(test)]
mod install_tests {
    use super::*;
    use clap::{parser::ValueSource, CommandFactory};

    /// `--socket` after the subcommand counts as given: the installed ztd.toml never
    /// overrides it.
    #[test]
    fn a_global_socket_after_the_subcommand_is_from_the_command_line() {
        for argv in [
            ["ztctl", "status", "--socket", "/x.sock"],
            ["ztctl", "--socket", "/x.sock", "status"],
        ] {
            let m = Args::command().try_get_matches_from(argv).expect("parse");
            assert_eq!(m.value_source("socket"), Some(ValueSource::CommandLine));
        }
        let m = Args::command()
            .try_get_matches_from(["ztctl", "unload", "--bpffs", "/sys/fs/bpf/x"])
            .expect("parse");
        let (_, sub) = m.subcommand().expect("unload");
        assert_eq!(sub.value_source("bpffs"), Some(ValueSource::CommandLine));
        let m = Args::command()
            .try_get_matches_from(["ztctl", "status"])
            .expect("parse");
        assert_eq!(m.value_source("socket"), Some(ValueSource::DefaultValue));
    }
}
