//! zt's kernel programs. Every hook file is a thin entry point that turns its context into a
//! [`decide::Destination`] and returns the verdict of [`decide::judge`]; all maps are declared
//! in [`maps`]. Three tracepoints (`sched_*`) keep the per-process executable record
//! decisions take the caller's `exe` identity from (see [`identity`]).
#![no_std]
#![no_main]

mod bind4;
mod bind6;
mod connect4;
mod connect6;
mod decide;
mod identity;
mod lsm_socket_create;
mod maps;
mod packet;
mod sched_exec;
mod sched_exit;
mod sched_fork;
mod sendmsg4;
mod sendmsg6;
mod skb_egress;
mod skb_ingress;
mod sock_create;
mod xdp;

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
