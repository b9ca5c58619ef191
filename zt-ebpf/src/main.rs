//! zt's kernel programs. Every hook file is a thin entry point that turns its context into a
//! [`decide::Destination`] and returns the verdict of [`decide::judge`]; all maps are declared
//! in [`maps`].
#![no_std]
#![no_main]

mod bind4;
mod bind6;
mod connect4;
mod connect6;
mod decide;
mod identity;
mod maps;
mod packet;
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
