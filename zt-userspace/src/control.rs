//! The control protocol between `ztctl` and `ztd`: one JSON request per line over a unix
//! socket, one JSON response per line.
//!
//! ztd authorises each request by the peer's credentials (`SO_PEERCRED`), whatever the
//! socket file's mode: requests that change anything ([`Request::changes_state`]) only from
//! uid 0; read-only ones from uid 0 and members of `--control-group` (off by default).

use std::{
    io::{BufRead, BufReader, Write},
    os::unix::net::UnixStream,
    path::{Path, PathBuf},
    time::Duration,
};

use serde::{Deserialize, Serialize};

use crate::{history::EventFilter, loader::HookHealth};

/// Default control socket.
pub const DEFAULT_SOCKET: &str = "/run/zt/ztd.sock";

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "snake_case")]
pub enum Request {
    Status,
    /// Re-read the policy; apply it only if it is valid in full.
    Reload,
    /// Detach and unpin everything, then exit.
    Unload,
    /// Compile `path` (file or directory) and apply it as the next generation; unless
    /// [`Request::Confirm`] arrives within `confirm_within_ms`, roll back to the previous
    /// policy. Confirmed, `path` becomes ztd's policy path until it restarts.
    Apply {
        path: PathBuf,
        confirm_within_ms: u64,
    },
    /// Confirm the pending [`Request::Apply`].
    Confirm,
    /// Matching history, oldest first, one `history::FollowItem` JSON line each; with
    /// `follow`, then every new matching event until the client goes away.
    Events {
        #[serde(default)]
        filter: EventFilter,
        #[serde(default)]
        follow: bool,
    },
}

impl Request {
    /// The request's name on the wire (`cmd`).
    pub fn name(&self) -> &'static str {
        match self {
            Request::Status => "status",
            Request::Reload => "reload",
            Request::Unload => "unload",
            Request::Apply { .. } => "apply",
            Request::Confirm => "confirm",
            Request::Events { .. } => "events",
        }
    }

    /// Whether the request can change anything (policy, enforcement, the daemon): such
    /// requests are accepted from root only. Every new request must be classified here.
    pub fn changes_state(&self) -> bool {
        match self {
            Request::Status | Request::Events { .. } => false,
            Request::Reload | Request::Unload | Request::Apply { .. } | Request::Confirm => true,
        }
    }
}

/// Who is on the other end of a control connection, from the kernel (`SO_PEERCRED`,
/// `SO_PEERGROUPS`): not from anything the client says.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Peer {
    pub uid: u32,
    pub gid: u32,
    pub pid: Option<i32>,
    /// Supplementary groups.
    pub groups: Vec<u32>,
}

/// Why `peer` may not make `req` (`None`: it may). `control_gid`: the group whose members may
/// make read-only requests (`--control-group`).
pub fn refusal(req: &Request, peer: &Peer, control_gid: Option<u32>) -> Option<String> {
    if peer.uid == 0 {
        return None;
    }
    let member = control_gid.is_some_and(|g| peer.gid == g || peer.groups.contains(&g));
    if req.changes_state() {
        return Some(format!(
            "permission denied: `{}` changes ztd's state and is accepted from root only (you are uid {})",
            req.name(),
            peer.uid
        ));
    }
    if member {
        return None;
    }
    Some(match control_gid {
        None => format!(
            "permission denied: `{}` is accepted from root only (you are uid {}); ztd's \
             --control-group lets the members of one group read status and events",
            req.name(),
            peer.uid
        ),
        Some(g) => format!(
            "permission denied: `{}` is accepted from root and members of group {g} (--control-group) only (you are uid {})",
            req.name(),
            peer.uid
        ),
    })
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(tag = "result", rename_all = "snake_case")]
pub enum Response {
    Status(Box<Status>),
    Ok {
        message: String,
    },
    /// `diagnostics` are `path:line:column: message` lines when a policy was refused.
    Error {
        message: String,
        #[serde(default)]
        diagnostics: Vec<String>,
    },
}

/// One rule's hit counter.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RuleCounter {
    /// Stable within a generation; 0 is the default verdict.
    pub id: u32,
    /// `path:line:column` of the rule (empty for the default).
    pub location: String,
    pub rule: String,
    pub hits: u64,
}

/// Kernel-side decision statistics (summed over CPUs).
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Decisions {
    pub allowed: u64,
    pub denied: u64,
    pub audited: u64,
    /// Decisions made with no readable policy (denied: fail closed).
    pub no_policy: u64,
    pub exe_unreadable: u64,
    /// Decisions about callers without an exec record (running since before zt first
    /// started, or their record could not be stored): no `exe` identity matched them.
    #[serde(default)]
    pub no_exec_record: u64,
    /// Execs and forks whose record could not be stored (fail closed for `exe` identities).
    #[serde(default)]
    pub exec_record_failed: u64,
    pub rule_unknown: u64,
    pub events_sent: u64,
    pub events_lost: u64,
    /// cgroup_skb packets dropped because zt could not parse their headers to the end.
    #[serde(default)]
    pub unparsed_dropped: u64,
    /// cgroup_skb packets dropped by the backstop's verdict.
    #[serde(default)]
    pub backstop_dropped: u64,
    /// Sends of serving UDP sockets allowed as answers to a peer that sent first, and the
    /// reply records written for them.
    #[serde(default)]
    pub replies_allowed: u64,
    #[serde(default)]
    pub replies_recorded: u64,
    /// Sockets of other address families refused by the BPF LSM hook.
    #[serde(default)]
    pub family_denied: u64,
}

/// Event pipeline accounting. Once the daemon has drained the ring buffer,
/// `produced == delivered + lost_kernel + lost_daemon` holds exactly.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct EventStats {
    /// Events the kernel made: sent into the ring buffer plus lost because it was full.
    pub produced: u64,
    /// Read from the ring buffer and kept in the history.
    pub delivered: u64,
    /// Lost in the kernel: the ring buffer was full.
    pub lost_kernel: u64,
    /// Read but not kept by the daemon (malformed or of an unknown layout).
    pub lost_daemon: u64,
    /// Not made at all: over the per-(identity, peer) rate limit, counted exactly here and
    /// carried into the next event of that key (XDP: over its sampling budget).
    pub suppressed: u64,
    /// Bytes waiting in the ring buffer when the kernel last sent an event.
    pub ring_fill_bytes: u64,
    pub ring_size_bytes: u64,
    /// Events in the in-memory history, and how many it keeps.
    pub history: u64,
    pub history_capacity: u64,
    /// Aged out of the history (not loss).
    pub evicted: u64,
    /// Events slow `--follow` clients skipped (still in the history; not loss).
    pub follower_missed: u64,
}

/// One denied (or audited) flow among the busiest of the last minutes.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct TopFlow {
    /// The executable, or `uid N` when it is unknown.
    pub identity: String,
    /// `addr:port/proto`.
    pub peer: String,
    pub count: u64,
}

/// Decisions of one (hook, verdict).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct HookDecisions {
    pub hook: String,
    pub verdict: String,
    pub count: u64,
}

/// The result of the last policy load or reload.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ReloadResult {
    pub ok: bool,
    /// Seconds since the Unix epoch.
    pub at: u64,
    pub message: String,
    /// How long the phases of a successful load, reload, apply or rollback took and what it
    /// wrote (`None` when it failed).
    #[serde(default)]
    pub timings: Option<ReloadTimings>,
}

/// Phases of one policy load, in microseconds, and the map entries it wrote and removed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReloadTimings {
    /// Reading, parsing, validating and resolving the policy files.
    pub parse_us: u64,
    /// Compiling the policy into map contents.
    pub compile_us: u64,
    /// Writing the idle slot, zeroing its counters and flipping `ACTIVE`.
    pub apply_us: u64,
    /// From the start of parsing to the flip.
    pub total_us: u64,
    /// Map entries written (policy maps, counters reset, slot config, the flip).
    pub map_updates: u64,
    /// Map entries removed.
    pub map_deletes: u64,
}

impl ReloadTimings {
    /// `"parse 12.3 ms, compile 4.5 ms, apply 1.2 ms (10 written, 2 removed)"`.
    pub fn summary(&self) -> String {
        let ms = |us: u64| us as f64 / 1000.0;
        format!(
            "parse {:.1} ms, compile {:.1} ms, apply {:.1} ms ({} written, {} removed)",
            ms(self.parse_us),
            ms(self.compile_us),
            ms(self.apply_us),
            self.map_updates,
            self.map_deletes
        )
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Status {
    /// True only if the kernel shows every expected program attached to the guarded cgroup.
    pub healthy: bool,
    /// Global mode: `enforce` or `audit`.
    pub mode: String,
    pub generation: u64,
    pub rules: u32,
    pub identities: u32,
    pub hooks: Vec<HookHealth>,
    pub counters: Vec<RuleCounter>,
    pub decisions: Decisions,
    pub cgroup: PathBuf,
    pub bpffs: PathBuf,
    pub policy: Vec<PathBuf>,
    pub pid: u32,
    pub last_reload: ReloadResult,
    #[serde(default)]
    pub events: EventStats,
    /// Busiest denied/audited flows of the last 5 minutes.
    #[serde(default)]
    pub top_denied: Vec<TopFlow>,
    /// Decisions per hook and verdict (XDP's are in `xdp`).
    #[serde(default)]
    pub decisions_by_hook: Vec<HookDecisions>,
    /// The XDP front door per `--xdp` interface (empty without `--xdp`); `healthy` requires
    /// each to be attached.
    #[serde(default)]
    pub xdp: Vec<crate::xdp::XdpStatus>,
    /// Why the daemon is not healthy (empty when healthy): tampering found in the kernel's
    /// state (a link detached or unpinned, a map unpinned, ...). Repaired within seconds.
    #[serde(default)]
    pub problems: Vec<String>,
    /// Repairs made since ztd started.
    #[serde(default)]
    pub repairs: u64,
    /// What the last repair did (empty: none yet).
    #[serde(default)]
    pub last_repair: String,
    /// An applied policy waiting for `ztctl confirm` (else it is rolled back).
    #[serde(default)]
    pub pending_apply: Option<PendingApply>,
    /// The flow store of learning mode (`null` with `--no-flows`).
    #[serde(default)]
    pub flows: Option<crate::flows::StoreStatus>,
    /// Each declared identity, what it resolved to, and whether it can match now.
    #[serde(default)]
    pub identities_resolved: Vec<IdentityStatus>,
    /// Weak spots that do not make ztd unhealthy but that an operator should know: the
    /// guarded cgroup lies below one a non-root user may move processes out of, an `exe` a
    /// non-root user can replace (without `sha256`), other warnings of the policy in force.
    #[serde(default)]
    pub warnings: Vec<String>,
    /// Hooks this kernel could not load, which ztd runs without (`--allow-missing-hooks`).
    #[serde(default)]
    pub degraded: Vec<crate::support::MissingHook>,
    /// The BPF LSM `socket_create` hook (other address families than unix/inet/inet6/
    /// netlink): `socket_create attached`, or `unavailable (why)` where the kernel refuses
    /// it. Not part of the baseline: its absence is reported, not a degradation.
    #[serde(default)]
    pub lsm: String,
}

/// One identity in `status`: what its names resolved to on this system.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct IdentityStatus {
    pub name: String,
    /// `path:line:column` of its `[identity.NAME]`.
    pub location: String,
    pub mode: String,
    /// `exe` as written.
    #[serde(default)]
    pub exe: Option<PathBuf>,
    /// The file `exe` resolves to through symlinks, when it differs.
    #[serde(default)]
    pub exe_real: Option<PathBuf>,
    /// Device of the pinned file, `major:minor` (None: the file is missing).
    #[serde(default)]
    pub exe_dev: Option<String>,
    #[serde(default)]
    pub exe_ino: Option<u64>,
    /// The pinned content hash (hex), when `sha256` is given.
    #[serde(default)]
    pub sha256: Option<String>,
    /// `user` as written (by name), and the uid it resolved to (or `uid = N`).
    #[serde(default)]
    pub user: Option<String>,
    #[serde(default)]
    pub uid: Option<u32>,
    #[serde(default)]
    pub group: Option<String>,
    #[serde(default)]
    pub gid: Option<u32>,
    /// `unit` as written.
    #[serde(default)]
    pub unit: Option<String>,
    /// The cgroup (`cgroup`, or where `unit` was found) relative to the cgroup2 mount.
    #[serde(default)]
    pub cgroup: Option<String>,
    /// Its id (None: absent now, the identity matches nothing).
    #[serde(default)]
    pub cgroup_id: Option<u64>,
    /// Whether some process can match it now.
    pub matchable: bool,
    /// Why it matches nothing, when that is a fault (missing file, sha256 mismatch); such
    /// identities are also listed in `problems` (status unhealthy).
    #[serde(default)]
    pub problem: Option<String>,
}

/// A `ztctl apply` waiting for `ztctl confirm`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct PendingApply {
    pub path: PathBuf,
    /// The generation the apply wrote.
    pub generation: u64,
    /// Rolled back at this time (seconds since the Unix epoch) unless confirmed.
    pub deadline: u64,
    /// Seconds left until the rollback.
    pub remaining_secs: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error(
        "cannot reach ztd at {socket}: {source} (is ztd running? is --socket right? are you root?)"
    )]
    Connect {
        socket: PathBuf,
        source: std::io::Error,
    },
    #[error("talking to ztd at {socket}: {source}")]
    Io {
        socket: PathBuf,
        source: std::io::Error,
    },
    #[error("ztd at {socket} sent a response this ztctl does not understand: {source}")]
    Protocol {
        socket: PathBuf,
        source: serde_json::Error,
    },
}

/// Send one request and hand every response line to `each` until the daemon closes the
/// connection or `each` returns false (streaming requests: `events`).
pub fn stream(
    socket: &Path,
    req: &Request,
    mut each: impl FnMut(&str) -> bool,
) -> Result<(), ControlError> {
    let io = |source| ControlError::Io {
        socket: socket.to_path_buf(),
        source,
    };
    let mut stream = UnixStream::connect(socket).map_err(|source| ControlError::Connect {
        socket: socket.to_path_buf(),
        source,
    })?;
    let mut line = serde_json::to_string(req).map_err(|source| ControlError::Protocol {
        socket: socket.to_path_buf(),
        source,
    })?;
    line.push('\n');
    stream.write_all(line.as_bytes()).map_err(io)?;
    let reader = BufReader::new(stream);
    for line in reader.lines() {
        let line = line.map_err(io)?;
        if !each(&line) {
            break;
        }
    }
    Ok(())
}

/// Send one request and wait for its response.
pub fn request(socket: &Path, req: &Request, timeout: Duration) -> Result<Response, ControlError> {
    let io = |source| ControlError::Io {
        socket: socket.to_path_buf(),
        source,
    };
    let mut stream = UnixStream::connect(socket).map_err(|source| ControlError::Connect {
        socket: socket.to_path_buf(),
        source,
    })?;
    stream.set_read_timeout(Some(timeout)).map_err(io)?;
    let mut line = serde_json::to_string(req).map_err(|source| ControlError::Protocol {
        socket: socket.to_path_buf(),
        source,
    })?;
    line.push('\n');
    stream.write_all(line.as_bytes()).map_err(io)?;
    let mut reader = BufReader::new(stream);
    let mut answer = String::new();
    reader.read_line(&mut answer).map_err(io)?;
    serde_json::from_str(&answer).map_err(|source| ControlError::Protocol {
        socket: socket.to_path_buf(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_have_stable_json() {
        assert_eq!(
            serde_json::to_string(&Request::Status).unwrap(),
            r#"{"cmd":"status"}"#
        );
        let r: Request = serde_json::from_str(r#"{"cmd":"unload"}"#).unwrap();
        assert!(matches!(r, Request::Unload));
    }

    #[test]
    fn only_root_changes_state_and_the_control_group_reads() {
        let user = Peer {
            uid: 65534,
            gid: 65534,
            pid: None,
            groups: vec![100],
        };
        let root = Peer::default();
        let apply = Request::Apply {
            path: PathBuf::from("/x"),
            confirm_within_ms: 1,
        };
        for req in [Request::Reload, Request::Unload, Request::Confirm, apply] {
            assert!(req.changes_state());
            assert_eq!(refusal(&req, &root, None), None);
            let why = refusal(&req, &user, Some(100)).expect("refused");
            assert!(why.contains("root only"), "{why}");
        }
        let events = Request::Events {
            filter: EventFilter::default(),
            follow: false,
        };
        for req in [Request::Status, events] {
            assert!(!req.changes_state());
            assert!(refusal(&req, &user, None).is_some());
            assert!(refusal(&req, &user, Some(7)).is_some());
            assert_eq!(refusal(&req, &user, Some(100)), None, "supplementary group");
            assert_eq!(refusal(&req, &user, Some(65534)), None, "primary group");
        }
    }
}
