//! Enrichment of decision events: the numbers the kernel reports (cgroup id, executable
//! device + inode, uid, gid) turned into names a person can read (cgroup path, executable
//! path, user name, group name).
//!
//! Every lookup is cached in a bounded LRU cache (the least recently used entry is evicted
//! first). Misses are cached too, for a short time ([`EnricherConfig::negative_ttl`]), so a
//! flood of events from an unknown identity costs one lookup per TTL, not one per event.
//!
//! Lookups are synchronous and may block briefly: user and group names go through NSS
//! (`getpwuid_r`/`getgrgid_r`, which may ask LDAP/SSSD), cgroup paths walk a directory tree
//! (bounded in depth and entries). Call [`Enricher`] from a blocking-friendly context
//! (`tokio::task::spawn_blocking`, or a dedicated thread) if that matters.

use std::{
    collections::VecDeque,
    fs,
    num::NonZeroUsize,
    os::unix::fs::{DirEntryExt, MetadataExt},
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use lru::LruCache;
use nix::unistd::{Gid, Group, Uid, User};

// Kernel encoding of a `stat` device number (`major << 20 | minor`), as the programs read
// `sb->s_dev`.
use crate::policy::kernel_dev;

/// Entries per cache (cgroups, exes, users, groups: each has its own).
pub const DEFAULT_CACHE_CAPACITY: usize = 4096;
/// How long a failed lookup is remembered.
pub const DEFAULT_NEGATIVE_TTL: Duration = Duration::from_secs(10);
/// How long a successful user, group or executable lookup is trusted (uids can be renamed,
/// inode numbers reused). Cgroup ids are never reused, so cgroup paths do not expire.
pub const DEFAULT_POSITIVE_TTL: Duration = Duration::from_secs(600);

/// How long the arguments read for a process are shown again without reading `/proc`: a
/// process that rewrites its argv (setproctitle) shows the new one after this.
pub const ARGV_TTL: Duration = Duration::from_secs(1);
/// Deepest directory level a cgroup walk descends to (the root is level 0).
pub const DEFAULT_MAX_WALK_DEPTH: usize = 32;
/// Most directory entries a single cgroup walk reads before it gives up.
pub const DEFAULT_MAX_WALK_ENTRIES: usize = 200_000;

/// Settings of an [`Enricher`].
#[derive(Clone, Debug)]
pub struct EnricherConfig {
    /// The cgroup2 mount point (e.g. `/sys/fs/cgroup`; see [`crate::sys::cgroup2_root`]).
    /// Cgroup paths are reported relative to it, as `/proc/<pid>/cgroup` shows them.
    pub cgroup_root: PathBuf,
    /// Entries per cache.
    pub capacity: usize,
    pub negative_ttl: Duration,
    pub positive_ttl: Duration,
    pub max_walk_depth: usize,
    pub max_walk_entries: usize,
}

impl EnricherConfig {
    /// Defaults for everything but the cgroup root.
    pub fn new(cgroup_root: impl Into<PathBuf>) -> Self {
        EnricherConfig {
            cgroup_root: cgroup_root.into(),
            capacity: DEFAULT_CACHE_CAPACITY,
            negative_ttl: DEFAULT_NEGATIVE_TTL,
            positive_ttl: DEFAULT_POSITIVE_TTL,
            max_walk_depth: DEFAULT_MAX_WALK_DEPTH,
            max_walk_entries: DEFAULT_MAX_WALK_ENTRIES,
        }
    }
}

/// Lookup counters, for metrics and tests.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EnricherStats {
    /// Answers served from a cache (positive or negative entries).
    pub hits: u64,
    /// Lookups that went to the system.
    pub misses: u64,
    /// Cgroup tree walks made.
    pub walks: u64,
    /// Cgroup walks that stopped at the entry bound before finding the id.
    pub walks_truncated: u64,
}

/// A cached answer: `value` is `None` for a remembered miss.
struct Entry {
    value: Option<String>,
    expires: Option<Instant>,
}

/// A bounded LRU cache of answers with per-entry expiry.
struct TtlCache<K: std::hash::Hash + Eq> {
    lru: LruCache<K, Entry>,
}

impl<K: std::hash::Hash + Eq> TtlCache<K> {
    fn new(capacity: usize) -> Self {
        TtlCache {
            lru: LruCache::new(NonZeroUsize::new(capacity).unwrap_or(NonZeroUsize::MIN)),
        }
    }

    /// `Some(answer)` if a live entry is cached (`answer` may be a remembered miss).
    fn get(&mut self, key: &K, now: Instant) -> Option<Option<String>> {
        let expired = match self.lru.get(key) {
            None => return None,
            Some(e) => e.expires.is_some_and(|t| now >= t),
        };
        if expired {
            self.lru.pop(key);
            return None;
        }
        self.lru.get(key).map(|e| e.value.clone())
    }

    fn put(&mut self, key: K, value: Option<String>, ttl: Option<Duration>, now: Instant) {
        let expires = ttl.and_then(|ttl| now.checked_add(ttl));
        self.lru.put(key, Entry { value, expires });
    }

    fn len(&self) -> usize {
        self.lru.len()
    }
}

/// Resolves the identities of decision events to names, with bounded caches.
pub struct Enricher {
    config: EnricherConfig,
    cgroups: TtlCache<u64>,
    exes: TtlCache<(u64, u64)>,
    /// Arguments by (tgid, dev, ino), NUL-joined, for [`ARGV_TTL`].
    argvs: TtlCache<(u32, u64, u64)>,
    users: TtlCache<u32>,
    groups: TtlCache<u32>,
    stats: EnricherStats,
}

impl Enricher {
    /// An enricher with default bounds, reporting cgroup paths under `cgroup_root` (the
    /// cgroup2 mount point).
    pub fn new(cgroup_root: impl Into<PathBuf>) -> Self {
        Self::with_config(EnricherConfig::new(cgroup_root))
    }

    pub fn with_config(config: EnricherConfig) -> Self {
        Enricher {
            cgroups: TtlCache::new(config.capacity),
            exes: TtlCache::new(config.capacity),
            argvs: TtlCache::new(config.capacity),
            users: TtlCache::new(config.capacity),
            groups: TtlCache::new(config.capacity),
            config,
            stats: EnricherStats::default(),
        }
    }

    pub fn config(&self) -> &EnricherConfig {
        &self.config
    }

    pub fn stats(&self) -> EnricherStats {
        self.stats
    }

    /// Entries held now, over all caches.
    pub fn cached_entries(&self) -> usize {
        self.cgroups.len() + self.exes.len() + self.users.len() + self.groups.len()
    }

    /// The path of cgroup `id` relative to the cgroup root, e.g. `/system.slice/sshd.service`
    /// (`/` for the root itself). The id of a cgroup2 cgroup is the inode number of its
    /// directory (what `bpf_get_current_cgroup_id` returns), so this finds the directory under
    /// the root whose inode number is `id`, walking at most
    /// [`EnricherConfig::max_walk_depth`] levels and [`EnricherConfig::max_walk_entries`]
    /// entries. `None` if it is not found (the cgroup was removed, or lies outside the root).
    pub fn cgroup_path(&mut self, id: u64) -> Option<String> {
        let now = Instant::now();
        if let Some(answer) = self.cgroups.get(&id, now) {
            self.stats.hits += 1;
            return answer;
        }
        self.stats.misses += 1;
        self.stats.walks += 1;
        let (found, truncated) = find_inode(
            &self.config.cgroup_root,
            id,
            self.config.max_walk_depth,
            self.config.max_walk_entries,
        );
        if truncated {
            self.stats.walks_truncated += 1;
        }
        // Cgroup ids are never reused: a path found stays right for the cgroup's life.
        let ttl = if found.is_some() {
            None
        } else {
            Some(self.config.negative_ttl)
        };
        self.cgroups.put(id, found.clone(), ttl, now);
        found
    }

    /// The name of user `uid` (`None` if NSS knows no such user).
    pub fn user_name(&mut self, uid: u32) -> Option<String> {
        let now = Instant::now();
        if let Some(answer) = self.users.get(&uid, now) {
            self.stats.hits += 1;
            return answer;
        }
        self.stats.misses += 1;
        let name = User::from_uid(Uid::from_raw(uid))
            .ok()
            .flatten()
            .map(|u| u.name);
        let ttl = self.ttl_for(name.is_some());
        self.users.put(uid, name.clone(), Some(ttl), now);
        name
    }

    /// The name of group `gid` (`None` if NSS knows no such group).
    pub fn group_name(&mut self, gid: u32) -> Option<String> {
        let now = Instant::now();
        if let Some(answer) = self.groups.get(&gid, now) {
            self.stats.hits += 1;
            return answer;
        }
        self.stats.misses += 1;
        let name = Group::from_gid(Gid::from_raw(gid))
            .ok()
            .flatten()
            .map(|g| g.name);
        let ttl = self.ttl_for(name.is_some());
        self.groups.put(gid, name.clone(), Some(ttl), now);
        name
    }

    /// The path of the executable with device `dev` (kernel encoding `major << 20 | minor`,
    /// as in [`zt_common::ExeKey`]) and inode `ino`, learnt from `/proc/<tgid>/exe` if that
    /// process still runs that very file (checked with `stat`: a process that exec'd since,
    /// or a reused pid, is not believed). A file deleted since it was run shows as
    /// `path (deleted)`, as the kernel prints it. Cached by (dev, ino); a failure is not
    /// cached (the next event may come from a process that still runs), so it costs one
    /// `readlink` and one `stat`. `(0, 0)` (no executable: kernel threads, or unreadable in
    /// the kernel) is `None`.
    pub fn exe_path(&mut self, dev: u64, ino: u64, tgid: u32) -> Option<String> {
        if dev == 0 && ino == 0 {
            return None;
        }
        let now = Instant::now();
        if let Some(Some(path)) = self.exes.get(&(dev, ino), now) {
            self.stats.hits += 1;
            return Some(path);
        }
        self.stats.misses += 1;
        let path = exe_of_process(Path::new("/proc"), tgid, dev, ino)?;
        self.exes.put(
            (dev, ino),
            Some(path.clone()),
            Some(self.config.positive_ttl),
            now,
        );
        Some(path)
    }

    /// [`argv_of`], remembered for [`ARGV_TTL`]: a burst of events from one process reads
    /// `/proc` once, not seven system calls per event.
    pub fn argv(&mut self, tgid: u32, dev: u64, ino: u64) -> Option<Vec<String>> {
        if tgid == 0 || (dev == 0 && ino == 0) {
            return None;
        }
        let now = Instant::now();
        let key = (tgid, dev, ino);
        if let Some(cached) = self.argvs.get(&key, now) {
            self.stats.hits += 1;
            return cached.map(|joined| joined.split('\0').map(str::to_owned).collect());
        }
        self.stats.misses += 1;
        let argv = argv_of(tgid, dev, ino);
        self.argvs.put(
            key,
            argv.as_ref().map(|a| a.join("\0")),
            Some(ARGV_TTL),
            now,
        );
        argv
    }

    fn ttl_for(&self, found: bool) -> Duration {
        if found {
            self.config.positive_ttl
        } else {
            self.config.negative_ttl
        }
    }
}

/// `/proc/<tgid>/cmdline` as arguments, if that process still runs the file `(dev, ino)`
/// (checked before and after reading, as for [`Enricher::exe_path`]). For people only:
/// argv is whatever the process chose to write there, never an identity. At most 32
/// arguments of at most 256 bytes each.
pub fn argv_of(tgid: u32, dev: u64, ino: u64) -> Option<Vec<String>> {
    if tgid == 0 || (dev == 0 && ino == 0) {
        return None;
    }
    let proc_root = Path::new("/proc");
    exe_of_process(proc_root, tgid, dev, ino)?;
    let raw = fs::read(proc_root.join(tgid.to_string()).join("cmdline")).ok()?;
    exe_of_process(proc_root, tgid, dev, ino)?;
    let argv: Vec<String> = raw
        .split(|&b| b == 0)
        .filter(|a| !a.is_empty())
        .take(32)
        .map(|a| String::from_utf8_lossy(&a[..a.len().min(256)]).into_owned())
        .collect();
    (!argv.is_empty()).then_some(argv)
}

/// `/proc/<tgid>/exe`'s target, if its (device, inode) are `(dev, ino)`.
fn exe_of_process(proc_root: &Path, tgid: u32, dev: u64, ino: u64) -> Option<String> {
    let link = proc_root.join(tgid.to_string()).join("exe");
    let target = fs::read_link(&link).ok()?;
    // stat through the magic link reaches the very file the process runs, deleted or not.
    let meta = fs::metadata(&link).ok()?;
    if kernel_dev(meta.dev()) != dev || meta.ino() != ino {
        return None;
    }
    // The process may have exec'd between readlink and stat: check again.
    if fs::read_link(&link).ok()? != target {
        return None;
    }
    Some(target.to_string_lossy().into_owned())
}

/// Breadth-first search under `root` for a directory whose inode number is `ino`. Returns
/// its path relative to `root` (with a leading `/`; `/` for the root itself) and whether the
/// walk stopped at `max_entries`.
fn find_inode(
    root: &Path,
    ino: u64,
    max_depth: usize,
    max_entries: usize,
) -> (Option<String>, bool) {
    match fs::metadata(root) {
        Ok(meta) if meta.ino() == ino => return (Some("/".to_string()), false),
        Ok(_) => {}
        Err(_) => return (None, false),
    }
    let mut queue = VecDeque::from([(root.to_path_buf(), 0usize)]);
    let mut seen = 0usize;
    while let Some((dir, depth)) = queue.pop_front() {
        let Ok(entries) = fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries {
            let Ok(entry) = entry else { continue };
            seen += 1;
            if seen > max_entries {
                return (None, true);
            }
            // d_type and d_ino come with readdir: no stat per entry. On cgroup2 (kernfs)
            // d_ino is the cgroup id.
            match entry.file_type() {
                Ok(t) if t.is_dir() => {}
                _ => continue,
            }
            if entry.ino() == ino {
                let path = entry.path();
                let rel = path.strip_prefix(root).unwrap_or(&path);
                return (Some(format!("/{}", rel.to_string_lossy())), false);
            }
            if depth + 1 < max_depth {
                queue.push_back((entry.path(), depth + 1));
            }
        }
    }
    (None, false)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn ino(path: &Path) -> u64 {
        fs::metadata(path).unwrap().ino()
    }

    #[test]
    fn uid_and_gid_zero_are_root() {
        let mut e = Enricher::new("/nonexistent");
        assert_eq!(e.user_name(0).as_deref(), Some("root"));
        assert_eq!(e.group_name(0).as_deref(), Some("root"));
        // Second time from the cache.
        let before = e.stats();
        assert_eq!(e.user_name(0).as_deref(), Some("root"));
        assert_eq!(e.stats().hits, before.hits + 1);
        assert_eq!(e.stats().misses, before.misses);
    }

    #[test]
    fn unknown_uid_is_none_and_negatively_cached() {
        let mut e = Enricher::new("/nonexistent");
        // Far above any allocated uid (and not (uid_t)-1, which NSS treats specially).
        let uid = 4_000_000_123;
        assert_eq!(e.user_name(uid), None);
        assert_eq!(e.group_name(uid), None);
        let misses = e.stats().misses;
        assert_eq!(e.user_name(uid), None);
        assert_eq!(e.stats().misses, misses, "a miss is remembered");
    }

    #[test]
    fn negative_entries_expire() {
        let mut c = TtlCache::<u32>::new(4);
        let t0 = Instant::now();
        c.put(1, None, Some(Duration::from_secs(10)), t0);
        assert_eq!(c.get(&1, t0 + Duration::from_secs(9)), Some(None));
        assert_eq!(c.get(&1, t0 + Duration::from_secs(10)), None);
        assert_eq!(c.len(), 0, "an expired entry is dropped");
    }

    #[test]
    fn caches_are_bounded_lru() {
        let mut c = TtlCache::<u32>::new(3);
        let t0 = Instant::now();
        for k in 0..3 {
            c.put(k, Some(k.to_string()), None, t0);
        }
        // Touch 0 so that 1 is the oldest.
        assert!(c.get(&0, t0).is_some());
        c.put(3, Some("3".into()), None, t0);
        assert_eq!(c.len(), 3);
        assert_eq!(c.get(&1, t0), None);
        assert_eq!(c.get(&0, t0), Some(Some("0".into())));
        assert_eq!(c.get(&3, t0), Some(Some("3".into())));

        let mut e = Enricher::with_config(EnricherConfig {
            capacity: 2,
            ..EnricherConfig::new("/nonexistent")
        });
        for uid in [0, 4_000_000_001, 4_000_000_002, 4_000_000_003] {
            e.user_name(uid);
        }
        assert_eq!(e.cached_entries(), 2);
    }

    #[test]
    fn exe_path_of_this_process() {
        let me = std::process::id();
        let meta = fs::metadata("/proc/self/exe").unwrap();
        let (dev, ino) = (kernel_dev(meta.dev()), meta.ino());
        let expected = fs::read_link("/proc/self/exe").unwrap();
        let mut e = Enricher::new("/nonexistent");
        assert_eq!(
            e.exe_path(dev, ino, me).as_deref(),
            Some(expected.to_str().unwrap())
        );
        // Cached by (dev, ino): found even through a pid that does not run it.
        assert_eq!(
            e.exe_path(dev, ino, u32::MAX).as_deref(),
            Some(expected.to_str().unwrap())
        );
        // A mismatching inode is not believed, and not cached as a hit.
        let mut fresh = Enricher::new("/nonexistent");
        assert_eq!(fresh.exe_path(dev, ino + 1, me), None);
        assert_eq!(fresh.exe_path(dev ^ 1, ino, me), None);
        assert_eq!(fresh.exe_path(0, 0, me), None);
        assert_eq!(fresh.cached_entries(), 0);
    }

    #[test]
    fn argv_of_this_process_is_read_once_then_remembered() {
        let me = std::process::id();
        let meta = fs::metadata("/proc/self/exe").unwrap();
        let (dev, ino) = (kernel_dev(meta.dev()), meta.ino());
        let expected: Vec<String> = std::env::args().take(32).collect();
        let mut e = Enricher::new("/nonexistent");
        let first = e.argv(me, dev, ino).unwrap();
        assert_eq!(first.first(), expected.first());
        let misses = e.stats().misses;
        assert_eq!(e.argv(me, dev, ino), Some(first));
        assert_eq!(
            e.stats().misses,
            misses,
            "the second answer came from the cache"
        );
        // Another file than the one the process runs: no arguments.
        assert_eq!(e.argv(me, dev, ino + 1), None);
    }

    #[test]
    fn exe_path_is_checked_against_the_file() {
        // A fake /proc whose `<pid>/exe` is a plain symlink: believed while it leads to the
        // file with that (dev, ino), not once the file is gone (a real /proc's magic link
        // would still stat the running file: see the next test).
        let dir = tempfile::tempdir().unwrap();
        let proc_root = dir.path().join("proc");
        fs::create_dir_all(proc_root.join("42")).unwrap();
        let exe = dir.path().join("prog");
        fs::write(&exe, b"x").unwrap();
        std::os::unix::fs::symlink(&exe, proc_root.join("42/exe")).unwrap();
        let meta = fs::metadata(&exe).unwrap();
        let (dev, ino) = (kernel_dev(meta.dev()), meta.ino());
        assert_eq!(
            exe_of_process(&proc_root, 42, dev, ino).as_deref(),
            exe.to_str()
        );
        fs::remove_file(&exe).unwrap();
        assert_eq!(exe_of_process(&proc_root, 42, dev, ino), None);
    }

    #[test]
    fn exe_path_of_a_running_deleted_binary() {
        // Copy a binary, run the copy, delete it: the kernel shows "path (deleted)".
        let dir = tempfile::tempdir().unwrap();
        let copy = dir.path().join("sleeper");
        fs::copy("/bin/sleep", &copy).unwrap();
        let meta = fs::metadata(&copy).unwrap();
        let (dev, ino) = (kernel_dev(meta.dev()), meta.ino());
        let mut child = match std::process::Command::new(&copy).arg("30").spawn() {
            Ok(c) => c,
            Err(e) => {
                eprintln!("skipped: cannot run a copied binary here ({e}), e.g. noexec /tmp");
                return;
            }
        };
        // Wait until the child has exec'd the copy.
        let link = format!("/proc/{}/exe", child.id());
        for _ in 0..200 {
            if fs::read_link(&link).is_ok_and(|p| p == copy) {
                break;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        fs::remove_file(&copy).unwrap();
        let mut e = Enricher::new("/nonexistent");
        let got = e.exe_path(dev, ino, child.id());
        let _ = child.kill();
        let _ = child.wait();
        assert_eq!(got, Some(format!("{} (deleted)", copy.display())));
    }

    #[test]
    fn cgroup_walk_finds_directories_by_inode_within_bounds() {
        // The walk works on any directory tree: a fake one with known inode numbers.
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        fs::create_dir_all(root.join("system.slice/sshd.service")).unwrap();
        fs::create_dir_all(root.join("user.slice/user-1000.slice/session-1.scope")).unwrap();
        fs::write(root.join("user.slice/cgroup.procs"), b"").unwrap();
        let deep = root.join("user.slice/user-1000.slice/session-1.scope");

        let mut e = Enricher::new(root);
        assert_eq!(e.cgroup_path(ino(root)).as_deref(), Some("/"));
        assert_eq!(
            e.cgroup_path(ino(&root.join("system.slice/sshd.service")))
                .as_deref(),
            Some("/system.slice/sshd.service")
        );
        assert_eq!(
            e.cgroup_path(ino(&deep)).as_deref(),
            Some("/user.slice/user-1000.slice/session-1.scope")
        );
        // Files are not cgroups.
        let file_ino = ino(&root.join("user.slice/cgroup.procs"));
        assert_eq!(e.cgroup_path(file_ino), None);

        // Hits are cached; misses too.
        let walks = e.stats().walks;
        e.cgroup_path(ino(&deep));
        e.cgroup_path(file_ino);
        assert_eq!(e.stats().walks, walks);

        // Depth bound: session-1.scope is at level 3.
        let mut shallow = Enricher::with_config(EnricherConfig {
            max_walk_depth: 3,
            ..EnricherConfig::new(root)
        });
        assert!(shallow.cgroup_path(ino(&deep)).is_some());
        let mut shallower = Enricher::with_config(EnricherConfig {
            max_walk_depth: 2,
            ..EnricherConfig::new(root)
        });
        assert_eq!(shallower.cgroup_path(ino(&deep)), None);

        // Entry bound.
        let mut tiny = Enricher::with_config(EnricherConfig {
            max_walk_entries: 2,
            ..EnricherConfig::new(root)
        });
        assert_eq!(tiny.cgroup_path(ino(&deep)), None);
        assert_eq!(tiny.stats().walks_truncated, 1);
    }

    /// The cgroup2 mount point and this process's cgroup path, if this is a cgroup2 system.
    fn own_cgroup() -> Option<(PathBuf, String)> {
        let root = crate::sys::cgroup2_root().ok()?;
        let text = fs::read_to_string("/proc/self/cgroup").ok()?;
        let path = text
            .lines()
            .find_map(|l| l.strip_prefix("0::"))?
            .to_string();
        Some((root, path))
    }

    #[test]
    fn cgroup_path_of_this_process() {
        let Some((root, path)) = own_cgroup() else {
            eprintln!("skipped: no cgroup2 hierarchy here");
            return;
        };
        let dir = root.join(path.trim_start_matches('/'));
        let Ok(meta) = fs::metadata(&dir) else {
            // e.g. "0::/../.." outside our cgroup namespace's view.
            eprintln!(
                "skipped: own cgroup {path} is not visible under {}",
                root.display()
            );
            return;
        };
        let mut e = Enricher::new(&root);
        assert_eq!(e.cgroup_path(meta.ino()).as_deref(), Some(path.as_str()));
        assert_eq!(e.cgroup_path(u64::MAX - 7), None);
    }
}
