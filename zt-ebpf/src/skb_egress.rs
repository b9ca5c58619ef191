//! `cgroup_skb/egress`: the backstop. Every outbound packet of a guarded socket is judged by
//! the socket's owner against the egress rules, so a socket that escaped the sock_addr hooks
//! (connected before zt started, or used by another process than the one that connected it)
//! still cannot reach a peer its identity may not. Replies of sockets serving a bound port
//! pass (their flows were admitted inbound).

use aya_ebpf::{macros::cgroup_skb, programs::SkBuffContext};

use crate::packet::judge_packet;

#[cgroup_skb(egress)]
pub fn skb_egress(ctx: SkBuffContext) -> i32 {
    judge_packet(&ctx, false)
}
