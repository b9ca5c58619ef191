//! The few kernel interfaces aya 0.14 does not expose: `BPF_LINK_UPDATE` (replace a pinned
//! link's program in place, no detach window), `BPF_PROG_QUERY` (what the kernel says is
//! attached to a cgroup), `BPF_OBJ_GET`, and the batch map commands (`BPF_MAP_*_BATCH`: many
//! entries per syscall, which is what makes a 100k-rule load fast); waiting for an RCU grace
//! period (so that no program still reads a policy slot that is about to be rewritten); plus
//! finding the cgroup2 and bpffs mounts.

use std::{
    ffi::CString,
    io,
    os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd},
    os::unix::ffi::OsStrExt,
    path::{Path, PathBuf},
};

const BPF_MAP_CREATE: libc::c_long = 0;
const BPF_MAP_LOOKUP_ELEM: libc::c_long = 1;
const BPF_MAP_UPDATE_ELEM: libc::c_long = 2;
const BPF_MAP_DELETE_ELEM: libc::c_long = 3;
const BPF_MAP_GET_NEXT_KEY: libc::c_long = 4;
const BPF_OBJ_GET: libc::c_long = 7;
const BPF_PROG_QUERY: libc::c_long = 16;
const BPF_MAP_LOOKUP_BATCH: libc::c_long = 24;
const BPF_MAP_UPDATE_BATCH: libc::c_long = 26;
const BPF_MAP_DELETE_BATCH: libc::c_long = 27;
const BPF_LINK_UPDATE: libc::c_long = 29;
const BPF_LINK_DETACH: libc::c_long = 34;
/// The kernel's internal "operation not supported" (not in libc).
const ENOTSUPP: i32 = 524;

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

/// `BPF_MAP_TYPE_ARRAY` and `BPF_MAP_TYPE_ARRAY_OF_MAPS` (uapi/linux/bpf.h).
const BPF_MAP_TYPE_ARRAY: u32 = 2;
const BPF_MAP_TYPE_ARRAY_OF_MAPS: u32 = 12;
/// `MEMBARRIER_CMD_GLOBAL` (uapi/linux/membarrier.h).
const MEMBARRIER_CMD_GLOBAL: libc::c_int = 1;

/// Wait until every BPF program that was running when this was called has finished: an RCU
/// grace period (the programs zt attaches are non-sleepable and run inside
/// `rcu_read_lock()`). After `ACTIVE` flips, a decision that read the old value may still be
/// reading the old slot; once this returns, none is.
///
/// `membarrier(MEMBARRIER_CMD_GLOBAL)` waits for `synchronize_rcu()`, but only when more than
/// one CPU is online (and it is refused on `nohz_full` kernels). Otherwise: an update of an
/// array-of-maps from the `bpf()` syscall, which the kernel follows with `synchronize_rcu()`
/// so that userspace knows no program still uses the old inner map (`maybe_wait_bpf_programs`
/// in kernel/bpf/syscall.c).
pub fn rcu_grace_period() -> io::Result<()> {
    // SAFETY: sysconf has no memory effects.
    let online = unsafe { libc::sysconf(libc::_SC_NPROCESSORS_ONLN) };
    if online > 1 {
        // SAFETY: membarrier takes no pointers.
        let ret = unsafe { libc::syscall(libc::SYS_membarrier, MEMBARRIER_CMD_GLOBAL, 0, 0) };
        if ret == 0 {
            return Ok(());
        }
    }
    map_in_map_sync()
}

/// One `BPF_MAP_UPDATE_ELEM` on a fresh one-slot array-of-maps: returns after a
/// `synchronize_rcu()` (see [`rcu_grace_period`]).
fn map_in_map_sync() -> io::Result<()> {
    let create = |map_type: u32, inner: Option<BorrowedFd<'_>>| -> io::Result<OwnedFd> {
        let mut attr = Attr::new();
        attr.put_u32(0, map_type);
        attr.put_u32(4, 4); // key_size
        attr.put_u32(8, 4); // value_size (a map fd for the outer map)
        attr.put_u32(12, 1); // max_entries
        if let Some(fd) = inner {
            attr.put_u32(20, fd.as_raw_fd() as u32); // inner_map_fd
        }
        let fd = bpf(BPF_MAP_CREATE, &mut attr)?;
        // SAFETY: the kernel returned a new file descriptor that we now own.
        Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
    };
    let inner = create(BPF_MAP_TYPE_ARRAY, None)?;
    let outer = create(BPF_MAP_TYPE_ARRAY_OF_MAPS, Some(inner.as_fd()))?;
    let key: u32 = 0;
    let value: u32 = inner.as_raw_fd() as u32;
    let mut attr = Attr::new();
    attr.put_u32(0, outer.as_raw_fd() as u32);
    attr.put_u64(8, &key as *const u32 as u64);
    attr.put_u64(16, &value as *const u32 as u64);
    bpf(BPF_MAP_UPDATE_ELEM, &mut attr).map(|_| ())
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

/// Entries per batch syscall: bounds the kernel's time in one call (it reschedules between
/// entries anyway) and keeps a failed batch's retry small.
pub const BATCH: usize = 16_384;

/// `union bpf_attr`'s `batch` member: keys/values are `count` packed elements.
fn batch_attr(map: BorrowedFd<'_>, keys: u64, values: u64, count: usize) -> Attr {
    let mut attr = Attr::new();
    attr.put_u64(16, keys); // keys
    attr.put_u64(24, values); // values
    attr.put_u32(32, count as u32); // count
    attr.put_u32(36, map.as_raw_fd() as u32); // map_fd
    attr
}

/// How far a batch command got before `error`.
#[derive(Debug)]
pub struct BatchError {
    /// Entries the kernel processed before it failed.
    pub done: usize,
    pub error: io::Error,
}

impl BatchError {
    /// The kernel has no batch support for this map type (or no batch commands at all).
    pub fn unsupported(&self) -> bool {
        self.done == 0
            && matches!(
                self.error.raw_os_error(),
                Some(libc::EINVAL) | Some(ENOTSUPP) | Some(libc::EOPNOTSUPP)
            )
    }
}

/// `BPF_MAP_{LOOKUP,UPDATE,DELETE}_ELEM` / `GET_NEXT_KEY`: `key`, `value` (or next key) are
/// pointers into the caller's buffers.
fn elem(cmd: libc::c_long, map: BorrowedFd<'_>, key: u64, value: u64) -> io::Result<()> {
    let mut attr = Attr::new();
    attr.put_u32(0, map.as_raw_fd() as u32); // map_fd
    attr.put_u64(8, key); // key
    attr.put_u64(16, value); // value / next_key
    bpf(cmd, &mut attr).map(|_| ())
}

/// Without batch support: one `BPF_MAP_UPDATE_ELEM` per entry.
fn update_each<K: Copy>(
    map: BorrowedFd<'_>,
    keys: &[K],
    values: &[u8],
    value_size: usize,
) -> Result<(), BatchError> {
    for (i, k) in keys.iter().enumerate() {
        let v = &values[i * value_size..][..value_size];
        elem(
            BPF_MAP_UPDATE_ELEM,
            map,
            k as *const K as u64,
            v.as_ptr() as u64,
        )
        .map_err(|error| BatchError { done: i, error })?;
    }
    Ok(())
}

/// `BPF_MAP_UPDATE_BATCH`: write `keys.len()` entries in one syscall. `values` holds one
/// value per key, each `value_size` bytes (for per-CPU maps: `round_up(size, 8) *
/// possible CPUs`). Any key type `K` that is plain data of the map's key size.
pub fn map_update_batch<K: Copy>(
    map: BorrowedFd<'_>,
    keys: &[K],
    values: &[u8],
    value_size: usize,
) -> Result<(), BatchError> {
    assert_eq!(values.len(), keys.len() * value_size, "one value per key");
    for (i, chunk) in keys.chunks(BATCH).enumerate() {
        let vals = &values[i * BATCH * value_size..][..chunk.len() * value_size];
        let mut attr = batch_attr(
            map,
            chunk.as_ptr() as u64,
            vals.as_ptr() as u64,
            chunk.len(),
        );
        if let Err(error) = bpf(BPF_MAP_UPDATE_BATCH, &mut attr) {
            let e = BatchError {
                done: attr.get_u32(32) as usize,
                error,
            };
            if e.unsupported() {
                return update_each(
                    map,
                    &keys[i * BATCH..],
                    &values[i * BATCH * value_size..],
                    value_size,
                )
                .map_err(|e| BatchError {
                    done: i * BATCH + e.done,
                    ..e
                });
            }
            return Err(BatchError {
                done: i * BATCH + e.done,
                ..e
            });
        }
    }
    Ok(())
}

/// `BPF_MAP_DELETE_BATCH`: remove `keys`, many per syscall. A key that is already gone is
/// skipped (the goal, its absence, holds).
pub fn map_delete_batch<K: Copy>(map: BorrowedFd<'_>, keys: &[K]) -> Result<(), BatchError> {
    let mut start = 0;
    let mut batch = true;
    while start < keys.len() {
        if !batch {
            let k = &keys[start];
            match elem(BPF_MAP_DELETE_ELEM, map, k as *const K as u64, 0) {
                Ok(()) => {}
                Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {}
                Err(error) => return Err(BatchError { done: start, error }),
            }
            start += 1;
            continue;
        }
        let chunk = &keys[start..(start + BATCH).min(keys.len())];
        let mut attr = batch_attr(map, chunk.as_ptr() as u64, 0, chunk.len());
        match bpf(BPF_MAP_DELETE_BATCH, &mut attr) {
            Ok(_) => start += chunk.len(),
            Err(error) => {
                let e = BatchError {
                    done: attr.get_u32(32) as usize,
                    error,
                };
                if e.error.raw_os_error() == Some(libc::ENOENT) {
                    start += e.done + 1;
                } else if e.unsupported() {
                    batch = false;
                } else {
                    return Err(BatchError {
                        done: start + e.done,
                        ..e
                    });
                }
            }
        }
    }
    Ok(())
}

/// Without batch support: walk the keys (`BPF_MAP_GET_NEXT_KEY`) and look each up.
fn lookup_each<K: Copy + Default>(
    map: BorrowedFd<'_>,
    value_size: usize,
) -> Result<(Vec<K>, Vec<u8>), BatchError> {
    let mut keys: Vec<K> = Vec::new();
    let mut values: Vec<u8> = Vec::new();
    let mut value = vec![0u8; value_size];
    let mut next = K::default();
    loop {
        let prev = keys.last().map_or(0, |k| k as *const K as u64);
        match elem(BPF_MAP_GET_NEXT_KEY, map, prev, &mut next as *mut K as u64) {
            Ok(()) => {}
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => return Ok((keys, values)),
            Err(error) => {
                return Err(BatchError {
                    done: keys.len(),
                    error,
                })
            }
        }
        match elem(
            BPF_MAP_LOOKUP_ELEM,
            map,
            &next as *const K as u64,
            value.as_mut_ptr() as u64,
        ) {
            Ok(()) => {
                keys.push(next);
                values.extend_from_slice(&value);
            }
            // Deleted between the two calls: gone, and the walk cannot continue from it.
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {
                if keys.is_empty() {
                    continue;
                }
                return Err(BatchError {
                    done: keys.len(),
                    error: e,
                });
            }
            Err(error) => {
                return Err(BatchError {
                    done: keys.len(),
                    error,
                })
            }
        }
    }
}

/// `BPF_MAP_LOOKUP_BATCH` over a whole map: every (key, value) it holds, values as raw bytes
/// of `value_size` each. `K` must be plain data of the map's key size.
pub fn map_lookup_all<K: Copy + Default>(
    map: BorrowedFd<'_>,
    value_size: usize,
) -> Result<(Vec<K>, Vec<u8>), BatchError> {
    let mut keys: Vec<K> = Vec::new();
    let mut values: Vec<u8> = Vec::new();
    // The batch cursor is opaque, at most the key size for the generic implementation and
    // 4 bytes (a bucket index) for hash maps.
    let mut cursor = [0u64; 8];
    let mut next = [0u64; 8];
    let mut first = true;
    loop {
        let start = keys.len();
        keys.resize(start + BATCH, K::default());
        values.resize((start + BATCH) * value_size, 0);
        let mut attr = batch_attr(
            map,
            keys[start..].as_mut_ptr() as u64,
            values[start * value_size..].as_mut_ptr() as u64,
            BATCH,
        );
        if !first {
            attr.put_u64(0, cursor.as_mut_ptr() as u64); // in_batch
        }
        attr.put_u64(8, next.as_mut_ptr() as u64); // out_batch
        let result = bpf(BPF_MAP_LOOKUP_BATCH, &mut attr);
        let got = (attr.get_u32(32) as usize).min(BATCH);
        keys.truncate(start + got);
        values.truncate((start + got) * value_size);
        match result {
            Ok(_) => {}
            // ENOENT: the walk reached the end (`got` entries in this last batch).
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => return Ok((keys, values)),
            Err(error) if first && start == 0 => {
                let e = BatchError { done: 0, error };
                if e.unsupported() {
                    return lookup_each(map, value_size);
                }
                return Err(e);
            }
            Err(error) => {
                return Err(BatchError {
                    done: keys.len(),
                    error,
                })
            }
        }
        cursor = next;
        first = false;
    }
}

/// `BPF_MAP_LOOKUP_BATCH` of the array indices `first..first + count`, values as raw bytes
/// of `value_size` each (per-CPU: `round_up(size, 8) * possible CPUs`).
pub fn array_lookup_range(
    map: BorrowedFd<'_>,
    first: u32,
    count: usize,
    value_size: usize,
) -> Result<Vec<u8>, BatchError> {
    let mut keys = vec![0u32; count];
    let mut values = vec![0u8; count * value_size];
    let mut done = 0usize;
    while done < count {
        let n = (count - done).min(BATCH);
        // The generic walk's cursor is the key before the first one wanted; an index past
        // the end makes an array start again at 0.
        let mut cursor: u32 = (first + done as u32).wrapping_sub(1);
        let mut next: u32 = 0;
        let mut attr = batch_attr(
            map,
            keys[done..].as_mut_ptr() as u64,
            values[done * value_size..].as_mut_ptr() as u64,
            n,
        );
        attr.put_u64(0, &mut cursor as *mut u32 as u64); // in_batch
        attr.put_u64(8, &mut next as *mut u32 as u64); // out_batch
        let result = bpf(BPF_MAP_LOOKUP_BATCH, &mut attr);
        let got = attr.get_u32(32) as usize;
        match result {
            Ok(_) if got == n => done += n,
            Ok(_) => {
                return Err(BatchError {
                    done: done + got,
                    error: io::Error::new(io::ErrorKind::UnexpectedEof, "short array batch"),
                })
            }
            Err(error) => {
                return Err(BatchError {
                    done: done + got,
                    error,
                })
            }
        }
    }
    Ok(values)
}

/// Give the kernel back the heap memory the allocator keeps after a big free (glibc holds
/// freed memory for reuse: after a 100k-rule load, tens of MiB the daemon no longer needs).
pub fn trim_heap() {
    #[cfg(target_env = "gnu")]
    // SAFETY: malloc_trim only releases free memory of the allocator.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Cap glibc's malloc arenas: by default each thread that meets contention gets its own, and
/// memory a reload frees in one arena is not reused by another.
pub fn limit_arenas(n: i32) {
    #[cfg(target_env = "gnu")]
    // SAFETY: mallopt only changes allocator tuning.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, n);
    }
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
