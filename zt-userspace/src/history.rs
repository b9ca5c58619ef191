//! The decision-event pipeline after the ring buffer: records ([`EventRecord`], the stable
//! JSON schema of `ztctl events --json`), a bounded in-memory [`History`] with live
//! followers, filters ([`EventFilter`], what `ztctl events` sends to `ztd`), the text form a
//! person scans ([`format_text`]), and structured log lines ([`log_line`]).
//!
//! # Loss accounting
//! Every event the kernel produces ends up in exactly one of these counters:
//!
//! ```text
//! produced (kernel: sent + lost)  ==  delivered + lost_in_kernel + lost_in_daemon  (+ in flight)
//! ```
//!
//! - `lost_in_kernel`: the ring buffer was full when the kernel tried to submit the event
//!   (kernel statistic `EventLost`, plus the XDP program's own `EventLost`).
//! - `delivered` ([`HistoryCounters::delivered`]): read from the ring buffer and kept
//!   ([`History::push`]).
//! - `lost_in_daemon` ([`HistoryCounters::lost_in_daemon`]): read from the ring buffer but
//!   not kept — a malformed or short record, an unknown event kind
//!   ([`History::count_lost`]).
//! - in flight: submitted, not yet read (at most [`zt_common::EVENT_RING_BYTES`] worth; the
//!   identity is exact whenever the ring buffer has been drained).
//!
//! Two other counters are **not** loss:
//! - `evicted`: kept, then aged out of the bounded history to make room for newer events
//!   (still delivered, printed, counted, and sent to the followers of the time).
//! - `suppressed`: events the kernel's rate limiter never submitted (the sum of the records'
//!   `suppressed` fields): accounted for, in the next record of the same flow, never produced.
//! - `follower_missed`: events a live follower (`ztctl events --follow`) could not keep up
//!   with. They are in the history; that follower is told how many it missed
//!   ([`FollowItem::Missed`]), and the sum over followers is reported.

use std::{
    collections::{HashMap, VecDeque},
    fmt,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    str::FromStr,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use ipnet::IpNet;
use serde::{Deserialize, Serialize};
use tokio::sync::broadcast;
use zt_common::{DecisionEvent, Hook, Proto, Verdict};

use crate::enrich::Enricher;

/// Events kept by default.
pub const DEFAULT_HISTORY_CAPACITY: usize = 10_000;
/// Events buffered per live follower before it starts missing some.
pub const DEFAULT_FOLLOW_BUFFER: usize = 4096;

/// One decision, as `ztd` keeps it and `ztctl events --json` prints it (one JSON object per
/// line). **The field names and their meanings are a contract**: add fields, never rename or
/// remove one. Every field is always present (`null` where unknown).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct EventRecord {
    /// Number assigned by `ztd` in the order events were read, from 1, increasing by one per
    /// delivered event (a gap between two records that are both in the history never occurs;
    /// `seq` restarts when `ztd` restarts).
    pub seq: u64,
    /// When the kernel made the decision: RFC 3339, UTC, milliseconds
    /// (`2026-11-27T08:15:02.123Z`).
    pub time: String,
    /// The same instant in nanoseconds since the Unix epoch.
    pub time_ns: u64,
    /// `allow`, `deny` or `audit` (would have been denied; allowed because the deciding policy
    /// is in audit mode).
    pub verdict: String,
    /// The hook that decided: `connect4`, `connect6`, `sendmsg4`, `sendmsg6`, `bind4`,
    /// `bind6`, `sock_create`, `skb_ingress`, `skb_egress` or `xdp`.
    pub hook: String,
    /// Kernel thread id of the calling task (0 for `xdp` and packets judged in softirq).
    pub pid: u32,
    /// Process id (thread group id) of the calling task, as `ps` shows it.
    pub tgid: u32,
    /// Effective user id of the identity judged.
    pub uid: u32,
    /// Name of `uid`, if it has one.
    pub user: Option<String>,
    /// Effective group id of the identity judged.
    pub gid: u32,
    /// Name of `gid`, if it has one.
    pub group: Option<String>,
    /// cgroup v2 id (inode number of the cgroup directory).
    pub cgroup_id: u64,
    /// Path of the cgroup relative to the cgroup2 mount (`/system.slice/sshd.service`), if it
    /// still exists.
    pub cgroup: Option<String>,
    /// Device of the executable, kernel encoding `major << 20 | minor` (0 with `exe_ino` 0:
    /// no executable).
    pub exe_dev: u64,
    /// Inode number of the executable.
    pub exe_ino: u64,
    /// Path of the executable, if it could be verified (`path (deleted)` for a file deleted
    /// since it was started).
    pub exe: Option<String>,
    /// Kernel task name (`comm`, at most 15 bytes): informative only, never an identity.
    pub comm: String,
    /// `tcp`, `udp`, `icmp` or `other`.
    pub proto: String,
    /// 4 or 6: family of the judged peer (IPv4-mapped IPv6 is judged, and shown, as IPv4).
    pub family: u8,
    /// Local address of the socket, when the kernel reports it.
    #[serde(default)]
    pub local_addr: Option<IpAddr>,
    /// Local port (0 when unknown or not bound).
    #[serde(default)]
    pub local_port: u16,
    /// The remote side: destination of outgoing calls and packets, source of incoming ones.
    pub peer_addr: IpAddr,
    /// Port of the remote side (0 for protocols without ports).
    pub peer_port: u16,
    /// Rule that decided: stable within a generation; 0 is the default verdict.
    pub rule_id: u32,
    /// `default`, or where the rule is written: `path:line:column`.
    pub rule: String,
    /// Policy generation the decision was made in.
    pub generation: u64,
    /// Events for the same (identity, peer) that the kernel rate-limited since the previous
    /// event of that flow (0: none).
    #[serde(default)]
    pub suppressed: u32,
    /// The process's arguments when ztd read the event, if it still ran the judged file
    /// (`/proc/<tgid>/cmdline`): informative only, written by the process itself, never an
    /// identity. `null` when unknown.
    #[serde(default)]
    pub argv: Option<Vec<String>>,
}

/// The field names of [`EventRecord`]'s JSON form, in order. The contract.
pub const EVENT_RECORD_FIELDS: [&str; 28] = [
    "seq",
    "time",
    "time_ns",
    "verdict",
    "hook",
    "pid",
    "tgid",
    "uid",
    "user",
    "gid",
    "group",
    "cgroup_id",
    "cgroup",
    "exe_dev",
    "exe_ino",
    "exe",
    "comm",
    "proto",
    "family",
    "local_addr",
    "local_port",
    "peer_addr",
    "peer_port",
    "rule_id",
    "rule",
    "generation",
    "suppressed",
    "argv",
];

/// Nanoseconds since the Unix epoch, now.
pub fn now_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// `YYYY-MM-DDTHH:MM:SS.mmmZ` for nanoseconds since the epoch.
pub fn rfc3339_ns(ns: u64) -> String {
    humantime::format_rfc3339_millis(UNIX_EPOCH + Duration::from_nanos(ns)).to_string()
}

/// `allow`, `deny`, `audit` (`?` for an unknown code).
pub fn verdict_name(code: u8) -> &'static str {
    match Verdict::from_code(code) {
        Some(Verdict::Allow) => "allow",
        Some(Verdict::Deny) => "deny",
        Some(Verdict::Audit) => "audit",
        None => "?",
    }
}

/// `tcp`, `udp`, `icmp`, `other`.
pub fn proto_name(code: u8) -> &'static str {
    match code {
        c if c == Proto::Tcp as u8 => "tcp",
        c if c == Proto::Udp as u8 => "udp",
        c if c == Proto::Icmp as u8 => "icmp",
        _ => "other",
    }
}

/// The address in a kernel 16-byte address field: IPv4 in the first four bytes when
/// `family` is 4.
pub fn addr_of(family: u8, bytes: &[u8; 16]) -> IpAddr {
    if family == 4 {
        IpAddr::V4(Ipv4Addr::new(bytes[0], bytes[1], bytes[2], bytes[3]))
    } else {
        IpAddr::V6(Ipv6Addr::from(*bytes))
    }
}

/// `addr:port` (`[v6]:port`).
fn addr_port(addr: IpAddr, port: u16) -> String {
    match addr {
        IpAddr::V4(a) => format!("{a}:{port}"),
        IpAddr::V6(a) => format!("[{a}]:{port}"),
    }
}

/// An IPv4-mapped IPv6 address as IPv4; anything else unchanged.
fn canonical(addr: IpAddr) -> IpAddr {
    match addr {
        IpAddr::V6(a) => a.to_ipv4_mapped().map_or(addr, IpAddr::V4),
        v4 => v4,
    }
}

impl EventRecord {
    /// The record of a kernel event, before enrichment ([`EventRecord::enrich`]) and before
    /// [`History::push`] assigns `seq` (0 here). `realtime_offset_ns` turns the kernel's
    /// CLOCK_MONOTONIC timestamp into wall-clock time
    /// ([`crate::events::monotonic_to_realtime_offset`]); `rule` is `default` or the rule's
    /// `path:line:column`. An all-zero local address is unknown (`None`).
    pub fn from_event(ev: &DecisionEvent, realtime_offset_ns: i128, rule: String) -> Self {
        let time_ns = u64::try_from((i128::from(ev.ktime_ns) + realtime_offset_ns).max(0))
            .unwrap_or(u64::MAX);
        let comm_len = ev
            .comm
            .iter()
            .position(|&b| b == 0)
            .unwrap_or(ev.comm.len());
        EventRecord {
            seq: 0,
            time: rfc3339_ns(time_ns),
            time_ns,
            verdict: verdict_name(ev.verdict).to_string(),
            hook: Hook::from_code(ev.hook)
                .map(Hook::name)
                .unwrap_or("?")
                .to_string(),
            pid: ev.pid,
            tgid: ev.tgid,
            uid: ev.uid,
            user: None,
            gid: ev.gid,
            group: None,
            cgroup_id: ev.cgroup_id,
            cgroup: None,
            exe_dev: ev.exe.dev,
            exe_ino: ev.exe.ino,
            exe: None,
            comm: String::from_utf8_lossy(&ev.comm[..comm_len]).into_owned(),
            proto: proto_name(ev.proto).to_string(),
            family: ev.family,
            local_addr: (ev.local_addr != [0; 16]).then(|| addr_of(ev.family, &ev.local_addr)),
            local_port: ev.local_port,
            peer_addr: addr_of(ev.family, &ev.peer_addr),
            peer_port: ev.peer_port,
            rule_id: ev.rule,
            rule,
            generation: ev.generation,
            suppressed: ev.suppressed,
            argv: None,
        }
    }

    /// Fill in `user`, `group`, `cgroup` and `exe`.
    pub fn enrich(&mut self, enricher: &mut Enricher) {
        self.user = enricher.user_name(self.uid);
        self.group = enricher.group_name(self.gid);
        self.cgroup = enricher.cgroup_path(self.cgroup_id);
        self.exe = enricher.exe_path(self.exe_dev, self.exe_ino, self.tgid);
        self.argv = enricher.argv(self.tgid, self.exe_dev, self.exe_ino);
    }

    /// Who: the executable's path if known, else `uid N`.
    pub fn identity(&self) -> String {
        match &self.exe {
            Some(exe) => exe.clone(),
            None => format!("uid {}", self.uid),
        }
    }

    /// The remote side as `addr:port/proto` (`[v6]:port/proto`).
    pub fn peer(&self) -> String {
        format!(
            "{}/{}",
            addr_port(self.peer_addr, self.peer_port),
            self.proto
        )
    }
}

/// Why a filter or a duration was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FilterError {
    #[error(
        "invalid duration {input:?}: {reason} (expected a number and a unit, e.g. 90s, 15m, 1h, 2d)"
    )]
    Duration { input: String, reason: String },
    #[error("invalid verdict {0:?}: expected deny, allow or audit")]
    Verdict(String),
    #[error("invalid peer {input:?}: {reason} (expected an address or a CIDR, e.g. 10.0.0.0/8, 2001:db8::/32)")]
    Peer { input: String, reason: String },
}

/// Parse a `--since` duration: a number and a unit (`90s`, `15m`, `1h`, `2d`, `1h30m`,
/// `500ms`; units as in `humantime`: `s`, `m`, `h`, `d`, `w`, ...).
pub fn parse_duration(input: &str) -> Result<Duration, FilterError> {
    let err = |reason: String| FilterError::Duration {
        input: input.to_string(),
        reason,
    };
    let trimmed = input.trim();
    if trimmed.is_empty() {
        return Err(err("empty".to_string()));
    }
    if trimmed.starts_with('-') {
        return Err(err("negative".to_string()));
    }
    humantime::parse_duration(trimmed).map_err(|e| err(e.to_string()))
}

/// Which events `ztctl events` wants: every field set must match (AND). The serde form is
/// what `ztctl` sends to `ztd` (absent fields match everything; unknown fields are refused,
/// so an older `ztd` never silently ignores a newer filter).
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct EventFilter {
    /// `deny`, `allow` or `audit`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub verdict: Option<String>,
    /// An executable: a path (with a `/`) matches the record's `exe` exactly (a deleted
    /// file's `path (deleted)` included); a bare name matches its file name. Records whose
    /// executable is unknown never match.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exe: Option<String>,
    /// Effective uid.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uid: Option<u32>,
    /// Network the peer is in. An IPv4 peer is also in an IPv6 network that holds its
    /// IPv4-mapped form (`::ffff:10.0.0.0/104` holds 10.1.2.3).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub peer: Option<IpNet>,
    /// Only events at most this old (at the time of the query). Serialized as a `humantime`
    /// string (`"15m"`).
    #[serde(default, skip_serializing_if = "Option::is_none", with = "since_serde")]
    pub since: Option<Duration>,
}

mod since_serde {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
        match d {
            Some(d) => s.serialize_str(&humantime::format_duration(*d).to_string()),
            None => s.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
        match Option::<String>::deserialize(d)? {
            Some(text) => super::parse_duration(&text)
                .map(Some)
                .map_err(serde::de::Error::custom),
            None => Ok(None),
        }
    }
}

/// Parse `--peer`: a CIDR, or a single address (as `/32` or `/128`).
pub fn parse_peer(input: &str) -> Result<IpNet, FilterError> {
    let input = input.trim();
    if let Ok(net) = input.parse::<IpNet>() {
        return Ok(net.trunc());
    }
    match input.parse::<IpAddr>() {
        Ok(addr) => Ok(IpNet::from(addr)),
        Err(e) => Err(FilterError::Peer {
            input: input.to_string(),
            reason: e.to_string(),
        }),
    }
}

impl EventFilter {
    /// A filter from `ztctl events` arguments, each checked.
    pub fn from_args(
        verdict: Option<&str>,
        exe: Option<&str>,
        uid: Option<u32>,
        peer: Option<&str>,
        since: Option<&str>,
    ) -> Result<Self, FilterError> {
        let filter = EventFilter {
            verdict: verdict.map(str::to_string),
            exe: exe.map(str::to_string),
            uid,
            peer: peer.map(parse_peer).transpose()?,
            since: since.map(parse_duration).transpose()?,
        };
        filter.validate()?;
        Ok(filter)
    }

    /// Check the fields a deserialized filter may carry wrong (`ztd` does this on requests).
    pub fn validate(&self) -> Result<(), FilterError> {
        match self.verdict.as_deref() {
            None | Some("deny" | "allow" | "audit") => Ok(()),
            Some(other) => Err(FilterError::Verdict(other.to_string())),
        }
    }

    /// Does a notice pass? Only filters on time: any decision field set excludes notices.
    pub fn matches_notice(&self, notice: &crate::notice::Notice, now_ns: u64) -> bool {
        if self.verdict.is_some() || self.uid.is_some() || self.exe.is_some() || self.peer.is_some()
        {
            return false;
        }
        match self.since {
            Some(since) => {
                let since = u64::try_from(since.as_nanos()).unwrap_or(u64::MAX);
                notice.time_ns >= now_ns.saturating_sub(since)
            }
            None => true,
        }
    }

    /// Does `record` pass? `now_ns` (nanoseconds since the epoch) anchors `since`.
    pub fn matches(&self, record: &EventRecord, now_ns: u64) -> bool {
        if let Some(v) = &self.verdict {
            if *v != record.verdict {
                return false;
            }
        }
        if let Some(uid) = self.uid {
            if uid != record.uid {
                return false;
            }
        }
        if let Some(want) = &self.exe {
            let Some(exe) = record.exe.as_deref() else {
                return false;
            };
            let live = exe.strip_suffix(" (deleted)").unwrap_or(exe);
            let ok = if want.contains('/') {
                want == exe || want == live
            } else {
                live.rsplit('/').next() == Some(want.as_str())
            };
            if !ok {
                return false;
            }
        }
        if let Some(net) = &self.peer {
            let peer = canonical(record.peer_addr);
            let ok = match (net, peer) {
                (IpNet::V4(n), IpAddr::V4(a)) => n.contains(&a),
                (IpNet::V6(n), IpAddr::V4(a)) => n.contains(&a.to_ipv6_mapped()),
                (IpNet::V6(n), IpAddr::V6(a)) => n.contains(&a),
                (IpNet::V4(_), IpAddr::V6(_)) => false,
            };
            if !ok {
                return false;
            }
        }
        if let Some(since) = self.since {
            let since = u64::try_from(since.as_nanos()).unwrap_or(u64::MAX);
            // Events stamped in the future (clock steps) are recent.
            if record.time_ns < now_ns.saturating_sub(since) {
                return false;
            }
        }
        true
    }
}

/// What a live follower receives.
///
/// JSON form (one per line from `ztd` to `ztctl`): an event is its [`EventRecord`] object; a
/// gap is `{"missed":N}`.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(untagged)]
pub enum FollowItem {
    Event(Box<EventRecord>),
    /// This follower fell behind and `missed` events (counted before filtering) were skipped.
    /// They are in the history, and `ztctl events` can query them.
    Missed {
        missed: u64,
    },
    /// Something `ztd` noticed (an identity followed a replaced file or a recreated
    /// cgroup, a hash mismatch): `{"notice":{...}}`. Not a decision; not counted as one.
    Notice {
        notice: Box<crate::notice::Notice>,
    },
}

/// What the history broadcasts to followers.
#[derive(Clone, Debug)]
#[allow(clippy::large_enum_variant)] // events are the common case; notices are rare
enum Item {
    Event(EventRecord),
    Notice(crate::notice::Notice),
}

/// Notices kept for `ztctl events`.
const NOTICE_CAPACITY: usize = 1000;

/// The [`History`] a [`Follower`] followed is gone (the daemon is stopping).
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("the event history is closed (ztd is stopping)")]
pub struct HistoryClosed;

/// A live tail of a [`History`] (`ztctl events --follow`). Receives every event pushed after
/// it subscribed that passes its filter, in order, and a [`FollowItem::Missed`] whenever it
/// fell more than the follow buffer behind.
pub struct Follower {
    rx: broadcast::Receiver<Item>,
    filter: EventFilter,
    missed_total: Arc<AtomicU64>,
    missed: u64,
}

impl Follower {
    /// The next item; `None` once the history is gone (the daemon stops).
    pub async fn recv(&mut self) -> Option<FollowItem> {
        loop {
            match self.rx.recv().await {
                Ok(r) => {
                    if let Some(item) = self.accept(r) {
                        return Some(item);
                    }
                }
                Err(broadcast::error::RecvError::Lagged(n)) => return Some(self.lagged(n)),
                Err(broadcast::error::RecvError::Closed) => return None,
            }
        }
    }

    /// The next item if one is ready: `Ok(None)` if none is, `Err(HistoryClosed)` once the
    /// history is gone.
    pub fn try_recv(&mut self) -> Result<Option<FollowItem>, HistoryClosed> {
        loop {
            match self.rx.try_recv() {
                Ok(r) => {
                    if let Some(item) = self.accept(r) {
                        return Ok(Some(item));
                    }
                }
                Err(broadcast::error::TryRecvError::Lagged(n)) => return Ok(Some(self.lagged(n))),
                Err(broadcast::error::TryRecvError::Empty) => return Ok(None),
                Err(broadcast::error::TryRecvError::Closed) => return Err(HistoryClosed),
            }
        }
    }

    /// Events this follower missed so far.
    pub fn missed(&self) -> u64 {
        self.missed
    }

    pub fn filter(&self) -> &EventFilter {
        &self.filter
    }

    fn accept(&self, item: Item) -> Option<FollowItem> {
        match item {
            Item::Event(r) => self
                .filter
                .matches(&r, now_ns())
                .then(|| FollowItem::Event(Box::new(r))),
            Item::Notice(n) => {
                self.filter
                    .matches_notice(&n, now_ns())
                    .then(|| FollowItem::Notice {
                        notice: Box::new(n),
                    })
            }
        }
    }

    fn lagged(&mut self, n: u64) -> FollowItem {
        self.missed += n;
        self.missed_total.fetch_add(n, Ordering::Relaxed);
        FollowItem::Missed { missed: n }
    }
}

/// A snapshot of the history's counters (see the module docs for what each means).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct HistoryCounters {
    /// Records read from the ring buffer and kept.
    pub delivered: u64,
    /// Records read from the ring buffer and not kept (malformed, unknown kind).
    pub lost_in_daemon: u64,
    /// Records aged out of the bounded history (not loss).
    pub evicted: u64,
    /// Sum of the delivered records' `suppressed` (rate-limited in the kernel; not loss).
    pub suppressed: u64,
    /// Events live followers missed, summed over followers (not loss).
    pub follower_missed: u64,
    /// Live followers now.
    pub followers: u64,
    /// Records held now.
    pub len: u64,
    pub capacity: u64,
    /// `seq` of the newest record (0: none yet).
    pub last_seq: u64,
}

/// The bounded in-memory history of decision events, with live followers.
///
/// Not synchronized: the daemon keeps it behind a mutex. [`History::query_and_subscribe`]
/// under one lock gives a follower the history and then every later event, with no gap and
/// no duplicate.
pub struct History {
    records: VecDeque<EventRecord>,
    capacity: usize,
    next_seq: u64,
    delivered: u64,
    lost_in_daemon: u64,
    evicted: u64,
    suppressed: u64,
    missed_total: Arc<AtomicU64>,
    tx: broadcast::Sender<Item>,
    notices: VecDeque<crate::notice::Notice>,
}

impl Default for History {
    fn default() -> Self {
        History::new(DEFAULT_HISTORY_CAPACITY, DEFAULT_FOLLOW_BUFFER)
    }
}

impl History {
    /// A history keeping the last `capacity` events (at least 1), with `follow_buffer` events
    /// of slack (at least 1) per live follower.
    pub fn new(capacity: usize, follow_buffer: usize) -> Self {
        let capacity = capacity.max(1);
        let (tx, _) = broadcast::channel(follow_buffer.max(1));
        History {
            records: VecDeque::with_capacity(capacity.min(DEFAULT_HISTORY_CAPACITY)),
            capacity,
            next_seq: 1,
            delivered: 0,
            lost_in_daemon: 0,
            evicted: 0,
            suppressed: 0,
            missed_total: Arc::new(AtomicU64::new(0)),
            tx,
            notices: VecDeque::new(),
        }
    }

    /// Keep a record read from the ring buffer: assigns and returns its `seq`, counts it as
    /// delivered, evicts the oldest record if full (counted as evicted), and sends it to the
    /// live followers.
    pub fn push(&mut self, mut record: EventRecord) -> u64 {
        let seq = self.next_seq;
        self.next_seq += 1;
        record.seq = seq;
        self.delivered += 1;
        self.suppressed += u64::from(record.suppressed);
        while self.records.len() >= self.capacity {
            self.records.pop_front();
            self.evicted += 1;
        }
        if self.tx.receiver_count() > 0 {
            // Fails only with no receiver left: nothing to do.
            let _ = self.tx.send(Item::Event(record.clone()));
        }
        self.records.push_back(record);
        seq
    }

    /// Keep a notice (bounded separately from the decisions, never counted as one) and send
    /// it to the live followers.
    pub fn push_notice(&mut self, notice: crate::notice::Notice) {
        while self.notices.len() >= NOTICE_CAPACITY {
            self.notices.pop_front();
        }
        if self.tx.receiver_count() > 0 {
            let _ = self.tx.send(Item::Notice(notice.clone()));
        }
        self.notices.push_back(notice);
    }

    /// The notices that pass `filter`, oldest first (a filter on decision fields —
    /// verdict, uid, exe, peer — passes none).
    pub fn query_notices(&self, filter: &EventFilter, now_ns: u64) -> Vec<crate::notice::Notice> {
        self.notices
            .iter()
            .filter(|n| filter.matches_notice(n, now_ns))
            .cloned()
            .collect()
    }

    /// Count `n` records read from the ring buffer that could not be kept (malformed, short,
    /// unknown kind): `lost_in_daemon`.
    pub fn count_lost(&mut self, n: u64) {
        self.lost_in_daemon += n;
    }

    /// The records that pass `filter`, oldest first.
    pub fn query(&self, filter: &EventFilter, now_ns: u64) -> Vec<EventRecord> {
        self.records
            .iter()
            .filter(|r| filter.matches(r, now_ns))
            .cloned()
            .collect()
    }

    /// A live follower of every event pushed from now on that passes `filter`.
    pub fn subscribe(&self, filter: EventFilter) -> Follower {
        Follower {
            rx: self.tx.subscribe(),
            filter,
            missed_total: Arc::clone(&self.missed_total),
            missed: 0,
        }
    }

    /// [`History::query`] then [`History::subscribe`], atomically (`&self` excludes a `push`
    /// in between): `ztctl events --follow` sees the history, then the live tail, with no
    /// gap and no duplicate.
    pub fn query_and_subscribe(
        &self,
        filter: &EventFilter,
        now_ns: u64,
    ) -> (Vec<EventRecord>, Follower) {
        (self.query(filter, now_ns), self.subscribe(filter.clone()))
    }

    pub fn counters(&self) -> HistoryCounters {
        HistoryCounters {
            delivered: self.delivered,
            lost_in_daemon: self.lost_in_daemon,
            evicted: self.evicted,
            suppressed: self.suppressed,
            follower_missed: self.missed_total.load(Ordering::Relaxed),
            followers: self.tx.receiver_count() as u64,
            len: self.records.len() as u64,
            capacity: self.capacity as u64,
            last_seq: self.next_seq - 1,
        }
    }

    pub fn len(&self) -> usize {
        self.records.len()
    }

    pub fn is_empty(&self) -> bool {
        self.records.is_empty()
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// The `n` flows denied most often in the last `window` before `now_ns`: `(identity,
    /// peer, count)`, most first (ties by identity, then peer). The identity is the
    /// executable's path, else `uid N`; the peer is `addr:port/proto`. `deny` and `audit`
    /// (would-be denials) events count, each as `1 + suppressed` (the events the kernel
    /// rate-limited for that flow). Only what the history still holds is counted.
    pub fn top_denied(
        &self,
        window: Duration,
        n: usize,
        now_ns: u64,
    ) -> Vec<(String, String, u64)> {
        let window = u64::try_from(window.as_nanos()).unwrap_or(u64::MAX);
        let from = now_ns.saturating_sub(window);
        let mut counts: HashMap<(String, String), u64> = HashMap::new();
        for r in self.records.iter().rev() {
            if r.time_ns < from {
                // Records are in arrival order, which follows time closely but not exactly
                // (per-CPU ring buffer submissions): keep scanning, it is bounded anyway.
                continue;
            }
            if r.time_ns > now_ns || !(r.verdict == "deny" || r.verdict == "audit") {
                continue;
            }
            *counts.entry((r.identity(), r.peer())).or_default() += 1 + u64::from(r.suppressed);
        }
        let mut top: Vec<(String, String, u64)> =
            counts.into_iter().map(|((i, p), c)| (i, p, c)).collect();
        top.sort_by(|a, b| {
            b.2.cmp(&a.2)
                .then_with(|| a.0.cmp(&b.0))
                .then_with(|| a.1.cmp(&b.1))
        });
        top.truncate(n);
        top
    }
}

/// Column widths of [`format_text`] (the last column, the rule, is not padded).
const W_TIME: usize = 24;
const W_VERDICT: usize = 7;
const W_HOOK: usize = 11;
const W_PID: usize = 7;
const W_USER: usize = 10;
const W_EXE: usize = 18;
const W_PEER: usize = 29;

/// `s` cut to `width` characters, the last one an ellipsis if it was longer.
fn fit(s: &str, width: usize) -> String {
    if s.chars().count() <= width {
        s.to_string()
    } else {
        let mut out: String = s.chars().take(width.saturating_sub(1)).collect();
        out.push('…');
        out
    }
}

/// The heading of [`format_text`]'s columns.
pub fn text_header() -> String {
    format!(
        "{:<W_TIME$} {:<W_VERDICT$} {:<W_HOOK$} {:>W_PID$} {:<W_USER$} {:<W_EXE$} {:<W_PEER$} RULE",
        "TIME", "VERDICT", "HOOK", "PID", "USER", "EXE", "PEER",
    )
}

/// One line a person can scan: fixed-width columns time, verdict, hook, pid (the process:
/// `tgid`), user (name, else uid), executable (file name, else `[comm]`), peer
/// (`addr:port/proto`), rule, and `(+N suppressed)` when the kernel rate-limited that flow.
/// Long values are cut with `…`, except the peer: an IPv6 peer longer than its column
/// pushes the rule to the right.
pub fn format_text(r: &EventRecord) -> String {
    // Values from the system are escaped: a newline in a file name cannot start a line.
    let escape = |s: &str| crate::trust::escape(s).into_owned();
    let user = r
        .user
        .as_deref()
        .map(escape)
        .unwrap_or_else(|| r.uid.to_string());
    let exe = match &r.exe {
        Some(path) => escape(path.rsplit('/').next().unwrap_or(path)),
        None => format!("[{}]", escape(&r.comm)),
    };
    let mut line = format!(
        "{:<W_TIME$} {:<W_VERDICT$} {:<W_HOOK$} {:>W_PID$} {:<W_USER$} {:<W_EXE$} {:<W_PEER$} {}",
        fit(&r.time, W_TIME),
        fit(&r.verdict, W_VERDICT),
        fit(&r.hook, W_HOOK),
        r.tgid,
        fit(&user, W_USER),
        fit(&exe, W_EXE),
        r.peer(),
        escape(&r.rule),
    );
    if r.suppressed > 0 {
        line.push_str(&format!(" (+{} suppressed)", r.suppressed));
    }
    line
}

/// The syslog priority journald reads from the start of a line it receives on a stream
/// (`<3>` error, `<4>` warning; see sd-daemon(3)), for a line of `level` written to a
/// stream that goes to the journal; `""` otherwise (info lines keep journald's default).
/// Without it every line ztd writes is logged at the stream's priority (info), and
/// `journalctl -p warning` would never show a tamper finding.
pub fn journal_prefix(level: &str, to_journal: bool) -> &'static str {
    match (to_journal, level) {
        (true, "error") => "<3>",
        (true, "warn") => "<4>",
        _ => "",
    }
}

/// Whether the file with device `dev` and inode `ino` is the stream systemd named in
/// `JOURNAL_STREAM` (`DEV:INO`, decimal): set for a service whose stdout or stderr is the
/// journal; a redirected or inherited stream is not it, and gets no priority prefix.
pub fn is_journal_stream(journal_stream: Option<&str>, dev: u64, ino: u64) -> bool {
    let Some((d, i)) = journal_stream.and_then(|v| v.trim().split_once(':')) else {
        return false;
    };
    d.parse() == Ok(dev) && i.parse() == Ok(ino)
}

/// How `ztd` writes its logs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LogFormat {
    /// `level message key=value ...`, for a terminal.
    #[default]
    Text,
    /// One JSON object per line (`time`, `level`, `msg`, then the fields), for journald and
    /// log shippers.
    Json,
}

impl FromStr for LogFormat {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "text" => Ok(LogFormat::Text),
            "json" => Ok(LogFormat::Json),
            other => Err(format!(
                "invalid log format {other:?}: expected text or json"
            )),
        }
    }
}

impl fmt::Display for LogFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            LogFormat::Text => "text",
            LogFormat::Json => "json",
        })
    }
}

/// One log line (no trailing newline).
///
/// - [`LogFormat::Json`]: `{"time":"<RFC 3339 ms UTC>","level":..,"msg":..,<fields>}` with
///   the keys in that order; a field named `time`, `level` or `msg` is renamed `field.time`
///   etc. so it cannot hide the line's own.
/// - [`LogFormat::Text`]: `level message key=value ...`; a string value is printed bare if
///   it is a single plain word, else quoted as JSON; other values as JSON.
pub fn log_line(
    format: LogFormat,
    level: &str,
    message: &str,
    fields: &[(&str, serde_json::Value)],
) -> String {
    let json = |v: &serde_json::Value| serde_json::to_string(v).unwrap_or_default();
    let jstr = |s: &str| json(&serde_json::Value::from(s));
    match format {
        LogFormat::Json => {
            let mut out = format!(
                "{{\"time\":{},\"level\":{},\"msg\":{}",
                jstr(&rfc3339_ns(now_ns())),
                jstr(level),
                jstr(message)
            );
            for (key, value) in fields {
                let key = if matches!(*key, "time" | "level" | "msg") {
                    format!("field.{key}")
                } else {
                    (*key).to_string()
                };
                out.push_str(&format!(",{}:{}", jstr(&key), json(value)));
            }
            out.push('}');
            out
        }
        LogFormat::Text => {
            let mut out = format!("{level} {message}");
            for (key, value) in fields {
                let shown = match value {
                    serde_json::Value::String(s)
                        if !s.is_empty()
                            && !s.chars().any(|c| {
                                c.is_whitespace() || c == '"' || c == '=' || c.is_control()
                            }) =>
                    {
                        s.clone()
                    }
                    other => json(other),
                };
                out.push_str(&format!(" {key}={shown}"));
            }
            out
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn warnings_and_errors_carry_their_priority_only_on_the_journal_stream() {
        assert_eq!(journal_prefix("warn", true), "<4>");
        assert_eq!(journal_prefix("error", true), "<3>");
        assert_eq!(journal_prefix("info", true), "");
        assert_eq!(journal_prefix("warn", false), "");
        assert_eq!(journal_prefix("error", false), "");
    }

    #[test]
    fn the_journal_stream_is_recognised_by_device_and_inode() {
        assert!(is_journal_stream(Some("8:12345"), 8, 12345));
        assert!(is_journal_stream(Some("8:12345\n"), 8, 12345));
        // Another file (stderr redirected by the operator), or no systemd at all.
        assert!(!is_journal_stream(Some("8:12345"), 8, 12346));
        assert!(!is_journal_stream(Some("9:12345"), 8, 12345));
        assert!(!is_journal_stream(None, 8, 12345));
        assert!(!is_journal_stream(Some(""), 0, 0));
        assert!(!is_journal_stream(Some("garbage"), 0, 0));
    }

    const SEC: u64 = 1_000_000_000;
    /// 2026-11-27T00:00:00Z.
    const T0: u64 = 1_795_737_600 * SEC;

    fn record(verdict: &str, exe: Option<&str>, uid: u32, peer: &str, time_ns: u64) -> EventRecord {
        let peer_addr: IpAddr = peer.parse().unwrap();
        EventRecord {
            seq: 0,
            time: rfc3339_ns(time_ns),
            time_ns,
            verdict: verdict.to_string(),
            hook: "connect4".to_string(),
            pid: 4321,
            tgid: 4321,
            uid,
            user: (uid == 0).then(|| "root".to_string()),
            gid: uid,
            group: None,
            cgroup_id: 1,
            cgroup: Some("/".to_string()),
            exe_dev: 8 << 20 | 1,
            exe_ino: 42,
            exe: exe.map(str::to_string),
            comm: "curl".to_string(),
            proto: "tcp".to_string(),
            family: if peer_addr.is_ipv4() { 4 } else { 6 },
            local_addr: None,
            local_port: 0,
            peer_addr,
            peer_port: 443,
            rule_id: 0,
            rule: "default".to_string(),
            generation: 1,
            suppressed: 0,
            argv: None,
        }
    }

    fn deny(exe: &str, peer: &str, time_ns: u64) -> EventRecord {
        record("deny", Some(exe), 1000, peer, time_ns)
    }

    #[test]
    fn json_field_names_are_the_contract() {
        let r = record("deny", Some("/usr/bin/curl"), 0, "93.184.216.34", T0);
        let value = serde_json::to_value(&r).unwrap();
        let keys: Vec<&str> = value
            .as_object()
            .unwrap()
            .keys()
            .map(String::as_str)
            .collect();
        let mut want = EVENT_RECORD_FIELDS.to_vec();
        want.sort_unstable();
        let mut got = keys.clone();
        got.sort_unstable();
        assert_eq!(got, want);
        // The documented list is exactly this one (a new field must be added to both).
        assert_eq!(
            EVENT_RECORD_FIELDS.join(","),
            "seq,time,time_ns,verdict,hook,pid,tgid,uid,user,gid,group,cgroup_id,cgroup,\
             exe_dev,exe_ino,exe,comm,proto,family,local_addr,local_port,peer_addr,peer_port,\
             rule_id,rule,generation,suppressed,argv"
        );
        // Field order in the text follows the struct.
        let text = serde_json::to_string(&r).unwrap();
        let positions: Vec<usize> = EVENT_RECORD_FIELDS
            .iter()
            .map(|k| text.find(&format!("\"{k}\":")).unwrap())
            .collect();
        assert!(positions.windows(2).all(|w| w[0] < w[1]), "{text}");
        // Values and types.
        assert_eq!(value["time"], "2026-11-27T00:00:00.000Z");
        assert_eq!(value["time_ns"], T0);
        assert_eq!(value["peer_addr"], "93.184.216.34");
        assert_eq!(value["local_addr"], serde_json::Value::Null);
        assert_eq!(value["user"], "root");
        assert_eq!(value["group"], serde_json::Value::Null);
        assert_eq!(value["family"], 4);
        // And back.
        let back: EventRecord = serde_json::from_str(&text).unwrap();
        assert_eq!(back, r);
    }

    #[test]
    fn records_from_kernel_events() {
        // Built field by field: the kernel layout may grow.
        let mut ev = DecisionEvent::default();
        ev.header.kind = zt_common::EVENT_DECISION;
        ev.hook = Hook::Connect6 as u8;
        ev.verdict = Verdict::Audit as u8;
        ev.proto = Proto::Icmp as u8;
        ev.family = 6;
        ev.rule = 7;
        ev.ktime_ns = 5 * SEC;
        ev.generation = 3;
        ev.pid = 11;
        ev.tgid = 10;
        ev.uid = 1000;
        ev.gid = 100;
        ev.cgroup_id = 99;
        ev.exe = zt_common::ExeKey { dev: 1, ino: 2 };
        ev.peer_addr = "2001:db8::1".parse::<Ipv6Addr>().unwrap().octets();
        ev.local_addr = "2001:db8::2".parse::<Ipv6Addr>().unwrap().octets();
        ev.local_port = 5555;
        ev.suppressed = 9;
        ev.comm[..4].copy_from_slice(b"ping");
        let r = EventRecord::from_event(
            &ev,
            i128::from(T0) - i128::from(5 * SEC),
            "a.toml:3:1".into(),
        );
        assert_eq!(r.time, "2026-11-27T00:00:00.000Z");
        assert_eq!(r.verdict, "audit");
        assert_eq!(r.hook, "connect6");
        assert_eq!(r.proto, "icmp");
        assert_eq!(r.comm, "ping");
        assert_eq!(r.peer_addr, "2001:db8::1".parse::<IpAddr>().unwrap());
        assert_eq!((r.rule_id, r.rule.as_str()), (7, "a.toml:3:1"));
        assert_eq!((r.exe_dev, r.exe_ino, r.cgroup_id), (1, 2, 99));
        assert_eq!(r.local_addr, Some("2001:db8::2".parse::<IpAddr>().unwrap()));
        assert_eq!((r.local_port, r.suppressed), (5555, 9));

        ev.family = 4;
        ev.peer_addr = [0; 16];
        ev.peer_addr[..4].copy_from_slice(&[10, 0, 0, 1]);
        ev.comm = [b'x'; 16];
        ev.local_addr = [0; 16];
        let r = EventRecord::from_event(&ev, 0, "default".into());
        assert_eq!(r.peer_addr, "10.0.0.1".parse::<IpAddr>().unwrap());
        assert_eq!(r.local_addr, None, "all zero: unknown");
        assert_eq!(r.comm, "x".repeat(16));

        // Enrichment of what this system knows: uid 0.
        let mut r = r;
        r.uid = 0;
        r.gid = 0;
        let mut e = Enricher::new("/nonexistent");
        r.enrich(&mut e);
        assert_eq!(r.user.as_deref(), Some("root"));
        assert_eq!(r.group.as_deref(), Some("root"));
        assert_eq!(r.exe, None);
    }

    #[test]
    fn filter_by_verdict_uid_exe() {
        let r = record("deny", Some("/usr/bin/curl"), 1000, "10.1.2.3", T0);
        let f = |filter: EventFilter| filter.matches(&r, T0);
        assert!(f(EventFilter::default()));
        assert!(f(EventFilter {
            verdict: Some("deny".into()),
            ..Default::default()
        }));
        assert!(!f(EventFilter {
            verdict: Some("allow".into()),
            ..Default::default()
        }));
        assert!(f(EventFilter {
            uid: Some(1000),
            ..Default::default()
        }));
        assert!(!f(EventFilter {
            uid: Some(0),
            ..Default::default()
        }));
        assert!(f(EventFilter {
            exe: Some("/usr/bin/curl".into()),
            ..Default::default()
        }));
        assert!(f(EventFilter {
            exe: Some("curl".into()),
            ..Default::default()
        }));
        assert!(!f(EventFilter {
            exe: Some("/bin/curl".into()),
            ..Default::default()
        }));
        assert!(!f(EventFilter {
            exe: Some("cur".into()),
            ..Default::default()
        }));
        // Every field must match.
        assert!(!f(EventFilter {
            verdict: Some("deny".into()),
            uid: Some(1),
            ..Default::default()
        }));

        // Deleted executables match their path and name.
        let gone = record("deny", Some("/opt/x/tool (deleted)"), 0, "10.1.2.3", T0);
        for want in ["/opt/x/tool", "/opt/x/tool (deleted)", "tool"] {
            let filter = EventFilter {
                exe: Some(want.into()),
                ..Default::default()
            };
            assert!(filter.matches(&gone, T0), "{want}");
        }
        // Unknown executables match no exe filter.
        let unknown = record("deny", None, 0, "10.1.2.3", T0);
        assert!(!EventFilter {
            exe: Some("curl".into()),
            ..Default::default()
        }
        .matches(&unknown, T0));
    }

    #[test]
    fn filter_by_peer_cidr() {
        let peer = |cidr: &str, addr: &str| {
            let filter = EventFilter::from_args(None, None, None, Some(cidr), None).unwrap();
            filter.matches(&record("deny", None, 0, addr, T0), T0)
        };
        assert!(peer("10.0.0.0/8", "10.1.2.3"));
        assert!(!peer("10.0.0.0/8", "11.1.2.3"));
        assert!(peer("10.1.2.3", "10.1.2.3"));
        assert!(!peer("10.1.2.3", "10.1.2.4"));
        // Host bits are ignored.
        assert!(peer("10.1.2.3/8", "10.200.0.1"));
        assert!(peer("2001:db8::/32", "2001:db8::1"));
        assert!(!peer("2001:db8::/32", "2001:db9::1"));
        assert!(peer("::/0", "2001:db8::1"));
        // IPv4 peers against IPv6 CIDRs: through their mapped form.
        assert!(peer("::ffff:10.0.0.0/104", "10.1.2.3"));
        assert!(!peer("::ffff:10.0.0.0/104", "11.1.2.3"));
        assert!(!peer("2001:db8::/32", "10.1.2.3"));
        assert!(peer("::/0", "10.1.2.3"));
        // IPv6 peers against IPv4 CIDRs: only IPv4-mapped ones.
        assert!(!peer("0.0.0.0/0", "2001:db8::1"));
        assert!(peer("10.0.0.0/8", "::ffff:10.1.2.3"));
        assert!(peer("0.0.0.0/0", "10.1.2.3"));
    }

    #[test]
    fn filter_by_since_window() {
        let filter = EventFilter::from_args(None, None, None, None, Some("15m")).unwrap();
        let now = T0 + 3600 * SEC;
        let at = |ago_s: u64| record("deny", None, 0, "10.0.0.1", now - ago_s * SEC);
        assert!(filter.matches(&at(0), now));
        assert!(filter.matches(&at(14 * 60), now));
        assert!(filter.matches(&at(15 * 60), now), "the bound is inclusive");
        assert!(!filter.matches(&at(15 * 60 + 1), now));
        // From the future (clock steps): recent.
        assert!(filter.matches(&record("deny", None, 0, "10.0.0.1", now + SEC), now));
        // A window longer than the epoch.
        let all = EventFilter::from_args(None, None, None, None, Some("100000d")).unwrap();
        assert!(all.matches(&at(3600), now));
    }

    #[test]
    fn durations_parse_or_say_why() {
        assert_eq!(parse_duration("90s").unwrap(), Duration::from_secs(90));
        assert_eq!(parse_duration("15m").unwrap(), Duration::from_secs(900));
        assert_eq!(parse_duration("1h").unwrap(), Duration::from_secs(3600));
        assert_eq!(parse_duration("2d").unwrap(), Duration::from_secs(172_800));
        assert_eq!(parse_duration("1h30m").unwrap(), Duration::from_secs(5400));
        assert_eq!(
            parse_duration(" 500ms ").unwrap(),
            Duration::from_millis(500)
        );
        for bad in ["", "  ", "15", "abc", "15x", "-5m", "1.5.2h", "m"] {
            let e = parse_duration(bad).unwrap_err();
            let text = e.to_string();
            assert!(text.starts_with("invalid duration"), "{bad:?}: {text}");
            assert!(text.contains("e.g. 90s, 15m, 1h, 2d"), "{text}");
        }
        assert!(parse_duration("15x")
            .unwrap_err()
            .to_string()
            .contains("\"15x\""));
    }

    #[test]
    fn filters_have_a_serde_form_and_are_checked() {
        let f = EventFilter::from_args(
            Some("deny"),
            Some("/usr/bin/curl"),
            Some(1000),
            Some("10.0.0.0/8"),
            Some("90s"),
        )
        .unwrap();
        let text = serde_json::to_string(&f).unwrap();
        assert_eq!(
            text,
            r#"{"verdict":"deny","exe":"/usr/bin/curl","uid":1000,"peer":"10.0.0.0/8","since":"1m 30s"}"#
        );
        assert_eq!(serde_json::from_str::<EventFilter>(&text).unwrap(), f);
        assert_eq!(
            serde_json::to_string(&EventFilter::default()).unwrap(),
            "{}"
        );
        assert_eq!(
            serde_json::from_str::<EventFilter>("{}").unwrap(),
            EventFilter::default()
        );
        // Refused: unknown fields, bad durations, bad verdicts, bad peers.
        assert!(serde_json::from_str::<EventFilter>(r#"{"port":80}"#).is_err());
        assert!(serde_json::from_str::<EventFilter>(r#"{"since":"soon"}"#).is_err());
        let bad: EventFilter = serde_json::from_str(r#"{"verdict":"drop"}"#).unwrap();
        assert_eq!(bad.validate(), Err(FilterError::Verdict("drop".into())));
        assert!(EventFilter::from_args(Some("drop"), None, None, None, None).is_err());
        let e = EventFilter::from_args(None, None, None, Some("10.0.0.0/33"), None).unwrap_err();
        assert!(
            e.to_string().starts_with("invalid peer \"10.0.0.0/33\""),
            "{e}"
        );
    }

    #[test]
    fn history_is_bounded_and_eviction_is_not_loss() {
        let mut h = History::new(3, 16);
        for i in 0..5 {
            let mut r = deny("/usr/bin/curl", "10.0.0.1", T0 + i * SEC);
            r.suppressed = 2;
            let seq = h.push(r);
            assert_eq!(seq, i + 1);
        }
        h.count_lost(2);
        let all = h.query(&EventFilter::default(), T0 + 10 * SEC);
        assert_eq!(all.iter().map(|r| r.seq).collect::<Vec<_>>(), [3, 4, 5]);
        assert_eq!(all[0].time_ns, T0 + 2 * SEC, "oldest first");
        let c = h.counters();
        assert_eq!(c.delivered, 5);
        assert_eq!(c.evicted, 2);
        assert_eq!(
            c.suppressed, 10,
            "eviction does not forget what was counted"
        );
        assert_eq!(c.lost_in_daemon, 2);
        assert_eq!((c.len, c.capacity, c.last_seq), (3, 3, 5));
        assert_eq!(c.follower_missed, 0);
        // The accounting identity the metrics check: kernel sent 7 records, lost 1.
        let (sent, lost_in_kernel) = (7, 1);
        assert_eq!(
            sent + lost_in_kernel,
            c.delivered + lost_in_kernel + c.lost_in_daemon
        );

        let filtered = h.query(
            &EventFilter {
                since: Some(Duration::from_secs(7)),
                ..Default::default()
            },
            T0 + 10 * SEC,
        );
        assert_eq!(filtered.iter().map(|r| r.seq).collect::<Vec<_>>(), [4, 5]);
    }

    #[test]
    fn followers_get_the_tail_after_the_history() {
        let mut h = History::new(100, 16);
        h.push(deny("/usr/bin/curl", "10.0.0.1", T0));
        h.push(record("allow", Some("/usr/bin/curl"), 0, "10.0.0.1", T0));
        let filter = EventFilter {
            verdict: Some("deny".into()),
            ..Default::default()
        };
        let (past, mut follower) = h.query_and_subscribe(&filter, T0);
        assert_eq!(past.iter().map(|r| r.seq).collect::<Vec<_>>(), [1]);
        assert_eq!(follower.try_recv(), Ok(None));
        h.push(record(
            "allow",
            Some("/usr/bin/curl"),
            0,
            "10.0.0.1",
            now_ns(),
        ));
        h.push(deny("/usr/bin/wget", "10.0.0.2", now_ns()));
        match follower.try_recv() {
            Ok(Some(FollowItem::Event(r))) => assert_eq!(r.seq, 4),
            other => panic!("{other:?}"),
        }
        assert_eq!(follower.try_recv(), Ok(None));
        assert_eq!(h.counters().followers, 1);
        drop(h);
        assert_eq!(follower.try_recv(), Err(HistoryClosed));
    }

    #[tokio::test]
    async fn a_lagging_follower_is_told_what_it_missed() {
        let mut h = History::new(100, 4);
        let mut slow = h.subscribe(EventFilter::default());
        for i in 0..10 {
            h.push(deny("/usr/bin/curl", "10.0.0.1", T0 + i));
        }
        assert_eq!(slow.recv().await, Some(FollowItem::Missed { missed: 6 }));
        let mut seqs = Vec::new();
        for _ in 0..4 {
            match slow.recv().await {
                Some(FollowItem::Event(r)) => seqs.push(r.seq),
                other => panic!("{other:?}"),
            }
        }
        assert_eq!(seqs, [7, 8, 9, 10]);
        assert_eq!(slow.missed(), 6);
        let c = h.counters();
        assert_eq!(c.follower_missed, 6);
        // Missed by a follower is not lost: all ten are delivered and in the history.
        assert_eq!((c.delivered, c.lost_in_daemon, c.len), (10, 0, 10));
        // The wire form of the signal.
        let missed = serde_json::to_string(&FollowItem::Missed { missed: 6 }).unwrap();
        assert_eq!(missed, r#"{"missed":6}"#);
        assert_eq!(
            serde_json::from_str::<FollowItem>(&missed).unwrap(),
            FollowItem::Missed { missed: 6 }
        );
        let event = FollowItem::Event(Box::new(deny("/usr/bin/curl", "10.0.0.1", T0)));
        let line = serde_json::to_string(&event).unwrap();
        assert!(
            line.starts_with(r#"{"seq":"#),
            "an event is the bare record: {line}"
        );
        assert_eq!(serde_json::from_str::<FollowItem>(&line).unwrap(), event);
    }

    #[test]
    fn text_lines_are_aligned() {
        let mut a = record("deny", Some("/usr/bin/curl"), 0, "93.184.216.34", T0);
        a.rule = "default".into();
        let mut b = record(
            "audit",
            Some("/opt/some/very-long-program-name-here"),
            4_000_000,
            "::1",
            T0 + 1,
        );
        b.hook = "skb_ingress".into();
        b.tgid = 1_234_567;
        b.rule = "/etc/zt/policies/web.toml:12:1".into();
        b.rule_id = 3;
        b.suppressed = 5;
        let mut c = record("allow", None, 1000, "10.0.0.1", T0 + 2);
        c.user = Some("a-rather-long-user-name".into());
        c.proto = "udp".into();
        let lines: Vec<String> = [&a, &b, &c].into_iter().map(format_text).collect();
        let header = text_header();
        // Every column starts at the same character offset on every line.
        let starts = |line: &str| -> Vec<usize> {
            let chars: Vec<char> = line.chars().collect();
            (1..chars.len())
                .filter(|&i| chars[i - 1] == ' ' && chars[i] != ' ')
                .collect()
        };
        // time, verdict, hook, (pid is right-aligned, ending at 52), user, exe, peer, rule.
        let cols = [25, 33, 53, 64, 83, 113];
        for line in lines.iter().chain([&header]) {
            let s = starts(line);
            for col in cols {
                assert!(s.contains(&col), "column at {col} in {line:?} ({s:?})");
            }
            let chars: Vec<char> = line.chars().collect();
            assert_eq!(chars[52], ' ', "{line:?}");
            assert_ne!(chars[51], ' ', "{line:?}");
        }
        assert_eq!(
            lines[0],
            "2026-11-27T00:00:00.000Z deny    connect4       4321 root       curl               93.184.216.34:443/tcp         default"
        );
        assert!(
            lines[1].contains(" 1234567 4000000    very-long-program…"),
            "{}",
            lines[1]
        );
        assert!(lines[1].contains("[::1]:443/tcp"));
        assert!(lines[1].ends_with(" /etc/zt/policies/web.toml:12:1 (+5 suppressed)"));
        assert!(lines[2].contains(" a-rather-… [curl] "), "{}", lines[2]);
        assert!(header.starts_with("TIME"));
    }

    #[test]
    fn top_denied_counts_flows_in_the_window() {
        let mut h = History::new(100, 4);
        let now = T0 + 3600 * SEC;
        for _ in 0..3 {
            h.push(deny("/usr/bin/curl", "10.0.0.1", now - 10 * SEC));
        }
        // Old: outside a 5 minute window.
        for _ in 0..10 {
            h.push(deny("/usr/bin/curl", "10.0.0.9", now - 600 * SEC));
        }
        let mut suppressed = deny("/usr/bin/wget", "10.0.0.2", now - 20 * SEC);
        suppressed.suppressed = 4;
        h.push(suppressed);
        h.push(record("audit", None, 1000, "2001:db8::1", now - SEC));
        h.push(record("audit", None, 1000, "2001:db8::1", now - SEC));
        h.push(record(
            "allow",
            Some("/usr/bin/curl"),
            0,
            "10.0.0.1",
            now - SEC,
        ));
        let top = h.top_denied(Duration::from_secs(300), 10, now);
        assert_eq!(
            top,
            vec![
                (
                    "/usr/bin/wget".to_string(),
                    "10.0.0.2:443/tcp".to_string(),
                    5
                ),
                (
                    "/usr/bin/curl".to_string(),
                    "10.0.0.1:443/tcp".to_string(),
                    3
                ),
                (
                    "uid 1000".to_string(),
                    "[2001:db8::1]:443/tcp".to_string(),
                    2
                ),
            ]
        );
        assert_eq!(h.top_denied(Duration::from_secs(300), 1, now).len(), 1);
        let wide = h.top_denied(Duration::from_secs(3600), 1, now);
        assert_eq!(
            wide[0],
            (
                "/usr/bin/curl".to_string(),
                "10.0.0.9:443/tcp".to_string(),
                10
            )
        );
        assert!(h.top_denied(Duration::from_secs(300), 10, T0).is_empty());
    }

    #[test]
    fn log_lines() {
        let line = log_line(
            LogFormat::Json,
            "warn",
            "policy refused",
            &[
                ("path", "/etc/zt/a.toml".into()),
                ("errors", 3.into()),
                ("msg", "shadowed".into()),
            ],
        );
        let v: serde_json::Value = serde_json::from_str(&line).unwrap();
        assert_eq!(v["level"], "warn");
        assert_eq!(v["msg"], "policy refused");
        assert_eq!(v["path"], "/etc/zt/a.toml");
        assert_eq!(v["errors"], 3);
        assert_eq!(v["field.msg"], "shadowed");
        assert!(line.starts_with(r#"{"time":""#), "{line}");
        let time = v["time"].as_str().unwrap();
        assert!(humantime::parse_rfc3339(time).is_ok(), "{time}");
        assert!(!line.contains('\n'));

        let text = log_line(
            LogFormat::Text,
            "info",
            "reloaded",
            &[
                ("generation", 4.into()),
                ("path", "/etc/zt".into()),
                ("note", "two words".into()),
            ],
        );
        assert_eq!(
            text,
            r#"info reloaded generation=4 path=/etc/zt note="two words""#
        );
        assert_eq!("json".parse::<LogFormat>(), Ok(LogFormat::Json));
        assert!("xml".parse::<LogFormat>().is_err());
        assert_eq!(LogFormat::Text.to_string(), "text");
    }
}
