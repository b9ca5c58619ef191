//! The verdict: identity masks × (net class, port class) decisions, with a bounded number of
//! map lookups whatever the size of the policy. See zt-common's crate doc for the scheme.

use aya_ebpf::{
    helpers::{
        bpf_get_current_comm, bpf_get_current_pid_tgid,
        generated::{bpf_get_current_cgroup_id, bpf_ktime_get_ns},
    },
    maps::lpm_trie::Key,
};
use zt_common::{
    DecisionEvent, DecisionKey, ExeKey, Hook, IdentityMask, Proto, RuleOfKey, SlotConfig, Stat,
    Verdict, EVENT_DECISION, FLAG_GLOBAL_AUDIT, FLAG_LOG_ALLOWED, MAX_RULES, NET_CLASS_ANY4,
    NET_CLASS_ANY6, PORTS_PER_PROTO, PORT_CLASS_ALL_OTHER, PORT_CLASS_ALL_TCP, PORT_CLASS_ALL_UDP,
    RULE_DEFAULT, RULE_KIND_ALLOW, RULE_KIND_AUDIT_DENY, RULE_KIND_DENY,
};

use crate::{
    identity::Caller,
    maps::{Slot, Slot0, Slot1, ACTIVE, EVENTS, RULE_HITS, SLOT_CONFIG, STATS},
};

/// What a sock_addr program returns to let the call proceed.
pub const SOCK_ADDR_PROCEED: i32 = 1;
/// What a sock_addr program returns to fail the call with EPERM.
pub const SOCK_ADDR_REJECT: i32 = 0;

const IPPROTO_TCP: u32 = 6;
const IPPROTO_UDP: u32 = 17;

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

#[inline(always)]
fn proto_of(protocol: u32) -> Proto {
    match protocol {
        IPPROTO_TCP => Proto::Tcp,
        IPPROTO_UDP => Proto::Udp,
        _ => Proto::Other,
    }
}

#[inline(always)]
fn count(stat: Stat) {
    if let Some(p) = STATS.get_ptr_mut(stat as u32) {
        // SAFETY: per-CPU slot, no concurrent writer on this CPU.
        unsafe { *p += 1 };
    }
}

/// Judge one call; returns what the sock_addr program must return.
#[inline(always)]
pub fn judge(hook: Hook, dst: &Destination) -> i32 {
    let slot = match ACTIVE.get(0) {
        Some(active) => active.slot,
        None => {
            count(Stat::NoPolicy);
            return SOCK_ADDR_REJECT;
        }
    };
    if slot == 0 {
        judge_in::<Slot0>(hook, dst)
    } else {
        judge_in::<Slot1>(hook, dst)
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
        // SAFETY: pointer from a successful lookup.
        Some(rule) => unsafe { *rule },
        None => {
            count(Stat::RuleUnknown);
            RULE_DEFAULT
        }
    }
}

#[inline(always)]
fn judge_in<S: Slot>(hook: Hook, dst: &Destination) -> i32 {
    let Some(cfg) = SLOT_CONFIG.get(S::INDEX) else {
        count(Stat::NoPolicy);
        return SOCK_ADDR_REJECT;
    };
    if cfg.generation == 0 {
        count(Stat::NoPolicy);
        return SOCK_ADDR_REJECT;
    }
    let caller = Caller::current();
    if !caller.exe_ok {
        count(Stat::ExeUnreadable);
    }
    let ids = caller.identities::<S>(cfg);

    let (net_class, net_any) = if dst.family == 4 {
        let key = Key::new(32, [dst.addr[0], dst.addr[1], dst.addr[2], dst.addr[3]]);
        (S::net4().get(key).copied().unwrap_or(0), NET_CLASS_ANY4)
    } else {
        (
            S::net6().get(Key::new(128, dst.addr)).copied().unwrap_or(0),
            NET_CLASS_ANY6,
        )
    };
    let (port_class, port_all) = match dst.proto {
        Proto::Tcp => (port_class_of::<S>(0, dst.port), PORT_CLASS_ALL_TCP),
        Proto::Udp => (port_class_of::<S>(1, dst.port), PORT_CLASS_ALL_UDP),
        Proto::Other => (0, PORT_CLASS_ALL_OTHER),
    };

    let mut hits = Hits {
        allow: NO_HIT,
        deny: NO_HIT,
        audit_deny: NO_HIT,
    };
    probe::<S>(&mut hits, net_class, port_class, ids);
    probe::<S>(&mut hits, net_class, port_all, ids);
    probe::<S>(&mut hits, net_any, port_class, ids);
    probe::<S>(&mut hits, net_any, port_all, ids);

    let (mut verdict, rule) = if hits.deny.mask != 0 {
        (Verdict::Deny, rule_of::<S>(hits.deny, RULE_KIND_DENY))
    } else if hits.audit_deny.mask != 0 {
        (
            Verdict::Audit,
            rule_of::<S>(hits.audit_deny, RULE_KIND_AUDIT_DENY),
        )
    } else if hits.allow.mask != 0 {
        (Verdict::Allow, rule_of::<S>(hits.allow, RULE_KIND_ALLOW))
    } else if ids & cfg.enforce_identities == 0 && ids & cfg.audit_identities != 0 {
        (Verdict::Audit, RULE_DEFAULT)
    } else {
        (Verdict::Deny, RULE_DEFAULT)
    };
    if verdict == Verdict::Deny && cfg.flags & FLAG_GLOBAL_AUDIT != 0 {
        verdict = Verdict::Audit;
    }

    if let Some(hits) = RULE_HITS.get_ptr_mut(S::INDEX * MAX_RULES + (rule % MAX_RULES)) {
        // SAFETY: per-CPU slot.
        unsafe { *hits += 1 };
    }
    match verdict {
        Verdict::Allow => count(Stat::Allowed),
        Verdict::Deny => count(Stat::Denied),
        Verdict::Audit => count(Stat::Audited),
    }
    if verdict != Verdict::Allow || cfg.flags & FLAG_LOG_ALLOWED != 0 {
        emit(hook, verdict, rule, cfg, &caller, dst);
    }
    if verdict == Verdict::Deny {
        SOCK_ADDR_REJECT
    } else {
        SOCK_ADDR_PROCEED
    }
}

#[inline(always)]
fn port_class_of<S: Slot>(proto_index: u32, port: u16) -> u32 {
    S::ports()
        .get(proto_index * PORTS_PER_PROTO + port as u32)
        .copied()
        .unwrap_or(0)
}

/// Send a decision event; a full ring costs the event (counted), never the verdict.
#[inline(always)]
fn emit(
    hook: Hook,
    verdict: Verdict,
    rule: u32,
    cfg: &SlotConfig,
    caller: &Caller,
    dst: &Destination,
) {
    let Some(mut entry) = EVENTS.reserve::<DecisionEvent>(0) else {
        count(Stat::EventLost);
        return;
    };
    let pid_tgid = bpf_get_current_pid_tgid();
    // SAFETY: plain helper calls.
    let (ktime_ns, cgroup_id) = unsafe { (bpf_ktime_get_ns(), bpf_get_current_cgroup_id()) };
    entry.write(DecisionEvent {
        kind: EVENT_DECISION,
        hook: hook as u8,
        verdict: verdict as u8,
        proto: dst.proto as u8,
        family: dst.family,
        peer_port: dst.port,
        rule,
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
        comm: bpf_get_current_comm().unwrap_or([0; 16]),
    });
    entry.submit(0);
    count(Stat::EventSent);
}
