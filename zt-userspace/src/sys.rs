//! The few kernel interfaces aya 0.14 does not expose: `BPF_LINK_UPDATE` (replace a pinned
//! link's program in place, no detach window), `BPF_PROG_QUERY` (what the kernel says is
//! attached to a cgroup), and `BPF_OBJ_GET`; plus finding the cgroup2 and bpffs mounts.

use std::{
    ffi::CString,
    io,
    os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd},
    os::unix::ffi::OsStrExt,
    path::{Path, PathBuf},
};

const BPF_OBJ_GET: libc::c_long = 7;
const BPF_PROG_QUERY: libc::c_long = 16;
const BPF_LINK_UPDATE: libc::c_long = 29;
const BPF_LINK_DETACH: libc::c_long = 34;

/// `union bpf_attr` is at most this big for the commands used here; zero-filled.
#[repr(C, align(8))]
struct Attr([u8; 128]);

impl Attr {
    fn new() -> Attr {
        Attr([0; 128])
    }
    fn put_u32(&mut self, off: usize, v: u32) {
        self.0[off..off + 4].copy_from_slice(&v.to_ne_bytes());
    }
    fn put_u64(&mut self, off: usize, v: u64) {
        self.0[off..off + 8].copy_from_slice(&v.to_ne_bytes());
    }
    fn get_u32(&self, off: usize) -> u32 {
        u32::from_ne_bytes([
            self.0[off],
            self.0[off + 1],
            self.0[off + 2],
            self.0[off + 3],
        ])
    }
}

fn bpf(cmd: libc::c_long, attr: &mut Attr) -> io::Result<libc::c_long> {
    // SAFETY: attr is a valid, zero-initialised bpf_attr of sufficient size.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            attr as *mut Attr as *mut libc::c_void,
            std::mem::size_of::<Attr>() as libc::c_uint,
        )
    };
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

/// Open a pinned BPF object (link, map or program).
pub fn obj_get(path: &Path) -> io::Result<OwnedFd> {
    let c = CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "path contains NUL"))?;
    let mut attr = Attr::new();
    attr.put_u64(0, c.as_ptr() as u64);
    let fd = bpf(BPF_OBJ_GET, &mut attr)?;
    // SAFETY: the kernel returned a new file descriptor that we now own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// Atomically replace the program of a link (`bpf_link_update`): the hook is never empty.
pub fn link_update(link: BorrowedFd<'_>, new_prog: BorrowedFd<'_>) -> io::Result<()> {
    let mut attr = Attr::new();
    attr.put_u32(0, link.as_raw_fd() as u32);
    attr.put_u32(4, new_prog.as_raw_fd() as u32);
    bpf(BPF_LINK_UPDATE, &mut attr).map(|_| ())
}

/// Detach a link from its hook now, whoever else still holds it (`BPF_LINK_DETACH`).
/// Unpinning alone detaches only when the last reference goes, which the kernel finishes
/// asynchronously.
pub fn link_detach(link: BorrowedFd<'_>) -> io::Result<()> {
    let mut attr = Attr::new();
    attr.put_u32(0, link.as_raw_fd() as u32);
    bpf(BPF_LINK_DETACH, &mut attr).map(|_| ())
}

/// Ids of the programs the kernel runs for `attach_type` on the cgroup `target` (effective
/// only for that cgroup itself, not inherited from ancestors).
pub fn prog_query(target: BorrowedFd<'_>, attach_type: u32) -> io::Result<Vec<u32>> {
    let mut ids = vec![0u32; 64];
    let mut attr = Attr::new();
    attr.put_u32(0, target.as_raw_fd() as u32); // target_fd
    attr.put_u32(4, attach_type); // attach_type
    attr.put_u64(16, ids.as_mut_ptr() as u64); // prog_ids
    attr.put_u32(24, ids.len() as u32); // prog_cnt
    bpf(BPF_PROG_QUERY, &mut attr)?;
    let count = attr.get_u32(24) as usize;
    ids.truncate(count.min(64));
    Ok(ids)
}

/// Open a directory (cgroup) read-only, as the attach and query calls want it.
pub fn open_dir(path: &Path) -> io::Result<OwnedFd> {
    Ok(std::fs::File::open(path)?.into())
}

/// Borrow helper for `&OwnedFd`-like values.
pub fn borrow<F: AsFd>(f: &F) -> BorrowedFd<'_> {
    f.as_fd()
}

/// Mount points of the given filesystem type, from `/proc/self/mountinfo`.
fn mounts_of(fstype: &str) -> io::Result<Vec<PathBuf>> {
    let text = std::fs::read_to_string("/proc/self/mountinfo")?;
    Ok(text
        .lines()
        .filter_map(|line| {
            let (left, right) = line.split_once(" - ")?;
            let fs = right.split_whitespace().next()?;
            let mount_point = left.split_whitespace().nth(4)?;
            (fs == fstype).then(|| PathBuf::from(unescape_mount(mount_point)))
        })
        .collect())
}

/// mountinfo escapes space, tab, newline and backslash as octal.
fn unescape_mount(s: &str) -> String {
    s.replace("\\040", " ")
        .replace("\\011", "\t")
        .replace("\\012", "\n")
        .replace("\\134", "\\")
}

/// The cgroup2 mount point (e.g. `/sys/fs/cgroup`, or `/sys/fs/cgroup/unified` in hybrid
/// layouts).
pub fn cgroup2_root() -> io::Result<PathBuf> {
    mounts_of("cgroup2")?.into_iter().next().ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::NotFound,
            "no cgroup2 filesystem is mounted (zt needs the unified cgroup hierarchy)",
        )
    })
}

/// Make sure `dir` is on a bpffs, mounting one at `/sys/fs/bpf` if none is there.
pub fn ensure_bpffs(dir: &Path) -> io::Result<()> {
    let bpf_mounts = mounts_of("bpf")?;
    let covered = |d: &Path| bpf_mounts.iter().any(|m| d.starts_with(m));
    if !covered(dir) {
        let default = Path::new("/sys/fs/bpf");
        if dir.starts_with(default) && !bpf_mounts.iter().any(|m| m == default) {
            nix::mount::mount(
                Some("bpf"),
                default,
                Some("bpf"),
                nix::mount::MsFlags::empty(),
                None::<&str>,
            )
            .map_err(io::Error::from)?;
        } else {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "{} is not on a bpf filesystem: mount one (mount -t bpf bpf /sys/fs/bpf) or choose a --bpffs under one",
                    dir.display()
                ),
            ));
        }
    }
    std::fs::create_dir_all(dir)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cgroup2_root_is_found() {
        let root = cgroup2_root().expect("cgroup2 mounted");
        assert!(root.join("cgroup.procs").exists(), "{}", root.display());
    }

    #[test]
    fn mount_paths_are_unescaped() {
        assert_eq!(unescape_mount("/a\\040b"), "/a b");
    }
}
