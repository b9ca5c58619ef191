//! What to do when this kernel cannot load one of zt's cgroup programs.
//!
//! Older kernels lack attach types (`BPF_CGROUP_UDP4_SENDMSG` came in 4.18) and older
//! verifiers refuse programs newer ones accept. Running without a hook leaves a hole (no
//! `sendmsg6`: unconnected UDP over IPv6 goes unjudged), so ztd refuses to start unless the
//! operator says so with `--allow-missing-hooks` (`allow_missing_hooks = true` in ztd.toml);
//! even then it names each missing hook and the kernel feature it needs at start, in the
//! journal, and in `ztctl status` — never silently. Without a single hook there is nothing to
//! run: that is refused whatever the flag says.

use zt_common::Hook;

/// A cgroup hook this kernel could not load.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct MissingHook {
    pub hook: String,
    /// The kernel feature the hook needs.
    pub needs: String,
    /// What the kernel said (the end of the verifier log, or the syscall's error).
    pub error: String,
}

impl std::fmt::Display for MissingHook {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "hook {} is not loaded: it needs {}; the kernel said: {}",
            self.hook, self.needs, self.error
        )
    }
}

/// The program type and attach type a hook needs, and the first mainline kernel with it.
pub fn kernel_feature(hook: Hook) -> &'static str {
    match hook {
        Hook::Connect4 => {
            "BPF_PROG_TYPE_CGROUP_SOCK_ADDR attached at BPF_CGROUP_INET4_CONNECT (Linux 4.17)"
        }
        Hook::Connect6 => {
            "BPF_PROG_TYPE_CGROUP_SOCK_ADDR attached at BPF_CGROUP_INET6_CONNECT (Linux 4.17)"
        }
        Hook::Sendmsg4 => {
            "BPF_PROG_TYPE_CGROUP_SOCK_ADDR attached at BPF_CGROUP_UDP4_SENDMSG (Linux 4.18)"
        }
        Hook::Sendmsg6 => {
            "BPF_PROG_TYPE_CGROUP_SOCK_ADDR attached at BPF_CGROUP_UDP6_SENDMSG (Linux 4.18)"
        }
        Hook::Bind4 => {
            "BPF_PROG_TYPE_CGROUP_SOCK_ADDR attached at BPF_CGROUP_INET4_BIND (Linux 4.17)"
        }
        Hook::Bind6 => {
            "BPF_PROG_TYPE_CGROUP_SOCK_ADDR attached at BPF_CGROUP_INET6_BIND (Linux 4.17)"
        }
        Hook::SockCreate => {
            "BPF_PROG_TYPE_CGROUP_SOCK attached at BPF_CGROUP_INET_SOCK_CREATE (Linux 4.10)"
        }
        Hook::SkbIngress => {
            "BPF_PROG_TYPE_CGROUP_SKB attached at BPF_CGROUP_INET_INGRESS (Linux 4.10)"
        }
        Hook::SkbEgress => {
            "BPF_PROG_TYPE_CGROUP_SKB attached at BPF_CGROUP_INET_EGRESS (Linux 4.10)"
        }
        Hook::Xdp => "BPF_PROG_TYPE_XDP (Linux 4.8; native mode needs driver support)",
        Hook::LsmSocketCreate => "BPF_PROG_TYPE_LSM (Linux 5.7, CONFIG_BPF_LSM, `bpf` in lsm=)",
    }
}

/// The last few non-empty lines of a load error (a verifier log ends with its reason),
/// on one line.
pub fn error_gist(error: &str) -> String {
    let lines: Vec<&str> = error
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect();
    let start = lines.len().saturating_sub(3);
    let gist = lines[start..].join(" / ");
    if gist.chars().count() > 400 {
        let tail: String = gist
            .chars()
            .rev()
            .take(400)
            .collect::<Vec<_>>()
            .into_iter()
            .rev()
            .collect();
        format!("...{tail}")
    } else {
        gist
    }
}

/// Decide about the hooks that failed to load (`failed`: hook and error) out of `total`:
/// none failed → nothing missing; some failed → refused unless `allow`, then the list of
/// what runs degraded; all failed → refused.
pub fn decide(
    failed: &[(Hook, String)],
    total: usize,
    allow: bool,
) -> Result<Vec<MissingHook>, String> {
    let missing: Vec<MissingHook> = failed
        .iter()
        .map(|(hook, err)| MissingHook {
            hook: hook.name().to_string(),
            needs: kernel_feature(*hook).to_string(),
            error: error_gist(err),
        })
        .collect();
    if missing.is_empty() {
        return Ok(missing);
    }
    let list = missing
        .iter()
        .map(|m| format!("  {m}"))
        .collect::<Vec<_>>()
        .join("\n");
    if missing.len() >= total {
        return Err(format!(
            "this kernel loads none of zt's {total} cgroup programs, nothing would be enforced:\n{list}"
        ));
    }
    if !allow {
        return Err(format!(
            "this kernel cannot load {} of zt's {total} cgroup programs:\n{list}\nWhat those hooks guard would go unjudged. To run without them anyway, start ztd with --allow-missing-hooks (ztd.toml: allow_missing_hooks = true); `ztctl status` then lists them as degraded.",
            missing.len()
        ));
    }
    Ok(missing)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fail(h: Hook) -> (Hook, String) {
        (
            h,
            "the BPF_PROG_LOAD syscall failed. Verifier output: 0: (b7) r0 = 1\n\ninvalid attach type\n".to_string(),
        )
    }

    #[test]
    fn nothing_failed_nothing_missing_whatever_the_flag() {
        assert_eq!(decide(&[], 9, false), Ok(Vec::new()));
        assert_eq!(decide(&[], 9, true), Ok(Vec::new()));
    }

    #[test]
    fn a_missing_hook_is_refused_by_default_and_named_with_its_feature() {
        let err = decide(&[fail(Hook::Sendmsg6)], 9, false).unwrap_err();
        assert!(err.contains("hook sendmsg6 is not loaded"), "{err}");
        assert!(err.contains("BPF_CGROUP_UDP6_SENDMSG"), "{err}");
        assert!(err.contains("invalid attach type"), "{err}");
        assert!(err.contains("--allow-missing-hooks"), "{err}");
        assert!(err.contains("allow_missing_hooks = true"), "{err}");
    }

    #[test]
    fn allowed_missing_hooks_are_listed() {
        let missing = decide(&[fail(Hook::Sendmsg6), fail(Hook::Bind6)], 9, true).unwrap();
        let names: Vec<&str> = missing.iter().map(|m| m.hook.as_str()).collect();
        assert_eq!(names, ["sendmsg6", "bind6"]);
        assert_eq!(missing[1].needs, kernel_feature(Hook::Bind6));
        assert!(
            missing[0].error.ends_with("r0 = 1 / invalid attach type"),
            "{}",
            missing[0].error
        );
    }

    #[test]
    fn no_hook_at_all_is_refused_even_when_allowed() {
        let all: Vec<_> = crate::loader::CGROUP_HOOKS.into_iter().map(fail).collect();
        let err = decide(&all, all.len(), true).unwrap_err();
        assert!(err.contains("loads none of zt's 9"), "{err}");
    }

    #[test]
    fn long_errors_keep_their_end() {
        let long = format!("{}\nthe reason", "x".repeat(1000));
        let gist = error_gist(&long);
        assert!(gist.ends_with("the reason"), "{gist}");
        assert!(gist.chars().count() <= 403, "{}", gist.len());
    }
}
