//! Who is calling: effective uid/gid, cgroup ancestry and the executable (device + inode) the
//! kernel loaded when the calling process last exec'd. comm and argv are never used for
//! decisions, and neither is `mm->exe_file`: an unprivileged process can point that at any
//! file it can open (`prctl(PR_SET_MM, PR_SET_MM_MAP)` from a user namespace), so the
//! executable is taken at exec time from `linux_binprm.file` ([`record_exec`]), carried to
//! new processes at fork ([`record_fork`]) and dropped when the thread group exits
//! ([`record_exit`]), in `EXEC_IDS`, keyed by tgid (threads share their process's record).
//!
//! A process zt never saw exec (already running when zt first started) has no record: no
//! `exe` identity matches it until it execs again (`Stat::NoExecRecord`).

use aya_ebpf::helpers::{
    bpf_get_current_pid_tgid, bpf_get_current_uid_gid, bpf_probe_read_kernel,
    generated::{bpf_get_current_ancestor_cgroup_id, bpf_get_current_task},
};
use zt_common::{
    ExeKey, IdentityMask, KernelOffsets, SlotConfig, SocketOwner, Stat, MAX_CGROUP_LEVEL,
};

use crate::{
    decide::count,
    maps::{Slot, EXEC_IDS},
};

/// Offsets of the kernel structures read here; set by the loader from the kernel's BTF.
#[unsafe(no_mangle)]
static KERNEL_OFFSETS: KernelOffsets = KernelOffsets {
    bprm_file: 0,
    file_f_inode: 0,
    inode_i_ino: 0,
    inode_i_sb: 0,
    sb_s_dev: 0,
    task_cred: 0,
    cred_euid: 0,
    cred_egid: 0,
    task_tgid: 0,
    task_signal: 0,
    signal_live: 0,
    _pad: 0,
};

#[inline(always)]
fn offsets() -> KernelOffsets {
    // SAFETY: read_volatile of a plain static the loader rewrites in .rodata.
    unsafe { core::ptr::read_volatile(&KERNEL_OFFSETS) }
}

/// The calling task, as far as decisions are concerned.
pub struct Caller {
    pub uid: u32,
    pub gid: u32,
    /// The executable of the caller's exec record; zero without one (no `exe` identity
    /// matches the zero key).
    pub exe: ExeKey,
    /// False when the credentials could not be read (counted by the caller; the caller is
    /// then judged by its real ids).
    pub exe_ok: bool,
    /// The owner's cgroup, for packet events (task events read the current one).
    pub cgroup_id: u64,
}

#[inline(always)]
unsafe fn read_ptr(base: u64, offset: u32) -> Result<u64, i32> {
    unsafe { bpf_probe_read_kernel((base + offset as u64) as *const u64) }
}

/// `file->f_inode->{i_ino, i_sb->s_dev}`.
#[inline(always)]
fn exe_of_file(off: &KernelOffsets, file: u64) -> Result<ExeKey, i32> {
    if file == 0 {
        return Err(-1);
    }
    // SAFETY: every dereference goes through bpf_probe_read_kernel, which checks the address.
    unsafe {
        let inode = read_ptr(file, off.file_f_inode)?;
        let ino = read_ptr(inode, off.inode_i_ino)?;
        let sb = read_ptr(inode, off.inode_i_sb)?;
        let dev: u32 = bpf_probe_read_kernel((sb + off.sb_s_dev as u64) as *const u32)?;
        Ok(ExeKey {
            dev: dev as u64,
            ino,
        })
    }
}

#[inline(always)]
fn current_tgid() -> u32 {
    (bpf_get_current_pid_tgid() >> 32) as u32
}

/// `sched_process_exec`: the current process now runs `bprm->file`. Its record is replaced;
/// if the new one cannot be stored, the old one is removed (no record is safe, a stale one
/// is not).
#[inline(always)]
pub fn record_exec(bprm: u64) {
    let off = offsets();
    let tgid = current_tgid();
    // SAFETY: read through bpf_probe_read_kernel.
    let file = unsafe { read_ptr(bprm, off.bprm_file) };
    let stored = match file.and_then(|file| exe_of_file(&off, file)) {
        Ok(exe) => EXEC_IDS.insert(tgid, exe, 0).is_ok(),
        Err(_) => false,
    };
    if !stored {
        let _ = EXEC_IDS.remove(tgid);
        count(Stat::ExecRecordFailed);
    }
}

/// `sched_process_fork`: a new process (not a thread: threads share their tgid's record)
/// runs what its creator runs, `CLONE_VM` children included. The child's key is always
/// written or removed, so a record left by an earlier process with the same tgid is never
/// inherited.
#[inline(always)]
pub fn record_fork(child: u64) {
    let off = offsets();
    let parent = current_tgid();
    // SAFETY: read through bpf_probe_read_kernel.
    let Ok(child_tgid) =
        (unsafe { bpf_probe_read_kernel((child + off.task_tgid as u64) as *const i32) })
    else {
        count(Stat::ExecRecordFailed);
        return;
    };
    let child_tgid = child_tgid as u32;
    if child_tgid == parent {
        return;
    }
    // SAFETY: the value is copied out before any other map operation.
    let inherited = unsafe { EXEC_IDS.get(parent) }.copied();
    match inherited {
        Some(exe) => {
            if EXEC_IDS.insert(child_tgid, exe, 0).is_err() {
                let _ = EXEC_IDS.remove(child_tgid);
                count(Stat::ExecRecordFailed);
            }
        }
        None => {
            let _ = EXEC_IDS.remove(child_tgid);
        }
    }
}

/// `sched_process_exit`: once the last thread of the group exits (`signal->live` reached 0,
/// decremented before this tracepoint), the process's record goes.
#[inline(always)]
pub fn record_exit() {
    let off = offsets();
    // SAFETY: every dereference goes through bpf_probe_read_kernel.
    let live = unsafe {
        read_ptr(bpf_get_current_task(), off.task_signal).and_then(|signal| {
            bpf_probe_read_kernel((signal + off.signal_live as u64) as *const i32)
        })
    };
    // Unreadable: remove anyway (fail closed: threads still running lose the exe identity
    // until the process execs again; a stale record would be worse).
    if live.map_or(true, |live| live == 0) {
        let _ = EXEC_IDS.remove(current_tgid());
    }
}

/// The effective uid and gid of the current task (`task->cred->{euid, egid}`).
#[inline(always)]
fn current_effective_ids() -> Result<(u32, u32), i32> {
    let off = offsets();
    // SAFETY: every dereference goes through bpf_probe_read_kernel.
    unsafe {
        let cred = read_ptr(bpf_get_current_task(), off.task_cred)?;
        let euid: u32 = bpf_probe_read_kernel((cred + off.cred_euid as u64) as *const u32)?;
        let egid: u32 = bpf_probe_read_kernel((cred + off.cred_egid as u64) as *const u32)?;
        Ok((euid, egid))
    }
}

impl Caller {
    #[inline(always)]
    pub fn current() -> Caller {
        // SAFETY: the value is copied out at once.
        let exe = match unsafe { EXEC_IDS.get(current_tgid()) } {
            Some(exe) => *exe,
            None => ExeKey::default(),
        };
        // Fall back to the real ids (a helper that cannot fail) if cred is unreadable.
        let (uid, gid, ids_ok) = match current_effective_ids() {
            Ok((uid, gid)) => (uid, gid, true),
            Err(_) => {
                let uid_gid = bpf_get_current_uid_gid();
                (uid_gid as u32, (uid_gid >> 32) as u32, false)
            }
        };
        Caller {
            uid,
            gid,
            exe,
            exe_ok: ids_ok,
            cgroup_id: 0,
        }
    }

    /// Count what this caller lacks (unreadable credentials, no exec record).
    #[inline(always)]
    pub fn count_gaps(&self) {
        if !self.exe_ok {
            count(Stat::ExeUnreadable);
        }
        if self.exe.dev == 0 && self.exe.ino == 0 {
            count(Stat::NoExecRecord);
        }
    }

    /// The owner recorded for a socket.
    #[inline(always)]
    pub fn from_owner(owner: &SocketOwner) -> Caller {
        Caller {
            uid: owner.uid,
            gid: owner.gid,
            exe: owner.exe,
            exe_ok: true,
            cgroup_id: owner.cgroup_id,
        }
    }
    /// The identities of the slot `S` this caller matches (bit `ANY_IDENTITY_BIT` always,
    /// through the wildcards). `ancestor(level)` gives the id of the caller's cgroup
    /// ancestor at `level` (0 when deeper than the cgroup): the current task's for calls, the
    /// socket's for packets.
    #[inline(always)]
    pub fn identities<S: Slot>(
        &self,
        cfg: &SlotConfig,
        ancestor: impl Fn(i32) -> u64,
    ) -> IdentityMask {
        let exe = lookup(S::exes().get_ptr(self.exe)) | cfg.exe_wildcard;
        let uid = lookup(S::uids().get_ptr(self.uid)) | cfg.uid_wildcard;
        let gid = lookup(S::gids().get_ptr(self.gid)) | cfg.gid_wildcard;
        let mut cgroup = cfg.cgroup_wildcard;
        if cfg.cgroup_levels != 0 {
            let mut level = 1;
            while level < MAX_CGROUP_LEVEL {
                if cfg.cgroup_levels & (1 << level) != 0 {
                    let id = ancestor(level as i32);
                    if id == 0 {
                        break;
                    }
                    cgroup |= lookup(S::cgroups().get_ptr(id));
                }
                level += 1;
            }
        }
        exe & uid & gid & cgroup
    }
}

#[inline(always)]
fn lookup(ptr: Option<*const IdentityMask>) -> IdentityMask {
    match ptr {
        // SAFETY: the pointer comes from a successful map lookup.
        Some(p) => unsafe { *p },
        None => 0,
    }
}

/// The current task's cgroup ancestor at `level`.
#[inline(always)]
pub fn current_ancestor(level: i32) -> u64 {
    // SAFETY: plain helper call.
    unsafe { bpf_get_current_ancestor_cgroup_id(level) }
}
