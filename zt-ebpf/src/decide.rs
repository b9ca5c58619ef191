//! The verdict: identity masks × (net class, port class) decisions, with a bounded number of
//! map lookups whatever the size of the policy. See zt-common's crate doc for the scheme.

use aya_ebpf::{
    bindings::{bpf_sock, BPF_RB_AVAIL_DATA, BPF_SK_STORAGE_GET_F_CREATE},
    helpers::{
        bpf_get_current_comm, bpf_get_current_pid_tgid,
        generated::{
            bpf_get_current_cgroup_id, bpf_get_socket_cookie, bpf_ktime_get_ns, bpf_sk_storage_get,
        },
    },
    maps::lpm_trie::Key,
    programs::SockAddrContext,
};
use zt_common::{
    reply_valid, CacheKey, DecisionEvent, DecisionKey, EventHeader, ExeKey, Hook, IdentityMask,
    LsmScope, Proto, RateKey, RateState, ReplyKey, RuleOfKey, SlotConfig, SocketOwner, Stat,
    Verdict, CACHE_EGRESS, EVENT_DECISION, EVENT_RATE_PER_SEC, EVENT_VERSION, FLAG_GLOBAL_AUDIT,
    FLAG_LOG_ALLOWED, HOOK_CODES, INGRESS, LSM_FREE_FAMILIES, MAX_RULES, NET_CLASS_ANY4,
    NET_CLASS_ANY6, NET_CLASS_BIND, OWNER_ACTIVE_OPEN, PORTS_PER_PROTO, PORT_CLASS_ALL_ICMP,
    PORT_CLASS_ALL_OTHER, PORT_CLASS_ALL_TCP, PORT_CLASS_ALL_UDP, RULE_DEFAULT, RULE_KIND_ALLOW,
    RULE_KIND_AUDIT_DENY, RULE_KIND_DENY, RULE_LOG_FLAG, VERDICT_CODES,
};

use crate::{
    identity::{current_ancestor, Caller},
    maps::{
        Slot, Slot0, Slot1, ACTIVE, EVENTS, EVENT_RATE, HOOK_VERDICTS, OWNERS, REPLIES, RULE_HITS,
        SLOT_CONFIG, STATS,
    },
};

/// What a sock_addr program returns to let the call proceed.
pub const SOCK_ADDR_PROCEED: i32 = 1;
/// What a sock_addr program returns to fail the call with EPERM.
pub const SOCK_ADDR_REJECT: i32 = 0;

const IPPROTO_ICMP: u32 = 1;
const IPPROTO_TCP: u32 = 6;
const IPPROTO_UDP: u32 = 17;
const IPPROTO_ICMPV6: u32 = 58;

/// Where the caller wants to go, as judged: IPv4-mapped IPv6 is unmapped to IPv4.
pub struct Destination {
    /// 4 or 6.
    pub family: u8,
    /// Network byte order; IPv4 in the first four bytes.
    pub addr: [u8; 16],
    /// Host byte order.
    pub port: u16,
    pub proto: Proto,
}

impl Destination {
    /// From a sock_addr context's IPv4 fields (`user_ip4` and `user_port` hold network-order
    /// bytes).
    #[inline(always)]
    pub fn v4(user_ip4: u32, user_port: u32, protocol: u32) -> Destination {
        let ip = user_ip4.to_ne_bytes();
        let mut addr = [0u8; 16];
        addr[0] = ip[0];
        addr[1] = ip[1];
        addr[2] = ip[2];
        addr[3] = ip[3];
        Destination {
            family: 4,
            addr,
            port: u16::from_be(user_port as u16),
            proto: proto_of(protocol),
        }
    }

    /// From a sock_addr context's IPv6 fields; `::ffff:a.b.c.d` becomes IPv4 `a.b.c.d`.
    #[inline(always)]
    pub fn v6(user_ip6: [u32; 4], user_port: u32, protocol: u32) -> Destination {
        if user_ip6[0] == 0 && user_ip6[1] == 0 && user_ip6[2].to_ne_bytes() == [0, 0, 0xff, 0xff] {
            return Destination::v4(user_ip6[3], user_port, protocol);
        }
        let mut addr = [0u8; 16];
        let mut i = 0;
        while i < 4 {
            let w = user_ip6[i].to_ne_bytes();
            addr[i * 4] = w[0];
            addr[i * 4 + 1] = w[1];
            addr[i * 4 + 2] = w[2];
            addr[i * 4 + 3] = w[3];
            i += 1;
        }
        Destination {
            family: 6,
            addr,
            port: u16::from_be(user_port as u16),
            proto: proto_of(protocol),
        }
    }
}

impl Destination {
    /// The cache key of a verdict for this destination.
    #[inline(always)]
    pub fn cache_key(&self, generation: u64, dir: u8) -> CacheKey {
        CacheKey {
            generation,
            dir,
            family: self.family,
            proto: self.proto,
            port: self.port,
            addr: self.addr,
        }
    }

    /// The reply record key of this destination as a peer of socket `cookie`.
    #[inline(always)]
    pub fn reply_key(&self, cookie: u64) -> ReplyKey {
        ReplyKey {
            cookie,
            family: self.family,
            proto: self.proto as u8,
            port: self.port,
            _pad: 0,
            addr: self.addr,
        }
    }

    #[inline(always)]
    fn unspecified(&self) -> bool {
        let mut i = 0;
        while i < 16 {
            if self.addr[i] != 0 {
                return false;
            }
            i += 1;
        }
        self.port == 0
    }
}

/// What a `sendmsg` hook judges. A send without an address reaches the hook as `0.0.0.0:0` /
/// `[::]:0`: the kernel runs the hook for a *connected* UDP socket when the call carries a
/// control message (`IP_TOS`, `UDP_SEGMENT`, `IP_PKTINFO`, `IPV6_TCLASS`, ...), and sends to
/// the socket's connected peer — so that peer is what is judged, read from the socket itself
/// (`bpf_sock` `dst_ip4`/`dst_ip6`/`dst_port`: kernel state set only by `connect()`, which
/// the connect hooks judged; the caller cannot forge it). A socket that is not connected
/// (`dst_port` 0) keeps the unspecified address, which no rule allows.
#[inline(always)]
pub fn sendmsg_destination(ctx: &SockAddrContext, dst: Destination, v6: bool) -> Destination {
    if !dst.unspecified() {
        return dst;
    }
    // SAFETY: sk of a sock_addr context is a valid full socket (PTR_TO_SOCKET); its
    // dst_* fields are readable in sock_addr programs.
    unsafe {
        let sa = &*ctx.sock_addr;
        let sk = sa.__bindgen_anon_1.sk;
        let port = core::ptr::read_volatile(&(*sk).dst_port);
        if port == 0 {
            return dst;
        }
        if v6 {
            let ip6 = [
                core::ptr::read_volatile(&(*sk).dst_ip6[0]),
                core::ptr::read_volatile(&(*sk).dst_ip6[1]),
                core::ptr::read_volatile(&(*sk).dst_ip6[2]),
                core::ptr::read_volatile(&(*sk).dst_ip6[3]),
            ];
            Destination::v6(ip6, port as u32, sa.protocol)
        } else {
            let ip4 = core::ptr::read_volatile(&(*sk).dst_ip4);
            Destination::v4(ip4, port as u32, sa.protocol)
        }
    }
}

#[inline(always)]
fn proto_of(protocol: u32) -> Proto {
    match protocol {
        IPPROTO_TCP => Proto::Tcp,
        IPPROTO_UDP => Proto::Udp,
        IPPROTO_ICMP | IPPROTO_ICMPV6 => Proto::Icmp,
        _ => Proto::Other,
    }
}

#[inline(always)]
pub fn count(stat: Stat) {
    if let Some(p) = STATS.get_ptr_mut(stat as u32) {
        // SAFETY: per-CPU slot, no concurrent writer on this CPU.
        unsafe { *p += 1 };
    }
}

/// The slot programs use now; `None` (counted) when the policy is unreadable.
#[inline(always)]
pub fn active_slot() -> Option<u32> {
    match ACTIVE.get(0) {
        Some(active) => Some(active.slot),
        None => {
            count(Stat::NoPolicy);
            None
        }
    }
}

/// The configuration of slot `S`, if a generation was written there.
#[inline(always)]
pub fn slot_config<S: Slot>() -> Option<&'static SlotConfig> {
    match SLOT_CONFIG.get(S::INDEX) {
        Some(cfg) if cfg.generation != 0 => Some(cfg),
        _ => {
            count(Stat::NoPolicy);
            None
        }
    }
}

/// Judge one connect or send; returns what the sock_addr program must return.
#[inline(always)]
pub fn judge(ctx: &SockAddrContext, hook: Hook, dst: &Destination) -> i32 {
    match active_slot() {
        None => SOCK_ADDR_REJECT,
        Some(0) => judge_in::<Slot0>(ctx, hook, dst),
        Some(_) => judge_in::<Slot1>(ctx, hook, dst),
    }
}

/// Judge an explicit bind to a non-zero port (ports 0 pick an ephemeral port: clients).
#[inline(always)]
pub fn judge_bind(ctx: &SockAddrContext, hook: Hook, dst: &Destination) -> i32 {
    if dst.port == 0 {
        return SOCK_ADDR_PROCEED;
    }
    match active_slot() {
        None => SOCK_ADDR_REJECT,
        Some(0) => judge_bind_in::<Slot0>(ctx, hook, dst),
        Some(_) => judge_bind_in::<Slot1>(ctx, hook, dst),
    }
}

/// The socket storage of the socket behind a sock_addr context, created if absent.
#[inline(always)]
fn owner_of(ctx: &SockAddrContext) -> Option<&'static mut SocketOwner> {
    // SAFETY: sk of a sock_addr context is a valid full socket; the helper checks the rest.
    let ptr = unsafe {
        let sk = (*ctx.sock_addr).__bindgen_anon_1.sk;
        bpf_sk_storage_get(
            OWNERS.as_ptr(),
            sk.cast(),
            core::ptr::null_mut(),
            BPF_SK_STORAGE_GET_F_CREATE as u64,
        )
    } as *mut SocketOwner;
    // SAFETY: a non-null pointer from the helper points at this socket's storage.
    unsafe { ptr.as_mut() }
}

/// Remember who uses this socket, for the packet hooks.
/// `judged`: the egress verdict just made for a peer, stored as the socket's cached packet
/// verdict so that the packets of this call are not judged (and reported) a second time.
/// `active_open`: a TCP connect (or TCP Fast Open send): the socket is a client from now on.
#[inline(always)]
fn record_owner(
    ctx: &SockAddrContext,
    caller: &Caller,
    bound_port: u16,
    judged: Option<(&Destination, Verdict, u64)>,
    active_open: bool,
) {
    if let Some(owner) = owner_of(ctx) {
        owner.exe = caller.exe;
        owner.uid = caller.uid;
        owner.gid = caller.gid;
        // SAFETY: plain helper call.
        owner.cgroup_id = unsafe { bpf_get_current_cgroup_id() };
        if bound_port != 0 {
            owner.bound_port = bound_port;
        }
        if active_open {
            owner.flags |= OWNER_ACTIVE_OPEN;
        }
        match judged {
            Some((dst, verdict, generation)) => {
                owner.cache(&dst.cache_key(generation, CACHE_EGRESS), verdict as u8);
            }
            None => owner.cache_dir = 0,
        }
    }
}

/// The first probed decision entry whose mask meets the caller's identities, per kind.
#[derive(Clone, Copy)]
struct Hit {
    entry: u32,
    mask: IdentityMask,
}

#[derive(Clone, Copy)]
struct Hits {
    allow: Hit,
    deny: Hit,
    audit_deny: Hit,
}

const NO_HIT: Hit = Hit { entry: 0, mask: 0 };

#[inline(always)]
fn probe<S: Slot>(hits: &mut Hits, net_class: u32, port_class: u32, ids: IdentityMask) {
    if net_class == 0 || port_class == 0 {
        return;
    }
    let key = DecisionKey {
        net_class,
        port_class,
    };
    let Some(value) = S::decisions().get_ptr(key) else {
        return;
    };
    // SAFETY: the pointer comes from a successful lookup; the value is read, not kept.
    let value = unsafe { *value };
    if hits.allow.mask == 0 && value.allow & ids != 0 {
        hits.allow = Hit {
            entry: value.entry,
            mask: value.allow & ids,
        };
    }
    if hits.deny.mask == 0 && value.deny & ids != 0 {
        hits.deny = Hit {
            entry: value.entry,
            mask: value.deny & ids,
        };
    }
    if hits.audit_deny.mask == 0 && value.audit_deny & ids != 0 {
        hits.audit_deny = Hit {
            entry: value.entry,
            mask: value.audit_deny & ids,
        };
    }
}

/// Index of the lowest set bit (the mask is never zero here); no table, no loop.
#[inline(always)]
fn lowest_bit(mut m: u64) -> u32 {
    let mut n = 0;
    if m & 0xffff_ffff == 0 {
        n += 32;
        m >>= 32;
    }
    if m & 0xffff == 0 {
        n += 16;
        m >>= 16;
    }
    if m & 0xff == 0 {
        n += 8;
        m >>= 8;
    }
    if m & 0xf == 0 {
        n += 4;
        m >>= 4;
    }
    if m & 0x3 == 0 {
        n += 2;
        m >>= 2;
    }
    if m & 0x1 == 0 {
        n += 1;
    }
    n
}

#[inline(always)]
fn rule_of<S: Slot>(hit: Hit, kind: u32) -> u32 {
    let key = RuleOfKey {
        entry: hit.entry,
        identity: lowest_bit(hit.mask),
        kind,
        _pad: 0,
    };
    match S::rule_of().get_ptr(key) {
        // SAFETY: pointer from a successful lookup. The value may carry RULE_LOG_FLAG.
        Some(rule) => unsafe { *rule },
        None => {
            count(Stat::RuleUnknown);
            RULE_DEFAULT
        }
    }
}

/// The verdict for `ids` reaching (egress) or being reached from (ingress) `dst`; `None` when
/// no rule matched and `default_deny` is false.
#[inline(always)]
pub fn decide<S: Slot>(
    cfg: &SlotConfig,
    ids: IdentityMask,
    dst: &Destination,
    direction: u32,
    default_deny: bool,
) -> Option<(Verdict, u32)> {
    let (net_class, net_any) = if dst.family == 4 {
        let key = Key::new(32, [dst.addr[0], dst.addr[1], dst.addr[2], dst.addr[3]]);
        (S::net4().get(key).copied().unwrap_or(0), NET_CLASS_ANY4)
    } else {
        (
            S::net6().get(Key::new(128, dst.addr)).copied().unwrap_or(0),
            NET_CLASS_ANY6,
        )
    };
    let (port_class, port_all) = port_classes::<S>(dst);
    let (port_class, port_all) = (with_dir(port_class, direction), port_all | direction);

    let mut hits = Hits {
        allow: NO_HIT,
        deny: NO_HIT,
        audit_deny: NO_HIT,
    };
    probe::<S>(&mut hits, net_class, port_class, ids);
    probe::<S>(&mut hits, net_class, port_all, ids);
    probe::<S>(&mut hits, net_any, port_class, ids);
    probe::<S>(&mut hits, net_any, port_all, ids);
    verdict_of::<S>(cfg, ids, &hits, default_deny)
}

/// A port class with the direction bit, keeping "no class" as 0.
#[inline(always)]
fn with_dir(port_class: u32, direction: u32) -> u32 {
    if port_class == 0 {
        0
    } else {
        port_class | direction
    }
}

#[inline(always)]
fn port_classes<S: Slot>(dst: &Destination) -> (u32, u32) {
    match dst.proto {
        Proto::Tcp => (port_class_of::<S>(0, dst.port), PORT_CLASS_ALL_TCP),
        Proto::Udp => (port_class_of::<S>(1, dst.port), PORT_CLASS_ALL_UDP),
        Proto::Icmp => (0, PORT_CLASS_ALL_ICMP),
        Proto::Other => (0, PORT_CLASS_ALL_OTHER),
    }
}

/// Deny beats audit-deny beats allow; then the default.
#[inline(always)]
fn verdict_of<S: Slot>(
    cfg: &SlotConfig,
    ids: IdentityMask,
    hits: &Hits,
    default_deny: bool,
) -> Option<(Verdict, u32)> {
    let (verdict, rule) = if hits.deny.mask != 0 {
        (Verdict::Deny, rule_of::<S>(hits.deny, RULE_KIND_DENY))
    } else if hits.audit_deny.mask != 0 {
        (
            Verdict::Audit,
            rule_of::<S>(hits.audit_deny, RULE_KIND_AUDIT_DENY),
        )
    } else if hits.allow.mask != 0 {
        (Verdict::Allow, rule_of::<S>(hits.allow, RULE_KIND_ALLOW))
    } else if !default_deny {
        return None;
    } else {
        (default_verdict(cfg, ids), RULE_DEFAULT)
    };
    Some((global_mode(cfg, verdict), rule))
}

/// What nothing-matched means for `ids`: audit for processes that match only audit-mode
/// identities, deny otherwise.
#[inline(always)]
pub fn default_verdict(cfg: &SlotConfig, ids: IdentityMask) -> Verdict {
    if ids & cfg.enforce_identities == 0 && ids & cfg.audit_identities != 0 {
        Verdict::Audit
    } else {
        Verdict::Deny
    }
}

/// `ztd --mode audit` turns every deny into audit.
#[inline(always)]
pub fn global_mode(cfg: &SlotConfig, verdict: Verdict) -> Verdict {
    if verdict == Verdict::Deny && cfg.flags & FLAG_GLOBAL_AUDIT != 0 {
        Verdict::Audit
    } else {
        verdict
    }
}

/// Count a decision against its rule and the statistics.
#[inline(always)]
pub fn tally<S: Slot>(hook: Hook, verdict: Verdict, rule: u32) {
    if let Some(hits) = RULE_HITS.get_ptr_mut(S::INDEX * MAX_RULES + (rule % MAX_RULES)) {
        // SAFETY: per-CPU slot.
        unsafe { *hits += 1 };
    }
    count_verdict(hook, verdict);
}

/// Count a decision by verdict, overall and per hook.
#[inline(always)]
pub fn count_verdict(hook: Hook, verdict: Verdict) {
    match verdict {
        Verdict::Allow => count(Stat::Allowed),
        Verdict::Deny => count(Stat::Denied),
        Verdict::Audit => count(Stat::Audited),
    }
    let index = (hook as u32 % HOOK_CODES) * VERDICT_CODES + verdict as u32 % VERDICT_CODES;
    if let Some(n) = HOOK_VERDICTS.get_ptr_mut(index) {
        // SAFETY: per-CPU slot.
        unsafe { *n += 1 };
    }
}

#[inline(always)]
fn judge_in<S: Slot>(ctx: &SockAddrContext, hook: Hook, dst: &Destination) -> i32 {
    let Some(cfg) = slot_config::<S>() else {
        return SOCK_ADDR_REJECT;
    };
    let caller = Caller::current();
    caller.count_gaps();
    let ids = caller.identities::<S>(cfg, current_ancestor);
    let (mut verdict, mut rule) =
        decide::<S>(cfg, ids, dst, 0, true).unwrap_or((Verdict::Deny, RULE_DEFAULT));
    if rule == RULE_DEFAULT && verdict != Verdict::Allow {
        // A UDP server answering a peer that sent to this very socket first (within
        // REPLY_TTL_NS, in this generation) is not new egress. Nothing else a bound socket
        // sends is: a listening grant is not an egress grant.
        if let Some(reply) = recorded_reply(ctx, cfg.generation, dst) {
            (verdict, rule) = reply;
        }
    }
    let (rule, log) = split_rule(rule);
    tally::<S>(hook, verdict, rule);
    if verdict != Verdict::Allow || log || cfg.flags & FLAG_LOG_ALLOWED != 0 {
        emit(hook, verdict, rule, cfg, &caller, dst, &NO_LOCAL, true);
    }
    if verdict == Verdict::Deny {
        SOCK_ADDR_REJECT
    } else {
        let active_open =
            dst.proto == Proto::Tcp && matches!(hook, Hook::Connect4 | Hook::Connect6);
        record_owner(
            ctx,
            &caller,
            0,
            Some((dst, verdict, cfg.generation)),
            active_open,
        );
        SOCK_ADDR_PROCEED
    }
}

/// A rule-of value's rule id and whether the rule says `log = true`.
#[inline(always)]
pub fn split_rule(raw: u32) -> (u32, bool) {
    (raw & !RULE_LOG_FLAG, raw & RULE_LOG_FLAG != 0)
}

/// The local end of a decision, for events.
pub struct Local {
    pub addr: [u8; 16],
    pub port: u16,
}

/// No local end known (a connect before the socket is bound, a socket creation).
pub const NO_LOCAL: Local = Local {
    addr: [0; 16],
    port: 0,
};

/// If `dst` sent a datagram to this UDP socket first (a valid reply record), the verdict
/// for answering it: allowed by the ingress rule that admitted the datagram.
#[inline(always)]
fn recorded_reply(
    ctx: &SockAddrContext,
    generation: u64,
    dst: &Destination,
) -> Option<(Verdict, u32)> {
    if dst.proto != Proto::Udp {
        return None;
    }
    // SAFETY: a sock_addr context is a valid argument of the helper.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.sock_addr.cast()) };
    reply_recorded(cookie, generation, dst)
}

/// The rule of a valid reply record of socket `cookie` for peer `peer`, counted.
#[inline(always)]
pub fn reply_recorded(cookie: u64, generation: u64, peer: &Destination) -> Option<(Verdict, u32)> {
    let key = peer.reply_key(cookie);
    // SAFETY: pointer from a successful lookup; read, not kept.
    let record = unsafe { *REPLIES.get_ptr(key)? };
    // SAFETY: plain helper call.
    let now = unsafe { bpf_ktime_get_ns() };
    if !reply_valid(&record, generation, now) {
        return None;
    }
    count(Stat::ReplyAllowed);
    Some((Verdict::Allow, record.rule))
}

#[inline(always)]
fn judge_bind_in<S: Slot>(ctx: &SockAddrContext, hook: Hook, dst: &Destination) -> i32 {
    let Some(cfg) = slot_config::<S>() else {
        return SOCK_ADDR_REJECT;
    };
    let caller = Caller::current();
    caller.count_gaps();
    let ids = caller.identities::<S>(cfg, current_ancestor);
    let (port_class, port_all) = port_classes::<S>(dst);
    let mut hits = Hits {
        allow: NO_HIT,
        deny: NO_HIT,
        audit_deny: NO_HIT,
    };
    probe::<S>(
        &mut hits,
        NET_CLASS_BIND,
        with_dir(port_class, INGRESS),
        ids,
    );
    probe::<S>(&mut hits, NET_CLASS_BIND, port_all | INGRESS, ids);
    let (verdict, rule) =
        verdict_of::<S>(cfg, ids, &hits, true).unwrap_or((Verdict::Deny, RULE_DEFAULT));
    let (rule, log) = split_rule(rule);
    tally::<S>(hook, verdict, rule);
    if verdict != Verdict::Allow || log || cfg.flags & FLAG_LOG_ALLOWED != 0 {
        // A bind has no peer: the address is the local end.
        let no_peer = Destination {
            family: dst.family,
            addr: [0; 16],
            port: 0,
            proto: dst.proto,
        };
        let local = Local {
            addr: dst.addr,
            port: dst.port,
        };
        emit(hook, verdict, rule, cfg, &caller, &no_peer, &local, true);
    }
    if verdict == Verdict::Deny {
        SOCK_ADDR_REJECT
    } else {
        record_owner(ctx, &caller, dst.port, None, false);
        SOCK_ADDR_PROCEED
    }
}

#[inline(always)]
pub fn port_class_of<S: Slot>(proto_index: u32, port: u16) -> u32 {
    S::ports()
        .get(proto_index * PORTS_PER_PROTO + port as u32)
        .copied()
        .unwrap_or(0)
}

/// Send a decision event; a full ring costs the event (counted), never the verdict. Beyond
/// `EVENT_RATE_PER_SEC` events per second for one (identity, peer, hook, verdict), events are
/// suppressed (counted) and the next one sent carries how many were.
/// `in_task`: the current task is the caller (false in packet hooks, where whatever task
/// runs is unrelated: pid and comm are then left empty).
#[allow(clippy::too_many_arguments)]
#[inline(always)]
pub fn emit(
    hook: Hook,
    verdict: Verdict,
    rule: u32,
    cfg: &SlotConfig,
    caller: &Caller,
    dst: &Destination,
    local: &Local,
    in_task: bool,
) {
    // SAFETY: plain helper call.
    let ktime_ns = unsafe { bpf_ktime_get_ns() };
    // A bind has no peer: its flow is the local end it asked for.
    let bound;
    let flow = if dst.port == 0 && local.port != 0 {
        bound = Destination {
            family: dst.family,
            addr: local.addr,
            port: local.port,
            proto: dst.proto,
        };
        &bound
    } else {
        dst
    };
    let Some(suppressed) = rate_limit(hook, verdict, caller, flow, ktime_ns) else {
        count(Stat::EventSuppressed);
        return;
    };
    let Some(mut entry) = EVENTS.reserve::<DecisionEvent>(0) else {
        count(Stat::EventLost);
        return;
    };
    let pid_tgid = if in_task {
        bpf_get_current_pid_tgid()
    } else {
        0
    };
    let cgroup_id = if in_task {
        // SAFETY: plain helper call.
        unsafe { bpf_get_current_cgroup_id() }
    } else {
        caller.cgroup_id
    };
    entry.write(DecisionEvent {
        header: EventHeader {
            kind: EVENT_DECISION,
            version: EVENT_VERSION,
            _pad: 0,
            size: DecisionEvent::SIZE as u32,
        },
        hook: hook as u8,
        verdict: verdict as u8,
        proto: dst.proto as u8,
        family: dst.family,
        peer_port: dst.port,
        local_port: local.port,
        rule,
        suppressed,
        ktime_ns,
        generation: cfg.generation,
        pid: pid_tgid as u32,
        tgid: (pid_tgid >> 32) as u32,
        uid: caller.uid,
        gid: caller.gid,
        cgroup_id,
        exe: ExeKey {
            dev: caller.exe.dev,
            ino: caller.exe.ino,
        },
        peer_addr: dst.addr,
        local_addr: local.addr,
        comm: if in_task {
            bpf_get_current_comm().unwrap_or([0; 16])
        } else {
            [0; 16]
        },
    });
    entry.submit(0);
    count(Stat::EventSent);
    if let Some(fill) = STATS.get_ptr_mut(Stat::RingFill as u32) {
        // SAFETY: per-CPU slot; a gauge, overwritten.
        unsafe { *fill = EVENTS.query(BPF_RB_AVAIL_DATA as u64) };
    }
}

/// `Some(suppressed since the last event)` if this event may be sent now.
#[inline(always)]
fn rate_limit(
    hook: Hook,
    verdict: Verdict,
    caller: &Caller,
    dst: &Destination,
    now: u64,
) -> Option<u32> {
    let key = RateKey {
        exe: ExeKey {
            dev: caller.exe.dev,
            ino: caller.exe.ino,
        },
        uid: caller.uid,
        hook: hook as u8,
        verdict: verdict as u8,
        peer_port: dst.port,
        peer_addr: dst.addr,
    };
    match EVENT_RATE.get_ptr_mut(key) {
        Some(state) => {
            // SAFETY: pointer from a successful lookup; races between CPUs only blur the
            // per-key numbers, never the verdict (STATS counts exactly).
            let state = unsafe { &mut *state };
            if now.wrapping_sub(state.window_start_ns) >= 1_000_000_000 {
                state.window_start_ns = now;
                state.sent_in_window = 0;
            }
            if state.sent_in_window >= EVENT_RATE_PER_SEC {
                state.suppressed += 1;
                return None;
            }
            state.sent_in_window += 1;
            let suppressed = state.suppressed;
            state.suppressed = 0;
            Some(suppressed)
        }
        None => {
            let state = RateState {
                window_start_ns: now,
                sent_in_window: 1,
                suppressed: 0,
            };
            // A full LRU evicts its oldest key; a failed insert only costs rate limiting.
            let _ = EVENT_RATE.insert(key, state, 0);
            Some(0)
        }
    }
}

const SOCK_RAW: u32 = 3;
const SOCK_DGRAM: u32 = 2;
const AF_INET6: u32 = 10;

/// Judge the creation of a socket: raw and ICMP sockets need an identity that may have them.
/// Every socket's creator is recorded as its owner for the packet hooks.
#[inline(always)]
pub fn judge_sock_create(sk: *mut bpf_sock, family: u32, sock_type: u32, protocol: u32) -> i32 {
    // SAFETY: the context's socket is valid; the helper checks the rest.
    let owner = unsafe {
        bpf_sk_storage_get(
            OWNERS.as_ptr(),
            sk.cast(),
            core::ptr::null_mut(),
            BPF_SK_STORAGE_GET_F_CREATE as u64,
        )
    } as *mut SocketOwner;
    // SAFETY: a non-null pointer from the helper points at this socket's storage.
    if let Some(owner) = unsafe { owner.as_mut() } {
        let caller = Caller::current();
        owner.exe = caller.exe;
        owner.uid = caller.uid;
        owner.gid = caller.gid;
        // SAFETY: plain helper call.
        owner.cgroup_id = unsafe { bpf_get_current_cgroup_id() };
    }
    let icmp = protocol == IPPROTO_ICMP || protocol == IPPROTO_ICMPV6;
    if sock_type != SOCK_RAW && !(sock_type == SOCK_DGRAM && icmp) {
        return SOCK_ADDR_PROCEED;
    }
    match active_slot() {
        None => SOCK_ADDR_REJECT,
        Some(0) => judge_sock_create_in::<Slot0>(family, sock_type, icmp),
        Some(_) => judge_sock_create_in::<Slot1>(family, sock_type, icmp),
    }
}

#[inline(always)]
fn judge_sock_create_in<S: Slot>(family: u32, sock_type: u32, icmp: bool) -> i32 {
    let Some(cfg) = slot_config::<S>() else {
        return SOCK_ADDR_REJECT;
    };
    let caller = Caller::current();
    caller.count_gaps();
    let ids = caller.identities::<S>(cfg, current_ancestor);
    let allowed = if sock_type == SOCK_RAW {
        cfg.raw_identities
    } else {
        cfg.icmp_identities | cfg.raw_identities
    };
    let verdict = if ids & allowed != 0 {
        Verdict::Allow
    } else {
        global_mode(cfg, default_verdict(cfg, ids))
    };
    if verdict == Verdict::Allow {
        count_verdict(Hook::SockCreate, verdict);
    } else {
        tally::<S>(Hook::SockCreate, verdict, RULE_DEFAULT);
    }
    if verdict != Verdict::Allow || cfg.flags & FLAG_LOG_ALLOWED != 0 {
        let dst = Destination {
            family: if family == AF_INET6 { 6 } else { 4 },
            addr: [0; 16],
            port: 0,
            proto: if icmp { Proto::Icmp } else { Proto::Other },
        };
        emit(
            Hook::SockCreate,
            verdict,
            RULE_DEFAULT,
            cfg,
            &caller,
            &dst,
            &NO_LOCAL,
            true,
        );
    }
    if verdict == Verdict::Deny {
        SOCK_ADDR_REJECT
    } else {
        SOCK_ADDR_PROCEED
    }
}

/// Whether some ingress allow rule lets anyone listen on `port` of `dst.proto`.
#[inline(always)]
pub fn port_granted<S: Slot>(dst: &Destination) -> bool {
    let (port_class, port_all) = port_classes::<S>(dst);
    for class in [with_dir(port_class, INGRESS), port_all | INGRESS] {
        if class == 0 {
            continue;
        }
        let key = DecisionKey {
            net_class: NET_CLASS_BIND,
            port_class: class,
        };
        if let Some(v) = S::decisions().get_ptr(key) {
            // SAFETY: pointer from a successful lookup.
            if unsafe { (*v).allow } != 0 {
                return true;
            }
        }
    }
    false
}

/// `proto_of` for the packet parser.
#[inline(always)]
pub fn proto_from_ip(protocol: u8) -> Proto {
    proto_of(protocol as u32)
}

/// Which tasks the LSM `socket_create` hook judges; set by the loader.
#[unsafe(no_mangle)]
static LSM_SCOPE: LsmScope = LsmScope {
    cgroup_id: 0,
    level: 0,
    _pad: 0,
};

const EPERM: i32 = 1;

/// Judge the creation of a socket of address family `family` (the LSM hook): 0 lets it
/// proceed, `-EPERM` refuses it.
#[inline(always)]
pub fn judge_family(family: u32) -> i32 {
    if LSM_FREE_FAMILIES.contains(&family) {
        return 0;
    }
    // SAFETY: read_volatile of a plain static the loader rewrites in .rodata.
    let scope = unsafe { core::ptr::read_volatile(&LSM_SCOPE) };
    if scope.cgroup_id == 0 || current_ancestor(scope.level as i32) != scope.cgroup_id {
        return 0;
    }
    match active_slot() {
        None => -EPERM,
        Some(0) => judge_family_in::<Slot0>(family),
        Some(_) => judge_family_in::<Slot1>(family),
    }
}

#[inline(always)]
fn judge_family_in<S: Slot>(family: u32) -> i32 {
    let Some(cfg) = slot_config::<S>() else {
        return -EPERM;
    };
    let caller = Caller::current();
    caller.count_gaps();
    let ids = caller.identities::<S>(cfg, current_ancestor);
    let verdict = if ids & cfg.raw_identities != 0 {
        Verdict::Allow
    } else {
        global_mode(cfg, default_verdict(cfg, ids))
    };
    if verdict == Verdict::Allow {
        count_verdict(Hook::LsmSocketCreate, verdict);
    } else {
        tally::<S>(Hook::LsmSocketCreate, verdict, RULE_DEFAULT);
    }
    if verdict != Verdict::Allow || cfg.flags & FLAG_LOG_ALLOWED != 0 {
        // The event's `family` is the address family number itself (17: AF_PACKET).
        let dst = Destination {
            family: family as u8,
            addr: [0; 16],
            port: 0,
            proto: Proto::Other,
        };
        emit(
            Hook::LsmSocketCreate,
            verdict,
            RULE_DEFAULT,
            cfg,
            &caller,
            &dst,
            &NO_LOCAL,
            true,
        );
    }
    if verdict == Verdict::Deny {
        count(Stat::FamilyDenied);
        -EPERM
    } else {
        0
    }
}
