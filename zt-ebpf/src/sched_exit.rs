//! `tp_btf/sched_process_exit`: a task exits; the last one of its thread group takes the
//! process's executable record with it (see `identity`).

use aya_ebpf::{macros::btf_tracepoint, programs::BtfTracePointContext};

use crate::identity::record_exit;

#[btf_tracepoint(function = "sched_process_exit")]
pub fn sched_exit(_ctx: BtfTracePointContext) -> i32 {
    record_exit();
    0
}
