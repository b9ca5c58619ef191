//! Loads zt's programs, keeps them attached through pinned bpf_links, and writes policy
//! generations into the pinned maps.
//!
//! Layout under `--bpffs DIR`: `DIR/maps/<MAP>` (every map, pinned by name) and
//! `DIR/links/<hook>` (one cgroup link per hook). Pins keep enforcement alive when `ztd`
//! exits, however it exits.
//!
//! **Start and restart without a window.** The programs are always loaded against the pinned
//! maps (created on first start, reused after). If a hook's link is already pinned, the new
//! program replaces the old one in place (`BPF_LINK_UPDATE`): the cgroup is never without a
//! program and never has two. Only a missing link is created, and only after the policy is in
//! the maps.
//!
//! **Generations.** A policy is written completely into the idle slot (diffed against what
//! that slot holds, so small changes make few writes), then `ACTIVE` is flipped in one write.

use std::{
    collections::HashMap as StdHashMap,
    hash::Hash,
    os::fd::AsFd,
    path::{Path, PathBuf},
};

use aya::{
    maps::{lpm_trie::Key, Array, HashMap, LpmTrie, MapData, MapError, PerCpuArray},
    programs::{
        links::{FdLink, PinnedLink},
        CgroupAttachMode, CgroupSkb, CgroupSkbAttachType, CgroupSock, CgroupSockAddr, Program,
        ProgramError,
    },
    Ebpf, EbpfLoader, Pod,
};
use zt_common::{
    ActiveSlot, Hook, KernelOffsets, SlotConfig, Stat, Verdict, HOOK_CODES, MAX_RULES,
    PORTS_PER_PROTO, PORT_PROTOS, STAT_COUNT, VERDICT_CODES,
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
        Hook::Xdp => u32::MAX,
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
    /// against it, with no reads from the kernel. (Unknown after a start: read once.)
    written: [Option<Box<Compiled>>; 2],
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
    /// Load the programs against the pinned maps (creating them on first start).
    pub fn load(
        layout: &Layout,
        cgroup: &Path,
        offsets: KernelOffsets,
    ) -> Result<Loader, LoaderError> {
        let maps_dir = layout.maps_dir();
        std::fs::create_dir_all(&maps_dir).map_err(io_err(&maps_dir))?;
        let links_dir = layout.links_dir();
        std::fs::create_dir_all(&links_dir).map_err(io_err(&links_dir))?;
        let mut ebpf = EbpfLoader::new()
            .default_map_pin_directory(&maps_dir)
            .override_global("KERNEL_OFFSETS", &offsets, true)
            .load(EBPF_OBJECT)?;
        for hook in CGROUP_HOOKS {
            load_program(&mut ebpf, hook).map_err(|source| LoaderError::Program {
                hook: hook.name(),
                source,
            })?;
        }
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
        })
    }

    /// Attach every hook to the cgroup, or adopt the pinned link by replacing its program.
    /// Call after a generation has been written. Refuses links that guard another cgroup.
    pub fn attach_or_adopt(&mut self) -> Result<Vec<(Hook, HookStart)>, LoaderError> {
        let cgroup_fd = sys::open_dir(&self.cgroup).map_err(io_err(&self.cgroup))?;
        let mut report = Vec::new();
        for hook in CGROUP_HOOKS {
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
        let hash = policy_hash(compiled, flags, crate::xdp::ephemeral_range());
        if active.generation != 0 && active.policy_hash == hash {
            return Ok((active.generation, true));
        }
        self.apply(compiled, flags).map(|g| (g, false))
    }

    /// Write `compiled` into the idle slot as the next generation and flip to it.
    /// Returns the new generation.
    pub fn apply(&mut self, compiled: &Compiled, flags: u32) -> Result<u64, LoaderError> {
        let (active_slot, active_cfg) = self.active()?;
        // Before anything was written, slot 0 is "active" with generation 0: write slot 0.
        let slot = if active_cfg.generation == 0 {
            active_slot
        } else {
            1 - active_slot
        };
        let generation = active_cfg.generation + 1;

        // Forget what the slot held before writing: a failed write leaves it unknown (read
        // again next time), never wrongly known.
        let known = self.written[slot as usize & 1].take();
        let known = known.as_deref();
        let ebpf = &mut self.ebpf;
        sync_hash(
            ebpf,
            &format!("EXE_{slot}"),
            &compiled.exes,
            known.map(|k| &k.exes[..]),
        )?;
        sync_hash(
            ebpf,
            &format!("UID_{slot}"),
            &compiled.uids,
            known.map(|k| &k.uids[..]),
        )?;
        sync_hash(
            ebpf,
            &format!("GID_{slot}"),
            &compiled.gids,
            known.map(|k| &k.gids[..]),
        )?;
        sync_hash(
            ebpf,
            &format!("CGROUP_{slot}"),
            &compiled.cgroups,
            known.map(|k| &k.cgroups[..]),
        )?;
        sync_lpm::<4>(
            ebpf,
            &format!("NET4_{slot}"),
            &compiled.net4,
            known.map(|k| &k.net4[..]),
        )?;
        sync_lpm::<16>(
            ebpf,
            &format!("NET6_{slot}"),
            &compiled.net6,
            known.map(|k| &k.net6[..]),
        )?;
        sync_ports(
            ebpf,
            &format!("PORTS_{slot}"),
            &compiled.ports,
            known.map(|k| &k.ports[..]),
        )?;
        sync_hash(
            ebpf,
            &format!("DECISION_{slot}"),
            &compiled.decisions,
            known.map(|k| &k.decisions[..]),
        )?;
        sync_hash(
            ebpf,
            &format!("RULE_OF_{slot}"),
            &compiled.rule_of,
            known.map(|k| &k.rule_of[..]),
        )?;

        // The XDP front door passes TCP/UDP to these ports (replies to our own egress).
        let (ephemeral_low, ephemeral_high) = crate::xdp::ephemeral_range();
        let cfg = SlotConfig {
            generation,
            flags,
            ephemeral_low,
            ephemeral_high,
            policy_hash: policy_hash(compiled, flags, (ephemeral_low, ephemeral_high)),
            ..compiled.config
        };
        let mut configs: Array<&mut MapData, SlotConfig> = map_mut(&mut self.ebpf, "SLOT_CONFIG")?;
        configs.set(slot, cfg, 0).map_err(map_err("SLOT_CONFIG"))?;
        // Zero this slot's rule counters: rule ids mean something new in this generation.
        let mut hits: PerCpuArray<&mut MapData, u64> = map_mut(&mut self.ebpf, "RULE_HITS")?;
        for rule in 0..=cfg.rules.min(MAX_RULES - 1) {
            let zeros =
                aya::maps::PerCpuValues::try_from(vec![0u64; nr_cpus()]).map_err(|source| {
                    LoaderError::Io {
                        path: self.layout.maps_dir().join("RULE_HITS"),
                        source,
                    }
                })?;
            hits.set(slot * MAX_RULES + rule, zeros, 0)
                .map_err(map_err("RULE_HITS"))?;
        }

        let mut active: Array<&mut MapData, ActiveSlot> = map_mut(&mut self.ebpf, "ACTIVE")?;
        active
            .set(0, ActiveSlot { slot, _pad: 0 }, 0)
            .map_err(map_err("ACTIVE"))?;
        self.written[slot as usize & 1] = Some(Box::new(compiled.clone()));
        Ok(generation)
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
        health(&self.layout, &self.cgroup)
    }

    /// What is wrong with the pinned state now: each hook's pinned link present, attached to
    /// the guarded cgroup (`BPF_PROG_QUERY`) and running our program; each map pin present.
    pub fn problems(&self) -> Vec<Problem> {
        let cgroup_fd = sys::open_dir(&self.cgroup).ok();
        let mut out = Vec::new();
        for hook in CGROUP_HOOKS {
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
    let _ = write!(
        h,
        "{cfg:?}|{:?}|{:?}|{:?}|{:?}|{:?}|{:?}|{:?}|{:?}|",
        compiled.exes,
        compiled.uids,
        compiled.gids,
        compiled.cgroups,
        compiled.net4,
        compiled.net6,
        compiled.decisions,
        compiled.rule_of
    );
    for p in &compiled.ports {
        h.bytes(&p.to_le_bytes());
    }
    h.0
}

/// Health of the pinned state in `layout` for `cgroup`, without a loaded object (used by
/// `status` in the daemon and by tests).
pub fn health(layout: &Layout, cgroup: &Path) -> Vec<HookHealth> {
    let cgroup_fd = sys::open_dir(cgroup).ok();
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

/// Make the hash map hold exactly `want`: delete stale keys, write changed values.
/// Make the hash map hold exactly `want`. `known`: what it holds, if this process wrote it
/// (no reads then); otherwise it is read.
fn sync_hash<K, V>(
    ebpf: &mut Ebpf,
    name: &str,
    want: &[(K, V)],
    known: Option<&[(K, V)]>,
) -> Result<(), LoaderError>
where
    K: Pod + Eq + Hash,
    V: Pod + PartialEq,
{
    let mut m: HashMap<&mut MapData, K, V> = map_mut(ebpf, name)?;
    let mut have: StdHashMap<K, V> = StdHashMap::new();
    match known {
        Some(known) => have.extend(known.iter().copied()),
        None => {
            let keys: Vec<K> = m.keys().collect::<Result<_, _>>().map_err(map_err(name))?;
            for k in keys {
                if let Ok(v) = m.get(&k, 0) {
                    have.insert(k, v);
                }
            }
        }
    }
    let want_keys: std::collections::HashSet<&K> = want.iter().map(|(k, _)| k).collect();
    for k in have.keys() {
        if !want_keys.contains(k) {
            m.remove(k).map_err(map_err(name))?;
        }
    }
    for (k, v) in want {
        if have.get(k) != Some(v) {
            m.insert(k, v, 0).map_err(map_err(name))?;
        }
    }
    Ok(())
}

fn sync_lpm<const N: usize>(
    ebpf: &mut Ebpf,
    name: &str,
    want: &[(u32, [u8; N], u32)],
    known: Option<&[(u32, [u8; N], u32)]>,
) -> Result<(), LoaderError>
where
    [u8; N]: Pod,
{
    let mut m: LpmTrie<&mut MapData, [u8; N], u32> = map_mut(ebpf, name)?;
    let mut have: StdHashMap<(u32, [u8; N]), u32> = StdHashMap::new();
    match known {
        Some(known) => have.extend(known.iter().map(|(len, addr, c)| ((*len, *addr), *c))),
        None => {
            let keys: Vec<Key<[u8; N]>> =
                m.keys().collect::<Result<_, _>>().map_err(map_err(name))?;
            for k in keys {
                if let Ok(v) = m.get(&k, 0) {
                    have.insert((k.prefix_len(), k.data()), v);
                }
            }
        }
    }
    let want_map: StdHashMap<(u32, [u8; N]), u32> = want
        .iter()
        .map(|(len, addr, class)| ((*len, *addr), *class))
        .collect();
    for (len, addr) in have.keys() {
        if !want_map.contains_key(&(*len, *addr)) {
            m.remove(&Key::new(*len, *addr)).map_err(map_err(name))?;
        }
    }
    for ((len, addr), class) in &want_map {
        if have.get(&(*len, *addr)) != Some(class) {
            m.insert(&Key::new(*len, *addr), class, 0)
                .map_err(map_err(name))?;
        }
    }
    Ok(())
}

fn sync_ports(
    ebpf: &mut Ebpf,
    name: &str,
    want: &[u32],
    known: Option<&[u32]>,
) -> Result<(), LoaderError> {
    let mut m: Array<&mut MapData, u32> = map_mut(ebpf, name)?;
    for index in 0..PORT_PROTOS * PORTS_PER_PROTO {
        let value = want.get(index as usize).copied().unwrap_or(0);
        let current = match known {
            Some(known) => known.get(index as usize).copied().unwrap_or(0),
            None => m.get(&index, 0).map_err(map_err(name))?,
        };
        if current != value {
            m.set(index, value, 0).map_err(map_err(name))?;
        }
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
}
