//! `tp_btf/sched_process_fork`: a new task. A new process inherits its creator's executable
//! record (see `identity`); a new thread shares it already.

use aya_ebpf::{macros::btf_tracepoint, programs::BtfTracePointContext};

use crate::identity::record_fork;

#[btf_tracepoint(function = "sched_process_fork")]
pub fn sched_fork(ctx: BtfTracePointContext) -> i32 {
    // Arguments: (struct task_struct *parent, struct task_struct *child).
    let child: u64 = ctx.arg(1);
    record_fork(child);
    0
}
