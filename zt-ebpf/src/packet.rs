//! The packet hooks' shared logic (`cgroup_skb` ingress and egress): parse the IP and port
//! headers, find the socket's owner in socket storage, and judge by the owner's identity —
//! with the verdict cached in the socket per (generation, direction, family, protocol, peer
//! address and port), so an established flow costs one storage lookup per packet and a new
//! generation re-judges it.
//!
//! A packet whose headers zt cannot parse to the end (more than `MAX_SKB_IPV6_EXT` IPv6
//! extension headers, a truncated header, a transport header other than the socket's TCP or
//! UDP) is dropped, counted ([`Stat::SkbUnparsedDropped`]) and reported: what zt cannot judge
//! it does not trust. A missing policy passes (the sock_addr, bind and sock_create hooks are
//! the authority and fail closed; these hooks are the backstop).
//!
//! **Serving sockets.** A socket bound to a port an ingress rule granted (`bound_port`)
//! receives only from peers its ingress rules allow. What it sends is a reply only when it
//! answers what it received: a TCP socket accepted by the listener (it inherited the
//! listener's storage and never opened a connection itself, [`OWNER_ACTIVE_OPEN`]), or a UDP
//! datagram to a peer that sent to this socket first (a `REPLIES` record written here on
//! ingress, valid for `REPLY_TTL_NS` in its generation). Anything else is judged by the
//! egress rules like any client's packet. SYN-ACKs leave from request sockets (not full
//! sockets) in answer to a SYN that this hook admitted on the listener: they pass.

use aya_ebpf::{
    helpers::generated::{
        bpf_get_socket_cookie, bpf_get_socket_uid, bpf_ktime_get_ns, bpf_sk_fullsock,
        bpf_sk_storage_get, bpf_skb_ancestor_cgroup_id,
    },
    programs::SkBuffContext,
};
use zt_common::{
    ExeKey, Hook, Proto, ReplyValue, SocketOwner, Stat, Verdict, CACHE_EGRESS, CACHE_INGRESS,
    INGRESS, MAX_SKB_IPV6_EXT, OWNER_ACTIVE_OPEN, REPLY_REFRESH_NS, RULE_DEFAULT,
};

use crate::{
    decide::{
        active_slot, count, decide, emit, global_mode, proto_from_ip, reply_recorded, slot_config,
        split_rule, tally, Destination, Local,
    },
    identity::Caller,
    maps::{Slot, Slot0, Slot1, OWNERS, REPLIES},
};

/// cgroup_skb: let the packet through.
pub const SKB_PASS: i32 = 1;
/// cgroup_skb: drop the packet (egress UDP senders see EPERM, TCP retransmits).
pub const SKB_DROP: i32 = 0;

const IPPROTO_HOPOPTS: u8 = 0;
const IPPROTO_TCP: u8 = 6;
const IPPROTO_UDP: u8 = 17;
const IPPROTO_ROUTING: u8 = 43;
const IPPROTO_FRAGMENT: u8 = 44;
const IPPROTO_AH: u8 = 51;
const IPPROTO_DSTOPTS: u8 = 60;

/// The headers the verdict needs.
struct Packet {
    family: u8,
    src: [u8; 16],
    dst: [u8; 16],
    proto: Proto,
    src_port: u16,
    dst_port: u16,
    /// Every header up to and including the ports was read: false for an IPv6 extension
    /// header chain longer than `MAX_SKB_IPV6_EXT`, a truncated header, or TCP/UDP without
    /// its ports (a fragment after the first).
    complete: bool,
}

#[inline(always)]
fn is_ipv6_ext(next: u8) -> bool {
    matches!(
        next,
        IPPROTO_HOPOPTS | IPPROTO_ROUTING | IPPROTO_FRAGMENT | IPPROTO_AH | IPPROTO_DSTOPTS
    )
}

/// Parse from the IP header on (cgroup_skb data starts there); `None` when not even the IP
/// header can be read.
#[inline(always)]
fn parse(ctx: &SkBuffContext) -> Option<Packet> {
    let first: u8 = ctx.load(0).ok()?;
    let (family, src, dst, l4_proto, mut l4_off, mut has_ports) = match first >> 4 {
        4 => {
            let h: [u8; 20] = ctx.load(0).ok()?;
            let ihl = ((h[0] & 0x0f) as usize) * 4;
            if ihl < 20 {
                return None;
            }
            let fragment_offset = (((h[6] & 0x1f) as u16) << 8) | h[7] as u16;
            let mut src = [0u8; 16];
            let mut dst = [0u8; 16];
            src[..4].copy_from_slice(&h[12..16]);
            dst[..4].copy_from_slice(&h[16..20]);
            (4u8, src, dst, h[9], ihl, fragment_offset == 0)
        }
        6 => {
            let h: [u8; 40] = ctx.load(0).ok()?;
            let mut src = [0u8; 16];
            let mut dst = [0u8; 16];
            src.copy_from_slice(&h[8..24]);
            dst.copy_from_slice(&h[24..40]);
            (6u8, src, dst, h[6], 40usize, true)
        }
        _ => return None,
    };
    let mut next = l4_proto;
    let mut complete = true;
    if family == 6 {
        // Follow extension headers (hop-by-hop, routing, fragment, AH, destination options).
        let mut n = 0;
        while n < MAX_SKB_IPV6_EXT {
            match next {
                IPPROTO_HOPOPTS | IPPROTO_ROUTING | IPPROTO_DSTOPTS => {
                    let Ok(e) = ctx.load::<[u8; 2]>(l4_off) else {
                        complete = false;
                        break;
                    };
                    next = e[0];
                    l4_off += (e[1] as usize + 1) * 8;
                }
                IPPROTO_AH => {
                    let Ok(e) = ctx.load::<[u8; 2]>(l4_off) else {
                        complete = false;
                        break;
                    };
                    next = e[0];
                    l4_off += (e[1] as usize + 2) * 4;
                }
                IPPROTO_FRAGMENT => {
                    let Ok(e) = ctx.load::<[u8; 4]>(l4_off) else {
                        complete = false;
                        break;
                    };
                    next = e[0];
                    if (((e[2] as u16) << 8) | e[3] as u16) >> 3 != 0 {
                        has_ports = false;
                    }
                    l4_off += 8;
                }
                _ => break,
            }
            n += 1;
        }
        if is_ipv6_ext(next) {
            complete = false;
        }
    }
    let (src_port, dst_port) = if complete && (next == IPPROTO_TCP || next == IPPROTO_UDP) {
        if !has_ports {
            complete = false;
            (0, 0)
        } else if let Ok(p) = ctx.load::<[u8; 4]>(l4_off) {
            (
                u16::from_be_bytes([p[0], p[1]]),
                u16::from_be_bytes([p[2], p[3]]),
            )
        } else {
            complete = false;
            (0, 0)
        }
    } else {
        (0, 0)
    };
    Some(Packet {
        family,
        src,
        dst,
        proto: proto_from_ip(next),
        src_port,
        dst_port,
        complete,
    })
}

/// Judge one packet of a guarded socket.
#[inline(always)]
pub fn judge_packet(ctx: &SkBuffContext, ingress: bool) -> i32 {
    let skb = ctx.skb.skb;
    // SAFETY: the context's skb is valid; sk may be null.
    let sk = unsafe { (*skb).__bindgen_anon_2.sk };
    if sk.is_null() {
        return SKB_PASS;
    }
    // SAFETY: helper call on a socket pointer from the context.
    let full = unsafe { bpf_sk_fullsock(sk) };
    if full.is_null() {
        return SKB_PASS;
    }
    let Some(mut pkt) = parse(ctx) else {
        // Not even an IP header: nothing to judge, nothing to trust.
        count(Stat::SkbUnparsed);
        count(Stat::SkbUnparsedDropped);
        return SKB_DROP;
    };
    // SAFETY: a full socket's protocol is readable.
    let sk_proto = unsafe { (*full).protocol };
    if (sk_proto == IPPROTO_TCP as u32 || sk_proto == IPPROTO_UDP as u32)
        && sk_proto != proto_number(pkt.proto)
    {
        // A TCP or UDP socket's packet whose transport header zt did not reach.
        pkt.complete = false;
    }
    // SAFETY: helper call on a full socket; null when the socket has no owner recorded.
    let owner = unsafe {
        bpf_sk_storage_get(OWNERS.as_ptr(), full.cast(), core::ptr::null_mut(), 0)
            as *mut SocketOwner
    };
    // SAFETY: non-null pointers from the helper point at this socket's storage.
    let owner = unsafe { owner.as_mut() };
    match active_slot() {
        None => SKB_PASS,
        Some(0) => judge_in::<Slot0>(ctx, &pkt, owner, ingress),
        Some(_) => judge_in::<Slot1>(ctx, &pkt, owner, ingress),
    }
}

#[inline(always)]
fn proto_number(proto: Proto) -> u32 {
    match proto {
        Proto::Tcp => IPPROTO_TCP as u32,
        Proto::Udp => IPPROTO_UDP as u32,
        _ => 0,
    }
}

/// Drop (or, in `--mode audit`, pass) a packet that was not parsed to the end; reported.
#[inline(always)]
fn unparsed<S: Slot>(
    cfg: &zt_common::SlotConfig,
    pkt: &Packet,
    owner: Option<&mut SocketOwner>,
    ingress: bool,
) -> i32 {
    let caller = match owner {
        Some(o) => Caller::from_owner(o),
        None => Caller::from_owner(&SocketOwner::default()),
    };
    let hook = if ingress {
        Hook::SkbIngress
    } else {
        Hook::SkbEgress
    };
    let verdict = global_mode(cfg, Verdict::Deny);
    tally::<S>(hook, verdict, RULE_DEFAULT);
    let (peer, local) = if ingress {
        (pkt.src, pkt.dst)
    } else {
        (pkt.dst, pkt.src)
    };
    let peer_end = Destination {
        family: pkt.family,
        addr: peer,
        port: 0,
        proto: pkt.proto,
    };
    let local = Local {
        addr: local,
        port: 0,
    };
    emit(
        hook,
        verdict,
        RULE_DEFAULT,
        cfg,
        &caller,
        &peer_end,
        &local,
        false,
    );
    if verdict == Verdict::Deny {
        count(Stat::SkbUnparsedDropped);
        SKB_DROP
    } else {
        SKB_PASS
    }
}

/// Remember that `peer` sent to the UDP socket of this packet, admitted by `rule` (`None`:
/// a cached verdict or no rule; the rule a record already holds is kept).
#[inline(always)]
fn record_reply(ctx: &SkBuffContext, generation: u64, peer: &Destination, rule: Option<u32>) {
    // SAFETY: helper calls on the context's skb.
    let (cookie, now) = unsafe {
        (
            bpf_get_socket_cookie(ctx.skb.skb.cast()),
            bpf_ktime_get_ns(),
        )
    };
    let key = peer.reply_key(cookie);
    let mut known = RULE_DEFAULT;
    if let Some(v) = REPLIES.get_ptr(key) {
        // SAFETY: pointer from a successful lookup; read only.
        let v = unsafe { *v };
        if v.generation == generation && now.wrapping_sub(v.seen_ns) < REPLY_REFRESH_NS {
            return;
        }
        if v.generation == generation {
            known = v.rule;
        }
    }
    let value = ReplyValue {
        seen_ns: now,
        generation,
        rule: rule.unwrap_or(known),
        _pad: 0,
    };
    if REPLIES.insert(key, value, 0).is_ok() {
        count(Stat::ReplyRecorded);
    }
}

/// A UDP datagram leaving a serving socket for a peer that sent to it first.
#[inline(always)]
fn is_recorded_reply(ctx: &SkBuffContext, generation: u64, peer: &Destination) -> bool {
    // SAFETY: helper call on the context's skb.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.skb.skb.cast()) };
    reply_recorded(cookie, generation, peer).is_some()
}

#[inline(always)]
fn judge_in<S: Slot>(
    ctx: &SkBuffContext,
    pkt: &Packet,
    owner: Option<&mut SocketOwner>,
    ingress: bool,
) -> i32 {
    let Some(cfg) = slot_config::<S>() else {
        return SKB_PASS;
    };
    if !pkt.complete {
        return unparsed::<S>(cfg, pkt, owner, ingress);
    }
    let (peer, peer_port, local_port) = if ingress {
        (pkt.src, pkt.src_port, pkt.dst_port)
    } else {
        (pkt.dst, pkt.dst_port, pkt.src_port)
    };
    // Rules name the peer's port for egress and the local port for ingress.
    let dst = Destination {
        family: pkt.family,
        addr: peer,
        port: if ingress { local_port } else { peer_port },
        proto: pkt.proto,
    };
    // The peer as a reply record names it (its own port).
    let peer_end = Destination {
        port: peer_port,
        ..dst
    };
    let serving = owner
        .as_ref()
        .is_some_and(|o| o.bound_port != 0 && o.bound_port == local_port);
    let unowned = owner.is_none();
    let skb = ctx.skb.skb;
    let ancestor = |level: i32| {
        // SAFETY: helper call on the context's skb.
        unsafe { bpf_skb_ancestor_cgroup_id(skb, level) }
    };

    let (caller, owner, default_deny) = if ingress {
        match owner {
            // A listener or server: only peers its ingress rules allow.
            Some(o) if serving => (Caller::from_owner(o), Some(o), true),
            // A client receiving replies: only host-wide deny lists apply (its owner, when
            // recorded, is who the events name).
            Some(o) => (Caller::from_owner(o), None, false),
            None => (Caller::from_owner(&SocketOwner::default()), None, false),
        }
    } else {
        match owner {
            // An accepted TCP connection (never opened by the socket itself): its peer was
            // admitted inbound, and a TCP socket sends only to its peer.
            Some(o) if serving && pkt.proto == Proto::Tcp && o.flags & OWNER_ACTIVE_OPEN == 0 => {
                return SKB_PASS;
            }
            // A UDP answer to a peer that sent to this socket first.
            _ if serving
                && pkt.proto == Proto::Udp
                && is_recorded_reply(ctx, cfg.generation, &peer_end) =>
            {
                return SKB_PASS;
            }
            Some(o) => (Caller::from_owner(o), Some(o), true),
            // No owner recorded: a socket from before zt, or accepted by a listener from
            // before zt. A TCP packet to a peer the ingress rules admit on its local port,
            // or a UDP answer to a recorded peer, passes; anything else is judged by the
            // socket's uid and cgroup (no executable, no gid).
            None => {
                // SAFETY: helper call on the context's skb.
                let uid = unsafe { bpf_get_socket_uid(skb) };
                let caller = Caller {
                    uid,
                    gid: u32::MAX,
                    exe: ExeKey::default(),
                    exe_ok: true,
                    cgroup_id: 0,
                };
                let reply = match pkt.proto {
                    Proto::Tcp => {
                        let ids = caller.identities::<S>(cfg, ancestor);
                        let admitted = Destination {
                            port: local_port,
                            ..dst
                        };
                        matches!(
                            decide::<S>(cfg, ids, &admitted, INGRESS, false),
                            Some((Verdict::Allow, _))
                        )
                    }
                    Proto::Udp => is_recorded_reply(ctx, cfg.generation, &peer_end),
                    _ => false,
                };
                if reply {
                    return SKB_PASS;
                }
                (caller, None, true)
            }
        }
    };

    // Datagrams admitted to a serving UDP socket are recorded for its answers; so are those
    // to a socket from before zt (no owner) on a port an ingress rule opens.
    let records = ingress
        && pkt.proto == Proto::Udp
        && (serving || (unowned && crate::decide::port_granted::<S>(&dst)));
    let direction = if ingress { CACHE_INGRESS } else { CACHE_EGRESS };
    let key = dst.cache_key(cfg.generation, direction);
    if let Some(o) = owner.as_ref() {
        if let Some(cached) = o.cached(&key) {
            if cached == Verdict::Deny as u8 {
                count(Stat::SkbDropped);
                return SKB_DROP;
            }
            if records {
                record_reply(ctx, cfg.generation, &peer_end, None);
            }
            return SKB_PASS;
        }
    }

    let ids = if ingress && !default_deny {
        1 // identity `any` only: a client socket
    } else {
        caller.identities::<S>(cfg, ancestor)
    };
    let dir_bit = if ingress { INGRESS } else { 0 };
    let (verdict, rule) = match decide::<S>(cfg, ids, &dst, dir_bit, default_deny) {
        Some(v) => v,
        None => {
            if records {
                record_reply(ctx, cfg.generation, &peer_end, None);
            }
            return SKB_PASS;
        }
    };
    if let Some(o) = owner {
        o.cache(&key, verdict as u8);
    }
    let (rule, log) = split_rule(rule);
    if records && verdict != Verdict::Deny {
        record_reply(ctx, cfg.generation, &peer_end, Some(rule));
    }
    let hook = if ingress {
        Hook::SkbIngress
    } else {
        Hook::SkbEgress
    };
    tally::<S>(hook, verdict, rule);
    if verdict != Verdict::Allow || log {
        // Events name the peer's own port; the local end is this host's.
        let local = Local {
            addr: if ingress { pkt.dst } else { pkt.src },
            port: local_port,
        };
        emit(hook, verdict, rule, cfg, &caller, &peer_end, &local, false);
    }
    if verdict == Verdict::Deny {
        count(Stat::SkbDropped);
        SKB_DROP
    } else {
        SKB_PASS
    }
}
