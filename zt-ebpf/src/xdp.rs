//! `xdp`: the front door. Attached to the interfaces given with `ztd --xdp IFACE`, it drops,
//! before the network stack, inbound packets that no ingress rule could allow:
//!
//! 1. **Deny lists.** The source address is classed by the slot's `NET4`/`NET6` tries (and
//!    `NET_CLASS_ANY4/6`), the destination port by `PORTS` (and `PORT_CLASS_ALL_<proto>`),
//!    and the four `(net class, port class | INGRESS)` entries are probed as `decide.rs`
//!    does. Bit 0 (`identity = "any"`) of `deny` set → dropped ([`XdpStat::DroppedDenyList`]);
//!    of `audit_deny` → passed, counted [`XdpStat::Audited`]. This also applies to replies to
//!    our own egress flows: a host-wide deny of a source is a deny of everything it sends
//!    to those ports, as the `cgroup_skb` ingress hook judges client sockets too.
//! 2. **Closed ports.** TCP/UDP to a destination port that no ingress allow rule opens for
//!    anyone — no `(NET_CLASS_BIND, port class | INGRESS)` or `(NET_CLASS_BIND,
//!    PORT_CLASS_ALL_<proto> | INGRESS)` entry with a non-zero `allow` — is dropped
//!    ([`XdpStat::DroppedClosedPort`]), **except** destination ports in the slot's
//!    `[ephemeral_low, ephemeral_high]`: replies to our own egress connections, which the
//!    `cgroup_skb` ingress hook judges per socket. When the policy can audit (`ztd --mode
//!    audit`, or any identity of an audit-mode file, whose default deny is an audit), a closed
//!    port is counted as audited and passed: a process of an audit file may listen anywhere.
//!
//! Everything else passes to the stack, where the cgroup hooks (`bind`, `cgroup_skb`) are
//! the authority: the front door is an early-drop optimisation, never the only guard. It
//! works per interface, for every process of the host (guarded or not, packet sockets too):
//! ports that unguarded services must receive need ingress rules (e.g. DHCP's udp/68).
//! 3. **Unparsed.** An IPv6 packet whose extension header chain the parser cannot follow to
//!    the transport header — more than [`MAX_IPV6_EXT`] extension headers, or a transport
//!    header deeper than [`MAX_L4_OFFSET`] bytes into the frame — has an unknown destination
//!    port, so it could target any port an ingress rule opens (or an ephemeral one): it is
//!    dropped ([`XdpStat::DroppedUnparsed`]) whatever the policy, except that a policy that
//!    can audit passes it counted as audited (as a closed port). The `cgroup_skb` hooks
//!    drop such packets too (they follow up to `MAX_SKB_IPV6_EXT` headers).
//!
//! ICMP/ICMPv6, non-IP frames (ARP), IP protocols without ports, fragments after the first
//! and more than two VLAN tags pass unjudged ([`XdpStat::PassedNotJudged`]). No readable
//! policy (no active slot, generation 0) passes too ([`XdpStat::NoPolicy`]).
//!
//! **Parsing.** Every read is bounds-checked against `data_end` and against the IP packet's
//! own length; a truncated or inconsistent header (Ethernet, VLAN, IPv4 with IHL < 5 or a
//! total length that is too short or longer than the frame, IPv6 payload length longer than
//! the frame, an extension header running past the packet, a TCP header shorter than 20
//! bytes or with a bad data offset, a UDP header shorter than 8 bytes or with a bad length)
//! is dropped ([`XdpStat::DroppedMalformed`]): the stack would drop it too, and it is never
//! judged on misread fields. A first fragment must carry the whole TCP/UDP header.
//!
//! **Counters and events.** Counters are per CPU and per receiving interface (`XDP_STATS`,
//! keyed by ifindex). Drops and audits are reported as `DecisionEvent`s (hook `xdp`, peer =
//! the source address, port = the destination port, no task) through a per-CPU token bucket
//! ([`EVENT_INTERVAL_NS`], [`EVENT_BURST`]): at most `EVENT_BURST` events at once and one per
//! interval after that, per CPU; the rest are counted ([`XdpStat::EventSkipped`]). A full
//! ring costs the event ([`XdpStat::EventLost`]), never the verdict.

use aya_ebpf::{
    bindings::{xdp_action, BPF_NOEXIST},
    helpers::generated::bpf_ktime_get_ns,
    macros::xdp,
    maps::lpm_trie::Key,
    programs::XdpContext,
};
use zt_common::{
    DecisionEvent, DecisionKey, EventHeader, ExeKey, Hook, Proto, RuleOfKey, SlotConfig, Verdict,
    XdpStat, ANY_IDENTITY_BIT, EVENT_DECISION, EVENT_VERSION, FLAG_GLOBAL_AUDIT, INGRESS,
    MAX_RULES, NET_CLASS_ANY4, NET_CLASS_ANY6, NET_CLASS_BIND, PORTS_PER_PROTO, PORT_CLASS_ALL_TCP,
    PORT_CLASS_ALL_UDP, RULE_DEFAULT, RULE_KIND_AUDIT_DENY, RULE_KIND_DENY, RULE_LOG_FLAG,
    XDP_STAT_COUNT,
};

use crate::maps::{
    Slot, Slot0, Slot1, ACTIVE, EVENTS, RULE_HITS, SLOT_CONFIG, XDP_EVENT_BUCKET, XDP_STATS,
};

const ETH_HLEN: usize = 14;
const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86dd;
const ETH_P_8021Q: u16 = 0x8100;
const ETH_P_8021AD: u16 = 0x88a8;
/// VLAN tags parsed (802.1Q and 802.1ad, e.g. QinQ); a third tag passes unjudged.
const MAX_VLAN_TAGS: usize = 2;

const IPPROTO_HOPOPTS: u8 = 0;
const IPPROTO_TCP: u8 = 6;
const IPPROTO_UDP: u8 = 17;
const IPPROTO_ROUTING: u8 = 43;
const IPPROTO_FRAGMENT: u8 = 44;
const IPPROTO_AH: u8 = 51;
const IPPROTO_DSTOPTS: u8 = 60;

/// IPv6 extension headers followed before the transport header.
pub const MAX_IPV6_EXT: usize = 6;
/// Deepest transport header offset (from the start of the frame) the parser follows.
pub const MAX_L4_OFFSET: usize = 512;

/// Event sampling: one token per this many nanoseconds per CPU (100 events/s) ...
pub const EVENT_INTERVAL_NS: u64 = 10_000_000;
/// ... and at most this many tokens saved up (a burst).
pub const EVENT_BURST: u64 = 32;

type Counters = [u64; XDP_STAT_COUNT as usize];

/// This interface's counters on this CPU (null when the counter map is full: then nothing
/// is counted, and the verdict is the same).
struct Stats(*mut Counters);

impl Stats {
    #[inline(always)]
    fn of(ifindex: u32) -> Stats {
        if let Some(p) = XDP_STATS.get_ptr_mut(ifindex) {
            return Stats(p);
        }
        let zeros: Counters = [0; XDP_STAT_COUNT as usize];
        let _ = XDP_STATS.insert(ifindex, zeros, BPF_NOEXIST as u64);
        Stats(XDP_STATS.get_ptr_mut(ifindex).unwrap_or_default())
    }

    #[inline(always)]
    fn count(&self, stat: XdpStat) {
        if !self.0.is_null() {
            // SAFETY: a per-CPU map value of this CPU; the index is a constant below
            // XDP_STAT_COUNT.
            unsafe { (*self.0)[stat as usize] += 1 };
        }
    }
}

/// What the verdict needs from a packet.
struct Packet {
    /// 4 or 6 (IPv4-mapped IPv6 sources are judged as IPv4, as destinations are on egress).
    family: u8,
    /// Source address, network order; IPv4 in the first four bytes.
    src: [u8; 16],
    /// Destination port, host order.
    dport: u16,
    /// TCP or UDP.
    proto: Proto,
}

enum Parsed {
    Judge(Packet),
    NotJudged,
    Malformed,
    /// An IPv6 extension header chain not followed to its end: family 6 and the source.
    Unparsed([u8; 16]),
}

/// `N` bytes at `off` from the start of the frame, if they lie within both the frame
/// (`data_end`, for the verifier) and `limit` (the end of the IP packet).
#[inline(always)]
fn bytes<const N: usize>(ctx: &XdpContext, off: usize, limit: usize) -> Option<&[u8; N]> {
    if off + N > limit {
        return None;
    }
    let start = ctx.data();
    if start + off + N > ctx.data_end() {
        return None;
    }
    // SAFETY: the N bytes at start + off are inside the packet (checked just above).
    Some(unsafe { &*((start + off) as *const [u8; N]) })
}

#[inline(always)]
fn be16(hi: u8, lo: u8) -> u16 {
    u16::from_be_bytes([hi, lo])
}

/// The frame's length, for the logical (scalar) checks. Read through volatile loads so that
/// LLVM cannot relate it to the pointers of [`bytes`] and fold the packet bound checks the
/// verifier needs (pointer against `data_end`) into scalar comparisons against this length.
#[inline(always)]
fn frame_len(ctx: &XdpContext) -> usize {
    // SAFETY: the context is valid for the whole program run.
    let (start, end) = unsafe {
        (
            core::ptr::read_volatile(&(*ctx.ctx).data),
            core::ptr::read_volatile(&(*ctx.ctx).data_end),
        )
    };
    end.wrapping_sub(start) as usize
}

#[inline(always)]
fn parse(ctx: &XdpContext) -> Parsed {
    let frame = frame_len(ctx);
    let Some(eth) = bytes::<ETH_HLEN>(ctx, 0, frame) else {
        return Parsed::Malformed;
    };
    let mut ethertype = be16(eth[12], eth[13]);
    let mut l3 = ETH_HLEN;
    let mut tags = 0;
    while tags < MAX_VLAN_TAGS {
        if ethertype != ETH_P_8021Q && ethertype != ETH_P_8021AD {
            break;
        }
        // TCI (2 bytes), then the encapsulated ethertype.
        let Some(tag) = bytes::<4>(ctx, l3, frame) else {
            return Parsed::Malformed;
        };
        ethertype = be16(tag[2], tag[3]);
        l3 += 4;
        tags += 1;
    }
    match ethertype {
        ETH_P_IP => parse_ipv4(ctx, l3, frame),
        ETH_P_IPV6 => parse_ipv6(ctx, l3, frame),
        _ => Parsed::NotJudged,
    }
}

#[inline(always)]
fn parse_ipv4(ctx: &XdpContext, l3: usize, frame: usize) -> Parsed {
    let Some(h) = bytes::<20>(ctx, l3, frame) else {
        return Parsed::Malformed;
    };
    if h[0] >> 4 != 4 {
        return Parsed::Malformed;
    }
    let ihl = ((h[0] & 0x0f) as usize) * 4;
    if ihl < 20 {
        return Parsed::Malformed;
    }
    let total = be16(h[2], h[3]) as usize;
    if total < ihl || l3 + total > frame {
        return Parsed::Malformed;
    }
    // Fragments after the first carry no ports.
    if be16(h[6], h[7]) & 0x1fff != 0 {
        return Parsed::NotJudged;
    }
    let mut src = [0u8; 16];
    src[0] = h[12];
    src[1] = h[13];
    src[2] = h[14];
    src[3] = h[15];
    let proto = h[9];
    parse_l4(ctx, 4, src, proto, l3 + ihl, l3 + total)
}

#[inline(always)]
fn is_ipv6_ext(next: u8) -> bool {
    matches!(
        next,
        IPPROTO_HOPOPTS | IPPROTO_ROUTING | IPPROTO_FRAGMENT | IPPROTO_AH | IPPROTO_DSTOPTS
    )
}

#[inline(always)]
fn parse_ipv6(ctx: &XdpContext, l3: usize, frame: usize) -> Parsed {
    let Some(h) = bytes::<40>(ctx, l3, frame) else {
        return Parsed::Malformed;
    };
    if h[0] >> 4 != 6 {
        return Parsed::Malformed;
    }
    let end = l3 + 40 + be16(h[4], h[5]) as usize;
    if end > frame {
        return Parsed::Malformed;
    }
    let mut src = [0u8; 16];
    let mut i = 0;
    while i < 16 {
        src[i] = h[8 + i];
        i += 1;
    }
    let mut next = h[6];
    let mut off = l3 + 40;
    let mut n = 0;
    while n < MAX_IPV6_EXT {
        match next {
            IPPROTO_HOPOPTS | IPPROTO_ROUTING | IPPROTO_DSTOPTS => {
                let Some(e) = bytes::<2>(ctx, off, end) else {
                    return Parsed::Malformed;
                };
                next = e[0];
                off += (e[1] as usize + 1) * 8;
            }
            IPPROTO_AH => {
                let Some(e) = bytes::<2>(ctx, off, end) else {
                    return Parsed::Malformed;
                };
                next = e[0];
                off += (e[1] as usize + 2) * 4;
            }
            IPPROTO_FRAGMENT => {
                let Some(e) = bytes::<8>(ctx, off, end) else {
                    return Parsed::Malformed;
                };
                if be16(e[2], e[3]) >> 3 != 0 {
                    return Parsed::NotJudged;
                }
                next = e[0];
                off += 8;
            }
            _ => break,
        }
        if off > end {
            return Parsed::Malformed;
        }
        if off > MAX_L4_OFFSET {
            return Parsed::Unparsed(src);
        }
        n += 1;
    }
    if is_ipv6_ext(next) {
        return Parsed::Unparsed(src);
    }
    // ::ffff:a.b.c.d is judged as a.b.c.d.
    let mapped = src[0] == 0
        && src[1] == 0
        && src[2] == 0
        && src[3] == 0
        && src[4] == 0
        && src[5] == 0
        && src[6] == 0
        && src[7] == 0
        && src[8] == 0
        && src[9] == 0
        && src[10] == 0xff
        && src[11] == 0xff;
    if mapped {
        let mut v4 = [0u8; 16];
        v4[0] = src[12];
        v4[1] = src[13];
        v4[2] = src[14];
        v4[3] = src[15];
        return parse_l4(ctx, 4, v4, next, off, end);
    }
    parse_l4(ctx, 6, src, next, off, end)
}

#[inline(always)]
fn parse_l4(
    ctx: &XdpContext,
    family: u8,
    src: [u8; 16],
    proto: u8,
    l4: usize,
    end: usize,
) -> Parsed {
    let (dport, proto) = match proto {
        IPPROTO_TCP => {
            let Some(t) = bytes::<20>(ctx, l4, end) else {
                return Parsed::Malformed;
            };
            let data_offset = ((t[12] >> 4) as usize) * 4;
            if data_offset < 20 || l4 + data_offset > end {
                return Parsed::Malformed;
            }
            (be16(t[2], t[3]), Proto::Tcp)
        }
        IPPROTO_UDP => {
            let Some(u) = bytes::<8>(ctx, l4, end) else {
                return Parsed::Malformed;
            };
            let len = be16(u[4], u[5]) as usize;
            if len < 8 || l4 + len > end {
                return Parsed::Malformed;
            }
            (be16(u[2], u[3]), Proto::Udp)
        }
        _ => return Parsed::NotJudged,
    };
    Parsed::Judge(Packet {
        family,
        src,
        dport,
        proto,
    })
}

/// The program (object name `xdp_front`: a function named like its ELF section `xdp` does
/// not link).
#[xdp]
pub fn xdp_front(ctx: XdpContext) -> u32 {
    let stats = Stats::of(ctx.ingress_ifindex() as u32);
    let pkt = match parse(&ctx) {
        Parsed::Judge(pkt) => pkt,
        Parsed::NotJudged => {
            stats.count(XdpStat::PassedNotJudged);
            return xdp_action::XDP_PASS;
        }
        Parsed::Malformed => {
            stats.count(XdpStat::DroppedMalformed);
            return xdp_action::XDP_DROP;
        }
        Parsed::Unparsed(src) => {
            let pkt = Packet {
                family: 6,
                src,
                dport: 0,
                proto: Proto::Other,
            };
            return match ACTIVE.get(0) {
                None => {
                    stats.count(XdpStat::NoPolicy);
                    xdp_action::XDP_PASS
                }
                Some(active) if active.slot == 0 => unparsed::<Slot0>(&pkt, &stats),
                Some(_) => unparsed::<Slot1>(&pkt, &stats),
            };
        }
    };
    match ACTIVE.get(0) {
        None => {
            stats.count(XdpStat::NoPolicy);
            xdp_action::XDP_PASS
        }
        Some(active) if active.slot == 0 => judge_in::<Slot0>(&pkt, &stats),
        Some(_) => judge_in::<Slot1>(&pkt, &stats),
    }
}

/// The decision entry at `(net_class, port_class)`, as (deny, audit_deny, allow, entry).
#[inline(always)]
fn entry<S: Slot>(net_class: u32, port_class: u32) -> Option<(u64, u64, u64, u32)> {
    if net_class == 0 || port_class == 0 {
        return None;
    }
    let key = DecisionKey {
        net_class,
        port_class,
    };
    let v = S::decisions().get_ptr(key)?;
    // SAFETY: pointer from a successful lookup; read, not kept.
    let v = unsafe { *v };
    Some((v.deny, v.audit_deny, v.allow, v.entry))
}

const ANY: u64 = 1 << ANY_IDENTITY_BIT;

/// First probed entry denying (and audit-denying) identity `any`.
#[derive(Clone, Copy)]
struct DenyHits {
    deny: Option<u32>,
    audit: Option<u32>,
}

#[inline(always)]
fn probe<S: Slot>(hits: &mut DenyHits, net_class: u32, port_class: u32) {
    if let Some((deny, audit_deny, _, entry)) = entry::<S>(net_class, port_class) {
        if hits.deny.is_none() && deny & ANY != 0 {
            hits.deny = Some(entry);
        }
        if hits.audit.is_none() && audit_deny & ANY != 0 {
            hits.audit = Some(entry);
        }
    }
}

/// Some ingress allow rule opens this port (class) for some identity, whatever the peer.
#[inline(always)]
fn port_open<S: Slot>(port_class: u32, port_all: u32) -> bool {
    if let Some((_, _, allow, _)) = entry::<S>(NET_CLASS_BIND, port_class) {
        if allow != 0 {
            return true;
        }
    }
    matches!(entry::<S>(NET_CLASS_BIND, port_all), Some((_, _, allow, _)) if allow != 0)
}

#[inline(always)]
fn rule_of<S: Slot>(entry: u32, kind: u32) -> u32 {
    let key = RuleOfKey {
        entry,
        identity: ANY_IDENTITY_BIT,
        kind,
        _pad: 0,
    };
    match S::rule_of().get_ptr(key) {
        // SAFETY: pointer from a successful lookup.
        Some(rule) => unsafe { *rule & !RULE_LOG_FLAG },
        None => RULE_DEFAULT,
    }
}

#[inline(always)]
fn hit_rule<S: Slot>(rule: u32) {
    if let Some(hits) = RULE_HITS.get_ptr_mut(S::INDEX * MAX_RULES + (rule % MAX_RULES)) {
        // SAFETY: per-CPU slot.
        unsafe { *hits += 1 };
    }
}

#[inline(always)]
fn judge_in<S: Slot>(pkt: &Packet, stats: &Stats) -> u32 {
    let Some(cfg) = SLOT_CONFIG.get(S::INDEX) else {
        stats.count(XdpStat::NoPolicy);
        return xdp_action::XDP_PASS;
    };
    if cfg.generation == 0 {
        stats.count(XdpStat::NoPolicy);
        return xdp_action::XDP_PASS;
    }

    let (net_class, net_any) = if pkt.family == 4 {
        let key = Key::new(32, [pkt.src[0], pkt.src[1], pkt.src[2], pkt.src[3]]);
        (S::net4().get(key).copied().unwrap_or(0), NET_CLASS_ANY4)
    } else {
        (
            S::net6().get(Key::new(128, pkt.src)).copied().unwrap_or(0),
            NET_CLASS_ANY6,
        )
    };
    let (proto_index, port_all) = if pkt.proto == Proto::Tcp {
        (0, PORT_CLASS_ALL_TCP | INGRESS)
    } else {
        (1, PORT_CLASS_ALL_UDP | INGRESS)
    };
    let port_class = S::ports()
        .get(proto_index * PORTS_PER_PROTO + pkt.dport as u32)
        .copied()
        .unwrap_or(0);
    let port_class = if port_class == 0 {
        0
    } else {
        port_class | INGRESS
    };

    let mut hits = DenyHits {
        deny: None,
        audit: None,
    };
    probe::<S>(&mut hits, net_class, port_class);
    probe::<S>(&mut hits, net_class, port_all);
    probe::<S>(&mut hits, net_any, port_class);
    probe::<S>(&mut hits, net_any, port_all);

    let global_audit = cfg.flags & FLAG_GLOBAL_AUDIT != 0;
    let mut audited = None;
    if let Some(entry) = hits.deny {
        let rule = rule_of::<S>(entry, RULE_KIND_DENY);
        hit_rule::<S>(rule);
        if !global_audit {
            stats.count(XdpStat::DroppedDenyList);
            report(Verdict::Deny, rule, cfg, pkt, stats);
            return xdp_action::XDP_DROP;
        }
        audited = Some(rule);
    } else if let Some(entry) = hits.audit {
        let rule = rule_of::<S>(entry, RULE_KIND_AUDIT_DENY);
        hit_rule::<S>(rule);
        audited = Some(rule);
    }

    let ephemeral =
        cfg.ephemeral_low != 0 && pkt.dport >= cfg.ephemeral_low && pkt.dport <= cfg.ephemeral_high;
    if !ephemeral && !port_open::<S>(port_class, port_all) {
        if !global_audit && cfg.audit_identities == 0 {
            stats.count(XdpStat::DroppedClosedPort);
            report(Verdict::Deny, RULE_DEFAULT, cfg, pkt, stats);
            return xdp_action::XDP_DROP;
        }
        if audited.is_none() {
            audited = Some(RULE_DEFAULT);
        }
    }

    match audited {
        Some(rule) => {
            stats.count(XdpStat::Audited);
            report(Verdict::Audit, rule, cfg, pkt, stats);
        }
        None => stats.count(XdpStat::Passed),
    }
    xdp_action::XDP_PASS
}

/// A packet whose destination port is unknown: dropped unless the policy can audit.
#[inline(always)]
fn unparsed<S: Slot>(pkt: &Packet, stats: &Stats) -> u32 {
    let Some(cfg) = SLOT_CONFIG.get(S::INDEX) else {
        stats.count(XdpStat::NoPolicy);
        return xdp_action::XDP_PASS;
    };
    if cfg.generation == 0 {
        stats.count(XdpStat::NoPolicy);
        return xdp_action::XDP_PASS;
    }
    if cfg.flags & FLAG_GLOBAL_AUDIT == 0 && cfg.audit_identities == 0 {
        stats.count(XdpStat::DroppedUnparsed);
        report(Verdict::Deny, RULE_DEFAULT, cfg, pkt, stats);
        return xdp_action::XDP_DROP;
    }
    stats.count(XdpStat::Audited);
    report(Verdict::Audit, RULE_DEFAULT, cfg, pkt, stats);
    xdp_action::XDP_PASS
}

/// Send a sampled event: a per-CPU token bucket decides; a full ring costs the event.
#[inline(always)]
fn report(verdict: Verdict, rule: u32, cfg: &SlotConfig, pkt: &Packet, stats: &Stats) {
    // SAFETY: plain helper call.
    let now = unsafe { bpf_ktime_get_ns() };
    let Some(bucket) = XDP_EVENT_BUCKET.get_ptr_mut(0) else {
        return;
    };
    // SAFETY: this CPU's bucket; programs do not migrate between CPUs while running.
    let bucket = unsafe { &mut *bucket };
    let cap = EVENT_BURST * EVENT_INTERVAL_NS;
    let elapsed = now.wrapping_sub(bucket.last_ns);
    let credit = if elapsed >= cap || bucket.credit_ns >= cap - elapsed {
        cap
    } else {
        bucket.credit_ns + elapsed
    };
    bucket.last_ns = now;
    if credit < EVENT_INTERVAL_NS {
        bucket.credit_ns = credit;
        stats.count(XdpStat::EventSkipped);
        return;
    }
    bucket.credit_ns = credit - EVENT_INTERVAL_NS;

    let Some(mut entry) = EVENTS.reserve::<DecisionEvent>(0) else {
        stats.count(XdpStat::EventLost);
        return;
    };
    entry.write(DecisionEvent {
        header: EventHeader {
            kind: EVENT_DECISION,
            version: EVENT_VERSION,
            _pad: 0,
            size: DecisionEvent::SIZE as u32,
        },
        hook: Hook::Xdp as u8,
        verdict: verdict as u8,
        proto: pkt.proto as u8,
        family: pkt.family,
        peer_port: 0,
        local_port: pkt.dport,
        rule,
        suppressed: 0,
        ktime_ns: now,
        generation: cfg.generation,
        pid: 0,
        tgid: 0,
        uid: 0,
        gid: 0,
        cgroup_id: 0,
        exe: ExeKey::default(),
        peer_addr: pkt.src,
        local_addr: [0; 16],
        comm: [0; 16],
    });
    entry.submit(0);
    stats.count(XdpStat::EventSent);
}
