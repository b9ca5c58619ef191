//! Notices: what `ztd` itself reports next to the kernel's decisions — an identity whose
//! resolution changed under a loaded policy (a replaced executable, a recreated unit cgroup,
//! a content hash that no longer matches). They go to the log and to `ztctl events` (as
//! `{"notice":{...}}` lines in `--json`), never into the decision counters.

use serde::{Deserialize, Serialize};
use zt_common::NoticeKind;

use crate::{
    history::rfc3339_ns,
    policy::{CgroupMatch, ExeMatch, IdentityInfo},
};

/// One notice. **The field names are a contract** (add fields, never rename or remove).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct Notice {
    /// RFC 3339, UTC, milliseconds.
    pub time: String,
    /// The same instant in nanoseconds since the Unix epoch.
    pub time_ns: u64,
    /// Stable numeric code ([`zt_common::NoticeKind`]).
    pub code: u16,
    /// Stable name of `code` (`exe_replaced`, `sha256_mismatch`, ...).
    pub kind: String,
    /// The identity concerned, as declared (`[identity.NAME]`).
    pub identity: String,
    /// What happened and what zt did, for a person.
    pub message: String,
    /// The policy generation in force after ztd acted (0 if none was written).
    pub generation: u64,
}

impl Notice {
    pub fn new(kind: NoticeKind, identity: &str, message: String, time_ns: u64) -> Notice {
        Notice {
            time: rfc3339_ns(time_ns),
            time_ns,
            code: kind as u16,
            kind: kind.name().to_string(),
            identity: identity.to_string(),
            message,
            generation: 0,
        }
    }

    /// One line for the text log and `ztctl events`.
    pub fn text(&self) -> String {
        format!(
            "{} notice {} identity={} {}",
            self.time,
            self.kind,
            crate::trust::escape(&self.identity),
            crate::trust::escape(&self.message)
        )
    }
}

/// `maj:min:inode` of an executable key.
pub fn exe_text(exe: &ExeMatch) -> String {
    format!(
        "{} ({}:{}, inode {})",
        exe.path.display(),
        exe.key.dev >> 20,
        exe.key.dev & 0xf_ffff,
        exe.key.ino
    )
}

fn cgroup_text(cg: &CgroupMatch) -> String {
    match cg.id {
        Some(id) => format!("/{} (id {id})", cg.path),
        None => format!("/{} (absent)", cg.path),
    }
}

/// What changed between two resolutions of the same policy, per identity (by name): the
/// notices to raise. Identities only in one of the two (a policy edit) are not reported.
pub fn changes(old: &[IdentityInfo], new: &[IdentityInfo]) -> Vec<(NoticeKind, String, String)> {
    let mut out = Vec::new();
    for n in new {
        let Some(o) = old.iter().find(|o| o.name == n.name) else {
            continue;
        };
        let name = n.name.clone();
        if let Some(problem) = &n.problem {
            if o.problem.as_ref() != Some(problem) {
                let kind = if problem.starts_with("sha256 mismatch") {
                    NoticeKind::HashMismatch
                } else {
                    NoticeKind::ExeMissing
                };
                out.push((
                    kind,
                    name,
                    format!("{problem}; the identity is disabled (matches nothing)"),
                ));
            }
            continue;
        }
        if let (Some(oe), Some(ne)) = (&o.exe, &n.exe) {
            if o.problem.is_some() {
                out.push((
                    NoticeKind::Restored,
                    name.clone(),
                    format!(
                        "{} passes the identity's checks again{}; the identity matches it",
                        exe_text(ne),
                        if n.sha256.is_some() {
                            " (sha256 verified)"
                        } else {
                            ""
                        }
                    ),
                ));
            } else if oe.key != ne.key {
                out.push((
                    NoticeKind::ExeReplaced,
                    name.clone(),
                    format!(
                        "the file at {} was replaced: was {}:{} inode {}, now {}:{} inode {}{}; \
                         the rules follow the new file (processes still running the old one \
                         no longer match)",
                        ne.path.display(),
                        oe.key.dev >> 20,
                        oe.key.dev & 0xf_ffff,
                        oe.key.ino,
                        ne.key.dev >> 20,
                        ne.key.dev & 0xf_ffff,
                        ne.key.ino,
                        if n.sha256.is_some() {
                            " (sha256 verified)"
                        } else {
                            ""
                        }
                    ),
                ));
            }
        }
        if let (Some(oc), Some(nc)) = (&o.cgroup, &n.cgroup) {
            if oc.id != nc.id || oc.path != nc.path {
                let what = match &n.unit {
                    Some(u) => format!("unit {u}"),
                    None => "cgroup".to_string(),
                };
                match nc.id {
                    Some(_) => out.push((
                        NoticeKind::CgroupChanged,
                        name.clone(),
                        format!(
                            "{what} is now {} (was {}); the rules follow the new cgroup and the \
                             old id is removed",
                            cgroup_text(nc),
                            cgroup_text(oc)
                        ),
                    )),
                    None => out.push((
                        NoticeKind::CgroupGone,
                        name.clone(),
                        format!(
                            "{what} has no cgroup any more (was {}); the identity matches \
                             nothing until it is back",
                            cgroup_text(oc)
                        ),
                    )),
                }
            }
        }
        if o.uid != n.uid || o.gid != n.gid {
            out.push((
                NoticeKind::AccountChanged,
                name,
                format!(
                    "user/group now resolve to uid {:?} gid {:?} (were uid {:?} gid {:?})",
                    n.uid, n.gid, o.uid, o.gid
                ),
            ));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::Mode;
    use std::path::PathBuf;
    use zt_common::ExeKey;

    fn info(ino: u64, cgroup: Option<u64>, problem: Option<&str>) -> IdentityInfo {
        IdentityInfo {
            bit: 1,
            name: "web".into(),
            path: PathBuf::from("p.toml"),
            line: 1,
            column: 1,
            mode: Mode::Enforce,
            exe: Some(ExeMatch {
                path: PathBuf::from("/usr/sbin/nginx"),
                key: ExeKey {
                    dev: (8 << 20) | 1,
                    ino,
                },
                real_path: None,
            }),
            sha256: None,
            uid: Some(33),
            user: Some("www-data".into()),
            gid: None,
            group: None,
            unit: Some("nginx.service".into()),
            cgroup: Some(CgroupMatch {
                path: "system.slice/nginx.service".into(),
                level: 2,
                id: cgroup,
            }),
            matchable: problem.is_none() && cgroup.is_some(),
            problem: problem.map(str::to_string),
        }
    }

    fn kinds(old: IdentityInfo, new: IdentityInfo) -> Vec<NoticeKind> {
        changes(&[old], &[new]).into_iter().map(|c| c.0).collect()
    }

    #[test]
    fn each_change_is_one_notice() {
        assert!(kinds(info(1, Some(5), None), info(1, Some(5), None)).is_empty());
        assert_eq!(
            kinds(info(1, Some(5), None), info(2, Some(5), None)),
            [NoticeKind::ExeReplaced]
        );
        assert_eq!(
            kinds(info(1, Some(5), None), info(1, Some(6), None)),
            [NoticeKind::CgroupChanged]
        );
        assert_eq!(
            kinds(info(1, Some(5), None), info(1, None, None)),
            [NoticeKind::CgroupGone]
        );
        assert_eq!(
            kinds(
                info(1, Some(5), None),
                info(2, Some(5), Some("sha256 mismatch: x"))
            ),
            [NoticeKind::HashMismatch]
        );
        assert_eq!(
            kinds(
                info(1, Some(5), None),
                info(0, Some(5), Some("executable x does not exist"))
            ),
            [NoticeKind::ExeMissing]
        );
        assert_eq!(
            kinds(info(0, Some(5), Some("gone")), info(3, Some(5), None)),
            [NoticeKind::Restored]
        );
        let mut other_uid = info(1, Some(5), None);
        other_uid.uid = Some(34);
        assert_eq!(
            kinds(info(1, Some(5), None), other_uid),
            [NoticeKind::AccountChanged]
        );
        // The same problem again is not news.
        assert!(kinds(info(0, None, Some("gone")), info(0, None, Some("gone"))).is_empty());
    }
}
