//! Keeping identities true to the system while a policy is loaded. An `exe` is pinned to a
//! device+inode and a `unit`/`cgroup` to a cgroup id when the policy loads; a package
//! upgrade (write-then-rename: a new inode), an in-place rewrite (a new hash) or a restarted
//! unit (its cgroup recreated with a new id) changes what the names stand for. This module
//! notices: inotify on the directories that hold the files and cgroups (so a rename or a
//! `mkdir`/`rmdir` is seen at once), plus a poll every [`POLL`] as a safety net. When what
//! the names resolve to differs from what was compiled, it tells the daemon, which resolves
//! the policy again and raises notices ([`crate::notice`]).

use std::{
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use tokio::sync::mpsc;

use crate::{
    control::IdentityStatus,
    policy::{find_unit, unit_search_dirs, IdentityInfo},
};

/// An identity as `ztctl status` shows it: what its names resolved to.
pub fn status_of(i: &IdentityInfo) -> IdentityStatus {
    let exe = i.exe.as_ref();
    let pinned = exe.filter(|e| e.key.ino != 0);
    IdentityStatus {
        name: i.name.clone(),
        location: format!("{}:{}:{}", i.path.display(), i.line, i.column),
        mode: i.mode.as_str().to_string(),
        exe: exe.map(|e| e.path.clone()),
        exe_real: exe.and_then(|e| e.real_path.clone()),
        exe_dev: pinned.map(|e| format!("{}:{}", e.key.dev >> 20, e.key.dev & 0xf_ffff)),
        exe_ino: pinned.map(|e| e.key.ino),
        sha256: i.sha256.clone(),
        user: i.user.clone(),
        uid: i.uid,
        group: i.group.clone(),
        gid: i.gid,
        unit: i.unit.clone(),
        cgroup: i.cgroup.as_ref().map(|c| format!("/{}", c.path)),
        cgroup_id: i.cgroup.as_ref().and_then(|c| c.id),
        matchable: i.matchable,
        problem: i.problem.clone(),
    }
}

/// Fallback poll interval (inotify usually reports first).
pub const POLL: Duration = Duration::from_millis(400);
/// Quiet time after an inotify event before resolving (a copy in progress settles).
pub const SETTLE: Duration = Duration::from_millis(60);

/// What the loaded policy's identities name, and what they resolved to.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Targets {
    /// Executable paths, with `(dev, ino)` as compiled (`None`: missing).
    exes: Vec<(PathBuf, Option<(u64, u64)>)>,
    /// Cgroup directories (absolute) with the id compiled (`None`: absent).
    cgroups: Vec<(PathBuf, Option<u64>)>,
    /// Units with the `(relative path, id)` compiled.
    units: Vec<(String, Option<(String, u64)>)>,
    cgroup_root: PathBuf,
    units_root: PathBuf,
}

/// The state of one target now, compared across polls.
type Fingerprint = Vec<String>;

impl Targets {
    pub fn of(identities: &[IdentityInfo], cgroup_root: &Path, units_root: &Path) -> Targets {
        let mut t = Targets {
            cgroup_root: cgroup_root.to_path_buf(),
            units_root: units_root.to_path_buf(),
            ..Targets::default()
        };
        for id in identities {
            if let Some(exe) = &id.exe {
                let key = (exe.key.ino != 0).then_some((exe.key.dev, exe.key.ino));
                t.exes.push((exe.path.clone(), key));
            }
            match (&id.unit, &id.cgroup) {
                (Some(unit), cg) => t.units.push((
                    unit.clone(),
                    cg.as_ref().and_then(|c| c.id.map(|i| (c.path.clone(), i))),
                )),
                (None, Some(cg)) => t.cgroups.push((cgroup_root.join(&cg.path), cg.id)),
                (None, None) => {}
            }
        }
        t
    }

    pub fn is_empty(&self) -> bool {
        self.exes.is_empty() && self.cgroups.is_empty() && self.units.is_empty()
    }

    /// True when what the names resolve to now differs from what was compiled.
    fn differs_from_compiled(&self) -> bool {
        let exes = self.exes.iter().any(|(path, key)| {
            let now = std::fs::metadata(path)
                .ok()
                .map(|m| (crate::policy::kernel_dev(m.dev()), m.ino()));
            now != *key
        });
        let cgroups = self.cgroups.iter().any(|(dir, id)| {
            let now = std::fs::metadata(dir).ok().map(|m| m.ino());
            now != *id
        });
        let units = self.units.iter().any(|(unit, was)| {
            let now = find_unit(&self.cgroup_root, &self.units_root, unit).ok();
            now != *was
        });
        exes || cgroups || units
    }

    /// Everything that could change a resolution: for a file its inode, size and times
    /// (an in-place rewrite changes the hash), for a cgroup its id, for a unit where it is.
    fn fingerprint(&self) -> Fingerprint {
        let mut out = Vec::new();
        for (path, _) in &self.exes {
            out.push(match std::fs::metadata(path) {
                Ok(m) => format!(
                    "{}:{}:{}:{}:{}.{}:{}.{}",
                    path.display(),
                    m.dev(),
                    m.ino(),
                    m.size(),
                    m.mtime(),
                    m.mtime_nsec(),
                    m.ctime(),
                    m.ctime_nsec()
                ),
                Err(e) => format!("{}:{e}", path.display()),
            });
        }
        for (dir, _) in &self.cgroups {
            let id = std::fs::metadata(dir).ok().map(|m| m.ino());
            out.push(format!("{}:{id:?}", dir.display()));
        }
        for (unit, _) in &self.units {
            let now = find_unit(&self.cgroup_root, &self.units_root, unit).ok();
            out.push(format!("{unit}:{now:?}"));
        }
        out
    }

    /// The directories to watch: each file's directory (and its symlink target's), the
    /// parent of each cgroup (or its nearest existing ancestor), the unit search tree.
    fn watch_dirs(&self) -> Vec<PathBuf> {
        let mut dirs = Vec::new();
        for (path, _) in &self.exes {
            if let Some(parent) = path.parent() {
                dirs.push(parent.to_path_buf());
            }
            if let Ok(real) = std::fs::canonicalize(path) {
                if let Some(parent) = real.parent() {
                    dirs.push(parent.to_path_buf());
                }
            }
        }
        for (dir, _) in &self.cgroups {
            let mut d = dir.parent();
            while let Some(p) = d {
                if p.is_dir() {
                    dirs.push(p.to_path_buf());
                    break;
                }
                d = p.parent();
            }
        }
        if !self.units.is_empty() {
            dirs.extend(unit_search_dirs(&self.units_root));
        }
        dirs.sort();
        dirs.dedup();
        dirs
    }
}

/// Watch `targets` on a thread of its own; send on `changed` whenever what they resolve to
/// may have changed (at once if it already differs from what was compiled). Stops when the
/// returned flag is set or the receiver is gone.
pub fn spawn(targets: Targets, changed: mpsc::UnboundedSender<()>) -> Arc<AtomicBool> {
    use nix::sys::inotify::{AddWatchFlags, InitFlags, Inotify};
    use std::os::fd::{AsFd, AsRawFd};
    let stop = Arc::new(AtomicBool::new(false));
    if targets.is_empty() {
        return stop;
    }
    let stopped = Arc::clone(&stop);
    let inotify = Inotify::init(InitFlags::IN_CLOEXEC | InitFlags::IN_NONBLOCK).ok();
    let mask = AddWatchFlags::IN_CLOSE_WRITE
        | AddWatchFlags::IN_MODIFY
        | AddWatchFlags::IN_ATTRIB
        | AddWatchFlags::IN_CREATE
        | AddWatchFlags::IN_DELETE
        | AddWatchFlags::IN_MOVED_TO
        | AddWatchFlags::IN_MOVED_FROM
        | AddWatchFlags::IN_DELETE_SELF
        | AddWatchFlags::IN_MOVE_SELF;
    std::thread::spawn(move || {
        let add_watches = |inotify: &Option<Inotify>| {
            if let Some(i) = inotify {
                for dir in targets.watch_dirs() {
                    let _ = i.add_watch(&dir, mask);
                }
            }
        };
        add_watches(&inotify);
        let mut last = targets.fingerprint();
        if targets.differs_from_compiled() && changed.send(()).is_err() {
            return;
        }
        let mut due: Option<Instant> = None;
        let mut next_poll = Instant::now() + POLL;
        while !stopped.load(Ordering::Relaxed) {
            let until = due.unwrap_or(next_poll).min(next_poll);
            let wait = until.saturating_duration_since(Instant::now());
            match &inotify {
                Some(i) => {
                    let mut pfd = libc::pollfd {
                        fd: i.as_fd().as_raw_fd(),
                        events: libc::POLLIN,
                        revents: 0,
                    };
                    // SAFETY: one valid pollfd, for the duration of the call.
                    let ready = unsafe { libc::poll(&mut pfd, 1, wait.as_millis() as libc::c_int) };
                    if ready > 0 && !i.read_events().unwrap_or_default().is_empty() {
                        due = Some(Instant::now() + SETTLE);
                    }
                }
                None => std::thread::sleep(wait),
            }
            let now = Instant::now();
            let polled = now >= next_poll;
            let settled = due.is_some_and(|d| now >= d);
            if !polled && !settled {
                continue;
            }
            if polled {
                next_poll = now + POLL;
            }
            if settled {
                due = None;
            }
            let fp = targets.fingerprint();
            if fp != last {
                last = fp;
                // New slices or parents may have appeared: watch them too.
                add_watches(&inotify);
                if stopped.load(Ordering::Relaxed) || changed.send(()).is_err() {
                    return;
                }
            }
        }
    });
    stop
}
