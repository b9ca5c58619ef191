//! `tp_btf/sched_process_exec`: a process now runs a new executable. Records the file the
//! kernel loaded (`bprm->file`) as the process's executable identity (see `identity`).

use aya_ebpf::{macros::btf_tracepoint, programs::BtfTracePointContext};

use crate::identity::record_exec;

#[btf_tracepoint(function = "sched_process_exec")]
pub fn sched_exec(ctx: BtfTracePointContext) -> i32 {
    // Arguments: (struct task_struct *p, pid_t old_pid, struct linux_binprm *bprm).
    let bprm: u64 = ctx.arg(2);
    record_exec(bprm);
    0
}
