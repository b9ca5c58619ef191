//! The flow store: a persistent, bounded record of the decisions `ztd` reported, aggregated
//! into flows (who, which way, which peer, port and protocol, which verdict → how many
//! events, first and last seen). `ztctl suggest` writes a least-privilege policy from it and
//! `ztctl diff` replays it against two policies ([`crate::learn`]).
//!
//! # Why JSON lines, not an embedded database
//! An embedded database (redb, sled) takes an exclusive lock on its file: `ztctl` could not
//! read the store while `ztd` writes it, and would need the daemon for every query. Plain
//! JSON lines (serde_json) are read by `ztctl` directly — with `ztd` running or down — and by
//! people (`grep`, `jq`), need no new dependency, and stay small because the daemon
//! aggregates before it writes: a flood of one flow costs one line per flush interval.
//!
//! # Layout and crash safety
//! ```text
//! DIR/lock           flock(2) of the writing ztd: one writer per store
//! DIR/base-N.jsonl   compacted flows: every segment up to N merged, one flow per line
//! DIR/seg-M.jsonl    appended since (M > N): one aggregated delta per line and flush
//! ```
//! A reader takes the highest `base-N` and adds every `seg-M` with `M > N`, merging equal
//! flows. Compaction (when the segments outgrow half of `--flows-max-bytes`) merges the base
//! and the segments into `base-M.jsonl.tmp`, syncs it, renames it into place and only then
//! removes what it replaced: a crash at any point leaves a store that reads the same (at
//! worst a torn last line of a segment, which readers skip and count). The base keeps at most
//! `--flows-max-flows` flows and half of `--flows-max-bytes`; the flows seen longest ago go
//! first.

use std::{
    collections::HashMap,
    fs::{self, File, OpenOptions},
    io::{self, BufRead, BufReader, Write},
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    os::unix::fs::DirBuilderExt,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use nix::fcntl::{Flock, FlockArg};
use serde::{Deserialize, Serialize};

use crate::history::{rfc3339_ns, EventRecord};

/// Where `ztd` keeps the store by default.
pub const DEFAULT_DIR: &str = "/var/lib/zt/flows";
/// Default bound of the whole store on disk.
pub const DEFAULT_MAX_BYTES: u64 = 64 << 20;
/// Default bound of the flows kept after compaction.
pub const DEFAULT_MAX_FLOWS: usize = 100_000;
/// Default time between writes of the aggregated events.
pub const DEFAULT_FLUSH_INTERVAL: Duration = Duration::from_secs(2);
/// Distinct flows held in memory before a write, whatever the interval.
pub const MAX_PENDING: usize = 10_000;
/// Segments left by earlier runs that make the next start compact them.
const MAX_SEGMENTS: usize = 32;

/// Whether a file's last byte is a newline (a torn write's is not).
fn ends_with_newline(path: &Path) -> bool {
    use std::io::{Read, Seek, SeekFrom};
    let mut last = [0u8; 1];
    File::open(path)
        .and_then(|mut f| {
            f.seek(SeekFrom::End(-1))?;
            f.read_exact(&mut last)
        })
        .map(|()| last[0] == b'\n')
        .unwrap_or(true)
}

/// Which way a flow went, as the policy's rules see it.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[serde(rename_all = "lowercase")]
pub enum FlowKind {
    /// A connect or send (`peer`, `port`: the destination).
    Egress,
    /// An inbound packet to a listener (`peer`: the source; `port`: the local port).
    Ingress,
    /// A bind of an explicit port (`peer`: the local address; `port`: the local port).
    Bind,
    /// The creation of a raw or ICMP socket (`peer` unspecified, `port` 0).
    Socket,
}

impl FlowKind {
    pub fn as_str(self) -> &'static str {
        match self {
            FlowKind::Egress => "egress",
            FlowKind::Ingress => "ingress",
            FlowKind::Bind => "bind",
            FlowKind::Socket => "socket",
        }
    }

    /// The kind of an event's hook; `None` for XDP (the front door judges no identity).
    pub fn of_hook(hook: &str) -> Option<FlowKind> {
        match hook {
            "connect4" | "connect6" | "sendmsg4" | "sendmsg6" | "skb_egress" => {
                Some(FlowKind::Egress)
            }
            "skb_ingress" => Some(FlowKind::Ingress),
            "bind4" | "bind6" => Some(FlowKind::Bind),
            "sock_create" => Some(FlowKind::Socket),
            _ => None,
        }
    }
}

/// What makes two events the same flow.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct FlowKey {
    pub kind: FlowKind,
    /// `allow`, `deny` or `audit`.
    pub verdict: String,
    /// Path of the executable, if it was known.
    pub exe: Option<String>,
    /// Device (kernel encoding) and inode of the executable (0, 0: none).
    pub exe_dev: u64,
    pub exe_ino: u64,
    /// Effective uid and gid.
    pub uid: u32,
    pub gid: u32,
    /// Cgroup path under the cgroup2 mount (`/system.slice/sshd.service`), if known.
    pub cgroup: Option<String>,
    /// `tcp`, `udp`, `icmp` or `other`.
    pub proto: String,
    /// See [`FlowKind`] (IPv4-mapped IPv6 is stored as IPv4).
    pub peer: IpAddr,
    pub port: u16,
}

/// One flow and what was seen of it.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct Flow {
    #[serde(flatten)]
    pub key: FlowKey,
    /// Names of `uid` and `gid`, and the systemd unit of the cgroup, when known.
    #[serde(default)]
    pub user: Option<String>,
    #[serde(default)]
    pub group: Option<String>,
    #[serde(default)]
    pub unit: Option<String>,
    /// Events (rate-limited ones included).
    pub count: u64,
    /// First and last seen, nanoseconds since the Unix epoch.
    pub first_ns: u64,
    pub last_ns: u64,
    /// `last_ns` in RFC 3339, for people reading the file.
    #[serde(default)]
    pub last: String,
}

impl Flow {
    /// The flow of a decision event; `None` for events with no identity (XDP).
    pub fn of_event(r: &EventRecord) -> Option<Flow> {
        let kind = FlowKind::of_hook(&r.hook)?;
        let (peer, port) = match kind {
            FlowKind::Egress => (r.peer_addr, r.peer_port),
            FlowKind::Ingress => (r.peer_addr, r.local_port),
            FlowKind::Bind => (r.local_addr.unwrap_or(unspecified(r.family)), r.local_port),
            FlowKind::Socket => (unspecified(r.family), 0),
        };
        Some(Flow {
            key: FlowKey {
                kind,
                verdict: r.verdict.clone(),
                exe: r.exe.clone(),
                exe_dev: r.exe_dev,
                exe_ino: r.exe_ino,
                uid: r.uid,
                gid: r.gid,
                cgroup: r.cgroup.clone(),
                proto: r.proto.clone(),
                peer: canonical(peer),
                port,
            },
            user: r.user.clone(),
            group: r.group.clone(),
            unit: r.cgroup.as_deref().and_then(unit_of).map(|(u, _)| u),
            count: 1 + u64::from(r.suppressed),
            first_ns: r.time_ns,
            last_ns: r.time_ns,
            last: r.time.clone(),
        })
    }

    /// Add `other` (the same flow) to this one.
    pub fn merge(&mut self, other: &Flow) {
        self.count = self.count.saturating_add(other.count);
        self.first_ns = self.first_ns.min(other.first_ns);
        if other.last_ns >= self.last_ns {
            self.last_ns = other.last_ns;
            self.last = rfc3339_ns(self.last_ns);
            // The newest names win (a user renamed, a unit restarted).
            for (mine, theirs) in [
                (&mut self.user, &other.user),
                (&mut self.group, &other.group),
                (&mut self.unit, &other.unit),
            ] {
                if theirs.is_some() {
                    mine.clone_from(theirs);
                }
            }
        }
    }
}

fn unspecified(family: u8) -> IpAddr {
    if family == 6 {
        IpAddr::V6(Ipv6Addr::UNSPECIFIED)
    } else {
        IpAddr::V4(Ipv4Addr::UNSPECIFIED)
    }
}

fn canonical(addr: IpAddr) -> IpAddr {
    match addr {
        IpAddr::V6(a) => a.to_ipv4_mapped().map_or(addr, IpAddr::V4),
        v4 => v4,
    }
}

/// The systemd unit a cgroup path belongs to, and the unit's cgroup: the deepest component
/// ending in `.service` (else `.scope`), e.g. `/system.slice/nginx.service/worker` →
/// (`nginx.service`, `system.slice/nginx.service`).
pub fn unit_of(cgroup: &str) -> Option<(String, String)> {
    let parts: Vec<&str> = cgroup.split('/').filter(|p| !p.is_empty()).collect();
    for suffix in [".service", ".scope"] {
        if let Some(i) = parts.iter().rposition(|p| p.ends_with(suffix)) {
            return Some((parts[i].to_string(), parts[..=i].join("/")));
        }
    }
    None
}

/// Why the store could not be used.
#[derive(Debug, thiserror::Error)]
pub enum FlowStoreError {
    #[error("flow store {path}: {what}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        source: io::Error,
    },
    #[error("flow store {0} is in use by another ztd: give each ztd its own --flows-dir")]
    Locked(PathBuf),
    #[error("flow store {0} does not exist: start ztd (it records flows by default) or pass --store DIR")]
    Missing(PathBuf),
    #[error("flow store {0} kept changing while it was read: try again")]
    Busy(PathBuf),
}

fn io_err<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> FlowStoreError + 'a {
    move |source| FlowStoreError::Io {
        what,
        path: path.to_path_buf(),
        source,
    }
}

/// Settings of the store (`ztd --flows-*`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoreConfig {
    pub dir: PathBuf,
    pub max_bytes: u64,
    pub max_flows: usize,
    pub flush_interval: Duration,
}

impl StoreConfig {
    pub fn new(dir: impl Into<PathBuf>) -> StoreConfig {
        StoreConfig {
            dir: dir.into(),
            max_bytes: DEFAULT_MAX_BYTES,
            max_flows: DEFAULT_MAX_FLOWS,
            flush_interval: DEFAULT_FLUSH_INTERVAL,
        }
    }
}

/// `ztd`'s flags for the store (flattened into its command line).
#[derive(Clone, Debug, clap::Args)]
pub struct FlowArgs {
    /// Directory of the persistent flow store that `ztctl suggest` and `ztctl diff` read
    /// (decisions aggregated per identity, peer, port, protocol, direction and verdict).
    #[arg(long, value_name = "DIR", default_value = DEFAULT_DIR)]
    pub flows_dir: PathBuf,
    /// Do not record flows.
    #[arg(long)]
    pub no_flows: bool,
    /// Bound of the flow store on disk (e.g. 64MiB, 500k, 1G).
    #[arg(long, value_name = "SIZE", default_value = "64MiB", value_parser = parse_size)]
    pub flows_max_bytes: u64,
    /// Most flows kept; the flows seen longest ago are dropped first.
    #[arg(long, value_name = "N", default_value_t = DEFAULT_MAX_FLOWS)]
    pub flows_max_flows: usize,
    /// How often recorded flows are written to disk (e.g. 2s, 500ms).
    #[arg(long, value_name = "DURATION", default_value = "2s", value_parser = humantime::parse_duration)]
    pub flows_flush_interval: Duration,
}

impl FlowArgs {
    /// The store's settings, `None` with `--no-flows`.
    pub fn config(&self) -> Option<StoreConfig> {
        (!self.no_flows).then(|| StoreConfig {
            dir: self.flows_dir.clone(),
            max_bytes: self.flows_max_bytes,
            max_flows: self.flows_max_flows.max(1),
            flush_interval: self.flows_flush_interval,
        })
    }
}

/// A size: a number with an optional unit (`k`, `M`, `G` powers of 1000; `KiB`, `MiB`,
/// `GiB` powers of 1024; `B`), at least 4 KiB.
pub fn parse_size(input: &str) -> Result<u64, String> {
    let s = input.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: u64 = num
        .parse()
        .map_err(|_| format!("invalid size {input:?}: expected a number and a unit, e.g. 64MiB"))?;
    let mult: u64 = match unit.trim() {
        "" | "B" => 1,
        "k" | "K" | "kB" | "KB" => 1000,
        "KiB" => 1 << 10,
        "M" | "MB" => 1_000_000,
        "MiB" => 1 << 20,
        "G" | "GB" => 1_000_000_000,
        "GiB" => 1 << 30,
        other => {
            return Err(format!(
                "invalid size unit {other:?} in {input:?}: use B, k, M, G, KiB, MiB or GiB"
            ))
        }
    };
    let bytes = n
        .checked_mul(mult)
        .ok_or_else(|| format!("size {input:?} is too large"))?;
    if bytes < 4096 {
        return Err(format!("size {input:?} is too small: at least 4KiB"));
    }
    Ok(bytes)
}

/// Counters of the store, for logs and tests.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StoreStats {
    pub flushes: u64,
    pub compactions: u64,
    /// Flows dropped by compaction to stay within the bounds.
    pub evicted: u64,
    /// Flows not written because the disk refused (logged).
    pub write_errors: u64,
}

/// The writer: aggregates events in memory, appends them to the active segment, compacts.
pub struct FlowStore {
    cfg: StoreConfig,
    _lock: Flock<File>,
    pending: HashMap<FlowKey, Flow>,
    active: File,
    active_seq: u64,
    segment_bytes: u64,
    last_flush: Instant,
    stats: StoreStats,
    failing: bool,
}

/// Files of the store by sequence number.
type Numbered = Vec<(u64, PathBuf)>;

/// `(seq, path)` of the `base-N.jsonl` and `seg-M.jsonl` files in `dir`, sorted.
fn list(dir: &Path) -> Result<(Numbered, Numbered), FlowStoreError> {
    let entries = fs::read_dir(dir).map_err(|e| {
        if e.kind() == io::ErrorKind::NotFound {
            FlowStoreError::Missing(dir.to_path_buf())
        } else {
            io_err("reading the directory", dir)(e)
        }
    })?;
    let (mut bases, mut segs) = (Vec::new(), Vec::new());
    for entry in entries.flatten() {
        let name = entry.file_name();
        let name = name.to_string_lossy();
        let seq_of = |prefix: &str| {
            name.strip_prefix(prefix)
                .and_then(|r| r.strip_suffix(".jsonl"))
                .and_then(|n| n.parse::<u64>().ok())
        };
        if let Some(n) = seq_of("base-") {
            bases.push((n, entry.path()));
        } else if let Some(n) = seq_of("seg-") {
            segs.push((n, entry.path()));
        }
    }
    bases.sort();
    segs.sort();
    Ok((bases, segs))
}

/// Merge the flows of one file into `into`; returns the lines that did not parse.
fn read_file(path: &Path, into: &mut HashMap<FlowKey, Flow>) -> io::Result<u64> {
    let mut bad = 0;
    for line in BufReader::new(File::open(path)?).lines() {
        let line = line?;
        if line.trim().is_empty() {
            continue;
        }
        match serde_json::from_str::<Flow>(&line) {
            Ok(flow) => match into.get_mut(&flow.key) {
                Some(f) => f.merge(&flow),
                None => {
                    into.insert(flow.key.clone(), flow);
                }
            },
            Err(_) => bad += 1,
        }
    }
    Ok(bad)
}

/// What a store holds.
#[derive(Clone, Debug, Default)]
pub struct Snapshot {
    /// Every flow, sorted by key.
    pub flows: Vec<Flow>,
    /// Lines that did not parse (a torn write after a crash, a hand edit).
    pub bad_lines: u64,
}

/// Read the store in `dir` (without the writer: works while `ztd` runs or is down).
pub fn read(dir: &Path) -> Result<Snapshot, FlowStoreError> {
    'attempt: for _ in 0..10 {
        let (bases, segs) = list(dir)?;
        let base = bases.last().cloned();
        let through = base.as_ref().map_or(0, |(n, _)| *n);
        let files = base
            .into_iter()
            .chain(segs.into_iter().filter(|(n, _)| *n > through));
        let mut flows = HashMap::new();
        let mut bad_lines = 0;
        for (_, path) in files {
            match read_file(&path, &mut flows) {
                Ok(bad) => bad_lines += bad,
                // Compacted away while we read: start again.
                Err(e) if e.kind() == io::ErrorKind::NotFound => {
                    std::thread::sleep(Duration::from_millis(20));
                    continue 'attempt;
                }
                Err(e) => return Err(io_err("reading", &path)(e)),
            }
        }
        let mut flows: Vec<Flow> = flows.into_values().collect();
        flows.sort_by(|a, b| a.key.cmp(&b.key));
        return Ok(Snapshot { flows, bad_lines });
    }
    Err(FlowStoreError::Busy(dir.to_path_buf()))
}

fn open_segment(dir: &Path, seq: u64) -> Result<(File, u64), FlowStoreError> {
    let path = dir.join(format!("seg-{seq}.jsonl"));
    let file = OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
        .map_err(io_err("opening a segment", &path))?;
    let len = file.metadata().map(|m| m.len()).unwrap_or(0);
    Ok((file, len))
}

impl FlowStore {
    /// Open (creating it if needed) the store, as its only writer.
    pub fn open(cfg: StoreConfig) -> Result<FlowStore, FlowStoreError> {
        let dir = cfg.dir.clone();
        // Who talked to whom is for root only (an existing directory keeps its mode).
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&dir)
            .map_err(io_err("creating the directory", &dir))?;
        let lock_path = dir.join("lock");
        let lock_file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(io_err("opening the lock", &lock_path))?;
        let lock = Flock::lock(lock_file, FlockArg::LockExclusiveNonblock)
            .map_err(|_| FlowStoreError::Locked(dir.clone()))?;
        let (bases, segs) = list(&dir)?;
        let through = bases.last().map_or(0, |(n, _)| *n);
        // Leftovers of an interrupted compaction: what the newest base already holds.
        for (n, path) in bases.iter().rev().skip(1).chain(segs.iter()) {
            if *n <= through {
                let _ = fs::remove_file(path);
            }
        }
        let _ = fs::read_dir(&dir).map(|entries| {
            for e in entries.flatten() {
                if e.file_name().to_string_lossy().ends_with(".tmp") {
                    let _ = fs::remove_file(e.path());
                }
            }
        });
        // Live segments; empty ones (a start without events) are removed.
        let mut live = Vec::new();
        for (n, path) in segs.iter().filter(|(n, _)| *n > through) {
            match fs::metadata(path) {
                Ok(m) if m.len() == 0 => {
                    let _ = fs::remove_file(path);
                }
                Ok(m) => live.push((*n, path.clone(), m.len())),
                Err(_) => {}
            }
        }
        let segment_bytes: u64 = live.iter().map(|(_, _, len)| len).sum();
        // A new segment per start: a torn line of a crash stays in the old one.
        let active_seq = segs.last().map_or(0, |(n, _)| *n).max(through) + 1;
        let (active, _) = open_segment(&dir, active_seq)?;
        let mut store = FlowStore {
            cfg,
            _lock: lock,
            pending: HashMap::new(),
            active,
            active_seq,
            segment_bytes,
            last_flush: Instant::now(),
            stats: StoreStats::default(),
            failing: false,
        };
        // Many restarts leave many segments, a crash a torn last line: compact them away.
        let torn = live.iter().any(|(_, path, _)| !ends_with_newline(path));
        if live.len() > MAX_SEGMENTS || torn {
            store.compact()?;
        }
        Ok(store)
    }

    pub fn config(&self) -> &StoreConfig {
        &self.cfg
    }

    pub fn stats(&self) -> StoreStats {
        self.stats
    }

    /// Count one decision event (in memory; written by [`FlowStore::flush`]).
    pub fn record(&mut self, r: &EventRecord) -> Result<(), FlowStoreError> {
        let Some(flow) = Flow::of_event(r) else {
            return Ok(());
        };
        match self.pending.get_mut(&flow.key) {
            Some(f) => f.merge(&flow),
            None => {
                self.pending.insert(flow.key.clone(), flow);
            }
        }
        if self.pending.len() >= MAX_PENDING {
            return self.flush();
        }
        Ok(())
    }

    /// Flush if the interval has passed since the last flush.
    pub fn flush_if_due(&mut self) -> Result<(), FlowStoreError> {
        if self.last_flush.elapsed() >= self.cfg.flush_interval {
            return self.flush();
        }
        Ok(())
    }

    /// Append what was recorded since the last flush, then compact if the segments grew past
    /// their share of the bound. A failing disk is reported once, not at every flush, until
    /// a flush works again.
    pub fn flush(&mut self) -> Result<(), FlowStoreError> {
        let result = self.flush_inner();
        let was_failing = std::mem::replace(&mut self.failing, result.is_err());
        match result {
            Err(_) if was_failing => Ok(()),
            other => other,
        }
    }

    fn flush_inner(&mut self) -> Result<(), FlowStoreError> {
        self.last_flush = Instant::now();
        if self.pending.is_empty() {
            return Ok(());
        }
        let mut text = String::new();
        let mut flows: Vec<Flow> = self.pending.drain().map(|(_, f)| f).collect();
        flows.sort_by(|a, b| a.key.cmp(&b.key));
        for f in &flows {
            if let Ok(line) = serde_json::to_string(f) {
                text.push_str(&line);
                text.push('\n');
            }
        }
        let path = self.segment_path(self.active_seq);
        let written = self
            .active
            .write_all(text.as_bytes())
            .and_then(|()| self.active.sync_data());
        if let Err(e) = written {
            self.stats.write_errors += flows.len() as u64;
            return Err(io_err("appending", &path)(e));
        }
        self.segment_bytes += text.len() as u64;
        self.stats.flushes += 1;
        if self.segment_bytes > self.cfg.max_bytes / 2 {
            self.compact()?;
        }
        Ok(())
    }

    fn segment_path(&self, seq: u64) -> PathBuf {
        self.cfg.dir.join(format!("seg-{seq}.jsonl"))
    }

    /// Merge the base and every segment into a new base within the bounds, then start a new
    /// segment.
    pub fn compact(&mut self) -> Result<(), FlowStoreError> {
        let dir = self.cfg.dir.clone();
        let through = self.active_seq;
        let snapshot = read(&dir)?;
        let mut flows = snapshot.flows;
        // Newest first; keep within the bounds.
        flows.sort_by(|a, b| b.last_ns.cmp(&a.last_ns).then(a.key.cmp(&b.key)));
        let before = flows.len();
        flows.truncate(self.cfg.max_flows);
        let budget = self.cfg.max_bytes / 2;
        let mut text = String::new();
        let mut kept = 0;
        for f in &flows {
            let Ok(line) = serde_json::to_string(f) else {
                continue;
            };
            if (text.len() + line.len() + 1) as u64 > budget {
                break;
            }
            text.push_str(&line);
            text.push('\n');
            kept += 1;
        }
        self.stats.evicted += (before - kept) as u64;
        let tmp = dir.join(format!("base-{through}.jsonl.tmp"));
        let base = dir.join(format!("base-{through}.jsonl"));
        let write = || -> io::Result<()> {
            let mut f = File::create(&tmp)?;
            f.write_all(text.as_bytes())?;
            f.sync_all()?;
            fs::rename(&tmp, &base)?;
            File::open(&dir)?.sync_all()
        };
        write().map_err(io_err("writing a compacted base", &base))?;
        self.stats.compactions += 1;
        let (bases, segs) = list(&dir)?;
        for (n, path) in bases.iter().chain(segs.iter()) {
            if *n < through || (*n == through && path != &base) {
                let _ = fs::remove_file(path);
            }
        }
        self.active_seq = through + 1;
        let (active, _) = open_segment(&dir, self.active_seq)?;
        self.active = active;
        self.segment_bytes = 0;
        Ok(())
    }
}

/// The daemon's handle on its store, and what `ztctl status` says about it.
#[derive(Clone, Default)]
pub enum Recorder {
    /// `--no-flows`.
    #[default]
    Off,
    /// The store could not be opened: nothing is recorded.
    Failed {
        dir: PathBuf,
        error: String,
    },
    On(Arc<Mutex<FlowStore>>),
}

impl Recorder {
    /// Open the store (`None`: `--no-flows`) and start its flusher; `report` hears about
    /// failures, the opening's included (the daemon runs on without recording).
    pub fn open(
        cfg: Option<StoreConfig>,
        report: impl Fn(FlowStoreError) + Send + Sync + Clone + 'static,
    ) -> Recorder {
        let Some(cfg) = cfg else {
            return Recorder::Off;
        };
        let dir = cfg.dir.clone();
        match FlowStore::open(cfg) {
            Ok(store) => {
                let store = Arc::new(Mutex::new(store));
                spawn_flusher(Arc::clone(&store), report);
                Recorder::On(store)
            }
            Err(e) => {
                let error = e.to_string();
                report(e);
                Recorder::Failed { dir, error }
            }
        }
    }

    pub fn store(&self) -> Option<&Arc<Mutex<FlowStore>>> {
        match self {
            Recorder::On(s) => Some(s),
            _ => None,
        }
    }

    pub fn status(&self) -> Option<StoreStatus> {
        match self {
            Recorder::Off => None,
            Recorder::Failed { dir, error } => Some(StoreStatus {
                dir: dir.clone(),
                error: error.clone(),
                ..StoreStatus::default()
            }),
            Recorder::On(store) => store.lock().ok().map(|s| StoreStatus {
                dir: s.cfg.dir.clone(),
                recording: true,
                error: String::new(),
                failing: s.failing,
                pending: s.pending.len() as u64,
                flushes: s.stats.flushes,
                compactions: s.stats.compactions,
                evicted: s.stats.evicted,
                write_errors: s.stats.write_errors,
            }),
        }
    }
}

/// The flow store in `ztctl status --json` (`flows`).
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
pub struct StoreStatus {
    /// `--flows-dir`.
    pub dir: PathBuf,
    /// Events are being recorded.
    pub recording: bool,
    /// Why not (the store could not be opened), or empty.
    pub error: String,
    /// The last write failed (logged once); recording resumes when the disk takes it.
    pub failing: bool,
    /// Flows in memory, not yet written.
    pub pending: u64,
    pub flushes: u64,
    pub compactions: u64,
    /// Flows dropped by compaction to stay within the bounds.
    pub evicted: u64,
    /// Flows lost because a write failed.
    pub write_errors: u64,
}

impl StoreStatus {
    /// One line for `ztctl status`.
    pub fn summary(&self) -> String {
        if !self.recording {
            return format!("NOT recorded ({}): {}", self.dir.display(), self.error);
        }
        format!(
            "recording to {}{}  pending {}  flushes {}  compactions {}  evicted {}  write errors {}",
            self.dir.display(),
            if self.failing { " (FAILING: see ztd's log)" } else { "" },
            self.pending,
            self.flushes,
            self.compactions,
            self.evicted,
            self.write_errors
        )
    }
}

/// Flush a shared store (if any) now: at shutdown.
pub fn flush_shared(store: Option<&Arc<Mutex<FlowStore>>>) -> Result<(), FlowStoreError> {
    match store.map(|s| s.lock()) {
        Some(Ok(mut s)) => s.flush(),
        _ => Ok(()),
    }
}

/// Flush a shared store every flush interval, off the async workers (a flush may compact);
/// `report` hears about failures (once per failing spell, see [`FlowStore::flush`]).
pub fn spawn_flusher(
    store: Arc<Mutex<FlowStore>>,
    report: impl Fn(FlowStoreError) + Send + Sync + 'static,
) {
    let every = store
        .lock()
        .map(|s| s.cfg.flush_interval)
        .unwrap_or(DEFAULT_FLUSH_INTERVAL)
        .max(Duration::from_millis(10));
    let report = Arc::new(report);
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let (store, report) = (Arc::clone(&store), Arc::clone(&report));
            let flushed = tokio::task::spawn_blocking(move || match store.lock() {
                Ok(mut s) => s.flush(),
                Err(_) => Ok(()),
            })
            .await;
            if let Ok(Err(e)) = flushed {
                report(e);
            }
        }
    });
}

impl Drop for FlowStore {
    fn drop(&mut self) {
        let _ = self.flush();
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn record(port: u16, verdict: &str, time_ns: u64) -> EventRecord {
        EventRecord {
            seq: 1,
            time: rfc3339_ns(time_ns),
            time_ns,
            verdict: verdict.into(),
            hook: "connect4".into(),
            pid: 10,
            tgid: 10,
            uid: 1000,
            user: Some("alice".into()),
            gid: 1000,
            group: None,
            cgroup_id: 7,
            cgroup: Some("/system.slice/web.service".into()),
            exe_dev: 1,
            exe_ino: 2,
            exe: Some("/usr/bin/curl".into()),
            comm: "curl".into(),
            argv: None,
            proto: "tcp".into(),
            family: 4,
            local_addr: None,
            local_port: 0,
            peer_addr: "10.0.0.1".parse().unwrap(),
            peer_port: port,
            rule_id: 0,
            rule: "default".into(),
            generation: 1,
            suppressed: 0,
        }
    }

    fn cfg(dir: &Path) -> StoreConfig {
        StoreConfig::new(dir)
    }

    #[test]
    fn sizes_parse_with_units() {
        assert_eq!(parse_size("64MiB"), Ok(64 << 20));
        assert_eq!(parse_size("500k"), Ok(500_000));
        assert_eq!(parse_size("1G"), Ok(1_000_000_000));
        assert_eq!(parse_size("8192"), Ok(8192));
        assert!(parse_size("12").unwrap_err().contains("too small"));
        assert!(parse_size("1XB").unwrap_err().contains("unit"));
        assert!(parse_size("MiB").is_err());
        assert!(parse_size("99999999999999999999GiB").is_err());
    }

    #[test]
    fn units_come_from_the_deepest_service() {
        assert_eq!(
            unit_of("/system.slice/nginx.service/worker"),
            Some(("nginx.service".into(), "system.slice/nginx.service".into()))
        );
        assert_eq!(
            unit_of("/user.slice/user-1000.slice/session-2.scope"),
            Some((
                "session-2.scope".into(),
                "user.slice/user-1000.slice/session-2.scope".into()
            ))
        );
        assert_eq!(unit_of("/zt-test-1"), None);
    }

    #[test]
    fn events_aggregate_and_survive_a_reopen() {
        let dir = tempfile::tempdir().unwrap();
        {
            let mut s = FlowStore::open(cfg(dir.path())).unwrap();
            for i in 0..1000 {
                s.record(&record(443, "audit", 1_000 + i)).unwrap();
            }
            s.record(&record(80, "audit", 5)).unwrap();
            let mut suppressed = record(80, "audit", 9_000);
            suppressed.suppressed = 4;
            s.record(&suppressed).unwrap();
            // A second writer is refused while the first holds the store.
            assert!(matches!(
                FlowStore::open(cfg(dir.path())),
                Err(FlowStoreError::Locked(_))
            ));
        } // dropped: flushed
        let snap = read(dir.path()).unwrap();
        assert_eq!(snap.flows.len(), 2, "{:#?}", snap.flows);
        let f443 = snap.flows.iter().find(|f| f.key.port == 443).unwrap();
        assert_eq!(
            (f443.count, f443.first_ns, f443.last_ns),
            (1000, 1000, 1999)
        );
        assert_eq!(f443.unit.as_deref(), Some("web.service"));
        let f80 = snap.flows.iter().find(|f| f.key.port == 80).unwrap();
        assert_eq!(f80.count, 6, "1 + 5 (one event standing for 4 suppressed)");
        // Reopened: counts add up across daemon restarts.
        let mut s = FlowStore::open(cfg(dir.path())).unwrap();
        s.record(&record(443, "deny", 3_000)).unwrap();
        s.record(&record(443, "audit", 4_000)).unwrap();
        s.flush().unwrap();
        let snap = read(dir.path()).unwrap();
        let audit443 = snap
            .flows
            .iter()
            .find(|f| f.key.port == 443 && f.key.verdict == "audit")
            .unwrap();
        assert_eq!((audit443.count, audit443.last_ns), (1001, 4000));
        assert_eq!(snap.flows.len(), 3);
    }

    #[test]
    fn rotation_keeps_the_store_within_its_bounds() {
        let dir = tempfile::tempdir().unwrap();
        let max_bytes = 64 * 1024;
        let mut s = FlowStore::open(StoreConfig {
            max_bytes,
            max_flows: 150,
            ..cfg(dir.path())
        })
        .unwrap();
        // 5000 distinct flows, flushed in batches: far more than the bounds allow.
        for i in 0..5000u64 {
            let mut r = record((i % 60_000) as u16 + 1, "audit", 1_000_000 + i);
            r.peer_addr = IpAddr::V4(Ipv4Addr::from(0x0a00_0000 + i as u32));
            s.record(&r).unwrap();
            if i % 100 == 99 {
                s.flush().unwrap();
                let on_disk: u64 = fs::read_dir(dir.path())
                    .unwrap()
                    .flatten()
                    .map(|e| e.metadata().unwrap().len())
                    .sum();
                // Segments up to half the bound plus one flush, the base up to the other half.
                assert!(on_disk <= max_bytes + 100 * 400, "{on_disk} bytes on disk");
            }
        }
        s.flush().unwrap();
        assert!(s.stats().compactions > 0);
        assert!(s.stats().evicted > 0);
        let snap = read(dir.path()).unwrap();
        // The base holds at most 150; the newest flows are kept.
        assert!(snap.flows.len() <= 150 + 100, "{}", snap.flows.len());
        let newest = snap.flows.iter().map(|f| f.last_ns).max().unwrap();
        assert_eq!(newest, 1_000_000 + 4999);
        assert!(snap
            .flows
            .iter()
            .all(|f| f.last_ns >= 1_000_000 + 5000 - 400));
        let files: Vec<String> = fs::read_dir(dir.path())
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(
            files.iter().filter(|f| f.starts_with("base-")).count(),
            1,
            "{files:?}"
        );
    }

    #[test]
    fn a_torn_line_and_leftovers_of_a_crash_are_tolerated() {
        let dir = tempfile::tempdir().unwrap();
        {
            let mut s = FlowStore::open(cfg(dir.path())).unwrap();
            s.record(&record(443, "audit", 10)).unwrap();
            s.flush().unwrap();
            s.compact().unwrap();
            s.record(&record(443, "audit", 20)).unwrap();
        }
        let (bases, segs) = list(dir.path()).unwrap();
        assert_eq!(bases.len(), 1);
        // A torn write, and a stale segment the base already holds.
        let last = &segs.last().unwrap().1;
        let mut f = OpenOptions::new().append(true).open(last).unwrap();
        f.write_all(b"{\"kind\":\"egr").unwrap();
        fs::write(
            dir.path().join(format!("seg-{}.jsonl", bases[0].0)),
            "junk\n",
        )
        .unwrap();
        let snap = read(dir.path()).unwrap();
        assert_eq!(snap.bad_lines, 1);
        assert_eq!(snap.flows.len(), 1);
        assert_eq!(snap.flows[0].count, 2);
        // The next writer compacts the torn segment away and goes on.
        let s = FlowStore::open(cfg(dir.path())).unwrap();
        assert_eq!(s.stats().compactions, 1);
        drop(s);
        let snap = read(dir.path()).unwrap();
        assert_eq!((snap.flows[0].count, snap.bad_lines), (2, 0));
        // Starts without events leave no files behind; many segments are compacted.
        for _ in 0..5 {
            drop(FlowStore::open(cfg(dir.path())).unwrap());
        }
        let segs = list(dir.path()).unwrap().1;
        assert!(segs.len() <= 2, "{segs:?}");
        for i in 0..40 {
            let mut s = FlowStore::open(cfg(dir.path())).unwrap();
            s.record(&record(1000 + i, "audit", 30 + u64::from(i)))
                .unwrap();
        }
        let segs = list(dir.path()).unwrap().1;
        assert!(segs.len() <= MAX_SEGMENTS + 2, "{}", segs.len());
        assert_eq!(read(dir.path()).unwrap().flows.len(), 41);
    }

    #[test]
    fn a_missing_store_says_what_to_do() {
        let e = read(Path::new("/nonexistent/zt-flows")).unwrap_err();
        assert!(e.to_string().contains("start ztd"), "{e}");
    }
}
