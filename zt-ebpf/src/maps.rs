//! Every map of zt, declared once. Policy maps exist twice (slot 0 and 1; see zt-common's
//! "Generations"): [`Slot`] gives the hook code one slot's maps by type, so that each slot's
//! code path references its maps directly (the verifier needs constant map pointers).
//!
//! All maps are pinned by name under `<bpffs>/maps`, so enforcement outlives the daemon.

use aya_ebpf::{
    bindings::{bpf_map_type::BPF_MAP_TYPE_SK_STORAGE, BPF_F_CLONE, BPF_F_NO_PREALLOC},
    macros::{btf_map, map},
    maps::{Array, HashMap, LpmTrie, LruHashMap, PerCpuArray, RingBuf},
};
use zt_common::{
    ActiveSlot, DecisionKey, DecisionValue, ExeKey, IdentityMask, RateKey, RateState, ReplyKey,
    ReplyValue, RuleOfKey, SlotConfig, SocketOwner, EVENT_RING_BYTES, HOOK_CODES, MAX_CGROUPS,
    MAX_DECISIONS, MAX_EXEC_RECORDS, MAX_EXES, MAX_GIDS, MAX_NET4, MAX_NET6, MAX_RATE_KEYS,
    MAX_REPLIES, MAX_RULES, MAX_RULE_OF, MAX_UIDS, PORTS_PER_PROTO, PORT_PROTOS, SLOTS, STAT_COUNT,
    VERDICT_CODES,
};

/// Which slot decides now (one entry).
#[map]
pub static ACTIVE: Array<ActiveSlot> = Array::pinned(1, 0);

/// Per-slot configuration: generation, wildcard masks, modes.
#[map]
pub static SLOT_CONFIG: Array<SlotConfig> = Array::pinned(SLOTS, 0);

/// Hits per rule, per CPU; index `slot * MAX_RULES + rule id`.
#[map]
pub static RULE_HITS: PerCpuArray<u64> = PerCpuArray::pinned(SLOTS * MAX_RULES, 0);

/// Per-CPU statistics, indexed by `zt_common::Stat`.
#[map]
pub static STATS: PerCpuArray<u64> = PerCpuArray::pinned(STAT_COUNT, 0);

/// Decisions per (hook, verdict), per CPU: index `hook code * VERDICT_CODES + verdict code`.
#[map]
pub static HOOK_VERDICTS: PerCpuArray<u64> = PerCpuArray::pinned(HOOK_CODES * VERDICT_CODES, 0);

/// Decision events for the daemon.
#[map]
pub static EVENTS: RingBuf = RingBuf::pinned(EVENT_RING_BYTES, 0);

/// Event rate limiter per (identity, peer, hook, verdict): least recently used keys go first.
#[map]
pub static EVENT_RATE: LruHashMap<RateKey, RateState> = LruHashMap::pinned(MAX_RATE_KEYS, 0);

/// Peers that sent to a serving UDP socket, which it may answer (see `zt_common::ReplyKey`):
/// least recently used records are evicted first.
#[map]
pub static REPLIES: LruHashMap<ReplyKey, ReplyValue> = LruHashMap::pinned(MAX_REPLIES, 0);

/// The executable each live process runs, keyed by tgid: the file the kernel loaded at its
/// last exec (`sched_process_exec`), copied to new processes at fork and removed when the
/// whole thread group exits. Decisions take the caller's `exe` identity from here only, never
/// from `mm->exe_file` (which `prctl(PR_SET_MM)` can change). No entry: no exec seen since zt
/// first started (or it could not be stored), and no `exe` identity matches.
#[map]
pub static EXEC_IDS: HashMap<u32, ExeKey> = HashMap::pinned(MAX_EXEC_RECORDS, BPF_F_NO_PREALLOC);

/// Socket storage: who owns each guarded socket (see `zt_common::SocketOwner`). Declared by
/// hand as a BTF map so that it can carry `BPF_F_CLONE`: accepted sockets inherit their
/// listener's owner.
#[repr(C)]
pub struct OwnerStorage {
    r#type: *const [i32; BPF_MAP_TYPE_SK_STORAGE as usize],
    key: *const i32,
    value: *const SocketOwner,
    max_entries: *const [i32; 0],
    map_flags: *const [i32; (BPF_F_NO_PREALLOC | BPF_F_CLONE) as usize],
    pinning: *const [i32; 1],
}

// SAFETY: placeholder pointers the loader patches; never dereferenced.
unsafe impl Sync for OwnerStorage {}

impl OwnerStorage {
    #[inline(always)]
    pub fn as_ptr(&self) -> *mut core::ffi::c_void {
        core::ptr::from_ref(self).cast_mut().cast()
    }
}

/// Owners of guarded sockets.
#[btf_map]
pub static OWNERS: OwnerStorage = OwnerStorage {
    r#type: core::ptr::null(),
    key: core::ptr::null(),
    value: core::ptr::null(),
    max_entries: core::ptr::null(),
    map_flags: core::ptr::null(),
    pinning: core::ptr::null(),
};

/// One policy slot's maps.
pub trait Slot {
    const INDEX: u32;
    /// Executable (device, inode) → identities that name it.
    fn exes() -> &'static HashMap<ExeKey, IdentityMask>;
    /// uid → identities that name it.
    fn uids() -> &'static HashMap<u32, IdentityMask>;
    /// gid → identities that name it.
    fn gids() -> &'static HashMap<u32, IdentityMask>;
    /// cgroup id → identities that name it (or an ancestor of the task's cgroup).
    fn cgroups() -> &'static HashMap<u64, IdentityMask>;
    /// IPv4 prefix → net class.
    fn net4() -> &'static LpmTrie<[u8; 4], u32>;
    /// IPv6 prefix → net class.
    fn net6() -> &'static LpmTrie<[u8; 16], u32>;
    /// `proto * 65536 + port` → port class.
    fn ports() -> &'static Array<u32>;
    /// (net class, port class) → identity masks.
    fn decisions() -> &'static HashMap<DecisionKey, DecisionValue>;
    /// (decision entry, identity, kind) → the rule behind it.
    fn rule_of() -> &'static HashMap<RuleOfKey, u32>;
}

macro_rules! slot {
    ($slot:ident, $index:expr, $exe:ident, $uid:ident, $gid:ident, $cg:ident, $n4:ident, $n6:ident,
     $ports:ident, $dec:ident, $rule_of:ident) => {
        /// Executables of this slot.
        #[map]
        static $exe: HashMap<ExeKey, IdentityMask> = HashMap::pinned(MAX_EXES, 0);
        /// uids of this slot.
        #[map]
        static $uid: HashMap<u32, IdentityMask> = HashMap::pinned(MAX_UIDS, 0);
        /// gids of this slot.
        #[map]
        static $gid: HashMap<u32, IdentityMask> = HashMap::pinned(MAX_GIDS, 0);
        /// cgroups of this slot.
        #[map]
        static $cg: HashMap<u64, IdentityMask> = HashMap::pinned(MAX_CGROUPS, 0);
        /// IPv4 prefixes of this slot.
        #[map]
        static $n4: LpmTrie<[u8; 4], u32> = LpmTrie::pinned(MAX_NET4, 0);
        /// IPv6 prefixes of this slot.
        #[map]
        static $n6: LpmTrie<[u8; 16], u32> = LpmTrie::pinned(MAX_NET6, 0);
        /// Port classes of this slot.
        #[map]
        static $ports: Array<u32> = Array::pinned(PORT_PROTOS * PORTS_PER_PROTO, 0);
        /// Decisions of this slot.
        #[map]
        static $dec: HashMap<DecisionKey, DecisionValue> =
            HashMap::pinned(MAX_DECISIONS, BPF_F_NO_PREALLOC);
        /// Rule ids of this slot.
        #[map]
        static $rule_of: HashMap<RuleOfKey, u32> = HashMap::pinned(MAX_RULE_OF, BPF_F_NO_PREALLOC);

        pub struct $slot;

        impl Slot for $slot {
            const INDEX: u32 = $index;
            #[inline(always)]
            fn exes() -> &'static HashMap<ExeKey, IdentityMask> {
                &$exe
            }
            #[inline(always)]
            fn uids() -> &'static HashMap<u32, IdentityMask> {
                &$uid
            }
            #[inline(always)]
            fn gids() -> &'static HashMap<u32, IdentityMask> {
                &$gid
            }
            #[inline(always)]
            fn cgroups() -> &'static HashMap<u64, IdentityMask> {
                &$cg
            }
            #[inline(always)]
            fn net4() -> &'static LpmTrie<[u8; 4], u32> {
                &$n4
            }
            #[inline(always)]
            fn net6() -> &'static LpmTrie<[u8; 16], u32> {
                &$n6
            }
            #[inline(always)]
            fn ports() -> &'static Array<u32> {
                &$ports
            }
            #[inline(always)]
            fn decisions() -> &'static HashMap<DecisionKey, DecisionValue> {
                &$dec
            }
            #[inline(always)]
            fn rule_of() -> &'static HashMap<RuleOfKey, u32> {
                &$rule_of
            }
        }
    };
}

slot!(Slot0, 0, EXE_0, UID_0, GID_0, CGROUP_0, NET4_0, NET6_0, PORTS_0, DECISION_0, RULE_OF_0);
slot!(Slot1, 1, EXE_1, UID_1, GID_1, CGROUP_1, NET4_1, NET6_1, PORTS_1, DECISION_1, RULE_OF_1);

// ---- XDP front door (zt-ebpf/src/xdp.rs) ----

/// Interfaces (ifindex) the XDP counters keep apart; least recently used ones age out.
pub const XDP_MAX_IFACES: u32 = 256;

/// XDP front door counters: receiving ifindex → per-CPU counters indexed by
/// `zt_common::XdpStat`.
#[map]
pub static XDP_STATS: aya_ebpf::maps::LruPerCpuHashMap<
    u32,
    [u64; zt_common::XDP_STAT_COUNT as usize],
> = aya_ebpf::maps::LruPerCpuHashMap::pinned(XDP_MAX_IFACES, 0);

/// Per-CPU token bucket that samples the XDP front door's deny and audit events.
#[repr(C)]
pub struct XdpEventBucket {
    /// Saved-up credit in nanoseconds (one event costs `xdp::EVENT_INTERVAL_NS`).
    pub credit_ns: u64,
    /// When the credit was last updated (`bpf_ktime_get_ns`).
    pub last_ns: u64,
}

/// XDP event sampling state (one bucket per CPU).
#[map]
pub static XDP_EVENT_BUCKET: PerCpuArray<XdpEventBucket> = PerCpuArray::pinned(1, 0);
