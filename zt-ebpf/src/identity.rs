//! Who is calling: effective uid/gid, cgroup ancestry and the executable (device + inode) of
//! the current task, as the kernel reports them. comm and argv are never used for decisions.

use aya_ebpf::helpers::{
    bpf_get_current_uid_gid, bpf_probe_read_kernel,
    generated::{bpf_get_current_ancestor_cgroup_id, bpf_get_current_task},
};
use zt_common::{ExeKey, IdentityMask, KernelOffsets, SlotConfig, SocketOwner, MAX_CGROUP_LEVEL};

use crate::maps::Slot;

/// Offsets of the kernel structures on the exe path; set by the loader from the kernel's BTF.
#[unsafe(no_mangle)]
static KERNEL_OFFSETS: KernelOffsets = KernelOffsets {
    task_mm: 0,
    mm_exe_file: 0,
    file_f_inode: 0,
    inode_i_ino: 0,
    inode_i_sb: 0,
    sb_s_dev: 0,
    task_cred: 0,
    cred_euid: 0,
    cred_egid: 0,
    _pad: 0,
};

/// The calling task, as far as decisions are concerned.
pub struct Caller {
    pub uid: u32,
    pub gid: u32,
    pub exe: ExeKey,
    /// False when the executable or the credentials could not be read (counted by the
    /// caller; the caller is then judged as "no executable" / real ids).
    pub exe_ok: bool,
    /// The owner's cgroup, for packet events (task events read the current one).
    pub cgroup_id: u64,
}

#[inline(always)]
unsafe fn read_ptr(base: u64, offset: u32) -> Result<u64, i32> {
    unsafe { bpf_probe_read_kernel((base + offset as u64) as *const u64) }
}

/// The executable of the current task: `task->mm->exe_file->f_inode->{i_ino, i_sb->s_dev}`.
/// Kernel threads (no mm) have none and get the zero key.
#[inline(always)]
fn current_exe() -> Result<ExeKey, i32> {
    // SAFETY: read_volatile of a plain static the loader rewrites in .rodata.
    let off = unsafe { core::ptr::read_volatile(&KERNEL_OFFSETS) };
    // SAFETY: every dereference goes through bpf_probe_read_kernel, which checks the address.
    unsafe {
        let task = bpf_get_current_task();
        let mm = read_ptr(task, off.task_mm)?;
        if mm == 0 {
            return Ok(ExeKey::default());
        }
        let file = read_ptr(mm, off.mm_exe_file)?;
        if file == 0 {
            return Ok(ExeKey::default());
        }
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

/// The effective uid and gid of the current task (`task->cred->{euid, egid}`).
#[inline(always)]
fn current_effective_ids() -> Result<(u32, u32), i32> {
    // SAFETY: as in current_exe.
    let off = unsafe { core::ptr::read_volatile(&KERNEL_OFFSETS) };
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
        let (exe, exe_ok) = match current_exe() {
            Ok(exe) => (exe, true),
            Err(_) => (ExeKey::default(), false),
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
            exe_ok: exe_ok && ids_ok,
            cgroup_id: 0,
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
