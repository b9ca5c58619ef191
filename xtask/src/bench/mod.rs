//! `cargo xtask bench`: build, then measure zt on this machine and write
//! `target/bench/results.json` (method and figures: BENCHMARKS.md).
//!
//! Every scenario is a [`Scenario`]: a few named variants, one of which is the baseline the
//! others are compared with. The driver runs [`rounds`] interleaved rounds — every round
//! measures every variant once, in an order rotated from round to round — and reports each
//! variant's median, min and max over the rounds, and the scenario's ratios: of the medians,
//! and round by round. Adding a scenario means implementing the trait and listing it in
//! [`scenarios`].
//!
//! Safety: everything runs in cgroups made for this run under `<cgroup2 mount>/zt-bench-<pid>`
//! (never the root cgroup); each ztd guards one of them (`--cgroup`), with its own pins
//! (`--bpffs /sys/fs/bpf/zt-bench-<pid>-<label>`) and control socket
//! (`--socket /tmp/zt-bench-<pid>-<label>.sock`); traffic goes to 127.0.0.1 only, and nothing
//! is attached to an interface. Guards run `ztctl unload`, stop ztd (by pid) and remove the
//! cgroups on every exit path, errors and Ctrl-C included.
//!
//! Scenarios that need a network live in network namespaces made for the run
//! (`zt-bench-<pid>-*`, removed by their guard), and nftables rulesets are loaded only inside
//! those namespaces. One file per scenario; the shared machinery (cgroups, ztd, namespaces,
//! nft, the probe) lives here and in [`net`].
//!
//! `--quick` (the CI smoke test) runs every scenario with reduced sizes — rule counts of 1, 2
//! and 5 instead of the full tiers, 1 round, short loops — and checks nothing but that each
//! ran; `--only ID` (repeatable) runs the named scenarios.
//!
//! Environment: `ZT_BENCH_ROUNDS` (default 7; `--quick`: 1).

mod apply;
mod decision_cost;
mod egress;
mod events;
mod memory;
mod net;
mod rules;
mod socket_hooks;
mod xdp_cost;
mod xdp_wire;

use std::{
    fs::{self, File},
    io::{Read as _, Seek as _, SeekFrom},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::atomic::{AtomicBool, Ordering},
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use anyhow::{anyhow, bail, ensure, Context as _, Result};
use serde_json::{json, Map, Value};

use crate::{
    setup, tasks,
    util::{self, Ctx},
};

/// Set by Ctrl-C / SIGTERM: the loops stop at the next check and the guards clean up.
static INTERRUPTED: AtomicBool = AtomicBool::new(false);

const DEFAULT_ROUNDS: usize = 7;
/// How long ztd may take to answer `status` after it starts.
const READY_TIMEOUT: Duration = Duration::from_secs(30);
/// How long the daemon may take to read what the ring buffer holds.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(30);
/// Pause between two `ztctl status` polls.
const POLL: Duration = Duration::from_millis(10);

fn interrupted() -> Result<()> {
    if INTERRUPTED.load(Ordering::SeqCst) {
        bail!("interrupted");
    }
    Ok(())
}

fn rounds(quick: bool) -> Result<usize> {
    match std::env::var("ZT_BENCH_ROUNDS") {
        Ok(n) if !n.is_empty() => match n.parse::<usize>() {
            Ok(v) if v > 0 => Ok(v),
            _ => bail!("ZT_BENCH_ROUNDS must be a positive integer, not {n:?}"),
        },
        _ if quick => Ok(1),
        _ => Ok(DEFAULT_ROUNDS),
    }
}

/// What `cargo xtask bench` was asked for.
#[derive(Clone, Debug, Default)]
pub struct Opts {
    /// Reduced sizes, 1 round: the CI smoke test.
    pub quick: bool,
    /// Only these scenarios (ids or their short names); all when empty.
    pub only: Vec<String>,
}

/// The scenarios `cargo xtask bench` runs, in order: (short name for `--only`, scenario).
fn scenarios(quick: bool) -> Vec<(&'static str, Box<dyn Scenario>)> {
    vec![
        ("socket", Box::new(socket_hooks::SocketHooks::new(quick))),
        ("xdp", Box::new(xdp_cost::XdpCost::new(quick))),
        ("wire", Box::new(xdp_wire::XdpWire::new(quick))),
        ("egress", Box::new(egress::Egress::new(quick))),
        ("apply", Box::new(apply::Apply::new(quick))),
        ("cost", Box::new(decision_cost::DecisionCost::new(quick))),
        ("events", Box::new(events::EventThroughput::new(quick))),
        ("memory", Box::new(memory::Memory::new(quick))),
    ]
}

// -------------------------------------------------------------------------------------------
// The driver
// -------------------------------------------------------------------------------------------

/// One measurement of one variant: the figure, and whatever else is worth keeping.
struct Sample {
    value: f64,
    detail: Map<String, Value>,
}

impl Sample {
    fn new(value: f64) -> Sample {
        Sample {
            value,
            detail: Map::new(),
        }
    }

    /// A variant that cannot run here (a tool missing or refused by this kernel): no figure,
    /// and the reason, in the table and in results.json.
    fn skipped(reason: impl Into<String>) -> Sample {
        let mut detail = Map::new();
        detail.insert("skipped".into(), Value::String(reason.into()));
        Sample {
            value: f64::NAN,
            detail,
        }
    }

    fn with(mut self, key: &str, value: impl Into<Value>) -> Sample {
        self.detail.insert(key.into(), value.into());
        self
    }

    fn skip_reason(&self) -> Option<&str> {
        self.detail.get("skipped").and_then(Value::as_str)
    }
}

/// A benchmark scenario.
trait Scenario {
    /// Short identifier (the key in results.json).
    fn id(&self) -> &'static str;
    /// One line: what is measured.
    fn title(&self) -> String;
    /// Unit of [`Sample::value`].
    fn unit(&self) -> &'static str;
    /// The variants, measured once per round each.
    fn variants(&self) -> &'static [&'static str];
    /// Parameters worth recording (counts, flags).
    fn config(&self) -> Value;
    /// Measure one variant once.
    fn measure(&self, env: &Env, variant: &str) -> Result<Sample>;
    /// One round: every variant once, in `order` (rotated from round to round by the
    /// driver). By default [`Scenario::measure`] each in turn; a scenario can interleave
    /// its variants more finely.
    fn round(&self, env: &Env, order: &[&'static str]) -> Result<Vec<(&'static str, Sample)>> {
        order
            .iter()
            .map(|v| {
                let s = self
                    .measure(env, v)
                    .with_context(|| format!("variant `{v}`"))?;
                Ok((*v, s))
            })
            .collect()
    }
    /// Ratios between the variants' medians.
    fn ratios(&self, medians: &Medians) -> Vec<Ratio>;
    /// Rounds this scenario runs when the run's default is `default` (deterministic or slow
    /// scenarios run fewer).
    fn rounds(&self, default: usize) -> usize {
        default
    }
    /// Targets of the issue, checked against the medians: (what, met, measured). Reported,
    /// never enforced (no thresholds in CI).
    fn targets(&self, _medians: &Medians) -> Vec<Target> {
        Vec::new()
    }
}

/// A target of the issue and whether this run met it.
struct Target {
    what: String,
    met: bool,
    measured: String,
}

impl Target {
    fn new(what: impl Into<String>, met: bool, measured: impl Into<String>) -> Target {
        Target {
            what: what.into(),
            met,
            measured: measured.into(),
        }
    }
}

/// A ratio between two medians; for two variants' figures, also the median, min and max of
/// the same ratio taken round by round (both variants of a round ran within seconds of each
/// other, so this one is less sensitive to the machine's slow drifts).
struct Ratio {
    name: String,
    value: f64,
    per_round: Option<(f64, f64, f64)>,
}

/// The per-variant samples of a finished scenario.
struct Medians<'a> {
    samples: &'a [(&'static str, Vec<Sample>)],
}

impl Medians<'_> {
    fn of(&self, variant: &str) -> f64 {
        self.field(variant, None)
    }

    /// `num / den` of the variants' figures: of the medians, and round by round.
    fn ratio(&self, num: &str, den: &str) -> Ratio {
        let values = |v: &str| -> Vec<f64> {
            self.samples
                .iter()
                .filter(|(n, _)| *n == v)
                .flat_map(|(_, s)| s.iter().map(|s| s.value))
                .collect()
        };
        let per: Vec<f64> = values(num)
            .iter()
            .zip(values(den))
            .map(|(a, b)| a / b)
            .collect();
        let (lo, hi) = min_max(&per);
        Ratio {
            name: format!("{num} / {den}"),
            value: self.of(num) / self.of(den),
            per_round: Some((median(&per), lo, hi)),
        }
    }

    /// A ratio of anything else (no per-round figures).
    fn derived(name: String, value: f64) -> Ratio {
        Ratio {
            name,
            value,
            per_round: None,
        }
    }

    /// Median of a numeric detail field (`Some(key)`) or of the value (`None`).
    fn field(&self, variant: &str, key: Option<&str>) -> f64 {
        let values: Vec<f64> = self
            .samples
            .iter()
            .filter(|(v, _)| *v == variant)
            .flat_map(|(_, s)| s.iter())
            .filter_map(|s| match key {
                None => Some(s.value),
                Some(k) => s.detail.get(k).and_then(Value::as_f64),
            })
            .collect();
        median(&values)
    }
}

/// Median of the figures (skipped ones, NaN, left out).
fn median(values: &[f64]) -> f64 {
    let mut v: Vec<f64> = values.iter().copied().filter(|v| !v.is_nan()).collect();
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

fn min_max(values: &[f64]) -> (f64, f64) {
    values
        .iter()
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), &v| {
            (lo.min(v), hi.max(v))
        })
}

/// Run one scenario's interleaved rounds; print its table; return its results.json entry.
fn run_scenario(env: &Env, sc: &dyn Scenario, rounds: usize) -> Result<Value> {
    let variants = sc.variants();
    println!();
    println!("==> bench {}: {}", sc.id(), sc.title());
    let busy = cpu_busy(Duration::from_millis(if env.quick { 200 } else { 1000 }));
    if busy > BUSY_WARN {
        println!(
            "  WARNING: the machine was {:.0}% busy just before this scenario (other work running?): expect noisy figures",
            busy * 100.0
        );
    } else {
        println!("  machine {:.0}% busy just before", busy * 100.0);
    }
    let load_before = loadavg();
    let mut samples: Vec<(&'static str, Vec<Sample>)> =
        variants.iter().map(|v| (*v, Vec::new())).collect();
    for round in 0..rounds {
        interrupted()?;
        // Rotate the order, so that no variant always runs first (or right after another).
        let order: Vec<&'static str> = (0..variants.len())
            .map(|i| variants[(i + round) % variants.len()])
            .collect();
        let t = Instant::now();
        let measured = sc
            .round(env, &order)
            .with_context(|| format!("bench {}: round {}/{rounds}", sc.id(), round + 1))?;
        let secs = t.elapsed().as_secs_f64();
        for (variant, s) in measured {
            match s.skip_reason() {
                Some(why) => println!(
                    "    round {}/{rounds} {variant:<22} skipped: {why}",
                    round + 1
                ),
                None => println!(
                    "    round {}/{rounds} {variant:<22} {:>12.1} {}",
                    round + 1,
                    s.value,
                    sc.unit(),
                ),
            }
            let idx = variants
                .iter()
                .position(|v| *v == variant)
                .ok_or_else(|| anyhow!("bench {}: unknown variant {variant}", sc.id()))?;
            samples[idx].1.push(s);
        }
        println!("    round {}/{rounds} took {secs:.1}s", round + 1);
    }
    for (variant, s) in &samples {
        ensure!(
            s.len() == rounds,
            "bench {}: variant {variant} measured {} times in {rounds} rounds",
            sc.id(),
            s.len()
        );
    }

    let load_after = loadavg();
    let medians = Medians { samples: &samples };
    let ratios = sc.ratios(&medians);
    // Targets are for full runs; --quick sizes say nothing about them.
    let targets = if env.quick {
        Vec::new()
    } else {
        sc.targets(&medians)
    };
    println!(
        "  {:<22} {:>12} {:>12} {:>12}   ({}, {rounds} rounds)",
        "variant",
        "median",
        "min",
        "max",
        sc.unit()
    );
    let mut out_variants = Vec::new();
    for (name, s) in &samples {
        let values: Vec<f64> = s.iter().map(|s| s.value).collect();
        let (lo, hi) = min_max(&values);
        let med = median(&values);
        let skipped = s.iter().find_map(Sample::skip_reason);
        match skipped {
            Some(why) if med.is_nan() => println!("  {name:<22} skipped: {why}"),
            _ => println!("  {name:<22} {med:>12.1} {lo:>12.1} {hi:>12.1}"),
        }
        out_variants.push(json!({
            "skipped": skipped,
            "name": name,
            "median": med,
            "min": lo,
            "max": hi,
            "samples": values,
            "details": s.iter().map(|s| Value::Object(s.detail.clone())).collect::<Vec<_>>(),
        }));
    }
    for r in &ratios {
        match r.per_round {
            Some((med, lo, hi)) => println!(
                "  ratio {:<44} {:>7.3}   (round by round: median {med:.3}, {lo:.3}..{hi:.3})",
                r.name, r.value
            ),
            None => println!("  ratio {:<44} {:>7.3}", r.name, r.value),
        }
    }
    for t in &targets {
        println!(
            "  target {:<50} {}  (measured: {})",
            t.what,
            if t.met { "MET" } else { "MISSED" },
            t.measured
        );
    }
    println!(
        "  load average (1 min) {load_before:.2} before, {load_after:.2} after: figures are only comparable on an otherwise idle machine"
    );
    Ok(json!({
        "id": sc.id(),
        "title": sc.title(),
        "unit": sc.unit(),
        "rounds": rounds,
        "config": sc.config(),
        "cpu_busy_before": busy,
        "loadavg_1min": { "before": load_before, "after": load_after },
        "variants": out_variants,
        "ratios": ratios.iter().map(|r| json!({
            "name": r.name,
            "of_medians": r.value,
            "per_round": r.per_round.map(|(med, lo, hi)| json!({ "median": med, "min": lo, "max": hi })),
        })).collect::<Vec<_>>(),
        "targets": targets.iter().map(|t| json!({
            "target": t.what,
            "met": t.met,
            "measured": t.measured,
        })).collect::<Vec<_>>(),
    }))
}

pub fn bench(ctx: &Ctx, opts: &Opts) -> Result<()> {
    let started = Instant::now();
    let all = scenarios(opts.quick);
    for name in &opts.only {
        ensure!(
            all.iter()
                .any(|(short, sc)| short == name || sc.id() == name),
            "--only {name}: no such scenario; known: {}",
            all.iter()
                .map(|(short, sc)| format!("{short} ({})", sc.id()))
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    setup::setup(ctx)?;
    net::ensure_tools();
    tasks::build(ctx)?;
    util::require_root("cargo xtask bench (ztd, cgroups, bpffs)")?;
    util::ensure_bpffs()?;
    let rounds = rounds(opts.quick)?;
    ctrlc::set_handler(|| {
        eprintln!("bench: interrupted; cleaning up");
        INTERRUPTED.store(true, Ordering::SeqCst);
    })
    .context("installing the Ctrl-C handler")?;

    let env = Env::new(ctx, opts.quick)?;
    env.check_probe()?;
    let machine = machine();
    println!();
    println!(
        "bench{}: {rounds} interleaved rounds per scenario; kernel {}, {} CPUs ({}); cgroups under {}; pins /sys/fs/bpf/{tag}-*; sockets /tmp/{tag}-*.sock; netns {tag}-*",
        if opts.quick { " --quick (reduced sizes, no targets)" } else { "" },
        machine["kernel"].as_str().unwrap_or("?"),
        machine["cpus"],
        machine["cpu_model"].as_str().unwrap_or("?"),
        env.cgroup.path.display(),
        tag = env.tag,
    );

    let mut results = Vec::new();
    let mut failed = Vec::new();
    for (short, sc) in all {
        if !opts.only.is_empty() && !opts.only.iter().any(|o| o == short || o == sc.id()) {
            continue;
        }
        let n = sc.rounds(rounds);
        let t = Instant::now();
        match run_scenario(&env, sc.as_ref(), n) {
            Ok(mut v) => {
                v["seconds"] = json!(t.elapsed().as_secs_f64());
                results.push(v);
            }
            Err(e) => {
                println!("  FAILED: {e:#}");
                failed.push(format!("{}: {e:#}", sc.id()));
                results
                    .push(json!({ "id": sc.id(), "title": sc.title(), "error": format!("{e:#}") }));
            }
        }
        // The scenario's daemons, namespaces and tables go now, not at the end of the run.
        drop(sc);
        if INTERRUPTED.load(Ordering::SeqCst) {
            break;
        }
    }

    let doc = json!({
        "machine": machine,
        "unix_time": SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0),
        "rounds": rounds,
        "quick": opts.quick,
        "scenarios": results,
    });
    let path = env.out.join("results.json");
    fs::write(&path, serde_json::to_string_pretty(&doc)? + "\n")
        .with_context(|| format!("writing {}", path.display()))?;
    drop(env);
    println!();
    println!(
        "bench: results in {} ({:.0}s)",
        path.display(),
        started.elapsed().as_secs_f64()
    );
    interrupted()?;
    if !failed.is_empty() {
        bail!(
            "{} scenario(s) failed to run:\n  {}",
            failed.len(),
            failed.join("\n  ")
        );
    }
    Ok(())
}

/// Above this fraction of busy CPU time before a scenario, the bench warns.
const BUSY_WARN: f64 = 0.10;

/// Aggregate (busy, total) jiffies of all CPUs, from /proc/stat.
fn cpu_jiffies() -> Option<(u64, u64)> {
    let text = fs::read_to_string("/proc/stat").ok()?;
    let line = text.lines().find(|l| l.starts_with("cpu "))?;
    let v: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|x| x.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal (guest time is inside user).
    let total: u64 = v.iter().take(8).sum();
    let idle = v.get(3).copied().unwrap_or(0) + v.get(4).copied().unwrap_or(0);
    Some((total - idle, total))
}

/// Fraction of all CPUs' time spent busy over `window` (xtask itself sleeps meanwhile).
fn cpu_busy(window: Duration) -> f64 {
    let Some((b0, t0)) = cpu_jiffies() else {
        return f64::NAN;
    };
    std::thread::sleep(window);
    let Some((b1, t1)) = cpu_jiffies() else {
        return f64::NAN;
    };
    if t1 <= t0 {
        return f64::NAN;
    }
    b1.saturating_sub(b0) as f64 / (t1 - t0) as f64
}

/// The 1-minute load average (NaN if unreadable).
fn loadavg() -> f64 {
    fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|t| t.split_whitespace().next().and_then(|v| v.parse().ok()))
        .unwrap_or(f64::NAN)
}

fn machine() -> Value {
    let kernel = fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_string())
        .unwrap_or_default();
    let cpus = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);
    let cpu_model = fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|t| {
            t.lines()
                .find_map(|l| l.strip_prefix("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, m)| m.trim().to_string())
        })
        .unwrap_or_default();
    json!({ "kernel": kernel, "cpus": cpus, "cpu_model": cpu_model })
}

// -------------------------------------------------------------------------------------------
// The environment: a test cgroup, ztd, the probe
// -------------------------------------------------------------------------------------------

/// The cgroup2 mount point, from /proc/self/mountinfo.
fn cgroup2_root() -> Result<PathBuf> {
    let text =
        fs::read_to_string("/proc/self/mountinfo").context("reading /proc/self/mountinfo")?;
    text.lines()
        .find_map(|line| {
            let (left, right) = line.split_once(" - ")?;
            (right.split_whitespace().next() == Some("cgroup2"))
                .then(|| left.split_whitespace().nth(4).map(PathBuf::from))
                .flatten()
        })
        .ok_or_else(|| anyhow!("no cgroup2 mount in /proc/self/mountinfo"))
}

/// A child cgroup made for this run; removed on drop.
struct BenchCgroup {
    path: PathBuf,
}

impl BenchCgroup {
    /// Make `parent/name`, which must be strictly below the cgroup2 mount `root`.
    fn new(root: &Path, parent: &Path, name: &str) -> Result<BenchCgroup> {
        let path = parent.join(name);
        ensure!(
            !name.is_empty()
                && !name.contains('/')
                && name != ".."
                && path.starts_with(root)
                && path != root,
            "refusing cgroup {}: not a new child under the cgroup2 mount {}",
            path.display(),
            root.display()
        );
        fs::create_dir(&path).with_context(|| format!("mkdir {}", path.display()))?;
        Ok(BenchCgroup { path })
    }
}

impl Drop for BenchCgroup {
    fn drop(&mut self) {
        // The probes are waited for, so the cgroup empties as they exit; allow a moment.
        for _ in 0..100 {
            if fs::remove_dir(&self.path).is_ok() || !self.path.exists() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        eprintln!(
            "bench: warning: could not remove cgroup {}",
            self.path.display()
        );
    }
}

/// Where ztd's stdout (its lines and one line per decision event) goes.
#[derive(Clone, Debug)]
enum Sink {
    File(PathBuf),
    Null,
}

impl Sink {
    fn describe(&self) -> String {
        match self {
            Sink::File(p) => p.display().to_string(),
            Sink::Null => "/dev/null".to_string(),
        }
    }
}

struct Env {
    bin: PathBuf,
    /// `--quick`: reduced sizes.
    quick: bool,
    /// `target/bench`.
    out: PathBuf,
    /// `zt-bench-<pid>`: the name of this run's cgroup, and the prefix of its pin
    /// directories and control sockets.
    tag: String,
    /// `<cgroup2 mount>/zt-bench-<pid>`; the scenarios make their cgroups inside it.
    cgroup: BenchCgroup,
}

/// One finished probe run.
struct ProbeRun {
    stdout: String,
    stderr: String,
    success: bool,
    line: String,
    started: Instant,
    wall: Duration,
}

impl ProbeRun {
    /// The value of `name=V` in its output.
    fn field(&self, name: &str) -> Result<u64> {
        self.stdout
            .split_whitespace()
            .find_map(|kv| kv.strip_prefix(&format!("{name}=")))
            .and_then(|v| v.parse().ok())
            .ok_or_else(|| {
                anyhow!(
                    "`{}` printed {:?}; stderr: {}",
                    self.line,
                    self.stdout,
                    self.stderr
                )
            })
    }
}

/// Make `cmd`'s child join `cgroup` and `netns` between fork and exec.
fn enter_before_exec(cmd: &mut Command, cgroup: Option<&Path>, netns: Option<&Path>) -> Result<()> {
    use std::os::unix::{ffi::OsStrExt as _, process::CommandExt as _};
    let procs = match cgroup {
        Some(c) => Some(
            std::ffi::CString::new(c.join("cgroup.procs").as_os_str().as_bytes().to_vec())
                .context("cgroup path")?,
        ),
        None => None,
    };
    let ns = match netns {
        Some(n) => {
            Some(std::ffi::CString::new(n.as_os_str().as_bytes().to_vec()).context("netns path")?)
        }
        None => None,
    };
    // SAFETY: the closure runs in the forked child before exec and makes only
    // async-signal-safe system calls (open, write, setns, close); it allocates nothing.
    unsafe {
        cmd.pre_exec(move || {
            use nix::libc;
            if let Some(procs) = &procs {
                let fd = libc::open(procs.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
                if fd < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                let n = libc::write(fd, b"0".as_ptr().cast(), 1);
                let err = std::io::Error::last_os_error();
                libc::close(fd);
                if n != 1 {
                    return Err(err);
                }
            }
            if let Some(ns) = &ns {
                let fd = libc::open(ns.as_ptr(), libc::O_RDONLY | libc::O_CLOEXEC);
                if fd < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                let r = libc::setns(fd, libc::CLONE_NEWNET);
                let err = std::io::Error::last_os_error();
                libc::close(fd);
                if r != 0 {
                    return Err(err);
                }
            }
            Ok(())
        });
    }
    Ok(())
}

/// The outcome of one `zt-probe flood`.
struct Flood {
    eperm: u64,
    ok: u64,
    other: u64,
    /// The probe's own time for its loop.
    loop_ns: u64,
    /// When the probe had exec'd.
    started: Instant,
    /// From then to its exit.
    wall: Duration,
}

impl Env {
    fn new(ctx: &Ctx, quick: bool) -> Result<Env> {
        let tag = format!("zt-bench-{}", std::process::id());
        let out = ctx.target_dir.join("bench");
        fs::create_dir_all(&out).with_context(|| format!("mkdir {}", out.display()))?;
        let root = cgroup2_root()?;
        Ok(Env {
            bin: ctx.release_dir(),
            quick,
            out,
            cgroup: BenchCgroup::new(&root, &root, &tag)?,
            tag,
        })
    }

    /// A cgroup `name` inside this run's cgroup; removed when the guard drops.
    fn sub_cgroup(&self, name: &str) -> Result<BenchCgroup> {
        BenchCgroup::new(&cgroup2_root()?, &self.cgroup.path, name)
    }

    fn probe(&self) -> PathBuf {
        self.bin.join("zt-probe")
    }

    fn check_probe(&self) -> Result<()> {
        let out = Command::new(self.probe())
            .args(["flood", "--help"])
            .stdin(Stdio::null())
            .output()
            .with_context(|| format!("running {}", self.probe().display()))?;
        ensure!(
            out.status.success(),
            "{} has no `flood` subcommand (needed by the bench)",
            self.probe().display()
        );
        Ok(())
    }

    /// Write a policy file under target/bench.
    fn policy(&self, name: &str, text: &str) -> Result<PathBuf> {
        let path = self.out.join(name);
        fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?;
        Ok(path)
    }

    /// `zt-probe flood` from inside `cgroup`: `count` UDP (or TCP) `connect()`s to `addr`,
    /// the port cycling over `spread` values from `addr`'s port up.
    fn flood(
        &self,
        cgroup: &Path,
        proto: &str,
        addr: &str,
        count: u64,
        spread: u16,
    ) -> Result<Flood> {
        self.flood_op(cgroup, None, "connect", proto, addr, count, spread)
    }

    /// `zt-probe flood --op OP` from inside `cgroup` (and `netns`).
    #[allow(clippy::too_many_arguments)]
    fn flood_op(
        &self,
        cgroup: &Path,
        netns: Option<&Path>,
        op: &str,
        proto: &str,
        addr: &str,
        count: u64,
        spread: u16,
    ) -> Result<Flood> {
        let args: Vec<String> = vec![
            "flood".into(),
            "--op".into(),
            op.into(),
            "--proto".into(),
            proto.into(),
            "--addr".into(),
            addr.into(),
            "--count".into(),
            count.to_string(),
            "--port-spread".into(),
            spread.to_string(),
        ];
        let run = self.probe_in(Some(cgroup), netns, &args)?;
        let f = Flood {
            eperm: run.field("eperm")?,
            ok: run.field("ok")?,
            other: run.field("other")?,
            loop_ns: run.field("ns")?,
            started: run.started,
            wall: run.wall,
        };
        ensure!(run.success, "`{}` failed: {}", run.line, run.stderr);
        Ok(f)
    }

    /// Run the probe with `args`, moved into `cgroup` and `netns` between fork and exec,
    /// timed from the return of `spawn` — which waits for the exec — to its exit: a cgroup
    /// migration waits for an RCU grace period, whose length varies by milliseconds, and
    /// would otherwise be inside the timed window.
    fn probe_in(
        &self,
        cgroup: Option<&Path>,
        netns: Option<&Path>,
        args: &[String],
    ) -> Result<ProbeRun> {
        interrupted()?;
        let mut cmd = Command::new(self.probe());
        cmd.args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        enter_before_exec(&mut cmd, cgroup, netns)?;
        let line = format!(
            "{} (in {}{})",
            util::show(&cmd),
            cgroup.map(|c| c.display().to_string()).unwrap_or_default(),
            netns
                .map(|n| format!(", netns {}", n.display()))
                .unwrap_or_default()
        );
        let child = cmd.spawn().with_context(|| format!("starting `{line}`"))?;
        let started = Instant::now();
        let out = child
            .wait_with_output()
            .with_context(|| format!("waiting for `{line}`"))?;
        let ended = Instant::now();
        interrupted()?;
        Ok(ProbeRun {
            stdout: String::from_utf8_lossy(&out.stdout).trim().to_string(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
            success: out.status.success(),
            line,
            started,
            wall: ended.duration_since(started),
        })
    }

    /// An allowed UDP flood: fails unless every connect succeeded.
    fn flood_ok(&self, cgroup: &Path, addr: &str, count: u64, spread: u16) -> Result<Flood> {
        let f = self.flood(cgroup, "udp", addr, count, spread)?;
        ensure!(
            f.ok == count && f.eperm == 0 && f.other == 0,
            "flood of {count} connects to {addr} (spread {spread}) in {}: eperm={} ok={} other={}; every connect should have been allowed",
            cgroup.display(),
            f.eperm,
            f.ok,
            f.other
        );
        Ok(f)
    }

    /// Start ztd guarding `cgroup`, with its own pins (`/sys/fs/bpf/zt-bench-<pid>-<label>`)
    /// and socket (`/tmp/zt-bench-<pid>-<label>.sock`), and wait until it answers `status`
    /// and reports itself healthy.
    fn start_ztd(
        &self,
        cgroup: &Path,
        policy: &Path,
        extra: &[&str],
        sink: Sink,
        label: &str,
    ) -> Result<Ztd> {
        self.start_ztd_in(cgroup, policy, extra, sink, label, None, READY_TIMEOUT)
    }

    /// [`Env::start_ztd`], with ztd in network namespace `netns` (for `--xdp` on its
    /// interfaces) and a longer wait for big policies.
    #[allow(clippy::too_many_arguments)]
    fn start_ztd_in(
        &self,
        cgroup: &Path,
        policy: &Path,
        extra: &[&str],
        sink: Sink,
        label: &str,
        netns: Option<&Path>,
        ready_timeout: Duration,
    ) -> Result<Ztd> {
        interrupted()?;
        let name = format!("{}-{label}", self.tag);
        let bpffs = Path::new(util::BPFFS).join(&name);
        let socket = PathBuf::from(format!("/tmp/{name}.sock"));
        ensure!(
            !bpffs.exists(),
            "{} exists already: unload it first (ztctl unload --bpffs {})",
            bpffs.display(),
            bpffs.display()
        );
        let stderr_path = self.out.join(format!("ztd-{label}.stderr.log"));
        let stderr = File::create(&stderr_path)
            .with_context(|| format!("creating {}", stderr_path.display()))?;
        let stdout = match &sink {
            Sink::File(p) => {
                Stdio::from(File::create(p).with_context(|| format!("creating {}", p.display()))?)
            }
            Sink::Null => Stdio::null(),
        };
        // The flow store is on, as by default, but kept with this run's output.
        let flows = self.out.join(format!("flows-{label}"));
        let _ = std::fs::remove_dir_all(&flows);
        let mut cmd = Command::new(self.bin.join("ztd"));
        // Never an installed /etc/zt/ztd.toml.
        cmd.args(["--config", "/dev/null"])
            .arg("--flows-dir")
            .arg(&flows)
            .arg("--policy")
            .arg(policy)
            .arg("--cgroup")
            .arg(cgroup)
            .arg("--bpffs")
            .arg(&bpffs)
            .arg("--socket")
            .arg(&socket)
            .args(extra)
            .stdin(Stdio::null())
            .stdout(stdout)
            .stderr(Stdio::from(stderr));
        enter_before_exec(&mut cmd, None, netns)?;
        let line = util::show(&cmd);
        let child = cmd.spawn().with_context(|| format!("starting `{line}`"))?;
        let mut ztd = Ztd {
            child: Some(child),
            ztctl: self.bin.join("ztctl"),
            bpffs,
            socket,
            sink,
            stderr: stderr_path,
            stopped: false,
        };
        let end = Instant::now() + ready_timeout;
        loop {
            interrupted()?;
            if let Some(c) = ztd.child.as_mut() {
                if let Ok(Some(st)) = c.try_wait() {
                    bail!(
                        "`{line}` exited ({st}) before it was ready:\n{}",
                        ztd.output_tail()
                    );
                }
            }
            if let Ok(st) = ztd.status() {
                if st["healthy"] == Value::Bool(true) {
                    return Ok(ztd);
                }
            }
            if Instant::now() > end {
                bail!(
                    "`{line}` not healthy after {ready_timeout:?}:\n{}",
                    ztd.output_tail()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// `status.events` plus the kernel's allowed-decision count.
#[derive(Clone, Copy, Debug, Default)]
struct Events {
    produced: u64,
    delivered: u64,
    lost_kernel: u64,
    lost_daemon: u64,
    suppressed: u64,
    allowed: u64,
}

impl Events {
    fn from_status(st: &Value) -> Result<Events> {
        let ev = |k: &str| {
            st["events"][k]
                .as_u64()
                .ok_or_else(|| anyhow!("ztctl status --json has no events.{k}: {st}"))
        };
        Ok(Events {
            produced: ev("produced")?,
            delivered: ev("delivered")?,
            lost_kernel: ev("lost_kernel")?,
            lost_daemon: ev("lost_daemon")?,
            suppressed: ev("suppressed")?,
            allowed: st["decisions"]["allowed"]
                .as_u64()
                .ok_or_else(|| anyhow!("ztctl status --json has no decisions.allowed: {st}"))?,
        })
    }

    /// `self - before`, field by field.
    fn since(&self, before: &Events) -> Events {
        Events {
            produced: self.produced.saturating_sub(before.produced),
            delivered: self.delivered.saturating_sub(before.delivered),
            lost_kernel: self.lost_kernel.saturating_sub(before.lost_kernel),
            lost_daemon: self.lost_daemon.saturating_sub(before.lost_daemon),
            suppressed: self.suppressed.saturating_sub(before.suppressed),
            allowed: self.allowed.saturating_sub(before.allowed),
        }
    }
}

/// A running ztd we started. [`Ztd::stop`] (or drop) runs `ztctl unload` on its pins (which
/// asks it to exit), then waits for it and kills it by pid if it did not exit.
struct Ztd {
    child: Option<Child>,
    ztctl: PathBuf,
    bpffs: PathBuf,
    socket: PathBuf,
    sink: Sink,
    stderr: PathBuf,
    stopped: bool,
}

impl Ztd {
    /// Its pid, while it runs.
    fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// `ztctl --socket S ARGS`, with its wall time.
    fn ztctl(&self, args: &[&str]) -> Result<(std::process::Output, Duration)> {
        let t = Instant::now();
        let out = Command::new(&self.ztctl)
            .arg("--socket")
            .arg(&self.socket)
            .args(args)
            .stdin(Stdio::null())
            .output()
            .with_context(|| format!("running ztctl {}", args.join(" ")))?;
        Ok((out, t.elapsed()))
    }

    /// `ztctl status --json`.
    fn status(&self) -> Result<Value> {
        let out = Command::new(&self.ztctl)
            .arg("--socket")
            .arg(&self.socket)
            .args(["status", "--json"])
            .stdin(Stdio::null())
            .output()
            .context("running ztctl status")?;
        ensure!(
            out.status.success(),
            "ztctl --socket {} status --json failed ({}): {}{}",
            self.socket.display(),
            out.status,
            String::from_utf8_lossy(&out.stdout).trim(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
        serde_json::from_slice(&out.stdout).context("parsing ztctl status --json")
    }

    /// Poll status until the daemon has read everything the kernel put in the ring buffer
    /// (`delivered + lost_daemon == produced - lost_kernel`): the counters, and when they
    /// were seen.
    fn drained(&self) -> Result<(Events, Instant)> {
        let end = Instant::now() + DRAIN_TIMEOUT;
        loop {
            interrupted()?;
            let st = self.status()?;
            let seen = Instant::now();
            let e = Events::from_status(&st)?;
            if e.delivered + e.lost_daemon + e.lost_kernel == e.produced {
                return Ok((e, seen));
            }
            if seen > end {
                bail!(
                    "the ring buffer was not drained after {DRAIN_TIMEOUT:?}: events {}",
                    st["events"]
                );
            }
            std::thread::sleep(POLL);
        }
    }

    fn stop(mut self) -> Result<()> {
        self.shutdown()
    }

    fn shutdown(&mut self) -> Result<()> {
        if self.stopped {
            return Ok(());
        }
        self.stopped = true;
        let unload = |socket: bool| -> Result<()> {
            let mut cmd = Command::new(&self.ztctl);
            if socket {
                cmd.arg("--socket").arg(&self.socket);
            }
            cmd.arg("unload")
                .arg("--bpffs")
                .arg(&self.bpffs)
                .stdin(Stdio::null());
            let out = cmd
                .output()
                .with_context(|| format!("running `{}`", util::show(&cmd)))?;
            ensure!(
                out.status.success(),
                "`{}` failed ({}): {}",
                util::show(&cmd),
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            );
            Ok(())
        };
        let mut result = unload(true);
        if let Some(mut c) = self.child.take() {
            let end = Instant::now() + Duration::from_secs(10);
            loop {
                match c.try_wait() {
                    Ok(Some(_)) => break,
                    Ok(None) if Instant::now() < end => {
                        std::thread::sleep(Duration::from_millis(20))
                    }
                    _ => {
                        eprintln!("bench: ztd (pid {}) did not exit: killing it", c.id());
                        let _ = c.kill();
                        let _ = c.wait();
                        break;
                    }
                }
            }
        }
        if self.bpffs.exists() {
            // The daemon may have been gone or busy: unload without it.
            let again = unload(false);
            if result.is_ok() {
                result = again;
            }
        }
        let _ = fs::remove_file(&self.socket);
        if self.bpffs.exists() {
            let e = anyhow!("{} still exists after unload", self.bpffs.display());
            return Err(match result {
                Ok(()) => e,
                Err(prev) => prev.context(e),
            });
        }
        result
    }

    /// The end of ztd's stderr and stdout, for error messages.
    fn output_tail(&self) -> String {
        let mut s = format!("--- {}:\n{}", self.stderr.display(), tail(&self.stderr));
        if let Sink::File(p) = &self.sink {
            s.push_str(&format!("\n--- {}:\n{}", p.display(), tail(p)));
        }
        s
    }
}

impl Drop for Ztd {
    fn drop(&mut self) {
        if let Err(e) = self.shutdown() {
            eprintln!("bench: cleanup: {e:#}");
        }
    }
}

/// The last 2 KiB of a file.
fn tail(path: &Path) -> String {
    let Ok(mut f) = File::open(path) else {
        return String::new();
    };
    let len = f.metadata().map(|m| m.len()).unwrap_or(0);
    let _ = f.seek(SeekFrom::Start(len.saturating_sub(2048)));
    let mut buf = Vec::new();
    let _ = f.read_to_end(&mut buf);
    String::from_utf8_lossy(&buf).into_owned()
}

fn ns(d: Duration) -> f64 {
    d.as_secs_f64() * 1e9
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn skipped_samples_are_left_out_of_medians() {
        let s = Sample::skipped("no tool");
        assert_eq!(s.skip_reason(), Some("no tool"));
        assert_eq!(median(&[s.value, 3.0, 1.0]), 2.0);
        assert!(median(&[f64::NAN]).is_nan());
    }

    #[test]
    fn medians_of_odd_and_even_counts() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0, 3.0, 2.0]), 2.5);
        assert!(median(&[]).is_nan());
        assert_eq!(min_max(&[2.0, -1.0, 5.0]), (-1.0, 5.0));
    }

    #[test]
    fn events_since_subtracts_field_by_field() {
        let a = Events {
            produced: 10,
            delivered: 8,
            lost_kernel: 1,
            lost_daemon: 1,
            suppressed: 3,
            allowed: 20,
        };
        let d = a.since(&Events {
            produced: 4,
            delivered: 4,
            ..Events::default()
        });
        assert_eq!((d.produced, d.delivered, d.lost_kernel), (6, 4, 1));
        assert_eq!((d.suppressed, d.allowed), (3, 20));
    }
}
