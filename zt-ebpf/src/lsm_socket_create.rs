//! BPF LSM `socket_create`: no escape by address family. The cgroup `sock_create` hook sees
//! inet and inet6 sockets only; an `AF_PACKET` (or `AF_XDP`, `AF_VSOCK`, ...) socket would
//! reach the network below every cgroup hook. This hook refuses, with EPERM, sockets of any
//! family but unix, inet, inet6 and netlink to processes of the guarded cgroup subtree
//! unless their identity has `raw = true`. It runs for every task on the host (LSM hooks are
//! global), so it judges only tasks whose cgroup ancestry holds the guarded cgroup.
//! Loaded only where the kernel has BPF LSM (`bpf` in `/sys/kernel/security/lsm`); elsewhere
//! ztd runs without it and `ztctl status` says so.

use aya_ebpf::{macros::lsm, programs::LsmContext};

use crate::decide::judge_family;

#[lsm(hook = "socket_create")]
pub fn lsm_socket_create(ctx: LsmContext) -> i32 {
    // socket_create(int family, int type, int protocol, int kern), then the previous BPF
    // LSM program's return value.
    let family: i32 = ctx.arg(0);
    let kern: i32 = ctx.arg(3);
    let previous: i32 = ctx.arg(4);
    if previous != 0 {
        return previous;
    }
    // Sockets the kernel makes for itself are no process's.
    if kern != 0 {
        return 0;
    }
    judge_family(family as u32)
}
