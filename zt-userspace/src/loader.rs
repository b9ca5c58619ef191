//! Loads zt's programs, keeps them attached through pinned bpf_links, and writes policy
//! generations into the pinned maps.
//!
//! Layout under `--bpffs DIR`: `DIR/maps/<MAP>` (every map, pinned by name) and
//! `DIR/links/<hook>` (one cgroup link per hook) and `DIR/links/<tracer>` (the exec, fork and
//! exit tracepoints that keep each process's executable record, see [`TRACERS`]). Pins keep
//! enforcement alive when `ztd` exits, however it exits.
//!
//! **Start and restart without a window.** The programs are always loaded against the pinned
//! maps (created on first start, reused after). If a hook's link is already pinned, the new
//! program replaces the old one in place (`BPF_LINK_UPDATE`): the cgroup is never without a
//! program and never has two. Only a missing link is created, and only after the policy is in
//! the maps. Tracepoint links cannot be updated in place: a new link is attached and pinned
//! over the old pin (the old link detaches once its pin is replaced), so no exec, fork or exit
//! goes unrecorded during a restart.
//!
//! **Generations.** A policy is written completely into the idle slot (diffed against what
//! that slot holds, so small changes make few writes), then `ACTIVE` is flipped in one write.
//! A program that read the old `ACTIVE` value may still be reading the slot just left: before
//! that slot is written again (the next apply, a re-resolution, a rollback, the idle-slot
//! catch-up) ztd waits for an RCU grace period ([`sys::rcu_grace_period`]), after which no
//! program that started before the flip is still running. Two applies in a row therefore
//! never write a slot a running decision may read.
//!
//! **Cheap reloads.** Writes and removals go in batches (`BPF_MAP_UPDATE_BATCH` /
//! `DELETE_BATCH`, thousands of entries per syscall). Net classes and decision entries are
//! renamed to the names the slot already uses for the same prefixes and keys (port classes
//! are named by where their interval starts), so a one-rule change is a diff of a handful of
//! entries. Once no program can still be reading the old slot, [`Loader::sync_idle`] brings it
//! up to the active policy and zeroes its hit counters: the next apply writes only its own
//! diff, and rarely has counters to zero.

use std::{
    os::fd::{AsFd, BorrowedFd},
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, Instant},
};

use aya::{
    maps::{Array, Map, MapData, MapError, PerCpuArray},
    programs::{
        links::{FdLink, PinnedLink},
        BtfTracePoint, CgroupAttachMode, CgroupSkb, CgroupSkbAttachType, CgroupSock,
        CgroupSockAddr, Lsm, Program, ProgramError,
    },
    Btf, Ebpf, EbpfLoader, Pod,
};
use zt_common::{
    ActiveSlot, DecisionKey, DecisionValue, ExeKey, Hook, KernelOffsets, LsmScope, RuleOfKey,
    SlotConfig, Stat, Verdict, HOOK_CODES, MAX_RULES, NET_CLASS_FIRST, PORTS_PER_PROTO,
    PORT_PROTOS, STAT_COUNT, VERDICT_CODES,
};

use crate::{policy::Compiled, sys};

/// The eBPF object built from `zt-ebpf`, embedded at compile time.
pub static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/zt"));

#[derive(Debug, thiserror::Error)]
pub enum LoaderError {
    #[error("cannot prepare {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("loading zt's eBPF object failed: {0} (is the kernel built with BPF cgroup support, and are we root?)")]
    Load(#[from] aya::EbpfError),
    #[error("program {hook}: {source}")]
    Program {
        hook: &'static str,
        source: aya::programs::ProgramError,
    },
    #[error("map {map} is missing from the eBPF object or has the wrong type: {source}")]
    Map { map: String, source: MapError },
    #[error("pinned link {path}: {source}")]
    Link {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("writing map {map} failed after {done} entries: {source}")]
    Batch {
        map: String,
        done: usize,
        source: std::io::Error,
    },
    #[error("waiting for running programs to leave the old policy slot (RCU grace period) failed: {0}; nothing was written")]
    GracePeriod(std::io::Error),
    #[error("{0}")]
    MissingHooks(String),
    #[error("pinned zt state in {bpffs} guards a different cgroup than {cgroup}: run `ztctl unload --bpffs {bpffs}` first, or use another --bpffs directory")]
    OtherCgroup { bpffs: PathBuf, cgroup: PathBuf },
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> LoaderError + '_ {
    move |source| LoaderError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Where zt pins its state.
#[derive(Clone, Debug)]
pub struct Layout {
    pub bpffs: PathBuf,
}

impl Layout {
    pub fn maps_dir(&self) -> PathBuf {
        self.bpffs.join("maps")
    }
    pub fn links_dir(&self) -> PathBuf {
        self.bpffs.join("links")
    }
    pub fn link_path(&self, hook: Hook) -> PathBuf {
        self.links_dir().join(hook.name())
    }
    pub fn tracer_link_path(&self, tracer: &Tracer) -> PathBuf {
        self.links_dir().join(tracer.program)
    }
}

/// A tracepoint program that keeps the per-process executable records (`EXEC_IDS`) the
/// decisions take `exe` identities from: system-wide, not per cgroup.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Tracer {
    /// Name of the program in the eBPF object and of its pinned link.
    pub program: &'static str,
    /// The kernel tracepoint (`tp_btf`).
    pub tracepoint: &'static str,
}

/// The exec-identity tracepoints, in attach order: fork and exit before exec, so that every
/// record exec makes is carried to children and removed.
pub const TRACERS: [Tracer; 3] = [
    Tracer {
        program: "sched_fork",
        tracepoint: "sched_process_fork",
    },
    Tracer {
        program: "sched_exit",
        tracepoint: "sched_process_exit",
    },
    Tracer {
        program: "sched_exec",
        tracepoint: "sched_process_exec",
    },
];

/// The BPF LSM hook (see [`LsmHook`]): its program, its kernel hook, and its pinned link's
/// name under `links/`.
pub const LSM_PROGRAM: &str = "lsm_socket_create";
pub const LSM_HOOK: &str = "socket_create";

/// The BPF LSM `socket_create` hook: a stronger hook where the kernel offers one (BPF LSM,
/// `CONFIG_BPF_LSM` and `bpf` in the active LSMs). Not part of the baseline: where the kernel
/// refuses it ztd runs without it, and `status` says why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LsmHook {
    /// The kernel refused it (the reason).
    Unavailable(String),
    /// Loaded, not attached yet.
    Loaded,
    /// Attached, its link pinned at `links/lsm_socket_create`.
    Attached,
}

impl std::fmt::Display for LsmHook {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            LsmHook::Unavailable(why) => write!(f, "unavailable ({why})"),
            LsmHook::Loaded => write!(f, "{LSM_HOOK} loaded, not attached"),
            LsmHook::Attached => write!(f, "{LSM_HOOK} attached"),
        }
    }
}

/// The LSM hook's scope: the guarded cgroup's id (its directory's inode) and level below the
/// cgroup v2 root.
fn lsm_scope(cgroup: &Path) -> Result<LsmScope, String> {
    use std::os::unix::fs::MetadataExt;
    let root = sys::cgroup2_root().map_err(|e| e.to_string())?;
    let root = root
        .canonicalize()
        .map_err(|e| format!("{}: {e}", root.display()))?;
    let path = cgroup
        .canonicalize()
        .map_err(|e| format!("{}: {e}", cgroup.display()))?;
    let below = path.strip_prefix(&root).map_err(|_| {
        format!(
            "{} is not below the cgroup v2 root {}",
            path.display(),
            root.display()
        )
    })?;
    let level = below.components().count() as u32;
    let cgroup_id = std::fs::metadata(&path)
        .map_err(|e| format!("{}: {e}", path.display()))?
        .ino();
    if level == 0 {
        return Err("the guarded cgroup is the cgroup root".to_string());
    }
    Ok(LsmScope {
        cgroup_id,
        level,
        _pad: 0,
    })
}

/// Why the kernel refused the LSM program, in an operator's words.
fn lsm_refusal(e: &ProgramError) -> String {
    let active = std::fs::read_to_string("/sys/kernel/security/lsm").ok();
    match active {
        Some(list) if !list.split(',').any(|l| l.trim() == "bpf") => format!(
            "bpf is not among the kernel's active LSMs ({}): boot with lsm={},bpf",
            list.trim(),
            list.trim()
        ),
        _ => {
            // aya's message ends with the verifier's log, empty when refused outright.
            let msg = e.to_string();
            let msg = msg
                .trim_end()
                .trim_end_matches("Verifier output:")
                .trim_end();
            let msg = crate::support::error_gist(msg.trim_end_matches('.'));
            format!("the kernel refused to load it: {msg}")
        }
    }
}

/// The hooks attached to the guarded cgroup (all but XDP), in attach order: the packet
/// backstops and socket-type control first, the connect/send/bind verdicts last.
pub const CGROUP_HOOKS: [Hook; 9] = [
    Hook::SkbIngress,
    Hook::SkbEgress,
    Hook::SockCreate,
    Hook::Bind4,
    Hook::Bind6,
    Hook::Connect4,
    Hook::Connect6,
    Hook::Sendmsg4,
    Hook::Sendmsg6,
];

/// The kernel attach type of a cgroup hook, for `BPF_PROG_QUERY` (XDP attaches to
/// interfaces, not cgroups: `u32::MAX`).
pub fn attach_type(hook: Hook) -> u32 {
    match hook {
        Hook::SkbIngress => 0,
        Hook::SkbEgress => 1,
        Hook::SockCreate => 2,
        Hook::Bind4 => 8,
        Hook::Bind6 => 9,
        Hook::Connect4 => 10,
        Hook::Connect6 => 11,
        Hook::Sendmsg4 => 14,
        Hook::Sendmsg6 => 15,
        Hook::Xdp | Hook::LsmSocketCreate => u32::MAX,
    }
}

/// What start-up found and did, per hook.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum HookStart {
    /// No pinned link: attached a new one.
    Attached,
    /// A pinned link was there: its program was replaced in place.
    Replaced,
}

/// Programs loaded and attached, maps open.
pub struct Loader {
    ebpf: Ebpf,
    layout: Layout,
    cgroup: PathBuf,
    /// The maps the object pins under `maps/` (checked and re-pinned by [`Loader::repair`]).
    pinned_maps: Vec<String>,
    /// What this process last wrote into each slot: the next write into that slot is a diff
    /// against it, with no reads from the kernel. (Unknown after a start: read once.) Both
    /// slots share one image once [`Loader::sync_idle`] made them equal.
    written: [Option<Arc<SlotImage>>; 2],
    /// When `ACTIVE` last flipped, until [`Loader::sync_idle`] caught the idle slot up.
    flipped: Option<Instant>,
    last_apply: ApplyStats,
    /// Per slot, the highest rule whose hit counter may be non-zero (`None`: all zero).
    hits_dirty: [Option<u32>; 2],
    /// `ACTIVE` flipped (by this process, or by an earlier one before this start) and no RCU
    /// grace period has passed since: the idle slot may still be read by a running program.
    grace_owed: bool,
    /// RCU grace periods waited for (for tests and `status`).
    grace_periods: u64,
    /// The cgroup hooks loaded (all of [`CGROUP_HOOKS`] unless some are missing).
    hooks: Vec<Hook>,
    /// Hooks this kernel could not load, run without by the operator's leave
    /// (`--allow-missing-hooks`, see [`crate::support`]).
    missing: Vec<crate::support::MissingHook>,
    /// The BPF LSM `socket_create` hook.
    lsm: LsmHook,
}

/// How long after a flip the old slot is left alone before [`Loader::sync_idle`] rewrites
/// it: so that a burst of reloads does not also rewrite the idle slot after each one. (Safety
/// does not rest on this delay: every write of the idle slot waits for an RCU grace period
/// after the flip first.)
const IDLE_SYNC_DELAY: Duration = Duration::from_millis(200);

/// Map entries one apply wrote and removed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ApplyStats {
    pub updates: u64,
    pub deletes: u64,
}

/// An LPM trie key as the kernel lays it out: prefix length, then the address bytes.
/// Ordered by (address, prefix length), the order the compiler emits them in.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct LpmKey<const N: usize> {
    pub prefix_len: u32,
    pub addr: [u8; N],
}

impl<const N: usize> Ord for LpmKey<N> {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        (self.addr, self.prefix_len).cmp(&(other.addr, other.prefix_len))
    }
}

impl<const N: usize> PartialOrd for LpmKey<N> {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl<const N: usize> Default for LpmKey<N> {
    fn default() -> Self {
        LpmKey {
            prefix_len: 0,
            addr: [0; N],
        }
    }
}

// SAFETY: repr(C) u32 followed by bytes: no padding for N = 4 and N = 16 (the sizes used).
unsafe impl<const N: usize> Pod for LpmKey<N> {}

/// One slot's map contents, each map's entries sorted by key: what the loader diffs against.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SlotImage {
    exes: Vec<(ExeKey, u64)>,
    uids: Vec<(u32, u64)>,
    gids: Vec<(u32, u64)>,
    cgroups: Vec<(u64, u64)>,
    net4: Vec<(LpmKey<4>, u32)>,
    net6: Vec<(LpmKey<16>, u32)>,
    ports: Vec<u32>,
    decisions: Vec<(DecisionKey, DecisionValue)>,
    rule_of: Vec<(RuleOfKey, u32)>,
}

/// Old name → new name: a table indexed by the old name when names are dense (as compiled),
/// else a sorted list.
enum Renames {
    Dense(Vec<u32>),
    Sparse(Vec<(u32, u32)>),
}

impl Renames {
    fn new(mut pairs: Vec<(u32, u32)>) -> Renames {
        let max = pairs.iter().map(|p| p.0).max().unwrap_or(0) as usize;
        if max <= pairs.len() * 4 + 4096 {
            // Names not in the table keep their value (u32::MAX marks "absent").
            let mut table = vec![u32::MAX; max + 1];
            for (from, to) in pairs {
                table[from as usize] = to;
            }
            Renames::Dense(table)
        } else {
            pairs.sort_unstable();
            Renames::Sparse(pairs)
        }
    }

    fn get(&self, name: u32) -> u32 {
        match self {
            Renames::Dense(t) => match t.get(name as usize) {
                Some(&to) if to != u32::MAX => to,
                _ => name,
            },
            Renames::Sparse(p) => p
                .binary_search_by_key(&name, |e| e.0)
                .map_or(name, |i| p[i].1),
        }
    }
}

fn lpm<const N: usize>(prefix_len: u32, addr: [u8; N]) -> LpmKey<N> {
    LpmKey { prefix_len, addr }
}

fn sorted<K: Ord + Copy, V: Copy>(mut v: Vec<(K, V)>) -> Vec<(K, V)> {
    if !v.is_sorted_by(|a, b| a.0 < b.0) {
        v.sort_by_key(|e| e.0);
        // Later entries win, as they would in the kernel written in order.
        v.reverse();
        v.dedup_by(|a, b| a.0 == b.0);
        v.reverse();
    }
    v
}

impl SlotImage {
    /// Rename net classes and decision entries to the names `old` gives the same prefixes
    /// and decision keys (new ones get names `old` does not use). Compiling numbers them in
    /// order, so one added prefix would otherwise rename every later one and its decisions:
    /// renamed, a one-rule change rewrites a handful of entries instead of the whole slot.
    /// The kernel reads the names only as keys; what they mean is unchanged.
    fn renumber_like(&mut self, old: &SlotImage) {
        let max_class = old
            .net4
            .iter()
            .map(|e| e.1)
            .chain(old.net6.iter().map(|e| e.1))
            .max()
            .unwrap_or(0);
        let max_entry = old.decisions.iter().map(|e| e.1.entry).max().unwrap_or(0);
        // Names only grow: start afresh (keep compile's) once they get large.
        if max_class >= u32::MAX / 4 || max_entry >= u32::MAX / 4 {
            return;
        }
        let mut classes: Vec<(u32, u32)> = Vec::with_capacity(self.net4.len() + self.net6.len());
        let mut next = max_class.max(NET_CLASS_FIRST - 1) + 1;
        // Both sides sorted by key: one merge pass.
        fn match_classes<K: Ord>(
            new: &mut [(K, u32)],
            old: &[(K, u32)],
            classes: &mut Vec<(u32, u32)>,
            next: &mut u32,
        ) {
            let mut j = 0;
            for (k, class) in new.iter_mut() {
                while j < old.len() && old[j].0 < *k {
                    j += 1;
                }
                let renamed = if j < old.len() && old[j].0 == *k {
                    old[j].1
                } else {
                    *next += 1;
                    *next - 1
                };
                classes.push((*class, renamed));
                *class = renamed;
            }
        }
        match_classes(&mut self.net4, &old.net4, &mut classes, &mut next);
        match_classes(&mut self.net6, &old.net6, &mut classes, &mut next);
        let classes = Renames::new(classes);
        for (k, _) in &mut self.decisions {
            k.net_class = classes.get(k.net_class);
        }
        if !self.decisions.is_sorted_by(|a, b| a.0 < b.0) {
            self.decisions.sort_unstable_by_key(|e| e.0);
        }
        let mut entries: Vec<(u32, u32)> = Vec::with_capacity(self.decisions.len());
        let mut next = max_entry + 1;
        let mut j = 0;
        for (k, v) in &mut self.decisions {
            while j < old.decisions.len() && old.decisions[j].0 < *k {
                j += 1;
            }
            let renamed = if j < old.decisions.len() && old.decisions[j].0 == *k {
                old.decisions[j].1.entry
            } else {
                next += 1;
                next - 1
            };
            entries.push((v.entry, renamed));
            v.entry = renamed;
        }
        let entries = Renames::new(entries);
        for (k, _) in &mut self.rule_of {
            k.entry = entries.get(k.entry);
        }
        if !self.rule_of.is_sorted_by(|a, b| a.0 < b.0) {
            self.rule_of.sort_unstable_by_key(|e| e.0);
        }
    }

    pub fn of(c: &Compiled) -> SlotImage {
        SlotImage {
            exes: sorted(c.exes.clone()),
            uids: sorted(c.uids.clone()),
            gids: sorted(c.gids.clone()),
            cgroups: sorted(c.cgroups.clone()),
            net4: sorted(c.net4.iter().map(|(l, a, v)| (lpm(*l, *a), *v)).collect()),
            net6: sorted(c.net6.iter().map(|(l, a, v)| (lpm(*l, *a), *v)).collect()),
            ports: c.ports.clone(),
            decisions: sorted(c.decisions.clone()),
            rule_of: sorted(c.rule_of.clone()),
        }
    }
}

/// Something wrong with the pinned state in the kernel, found by [`Loader::problems`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Problem {
    /// The hook's link pin is gone (removing the last reference detaches the link).
    LinkMissing(Hook),
    /// The pinned link is no longer attached to the guarded cgroup (`BPF_LINK_DETACH`).
    LinkDetached(Hook),
    /// The pinned link runs a program that is not ours (id shown).
    ForeignProgram(Hook, u32),
    /// A map's pin is gone.
    MapPinMissing(String),
    /// An exec-identity tracepoint's link pin is gone (the link detached with it).
    TracerMissing(&'static str),
    /// The pinned tracepoint link runs a program that is not ours (id shown).
    TracerForeign(&'static str, u32),
    /// The LSM hook's link pin is gone (the link detached with it).
    LsmMissing,
    /// The pinned LSM link runs a program that is not ours (id shown).
    LsmForeign(u32),
}

impl std::fmt::Display for Problem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Problem::LinkMissing(h) => {
                write!(
                    f,
                    "hook {}: pinned link links/{} is missing",
                    h.name(),
                    h.name()
                )
            }
            Problem::LinkDetached(h) => write!(
                f,
                "hook {}: pinned link is not attached to the guarded cgroup",
                h.name()
            ),
            Problem::ForeignProgram(h, id) => write!(
                f,
                "hook {}: the pinned link runs program {id}, not zt's",
                h.name()
            ),
            Problem::MapPinMissing(m) => write!(f, "map {m}: pin maps/{m} is missing"),
            Problem::TracerMissing(t) => write!(
                f,
                "tracepoint {t}: pinned link links/{t} is missing (exec identities are not recorded)"
            ),
            Problem::TracerForeign(t, id) => write!(
                f,
                "tracepoint {t}: the pinned link runs program {id}, not zt's"
            ),
            Problem::LsmMissing => write!(
                f,
                "lsm {LSM_HOOK}: pinned link links/{LSM_PROGRAM} is missing (other address families are not judged)"
            ),
            Problem::LsmForeign(id) => write!(
                f,
                "lsm {LSM_HOOK}: the pinned link runs program {id}, not zt's"
            ),
        }
    }
}

/// Health of one hook as the kernel reports it.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct HookHealth {
    pub hook: String,
    pub attached: bool,
    pub prog_id: u32,
}

impl Loader {
    /// Load the programs against the pinned maps (creating them on first start). A hook the
    /// kernel cannot load is an error unless `allow_missing` (see [`crate::support`]).
    pub fn load(
        layout: &Layout,
        cgroup: &Path,
        offsets: KernelOffsets,
        allow_missing: bool,
    ) -> Result<Loader, LoaderError> {
        let maps_dir = layout.maps_dir();
        std::fs::create_dir_all(&maps_dir).map_err(io_err(&maps_dir))?;
        let links_dir = layout.links_dir();
        std::fs::create_dir_all(&links_dir).map_err(io_err(&links_dir))?;
        let scope = lsm_scope(cgroup);
        let mut ebpf = EbpfLoader::new()
            .default_map_pin_directory(&maps_dir)
            .override_global("KERNEL_OFFSETS", &offsets, true)
            .override_global(
                "LSM_SCOPE",
                scope.as_ref().unwrap_or(&LsmScope::default()),
                true,
            )
            .load(EBPF_OBJECT)?;
        let mut hooks = Vec::new();
        let mut failed = Vec::new();
        for hook in CGROUP_HOOKS {
            match load_program(&mut ebpf, hook) {
                Ok(()) => hooks.push(hook),
                // Not this kernel's fault: the object lacks the program.
                Err(source @ ProgramError::NotLoaded) => {
                    return Err(LoaderError::Program {
                        hook: hook.name(),
                        source,
                    })
                }
                Err(e) => failed.push((hook, e.to_string())),
            }
        }
        let btf = Btf::from_sys_fs().map_err(|e| LoaderError::Program {
            hook: "sched_exec",
            source: ProgramError::IOError(std::io::Error::other(format!("kernel BTF: {e}"))),
        })?;
        for tracer in TRACERS {
            load_tracer(&mut ebpf, &tracer, &btf).map_err(|source| LoaderError::Program {
                hook: tracer.program,
                source,
            })?;
        }
        let missing = crate::support::decide(&failed, CGROUP_HOOKS.len(), allow_missing)
            .map_err(LoaderError::MissingHooks)?;
        let lsm = match scope {
            Err(why) => LsmHook::Unavailable(why),
            Ok(_) => match load_lsm(&mut ebpf, &btf) {
                Ok(()) => LsmHook::Loaded,
                Err(e) => LsmHook::Unavailable(lsm_refusal(&e)),
            },
        };
        let pinned_maps = ebpf
            .maps()
            .map(|(name, _)| name.to_string())
            .filter(|name| maps_dir.join(name).exists())
            .collect();
        Ok(Loader {
            ebpf,
            layout: layout.clone(),
            cgroup: cgroup.to_path_buf(),
            pinned_maps,
            written: [None, None],
            flipped: None,
            last_apply: ApplyStats::default(),
            hits_dirty: [Some(MAX_RULES - 1); 2],
            // An earlier ztd may have flipped just before it died.
            grace_owed: true,
            grace_periods: 0,
            hooks,
            missing,
            lsm,
        })
    }

    /// The BPF LSM `socket_create` hook: attached, or why not.
    pub fn lsm(&self) -> &LsmHook {
        &self.lsm
    }

    /// The cgroup hooks loaded and attached by this loader.
    pub fn hooks(&self) -> &[Hook] {
        &self.hooks
    }

    /// Hooks this kernel could not load (empty unless `--allow-missing-hooks`).
    pub fn missing(&self) -> &[crate::support::MissingHook] {
        &self.missing
    }

    /// Attach every hook to the cgroup, or adopt the pinned link by replacing its program.
    /// Call after a generation has been written. Refuses links that guard another cgroup.
    /// The exec-identity tracepoints are attached first (each pinned over an earlier run's).
    pub fn attach_or_adopt(&mut self) -> Result<Vec<(Hook, HookStart)>, LoaderError> {
        for tracer in TRACERS {
            self.attach_tracer(&tracer)?;
        }
        if self.lsm == LsmHook::Loaded {
            self.lsm = match self.attach_lsm() {
                Ok(()) => LsmHook::Attached,
                Err(e) => LsmHook::Unavailable(format!("the kernel refused to attach it: {e}")),
            };
        }
        let cgroup_fd = sys::open_dir(&self.cgroup).map_err(io_err(&self.cgroup))?;
        let mut report = Vec::new();
        for hook in self.hooks.clone() {
            let path = self.layout.link_path(hook);
            let prog_err = |source| LoaderError::Program {
                hook: hook.name(),
                source,
            };
            if path.exists() {
                let link_fd = sys::obj_get(&path).map_err(|source| LoaderError::Link {
                    path: path.clone(),
                    source,
                })?;
                let old_prog = link_program_id(&path)?;
                let attached_here = sys::prog_query(cgroup_fd.as_fd(), attach_type(hook))
                    .map_err(io_err(&self.cgroup))?;
                if !attached_here.contains(&old_prog) {
                    return Err(LoaderError::OtherCgroup {
                        bpffs: self.layout.bpffs.clone(),
                        cgroup: self.cgroup.clone(),
                    });
                }
                let prog = self
                    .ebpf
                    .program(hook.name())
                    .ok_or(prog_err(ProgramError::NotLoaded))?;
                let prog_fd = prog.fd().map_err(prog_err)?;
                sys::link_update(link_fd.as_fd(), prog_fd.as_fd())
                    .map_err(|source| LoaderError::Link { path, source })?;
                report.push((hook, HookStart::Replaced));
            } else {
                let fd_link = attach_program(&mut self.ebpf, hook, &cgroup_fd).map_err(prog_err)?;
                fd_link.pin(&path).map_err(|e| LoaderError::Link {
                    path: path.clone(),
                    source: std::io::Error::other(e.to_string()),
                })?;
                report.push((hook, HookStart::Attached));
            }
        }
        Ok(report)
    }

    /// Attach a tracepoint program through a new link and pin it at its path, replacing an
    /// earlier pin in one rename (the old link runs until then, and detaches after).
    fn attach_tracer(&mut self, tracer: &Tracer) -> Result<(), LoaderError> {
        let path = self.layout.tracer_link_path(tracer);
        // bpffs refuses names with a dot.
        let fresh = self
            .layout
            .links_dir()
            .join(format!("{}_new", tracer.program));
        let prog_err = |source| LoaderError::Program {
            hook: tracer.program,
            source,
        };
        let prog = self
            .ebpf
            .program_mut(tracer.program)
            .ok_or(prog_err(ProgramError::NotLoaded))?;
        let p: &mut BtfTracePoint = prog.try_into().map_err(prog_err)?;
        let id = p.attach().map_err(prog_err)?;
        let fd_link = FdLink::from(p.take_link(id).map_err(prog_err)?);
        if fresh.exists() {
            std::fs::remove_file(&fresh).map_err(io_err(&fresh))?;
        }
        fd_link.pin(&fresh).map_err(|e| LoaderError::Link {
            path: fresh.clone(),
            source: std::io::Error::other(e.to_string()),
        })?;
        std::fs::rename(&fresh, &path).map_err(|source| LoaderError::Link { path, source })?;
        Ok(())
    }

    /// Attach the LSM program through a new link, pinned over an earlier run's (as the
    /// tracepoints: both run for a moment, never neither).
    fn attach_lsm(&mut self) -> Result<(), LoaderError> {
        let prog_err = |source| LoaderError::Program {
            hook: LSM_PROGRAM,
            source,
        };
        let prog = self
            .ebpf
            .program_mut(LSM_PROGRAM)
            .ok_or(prog_err(ProgramError::NotLoaded))?;
        let p: &mut Lsm = prog.try_into().map_err(prog_err)?;
        let id = p.attach().map_err(prog_err)?;
        let fd_link = FdLink::from(p.take_link(id).map_err(prog_err)?);
        self.pin_over(fd_link, LSM_PROGRAM)
    }

    /// Pin `fd_link` at `links/NAME`, replacing an earlier pin in one rename.
    fn pin_over(&self, fd_link: FdLink, name: &str) -> Result<(), LoaderError> {
        let path = self.layout.links_dir().join(name);
        // bpffs refuses names with a dot.
        let fresh = self.layout.links_dir().join(format!("{name}_new"));
        if fresh.exists() {
            std::fs::remove_file(&fresh).map_err(io_err(&fresh))?;
        }
        fd_link.pin(&fresh).map_err(|e| LoaderError::Link {
            path: fresh.clone(),
            source: std::io::Error::other(e.to_string()),
        })?;
        std::fs::rename(&fresh, &path).map_err(|source| LoaderError::Link { path, source })?;
        Ok(())
    }

    /// The slot programs read now, and its generation (0: nothing written yet).
    pub fn active(&self) -> Result<(u32, SlotConfig), LoaderError> {
        let active: Array<&MapData, ActiveSlot> = map(&self.ebpf, "ACTIVE")?;
        let slot = active.get(&0, 0).map_err(map_err("ACTIVE"))?.slot.min(1);
        let configs: Array<&MapData, SlotConfig> = map(&self.ebpf, "SLOT_CONFIG")?;
        let cfg = configs.get(&slot, 0).map_err(map_err("SLOT_CONFIG"))?;
        Ok((slot, cfg))
    }

    /// Like [`Loader::apply`], unless the active slot already holds this very policy (same
    /// [`policy_hash`]): then nothing is written and the generation stays. Returns the
    /// generation in force and whether it was kept.
    pub fn apply_or_keep(
        &mut self,
        compiled: &Compiled,
        flags: u32,
    ) -> Result<(u64, bool), LoaderError> {
        let (_, active) = self.active()?;
        let ephemeral = crate::xdp::ephemeral_range();
        let hash = policy_hash(compiled, flags, ephemeral);
        if active.generation != 0 && active.policy_hash == hash {
            return Ok((active.generation, true));
        }
        self.apply_hashed(compiled, flags, ephemeral, hash)
            .map(|g| (g, false))
    }

    /// Write `compiled` into the idle slot as the next generation and flip to it.
    /// Returns the new generation; [`Loader::last_apply`] tells what it wrote.
    pub fn apply(&mut self, compiled: &Compiled, flags: u32) -> Result<u64, LoaderError> {
        let ephemeral = crate::xdp::ephemeral_range();
        let hash = policy_hash(compiled, flags, ephemeral);
        self.apply_hashed(compiled, flags, ephemeral, hash)
    }

    /// [`Loader::apply`] with the ephemeral port range and [`policy_hash`] already known.
    fn apply_hashed(
        &mut self,
        compiled: &Compiled,
        flags: u32,
        (ephemeral_low, ephemeral_high): (u16, u16),
        policy_hash: u64,
    ) -> Result<u64, LoaderError> {
        let (active_slot, active_cfg) = self.active()?;
        // Before anything was written, slot 0 is "active" with generation 0: write slot 0.
        let slot = if active_cfg.generation == 0 {
            active_slot
        } else {
            1 - active_slot
        };
        let generation = active_cfg.generation + 1;
        let mut stats = ApplyStats::default();

        let image = Arc::new(SlotImage::of(compiled));
        self.settle()?;
        self.write_slot(slot, &image, &mut stats)?;

        // The XDP front door passes TCP/UDP to these ports (replies to our own egress).
        let cfg = SlotConfig {
            generation,
            flags,
            ephemeral_low,
            ephemeral_high,
            policy_hash,
            ..compiled.config
        };
        let mut configs: Array<&mut MapData, SlotConfig> = map_mut(&mut self.ebpf, "SLOT_CONFIG")?;
        configs.set(slot, cfg, 0).map_err(map_err("SLOT_CONFIG"))?;
        stats.updates += 1;
        // Zero this slot's rule counters: rule ids mean something new in this generation.
        // (Usually done already: [`Loader::sync_idle`] zeroes a slot once it is idle.)
        if let Some(upto) = self.hits_dirty[slot as usize & 1] {
            self.zero_hits(slot, upto.max(cfg.rules), &mut stats)?;
        }
        self.hits_dirty[slot as usize & 1] = Some(cfg.rules);

        let mut active: Array<&mut MapData, ActiveSlot> = map_mut(&mut self.ebpf, "ACTIVE")?;
        active
            .set(0, ActiveSlot { slot, _pad: 0 }, 0)
            .map_err(map_err("ACTIVE"))?;
        stats.updates += 1;
        self.grace_owed = true;
        self.flipped = Some(Instant::now());
        self.last_apply = stats;
        Ok(generation)
    }

    /// Before writing the idle slot: if `ACTIVE` flipped since the last RCU grace period, wait
    /// for one, so that no program that read the old `ACTIVE` still reads that slot.
    fn settle(&mut self) -> Result<(), LoaderError> {
        if self.grace_owed {
            sys::rcu_grace_period().map_err(LoaderError::GracePeriod)?;
            self.grace_owed = false;
            self.grace_periods += 1;
        }
        Ok(())
    }

    /// RCU grace periods waited for since this loader started.
    pub fn grace_periods(&self) -> u64 {
        self.grace_periods
    }

    /// What the last [`Loader::apply`] wrote and removed.
    pub fn last_apply(&self) -> ApplyStats {
        self.last_apply
    }

    /// Make `slot`'s policy maps hold `image`: a diff against what the slot is known to hold
    /// (read from the kernel when unknown), written in batches.
    fn write_slot(
        &mut self,
        slot: u32,
        image: &Arc<SlotImage>,
        stats: &mut ApplyStats,
    ) -> Result<(), LoaderError> {
        // Forget what the slot held before writing: a failed write leaves it unknown (read
        // again next time), never wrongly known.
        let known = self.written[slot as usize & 1].take();
        if let Some(k) = &known {
            if Arc::ptr_eq(k, image) || **k == **image {
                self.written[slot as usize & 1] = known;
                return Ok(());
            }
        }
        let read;
        let known = match known.as_deref() {
            Some(k) => k,
            None => {
                read = read_slot(&self.ebpf, slot)?;
                &read
            }
        };
        let renumbered;
        let image = if known.decisions.is_empty() {
            image
        } else {
            let mut w = (**image).clone();
            w.renumber_like(known);
            renumbered = Arc::new(w);
            &renumbered
        };
        let known = Some(known);
        let ebpf = &self.ebpf;
        let w = &**image;
        sync_map(
            ebpf,
            &format!("EXE_{slot}"),
            &w.exes,
            known.map(|k| &k.exes[..]),
            stats,
        )?;
        sync_map(
            ebpf,
            &format!("UID_{slot}"),
            &w.uids,
            known.map(|k| &k.uids[..]),
            stats,
        )?;
        sync_map(
            ebpf,
            &format!("GID_{slot}"),
            &w.gids,
            known.map(|k| &k.gids[..]),
            stats,
        )?;
        sync_map(
            ebpf,
            &format!("CGROUP_{slot}"),
            &w.cgroups,
            known.map(|k| &k.cgroups[..]),
            stats,
        )?;
        sync_map(
            ebpf,
            &format!("NET4_{slot}"),
            &w.net4,
            known.map(|k| &k.net4[..]),
            stats,
        )?;
        sync_map(
            ebpf,
            &format!("NET6_{slot}"),
            &w.net6,
            known.map(|k| &k.net6[..]),
            stats,
        )?;
        sync_ports(
            ebpf,
            &format!("PORTS_{slot}"),
            &w.ports,
            known.map(|k| &k.ports[..]),
            stats,
        )?;
        sync_map(
            ebpf,
            &format!("DECISION_{slot}"),
            &w.decisions,
            known.map(|k| &k.decisions[..]),
            stats,
        )?;
        sync_map(
            ebpf,
            &format!("RULE_OF_{slot}"),
            &w.rule_of,
            known.map(|k| &k.rule_of[..]),
            stats,
        )?;
        self.written[slot as usize & 1] = Some(Arc::clone(image));
        Ok(())
    }

    /// Zero the hit counters of `slot`'s rules `0..=rules`: one batch read, then one batch
    /// write of the counters that moved (per-CPU values: 8 bytes per possible CPU).
    fn zero_hits(&self, slot: u32, rules: u32, stats: &mut ApplyStats) -> Result<(), LoaderError> {
        let fd = map_fd(&self.ebpf, "RULE_HITS")?;
        let count = rules.min(MAX_RULES - 1) as usize + 1;
        let first = slot * MAX_RULES;
        let value_size = 8 * nr_cpus();
        let batch_err = |e: sys::BatchError| LoaderError::Batch {
            map: "RULE_HITS".to_string(),
            done: e.done,
            source: e.error,
        };
        let current = sys::array_lookup_range(fd, first, count, value_size).map_err(batch_err)?;
        let moved: Vec<u32> = current
            .chunks_exact(value_size)
            .enumerate()
            .filter(|(_, v)| v.iter().any(|b| *b != 0))
            .map(|(i, _)| first + i as u32)
            .collect();
        if moved.is_empty() {
            return Ok(());
        }
        let zeros = vec![0u8; moved.len() * value_size];
        sys::map_update_batch(fd, &moved, &zeros, value_size).map_err(batch_err)?;
        stats.updates += moved.len() as u64;
        Ok(())
    }

    /// Bring the idle slot up to the active policy, once no program can still be reading it
    /// (well after the flip). The next [`Loader::apply`] then writes just its own diff: a
    /// one-rule change on top of 100k rules writes a handful of entries, also the first
    /// time after a start. Returns what it wrote, if it wrote.
    pub fn sync_idle(&mut self) -> Result<Option<ApplyStats>, LoaderError> {
        if self.flipped.is_none_or(|t| t.elapsed() < IDLE_SYNC_DELAY) {
            return Ok(None);
        }
        let (active_slot, active_cfg) = self.active()?;
        let idle = 1 - active_slot;
        let Some(image) = self.written[active_slot as usize & 1].clone() else {
            return Ok(None);
        };
        if active_cfg.generation == 0 {
            return Ok(None);
        }
        self.flipped = None;
        let mut stats = ApplyStats::default();
        self.settle()?;
        self.write_slot(idle, &image, &mut stats)?;
        if let Some(upto) = self.hits_dirty[idle as usize & 1] {
            self.zero_hits(idle, upto, &mut stats)?;
            self.hits_dirty[idle as usize & 1] = None;
        }
        Ok(Some(stats))
    }

    /// Per-rule hit counters of the active generation (index = rule id, 0 = default).
    pub fn rule_hits(&self) -> Result<Vec<u64>, LoaderError> {
        let (slot, cfg) = self.active()?;
        let hits: PerCpuArray<&MapData, u64> = map(&self.ebpf, "RULE_HITS")?;
        (0..=cfg.rules.min(MAX_RULES - 1))
            .map(|rule| {
                hits.get(&(slot * MAX_RULES + rule), 0)
                    .map(|v| v.iter().sum())
                    .map_err(map_err("RULE_HITS"))
            })
            .collect()
    }

    /// Statistics counters summed over CPUs, indexed by [`Stat`].
    pub fn stats(&self) -> Result<Vec<u64>, LoaderError> {
        let stats: PerCpuArray<&MapData, u64> = map(&self.ebpf, "STATS")?;
        (0..STAT_COUNT)
            .map(|i| {
                stats
                    .get(&i, 0)
                    .map(|v| v.iter().sum())
                    .map_err(map_err("STATS"))
            })
            .collect()
    }

    /// Bytes waiting in the ring buffer when an event was last sent (a per-CPU gauge: the
    /// largest value).
    pub fn ring_fill(&self) -> u64 {
        let Ok(stats) = map::<PerCpuArray<&MapData, u64>>(&self.ebpf, "STATS") else {
            return 0;
        };
        stats
            .get(&(Stat::RingFill as u32), 0)
            .map(|v| v.iter().copied().max().unwrap_or(0))
            .unwrap_or(0)
    }

    /// Decisions per (hook, verdict), summed over CPUs; zero counts are left out.
    pub fn hook_verdicts(&self) -> Vec<(Hook, Verdict, u64)> {
        let Ok(counts) = map::<PerCpuArray<&MapData, u64>>(&self.ebpf, "HOOK_VERDICTS") else {
            return Vec::new();
        };
        let mut out = Vec::new();
        for hook in Hook::ALL {
            for verdict in [Verdict::Allow, Verdict::Deny, Verdict::Audit] {
                let index = (hook as u32 % HOOK_CODES) * VERDICT_CODES + verdict as u32;
                let n: u64 = counts.get(&index, 0).map(|v| v.iter().sum()).unwrap_or(0);
                if n > 0 {
                    out.push((hook, verdict, n));
                }
            }
        }
        out
    }

    pub fn stat(stats: &[u64], stat: Stat) -> u64 {
        stats.get(stat as usize).copied().unwrap_or(0)
    }

    /// Health as the kernel reports it: each pinned link's program attached to the cgroup.
    pub fn health(&self) -> Vec<HookHealth> {
        let mut all = health(&self.layout, &self.cgroup);
        // Missing cgroup hooks are listed as `degraded`, not as detached; tracepoints stay.
        all.retain(|h| {
            self.hooks.iter().any(|k| k.name() == h.hook)
                || TRACERS.iter().any(|t| t.program == h.hook)
        });
        all
    }

    /// What is wrong with the pinned state now: each hook's pinned link present, attached to
    /// the guarded cgroup (`BPF_PROG_QUERY`) and running our program; each map pin present.
    pub fn problems(&self) -> Vec<Problem> {
        let cgroup_fd = sys::open_dir(&self.cgroup).ok();
        let mut out = Vec::new();
        for hook in self.hooks.iter().copied() {
            let path = self.layout.link_path(hook);
            let Ok(id) = link_program_id(&path) else {
                out.push(Problem::LinkMissing(hook));
                continue;
            };
            let attached = cgroup_fd
                .as_ref()
                .and_then(|fd| sys::prog_query(fd.as_fd(), attach_type(hook)).ok())
                .is_some_and(|ids| ids.contains(&id));
            if !attached {
                out.push(Problem::LinkDetached(hook));
                continue;
            }
            let ours = self
                .ebpf
                .program(hook.name())
                .and_then(|p| p.info().ok())
                .map(|i| i.id());
            if ours.is_some_and(|ours| ours != id) {
                out.push(Problem::ForeignProgram(hook, id));
            }
        }
        for tracer in TRACERS {
            let ours = self
                .ebpf
                .program(tracer.program)
                .and_then(|p| p.info().ok())
                .map(|i| i.id());
            match link_program_id(&self.layout.tracer_link_path(&tracer)) {
                Err(_) | Ok(0) => out.push(Problem::TracerMissing(tracer.program)),
                Ok(id) if ours.is_some_and(|ours| ours != id) => {
                    out.push(Problem::TracerForeign(tracer.program, id));
                }
                Ok(_) => {}
            }
        }
        if self.lsm == LsmHook::Attached {
            let ours = self
                .ebpf
                .program(LSM_PROGRAM)
                .and_then(|p| p.info().ok())
                .map(|i| i.id());
            match link_program_id(&self.layout.links_dir().join(LSM_PROGRAM)) {
                Err(_) | Ok(0) => out.push(Problem::LsmMissing),
                Ok(id) if ours.is_some_and(|ours| ours != id) => {
                    out.push(Problem::LsmForeign(id));
                }
                Ok(_) => {}
            }
        }
        for name in &self.pinned_maps {
            let present =
                self.ebpf.map(name).is_none() || self.layout.maps_dir().join(name).exists();
            if !present {
                out.push(Problem::MapPinMissing(name.clone()));
            }
        }
        out
    }

    /// Repair one problem with the current programs and maps: a missing or detached link is
    /// replaced by a new one (pinned), a foreign program is replaced in place, a map is
    /// re-pinned. Returns what was done.
    pub fn repair(&mut self, problem: &Problem) -> Result<String, LoaderError> {
        match problem {
            Problem::LinkMissing(hook) | Problem::LinkDetached(hook) => {
                let hook = *hook;
                let path = self.layout.link_path(hook);
                let links_dir = self.layout.links_dir();
                std::fs::create_dir_all(&links_dir).map_err(io_err(&links_dir))?;
                if path.exists() {
                    std::fs::remove_file(&path).map_err(io_err(&path))?;
                }
                let cgroup_fd = sys::open_dir(&self.cgroup).map_err(io_err(&self.cgroup))?;
                let fd_link =
                    attach_program(&mut self.ebpf, hook, &cgroup_fd).map_err(|source| {
                        LoaderError::Program {
                            hook: hook.name(),
                            source,
                        }
                    })?;
                fd_link.pin(&path).map_err(|e| LoaderError::Link {
                    path: path.clone(),
                    source: std::io::Error::other(e.to_string()),
                })?;
                Ok(format!(
                    "hook {}: re-attached to {} (new link pinned)",
                    hook.name(),
                    self.cgroup.display()
                ))
            }
            Problem::ForeignProgram(hook, _) => {
                let path = self.layout.link_path(*hook);
                let link_fd = sys::obj_get(&path).map_err(|source| LoaderError::Link {
                    path: path.clone(),
                    source,
                })?;
                let prog_err = |source| LoaderError::Program {
                    hook: hook.name(),
                    source,
                };
                let prog = self
                    .ebpf
                    .program(hook.name())
                    .ok_or(prog_err(ProgramError::NotLoaded))?;
                let prog_fd = prog.fd().map_err(prog_err)?;
                sys::link_update(link_fd.as_fd(), prog_fd.as_fd())
                    .map_err(|source| LoaderError::Link { path, source })?;
                Ok(format!(
                    "hook {}: zt's program restored in place",
                    hook.name()
                ))
            }
            Problem::TracerMissing(name) | Problem::TracerForeign(name, _) => {
                let tracer = TRACERS.into_iter().find(|t| t.program == *name).ok_or(
                    LoaderError::Program {
                        hook: name,
                        source: ProgramError::NotLoaded,
                    },
                )?;
                let links_dir = self.layout.links_dir();
                std::fs::create_dir_all(&links_dir).map_err(io_err(&links_dir))?;
                self.attach_tracer(&tracer)?;
                Ok(format!("tracepoint {name}: re-attached (new link pinned)"))
            }
            Problem::LsmMissing | Problem::LsmForeign(_) => {
                let links_dir = self.layout.links_dir();
                std::fs::create_dir_all(&links_dir).map_err(io_err(&links_dir))?;
                self.attach_lsm()?;
                Ok(format!("lsm {LSM_HOOK}: re-attached (new link pinned)"))
            }
            Problem::MapPinMissing(name) => {
                let maps_dir = self.layout.maps_dir();
                std::fs::create_dir_all(&maps_dir).map_err(io_err(&maps_dir))?;
                let path = maps_dir.join(name);
                let m = self.ebpf.map(name).ok_or_else(|| LoaderError::Map {
                    map: name.clone(),
                    source: MapError::InvalidName { name: name.clone() },
                })?;
                m.pin(&path).map_err(|e| LoaderError::Io {
                    path: path.clone(),
                    source: std::io::Error::other(e.to_string()),
                })?;
                Ok(format!("map {name}: re-pinned"))
            }
        }
    }

    /// Take the event ring buffer (once).
    pub fn take_events(&mut self) -> Option<aya::maps::Map> {
        self.ebpf.take_map("EVENTS")
    }

    pub fn cgroup(&self) -> &Path {
        &self.cgroup
    }
}

/// FNV-1a, 64 bits: a stable hash (the same across builds and runs) for [`policy_hash`].
struct Fnv(u64);

impl Fnv {
    fn new() -> Fnv {
        Fnv(0xcbf2_9ce4_8422_2325)
    }
    fn bytes(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 ^= u64::from(*b);
            self.0 = self.0.wrapping_mul(0x0100_0000_01b3);
        }
    }
    /// FNV's step over 8-byte little-endian words (the last one zero-padded): the same
    /// mixing, an eighth of the steps, for the maps' bulk.
    fn words(&mut self, bytes: &[u8]) {
        let mut chunks = bytes.chunks_exact(8);
        for c in &mut chunks {
            let w = u64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]);
            self.0 = (self.0 ^ w).wrapping_mul(0x0100_0000_01b3);
        }
        let rest = chunks.remainder();
        if !rest.is_empty() {
            let mut last = [0u8; 8];
            last[..rest.len()].copy_from_slice(rest);
            self.0 = (self.0 ^ u64::from_le_bytes(last)).wrapping_mul(0x0100_0000_01b3);
        }
    }
}

impl std::fmt::Write for Fnv {
    fn write_str(&mut self, s: &str) -> std::fmt::Result {
        self.bytes(s.as_bytes());
        Ok(())
    }
}

/// 64-bit hash of everything a policy writes into a slot (maps, masks, `flags`, the ephemeral
/// range), stored in [`SlotConfig::policy_hash`]: equal hashes mean the same kernel policy.
pub fn policy_hash(compiled: &Compiled, flags: u32, ephemeral: (u16, u16)) -> u64 {
    use std::fmt::Write as _;
    let mut h = Fnv::new();
    let cfg = SlotConfig {
        generation: 0,
        policy_hash: 0,
        flags,
        ephemeral_low: ephemeral.0,
        ephemeral_high: ephemeral.1,
        ..compiled.config
    };
    let _ = write!(h, "{cfg:?}|");
    // Each map's entries as bytes, with its length: no formatting of 100k entries.
    fn map<K: Pod, V: Pod>(h: &mut Fnv, entries: &[(K, V)]) {
        h.words(&(entries.len() as u64).to_le_bytes());
        for (k, v) in entries {
            h.words(pod_bytes(std::slice::from_ref(k)));
            h.words(pod_bytes(std::slice::from_ref(v)));
        }
    }
    map(&mut h, &compiled.exes);
    map(&mut h, &compiled.uids);
    map(&mut h, &compiled.gids);
    map(&mut h, &compiled.cgroups);
    h.words(&(compiled.net4.len() as u64).to_le_bytes());
    for (len, addr, class) in &compiled.net4 {
        h.words(&(u64::from(*len) << 32 | u64::from(*class)).to_le_bytes());
        h.words(addr);
    }
    h.words(&(compiled.net6.len() as u64).to_le_bytes());
    for (len, addr, class) in &compiled.net6 {
        h.words(&(u64::from(*len) << 32 | u64::from(*class)).to_le_bytes());
        h.words(addr);
    }
    map(&mut h, &compiled.decisions);
    map(&mut h, &compiled.rule_of);
    h.words(pod_bytes(&compiled.ports));
    h.0
}

/// Health of the pinned state in `layout` for `cgroup`, without a loaded object (used by
/// `status` in the daemon and by tests).
/// The exec-identity tracepoints follow the cgroup hooks (attached: their pinned link runs a
/// program).
pub fn health(layout: &Layout, cgroup: &Path) -> Vec<HookHealth> {
    let cgroup_fd = sys::open_dir(cgroup).ok();
    let tracers = TRACERS.into_iter().map(|tracer| {
        let prog_id = link_program_id(&layout.tracer_link_path(&tracer)).unwrap_or(0);
        HookHealth {
            hook: tracer.program.to_string(),
            attached: prog_id != 0,
            prog_id,
        }
    });
    CGROUP_HOOKS
        .into_iter()
        .map(|hook| {
            let prog_id = link_program_id(&layout.link_path(hook)).unwrap_or(0);
            let attached = prog_id != 0
                && cgroup_fd
                    .as_ref()
                    .and_then(|fd| sys::prog_query(fd.as_fd(), attach_type(hook)).ok())
                    .is_some_and(|ids| ids.contains(&prog_id));
            HookHealth {
                hook: hook.name().to_string(),
                attached,
                prog_id,
            }
        })
        .chain(tracers)
        .collect()
}

/// The program id behind a pinned link.
fn link_program_id(path: &Path) -> Result<u32, LoaderError> {
    let link = PinnedLink::from_pin(path).map_err(|e| LoaderError::Link {
        path: path.to_path_buf(),
        source: std::io::Error::other(e.to_string()),
    })?;
    let fd_link: FdLink = link.into();
    let info = fd_link.info().map_err(|e| LoaderError::Link {
        path: path.to_path_buf(),
        source: std::io::Error::other(e.to_string()),
    })?;
    Ok(info.program_id())
}

/// Detach and unpin everything zt pinned under `layout`. Works with no daemon running:
/// removing a link's last pin (and fd) detaches it. Returns what was removed.
pub fn unload(layout: &Layout) -> std::io::Result<Vec<PathBuf>> {
    let mut removed = Vec::new();
    for dir in [layout.links_dir(), layout.maps_dir()] {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries {
            let path = entry?.path();
            if dir == layout.links_dir() {
                // Detach now, so that nothing is attached once unload returns.
                if let Ok(fd) = sys::obj_get(&path) {
                    let _ = sys::link_detach(fd.as_fd());
                }
            }
            std::fs::remove_file(&path)?;
            removed.push(path);
        }
        std::fs::remove_dir(&dir)?;
    }
    match std::fs::remove_dir(&layout.bpffs) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    Ok(removed)
}

pub fn nr_cpus() -> usize {
    aya::util::nr_cpus().map(|n| n.max(1)).unwrap_or(1)
}

fn program_mut(ebpf: &mut Ebpf, hook: Hook) -> Result<&mut Program, ProgramError> {
    ebpf.program_mut(hook.name()).ok_or(ProgramError::NotLoaded)
}

/// Load one cgroup hook's program, by its program type.
fn load_program(ebpf: &mut Ebpf, hook: Hook) -> Result<(), ProgramError> {
    let prog = program_mut(ebpf, hook)?;
    match hook {
        Hook::SkbIngress | Hook::SkbEgress => {
            let p: &mut CgroupSkb = prog.try_into()?;
            p.load()
        }
        Hook::SockCreate => {
            let p: &mut CgroupSock = prog.try_into()?;
            p.load()
        }
        _ => {
            let p: &mut CgroupSockAddr = prog.try_into()?;
            p.load()
        }
    }
}

/// Load the BPF LSM program against the kernel's BTF.
fn load_lsm(ebpf: &mut Ebpf, btf: &Btf) -> Result<(), ProgramError> {
    let prog = ebpf
        .program_mut(LSM_PROGRAM)
        .ok_or(ProgramError::NotLoaded)?;
    let p: &mut Lsm = prog.try_into()?;
    p.load(LSM_HOOK, btf)
}

/// Load one exec-identity tracepoint program against the kernel's BTF.
fn load_tracer(ebpf: &mut Ebpf, tracer: &Tracer, btf: &Btf) -> Result<(), ProgramError> {
    let prog = ebpf
        .program_mut(tracer.program)
        .ok_or(ProgramError::NotLoaded)?;
    let p: &mut BtfTracePoint = prog.try_into()?;
    p.load(tracer.tracepoint, btf)
}

fn to_fd_link<L>(link: L) -> Result<FdLink, ProgramError>
where
    FdLink: TryFrom<L, Error = aya::programs::links::LinkError>,
{
    FdLink::try_from(link).map_err(|e| ProgramError::IOError(std::io::Error::other(e.to_string())))
}

/// Attach one cgroup hook's program to the cgroup through a new bpf_link.
fn attach_program(
    ebpf: &mut Ebpf,
    hook: Hook,
    cgroup: &std::os::fd::OwnedFd,
) -> Result<FdLink, ProgramError> {
    let prog = program_mut(ebpf, hook)?;
    let mode = CgroupAttachMode::Single;
    match hook {
        Hook::SkbIngress | Hook::SkbEgress => {
            let p: &mut CgroupSkb = prog.try_into()?;
            let kind = if hook == Hook::SkbIngress {
                CgroupSkbAttachType::Ingress
            } else {
                CgroupSkbAttachType::Egress
            };
            let id = p.attach(cgroup, kind, mode)?;
            to_fd_link(p.take_link(id)?)
        }
        Hook::SockCreate => {
            let p: &mut CgroupSock = prog.try_into()?;
            let id = p.attach(cgroup, mode)?;
            to_fd_link(p.take_link(id)?)
        }
        _ => {
            let p: &mut CgroupSockAddr = prog.try_into()?;
            let id = p.attach(cgroup, mode)?;
            to_fd_link(p.take_link(id)?)
        }
    }
}

fn map_err(name: &str) -> impl FnOnce(MapError) -> LoaderError + '_ {
    move |source| LoaderError::Map {
        map: name.to_string(),
        source,
    }
}

fn map<'a, T>(ebpf: &'a Ebpf, name: &str) -> Result<T, LoaderError>
where
    T: TryFrom<&'a aya::maps::Map, Error = MapError>,
{
    let m = ebpf.map(name).ok_or_else(|| LoaderError::Map {
        map: name.to_string(),
        source: MapError::InvalidName {
            name: name.to_string(),
        },
    })?;
    T::try_from(m).map_err(map_err(name))
}

fn map_mut<'a, T>(ebpf: &'a mut Ebpf, name: &str) -> Result<T, LoaderError>
where
    T: TryFrom<&'a mut aya::maps::Map, Error = MapError>,
{
    let m = ebpf.map_mut(name).ok_or_else(|| LoaderError::Map {
        map: name.to_string(),
        source: MapError::InvalidName {
            name: name.to_string(),
        },
    })?;
    T::try_from(m).map_err(map_err(name))
}

/// What `slot`'s policy maps hold now (batch reads).
fn read_slot(ebpf: &Ebpf, slot: u32) -> Result<SlotImage, LoaderError> {
    let ports_name = format!("PORTS_{slot}");
    let fd = map_fd(ebpf, &ports_name)?;
    let bytes = sys::array_lookup_range(fd, 0, (PORT_PROTOS * PORTS_PER_PROTO) as usize, 4)
        .map_err(|e| LoaderError::Batch {
            map: ports_name,
            done: e.done,
            source: e.error,
        })?;
    Ok(SlotImage {
        exes: read_map(ebpf, &format!("EXE_{slot}"))?,
        uids: read_map(ebpf, &format!("UID_{slot}"))?,
        gids: read_map(ebpf, &format!("GID_{slot}"))?,
        cgroups: read_map(ebpf, &format!("CGROUP_{slot}"))?,
        net4: read_map(ebpf, &format!("NET4_{slot}"))?,
        net6: read_map(ebpf, &format!("NET6_{slot}"))?,
        ports: bytes
            .chunks_exact(4)
            .map(|b| u32::from_ne_bytes([b[0], b[1], b[2], b[3]]))
            .collect(),
        decisions: read_map(ebpf, &format!("DECISION_{slot}"))?,
        rule_of: read_map(ebpf, &format!("RULE_OF_{slot}"))?,
    })
}

/// Every entry of a hash or trie map, sorted by key (one batch walk).
fn read_map<K, V>(ebpf: &Ebpf, name: &str) -> Result<Vec<(K, V)>, LoaderError>
where
    K: Pod + Ord + Default,
    V: Pod,
{
    let fd = map_fd(ebpf, name)?;
    let vsize = std::mem::size_of::<V>();
    let (keys, values) = sys::map_lookup_all::<K>(fd, vsize).map_err(|e| LoaderError::Batch {
        map: name.to_string(),
        done: e.done,
        source: e.error,
    })?;
    let mut entries: Vec<(K, V)> = keys
        .into_iter()
        .zip(values.chunks_exact(vsize))
        // SAFETY: `V` is `Pod` and the chunk is exactly its size.
        .map(|(k, v)| {
            (k, unsafe {
                std::ptr::read_unaligned(v.as_ptr().cast::<V>())
            })
        })
        .collect();
    entries.sort_unstable_by_key(|e| e.0);
    Ok(entries)
}

/// The fd of one of the object's maps (the kinds the loader writes).
fn map_fd<'a>(ebpf: &'a Ebpf, name: &str) -> Result<BorrowedFd<'a>, LoaderError> {
    match ebpf.map(name) {
        Some(Map::HashMap(m) | Map::LpmTrie(m) | Map::Array(m) | Map::PerCpuArray(m)) => {
            Ok(m.fd().as_fd())
        }
        _ => Err(LoaderError::Map {
            map: name.to_string(),
            source: MapError::InvalidName {
                name: name.to_string(),
            },
        }),
    }
}

/// The bytes of plain-data values (the zt-common ABI types have no padding).
fn pod_bytes<T: Pod>(values: &[T]) -> &[u8] {
    // SAFETY: `Pod` types are `Copy`, have no padding and any bit pattern is valid; the
    // slice covers exactly the values' memory.
    unsafe { std::slice::from_raw_parts(values.as_ptr().cast(), std::mem::size_of_val(values)) }
}

/// Make the map hold exactly `want` (sorted by key): remove stale keys, write new and changed
/// entries, both in batches. `known`: what it holds (sorted), if this process wrote it;
/// otherwise it is read (one batch walk).
fn sync_map<K, V>(
    ebpf: &Ebpf,
    name: &str,
    want: &[(K, V)],
    known: Option<&[(K, V)]>,
    stats: &mut ApplyStats,
) -> Result<(), LoaderError>
where
    K: Pod + Ord + Default,
    V: Pod + PartialEq,
{
    let fd = map_fd(ebpf, name)?;
    let batch_err = |e: sys::BatchError| LoaderError::Batch {
        map: name.to_string(),
        done: e.done,
        source: e.error,
    };
    let read;
    let have: &[(K, V)] = match known {
        Some(k) => k,
        None => {
            let vsize = std::mem::size_of::<V>();
            let (keys, values) = sys::map_lookup_all::<K>(fd, vsize).map_err(batch_err)?;
            let mut entries: Vec<(K, V)> = keys
                .into_iter()
                .zip(values.chunks_exact(vsize))
                // SAFETY: `V` is `Pod` and the chunk is exactly its size.
                .map(|(k, v)| {
                    (k, unsafe {
                        std::ptr::read_unaligned(v.as_ptr().cast::<V>())
                    })
                })
                .collect();
            entries.sort_unstable_by_key(|e| e.0);
            read = entries;
            &read
        }
    };
    // Both sides are sorted by key: one merge pass finds what to remove and what to write.
    let mut remove: Vec<K> = Vec::new();
    let mut keys: Vec<K> = Vec::new();
    let mut values: Vec<V> = Vec::new();
    let (mut i, mut j) = (0, 0);
    while i < have.len() || j < want.len() {
        match (have.get(i), want.get(j)) {
            (Some(h), Some(w)) if h.0 == w.0 => {
                if h.1 != w.1 {
                    keys.push(w.0);
                    values.push(w.1);
                }
                i += 1;
                j += 1;
            }
            (Some(h), Some(w)) if h.0 < w.0 => {
                remove.push(h.0);
                i += 1;
            }
            (Some(h), None) => {
                remove.push(h.0);
                i += 1;
            }
            (_, Some(w)) => {
                keys.push(w.0);
                values.push(w.1);
                j += 1;
            }
            (None, None) => break,
        }
    }
    if !remove.is_empty() {
        sys::map_delete_batch(fd, &remove).map_err(batch_err)?;
        stats.deletes += remove.len() as u64;
    }
    if !keys.is_empty() {
        sys::map_update_batch(fd, &keys, pod_bytes(&values), std::mem::size_of::<V>())
            .map_err(batch_err)?;
        stats.updates += keys.len() as u64;
    }
    Ok(())
}

/// Make the port-class array hold `want` (missing indices: 0): one batch read when its
/// contents are unknown, one batch write of the changed indices.
fn sync_ports(
    ebpf: &Ebpf,
    name: &str,
    want: &[u32],
    known: Option<&[u32]>,
    stats: &mut ApplyStats,
) -> Result<(), LoaderError> {
    let fd = map_fd(ebpf, name)?;
    let batch_err = |e: sys::BatchError| LoaderError::Batch {
        map: name.to_string(),
        done: e.done,
        source: e.error,
    };
    let len = (PORT_PROTOS * PORTS_PER_PROTO) as usize;
    let read;
    let have: &[u32] = match known {
        Some(k) => k,
        None => {
            let bytes = sys::array_lookup_range(fd, 0, len, 4).map_err(batch_err)?;
            read = bytes
                .chunks_exact(4)
                .map(|b| u32::from_ne_bytes([b[0], b[1], b[2], b[3]]))
                .collect::<Vec<u32>>();
            &read
        }
    };
    let mut keys: Vec<u32> = Vec::new();
    let mut values: Vec<u32> = Vec::new();
    for index in 0..len {
        let value = want.get(index).copied().unwrap_or(0);
        if have.get(index).copied().unwrap_or(0) != value {
            keys.push(index as u32);
            values.push(value);
        }
    }
    if !keys.is_empty() {
        sys::map_update_batch(fd, &keys, pod_bytes(&values), 4).map_err(batch_err)?;
        stats.updates += keys.len() as u64;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn policy_hash_is_stable_and_covers_flags_maps_and_ports() {
        let mut c = Compiled {
            config: SlotConfig::default(),
            exes: vec![],
            uids: vec![(1000, 2)],
            gids: vec![],
            cgroups: vec![],
            net4: vec![(8, [10, 0, 0, 0], 1)],
            net6: vec![],
            ports: vec![0; 16],
            decisions: vec![],
            rule_of: vec![],
            rules: vec![],
            identities: vec![],
            exe_paths: vec![],
        };
        let h = policy_hash(&c, 0, (32768, 60999));
        assert_eq!(h, policy_hash(&c.clone(), 0, (32768, 60999)));
        assert_ne!(h, policy_hash(&c, 1, (32768, 60999)), "flags");
        assert_ne!(h, policy_hash(&c, 0, (1024, 60999)), "ephemeral range");
        // Generation and the stored hash itself are not part of it.
        c.config.generation = 7;
        c.config.policy_hash = 99;
        assert_eq!(h, policy_hash(&c, 0, (32768, 60999)));
        c.ports[3] = 1;
        assert_ne!(h, policy_hash(&c, 0, (32768, 60999)), "ports");
        c.ports[3] = 0;
        c.uids[0].1 = 4;
        assert_ne!(h, policy_hash(&c, 0, (32768, 60999)), "maps");
    }

    fn image(rules: &[(String, u16)]) -> SlotImage {
        let mut text = String::from("version = 1\n");
        for (peer, port) in rules {
            text.push_str(&format!(
                "[[rule]]\naction = \"allow\"\npeer = \"{peer}\"\nports = [{port}]\n"
            ));
        }
        let r = crate::policy::SystemResolver {
            cgroup_root: PathBuf::from("/nonexistent"),
        };
        let (p, _) =
            crate::policy::load_sources(&[(PathBuf::from("t.toml"), text)], &r).expect("valid");
        SlotImage::of(&crate::policy::compile(&p).expect("compiles"))
    }

    /// What an image decides, without names: per prefix and port class, the masks and the
    /// rules behind them.
    type Meaning = std::collections::BTreeSet<(LpmKey<4>, u32, [u64; 3], Vec<(u32, u32, u32)>)>;

    fn meaning(img: &SlotImage) -> Meaning {
        let mut out = Meaning::new();
        for (key, class) in &img.net4 {
            for (k, v) in img.decisions.iter().filter(|(k, _)| k.net_class == *class) {
                let rules = img
                    .rule_of
                    .iter()
                    .filter(|(rk, _)| rk.entry == v.entry)
                    .map(|(rk, rule)| (rk.identity, rk.kind, *rule))
                    .collect();
                out.insert((*key, k.port_class, [v.allow, v.deny, v.audit_deny], rules));
            }
        }
        out
    }

    fn differing<K: PartialEq, V: PartialEq>(a: &[(K, V)], b: &[(K, V)]) -> usize {
        a.iter().filter(|e| !b.contains(e)).count() + b.iter().filter(|e| !a.contains(e)).count()
    }

    #[test]
    fn renaming_keeps_the_meaning_and_makes_one_rule_changes_small() {
        let rules: Vec<(String, u16)> = (0..200u16)
            .map(|i| (format!("10.0.{i}.0/24"), 100 + i))
            .collect();
        let old = image(&rules);
        // Rule 100 now names a prefix that sorts first: compiled afresh, every net class and
        // decision entry shifts.
        let mut changed = rules.clone();
        changed[100].0 = "9.0.0.0/24".to_string();
        let fresh = image(&changed);
        let mut renamed = fresh.clone();
        renamed.renumber_like(&old);
        assert_eq!(meaning(&renamed), meaning(&fresh), "same decisions");
        assert!(
            differing(&fresh.decisions, &old.decisions) > 300,
            "compiled afresh: all shift"
        );
        let diff = differing(&renamed.net4, &old.net4)
            + differing(&renamed.decisions, &old.decisions)
            + differing(&renamed.rule_of, &old.rule_of)
            + renamed
                .ports
                .iter()
                .zip(&old.ports)
                .filter(|(a, b)| a != b)
                .count();
        // The old and new prefix, and for tcp and udp each: the decision and its rule-of.
        assert_eq!(diff, 10, "one rule changed, {diff} entries differ");
        // Renaming the same policy against its renamed self changes nothing.
        let mut again = fresh.clone();
        again.renumber_like(&renamed);
        assert_eq!(again, renamed);
    }
}
