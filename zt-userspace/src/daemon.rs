//! `ztd`: compile the policy, keep the programs attached and pinned, serve `ztctl`, print
//! decision events. Exiting (SIGTERM, SIGINT, a crash, `kill -9`) leaves enforcement in the
//! kernel; only `ztctl unload` removes it.

use std::{
    collections::HashMap,
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::{SystemTime, UNIX_EPOCH},
};

use aya::maps::{MapData, RingBuf};
use tokio::{
    io::{unix::AsyncFd, AsyncBufReadExt, AsyncWriteExt, BufReader, Interest},
    net::{UnixListener, UnixStream},
    signal::unix::{signal, SignalKind},
    sync::mpsc,
};
use zt_common::{Stat, FLAG_GLOBAL_AUDIT, FLAG_LOG_ALLOWED, RULE_DEFAULT};

/// Print a line to stdout; a closed stdout (a gone terminal or pipe) must never stop the
/// daemon, so errors are ignored.
macro_rules! say {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stdout().lock(), $($arg)*);
    }};
}

/// Like [`say!`], on stderr.
macro_rules! warn {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stderr().lock(), $($arg)*);
    }};
}

use crate::{
    btf,
    control::{Decisions, ReloadResult, Request, Response, RuleCounter, Status},
    events,
    loader::{self, HookStart, Layout, Loader, LoaderError},
    policy::{self, Compiled, Diagnostic, SystemResolver},
    sys,
    xdp::{self, XdpFront, XdpModePref},
};

/// Global mode of the daemon.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GlobalMode {
    Enforce,
    /// Every deny is reported as `audit` and allowed.
    Audit,
}

impl GlobalMode {
    pub fn as_str(self) -> &'static str {
        match self {
            GlobalMode::Enforce => "enforce",
            GlobalMode::Audit => "audit",
        }
    }
}

#[derive(Clone, Debug)]
pub struct Options {
    pub policy: Vec<PathBuf>,
    /// Guarded cgroup (absolute path, under the cgroup2 mount).
    pub cgroup: PathBuf,
    pub bpffs: PathBuf,
    pub socket: PathBuf,
    pub mode: GlobalMode,
    pub log_allowed: bool,
    /// Interfaces for the XDP front door (`--xdp`, repeatable; empty: none).
    pub xdp: Vec<String>,
    /// XDP attach mode (`--xdp-mode`).
    pub xdp_mode: XdpModePref,
}

#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error("the policy is invalid; nothing was attached or changed")]
    Policy(Vec<Diagnostic>),
    #[error("the policy cannot be compiled: {0}")]
    Compile(#[from] policy::CompileError),
    #[error(transparent)]
    Btf(#[from] btf::BtfError),
    #[error(transparent)]
    Loader(#[from] LoaderError),
    #[error("{what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("another ztd is already serving {0}: stop it first, or pass another --socket")]
    AlreadyRunning(PathBuf),
    #[error("cgroup {0} is not a directory of the cgroup2 filesystem; create it or pass another --cgroup")]
    NotACgroup(PathBuf),
    #[error(transparent)]
    Xdp(#[from] xdp::XdpError),
}

/// Parse, validate, resolve and compile the policy at `paths`.
pub fn compile_policy(
    paths: &[PathBuf],
    cgroup_root: &Path,
) -> Result<(Compiled, Vec<Diagnostic>), DaemonError> {
    let resolver = SystemResolver {
        cgroup_root: cgroup_root.to_path_buf(),
    };
    let (policy, warnings) = policy::load(paths, &resolver).map_err(DaemonError::Policy)?;
    let compiled = policy::compile(&policy)?;
    Ok((compiled, warnings))
}

struct State {
    loader: Loader,
    compiled: Compiled,
    opts: Options,
    last_reload: ReloadResult,
    cgroup_root: PathBuf,
    /// The XDP front door, when `--xdp` was given.
    xdp: Option<XdpFront>,
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

impl State {
    fn flags(&self) -> u32 {
        let mut flags = 0;
        if self.opts.mode == GlobalMode::Audit {
            flags |= FLAG_GLOBAL_AUDIT;
        }
        if self.opts.log_allowed {
            flags |= FLAG_LOG_ALLOWED;
        }
        flags
    }

    /// Reload: all of the new policy or nothing.
    fn reload(&mut self) -> Response {
        match compile_policy(&self.opts.policy, &self.cgroup_root) {
            Ok((compiled, warnings)) => {
                for w in &warnings {
                    warn!("{w}");
                }
                match self.loader.apply(&compiled, self.flags()) {
                    Ok(generation) => {
                        let message = format!(
                            "generation {generation}: {} rules, {} identities",
                            compiled.rules.len(),
                            compiled.identities.len()
                        );
                        say!("ztd: reloaded policy, {message}");
                        self.compiled = compiled;
                        self.last_reload = ReloadResult {
                            ok: true,
                            at: now_secs(),
                            message: message.clone(),
                        };
                        Response::Ok { message }
                    }
                    Err(e) => self.refused(e.to_string(), Vec::new()),
                }
            }
            Err(DaemonError::Policy(diags)) => self.refused(
                "the policy is invalid; the last good policy stays enforced".to_string(),
                diags.iter().map(ToString::to_string).collect(),
            ),
            Err(e) => self.refused(e.to_string(), Vec::new()),
        }
    }

    fn refused(&mut self, message: String, diagnostics: Vec<String>) -> Response {
        warn!("ztd: reload refused: {message}");
        for d in &diagnostics {
            warn!("{d}");
        }
        self.last_reload = ReloadResult {
            ok: false,
            at: now_secs(),
            message: message.clone(),
        };
        Response::Error {
            message,
            diagnostics,
        }
    }

    fn status(&self) -> Response {
        let hooks = self.loader.health();
        let xdp = self.xdp.as_ref().map(XdpFront::status).unwrap_or_default();
        let healthy = hooks.iter().all(|h| h.attached) && xdp.iter().all(|x| x.attached);
        let (generation, rules) = match self.loader.active() {
            Ok((_, cfg)) => (cfg.generation, cfg.rules),
            Err(_) => (0, 0),
        };
        let hits = self.loader.rule_hits().unwrap_or_default();
        let mut counters = vec![RuleCounter {
            id: RULE_DEFAULT,
            location: String::new(),
            rule: "default deny".to_string(),
            hits: hits.first().copied().unwrap_or(0),
        }];
        counters.extend(self.compiled.rules.iter().map(|r| RuleCounter {
            id: r.id,
            location: format!("{}:{}:{}", r.path.display(), r.line, r.column),
            rule: r.summary(),
            hits: hits.get(r.id as usize).copied().unwrap_or(0),
        }));
        let stats = self.loader.stats().unwrap_or_default();
        let stat = |s| Loader::stat(&stats, s);
        Response::Status(Box::new(Status {
            healthy,
            mode: self.opts.mode.as_str().to_string(),
            generation,
            rules,
            identities: self.compiled.identities.len() as u32,
            hooks,
            counters,
            decisions: Decisions {
                allowed: stat(Stat::Allowed),
                denied: stat(Stat::Denied),
                audited: stat(Stat::Audited),
                no_policy: stat(Stat::NoPolicy),
                exe_unreadable: stat(Stat::ExeUnreadable),
                rule_unknown: stat(Stat::RuleUnknown),
                events_sent: stat(Stat::EventSent),
                events_lost: stat(Stat::EventLost),
            },
            cgroup: self.opts.cgroup.clone(),
            bpffs: self.opts.bpffs.clone(),
            policy: self.opts.policy.clone(),
            pid: std::process::id(),
            last_reload: self.last_reload.clone(),
            xdp,
        }))
    }

    fn rule_label(&self, id: u32) -> String {
        if id == RULE_DEFAULT {
            return "default".to_string();
        }
        match self.compiled.rules.iter().find(|r| r.id == id) {
            Some(r) => format!("#{id}({}:{})", r.path.display(), r.line),
            None => format!("#{id}"),
        }
    }
}

/// Check that `cgroup` is a cgroup2 directory and return the cgroup2 root.
fn check_cgroup(cgroup: &Path) -> Result<PathBuf, DaemonError> {
    let root = sys::cgroup2_root().map_err(|source| DaemonError::Io {
        what: "finding the cgroup2 mount",
        path: PathBuf::from("/proc/self/mountinfo"),
        source,
    })?;
    if !cgroup.starts_with(&root) || !cgroup.join("cgroup.procs").exists() {
        return Err(DaemonError::NotACgroup(cgroup.to_path_buf()));
    }
    Ok(root)
}

/// Bind the control socket: root only (0600); refuse if another daemon answers there.
fn bind_socket(path: &Path) -> Result<UnixListener, DaemonError> {
    let io = |what| {
        move |source| DaemonError::Io {
            what,
            path: path.to_path_buf(),
            source,
        }
    };
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(io("creating the directory of"))?;
    }
    if path.exists() {
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            return Err(DaemonError::AlreadyRunning(path.to_path_buf()));
        }
        std::fs::remove_file(path).map_err(io("removing the stale socket"))?;
    }
    let listener = UnixListener::bind(path).map_err(io("binding the control socket"))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .map_err(io("restricting the control socket"))?;
    Ok(listener)
}

/// Run the daemon until a signal or `unload`.
pub async fn run(opts: Options) -> Result<(), DaemonError> {
    let cgroup_root = check_cgroup(&opts.cgroup)?;
    // Everything that can fail on bad input happens before the kernel is touched.
    let (compiled, warnings) = compile_policy(&opts.policy, &cgroup_root)?;
    for w in &warnings {
        warn!("{w}");
    }
    for iface in &opts.xdp {
        xdp::ifindex(iface)?;
    }
    let offsets = btf::kernel_offsets()?;
    sys::ensure_bpffs(&opts.bpffs).map_err(|source| DaemonError::Io {
        what: "preparing the pin directory",
        path: opts.bpffs.clone(),
        source,
    })?;
    let listener = bind_socket(&opts.socket)?;

    let layout = Layout {
        bpffs: opts.bpffs.clone(),
    };
    let loader = Loader::load(&layout, &opts.cgroup, offsets)?;
    let mut state = State {
        compiled,
        opts: opts.clone(),
        last_reload: ReloadResult {
            ok: true,
            at: now_secs(),
            message: String::new(),
        },
        cgroup_root,
        loader,
        xdp: None,
    };
    let flags = state.flags();
    let generation = state.loader.apply(&state.compiled, flags)?;
    let started = state.loader.attach_or_adopt()?;
    let adopted = started
        .iter()
        .filter(|(_, s)| *s == HookStart::Replaced)
        .count();
    let summary = format!(
        "generation {generation}: {} rules, {} identities",
        state.compiled.rules.len(),
        state.compiled.identities.len()
    );
    state.last_reload.message = summary.clone();
    if !opts.xdp.is_empty() {
        state.xdp = Some(start_xdp(&layout, &opts)?);
    }
    // A front door pinned by an earlier run for an interface not named now stays attached
    // (enforcement is only removed by `ztctl unload`); say so.
    for iface in xdp::others(&layout, &opts.xdp) {
        warn!("ztd: an XDP front door pinned by an earlier run is still attached to {iface} (not managed: no --xdp {iface}); `ztctl unload` or removing {} detaches it", xdp::link_path(&layout, &iface).display());
    }
    say!(
        "ztd: guarding {} in {} mode, {summary}; {} hooks {} (pinned under {}); control socket {}",
        opts.cgroup.display(),
        opts.mode.as_str(),
        loader::CGROUP_HOOKS.len(),
        if adopted > 0 {
            "adopted from pins, programs replaced in place"
        } else {
            "attached"
        },
        opts.bpffs.display(),
        opts.socket.display()
    );
    let events_map = state.loader.take_events();
    let state = Arc::new(Mutex::new(state));

    let (unload_tx, mut unload_rx) = mpsc::channel::<()>(1);
    let mut term = signal(SignalKind::terminate()).map_err(sig_err)?;
    let mut int = signal(SignalKind::interrupt()).map_err(sig_err)?;
    let mut hup = signal(SignalKind::hangup()).map_err(sig_err)?;

    if let Some(map) = events_map {
        match RingBuf::try_from(map) {
            Ok(ring) => {
                let state = Arc::clone(&state);
                tokio::spawn(async move { print_events(ring, state).await });
            }
            Err(e) => warn!("ztd: events unavailable: {e}"),
        }
    }

    loop {
        tokio::select! {
            accepted = listener.accept() => {
                if let Ok((stream, _)) = accepted {
                    let state = Arc::clone(&state);
                    let unload_tx = unload_tx.clone();
                    tokio::spawn(async move { serve(stream, state, unload_tx).await });
                }
            }
            _ = hup.recv() => {
                if let Ok(mut s) = state.lock() {
                    s.reload();
                }
            }
            _ = term.recv() => break,
            _ = int.recv() => break,
            _ = unload_rx.recv() => {
                let _ = std::fs::remove_file(&opts.socket);
                say!("ztd: unloaded; exiting");
                return Ok(());
            }
        }
    }
    let _ = std::fs::remove_file(&opts.socket);
    say!(
        "ztd: stopping; enforcement stays in the kernel (pinned under {}). `ztctl unload --bpffs {}` removes it.",
        opts.bpffs.display(),
        opts.bpffs.display()
    );
    Ok(())
}

/// Attach (or adopt) the XDP front door on every `--xdp` interface, after the policy is in
/// the maps.
fn start_xdp(layout: &Layout, opts: &Options) -> Result<XdpFront, DaemonError> {
    let mut front = XdpFront::load(layout)?;
    for iface in &opts.xdp {
        let started = front.attach_or_adopt(iface, opts.xdp_mode)?;
        if let Some(tried) = &started.fallback {
            warn!("ztd: XDP on {iface}: {tried}");
        }
        say!(
            "ztd: XDP front door on {iface} ({} mode): {}",
            if started.mode.is_empty() {
                "unknown"
            } else {
                &started.mode
            },
            match started.start {
                HookStart::Attached => "attached",
                HookStart::Replaced => "adopted from its pin, program replaced in place",
            }
        );
    }
    Ok(front)
}

fn sig_err(source: std::io::Error) -> DaemonError {
    DaemonError::Io {
        what: "installing a signal handler",
        path: PathBuf::new(),
        source,
    }
}

async fn serve(stream: UnixStream, state: Arc<Mutex<State>>, unload_tx: mpsc::Sender<()>) {
    let (read, mut write) = stream.into_split();
    let mut lines = BufReader::new(read).lines();
    while let Ok(Some(line)) = lines.next_line().await {
        let mut unloaded = false;
        let response = match serde_json::from_str::<Request>(&line) {
            Err(e) => Response::Error {
                message: format!("bad request: {e}"),
                diagnostics: Vec::new(),
            },
            Ok(req) => match state.lock() {
                Err(_) => Response::Error {
                    message: "ztd state is poisoned by an earlier panic; restart ztd".to_string(),
                    diagnostics: Vec::new(),
                },
                Ok(mut s) => match req {
                    Request::Status => s.status(),
                    Request::Reload => s.reload(),
                    Request::Unload => {
                        let layout = Layout {
                            bpffs: s.opts.bpffs.clone(),
                        };
                        match loader::unload(&layout) {
                            Ok(removed) => {
                                unloaded = true;
                                Response::Ok {
                                    message: format!(
                                        "detached and unpinned {} objects under {}",
                                        removed.len(),
                                        layout.bpffs.display()
                                    ),
                                }
                            }
                            Err(e) => Response::Error {
                                message: format!("unload failed: {e}"),
                                diagnostics: Vec::new(),
                            },
                        }
                    }
                },
            },
        };
        let mut text = serde_json::to_string(&response).unwrap_or_else(|e| {
            format!(r#"{{"result":"error","message":"cannot encode response: {e}"}}"#)
        });
        text.push('\n');
        if write.write_all(text.as_bytes()).await.is_err() {
            return;
        }
        if unloaded {
            let _ = unload_tx.send(()).await;
            return;
        }
    }
}

async fn print_events(ring: RingBuf<aya::maps::MapData>, state: Arc<Mutex<State>>) {
    let offset = events::monotonic_to_realtime_offset();
    let mut exe_cache = HashMap::new();
    // SAFETY: the ring buffer owns its fd for as long as the AsyncFd owns the ring buffer.
    let mut fd = match unsafe { AsyncFd::register_with_interest(ring, Interest::READABLE) } {
        Ok(fd) => fd,
        Err(e) => {
            warn!("ztd: cannot poll the event ring buffer: {e}");
            return;
        }
    };
    loop {
        let mut guard = match fd.readable_mut().await {
            Ok(g) => g,
            Err(e) => {
                warn!("ztd: event ring buffer: {e}");
                return;
            }
        };
        let ring: &mut RingBuf<MapData> = guard.get_inner_mut();
        while let Some(item) = ring.next() {
            let Some(ev) = events::parse(&item) else {
                continue;
            };
            let exe = events::exe_path(ev.tgid, &mut exe_cache);
            let rule = match state.lock() {
                Ok(s) => s.rule_label(ev.rule),
                Err(_) => format!("#{}", ev.rule),
            };
            say!("{}", events::format_line(&ev, offset, &exe, &rule));
        }
        guard.clear_ready();
    }
}
