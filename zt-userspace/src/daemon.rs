//! `ztd`: compile the policy, keep the programs attached and pinned, serve `ztctl`, print
//! decision events. Exiting (SIGTERM, SIGINT, a crash, `kill -9`) leaves enforcement in the
//! kernel; only `ztctl unload` removes it.

use std::{
    collections::HashMap,
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Mutex,
    },
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use aya::maps::{MapData, RingBuf};
use tokio::{
    io::{unix::AsyncFd, AsyncBufReadExt, AsyncWriteExt, BufReader, Interest},
    net::{UnixListener, UnixStream},
    signal::unix::{signal, SignalKind},
    sync::mpsc,
};
use zt_common::{
    DecisionEvent, Stat, EVENT_RING_BYTES, FLAG_GLOBAL_AUDIT, FLAG_LOG_ALLOWED, RULE_DEFAULT,
};

/// How ztd writes its lines (`--log-format`); set once at start-up.
static LOG_FORMAT: std::sync::OnceLock<LogFormat> = std::sync::OnceLock::new();

fn log_format() -> LogFormat {
    LOG_FORMAT.get().copied().unwrap_or(LogFormat::Text)
}

/// Write one line: as it is, or as a JSON object (`time`, `level`, `msg`, fields). A closed
/// stdout or stderr (a gone terminal or pipe) must never stop the daemon: errors are ignored.
fn emit_line(to_stderr: bool, level: &str, message: &str, fields: &[(&str, serde_json::Value)]) {
    use std::io::Write as _;
    let line = match log_format() {
        LogFormat::Text => message.to_string(),
        LogFormat::Json => log_line(LogFormat::Json, level, message, fields),
    };
    if to_stderr {
        let prefix = journal_prefix(level, stderr_is_journal());
        let _ = writeln!(std::io::stderr().lock(), "{prefix}{line}");
    } else {
        let _ = writeln!(std::io::stdout().lock(), "{line}");
    }
}

/// Whether stderr is the journal (`JOURNAL_STREAM`, under systemd): then warning and error
/// lines carry their syslog priority. Decided once.
pub fn stderr_is_journal() -> bool {
    static IS: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *IS.get_or_init(|| {
        use std::os::unix::fs::MetadataExt as _;
        let stream = std::env::var("JOURNAL_STREAM").ok();
        std::fs::metadata("/proc/self/fd/2")
            .is_ok_and(|m| is_journal_stream(stream.as_deref(), m.dev(), m.ino()))
    })
}

/// Print an informational line to stdout.
macro_rules! say {
    ($($arg:tt)*) => {{
        emit_line(false, "info", &format!($($arg)*), &[]);
    }};
}

/// Print a warning or error line to stderr.
macro_rules! warn {
    ($($arg:tt)*) => {{
        emit_line(true, "warn", &format!($($arg)*), &[]);
    }};
}

use crate::{
    btf,
    control::{
        self, Decisions, EventStats, HookDecisions, PendingApply, ReloadResult, ReloadTimings,
        Request, Response, RuleCounter, Status, TopFlow,
    },
    enrich::Enricher,
    events,
    flows::{self, FlowStore},
    history::{
        is_journal_stream, journal_prefix, log_line, now_ns, EventFilter, EventRecord, FollowItem,
        History, LogFormat,
    },
    identity_watch::{self, Targets},
    loader::{self, ApplyStats, HookStart, Layout, Loader, LoaderError},
    metrics::{self, MetricsSnapshot},
    notice::{self, Notice},
    policy::{self, Compiled, Diagnostic, LiveResolver, SystemResolver},
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
    /// Events kept in memory for `ztctl events` (`--history`).
    pub history: usize,
    /// Serve Prometheus metrics here (`--metrics`).
    pub metrics: Option<std::net::SocketAddr>,
    /// How ztd writes its lines (`--log-format`).
    pub log_format: LogFormat,
    /// How often the kernel state is checked for tampering and repaired (`--check-interval`;
    /// zero: never repaired, `status` still reports problems).
    pub check_interval: Duration,
    /// Start without the cgroup hooks this kernel cannot load (`--allow-missing-hooks`),
    /// naming each; refused otherwise (see [`crate::support`]).
    pub allow_missing_hooks: bool,
    /// Reload when the policy files change (inotify; `--no-watch` turns it off).
    pub watch: bool,
    /// The persistent flow store (`--flows-*`; `None`: `--no-flows`).
    pub flows: Option<flows::StoreConfig>,
    /// Where `unit = "..."` identities are searched (`--units-root`; default: the cgroup2
    /// root).
    pub units_root: Option<PathBuf>,
    /// Members of this group (a name or a gid) may make read-only control requests
    /// (`status`, `events`); `None`: root only (`--control-group`).
    pub control_group: Option<String>,
}

/// The symlink a Kubernetes ConfigMap or Secret volume swaps atomically on update.
const CONFIGMAP_DATA: &str = "..data";

/// How long the policy files must be quiet after a change before ztd reloads.
pub const WATCH_DEBOUNCE: Duration = Duration::from_millis(300);

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
    #[error(transparent)]
    Metrics(#[from] metrics::MetricsError),
    #[error("another ztd is already serving {0}: stop it first, or pass another --socket")]
    AlreadyRunning(PathBuf),
    #[error("cgroup {0} is not a directory of the cgroup2 filesystem; create it or pass another --cgroup")]
    NotACgroup(PathBuf),
    #[error(transparent)]
    Xdp(#[from] xdp::XdpError),
    #[error("the control socket {socket} would be in {dir}, which is not safe: {why}; put it in a directory only root can change (e.g. /run/zt)")]
    UnsafeSocketDir {
        socket: PathBuf,
        dir: PathBuf,
        why: String,
    },
    #[error("{0} exists and is not a socket: ztd replaces only a stale socket of its own; remove it, or pass another --socket")]
    NotASocket(PathBuf),
    #[error("--control-group {0}: no such group")]
    NoSuchGroup(String),
    #[error("--units-root {dir} is not a directory below the cgroup2 mount {root}: pass a cgroup directory (units are searched in its system.slice, user slices and nested slices)")]
    NotAUnitsRoot { dir: PathBuf, root: PathBuf },
}

/// Parse, validate, resolve and compile the policy at `paths`.
pub fn compile_policy(
    paths: &[PathBuf],
    cgroup_root: &Path,
) -> Result<(Compiled, Vec<Diagnostic>), DaemonError> {
    compile_policy_timed(paths, cgroup_root).map(|(c, w, _)| (c, w))
}

/// [`compile_policy`], also timing it: `parse_us` and `compile_us` filled in (the parsed
/// policy is dropped before this returns).
pub fn compile_policy_timed(
    paths: &[PathBuf],
    cgroup_root: &Path,
) -> Result<(Compiled, Vec<Diagnostic>, ReloadTimings), DaemonError> {
    let resolver = SystemResolver {
        cgroup_root: cgroup_root.to_path_buf(),
    };
    let started = Instant::now();
    let (policy, warnings) = policy::load(paths, &resolver).map_err(DaemonError::Policy)?;
    let parsed = Instant::now();
    let compiled = policy::compile(&policy)?;
    let timings = ReloadTimings {
        parse_us: micros(parsed - started),
        compile_us: micros(parsed.elapsed()),
        ..ReloadTimings::default()
    };
    Ok((compiled, warnings, timings))
}

fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}

/// `timings` (parse and compile) completed by an apply that took `apply` and wrote `stats`.
fn with_apply(mut timings: ReloadTimings, apply: Duration, stats: ApplyStats) -> ReloadTimings {
    timings.apply_us = micros(apply);
    timings.total_us = timings.parse_us + timings.compile_us + timings.apply_us;
    timings.map_updates = stats.updates;
    timings.map_deletes = stats.deletes;
    timings
}

/// A compiled policy, its warnings, the text it was compiled from, and how long reading
/// and compiling took.
type Compiled3 = (
    Compiled,
    Vec<Diagnostic>,
    Vec<(PathBuf, String)>,
    ReloadTimings,
);

/// Read, validate, resolve and compile the policy at `paths` (see [`compile_sources`]).
fn compile_paths(
    cgroup_root: &Path,
    units_root: &Path,
    paths: &[PathBuf],
    lenient: bool,
) -> Result<Compiled3, DaemonError> {
    let resolver = LiveResolver {
        system: SystemResolver {
            cgroup_root: cgroup_root.to_path_buf(),
        },
        units_root: units_root.to_path_buf(),
        lenient,
    };
    let started = Instant::now();
    // Only files root alone can change (sshd's StrictModes): checked before they are read.
    let untrusted = policy::untrusted_files(paths);
    if !untrusted.is_empty() {
        return Err(DaemonError::Policy(untrusted));
    }
    let (policy, warnings, sources) =
        policy::load_keeping_sources(paths, &resolver).map_err(DaemonError::Policy)?;
    let parsed = Instant::now();
    let compiled = policy::compile(&policy)?;
    let timings = ReloadTimings {
        parse_us: micros(parsed - started),
        compile_us: micros(parsed.elapsed()),
        ..ReloadTimings::default()
    };
    Ok((compiled, warnings, sources, timings))
}

/// Validate, resolve (units below `units_root`; `lenient`: a missing `exe` disables its
/// identity instead of refusing the policy) and compile policy text.
fn compile_sources(
    cgroup_root: &Path,
    units_root: &Path,
    sources: &[(PathBuf, String)],
    lenient: bool,
) -> Result<(Compiled, Vec<Diagnostic>), DaemonError> {
    let resolver = LiveResolver {
        system: SystemResolver {
            cgroup_root: cgroup_root.to_path_buf(),
        },
        units_root: units_root.to_path_buf(),
        lenient,
    };
    let (policy, warnings) =
        policy::load_sources(sources, &resolver).map_err(DaemonError::Policy)?;
    let compiled = policy::compile(&policy)?;
    Ok((compiled, warnings))
}

struct State {
    /// The policy text the active generation was compiled from: identities are resolved
    /// again from it, whatever state the files are in.
    sources: Vec<(PathBuf, String)>,
    /// Where units are searched (`--units-root`, else the cgroup2 root).
    units_root: PathBuf,
    /// Where notices go (set once the history exists).
    history: Option<Arc<Mutex<History>>>,
    /// An identity changed while an apply was pending: re-resolve once it is settled.
    reresolve_due: bool,
    loader: Loader,
    compiled: Compiled,
    opts: Options,
    last_reload: ReloadResult,
    cgroup_root: PathBuf,
    /// The XDP front door, when `--xdp` was given.
    xdp: Option<XdpFront>,
    /// A `ztctl apply` waiting for `ztctl confirm`.
    pending: Option<Pending>,
    /// Repairs made since start, and what the last one did.
    repairs: u64,
    last_repair: String,
    /// The problems last logged (each tamper is logged once, not every check).
    reported: Vec<String>,
    /// The policy path changed (a confirmed apply): the file watch must follow it.
    rewatch: bool,
    /// The flow store, for `status`.
    flows: flows::Recorder,
    /// The warnings of the policy in force (for `status`).
    warnings: Vec<String>,
}

/// An applied policy waiting for confirmation, and what to roll back to.
struct Pending {
    path: PathBuf,
    generation: u64,
    deadline: Instant,
    deadline_unix: u64,
    previous: Compiled,
    previous_sources: Vec<(PathBuf, String)>,
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

    /// Reload: all of the new policy or nothing. A policy identical to the active one (same
    /// hash) keeps the generation.
    fn reload(&mut self) -> Response {
        let _reloading = crate::notify::Reloading::begin();
        let response = self.reload_policy();
        sys::trim_heap();
        response
    }

    fn reload_policy(&mut self) -> Response {
        if let Some(p) = &self.pending {
            let message = format!(
                "an apply of {} (generation {}) is pending: `ztctl confirm` it or wait for its rollback, then reload",
                p.path.display(),
                p.generation
            );
            return self.refused(message, Vec::new());
        }
        match self.compile(&self.opts.policy.clone(), false) {
            Ok((compiled, warnings, sources, timings)) => {
                for w in &warnings {
                    warn!("{w}");
                }
                self.warnings = warnings.iter().map(ToString::to_string).collect();
                self.sources = sources;
                let changes = notice::changes(&self.compiled.identities, &compiled.identities);
                let started = Instant::now();
                match self.loader.apply_or_keep(&compiled, self.flags()) {
                    Ok((generation, true)) => {
                        let timings = with_apply(timings, started.elapsed(), ApplyStats::default());
                        self.raise(changes, generation);
                        let message = format!(
                            "generation {generation}: unchanged ({} rules, {} identities); nothing written",
                            compiled.rules.len(),
                            compiled.identities.len()
                        );
                        say!("ztd: reloaded policy, {message}; {}", timings.summary());
                        self.compiled = compiled;
                        self.last_reload = ReloadResult {
                            ok: true,
                            at: now_secs(),
                            message: message.clone(),
                            timings: Some(timings),
                        };
                        Response::Ok { message }
                    }
                    Ok((generation, false)) => {
                        let timings =
                            with_apply(timings, started.elapsed(), self.loader.last_apply());
                        self.raise(changes, generation);
                        let message = format!(
                            "generation {generation}: {} rules, {} identities",
                            compiled.rules.len(),
                            compiled.identities.len()
                        );
                        say!("ztd: reloaded policy, {message}; {}", timings.summary());
                        self.compiled = compiled;
                        self.last_reload = ReloadResult {
                            ok: true,
                            at: now_secs(),
                            message: message.clone(),
                            timings: Some(timings),
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

    /// Parse, validate, resolve (units below `--units-root`; `lenient`: a missing `exe`
    /// disables its identity instead of refusing the policy) and compile.
    /// Returns the text it compiled too, for [`State::reresolve`].
    fn compile(&self, paths: &[PathBuf], lenient: bool) -> Result<Compiled3, DaemonError> {
        compile_paths(&self.cgroup_root, &self.units_root, paths, lenient)
    }

    /// Log and keep a notice for each change ([`notice::changes`]), now in force as
    /// `generation`.
    fn raise(&mut self, changes: Vec<(zt_common::NoticeKind, String, String)>, generation: u64) {
        for (kind, identity, message) in changes {
            let mut n = Notice::new(kind, &identity, message, now_ns());
            n.generation = generation;
            match log_format() {
                LogFormat::Text => warn!("ztd: {}", n.text()),
                LogFormat::Json => emit_line(
                    true,
                    "warn",
                    "notice",
                    &[
                        ("kind", serde_json::Value::from(n.kind.clone())),
                        ("code", serde_json::Value::from(n.code)),
                        ("identity", serde_json::Value::from(n.identity.clone())),
                        ("message", serde_json::Value::from(n.message.clone())),
                    ],
                ),
            }
            if let Some(h) = &self.history {
                if let Ok(mut h) = h.lock() {
                    h.push_notice(n);
                }
            }
        }
    }

    /// Something an identity names changed on the system (a file replaced, a cgroup
    /// recreated): resolve the active policy again and apply the result if it differs. The
    /// policy text is read again; if it no longer validates, the file watch reports that.
    fn reresolve(&mut self) {
        if self.pending.is_some() {
            // Done once the apply is confirmed or rolled back (housekeeping).
            self.reresolve_due = true;
            return;
        }
        self.reresolve_due = false;
        match compile_sources(&self.cgroup_root, &self.units_root, &self.sources, true) {
            Ok((compiled, _)) => {
                let changes = notice::changes(&self.compiled.identities, &compiled.identities);
                match self.loader.apply_or_keep(&compiled, self.flags()) {
                    Ok((generation, kept)) => {
                        self.raise(changes, generation);
                        if !kept {
                            say!(
                                "ztd: identities re-resolved: generation {generation}: {} rules, {} identities",
                                compiled.rules.len(),
                                compiled.identities.len()
                            );
                        }
                        self.compiled = compiled;
                    }
                    Err(e) => warn!("ztd: applying re-resolved identities failed: {e}; retrying on the next change"),
                }
            }
            Err(DaemonError::Policy(diags)) => {
                warn!("ztd: re-resolving identities failed; the last good policy stays enforced");
                for d in &diags {
                    warn!("{d}");
                }
            }
            Err(e) => {
                warn!("ztd: re-resolving identities: {e}; the last good policy stays enforced")
            }
        }
    }

    /// `ztctl apply PATH --confirm-within D`: apply PATH as the next generation now; roll
    /// back unless confirmed in time. An invalid PATH changes nothing.
    fn apply_pending(&mut self, path: PathBuf, within: Duration) -> Response {
        let response = self.apply_pending_policy(path, within);
        sys::trim_heap();
        response
    }

    fn apply_pending_policy(&mut self, path: PathBuf, within: Duration) -> Response {
        if let Some(p) = &self.pending {
            return Response::Error {
                message: format!(
                    "an apply of {} (generation {}) is already pending: `ztctl confirm` it or wait for its rollback",
                    p.path.display(),
                    p.generation
                ),
                diagnostics: Vec::new(),
            };
        }
        let (compiled, sources, timings) = match self.compile(std::slice::from_ref(&path), false) {
            Ok((compiled, warnings, sources, timings)) => {
                for w in &warnings {
                    warn!("{w}");
                }
                (compiled, sources, timings)
            }
            Err(DaemonError::Policy(diags)) => {
                return Response::Error {
                    message: format!("{} is invalid; nothing was changed", path.display()),
                    diagnostics: diags.iter().map(ToString::to_string).collect(),
                }
            }
            Err(e) => {
                return Response::Error {
                    message: format!("{}: {e}; nothing was changed", path.display()),
                    diagnostics: Vec::new(),
                }
            }
        };
        let started = Instant::now();
        match self.loader.apply(&compiled, self.flags()) {
            Ok(generation) => {
                let timings = with_apply(timings, started.elapsed(), self.loader.last_apply());
                let message = format!(
                    "generation {generation}: {} applied ({} rules, {} identities); rolled back in {} unless `ztctl confirm`",
                    path.display(),
                    compiled.rules.len(),
                    compiled.identities.len(),
                    humantime::format_duration(within)
                );
                say!("ztd: apply: {message}");
                let previous = std::mem::replace(&mut self.compiled, compiled);
                let previous_sources = std::mem::replace(&mut self.sources, sources);
                self.pending = Some(Pending {
                    previous_sources,
                    path,
                    generation,
                    deadline: Instant::now() + within,
                    deadline_unix: now_secs()
                        + within.as_secs()
                        + u64::from(within.subsec_nanos() > 0),
                    previous,
                });
                self.last_reload = ReloadResult {
                    ok: true,
                    at: now_secs(),
                    message: message.clone(),
                    timings: Some(timings),
                };
                Response::Ok { message }
            }
            Err(e) => Response::Error {
                message: format!("applying {}: {e}", path.display()),
                diagnostics: Vec::new(),
            },
        }
    }

    /// `ztctl confirm`: keep the pending apply; its path becomes the policy path.
    fn confirm(&mut self) -> Response {
        let Some(p) = self.pending.take() else {
            return Response::Error {
                message: "nothing to confirm: no apply is pending".to_string(),
                diagnostics: Vec::new(),
            };
        };
        let message = format!(
            "generation {} confirmed; {} is the policy path until ztd restarts",
            p.generation,
            p.path.display()
        );
        say!("ztd: apply: {message}");
        self.opts.policy = vec![p.path];
        self.rewatch = true;
        Response::Ok { message }
    }

    /// Roll back a pending apply whose deadline passed: re-apply the previous policy as a new
    /// generation.
    fn rollback_if_due(&mut self) {
        if self
            .pending
            .as_ref()
            .is_none_or(|p| Instant::now() < p.deadline)
        {
            return;
        }
        let Some(p) = self.pending.take() else {
            return;
        };
        let started = Instant::now();
        match self.loader.apply(&p.previous, self.flags()) {
            Ok(generation) => {
                let timings = with_apply(
                    ReloadTimings::default(),
                    started.elapsed(),
                    self.loader.last_apply(),
                );
                let message = format!(
                    "apply of {} (generation {}) not confirmed in time: rolled back to the previous policy as generation {generation}",
                    p.path.display(),
                    p.generation
                );
                warn!("ztd: {message}");
                self.compiled = p.previous;
                self.sources = p.previous_sources;
                sys::trim_heap();
                self.last_reload = ReloadResult {
                    ok: true,
                    at: now_secs(),
                    message,
                    timings: Some(timings),
                };
            }
            Err(e) => {
                warn!(
                    "ztd: rollback of the apply of {} failed: {e}; retrying",
                    p.path.display()
                );
                self.pending = Some(p);
            }
        }
    }

    /// Problems with the kernel state, as text (empty: healthy).
    fn problems(&self) -> Vec<String> {
        let mut out: Vec<String> = self
            .loader
            .problems()
            .iter()
            .map(ToString::to_string)
            .collect();
        for iface in self.xdp_down() {
            out.push(format!("xdp {iface}: the front door is not attached"));
        }
        for id in &self.compiled.identities {
            if let Some(p) = &id.problem {
                out.push(format!(
                    "identity {}: {p}; it matches nothing until this is fixed",
                    id.name
                ));
            }
        }
        out
    }

    fn xdp_down(&self) -> Vec<String> {
        self.xdp
            .as_ref()
            .map(|f| {
                f.status()
                    .into_iter()
                    .filter(|x| !x.attached)
                    .map(|x| x.iface)
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Check the kernel state; log and repair what was tampered with.
    fn check_and_repair(&mut self) {
        let problems = self.loader.problems();
        let xdp_down = self.xdp_down();
        if problems.is_empty() && xdp_down.is_empty() {
            self.reported.clear();
            return;
        }
        let texts = self.problems();
        if texts != self.reported {
            for t in &texts {
                warn!("ztd: tamper: {t}");
            }
            self.reported = texts;
        }
        let mut done = Vec::new();
        let mut failed = false;
        for p in &problems {
            match self.loader.repair(p) {
                Ok(m) => done.push(m),
                Err(e) => {
                    failed = true;
                    warn!("ztd: repair failed: {p}: {e}");
                }
            }
        }
        let pref = self.opts.xdp_mode;
        for iface in xdp_down {
            if let Some(front) = self.xdp.as_mut() {
                match front.attach_or_adopt(&iface, pref) {
                    Ok(_) => done.push(format!("xdp {iface}: re-attached")),
                    Err(e) => {
                        failed = true;
                        warn!("ztd: repair failed: xdp {iface}: {e}");
                    }
                }
            }
        }
        if !done.is_empty() {
            self.repairs += done.len() as u64;
            self.last_repair = done.join("; ");
            say!("ztd: repaired: {}", self.last_repair);
        }
        if !failed {
            self.reported.clear();
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
            timings: None,
        };
        Response::Error {
            message,
            diagnostics,
        }
    }

    fn status(&self, history: &History) -> Response {
        let hooks = self.loader.health();
        let xdp = self.xdp.as_ref().map(XdpFront::status).unwrap_or_default();
        let problems = self.problems();
        let healthy = hooks.iter().all(|h| h.attached)
            && xdp.iter().all(|x| x.attached)
            && problems.is_empty();
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
        let (xdp_sent, xdp_lost, xdp_skipped) = xdp.iter().fold((0, 0, 0), |acc, x| {
            (
                acc.0 + x.counters.events_sent,
                acc.1 + x.counters.events_lost,
                acc.2 + x.counters.events_skipped,
            )
        });
        let counted = history.counters();
        let lost_kernel = stat(Stat::EventLost) + xdp_lost;
        let events = EventStats {
            produced: stat(Stat::EventSent) + xdp_sent + lost_kernel,
            delivered: counted.delivered,
            lost_kernel,
            lost_daemon: counted.lost_in_daemon,
            suppressed: stat(Stat::EventSuppressed) + xdp_skipped,
            ring_fill_bytes: self.loader.ring_fill(),
            ring_size_bytes: u64::from(EVENT_RING_BYTES),
            history: counted.len,
            history_capacity: counted.capacity,
            evicted: counted.evicted,
            follower_missed: counted.follower_missed,
        };
        let top_denied = history
            .top_denied(std::time::Duration::from_secs(300), 10, now_ns())
            .into_iter()
            .map(|(identity, peer, count)| TopFlow {
                identity,
                peer,
                count,
            })
            .collect();
        let decisions_by_hook = self
            .loader
            .hook_verdicts()
            .into_iter()
            .map(|(hook, verdict, count)| HookDecisions {
                hook: hook.name().to_string(),
                verdict: events::verdict_name(verdict as u8).to_string(),
                count,
            })
            .collect();
        Response::Status(Box::new(Status {
            degraded: self.loader.missing().to_vec(),
            lsm: self.loader.lsm().to_string(),
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
                no_exec_record: stat(Stat::NoExecRecord),
                exec_record_failed: stat(Stat::ExecRecordFailed),
                rule_unknown: stat(Stat::RuleUnknown),
                events_sent: stat(Stat::EventSent),
                events_lost: stat(Stat::EventLost),
                unparsed_dropped: stat(Stat::SkbUnparsedDropped),
                backstop_dropped: stat(Stat::SkbDropped),
                replies_allowed: stat(Stat::ReplyAllowed),
                replies_recorded: stat(Stat::ReplyRecorded),
                family_denied: stat(Stat::FamilyDenied),
            },
            cgroup: self.opts.cgroup.clone(),
            bpffs: self.opts.bpffs.clone(),
            policy: self.opts.policy.clone(),
            pid: std::process::id(),
            last_reload: self.last_reload.clone(),
            xdp,
            events,
            top_denied,
            decisions_by_hook,
            problems,
            repairs: self.repairs,
            last_repair: self.last_repair.clone(),
            identities_resolved: self
                .compiled
                .identities
                .iter()
                .map(identity_watch::status_of)
                .collect(),
            pending_apply: self.pending.as_ref().map(|p| PendingApply {
                path: p.path.clone(),
                generation: p.generation,
                deadline: p.deadline_unix,
                remaining_secs: p
                    .deadline
                    .saturating_duration_since(Instant::now())
                    .as_secs(),
            }),
            flows: self.flows.status(),
            warnings: crate::trust::cgroup_escape_warning(&self.opts.cgroup, &self.cgroup_root)
                .into_iter()
                .chain(self.warnings.iter().cloned())
                .collect(),
        }))
    }

    /// Where a rule is, for event records: `path:line:column`, or `default`.
    /// Rule `id` (`rules[i].id == i + 1`: no search, events look rules up at a high rate).
    fn rule(&self, id: u32) -> Option<&policy::RuleInfo> {
        let i = usize::try_from(id).ok()?.checked_sub(1)?;
        self.compiled.rules.get(i).filter(|r| r.id == id)
    }

    fn rule_location(&self, id: u32) -> String {
        match self.rule(id) {
            Some(r) if id != RULE_DEFAULT => {
                format!("{}:{}:{}", r.path.display(), r.line, r.column)
            }
            _ => "default".to_string(),
        }
    }

    fn rule_label(&self, id: u32) -> String {
        if id == RULE_DEFAULT {
            return "default".to_string();
        }
        match self.rule(id) {
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

/// `--units-root` (absolute, a directory below the cgroup2 mount), else the cgroup2 root.
fn check_units_root(cgroup_root: &Path, units_root: Option<&Path>) -> Result<PathBuf, DaemonError> {
    let Some(dir) = units_root else {
        return Ok(cgroup_root.to_path_buf());
    };
    if !dir.starts_with(cgroup_root) || !dir.is_dir() {
        return Err(DaemonError::NotAUnitsRoot {
            dir: dir.to_path_buf(),
            root: cgroup_root.to_path_buf(),
        });
    }
    Ok(dir.to_path_buf())
}

/// `kernel.yama.ptrace_scope`, or `None` when Yama is not enabled (no such sysctl).
fn ptrace_scope() -> Option<u32> {
    std::fs::read_to_string("/proc/sys/kernel/yama/ptrace_scope")
        .ok()
        .and_then(|s| s.trim().parse().ok())
}

/// What ptrace leaves open while `exe` identities are in use: a process that may trace one
/// running an allowed executable can make it connect for it (the identity is the tracee's).
/// Only `ptrace_scope` 2 (admin only) or 3 (none) closes that.
pub fn ptrace_warning(scope: Option<u32>) -> Option<String> {
    let how = match scope {
        Some(s) if s >= 2 => return None,
        Some(1) => "kernel.yama.ptrace_scope is 1: a user may still ptrace its own children (a debugger that starts an allowed program)".to_string(),
        Some(s) => format!("kernel.yama.ptrace_scope is {s}: any process may ptrace others of its user"),
        None => "Yama is not enabled (no kernel.yama.ptrace_scope): any process may ptrace others of its user".to_string(),
    };
    Some(format!("ztd: warning: exe identities are in use and {how}; a traced process that runs an allowed executable connects with its identity. Set kernel.yama.ptrace_scope = 2 to close this"))
}

/// Bind the control socket. Its directory must be one only root can change (owned by root,
/// not writable by group or others unless sticky, like /tmp): otherwise another user could
/// swap the socket for its own. A socket already there is replaced only when nothing answers
/// on it (a stale one); anything else there is refused. The socket is created under umask
/// 0177, so it never exists with a wider mode than 0600, not even between `bind` and `chmod`;
/// with `--control-group` it is then given to that group, mode 0660. (Access is decided per
/// request by the peer's credentials anyway: see [`control::refusal`].)
fn bind_socket(path: &Path, control_gid: Option<u32>) -> Result<UnixListener, DaemonError> {
    use std::os::unix::fs::{DirBuilderExt, FileTypeExt};
    let io = |what| {
        move |source| DaemonError::Io {
            what,
            path: path.to_path_buf(),
            source,
        }
    };
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o755)
        .create(dir)
        .map_err(io("creating the directory of"))?;
    let why = crate::trust::unsafe_dir_reason(dir);
    if let Some(why) = why {
        return Err(DaemonError::UnsafeSocketDir {
            socket: path.to_path_buf(),
            dir: dir.to_path_buf(),
            why,
        });
    }
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_socket() => {
            if std::os::unix::net::UnixStream::connect(path).is_ok() {
                return Err(DaemonError::AlreadyRunning(path.to_path_buf()));
            }
            std::fs::remove_file(path).map_err(io("removing the stale socket"))?;
        }
        Ok(_) => return Err(DaemonError::NotASocket(path.to_path_buf())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(io("checking")(e)),
    }
    // SAFETY: umask only changes this process's file creation mask; it is restored below.
    let old = unsafe { libc::umask(0o177) };
    let bound = UnixListener::bind(path);
    // SAFETY: as above.
    unsafe { libc::umask(old) };
    let listener = bound.map_err(io("binding the control socket"))?;
    if let Some(gid) = control_gid {
        std::os::unix::fs::chown(path, None, Some(gid))
            .map_err(io("giving the control socket to --control-group"))?;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o660))
            .map_err(io("restricting the control socket"))?;
    } else {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
            .map_err(io("restricting the control socket"))?;
    }
    Ok(listener)
}

/// `--control-group`: a group name, or a gid.
fn control_gid(group: Option<&str>) -> Result<Option<u32>, DaemonError> {
    let Some(g) = group else {
        return Ok(None);
    };
    if let Ok(Some(found)) = nix::unistd::Group::from_name(g) {
        return Ok(Some(found.gid.as_raw()));
    }
    g.parse::<u32>()
        .map(Some)
        .map_err(|_| DaemonError::NoSuchGroup(g.to_string()))
}

/// The peer of a control connection, from the kernel.
fn peer_of(stream: &UnixStream) -> Option<control::Peer> {
    use std::os::fd::AsRawFd;
    let cred = stream.peer_cred().ok()?;
    let fd = stream.as_raw_fd();
    let mut groups = vec![0u32; 256];
    let mut len = (groups.len() * std::mem::size_of::<u32>()) as libc::socklen_t;
    // SAFETY: `groups` has room for `len` bytes; the kernel writes at most that many.
    let ret = unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_PEERGROUPS,
            groups.as_mut_ptr().cast(),
            &mut len,
        )
    };
    if ret == 0 {
        groups.truncate(len as usize / std::mem::size_of::<u32>());
    } else {
        // Too many groups for the buffer, or an old kernel: the primary group still counts.
        groups.clear();
    }
    Some(control::Peer {
        uid: cred.uid(),
        gid: cred.gid(),
        pid: cred.pid(),
        groups,
    })
}

/// Run the daemon until a signal or `unload`.
pub async fn run(opts: Options) -> Result<(), DaemonError> {
    let _ = LOG_FORMAT.set(opts.log_format);
    sys::limit_arenas(2);
    let cgroup_root = check_cgroup(&opts.cgroup)?;
    let units_root = check_units_root(&cgroup_root, opts.units_root.as_deref())?;
    // Everything that can fail on bad input happens before the kernel is touched.
    let (compiled, warnings, sources, timings) =
        compile_paths(&cgroup_root, &units_root, &opts.policy, false)?;
    for w in &warnings {
        warn!("{w}");
    }
    if !compiled.exes.is_empty() {
        if let Some(w) = ptrace_warning(ptrace_scope()) {
            warn!("{w}");
        }
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
    let control_gid = control_gid(opts.control_group.as_deref())?;
    let listener = bind_socket(&opts.socket, control_gid)?;
    if let Some(w) = crate::trust::cgroup_escape_warning(&opts.cgroup, &cgroup_root) {
        warn!("ztd: warning: {w}");
    }

    let layout = Layout {
        bpffs: opts.bpffs.clone(),
    };
    let loader = Loader::load(&layout, &opts.cgroup, offsets, opts.allow_missing_hooks)?;
    for m in loader.missing() {
        warn!("ztd: warning: {m}; running without it (--allow-missing-hooks): what it guards goes unjudged");
    }
    let mut state = State {
        units_root,
        sources,
        history: None,
        reresolve_due: false,
        compiled,
        opts: opts.clone(),
        last_reload: ReloadResult {
            ok: true,
            at: now_secs(),
            message: String::new(),
            timings: None,
        },
        cgroup_root,
        loader,
        xdp: None,
        pending: None,
        repairs: 0,
        last_repair: String::new(),
        reported: Vec::new(),
        rewatch: false,
        flows: flows::Recorder::default(),
        warnings: warnings.iter().map(ToString::to_string).collect(),
    };
    let flags = state.flags();
    // The same policy as the active slot holds (a restart): keep its generation.
    let started = Instant::now();
    let (generation, kept) = state.loader.apply_or_keep(&state.compiled, flags)?;
    let stats = if kept {
        ApplyStats::default()
    } else {
        state.loader.last_apply()
    };
    state.last_reload.timings = Some(with_apply(timings, started.elapsed(), stats));
    sys::trim_heap();
    let started = state.loader.attach_or_adopt()?;
    let adopted = started
        .iter()
        .filter(|(_, s)| *s == HookStart::Replaced)
        .count();
    let summary = format!(
        "generation {generation}{}: {} rules, {} identities",
        if kept {
            " (kept: the pinned maps hold this policy)"
        } else {
            ""
        },
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
        "ztd: guarding {} in {} mode, {summary}; {} hooks {}{} and {} exec-identity tracepoints attached (pinned under {}); lsm: {}; control socket {}",
        opts.cgroup.display(),
        opts.mode.as_str(),
        state.loader.hooks().len(),
        if adopted > 0 {
            "adopted from pins, programs replaced in place"
        } else {
            "attached"
        },
        if state.loader.missing().is_empty() {
            String::new()
        } else {
            format!(
                ", DEGRADED: {} missing",
                state
                    .loader
                    .missing()
                    .iter()
                    .map(|m| m.hook.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            )
        },
        loader::TRACERS.len(),
        opts.bpffs.display(),
        state.loader.lsm(),
        opts.socket.display()
    );
    let events_map = state.loader.take_events();
    let enricher = Enricher::new(state.cgroup_root.clone());
    state.flows = flows::Recorder::open(opts.flows.clone(), |e| warn!("ztd: {e}"));
    let flow_store = state.flows.store().cloned();
    let history = Arc::new(Mutex::new(History::new(opts.history.max(1), 4096)));
    state.history = Some(Arc::clone(&history));
    for id in &state.compiled.identities {
        if let Some(p) = &id.problem {
            warn!(
                "ztd: identity {}: {p}; it matches nothing until this is fixed",
                id.name
            );
        }
    }
    let (resolve_tx, mut resolve_rx) = mpsc::unbounded_channel::<()>();
    let mut targets = Targets::of(
        &state.compiled.identities,
        &state.cgroup_root,
        &state.units_root,
    );
    let mut identity_watcher = identity_watch::spawn(targets.clone(), resolve_tx.clone());
    let state = Arc::new(Mutex::new(state));

    let (metrics_stop, metrics_stopped) = tokio::sync::oneshot::channel::<()>();
    if let Some(addr) = opts.metrics {
        let server = metrics::MetricsServer::bind(addr)
            .await
            .map_err(DaemonError::Metrics)?;
        let bound = server.local_addr().map_err(DaemonError::Metrics)?;
        say!("ztd: metrics at http://{bound}/metrics");
        let snapshot: metrics::SnapshotFn = {
            let state = Arc::clone(&state);
            let history = Arc::clone(&history);
            Arc::new(move || snapshot(&state, &history))
        };
        tokio::spawn(async move {
            let stop = async {
                let _ = metrics_stopped.await;
            };
            if let Err(e) = server.run(snapshot, stop).await {
                warn!("ztd: metrics server: {e}");
            }
        });
    }

    let (unload_tx, mut unload_rx) = mpsc::channel::<()>(1);
    let mut term = signal(SignalKind::terminate()).map_err(sig_err)?;
    let mut int = signal(SignalKind::interrupt()).map_err(sig_err)?;
    let mut hup = signal(SignalKind::hangup()).map_err(sig_err)?;
    let (changed_tx, mut changed_rx) = mpsc::unbounded_channel::<()>();
    let mut watcher = opts
        .watch
        .then(|| watch_policy(opts.policy.clone(), changed_tx.clone()));
    let mut housekeeping = tokio::time::interval(Duration::from_millis(200));
    housekeeping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_check = Instant::now();

    if let Some(map) = events_map {
        match RingBuf::try_from(map) {
            Ok(ring) => {
                let state = Arc::clone(&state);
                let history = Arc::clone(&history);
                let flows = flow_store.clone();
                tokio::spawn(
                    async move { read_events(ring, state, history, enricher, flows).await },
                );
            }
            Err(e) => warn!("ztd: events unavailable: {e}"),
        }
    }

    crate::notify::ready(&format!("enforcing {summary}"));
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                if let Ok((stream, _)) = accepted {
                    let state = Arc::clone(&state);
                    let history = Arc::clone(&history);
                    let unload_tx = unload_tx.clone();
                    // No credentials, no service (never the case on a unix socket).
                    if let Some(peer) = peer_of(&stream) {
                        tokio::spawn(async move {
                            serve(stream, peer, control_gid, state, history, unload_tx).await
                        });
                    }
                }
            }
            _ = hup.recv() => {
                if let Ok(mut s) = state.lock() {
                    s.reload();
                }
            }
            Some(()) = resolve_rx.recv() => {
                while resolve_rx.try_recv().is_ok() {}
                if let Ok(mut s) = state.lock() {
                    s.reresolve();
                }
            }
            Some(()) = changed_rx.recv() => {
                if let Ok(mut s) = state.lock() {
                    say!("ztd: the policy files changed; reloading");
                    s.reload();
                }
            }
            _ = housekeeping.tick() => {
                if let Ok(mut s) = state.lock() {
                    s.rollback_if_due();
                    if s.reresolve_due && s.pending.is_none() {
                        s.reresolve();
                    }
                    if let Err(e) = s.loader.sync_idle() {
                        warn!("ztd: bringing the idle policy slot up to date failed: {e}; the next reload writes the whole policy");
                    }
                    if !opts.check_interval.is_zero() && last_check.elapsed() >= opts.check_interval {
                        last_check = Instant::now();
                        s.check_and_repair();
                    }
                    let now = Targets::of(&s.compiled.identities, &s.cgroup_root, &s.units_root);
                    if now != targets {
                        identity_watcher.store(true, Ordering::Relaxed);
                        targets = now;
                        identity_watcher = identity_watch::spawn(targets.clone(), resolve_tx.clone());
                    }
                    if std::mem::take(&mut s.rewatch) && opts.watch {
                        if let Some(stop) = watcher.take() {
                            stop.store(true, Ordering::Relaxed);
                        }
                        watcher = Some(watch_policy(s.opts.policy.clone(), changed_tx.clone()));
                    }
                }
            }
            _ = term.recv() => break,
            _ = int.recv() => break,
            _ = unload_rx.recv() => {
                if let Err(e) = flows::flush_shared(flow_store.as_ref()) {
                    warn!("ztd: {e}");
                }
                crate::notify::stopping();
                let _ = std::fs::remove_file(&opts.socket);
                say!("ztd: unloaded; exiting");
                return Ok(());
            }
        }
    }
    crate::notify::stopping();
    let _ = metrics_stop.send(());
    if let Err(e) = flows::flush_shared(flow_store.as_ref()) {
        warn!("ztd: {e}");
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

/// Answer the requests of one control connection, each if `peer` may make it
/// ([`control::refusal`]); a refused request is answered with the reason and logged.
async fn serve(
    stream: UnixStream,
    peer: control::Peer,
    control_gid: Option<u32>,
    state: Arc<Mutex<State>>,
    history: Arc<Mutex<History>>,
    unload_tx: mpsc::Sender<()>,
) {
    let (read, mut write) = stream.into_split();
    let mut lines = BufReader::new(read).lines();
    while let Ok(Some(line)) = lines.next_line().await {
        let mut unloaded = false;
        if let Ok(req) = serde_json::from_str::<Request>(&line) {
            if let Some(why) = control::refusal(&req, &peer, control_gid) {
                warn!(
                    "ztd: refused `{}` from uid {} (pid {}): {why}",
                    req.name(),
                    peer.uid,
                    peer.pid.map_or_else(|| "?".to_string(), |p| p.to_string())
                );
                let response = Response::Error {
                    message: why,
                    diagnostics: Vec::new(),
                };
                let text = serde_json::to_string(&response).unwrap_or_default() + "\n";
                if write.write_all(text.as_bytes()).await.is_err() {
                    return;
                }
                continue;
            }
        }
        if let Ok(Request::Events { filter, follow }) = serde_json::from_str::<Request>(&line) {
            stream_events(&mut write, &history, filter, follow).await;
            return;
        }
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
                    Request::Status => match history.lock() {
                        Ok(h) => s.status(&h),
                        Err(_) => s.status(&History::new(1, 1)),
                    },
                    Request::Events { .. } => Response::Error {
                        message: "events requests are streamed".to_string(),
                        diagnostics: Vec::new(),
                    },
                    Request::Reload => s.reload(),
                    Request::Apply {
                        path,
                        confirm_within_ms,
                    } => s.apply_pending(path, Duration::from_millis(confirm_within_ms)),
                    Request::Confirm => s.confirm(),
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

/// Write the matching history, then (with `follow`) every new matching event, one JSON
/// `FollowItem` per line, until the client goes away.
async fn stream_events(
    write: &mut tokio::net::unix::OwnedWriteHalf,
    history: &Arc<Mutex<History>>,
    filter: EventFilter,
    follow: bool,
) {
    if let Err(e) = filter.validate() {
        let response = Response::Error {
            message: e.to_string(),
            diagnostics: Vec::new(),
        };
        let text = serde_json::to_string(&response).unwrap_or_default() + "\n";
        let _ = write.write_all(text.as_bytes()).await;
        return;
    }
    let (past, notices, follower) = match history.lock() {
        Ok(h) => {
            let now = now_ns();
            let (past, follower) = h.query_and_subscribe(&filter, now);
            (
                past,
                h.query_notices(&filter, now),
                follow.then_some(follower),
            )
        }
        Err(_) => return,
    };
    // Decisions and notices, merged by time.
    let mut items: Vec<(u64, FollowItem)> = past
        .into_iter()
        .map(|r| (r.time_ns, FollowItem::Event(Box::new(r))))
        .collect();
    items.extend(notices.into_iter().map(|n| {
        (
            n.time_ns,
            FollowItem::Notice {
                notice: Box::new(n),
            },
        )
    }));
    items.sort_by_key(|(t, _)| *t);
    let mut out = String::new();
    for (_, item) in items {
        out.push_str(&serde_json::to_string(&item).unwrap_or_default());
        out.push('\n');
    }
    if write.write_all(out.as_bytes()).await.is_err() {
        return;
    }
    let Some(mut follower) = follower else {
        return;
    };
    while let Some(item) = follower.recv().await {
        let text = serde_json::to_string(&item).unwrap_or_default() + "\n";
        if write.write_all(text.as_bytes()).await.is_err() {
            return;
        }
    }
}

/// What `/metrics` shows now.
fn snapshot(state: &Arc<Mutex<State>>, history: &Arc<Mutex<History>>) -> MetricsSnapshot {
    let (Ok(s), Ok(h)) = (state.lock(), history.lock()) else {
        return MetricsSnapshot::default();
    };
    let Response::Status(st) = s.status(&h) else {
        return MetricsSnapshot::default();
    };
    let mut decisions: Vec<(String, String, u64)> = st
        .decisions_by_hook
        .iter()
        .map(|d| (d.verdict.clone(), d.hook.clone(), d.count))
        .collect();
    for x in &st.xdp {
        let c = &x.counters;
        decisions.push(("allow".into(), "xdp".into(), c.passed + c.passed_not_judged));
        decisions.push((
            "deny".into(),
            "xdp".into(),
            c.dropped_deny_list + c.dropped_closed_port + c.dropped_malformed + c.dropped_unparsed,
        ));
        decisions.push(("audit".into(), "xdp".into(), c.audited));
    }
    let counted = h.counters();
    MetricsSnapshot {
        decisions,
        rule_hits: st
            .counters
            .iter()
            .map(|c| (c.id, c.location.clone(), c.hits))
            .collect(),
        events_produced: st.events.produced,
        events_delivered: st.events.delivered,
        events_lost_kernel: st.events.lost_kernel,
        events_lost_daemon: st.events.lost_daemon,
        events_evicted: st.events.evicted,
        events_suppressed: st.events.suppressed,
        follower_missed: st.events.follower_missed,
        history_events: counted.len,
        followers: counted.followers,
        ring_fill_bytes: st.events.ring_fill_bytes,
        ring_size_bytes: st.events.ring_size_bytes,
        kernel_errors: vec![
            ("no_policy".into(), st.decisions.no_policy),
            ("exe_unreadable".into(), st.decisions.exe_unreadable),
            ("exec_record_failed".into(), st.decisions.exec_record_failed),
            ("rule_unknown".into(), st.decisions.rule_unknown),
        ],
        drops: vec![
            ("unparsed".into(), st.decisions.unparsed_dropped),
            ("backstop".into(), st.decisions.backstop_dropped),
        ],
        generation: st.generation,
        healthy: st.healthy,
        last_reload_time: st.last_reload.at,
        last_reload_ok: st.last_reload.ok,
        ..MetricsSnapshot::default()
    }
}

/// Read decision events from the ring buffer: enrich, print, keep in the history. A record
/// that cannot be parsed is counted as lost in the daemon, never dropped silently.
/// Events read from the ring buffer per batch.
const EVENT_BATCH: usize = 256;

async fn read_events(
    ring: RingBuf<aya::maps::MapData>,
    state: Arc<Mutex<State>>,
    history: Arc<Mutex<History>>,
    mut enricher: Enricher,
    flows: Option<Arc<Mutex<FlowStore>>>,
) {
    let offset = events::monotonic_to_realtime_offset();
    let mut exe_cache = HashMap::new();
    let mut batch: Vec<DecisionEvent> = Vec::with_capacity(EVENT_BATCH);
    let mut labels: Vec<(String, String, Option<String>)> = Vec::with_capacity(EVENT_BATCH);
    let mut records: Vec<EventRecord> = Vec::with_capacity(EVENT_BATCH);
    let mut text = String::new();
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
        // In batches: one lock of the state and of the history, and one write of the text
        // lines, per batch rather than per event.
        loop {
            batch.clear();
            let mut malformed = 0u64;
            while batch.len() < EVENT_BATCH {
                let Some(item) = ring.next() else { break };
                match DecisionEvent::from_bytes(&item) {
                    Some(ev) => batch.push(ev),
                    None => malformed += 1,
                }
            }
            if batch.is_empty() && malformed == 0 {
                break;
            }
            labels.clear();
            match state.lock() {
                Ok(s) => labels.extend(batch.iter().map(|ev| {
                    (
                        s.rule_label(ev.rule),
                        s.rule_location(ev.rule),
                        s.compiled
                            .exe_paths
                            .iter()
                            .find(|(key, _)| *key == ev.exe)
                            .map(|(_, path)| path.display().to_string()),
                    )
                })),
                Err(_) => labels.extend(
                    batch
                        .iter()
                        .map(|ev| (format!("#{}", ev.rule), "default".to_string(), None)),
                ),
            }
            records.clear();
            text.clear();
            for (ev, (label, location, pinned_exe)) in batch.iter().zip(labels.drain(..)) {
                let mut record = EventRecord::from_event(ev, offset, location);
                record.enrich(&mut enricher);
                if record.exe.is_none() {
                    // The process is gone; the policy may still name its executable.
                    record.exe = pinned_exe;
                }
                match log_format() {
                    LogFormat::Text => {
                        let exe = match &record.exe {
                            Some(path) => path.clone(),
                            None => events::exe_path(ev.tgid, &mut exe_cache),
                        };
                        text.push_str(&events::format_line(ev, offset, &exe, &label));
                        text.push('\n');
                    }
                    LogFormat::Json => {
                        let fields: Vec<(String, serde_json::Value)> =
                            match serde_json::to_value(&record) {
                                Ok(serde_json::Value::Object(map)) => map.into_iter().collect(),
                                _ => Vec::new(),
                            };
                        let fields: Vec<(&str, serde_json::Value)> = fields
                            .iter()
                            .map(|(k, v)| (k.as_str(), v.clone()))
                            .collect();
                        text.push_str(&log_line(LogFormat::Json, "info", "decision", &fields));
                        text.push('\n');
                    }
                }
                records.push(record);
            }
            if !text.is_empty() {
                use std::io::Write as _;
                // A closed stdout must never stop the daemon.
                let _ = std::io::stdout().lock().write_all(text.as_bytes());
            }
            if let Some(Ok(mut f)) = flows.as_ref().map(|f| f.lock()) {
                for record in &records {
                    if let Err(e) = f.record(record) {
                        warn!("ztd: {e}");
                    }
                }
            }
            if crate::events_file::enabled() {
                for record in &records {
                    if let Ok(serde_json::Value::Object(map)) = serde_json::to_value(record) {
                        let fields: Vec<(&str, serde_json::Value)> =
                            map.iter().map(|(k, v)| (k.as_str(), v.clone())).collect();
                        crate::events_file::write(&log_line(
                            LogFormat::Json,
                            "info",
                            "decision",
                            &fields,
                        ));
                    }
                }
            }
            if let Ok(mut h) = history.lock() {
                if malformed > 0 {
                    h.count_lost(malformed);
                }
                for record in records.drain(..) {
                    h.push(record);
                }
            }
        }
        guard.clear_ready();
    }
}

/// Watch the policy paths with inotify: a directory for its `*.toml` files, a file through
/// its parent directory (so that editors' write-then-rename is seen). After a change and
/// [`WATCH_DEBOUNCE`] of quiet, send one message on `changed`. Runs on its own thread until
/// the returned flag is set (or the daemon exits).
fn watch_policy(paths: Vec<PathBuf>, changed: mpsc::UnboundedSender<()>) -> Arc<AtomicBool> {
    use nix::sys::inotify::{AddWatchFlags, InitFlags, Inotify};
    use std::os::fd::{AsFd, AsRawFd};
    let stop = Arc::new(AtomicBool::new(false));
    let stopped = Arc::clone(&stop);
    let inotify = match Inotify::init(InitFlags::IN_CLOEXEC | InitFlags::IN_NONBLOCK) {
        Ok(i) => i,
        Err(e) => {
            warn!("ztd: cannot watch the policy files (inotify: {e}); reload with SIGHUP or `ztctl reload`");
            return stop;
        }
    };
    let mask = AddWatchFlags::IN_CLOSE_WRITE
        | AddWatchFlags::IN_MODIFY
        | AddWatchFlags::IN_CREATE
        | AddWatchFlags::IN_DELETE
        | AddWatchFlags::IN_MOVED_TO
        | AddWatchFlags::IN_MOVED_FROM;
    // Per watch: `None` = every `*.toml` of the directory, `Some(name)` = that file only.
    let mut watches = Vec::new();
    for path in &paths {
        let (dir, only) = if path.is_dir() {
            (path.clone(), None)
        } else {
            let dir = path
                .parent()
                .filter(|d| !d.as_os_str().is_empty())
                .unwrap_or(Path::new("."))
                .to_path_buf();
            (dir, path.file_name().map(|n| n.to_os_string()))
        };
        match inotify.add_watch(&dir, mask) {
            Ok(wd) => watches.push((wd, only)),
            Err(e) => warn!(
                "ztd: cannot watch {} for policy changes: {e}",
                dir.display()
            ),
        }
    }
    std::thread::spawn(move || {
        let mut due: Option<Instant> = None;
        while !stopped.load(Ordering::Relaxed) {
            let wait = due
                .map(|d| d.saturating_duration_since(Instant::now()))
                .unwrap_or(Duration::from_millis(500))
                .min(Duration::from_millis(500));
            let mut pfd = libc::pollfd {
                fd: inotify.as_fd().as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: one valid pollfd, for the duration of the call.
            let ready = unsafe { libc::poll(&mut pfd, 1, wait.as_millis() as libc::c_int) };
            if ready > 0 {
                let events = inotify.read_events().unwrap_or_default();
                let relevant = events.iter().any(|ev| {
                    watches.iter().any(|(wd, only)| {
                        // `..data`: Kubernetes swaps this symlink to update a ConfigMap
                        // volume; the `*.toml` links through it do not change themselves.
                        *wd == ev.wd
                            && ev.name.as_ref().is_some_and(|name| {
                                name == CONFIGMAP_DATA
                                    || match only {
                                        Some(file) => name == file,
                                        None => Path::new(name)
                                            .extension()
                                            .is_some_and(|ext| ext == "toml"),
                                    }
                            })
                    })
                });
                if relevant {
                    due = Some(Instant::now() + WATCH_DEBOUNCE);
                }
            }
            if due.is_some_and(|d| Instant::now() >= d) {
                due = None;
                if stopped.load(Ordering::Relaxed) || changed.send(()).is_err() {
                    return;
                }
            }
        }
    });
    stop
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ptrace_warning_names_the_scope_and_stops_at_two() {
        assert_eq!(ptrace_warning(Some(2)), None);
        assert_eq!(ptrace_warning(Some(3)), None);
        let one = ptrace_warning(Some(1)).unwrap_or_default();
        assert!(
            one.contains("ptrace_scope is 1") && one.contains("own children"),
            "{one}"
        );
        let zero = ptrace_warning(Some(0)).unwrap_or_default();
        assert!(zero.contains("ptrace_scope is 0"), "{zero}");
        let none = ptrace_warning(None).unwrap_or_default();
        assert!(none.contains("Yama is not enabled"), "{none}");
        for w in [one, zero, none] {
            assert!(w.contains("ptrace_scope = 2"), "{w}");
        }
    }
}
