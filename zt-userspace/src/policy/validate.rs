//! Checks that need the whole policy or the running system: names unique across files, rules
//! naming declared identities and networks, and every user, group, executable and cgroup
//! resolved to what the kernel will see. Produces the [`Policy`] the compiler reads.

use std::collections::HashMap;
use std::io;
use std::path::Path;

use super::diag::{closest, Diagnostic, Loc};
use super::parse::{Account, FileAst, IdentityAst, PeerAst};
use super::{
    hex, CgroupMatch, ExeKey, ExeMatch, Identity, Network, Peer, Policy, PolicyFile, Resolve, Rule,
};

/// Builds the policy from checked files, reporting cross-file and system problems into
/// `diags`. The result is only meaningful when no error was reported.
pub(crate) fn build(
    files: Vec<FileAst>,
    any_file_failed: bool,
    resolver: &dyn Resolve,
    diags: &mut Vec<Diagnostic>,
) -> Policy {
    let mut policy = Policy::default();
    let mut identity_index: HashMap<String, usize> = HashMap::new();
    let mut network_index: HashMap<String, usize> = HashMap::new();
    let note = if any_file_failed {
        " (note: a policy file could not be read or parsed; if it declares this name, fix that \
         file first)"
    } else {
        ""
    };

    for (fi, file) in files.iter().enumerate() {
        policy.files.push(PolicyFile {
            path: file.path.clone(),
            mode: file.mode,
            identities: file.identities.len(),
            networks: file.networks.len(),
            rules: file.rules.len(),
        });
        for id in &file.identities {
            if let Some(&first) = identity_index.get(&id.name) {
                let first = &policy.identities[first];
                diags.push(Diagnostic::error(
                    &file.path,
                    id.loc,
                    format!(
                        "identity `{}` is already declared at {}: names must be unique across \
                         all policy files; rename or remove one of them",
                        id.name,
                        at(policy.file_path(first.file), first.loc)
                    ),
                ));
                continue;
            }
            identity_index.insert(id.name.clone(), policy.identities.len());
            let identity = resolve_identity(fi, file, id, resolver, diags);
            policy.identities.push(identity);
        }
        for net in &file.networks {
            if let Some(&first) = network_index.get(&net.name) {
                let first = &policy.networks[first];
                diags.push(Diagnostic::error(
                    &file.path,
                    net.loc,
                    format!(
                        "network `{}` is already declared at {}: names must be unique across \
                         all policy files; rename or remove one of them",
                        net.name,
                        at(policy.file_path(first.file), first.loc)
                    ),
                ));
                continue;
            }
            network_index.insert(net.name.clone(), policy.networks.len());
            policy.networks.push(Network {
                name: net.name.clone(),
                file: fi,
                loc: net.loc,
                cidrs: net.cidrs.clone(),
            });
        }
    }

    for (fi, file) in files.iter().enumerate() {
        for r in &file.rules {
            let identity = match &r.identity {
                None => Some(None),
                Some(name) => match identity_index.get(&name.v) {
                    Some(&i) => Some(Some(i)),
                    None => {
                        let names = policy.identities.iter().map(|i| i.name.as_str());
                        diags.push(Diagnostic::error(
                            &file.path,
                            name.loc,
                            format!(
                                "unknown identity `{}`{}: declare [identity.{}] or use {}{note}",
                                name.v,
                                did_you_mean(&name.v, names.clone()),
                                name.v,
                                options("identity", names)
                            ),
                        ));
                        None
                    }
                },
            };
            let peer = r.peer.as_ref().and_then(|peer| match &peer.v {
                PeerAst::Any => Some(Peer::Any),
                PeerAst::Cidr(c) => Some(Peer::Cidr(*c)),
                PeerAst::Name(n) => match network_index.get(n) {
                    Some(&i) => Some(Peer::Network(i)),
                    None => {
                        let names = policy.networks.iter().map(|n| n.name.as_str());
                        diags.push(Diagnostic::error(
                            &file.path,
                            peer.loc,
                            format!(
                                "unknown network `{n}`{}: declare [network.{n}], write a CIDR \
                                 such as \"10.0.0.0/24\" or an address, or use {}{note}",
                                did_you_mean(n, names.clone()),
                                options("network", names)
                            ),
                        ));
                        None
                    }
                },
            });
            let (Some(identity), Some(peer), Some(action)) = (identity, peer, r.action) else {
                continue;
            };
            let id = u32::try_from(policy.rules.len() + 1).unwrap_or(u32::MAX);
            policy.rules.push(Rule {
                id,
                file: fi,
                loc: r.loc,
                mode: file.mode,
                action,
                direction: r.direction,
                identity,
                identity_name: r.identity_name.clone(),
                peer,
                peer_text: r.peer_text.clone(),
                ports: r.ports.clone(),
                proto: r.proto,
                log: r.log,
            });
        }
    }

    let no_errors = !any_file_failed && !diags.iter().any(Diagnostic::is_error);
    if no_errors && !files.is_empty() && files.iter().all(|f| f.rules.is_empty()) {
        diags.push(Diagnostic::warning(
            &files[0].path,
            Loc::START,
            "the policy has no rules: every connection of the guarded processes will be denied; \
             add [[rule]] sections",
        ));
    }
    policy
}

fn resolve_identity(
    fi: usize,
    file: &FileAst,
    id: &IdentityAst,
    resolver: &dyn Resolve,
    diags: &mut Vec<Diagnostic>,
) -> Identity {
    let path = file.path.as_path();
    let mut problem: Option<String> = None;
    let exe = id.exe.as_ref().and_then(|exe| {
        let shown = exe.v.display();
        let resolved = match &id.sha256 {
            None => resolver.exe(&exe.v).map(|key| (key, None)),
            Some(_) => resolver
                .exe_hashed(&exe.v)
                .map(|(key, sum)| (key, Some(sum))),
        };
        match resolved {
            Ok((key, sum)) => {
                if let (Some(want), Some(got)) = (&id.sha256, sum) {
                    if want.v != got {
                        let text = format!(
                            "sha256 mismatch: {shown} (device {}:{}, inode {}) has sha256 {}, \
                             the policy pins {}",
                            key.dev >> 20,
                            key.dev & 0xf_ffff,
                            key.ino,
                            hex(&got),
                            hex(&want.v)
                        );
                        diags.push(Diagnostic::warning(
                            path,
                            want.loc,
                            format!(
                                "identity `{}` is disabled (matches nothing): {text}; install \
                                 the expected file or update sha256",
                                id.name
                            ),
                        ));
                        problem = Some(text);
                    }
                }
                if id.sha256.is_none() {
                    if let Some(why) = resolver.exe_untrusted(&exe.v) {
                        diags.push(Diagnostic::warning(
                            path,
                            exe.loc,
                            format!(
                                "identity `{}` trusts an executable a non-root user can replace: \
                                 {why}; pin its content with sha256 = \"...\" (`sha256sum FILE`) \
                                 or install it where only root can write",
                                id.name
                            ),
                        ));
                    }
                }
                Some(ExeMatch {
                    path: exe.v.clone(),
                    key,
                    real_path: resolver.real_path(&exe.v),
                })
            }
            Err(e) if resolver.lenient() && e.kind() == io::ErrorKind::NotFound => {
                problem = Some(format!("executable {shown} does not exist"));
                Some(ExeMatch {
                    path: exe.v.clone(),
                    key: ExeKey::default(),
                    real_path: None,
                })
            }
            Err(e) => {
                let message = match e.kind() {
                    io::ErrorKind::NotFound => format!(
                        "executable `{shown}` does not exist: install it or correct the path \
                         (exe is pinned to the file's device and inode when the policy loads)"
                    ),
                    io::ErrorKind::InvalidInput => format!(
                        "exe `{shown}` is not a regular file ({e}): name the executable file \
                         itself"
                    ),
                    _ => format!("cannot use exe `{shown}`: {e}"),
                };
                diags.push(Diagnostic::error(path, exe.loc, message));
                None
            }
        }
    });
    let uid = id.user.as_ref().and_then(|u| match &u.v {
        Account::Id(n) => Some(*n),
        Account::Name(name) => {
            let uid = resolver.uid_of(name);
            if uid.is_none() {
                diags.push(Diagnostic::error(
                    path,
                    u.loc,
                    format!(
                        "unknown user `{name}`: there is no such user on this system; create it, \
                         correct the name, or write uid = N"
                    ),
                ));
            }
            uid
        }
    });
    let gid = id.group.as_ref().and_then(|g| match &g.v {
        Account::Id(n) => Some(*n),
        Account::Name(name) => {
            let gid = resolver.gid_of(name);
            if gid.is_none() {
                diags.push(Diagnostic::error(
                    path,
                    g.loc,
                    format!(
                        "unknown group `{name}`: there is no such group on this system; create \
                         it, correct the name, or write gid = N"
                    ),
                ));
            }
            gid
        }
    });
    let cgroup = id.cgroup.as_ref().map(|c| {
        let rel = &c.v.rel;
        let id_now = match resolver.cgroup_id(rel) {
            Ok(cg) => Some(cg),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                diags.push(Diagnostic::warning(
                    path,
                    c.loc,
                    format!(
                        "cgroup `{rel}` does not exist (yet): identity `{}` matches no process \
                         until it exists and the policy is loaded again",
                        id.name
                    ),
                ));
                None
            }
            Err(e) => {
                diags.push(Diagnostic::error(
                    path,
                    c.loc,
                    format!("cannot use cgroup `{rel}`: {e}; name a cgroup directory below the cgroup2 root"),
                ));
                None
            }
        };
        CgroupMatch {
            path: rel.clone(),
            level: c.v.level,
            id: id_now,
        }
    });
    let cgroup = match &id.unit {
        None => cgroup,
        Some(unit) => match resolver.unit_cgroup(&unit.v) {
            Ok((rel, cgid)) => Some(CgroupMatch {
                level: rel.split('/').filter(|p| !p.is_empty()).count() as u32,
                path: rel,
                id: Some(cgid),
            }),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                diags.push(Diagnostic::warning(
                    path,
                    unit.loc,
                    format!(
                        "unit `{}` has no cgroup now ({e}): identity `{}` matches no process \
                         until the unit runs; ztd follows it when its cgroup appears",
                        unit.v, id.name
                    ),
                ));
                Some(CgroupMatch {
                    path: format!("system.slice/{}", unit.v),
                    level: 0,
                    id: None,
                })
            }
            Err(e) => {
                diags.push(Diagnostic::error(
                    path,
                    unit.loc,
                    format!("cannot resolve unit `{}`: {e}", unit.v),
                ));
                None
            }
        },
    };
    Identity {
        name: id.name.clone(),
        file: fi,
        loc: id.loc,
        mode: file.mode,
        exe,
        uid,
        gid,
        cgroup,
        raw: id.raw,
        sha256: id.sha256.as_ref().map(|s| s.v),
        unit: id.unit.as_ref().map(|u| u.v.clone()),
        user_name: id.user.as_ref().and_then(|u| match &u.v {
            Account::Name(n) => Some(n.clone()),
            Account::Id(_) => None,
        }),
        group_name: id.group.as_ref().and_then(|g| match &g.v {
            Account::Name(n) => Some(n.clone()),
            Account::Id(_) => None,
        }),
        problem,
    }
}

fn at(path: &Path, loc: Loc) -> String {
    format!("{}:{}:{}", path.display(), loc.line, loc.column)
}

fn did_you_mean<'a>(word: &str, names: impl Iterator<Item = &'a str>) -> String {
    closest(word, names)
        .map(|c| format!(" (did you mean `{c}`?)"))
        .unwrap_or_default()
}

/// What a rule may name instead: the declared names (a few of them listed) or `"any"`.
fn options<'a>(kind: &str, names: impl Iterator<Item = &'a str>) -> String {
    let names: Vec<&str> = names.take(9).collect();
    match names.len() {
        0 => "\"any\"".to_string(),
        1..=8 => format!("a declared {kind} ({}) or \"any\"", names.join(", ")),
        _ => format!("a declared {kind} or \"any\""),
    }
}
