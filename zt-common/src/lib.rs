//! The ABI shared by the kernel programs (`zt-ebpf`) and userspace (`zt-userspace`).
//!
//! Everything here is `#[repr(C)]` with explicit padding so that both sides agree on the
//! layout byte for byte. Numeric codes (hooks, verdicts, protocols, statistics) are part of
//! the ABI: append new ones, never renumber.
//!
//! # How a decision is made (bounded lookups, no loop over rules)
//! 1. **Identity.** The calling task's exe (device+inode), uid, gid and cgroup ancestry each
//!    select a bitmask of policy identities ([`IdentityMask`]); an identity that does not
//!    constrain an attribute is in that attribute's wildcard mask ([`SlotConfig`]). The AND of
//!    the four is the set of identities the task matches. Bit [`ANY_IDENTITY_BIT`] is `any`.
//! 2. **Peer.** An LPM trie maps the peer address to a *net class*: the id of the set of policy
//!    CIDRs that contain it (closed over containment at compile time, so the longest match
//!    carries every shorter one).
//! 3. **Port.** An array maps `(protocol, port)` to a *port class* (the partition of the port
//!    space cut at every range endpoint of the policy).
//! 4. **Decision.** A hash map keyed by `(net class, port class)` holds the identity masks
//!    that are allowed, denied, and denied-in-audit there. Peers `any` and "every port of a
//!    protocol" have their own classes, so at most four keys are probed.
//! 5. **Rule.** The rule that decided is found with one more lookup, for counters and events.
//!
//! # Generations
//! Every policy map exists twice (slot 0 and slot 1). The programs read [`ActiveSlot`] once
//! per decision and use only that slot's maps, so a reload writes the idle slot completely,
//! then flips one word: a decision sees the old policy or the new one, never a mix.
#![cfg_attr(not(test), no_std)]

/// Bit of the identity mask that every task matches (`identity = "any"`).
pub const ANY_IDENTITY_BIT: u32 = 0;
/// Identities per policy, `any` included (one `u64` mask).
pub const MAX_IDENTITIES: usize = 64;
/// Rules per policy generation; rule id 0 is the default verdict.
pub const MAX_RULES: u32 = 1 << 17;
/// Rule id reported when no rule matched (default deny).
pub const RULE_DEFAULT: u32 = 0;
/// Number of policy slots (double buffering).
pub const SLOTS: u32 = 2;
/// Deepest cgroup level the programs inspect for cgroup identities.
pub const MAX_CGROUP_LEVEL: u32 = 24;

/// Capacity of the per-slot decision maps.
pub const MAX_EXES: u32 = 4096;
pub const MAX_UIDS: u32 = 4096;
pub const MAX_GIDS: u32 = 4096;
pub const MAX_CGROUPS: u32 = 4096;
pub const MAX_NET4: u32 = 1 << 18;
pub const MAX_NET6: u32 = 1 << 18;
pub const MAX_DECISIONS: u32 = 1 << 20;
pub const MAX_RULE_OF: u32 = 1 << 20;

/// Port classes: index `proto_index * 65536 + port` of the port map.
pub const PORTS_PER_PROTO: u32 = 65536;
/// Number of protocols with ports in the port map (tcp, udp).
pub const PORT_PROTOS: u32 = 2;

/// Net class of peer `any` for IPv4 / IPv6 destinations.
pub const NET_CLASS_ANY4: u32 = 1;
pub const NET_CLASS_ANY6: u32 = 2;
/// First net class the compiler hands out for CIDRs.
pub const NET_CLASS_FIRST: u32 = 16;
/// Port class meaning "every port" of tcp, udp, and protocols without ports.
pub const PORT_CLASS_ALL_TCP: u32 = 1;
pub const PORT_CLASS_ALL_UDP: u32 = 2;
pub const PORT_CLASS_ALL_OTHER: u32 = 3;
/// Port class of ICMP and ICMPv6 (echo "ping" sockets, raw ICMP): `proto = "icmp"`.
pub const PORT_CLASS_ALL_ICMP: u32 = 4;

/// OR'ed into `DecisionKey::port_class` for ingress rules: `peer` is the remote source, the
/// port is the local port. Egress entries never carry it.
pub const INGRESS: u32 = 1 << 31;
/// Net class of bind grants: `(NET_CLASS_BIND, port class | INGRESS)` holds in `allow` the
/// identities that some ingress allow rule lets listen on that port (whatever the peer).
pub const NET_CLASS_BIND: u32 = 3;
/// First port class the compiler hands out for port ranges.
pub const PORT_CLASS_FIRST: u32 = 16;

/// Set of identities, one bit each.
pub type IdentityMask = u64;

/// Protocol index used by the port map and in events.
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Proto {
    Tcp = 0,
    Udp = 1,
    Other = 2,
    Icmp = 3,
}

/// Which hook made a decision. Stable codes.
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Hook {
    Connect4 = 1,
    Connect6 = 2,
    Sendmsg4 = 3,
    Sendmsg6 = 4,
    Bind4 = 5,
    Bind6 = 6,
    SockCreate = 7,
    SkbIngress = 8,
    SkbEgress = 9,
    Xdp = 10,
    /// BPF LSM `socket_create` (kernels with BPF LSM only): sockets of address families
    /// other than unix, inet, inet6 and netlink.
    LsmSocketCreate = 11,
}

impl Hook {
    /// Every hook, in code order.
    pub const ALL: [Hook; 11] = [
        Hook::Connect4,
        Hook::Connect6,
        Hook::Sendmsg4,
        Hook::Sendmsg6,
        Hook::Bind4,
        Hook::Bind6,
        Hook::SockCreate,
        Hook::SkbIngress,
        Hook::SkbEgress,
        Hook::Xdp,
        Hook::LsmSocketCreate,
    ];

    pub fn from_code(code: u8) -> Option<Hook> {
        Self::ALL.into_iter().find(|h| *h as u8 == code)
    }

    /// Name of the program in the eBPF object and of its pinned link.
    pub const fn name(self) -> &'static str {
        match self {
            Hook::Connect4 => "connect4",
            Hook::Connect6 => "connect6",
            Hook::Sendmsg4 => "sendmsg4",
            Hook::Sendmsg6 => "sendmsg6",
            Hook::Bind4 => "bind4",
            Hook::Bind6 => "bind6",
            Hook::SockCreate => "sock_create",
            Hook::SkbIngress => "skb_ingress",
            Hook::SkbEgress => "skb_egress",
            Hook::Xdp => "xdp",
            Hook::LsmSocketCreate => "lsm_socket_create",
        }
    }
}

/// What the kernel did. Stable codes.
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    Allow = 1,
    Deny = 2,
    /// Would have been denied; allowed because the deciding policy is in audit mode.
    Audit = 3,
}

impl Verdict {
    pub fn from_code(code: u8) -> Option<Verdict> {
        match code {
            1 => Some(Verdict::Allow),
            2 => Some(Verdict::Deny),
            3 => Some(Verdict::Audit),
            _ => None,
        }
    }
}

/// Indexes of the per-CPU statistics array. Stable codes; every error path has one.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stat {
    Allowed = 0,
    Denied = 1,
    Audited = 2,
    /// The active slot or its configuration could not be read: denied (fail closed).
    NoPolicy = 3,
    /// The caller's credentials could not be read; judged by its real ids.
    ExeUnreadable = 4,
    /// A rule-of lookup failed; the decision stood, the counter went to the default rule.
    RuleUnknown = 5,
    /// The event ring buffer was full; the verdict stood, the event was lost.
    EventLost = 6,
    /// Events successfully submitted to the ring buffer.
    EventSent = 7,
    /// cgroup_skb: not even a packet's IP header could be read; dropped (and counted in
    /// [`Stat::SkbUnparsedDropped`] too).
    SkbUnparsed = 8,
    /// cgroup_skb: packets dropped by the ingress or egress backstop.
    SkbDropped = 9,
    /// Events not sent because their (identity, peer) exceeded the rate limit; carried in
    /// the next event's `suppressed`.
    EventSuppressed = 10,
    /// Gauge, not a counter: bytes waiting in the ring buffer when an event was last sent
    /// (the largest over CPUs is the fill).
    RingFill = 11,
    /// cgroup_skb: packets dropped because zt could not parse their headers to the end (more
    /// IPv6 extension headers than [`MAX_SKB_IPV6_EXT`], a truncated header, or a transport
    /// header other than the socket's protocol): a packet zt cannot judge is not trusted.
    SkbUnparsedDropped = 12,
    /// A UDP send, connect or egress packet of a socket serving a bound port, allowed as an
    /// answer because its peer sent to this socket first (a valid [`ReplyKey`] record).
    ReplyAllowed = 13,
    /// Reply records written by the ingress hook (a datagram admitted to a serving UDP
    /// socket from a peer not recorded, or recorded more than a second ago).
    ReplyRecorded = 14,
    /// Decisions about a caller that has no exec record (a process already running when zt
    /// first started, a kernel thread, or one whose record could not be stored): no `exe`
    /// identity matched it; uid/gid/cgroup identities still did.
    NoExecRecord = 15,
    /// An exec or fork whose record could not be stored (map full, unreadable binprm): that
    /// process has no exec record (fail closed for `exe` identities).
    ExecRecordFailed = 16,
    /// BPF LSM `socket_create`: sockets of an address family other than unix, inet, inet6
    /// and netlink refused to a guarded process without `raw = true` (also in `Denied`).
    FamilyDenied = 17,
}

/// Size of the hook-code space (codes 1..=11 are used) and verdict-code space (1..=3), for
/// the per-(hook, verdict) decision counters.
pub const HOOK_CODES: u32 = 16;
pub const VERDICT_CODES: u32 = 4;

/// Number of entries in the statistics array.
pub const STAT_COUNT: u32 = 24;

/// IPv6 extension headers the `cgroup_skb` parser follows before the transport header; a
/// longer chain is not parsed to the end and its packet is dropped
/// ([`Stat::SkbUnparsedDropped`]).
pub const MAX_SKB_IPV6_EXT: u32 = 8;

/// Key of the reply records (`REPLIES`, an LRU hash): a peer that sent a datagram to a
/// serving UDP socket, which may therefore answer it. Written by the `cgroup_skb` ingress
/// hook when it admits the datagram; read by the sendmsg/connect hooks and the egress
/// backstop.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ReplyKey {
    /// The serving socket's cookie (`bpf_get_socket_cookie`).
    pub cookie: u64,
    /// 4 or 6 (IPv4-mapped IPv6 peers are recorded as IPv4).
    pub family: u8,
    /// `Proto` code.
    pub proto: u8,
    /// The peer's port, host order.
    pub port: u16,
    pub _pad: u32,
    /// The peer's address, network order; IPv4 in the first four bytes.
    pub addr: [u8; 16],
}

/// Value of a reply record.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ReplyValue {
    /// When the peer last sent to the socket (`bpf_ktime_get_ns`).
    pub seen_ns: u64,
    /// Generation whose ingress rules admitted it: a new generation voids the record (the
    /// next datagram, judged by the new rules, writes it again).
    pub generation: u64,
    /// The ingress rule that admitted it (with `RULE_LOG_FLAG` stripped), for counters and
    /// events of the reply.
    pub rule: u32,
    pub _pad: u32,
}

/// How long a reply record lasts after the peer's last datagram (as conntrack's UDP stream
/// timeout): 120 s.
pub const REPLY_TTL_NS: u64 = 120_000_000_000;
/// A record seen again within this time is not rewritten (one map write per peer per
/// second at most).
pub const REPLY_REFRESH_NS: u64 = 1_000_000_000;
/// Capacity of `REPLIES`; the least recently used records are evicted first (a reply whose
/// record was evicted is judged by the egress rules).
pub const MAX_REPLIES: u32 = 65536;

/// Whether a reply record is valid at `now` for generation `generation`.
pub fn reply_valid(v: &ReplyValue, generation: u64, now: u64) -> bool {
    v.generation == generation && now.wrapping_sub(v.seen_ns) < REPLY_TTL_NS
}

/// The single entry of the `ACTIVE` map: which slot decides now.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ActiveSlot {
    pub slot: u32,
    pub _pad: u32,
}

/// Mode flags of a slot.
pub const FLAG_GLOBAL_AUDIT: u32 = 1;
/// Emit an event for allowed decisions too.
pub const FLAG_LOG_ALLOWED: u32 = 2;

/// Per-slot configuration (entry `slot` of the `SLOT_CONFIG` array).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SlotConfig {
    pub generation: u64,
    /// Identities that do not constrain the executable / uid / gid / cgroup.
    pub exe_wildcard: IdentityMask,
    pub uid_wildcard: IdentityMask,
    pub gid_wildcard: IdentityMask,
    pub cgroup_wildcard: IdentityMask,
    /// Identities declared in files with `mode = "audit"`.
    pub audit_identities: IdentityMask,
    /// Identities declared in files with `mode = "enforce"`.
    pub enforce_identities: IdentityMask,
    /// Bit `l` set: some identity names a cgroup at level `l` (root is level 0).
    pub cgroup_levels: u32,
    /// `FLAG_*`.
    pub flags: u32,
    /// Number of rules of this generation (rule ids are 1..=rules).
    pub rules: u32,
    /// Ephemeral port range (`net.ipv4.ip_local_port_range`): the XDP front door lets TCP/UDP
    /// to these ports pass (replies to our own egress; the cgroup_skb ingress hook judges
    /// them per socket).
    pub ephemeral_low: u16,
    pub ephemeral_high: u16,
    /// Identities allowed raw sockets (`raw = true`).
    pub raw_identities: IdentityMask,
    /// Identities allowed ICMP sockets: `raw = true` or some rule with `proto = "icmp"`.
    pub icmp_identities: IdentityMask,
    /// 64-bit hash of the compiled policy this slot holds (maps, masks, flags): a restarted
    /// `ztd` whose policy hashes the same keeps the generation. Not read by the kernel.
    pub policy_hash: u64,
}

/// Key of the exe map: the executable's device (kernel encoding `major << 20 | minor`)
/// and inode number.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ExeKey {
    pub dev: u64,
    pub ino: u64,
}

/// Key of the decision map.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct DecisionKey {
    pub net_class: u32,
    pub port_class: u32,
}

/// Value of the decision map: which identities a rule allows, denies, or denies in audit
/// mode at this (net class, port class). `entry` names this value in the rule-of map.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DecisionValue {
    pub allow: IdentityMask,
    pub deny: IdentityMask,
    pub audit_deny: IdentityMask,
    pub entry: u32,
    pub _pad: u32,
}

/// Which mask of a [`DecisionValue`] a [`RuleOfKey`] refers to.
pub const RULE_KIND_ALLOW: u32 = 0;
pub const RULE_KIND_DENY: u32 = 1;
pub const RULE_KIND_AUDIT_DENY: u32 = 2;

/// Key of the rule-of map: the first rule (in policy order) behind one bit of one mask of
/// one decision entry.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RuleOfKey {
    pub entry: u32,
    pub identity: u32,
    pub kind: u32,
    pub _pad: u32,
}

/// Offsets into kernel structures, read from the kernel's BTF at start-up, so that the
/// programs can record the executable the kernel loaded at exec (`linux_binprm.file` →
/// inode → device and inode number), follow processes across fork and exit
/// (`task_struct.tgid`, `task_struct.signal` → `signal_struct.live`), and read the caller's
/// effective ids. `mm_struct.exe_file` is deliberately absent: a process can change it
/// (`prctl(PR_SET_MM_MAP)`), so it never decides anything.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct KernelOffsets {
    /// `linux_binprm.file`: the file `execve` loaded (the interpreter, for `#!` scripts).
    pub bprm_file: u32,
    pub file_f_inode: u32,
    pub inode_i_ino: u32,
    pub inode_i_sb: u32,
    pub sb_s_dev: u32,
    /// `task_struct.cred` and the effective ids in it: identities match the effective
    /// uid/gid (what the process acts as), not the real ones.
    pub task_cred: u32,
    pub cred_euid: u32,
    pub cred_egid: u32,
    /// `task_struct.tgid` (of a new task at fork).
    pub task_tgid: u32,
    /// `task_struct.signal` and `signal_struct.live` (threads still running: 0 once the
    /// whole thread group has exited).
    pub task_signal: u32,
    pub signal_live: u32,
    pub _pad: u32,
}

/// Which processes the BPF LSM `socket_create` hook judges (it runs for every task on the
/// host): those whose cgroup ancestor at `level` is `cgroup_id`, the guarded cgroup. Set by
/// the loader as a global; `cgroup_id` 0 judges nothing.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LsmScope {
    pub cgroup_id: u64,
    /// The guarded cgroup's level (the cgroup v2 root is level 0).
    pub level: u32,
    pub _pad: u32,
}

/// Address families every process may create sockets of, whatever the policy: unix,
/// netlink, and inet/inet6 (judged by the cgroup hooks). Others (`AF_PACKET`, `AF_XDP`,
/// `AF_VSOCK`, ...) need `raw = true` where the BPF LSM hook is attached.
pub const LSM_FREE_FAMILIES: [u32; 4] = [1, 2, 10, 16];

/// Capacity of the exec-record map (one entry per live process, keyed by tgid). A process
/// whose record cannot be stored (map full) has none: no `exe` identity matches it (fail
/// closed), and `Stat::ExecRecordFailed` counts it.
pub const MAX_EXEC_RECORDS: u32 = 1 << 17;

/// Who owns a guarded socket: captured in socket storage when it connects, sends or binds
/// (and inherited by accepted sockets), so packets are judged by the socket's owner, never by
/// whatever task happens to be current. Also caches the last packet verdict per generation.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SocketOwner {
    pub exe: ExeKey,
    pub uid: u32,
    pub gid: u32,
    pub cgroup_id: u64,
    /// Local port the owner bound explicitly (host order); 0 = none (a client socket).
    pub bound_port: u16,
    /// Peer port of the cached verdict (host order).
    pub cache_port: u16,
    /// `CACHE_*` direction of the cached verdict (0: nothing cached).
    pub cache_dir: u8,
    /// `Verdict` code of the cached verdict.
    pub cache_verdict: u8,
    /// Address family and protocol of the cached verdict ([`cache_kind`]; 0: none).
    pub cache_kind: u8,
    /// `OWNER_*` flags.
    pub flags: u8,
    /// Generation the cached verdict was made in: a new generation invalidates it.
    pub cache_generation: u64,
    /// Peer address of the cached verdict (IPv4 in the first four bytes).
    pub cache_peer: [u8; 16],
}

/// Directions of a cached packet verdict.
pub const CACHE_EGRESS: u8 = 1;
pub const CACHE_INGRESS: u8 = 2;

/// `SocketOwner::flags`: the socket opened a TCP connection itself (`connect()`, or
/// `sendto(MSG_FASTOPEN)`, both run the connect hooks): it is a client, never treated as
/// serving its bound port, so its packets are judged by the egress rules.
pub const OWNER_ACTIVE_OPEN: u8 = 1;

/// The family+protocol byte of a cached verdict: family (4 or 6) in the high nibble, the
/// `Proto` code in the low one. Never 0 for a real key.
pub const fn cache_kind(family: u8, proto: Proto) -> u8 {
    (family << 4) | (proto as u8 & 0x0f)
}

/// What a per-socket packet verdict depends on besides the socket's owner: the policy
/// generation, the direction, the peer's family, full address and port (for ingress: the
/// local port), and the protocol.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CacheKey {
    pub generation: u64,
    pub dir: u8,
    pub family: u8,
    pub proto: Proto,
    pub port: u16,
    pub addr: [u8; 16],
}

impl SocketOwner {
    /// The cached verdict code, if the cache holds a verdict for exactly `key`.
    #[inline(always)]
    pub fn cached(&self, key: &CacheKey) -> Option<u8> {
        (self.cache_dir != 0
            && self.cache_generation == key.generation
            && self.cache_dir == key.dir
            && self.cache_kind == cache_kind(key.family, key.proto)
            && self.cache_port == key.port
            && self.cache_peer == key.addr)
            .then_some(self.cache_verdict)
    }

    /// Cache `verdict` (a `Verdict` code) for `key`.
    #[inline(always)]
    pub fn cache(&mut self, key: &CacheKey, verdict: u8) {
        self.cache_generation = key.generation;
        self.cache_dir = key.dir;
        self.cache_kind = cache_kind(key.family, key.proto);
        self.cache_port = key.port;
        self.cache_peer = key.addr;
        self.cache_verdict = verdict;
    }
}

/// Indexes of the per-CPU XDP counters. Stable codes.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum XdpStat {
    Passed = 0,
    /// Source in a host-wide ingress deny list.
    DroppedDenyList = 1,
    /// TCP/UDP to a port no ingress rule opens (and outside the ephemeral range).
    DroppedClosedPort = 2,
    /// Truncated or malformed headers: dropped.
    DroppedMalformed = 3,
    /// Not IP, or IP without TCP/UDP ports (ICMP, fragments after the first): passed to the
    /// stack, which the cgroup hooks guard.
    PassedNotJudged = 4,
    /// No readable policy: passed (the front door is an optimisation, the cgroup hooks
    /// decide), counted.
    NoPolicy = 5,
    /// Deny events sent (sampled) and lost.
    EventSent = 6,
    EventLost = 7,
    /// Would have been dropped (a deny-list entry of an audit file, or `--mode audit`, or a
    /// closed port while audit identities exist): passed and counted.
    Audited = 8,
    /// Deny and audit events not sent because of sampling (per-CPU token bucket).
    EventSkipped = 9,
    /// An IPv6 packet whose extension header chain the front door could not follow to the
    /// transport header (more than `MAX_IPV6_EXT` headers, or deeper than `MAX_L4_OFFSET`
    /// bytes): its destination port is unknown, so it could target any port: dropped.
    DroppedUnparsed = 10,
}

/// Number of entries in the XDP statistics array (room to append codes).
pub const XDP_STAT_COUNT: u32 = 16;

/// Event kinds. Stable codes.
pub const EVENT_DECISION: u16 = 1;
/// Layout version of [`DecisionEvent`]; bumped on any change.
pub const EVENT_VERSION: u8 = 2;

/// Set in a rule-of value when the rule says `log = true`: its allows are reported too.
pub const RULE_LOG_FLAG: u32 = 1 << 31;

/// Events per second one (identity, peer, hook, verdict) may produce before the rest are
/// suppressed and counted into the next event's `suppressed` (a flood never slows the verdict
/// and never floods the ring).
pub const EVENT_RATE_PER_SEC: u32 = 16;

/// The header every ring buffer record starts with.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EventHeader {
    /// `EVENT_*`.
    pub kind: u16,
    /// `EVENT_VERSION` of the producer.
    pub version: u8,
    pub _pad: u8,
    /// Size of the whole record in bytes.
    pub size: u32,
}

/// A decision event, sent through the ring buffer for denials, audits and (on request)
/// allows.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DecisionEvent {
    pub header: EventHeader,
    /// `Hook` code.
    pub hook: u8,
    /// `Verdict` code.
    pub verdict: u8,
    /// `Proto` code.
    pub proto: u8,
    /// 4 or 6 (family of the judged address after unmapping IPv4-mapped IPv6).
    pub family: u8,
    /// Peer port (host order); for ingress and bind decisions, see `local_port`.
    pub peer_port: u16,
    /// Local port (host order), 0 when not known (a connect before the socket is bound).
    pub local_port: u16,
    /// Rule id (0: the default verdict).
    pub rule: u32,
    /// Events of the same (identity, peer, hook, verdict) suppressed by the rate limit since
    /// the previous one.
    pub suppressed: u32,
    pub ktime_ns: u64,
    pub generation: u64,
    /// 0 in packet hooks, where no task is the caller.
    pub pid: u32,
    pub tgid: u32,
    pub uid: u32,
    pub gid: u32,
    pub cgroup_id: u64,
    pub exe: ExeKey,
    /// Peer address: IPv4 in the first four bytes, network byte order; all zero when there
    /// is no peer (bind, socket creation).
    pub peer_addr: [u8; 16],
    /// Local address, same encoding; all zero when not known.
    pub local_addr: [u8; 16],
    pub comm: [u8; 16],
}

impl DecisionEvent {
    /// Size of the record in bytes.
    pub const SIZE: usize = core::mem::size_of::<DecisionEvent>();

    /// The record as the ring buffer carries it.
    pub fn to_bytes(&self) -> [u8; Self::SIZE] {
        // SAFETY: plain old data with explicit padding, read as bytes.
        unsafe { core::mem::transmute_copy(self) }
    }

    /// Parse a ring buffer record; `None` if it is too short or not a decision event of
    /// this layout version.
    pub fn from_bytes(bytes: &[u8]) -> Option<DecisionEvent> {
        if bytes.len() < Self::SIZE {
            return None;
        }
        // SAFETY: at least SIZE bytes; every bit pattern is a valid DecisionEvent.
        let ev: DecisionEvent = unsafe { core::ptr::read_unaligned(bytes.as_ptr().cast()) };
        (ev.header.kind == EVENT_DECISION && ev.header.version == EVENT_VERSION).then_some(ev)
    }
}

/// Key of the event rate limiter: one (identity, peer, hook, verdict).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RateKey {
    pub exe: ExeKey,
    pub uid: u32,
    pub hook: u8,
    pub verdict: u8,
    pub peer_port: u16,
    pub peer_addr: [u8; 16],
}

/// State of one rate limiter key: events in the current one-second window, and how many
/// were suppressed since the last event sent.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RateState {
    pub window_start_ns: u64,
    pub sent_in_window: u32,
    pub suppressed: u32,
}

/// Keys the rate limiter tracks (an LRU map: the oldest are forgotten first).
pub const MAX_RATE_KEYS: u32 = 16384;

/// Ring buffer size in bytes (a power of two, a multiple of the page size).
pub const EVENT_RING_BYTES: u32 = 1 << 22;

/// What `ztd` reports about an identity whose resolution changed (a notice in `ztctl events`
/// and the log). Made in userspace, never by the kernel; stable codes: append, never renumber.
#[repr(u16)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NoticeKind {
    /// The file at an `exe` path was replaced (new device+inode) and passed the identity's
    /// checks: the rule follows the new file.
    ExeReplaced = 1,
    /// The file at an `exe` path is gone: the identity matches nothing until it is back.
    ExeMissing = 2,
    /// The file's SHA-256 is not the pinned `sha256`: the identity matches nothing.
    HashMismatch = 3,
    /// A `unit`'s or `cgroup`'s cgroup was (re)created with a new id: rules follow it.
    CgroupChanged = 4,
    /// A `unit`'s or `cgroup`'s cgroup is gone: its old id is removed from the maps.
    CgroupGone = 5,
    /// An identity that matched nothing (missing file, hash mismatch) matches again.
    Restored = 6,
    /// A `user`/`group` name resolves to another id than before (NSS changed).
    AccountChanged = 7,
}

impl NoticeKind {
    pub const ALL: [NoticeKind; 7] = [
        NoticeKind::ExeReplaced,
        NoticeKind::ExeMissing,
        NoticeKind::HashMismatch,
        NoticeKind::CgroupChanged,
        NoticeKind::CgroupGone,
        NoticeKind::Restored,
        NoticeKind::AccountChanged,
    ];

    /// The stable name (`exe_replaced`, ...).
    pub fn name(self) -> &'static str {
        match self {
            NoticeKind::ExeReplaced => "exe_replaced",
            NoticeKind::ExeMissing => "exe_missing",
            NoticeKind::HashMismatch => "sha256_mismatch",
            NoticeKind::CgroupChanged => "cgroup_changed",
            NoticeKind::CgroupGone => "cgroup_gone",
            NoticeKind::Restored => "restored",
            NoticeKind::AccountChanged => "account_changed",
        }
    }
}

#[cfg(feature = "user")]
mod pod {
    use super::*;
    // SAFETY: all of these are #[repr(C)] plain data with explicit padding and no pointers.
    unsafe impl aya::Pod for ActiveSlot {}
    unsafe impl aya::Pod for SlotConfig {}
    unsafe impl aya::Pod for ExeKey {}
    unsafe impl aya::Pod for DecisionKey {}
    unsafe impl aya::Pod for DecisionValue {}
    unsafe impl aya::Pod for RuleOfKey {}
    unsafe impl aya::Pod for KernelOffsets {}
    unsafe impl aya::Pod for LsmScope {}
    unsafe impl aya::Pod for DecisionEvent {}
    unsafe impl aya::Pod for RateKey {}
    unsafe impl aya::Pod for RateState {}
    unsafe impl aya::Pod for SocketOwner {}
    unsafe impl aya::Pod for ReplyKey {}
    unsafe impl aya::Pod for ReplyValue {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decision_event_round_trips_through_bytes() {
        let ev = DecisionEvent {
            header: EventHeader {
                kind: EVENT_DECISION,
                version: EVENT_VERSION,
                _pad: 0,
                size: DecisionEvent::SIZE as u32,
            },
            hook: Hook::Connect6 as u8,
            verdict: Verdict::Audit as u8,
            proto: Proto::Udp as u8,
            family: 6,
            peer_port: 443,
            local_port: 40000,
            rule: 7,
            suppressed: 3,
            ktime_ns: 123_456_789,
            generation: 9,
            pid: 10,
            tgid: 11,
            uid: 1000,
            gid: 1001,
            cgroup_id: 4242,
            exe: ExeKey {
                dev: 8 << 20 | 1,
                ino: 77,
            },
            peer_addr: [0x20, 1, 0xd, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1],
            local_addr: [0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2],
            comm: *b"curl\0\0\0\0\0\0\0\0\0\0\0\0",
        };
        let bytes = ev.to_bytes();
        assert_eq!(bytes.len(), 128, "the layout is part of the ABI");
        assert_eq!(DecisionEvent::from_bytes(&bytes), Some(ev));
        assert_eq!(
            DecisionEvent::from_bytes(&bytes[..127]),
            None,
            "short record"
        );
        let mut other = ev;
        other.header.version = EVENT_VERSION + 1;
        assert_eq!(
            DecisionEvent::from_bytes(&other.to_bytes()),
            None,
            "other layout"
        );
    }

    fn key(family: u8, proto: Proto, addr: [u8; 16]) -> CacheKey {
        CacheKey {
            generation: 3,
            dir: CACHE_EGRESS,
            family,
            proto,
            port: 53,
            addr,
        }
    }

    #[test]
    fn the_socket_cache_keys_on_family_protocol_address_port_direction_and_generation() {
        let v4 = [127, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0];
        let mut owner = SocketOwner::default();
        let k = key(4, Proto::Udp, v4);
        assert_eq!(owner.cached(&k), None, "an empty cache holds nothing");
        owner.cache(&k, Verdict::Allow as u8);
        assert_eq!(
            owner.cached(&k),
            Some(Verdict::Allow as u8),
            "the same key hits"
        );
        // IPv6 7f00:1:: has the same 16 bytes as IPv4 127.0.0.1 in our encoding.
        assert_eq!(owner.cached(&key(6, Proto::Udp, v4)), None, "other family");
        assert_eq!(
            owner.cached(&key(4, Proto::Tcp, v4)),
            None,
            "other protocol"
        );
        let mut other_addr = v4;
        other_addr[15] = 1;
        assert_eq!(
            owner.cached(&key(4, Proto::Udp, other_addr)),
            None,
            "other address"
        );
        assert_eq!(
            owner.cached(&CacheKey { port: 54, ..k }),
            None,
            "other port"
        );
        assert_eq!(
            owner.cached(&CacheKey {
                dir: CACHE_INGRESS,
                ..k
            }),
            None,
            "other direction"
        );
        assert_eq!(
            owner.cached(&CacheKey { generation: 4, ..k }),
            None,
            "other generation"
        );
        // A socket storage written by an older program (kind 0) never hits.
        let mut old = owner;
        old.cache_kind = 0;
        assert_eq!(old.cached(&k), None);
    }

    #[test]
    fn reply_records_expire_and_die_with_their_generation() {
        let v = ReplyValue {
            seen_ns: 1_000,
            generation: 5,
            rule: 2,
            _pad: 0,
        };
        assert!(reply_valid(&v, 5, 1_000));
        assert!(reply_valid(&v, 5, 1_000 + REPLY_TTL_NS - 1));
        assert!(!reply_valid(&v, 5, 1_000 + REPLY_TTL_NS), "expired");
        assert!(!reply_valid(&v, 6, 1_000), "another generation");
    }

    #[test]
    fn codes_are_stable() {
        assert_eq!(Hook::Connect4 as u8, 1);
        assert_eq!(Hook::Xdp as u8, 10);
        assert_eq!(Verdict::Allow as u8, 1);
        assert_eq!(Verdict::Deny as u8, 2);
        assert_eq!(Verdict::Audit as u8, 3);
        assert_eq!(Stat::EventLost as u32, 6);
        assert_eq!(Stat::RingFill as u32, 11);
        assert_eq!(Stat::SkbUnparsedDropped as u32, 12);
        assert_eq!(Stat::ReplyRecorded as u32, 14);
        assert_eq!(Stat::ExecRecordFailed as u32, 16);
        assert!((Stat::ExecRecordFailed as u32) < STAT_COUNT);
        assert_eq!(XdpStat::DroppedUnparsed as u32, 10);
        assert_eq!(
            core::mem::size_of::<SocketOwner>(),
            64,
            "pinned socket storage layout"
        );
        assert_eq!(core::mem::size_of::<ReplyKey>(), 32);
        assert_eq!(core::mem::size_of::<ReplyValue>(), 24);
        assert_eq!(NoticeKind::ExeReplaced as u16, 1);
        assert_eq!(NoticeKind::AccountChanged as u16, 7);
        for hook in Hook::ALL {
            assert_eq!(Hook::from_code(hook as u8), Some(hook));
        }
    }
}
