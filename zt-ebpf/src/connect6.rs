//! `cgroup/connect6`: TCP and UDP `connect()` to IPv6 destinations
//! (IPv4-mapped IPv6 destinations arrive here and are judged as IPv4)
//! from sockets of the guarded cgroup. A rejected call fails with EPERM.

use aya_ebpf::{macros::cgroup_sock_addr, programs::SockAddrContext};
use zt_common::Hook;

use crate::decide::{judge, Destination};

#[cgroup_sock_addr(connect6)]
pub fn connect6(ctx: SockAddrContext) -> i32 {
    // SAFETY: the kernel hands every sock_addr program a valid context.
    let sa = unsafe { &*ctx.sock_addr };
    judge(
        &ctx,
        Hook::Connect6,
        &Destination::v6(sa.user_ip6, sa.user_port, sa.protocol),
    )
}
