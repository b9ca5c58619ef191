//! The packet hooks' shared logic (`cgroup_skb` ingress and egress): parse the IP and port
//! headers, find the socket's owner in socket storage, and judge by the owner's identity —
//! with the verdict cached in the socket per (generation, direction, peer), so an established
//! flow costs one storage lookup per packet and a new generation re-judges it.
//!
//! Unreadable headers and a missing policy pass (counted): the sock_addr, bind and
//! sock_create hooks are the authority and fail closed; these hooks are the backstop.

use aya_ebpf::{
    helpers::generated::{
        bpf_get_socket_uid, bpf_sk_fullsock, bpf_sk_storage_get, bpf_skb_ancestor_cgroup_id,
    },
    programs::SkBuffContext,
};
use zt_common::{
    ExeKey, Hook, Proto, SocketOwner, Stat, Verdict, CACHE_EGRESS, CACHE_INGRESS, INGRESS,
};

use crate::{
    decide::{
        active_slot, count, decide, emit, port_granted, proto_from_ip, slot_config, split_rule,
        tally, Destination, Local,
    },
    identity::Caller,
    maps::{Slot, Slot0, Slot1, OWNERS},
};

/// cgroup_skb: let the packet through.
pub const SKB_PASS: i32 = 1;
/// cgroup_skb: drop the packet (egress UDP senders see EPERM, TCP retransmits).
pub const SKB_DROP: i32 = 0;

const IPPROTO_TCP: u8 = 6;
const IPPROTO_UDP: u8 = 17;

/// The headers the verdict needs.
struct Packet {
    family: u8,
    src: [u8; 16],
    dst: [u8; 16],
    proto: Proto,
    src_port: u16,
    dst_port: u16,
}

/// Parse from the IP header on (cgroup_skb data starts there).
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
    if family == 6 {
        // Skip extension headers (hop-by-hop, routing, destination options, fragment).
        for _ in 0..4 {
            match next {
                0 | 43 | 60 => {
                    let e: [u8; 2] = ctx.load(l4_off).ok()?;
                    next = e[0];
                    l4_off += (e[1] as usize + 1) * 8;
                }
                44 => {
                    let e: [u8; 4] = ctx.load(l4_off).ok()?;
                    next = e[0];
                    if (((e[2] as u16) << 8) | e[3] as u16) >> 3 != 0 {
                        has_ports = false;
                    }
                    l4_off += 8;
                }
                _ => break,
            }
        }
    }
    let (src_port, dst_port) = if has_ports && (next == IPPROTO_TCP || next == IPPROTO_UDP) {
        let p: [u8; 4] = ctx.load(l4_off).ok()?;
        (
            u16::from_be_bytes([p[0], p[1]]),
            u16::from_be_bytes([p[2], p[3]]),
        )
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
    let Some(pkt) = parse(ctx) else {
        count(Stat::SkbUnparsed);
        return SKB_PASS;
    };
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
fn judge_in<S: Slot>(
    ctx: &SkBuffContext,
    pkt: &Packet,
    owner: Option<&mut SocketOwner>,
    ingress: bool,
) -> i32 {
    let Some(cfg) = slot_config::<S>() else {
        return SKB_PASS;
    };
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
    let serving = owner
        .as_ref()
        .is_some_and(|o| o.bound_port != 0 && o.bound_port == local_port);
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
            // Replies of a socket serving its bound port: admitted inbound.
            _ if serving => return SKB_PASS,
            Some(o) => (Caller::from_owner(o), Some(o), true),
            // No owner recorded: a socket from before zt, or accepted by a listener that
            // policy opened. Replies from a granted port pass; anything else is judged by
            // the socket's uid and cgroup (no executable, no gid).
            None => {
                if port_granted::<S>(&Destination {
                    port: local_port,
                    ..dst
                }) {
                    return SKB_PASS;
                }
                // SAFETY: helper call on the context's skb.
                let uid = unsafe { bpf_get_socket_uid(skb) };
                let caller = Caller {
                    uid,
                    gid: u32::MAX,
                    exe: ExeKey::default(),
                    exe_ok: true,
                    cgroup_id: 0,
                };
                (caller, None, true)
            }
        }
    };

    let direction = if ingress { CACHE_INGRESS } else { CACHE_EGRESS };
    if let Some(o) = owner.as_ref() {
        if o.cache_generation == cfg.generation
            && o.cache_dir == direction
            && o.cache_port == dst.port
            && o.cache_peer == dst.addr
        {
            return if o.cache_verdict == Verdict::Deny as u8 {
                count(Stat::SkbDropped);
                SKB_DROP
            } else {
                SKB_PASS
            };
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
        None => return SKB_PASS,
    };
    if let Some(o) = owner {
        o.cache_generation = cfg.generation;
        o.cache_dir = direction;
        o.cache_port = dst.port;
        o.cache_peer = dst.addr;
        o.cache_verdict = verdict as u8;
    }
    let (rule, log) = split_rule(rule);
    let hook = if ingress {
        Hook::SkbIngress
    } else {
        Hook::SkbEgress
    };
    tally::<S>(hook, verdict, rule);
    if verdict != Verdict::Allow || log {
        // Events name the peer's own port; the local end is this host's.
        let peer_end = Destination {
            port: peer_port,
            ..dst
        };
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
