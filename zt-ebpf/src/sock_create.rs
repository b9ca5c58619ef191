//! `cgroup/sock_create`: no escape by socket type. Raw sockets (`SOCK_RAW`, any protocol,
//! `IP_HDRINCL` users included) need an identity with `raw = true`; ICMP echo ("ping")
//! sockets need `raw = true` or a rule with `proto = "icmp"`. Refused creation fails with
//! EPERM. Every socket's creator is recorded as its owner for the packet hooks. (The kernel
//! runs this hook for AF_INET and AF_INET6 only: AF_PACKET is not seen.)

use aya_ebpf::{macros::cgroup_sock, programs::SockContext};

use crate::decide::judge_sock_create;

#[cgroup_sock(sock_create)]
pub fn sock_create(ctx: SockContext) -> i32 {
    // SAFETY: the kernel hands every cgroup sock program a valid socket.
    let sk = unsafe { &*ctx.sock };
    judge_sock_create(ctx.sock, sk.family, sk.type_, sk.protocol)
}
