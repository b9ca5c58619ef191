//! `cgroup_skb/ingress`: inbound packets to sockets of the guarded cgroup. A socket bound to
//! an explicit port (a listener, a server) receives only from peers its owner's ingress rules
//! allow; client sockets receive replies freely, except from host-wide deny lists. Dropped
//! packets never reach the application.

use aya_ebpf::{macros::cgroup_skb, programs::SkBuffContext};

use crate::packet::judge_packet;

#[cgroup_skb(ingress)]
pub fn skb_ingress(ctx: SkBuffContext) -> i32 {
    judge_packet(&ctx, true)
}
