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
