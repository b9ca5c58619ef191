//! `cgroup/sendmsg6`: unconnected UDP `sendto()`/`sendmsg()` with an address to IPv6 destinations
//! (IPv4-mapped IPv6 destinations arrive here and are judged as IPv4)
//! from sockets of the guarded cgroup, and sends on a connected socket that carry a control
//! message (judged by the socket's connected peer). A rejected call fails with EPERM.

use aya_ebpf::{macros::cgroup_sock_addr, programs::SockAddrContext};
use zt_common::Hook;

use crate::decide::{judge, sendmsg_destination, Destination};

#[cgroup_sock_addr(sendmsg6)]
pub fn sendmsg6(ctx: SockAddrContext) -> i32 {
    // SAFETY: the kernel hands every sock_addr program a valid context.
    let sa = unsafe { &*ctx.sock_addr };
    let dst = Destination::v6(sa.user_ip6, sa.user_port, sa.protocol);
    judge(&ctx, Hook::Sendmsg6, &sendmsg_destination(&ctx, dst, true))
}
