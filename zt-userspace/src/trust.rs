//! What ztd accepts as input from the system, and how it prints what the system hands it.
//!
//! ztd runs as root and turns files into kernel policy: a policy file another user may write
//! is a way for that user to grant itself anything. Like sshd's `StrictModes`, ztd reads only
//! files that root alone can change: the file (or policy directory) owned by root and not
//! writable by group or others, and every directory above it owned by root and not writable
//! by group or others — except a sticky directory owned by root (`/tmp`): there nobody but
//! root may rename or remove root's entries. Symlinks are followed first (a Kubernetes
//! ConfigMap's `..data` link included), so the file checked is the file read.
//!
//! The same chain check tells whether a non-root user can replace an `exe` an identity names
//! (a warning unless the identity pins `sha256`), and whether a non-root user can move
//! processes out of the guarded cgroup (a writable `cgroup.procs` above it).
//!
//! Text that comes from the system (executable paths, comm, argv, unit and user names) may
//! hold control characters: a file name with a newline would otherwise forge a second line
//! in ztd's log. [`escape`] writes them as `\xNN` (and a backslash as `\\`).

use std::{
    borrow::Cow,
    fmt::Write as _,
    os::unix::fs::{MetadataExt, PermissionsExt},
    path::{Path, PathBuf},
};

use crate::policy::{Diagnostic, Loc};

/// Whether `path` lies on a read-only mount (`statvfs`: `ST_RDONLY`).
fn read_only_mount(path: &Path) -> bool {
    use std::os::unix::ffi::OsStrExt;
    let Ok(c) = std::ffi::CString::new(path.as_os_str().as_bytes()) else {
        return false;
    };
    // SAFETY: a zeroed statvfs is a valid out-parameter; `c` is a NUL-terminated path.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: as above; the kernel writes only into `st`.
    let ret = unsafe { libc::statvfs(c.as_ptr(), &mut st) };
    ret == 0 && st.f_flag & libc::ST_RDONLY != 0
}

/// Group- or world-writable.
const GO_WRITE: u32 = 0o022;
const STICKY: u32 = 0o1000;

/// Why `path` (after symlinks) is not safe from non-root users, or `None` when it is: it and
/// every directory above it are owned by root and writable by root alone (directories above
/// may be sticky and root-owned instead).
pub fn untrusted_reason(path: &Path) -> Option<String> {
    let real = match std::fs::canonicalize(path) {
        Ok(p) => p,
        Err(e) => return Some(format!("{}: {e}", path.display())),
    };
    let meta = match std::fs::metadata(&real) {
        Ok(m) => m,
        Err(e) => return Some(format!("{}: {e}", real.display())),
    };
    let shown = |p: &Path| {
        if p == path {
            p.display().to_string()
        } else {
            format!("{} (the target of {})", p.display(), path.display())
        }
    };
    let frozen = read_only_mount(&real);
    if meta.uid() != 0 && !frozen {
        return Some(format!(
            "{} is owned by uid {}, not root",
            shown(&real),
            meta.uid()
        ));
    }
    let mode = meta.permissions().mode() & 0o7777;
    if mode & GO_WRITE != 0 && !frozen {
        return Some(format!(
            "{} has mode {mode:04o}: group or others may write it",
            shown(&real)
        ));
    }
    let mut dir: Option<&Path> = real.parent();
    while let Some(d) = dir {
        match std::fs::metadata(d) {
            Ok(_) if read_only_mount(d) => {}
            Ok(m) => {
                let mode = m.permissions().mode() & 0o7777;
                if m.uid() != 0 {
                    return Some(format!(
                        "directory {} above {} is owned by uid {}, not root",
                        d.display(),
                        real.display(),
                        m.uid()
                    ));
                }
                if mode & GO_WRITE != 0 && mode & STICKY == 0 {
                    return Some(format!(
                        "directory {} above {} has mode {mode:04o}: group or others may replace what it holds",
                        d.display(),
                        real.display()
                    ));
                }
            }
            Err(e) => return Some(format!("{}: {e}", d.display())),
        }
        dir = d.parent();
    }
    None
}

/// Why another user could replace what directory `dir` holds (it, or a directory above it,
/// is not root's or is writable by group or others without being sticky and root's), or
/// `None`. For the control socket's directory.
pub fn unsafe_dir_reason(dir: &Path) -> Option<String> {
    let real = match std::fs::canonicalize(dir) {
        Ok(p) => p,
        Err(e) => return Some(format!("{}: {e}", dir.display())),
    };
    let mut d: Option<&Path> = Some(&real);
    while let Some(cur) = d {
        match std::fs::metadata(cur) {
            Ok(m) => {
                let mode = m.permissions().mode() & 0o7777;
                if m.uid() != 0 {
                    return Some(format!(
                        "{} is owned by uid {}, not root",
                        cur.display(),
                        m.uid()
                    ));
                }
                if mode & GO_WRITE != 0 && mode & STICKY == 0 {
                    return Some(format!(
                        "{} has mode {mode:04o}: group or others may replace what it holds",
                        cur.display()
                    ));
                }
            }
            Err(e) => return Some(format!("{}: {e}", cur.display())),
        }
        d = cur.parent();
    }
    None
}

/// The policy paths (as given) and the files read from them that fail [`untrusted_reason`],
/// as error diagnostics (ztd refuses such a policy; the policy in force stays).
pub fn policy_diagnostics(paths: &[PathBuf], files: &[PathBuf]) -> Vec<Diagnostic> {
    let mut out = Vec::new();
    let mut seen = std::collections::HashSet::new();
    for p in paths.iter().chain(files) {
        if !seen.insert(p.clone()) || !p.exists() {
            // A missing path is reported by the reader.
            continue;
        }
        if let Some(why) = untrusted_reason(p) {
            out.push(Diagnostic::error(
                p,
                Loc::START,
                format!(
                    "refused: {why}. ztd reads only policy files and directories that root alone \
                     can change (owned by root, not group- or world-writable, in directories \
                     of the same kind): `chown root: PATH; chmod go-w PATH`"
                ),
            ));
        }
    }
    out
}

/// When the guarded cgroup `cgroup` lies below a cgroup whose `cgroup.procs` a non-root user
/// may write (delegation, or a loose mode): a warning naming it. Such a user can move its own
/// processes from the guarded cgroup into that cgroup (the kernel requires write access to
/// the `cgroup.procs` of the common ancestor), where zt's programs do not run. Descendants of
/// the guarded cgroup do not matter: its programs run for them too.
pub fn cgroup_escape_warning(cgroup: &Path, cgroup_root: &Path) -> Option<String> {
    let mut dir = cgroup.parent();
    while let Some(d) = dir {
        if !d.starts_with(cgroup_root) {
            break;
        }
        let procs = d.join("cgroup.procs");
        if let Ok(m) = std::fs::metadata(&procs) {
            let mode = m.permissions().mode();
            let who = if m.uid() != 0 && mode & 0o200 != 0 {
                Some(format!("uid {}", m.uid()))
            } else if mode & 0o020 != 0 && m.gid() != 0 {
                Some(format!("group {}", m.gid()))
            } else if mode & 0o002 != 0 {
                Some("every user".to_string())
            } else {
                None
            };
            if let Some(who) = who {
                return Some(format!(
                    "the guarded cgroup {} lies below {}, whose cgroup.procs {who} may write (mode {:04o}): \
                     such a user can move its processes out of the guarded cgroup, where zt does not \
                     see them; guard {} (or a cgroup above it) instead, or take the delegation back",
                    cgroup.display(),
                    d.display(),
                    mode & 0o7777,
                    d.display()
                ));
            }
        }
        if d == cgroup_root {
            break;
        }
        dir = d.parent();
    }
    None
}

/// `s` with control characters written as `\xNN` (C1 controls as `\u{NN}`) and a backslash
/// as `\\`, so that one value is always one piece of one line.
pub fn escape(s: &str) -> Cow<'_, str> {
    if !s.chars().any(|c| c.is_control() || c == '\\') {
        return Cow::Borrowed(s);
    }
    let mut out = String::with_capacity(s.len() + 8);
    for c in s.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            c if c.is_control() && (c as u32) < 0x80 => {
                let _ = write!(out, "\\x{:02x}", c as u32);
            }
            c if c.is_control() => {
                let _ = write!(out, "\\u{{{:x}}}", c as u32);
            }
            c => out.push(c),
        }
    }
    Cow::Owned(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_characters_are_escaped() {
        assert_eq!(escape("/usr/bin/curl"), "/usr/bin/curl");
        assert_eq!(escape("a\nb"), "a\\x0ab");
        assert_eq!(escape("a\r\x1b[2Jb\x7f"), "a\\x0d\\x1b[2Jb\\x7f");
        assert_eq!(escape("back\\x0a"), "back\\\\x0a");
        assert_eq!(escape("c1\u{85}"), "c1\\u{85}");
        assert_eq!(escape("ünïcode"), "ünïcode");
    }

    #[test]
    fn modes_and_owners_decide_trust() {
        if !nix::unistd::Uid::effective().is_root() {
            return; // ownership by root cannot be set up otherwise
        }
        let dir = tempfile::tempdir().expect("tempdir");
        let f = dir.path().join("p.toml");
        std::fs::write(&f, "version = 1\n").expect("write");
        std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o644)).expect("chmod");
        assert_eq!(
            untrusted_reason(&f),
            None,
            "root-owned 0644 in a 0700 dir in /tmp"
        );
        std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o666)).expect("chmod");
        let why = untrusted_reason(&f).expect("world-writable");
        assert!(why.contains("mode 0666"), "{why}");
        std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o644)).expect("chmod");
        std::os::unix::fs::chown(&f, Some(65534), None).expect("chown");
        let why = untrusted_reason(&f).expect("not root's");
        assert!(why.contains("uid 65534"), "{why}");
        std::os::unix::fs::chown(&f, Some(0), None).expect("chown");
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o777))
            .expect("chmod dir");
        let why = untrusted_reason(&f).expect("dir writable");
        assert!(why.contains("directory"), "{why}");
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o1777))
            .expect("chmod dir");
        assert_eq!(untrusted_reason(&f), None, "a sticky root dir is fine");
        let diags = policy_diagnostics(std::slice::from_ref(&f), &[]);
        assert!(diags.is_empty(), "{diags:?}");
    }

    /// A read-only mount (a Kubernetes ConfigMap volume is one, its directory 0777): nobody
    /// but root can change what it holds. Checked in a mount namespace of one thread, so the
    /// host's mounts are never touched.
    #[test]
    fn a_read_only_mount_is_root_alone_whatever_its_modes() {
        if !nix::unistd::Uid::effective().is_root() {
            return;
        }
        let dir = tempfile::tempdir().expect("tempdir");
        let mnt = dir.path().to_path_buf();
        std::thread::spawn(move || {
            use nix::mount::{mount, MsFlags};
            nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNS).expect("unshare");
            mount(
                None::<&str>,
                "/",
                None::<&str>,
                MsFlags::MS_REC | MsFlags::MS_PRIVATE,
                None::<&str>,
            )
            .expect("make private");
            mount(
                Some("tmpfs"),
                &mnt,
                Some("tmpfs"),
                MsFlags::empty(),
                Some("mode=0777"),
            )
            .expect("mount tmpfs");
            let f = mnt.join("p.toml");
            std::fs::write(&f, "version = 1\n").expect("write");
            std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o666)).expect("chmod");
            let why = untrusted_reason(&f).expect("writable mount: refused");
            assert!(why.contains("0666"), "{why}");
            mount(
                None::<&str>,
                &mnt,
                None::<&str>,
                MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY,
                None::<&str>,
            )
            .expect("remount ro");
            assert_eq!(untrusted_reason(&f), None, "read-only: root alone");
        })
        .join()
        .expect("mount namespace thread");
    }
}
