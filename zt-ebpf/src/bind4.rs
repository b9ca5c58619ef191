//! `cgroup/bind4`: an explicit `bind()` of an IPv4 socket of the guarded cgroup to a
//! non-zero port succeeds only if an ingress allow rule grants that port to the caller's
//! identity (EPERM otherwise). Binds to port 0 (ephemeral ports: clients) always proceed.
//! An allowed bind records the socket's owner for the packet hooks.

use aya_ebpf::{macros::cgroup_sock_addr, programs::SockAddrContext};
use zt_common::Hook;

use crate::decide::{judge_bind, Destination};

#[cgroup_sock_addr(bind4)]
pub fn bind4(ctx: SockAddrContext) -> i32 {
    // SAFETY: the kernel hands every sock_addr program a valid context.
    let sa = unsafe { &*ctx.sock_addr };
    judge_bind(
        &ctx,
        Hook::Bind4,
        &Destination::v4(sa.user_ip4, sa.user_port, sa.protocol),
    )
}
