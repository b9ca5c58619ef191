//! `cgroup/sendmsg4`: unconnected UDP `sendto()`/`sendmsg()` with an address to IPv4 destinations
//! from sockets of the guarded cgroup, and sends on a connected socket that carry a control
//! message (judged by the socket's connected peer). A rejected call fails with EPERM.

use aya_ebpf::{macros::cgroup_sock_addr, programs::SockAddrContext};
use zt_common::Hook;

use crate::decide::{judge, sendmsg_destination, Destination};

#[cgroup_sock_addr(sendmsg4)]
pub fn sendmsg4(ctx: SockAddrContext) -> i32 {
    // SAFETY: the kernel hands every sock_addr program a valid context.
    let sa = unsafe { &*ctx.sock_addr };
    let dst = Destination::v4(sa.user_ip4, sa.user_port, sa.protocol);
    judge(&ctx, Hook::Sendmsg4, &sendmsg_destination(&ctx, dst, false))
}
