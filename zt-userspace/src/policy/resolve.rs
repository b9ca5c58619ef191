//! Turning the names of a policy (users, groups, executable paths, cgroup paths) into the
//! numbers the kernel reports about a task (uid, gid, device+inode, cgroup id).
//!
//! Behind a trait so that validation can be tested without depending on the machine;
//! [`SystemResolver`] is the real thing.

use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Component, Path, PathBuf};

use nix::unistd::{Group, User};
use zt_common::ExeKey;

/// Looks up what a policy names on the running system.
pub trait Resolve {
    /// The uid of a user name (`None`: no such user).
    fn uid_of(&self, user: &str) -> Option<u32>;
    /// The gid of a group name (`None`: no such group).
    fn gid_of(&self, group: &str) -> Option<u32>;
    /// Device (kernel encoding) and inode of the regular file `path` resolves to now.
    fn exe(&self, path: &Path) -> io::Result<ExeKey>;
    /// The id of the cgroup `rel` (relative to the cgroup2 root).
    fn cgroup_id(&self, rel: &str) -> io::Result<u64>;
    /// Device+inode of the regular file `path` resolves to and the SHA-256 of its content,
    /// both taken from one open file (so they describe the same inode).
    fn exe_hashed(&self, path: &Path) -> io::Result<(ExeKey, [u8; 32])> {
        let _ = path;
        Err(io::Error::new(
            io::ErrorKind::Unsupported,
            "content hashing is not available here",
        ))
    }
    /// The cgroup of systemd unit `unit`: its path relative to the cgroup2 root and its id.
    fn unit_cgroup(&self, unit: &str) -> io::Result<(String, u64)> {
        Err(io::Error::new(
            io::ErrorKind::NotFound,
            format!("no cgroup for unit {unit}"),
        ))
    }
    /// The file `path` resolves to through symlinks, if it differs.
    fn real_path(&self, path: &Path) -> Option<PathBuf> {
        let _ = path;
        None
    }
    /// Why a non-root user could replace the executable `path` resolves to (it, or a
    /// directory above it, is not root's alone), or `None` ([`crate::trust`]).
    fn exe_untrusted(&self, path: &Path) -> Option<String> {
        let _ = path;
        None
    }
    /// True when re-resolving a loaded policy automatically (ztd noticed a change): an `exe`
    /// that is missing then disables its identity instead of refusing the whole policy.
    fn lenient(&self) -> bool {
        false
    }
}

/// [`Resolve`] against this machine: NSS for users and groups, `stat` for executables and
/// cgroup directories.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SystemResolver {
    /// Where cgroup2 is mounted (usually `/sys/fs/cgroup`).
    pub cgroup_root: PathBuf,
}

impl Default for SystemResolver {
    fn default() -> Self {
        SystemResolver {
            cgroup_root: PathBuf::from("/sys/fs/cgroup"),
        }
    }
}

impl Resolve for SystemResolver {
    fn uid_of(&self, user: &str) -> Option<u32> {
        User::from_name(user).ok().flatten().map(|u| u.uid.as_raw())
    }

    fn gid_of(&self, group: &str) -> Option<u32> {
        Group::from_name(group)
            .ok()
            .flatten()
            .map(|g| g.gid.as_raw())
    }

    fn exe(&self, path: &Path) -> io::Result<ExeKey> {
        // Follows symlinks: the identity pins the file the path resolves to now.
        let meta = std::fs::metadata(path)?;
        if !meta.is_file() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "not a regular file",
            ));
        }
        Ok(ExeKey {
            dev: kernel_dev(meta.dev()),
            ino: meta.ino(),
        })
    }

    fn exe_hashed(&self, path: &Path) -> io::Result<(ExeKey, [u8; 32])> {
        hash_file(path)
    }

    fn unit_cgroup(&self, unit: &str) -> io::Result<(String, u64)> {
        find_unit(&self.cgroup_root, &self.cgroup_root, unit)
    }

    fn real_path(&self, path: &Path) -> Option<PathBuf> {
        std::fs::canonicalize(path).ok().filter(|p| p != path)
    }

    fn exe_untrusted(&self, path: &Path) -> Option<String> {
        crate::trust::untrusted_reason(path)
    }

    fn cgroup_id(&self, rel: &str) -> io::Result<u64> {
        let rel_path = Path::new(rel);
        if rel.is_empty()
            || rel_path
                .components()
                .any(|c| !matches!(c, Component::Normal(_) | Component::CurDir))
        {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "a cgroup must be a relative path below the cgroup2 root, without `..`",
            ));
        }
        let meta = std::fs::metadata(self.cgroup_root.join(rel_path))?;
        if !meta.is_dir() {
            return Err(io::Error::new(
                io::ErrorKind::NotADirectory,
                "not a cgroup directory",
            ));
        }
        // On cgroup2 the inode number of a cgroup's directory is its cgroup id.
        Ok(meta.ino())
    }
}

/// [`SystemResolver`] as `ztd` uses it: units are searched below `units_root` (`--units-root`,
/// default the cgroup2 root), and automatic re-resolution is [`Resolve::lenient`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LiveResolver {
    pub system: SystemResolver,
    pub units_root: PathBuf,
    pub lenient: bool,
}

impl Resolve for LiveResolver {
    fn uid_of(&self, user: &str) -> Option<u32> {
        self.system.uid_of(user)
    }
    fn gid_of(&self, group: &str) -> Option<u32> {
        self.system.gid_of(group)
    }
    fn exe(&self, path: &Path) -> io::Result<ExeKey> {
        self.system.exe(path)
    }
    fn cgroup_id(&self, rel: &str) -> io::Result<u64> {
        self.system.cgroup_id(rel)
    }
    fn exe_hashed(&self, path: &Path) -> io::Result<(ExeKey, [u8; 32])> {
        self.system.exe_hashed(path)
    }
    fn unit_cgroup(&self, unit: &str) -> io::Result<(String, u64)> {
        find_unit(&self.system.cgroup_root, &self.units_root, unit)
    }
    fn real_path(&self, path: &Path) -> Option<PathBuf> {
        self.system.real_path(path)
    }
    fn exe_untrusted(&self, path: &Path) -> Option<String> {
        self.system.exe_untrusted(path)
    }
    fn lenient(&self) -> bool {
        self.lenient
    }
}

/// Hashes the file `path` resolves to. The key comes from `fstat` of the descriptor that is
/// read, so a rename between the two cannot pair one file's inode with another's content.
fn hash_file(path: &Path) -> io::Result<(ExeKey, [u8; 32])> {
    use sha2::{Digest, Sha256};
    use std::io::Read;
    let mut file = std::fs::File::open(path)?;
    let meta = file.metadata()?;
    if !meta.is_file() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "not a regular file",
        ));
    }
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 16];
    loop {
        let n = file.read(&mut buf)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    let key = ExeKey {
        dev: kernel_dev(meta.dev()),
        ino: meta.ino(),
    };
    Ok((key, hasher.finalize().into()))
}

/// Lower-case hex of a digest.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// How deep below the units root a unit's cgroup is searched.
const UNIT_SEARCH_DEPTH: usize = 6;

/// Is `name` a user manager's cgroup (`user@UID.service`)? Below it, the user creates cgroups.
fn is_user_manager(name: &str) -> bool {
    name.starts_with("user@") && name.ends_with(".service")
}

/// The unit a policy names, as [`find_unit`] takes it: `NAME` for a system unit, or
/// `user@UID.service/NAME` for unit NAME of user UID's manager (`user_unit = "UID:NAME"`).
pub fn user_unit_key(uid: u32, name: &str) -> String {
    format!("user@{uid}.service/{name}")
}

/// Why the cgroup directory `dir` (below `cgroup_root`) is not one that only root, or only
/// root and `owner`, can have made: a directory from `cgroup_root` down to `dir` that is owned
/// by another uid or writable by group or others. `None`: trusted.
fn untrusted_cgroup(cgroup_root: &Path, dir: &Path, owner: Option<(u32, &Path)>) -> Option<String> {
    use std::os::unix::fs::PermissionsExt;
    let mut d = Some(dir);
    while let Some(cur) = d {
        if !cur.starts_with(cgroup_root) {
            break;
        }
        let meta = match std::fs::metadata(cur) {
            Ok(m) => m,
            Err(e) => return Some(format!("{}: {e}", cur.display())),
        };
        let uid_ok = meta.uid() == 0
            || owner.is_some_and(|(uid, below)| meta.uid() == uid && cur.starts_with(below));
        if !uid_ok {
            return Some(format!("{} is owned by uid {}", cur.display(), meta.uid()));
        }
        let mode = meta.permissions().mode() & 0o7777;
        if mode & 0o022 != 0 {
            return Some(format!(
                "{} has mode {mode:04o} (group or others may create cgroups there)",
                cur.display()
            ));
        }
        if cur == cgroup_root {
            break;
        }
        d = cur.parent();
    }
    None
}

/// Finds the cgroup of systemd unit `unit` below `units_root` (itself below `cgroup_root`, the
/// cgroup2 mount), without systemd. Returns the path relative to `cgroup_root` and the cgroup
/// id.
///
/// A unit's cgroup must be one a user cannot make: otherwise a user who creates a cgroup of
/// the unit's name (in a subtree systemd delegated to it) while the real unit is not running
/// would inherit the unit's rules. So:
/// - a system unit (`NAME`) is searched in `system.slice/NAME`, then `NAME` directly below
///   the root, then breadth-first through slices (`*.slice`), at most
///   [`UNIT_SEARCH_DEPTH`] levels down, in name order — never below a user manager
///   (`user@UID.service`), and only where every directory from the cgroup2 root down to the
///   unit's is owned by root and writable by root alone;
/// - a user unit (`user@UID.service/NAME`, from `user_unit = "UID:NAME"`) is searched below
///   `user.slice/user-UID.slice/user@UID.service` (and its slices), where the directories
///   from the manager down may be owned by UID too, and those above it by root only.
///
/// A candidate that fails these checks is skipped (the error, when nothing else is found,
/// says why).
pub fn find_unit(cgroup_root: &Path, units_root: &Path, unit: &str) -> io::Result<(String, u64)> {
    let (start, name, owner, system) = match unit.split_once('/') {
        Some((manager, name)) => {
            let uid = manager
                .strip_prefix("user@")
                .and_then(|m| m.strip_suffix(".service"))
                .and_then(|u| u.parse::<u32>().ok())
                .ok_or_else(|| {
                    io::Error::new(io::ErrorKind::InvalidInput, format!("bad user unit {unit}"))
                })?;
            let start = units_root
                .join("user.slice")
                .join(format!("user-{uid}.slice"))
                .join(manager);
            (start, name, Some(uid), false)
        }
        None => (units_root.to_path_buf(), unit, None, true),
    };
    let mut skipped: Vec<String> = Vec::new();
    let mut found = |dir: &Path| -> Option<io::Result<(String, u64)>> {
        let meta = std::fs::metadata(dir).ok().filter(|m| m.is_dir())?;
        if let Some(why) = untrusted_cgroup(cgroup_root, dir, owner.map(|u| (u, start.as_path()))) {
            skipped.push(why);
            return None;
        }
        Some(
            dir.strip_prefix(cgroup_root)
                .map_err(|_| {
                    io::Error::new(
                        io::ErrorKind::InvalidInput,
                        format!(
                            "the units root {} is not below the cgroup2 mount {}",
                            units_root.display(),
                            cgroup_root.display()
                        ),
                    )
                })
                .map(|rel| (rel.to_string_lossy().into_owned(), meta.ino())),
        )
    };
    let firsts = if system {
        vec![start.join("system.slice").join(name), start.join(name)]
    } else {
        vec![start.join(name)]
    };
    for first in firsts {
        if let Some(r) = found(&first) {
            return r;
        }
    }
    let mut level = vec![start.clone()];
    for _ in 0..UNIT_SEARCH_DEPTH {
        let mut next = Vec::new();
        for dir in &level {
            let Ok(entries) = std::fs::read_dir(dir) else {
                continue;
            };
            let mut names: Vec<String> = entries
                .flatten()
                .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
                .filter_map(|e| e.file_name().into_string().ok())
                .collect();
            names.sort();
            for n in names {
                if n == name {
                    if let Some(r) = found(&dir.join(&n)) {
                        return r;
                    }
                }
                // A system unit never lives below a user manager: that is the user's tree.
                if n.ends_with(".slice") {
                    next.push(dir.join(&n));
                }
            }
        }
        if next.is_empty() {
            break;
        }
        level = next;
    }
    let ignored = if skipped.is_empty() {
        String::new()
    } else {
        format!(
            "; ignored, as a user could have made them: {}",
            skipped.join(", ")
        )
    };
    Err(io::Error::new(
        io::ErrorKind::NotFound,
        if system {
            format!(
                "no cgroup named {name} below {} (system.slice, slices; not below user managers){ignored}",
                units_root.display()
            )
        } else {
            format!("no cgroup named {name} below {}{ignored}", start.display())
        },
    ))
}

/// The directories whose entries decide where [`find_unit`] finds units: the units root and
/// every slice and user manager below it (what `ztd` watches for units).
pub fn unit_search_dirs(units_root: &Path) -> Vec<PathBuf> {
    let mut out = vec![units_root.to_path_buf()];
    let mut level = vec![units_root.to_path_buf()];
    for _ in 0..UNIT_SEARCH_DEPTH {
        let mut next = Vec::new();
        for dir in &level {
            let Ok(entries) = std::fs::read_dir(dir) else {
                continue;
            };
            for e in entries.flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                if e.file_type().is_ok_and(|t| t.is_dir())
                    && (name.ends_with(".slice") || is_user_manager(&name))
                {
                    next.push(e.path());
                }
            }
        }
        out.extend(next.iter().cloned());
        if next.is_empty() {
            break;
        }
        level = next;
    }
    out
}

/// Converts a userspace `st_dev` to the kernel's internal encoding (`major << 20 | minor`),
/// which is what the programs read from `inode->i_sb->s_dev`.
pub fn kernel_dev(st_dev: u64) -> u64 {
    let major = u64::from(libc::major(st_dev));
    let minor = u64::from(libc::minor(st_dev));
    (major << 20) | minor
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn st_dev_to_kernel_dev() {
        // sda1: 8:1.
        assert_eq!(kernel_dev(libc::makedev(8, 1)), (8 << 20) | 1);
        // nvme0n1p2: 259:2.
        assert_eq!(kernel_dev(libc::makedev(259, 2)), (259 << 20) | 2);
        // Anonymous devices (overlayfs, btrfs subvolumes...): major 0, large minor.
        assert_eq!(kernel_dev(libc::makedev(0, 0x1_2345)), 0x1_2345);
        // The userspace encoding splits major and minor into several bit fields: minor bits
        // 8.. go above the major's low 12 bits, major bits 12.. go to the top word.
        // 253:300 is 0x0010_fd2c in st_dev.
        assert_eq!(kernel_dev(0x0010_fd2c), (253 << 20) | 300);
        assert_eq!(kernel_dev(libc::makedev(253, 300)), (253 << 20) | 300);
        // Major 0x1234 (bits above 12 set), minor 5.
        assert_eq!(kernel_dev(0x0000_1000_0002_3405), (0x1234 << 20) | 5);
    }

    #[test]
    fn system_resolver_on_this_machine() {
        let r = SystemResolver::default();
        assert_eq!(r.uid_of("root"), Some(0));
        assert_eq!(r.gid_of("root"), Some(0));
        assert_eq!(r.uid_of("no-such-user-zt-test"), None);
        assert_eq!(r.gid_of("no-such-group-zt-test"), None);

        let sh = r.exe(Path::new("/bin/sh")).expect("/bin/sh resolves");
        // Through the symlink (if any) to the real file.
        let real = std::fs::metadata("/bin/sh").expect("stat /bin/sh");
        assert_eq!(sh.ino, real.ino());
        assert_eq!(sh.dev, kernel_dev(real.dev()));

        let missing = r
            .exe(Path::new("/no/such/zt/exe"))
            .expect_err("missing exe");
        assert_eq!(missing.kind(), io::ErrorKind::NotFound);
        let dir = r
            .exe(Path::new("/"))
            .expect_err("a directory is not an exe");
        assert_eq!(dir.kind(), io::ErrorKind::InvalidInput);
    }

    #[test]
    fn units_are_found_in_slices() {
        let root = tempfile::tempdir().expect("tempdir");
        let units = root.path().join("units");
        for d in [
            "units/system.slice/a.service",
            "units/user.slice/user-1000.slice/user@1000.service/app.slice/b.service",
            "units/c.slice/d.slice/c.service",
            "units/other/x.service",
        ] {
            std::fs::create_dir_all(root.path().join(d)).expect("mkdir");
        }
        let ino = |p: &str| std::fs::metadata(root.path().join(p)).expect("stat").ino();
        assert_eq!(
            find_unit(root.path(), &units, "a.service").expect("a"),
            (
                "units/system.slice/a.service".into(),
                ino("units/system.slice/a.service")
            )
        );
        // A unit below a user manager is the user's: not a system unit, only a user unit.
        let b = "units/user.slice/user-1000.slice/user@1000.service/app.slice/b.service";
        let e = find_unit(root.path(), &units, "b.service").expect_err("b is the user's");
        assert_eq!(e.kind(), io::ErrorKind::NotFound);
        assert_eq!(
            find_unit(root.path(), &units, &user_unit_key(1000, "b.service")).expect("b"),
            (b.into(), ino(b))
        );
        assert!(find_unit(root.path(), &units, &user_unit_key(1001, "b.service")).is_err());
        assert_eq!(
            find_unit(root.path(), &units, "c.service").expect("c").0,
            "units/c.slice/d.slice/c.service"
        );
        if nix::unistd::Uid::effective().is_root() {
            use std::os::unix::fs::PermissionsExt;
            // A cgroup a user made (owned by it), or a slice others may write, is not a
            // system unit's, even outside user managers.
            std::fs::create_dir_all(root.path().join("units/evil.slice/e.service")).expect("mkdir");
            std::os::unix::fs::chown(root.path().join("units/evil.slice"), Some(65534), None)
                .expect("chown");
            let e = find_unit(root.path(), &units, "e.service").expect_err("user-made");
            assert!(e.to_string().contains("uid 65534"), "{e}");
            std::fs::create_dir_all(root.path().join("units/open.slice/o.service")).expect("mkdir");
            std::fs::set_permissions(
                root.path().join("units/open.slice"),
                std::fs::Permissions::from_mode(0o777),
            )
            .expect("chmod");
            let e = find_unit(root.path(), &units, "o.service").expect_err("world-writable");
            assert!(e.to_string().contains("mode 0777"), "{e}");
            // The user's own subtree is fine for its user units.
            let mgr = root
                .path()
                .join("units/user.slice/user-1000.slice/user@1000.service");
            for d in [
                mgr.clone(),
                mgr.join("app.slice"),
                mgr.join("app.slice/b.service"),
            ] {
                std::os::unix::fs::chown(&d, Some(1000), None).expect("chown");
            }
            assert_eq!(
                find_unit(root.path(), &units, &user_unit_key(1000, "b.service"))
                    .expect("b")
                    .0,
                b
            );
            // ...but not another user's cgroup in it.
            std::os::unix::fs::chown(mgr.join("app.slice/b.service"), Some(1001), None)
                .expect("chown");
            assert!(find_unit(root.path(), &units, &user_unit_key(1000, "b.service")).is_err());
        }
        // Only slices and user managers are searched.
        let e = find_unit(root.path(), &units, "x.service").expect_err("x");
        assert_eq!(e.kind(), io::ErrorKind::NotFound);
        let dirs = unit_search_dirs(&units);
        assert!(dirs.contains(&units.join("system.slice")));
        assert!(!dirs.contains(&units.join("other")));
    }

    #[test]
    fn hashes_describe_the_file_opened() {
        let dir = tempfile::tempdir().expect("tempdir");
        let f = dir.path().join("f");
        std::fs::write(&f, b"abc").expect("write");
        let (key, sum) = hash_file(&f).expect("hash");
        assert_eq!(
            hex(&sum),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        assert_eq!(key.ino, std::fs::metadata(&f).expect("stat").ino());
        assert!(hash_file(dir.path()).is_err());
    }

    #[test]
    fn cgroup_ids_are_directory_inodes() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::create_dir_all(dir.path().join("a/b")).expect("mkdir");
        let r = SystemResolver {
            cgroup_root: dir.path().to_path_buf(),
        };
        let ino = std::fs::metadata(dir.path().join("a/b"))
            .expect("stat")
            .ino();
        assert_eq!(r.cgroup_id("a/b").expect("exists"), ino);
        let missing = r.cgroup_id("a/c").expect_err("missing");
        assert_eq!(missing.kind(), io::ErrorKind::NotFound);
        for bad in ["/a", "a/../a", "..", ""] {
            let e = r.cgroup_id(bad).expect_err(bad);
            assert_eq!(e.kind(), io::ErrorKind::InvalidInput, "{bad}");
        }
    }
}
