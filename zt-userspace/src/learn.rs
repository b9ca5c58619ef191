//! Learning mode: from the flows `ztd` recorded ([`crate::flows`]) to a least-privilege
//! policy (`ztctl suggest`), and the effect of a policy change on what was seen
//! (`ztctl diff`).
//!
//! A suggestion allows exactly the recorded flows: one identity per executable, unit or user
//! (`--identity-by`), peers as the exact addresses seen — merged into a wider CIDR only when
//! every address it covers was seen, or when the operator asks (`--aggregate /N`) — ports
//! as seen, and a comment per rule saying how many events it stands for and when they were
//! last seen. The text is parsed, validated and compiled before it is written: what `suggest`
//! writes passes `ztctl check` on the machine it ran on.
//!
//! `diff` judges every recorded flow against both policies with the reference evaluator that
//! `ztctl explain` uses ([`crate::policy::eval`]), and lists the flows whose fate changes.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    fmt::Write as _,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
    process::ExitCode,
    time::Duration,
};

use ipnet::IpNet;
use serde::Serialize;

use crate::{
    flows::{self, unit_of, Flow, FlowKind},
    history::{now_ns, parse_duration, rfc3339_ns},
    policy::{self, eval, Direction, ExeKey, Policy, ProtoMatch, SystemResolver},
    sys,
};

/// The most identities a policy may declare (see the README's Limits).
pub const MAX_IDENTITIES: usize = 63;

/// What a suggested identity is named after and matches on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum IdentityBy {
    /// The executable (`exe`, pinned to its file), plus `uid` when it ran as one user only.
    Exe,
    /// The systemd unit's cgroup (`cgroup`; the whole cgroup when it is no unit's).
    Unit,
    /// The user (`uid`).
    User,
}

/// Why learning failed.
#[derive(Debug, thiserror::Error)]
pub enum LearnError {
    #[error(transparent)]
    Store(#[from] flows::FlowStoreError),
    #[error("invalid {flag} {input:?}: expected /N with N from {min} to {max} (e.g. {example})")]
    Aggregate {
        flag: &'static str,
        input: String,
        min: u8,
        max: u8,
        example: &'static str,
    },
    #[error("no recorded flows{what}: run ztd (e.g. `ztd --mode audit`) while the workload runs, then try again")]
    Empty { what: String },
    #[error("the flows make {count} identities, more than a policy may hold ({MAX_IDENTITIES}): use --identity-by unit or --identity-by user, or narrow with --since")]
    TooManyIdentities { count: usize },
    #[error("the suggested policy does not pass the checks (please report this):\n{0}")]
    Invalid(String),
}

/// Parse `--aggregate /N` (IPv4, `max` 32) or `--aggregate6 /N` (IPv6, `max` 128).
pub fn parse_prefix(flag: &'static str, input: &str, v6: bool) -> Result<u8, LearnError> {
    let (min, max, example) = if v6 { (16, 128, "/64") } else { (8, 32, "/24") };
    let err = || LearnError::Aggregate {
        flag,
        input: input.to_string(),
        min,
        max,
        example,
    };
    let n: u8 = input
        .trim()
        .strip_prefix('/')
        .unwrap_or(input.trim())
        .parse()
        .map_err(|_| err())?;
    if n < min || n > max {
        return Err(err());
    }
    Ok(n)
}

/// The smallest set of CIDRs that covers exactly `addrs` — or, with `v4`/`v6`, each address
/// widened to its `/N` network first (IPv4-mapped IPv6 is IPv4).
pub fn cover(addrs: &[IpAddr], v4: Option<u8>, v6: Option<u8>) -> Vec<IpNet> {
    let nets: Vec<IpNet> = addrs
        .iter()
        .map(|a| {
            let a = canonical(*a);
            let prefix = match a {
                IpAddr::V4(_) => v4.unwrap_or(32),
                IpAddr::V6(_) => v6.unwrap_or(128),
            };
            IpNet::new(a, prefix).map_or(IpNet::from(a), |n| n.trunc())
        })
        .collect();
    IpNet::aggregate(&nets)
}

fn canonical(addr: IpAddr) -> IpAddr {
    match addr {
        IpAddr::V6(a) => a.to_ipv4_mapped().map_or(addr, IpAddr::V4),
        v4 => v4,
    }
}

/// A CIDR as a policy writes it: a host as its address.
fn net_text(net: &IpNet) -> String {
    if net.prefix_len() == net.max_prefix_len() {
        net.addr().to_string()
    } else {
        net.to_string()
    }
}

/// A TOML basic string (JSON string escapes are a subset of TOML's).
fn quote(s: &str) -> String {
    serde_json::to_string(s).unwrap_or_else(|_| format!("\"{}\"", s.escape_default()))
}

/// Ports as a TOML array, runs of consecutive ports as ranges.
fn ports_text(ports: &[u16]) -> String {
    let mut parts = Vec::new();
    let mut i = 0;
    while i < ports.len() {
        let mut j = i;
        while j + 1 < ports.len() && ports[j + 1] == ports[j].saturating_add(1) {
            j += 1;
        }
        if j >= i + 2 {
            parts.push(format!("\"{}-{}\"", ports[i], ports[j]));
        } else {
            parts.extend(ports[i..=j].iter().map(u16::to_string));
        }
        i = j + 1;
    }
    format!("[{}]", parts.join(", "))
}

/// A name usable as a bare TOML key and as a policy name.
fn sanitize(name: &str) -> String {
    let s: String = name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '_' || c == '-' {
                c
            } else {
                '_'
            }
        })
        .collect();
    let s = s.trim_matches('_').to_string();
    match s.as_str() {
        "" => "identity".to_string(),
        "any" => "any_".to_string(),
        _ => s,
    }
}

/// What `suggest` should do.
#[derive(Clone, Debug)]
pub struct SuggestOptions {
    pub identity_by: IdentityBy,
    /// Only flows last seen within this long before `now_ns`.
    pub since: Option<Duration>,
    pub now_ns: u64,
    /// Widen IPv4 / IPv6 peers to their `/N` networks.
    pub aggregate_v4: Option<u8>,
    pub aggregate_v6: Option<u8>,
    /// Only these verdicts (empty: all).
    pub verdicts: Vec<String>,
    /// The file's mode.
    pub mode: policy::Mode,
    /// Where the flows came from, for the header.
    pub source: String,
    /// Put before every identity name (and so every network name), to keep them apart from
    /// the names of other policy files.
    pub prefix: String,
}

/// A suggested policy.
#[derive(Clone, Debug)]
pub struct Suggestion {
    pub text: String,
    pub identities: usize,
    pub rules: usize,
    /// Flows the policy covers.
    pub flows: usize,
    /// What was left out, and why (also in the text, as comments).
    pub notes: Vec<String>,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
enum IdKey {
    Exe(String),
    Cgroup(String),
    Uid(u32),
}

#[derive(Default)]
struct IdFacts {
    uids: BTreeMap<u32, Option<String>>,
    exes: BTreeSet<String>,
    cgroups: BTreeSet<String>,
    units: BTreeSet<String>,
    raw: bool,
}

/// Events, verdicts and times of what a rule stands for.
#[derive(Clone, Default)]
struct Seen {
    count: u64,
    first_ns: u64,
    last_ns: u64,
    verdicts: BTreeMap<String, u64>,
    flows: usize,
}

impl Seen {
    fn add(&mut self, f: &Flow) {
        self.first_ns = if self.count == 0 {
            f.first_ns
        } else {
            self.first_ns.min(f.first_ns)
        };
        self.last_ns = self.last_ns.max(f.last_ns);
        self.count = self.count.saturating_add(f.count);
        *self.verdicts.entry(f.key.verdict.clone()).or_default() += f.count;
        self.flows += 1;
    }

    fn merge(&mut self, o: &Seen) {
        self.first_ns = if self.count == 0 {
            o.first_ns
        } else {
            self.first_ns.min(o.first_ns)
        };
        self.last_ns = self.last_ns.max(o.last_ns);
        self.count = self.count.saturating_add(o.count);
        for (v, n) in &o.verdicts {
            *self.verdicts.entry(v.clone()).or_default() += n;
        }
        self.flows += o.flows;
    }

    fn comment(&self) -> String {
        let verdicts: Vec<String> = self
            .verdicts
            .iter()
            .map(|(v, n)| format!("{v} {n}"))
            .collect();
        format!(
            "# {} event{} ({}) in {} flow{}, first seen {}, last seen {}",
            self.count,
            if self.count == 1 { "" } else { "s" },
            verdicts.join(", "),
            self.flows,
            if self.flows == 1 { "" } else { "s" },
            rfc3339_ns(self.first_ns),
            rfc3339_ns(self.last_ns)
        )
    }
}

/// Per port (0 for protocols without ports): the peers seen, and whether a bind was seen.
#[derive(Default)]
struct PortSeen {
    peers: BTreeSet<IpAddr>,
    bound: bool,
    seen: Seen,
}

/// An executable a policy can name: it still exists, and did not run deleted.
fn identity_key_exe(path: &str) -> Option<IdKey> {
    (!path.ends_with(" (deleted)") && Path::new(path).is_file())
        .then(|| IdKey::Exe(path.to_string()))
}

fn identity_key(f: &Flow, by: IdentityBy) -> IdKey {
    match by {
        IdentityBy::Exe => f
            .key
            .exe
            .as_deref()
            .and_then(identity_key_exe)
            .unwrap_or(IdKey::Uid(f.key.uid)),
        IdentityBy::Unit => match f.key.cgroup.as_deref() {
            Some(c) if !c.trim_matches('/').is_empty() => IdKey::Cgroup(match unit_of(c) {
                // A login session's scope is gone at the next login: take the user's slice.
                Some((unit, cg)) if unit.starts_with("session-") && unit.ends_with(".scope") => cg
                    .rsplit_once('/')
                    .map_or(cg.clone(), |(parent, _)| parent.to_string()),
                Some((_, cg)) => cg,
                None => c.trim_matches('/').to_string(),
            }),
            _ => IdKey::Uid(f.key.uid),
        },
        IdentityBy::User => IdKey::Uid(f.key.uid),
    }
}

/// Write a least-privilege policy that allows exactly `flows` (after the filters).
pub fn suggest(all: &[Flow], opts: &SuggestOptions) -> Result<Suggestion, LearnError> {
    let cutoff = opts.since.map(|d| {
        opts.now_ns
            .saturating_sub(u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
    });
    let flows: Vec<&Flow> = all
        .iter()
        .filter(|f| cutoff.is_none_or(|c| f.last_ns >= c))
        .filter(|f| opts.verdicts.is_empty() || opts.verdicts.contains(&f.key.verdict))
        .collect();
    if flows.is_empty() {
        let mut what = String::new();
        if let Some(d) = opts.since {
            let _ = write!(what, " in the last {}", humantime::format_duration(d));
        }
        if !opts.verdicts.is_empty() {
            let _ = write!(what, " with verdict {}", opts.verdicts.join(" or "));
        }
        return Err(LearnError::Empty { what });
    }
    let mut notes = Vec::new();
    if opts.identity_by == IdentityBy::Exe {
        let gone: BTreeSet<&str> = flows
            .iter()
            .filter_map(|f| f.key.exe.as_deref())
            .filter(|p| identity_key_exe(p).is_none())
            .collect();
        let replaced: BTreeSet<&str> = flows
            .iter()
            .filter(|f| (f.key.exe_dev, f.key.exe_ino) != (0, 0))
            .filter_map(|f| {
                let path = f.key.exe.as_deref()?;
                identity_key_exe(path)?;
                let meta = std::fs::metadata(path).ok()?;
                let now = (policy::kernel_dev(meta.dev()), meta.ino());
                (now != (f.key.exe_dev, f.key.exe_ino)).then_some(path)
            })
            .collect();
        if !replaced.is_empty() {
            let list: Vec<&str> = replaced.iter().copied().take(5).collect();
            notes.push(format!(
                "{} executables were replaced since they were recorded (another file now): the policy pins the current file: {}{}",
                replaced.len(),
                list.join(", "),
                if replaced.len() > 5 { ", ..." } else { "" }
            ));
        }
        if !gone.is_empty() {
            let list: Vec<&str> = gone.iter().copied().take(5).collect();
            notes.push(format!(
                "{} executables no longer exist (or ran deleted) and are identified by uid instead: {}{}",
                gone.len(),
                list.join(", "),
                if gone.len() > 5 { ", ..." } else { "" }
            ));
        }
    }

    // Identities.
    let mut ids: BTreeMap<IdKey, IdFacts> = BTreeMap::new();
    for f in &flows {
        let facts = ids.entry(identity_key(f, opts.identity_by)).or_default();
        facts.uids.insert(f.key.uid, f.user.clone());
        if let Some(e) = &f.key.exe {
            facts.exes.insert(e.clone());
        }
        if let Some(c) = &f.key.cgroup {
            facts.cgroups.insert(c.clone());
        }
        if let Some(u) = &f.unit {
            facts.units.insert(u.clone());
        }
        if f.key.kind == FlowKind::Socket {
            facts.raw = true;
        }
    }
    if ids.len() > MAX_IDENTITIES {
        return Err(LearnError::TooManyIdentities { count: ids.len() });
    }
    let mut names: BTreeMap<IdKey, String> = BTreeMap::new();
    let mut taken = BTreeSet::new();
    for (key, facts) in &ids {
        let base = opts.prefix.clone()
            + &sanitize(&match key {
                IdKey::Exe(p) => Path::new(p)
                    .file_name()
                    .map_or_else(|| p.clone(), |n| n.to_string_lossy().into_owned()),
                IdKey::Cgroup(c) => {
                    let last = c.rsplit('/').next().unwrap_or(c);
                    [".service", ".scope", ".slice"]
                        .iter()
                        .find_map(|s| last.strip_suffix(s))
                        .unwrap_or(last)
                        .to_string()
                }
                IdKey::Uid(uid) => match facts.uids.get(uid).cloned().flatten() {
                    Some(name) => name,
                    None => format!("uid-{uid}"),
                },
            });
        let mut name = base.clone();
        let mut n = 2;
        while !taken.insert(name.clone()) {
            name = format!("{base}-{n}");
            n += 1;
        }
        names.insert(key.clone(), name);
    }

    // Per identity, direction and protocol: what each port saw.
    // (identity, ingress?, proto)
    type RuleKey = (String, bool, String);
    let mut groups: BTreeMap<RuleKey, BTreeMap<u16, PortSeen>> = BTreeMap::new();
    let mut skipped_port0 = Seen::default();
    for f in &flows {
        let ident = names[&identity_key(f, opts.identity_by)].clone();
        let (direction, peer) = match f.key.kind {
            FlowKind::Egress => (Direction::Egress, Some(f.key.peer)),
            FlowKind::Ingress => (Direction::Ingress, Some(f.key.peer)),
            FlowKind::Bind => (Direction::Ingress, None),
            FlowKind::Socket => continue,
        };
        let has_ports = matches!(f.key.proto.as_str(), "tcp" | "udp");
        let port = if has_ports { f.key.port } else { 0 };
        if has_ports && port == 0 {
            if f.key.kind != FlowKind::Bind {
                skipped_port0.add(f);
            }
            continue;
        }
        let ps = groups
            .entry((ident, direction == Direction::Ingress, f.key.proto.clone()))
            .or_default()
            .entry(port)
            .or_default();
        match peer {
            Some(p) => {
                ps.peers.insert(p);
            }
            None => ps.bound = true,
        }
        ps.seen.add(f);
    }
    if skipped_port0.count > 0 {
        notes.push(format!(
            "{} tcp/udp flows to port 0 were left out (no port to allow)",
            skipped_port0.flows
        ));
    }

    // Rules: ports with the same peers share one rule; several CIDRs make a network.
    struct RuleOut {
        ident: String,
        direction: Direction,
        proto: &'static str,
        peers: Vec<IpNet>,
        ports: Option<Vec<u16>>,
        seen: Seen,
        bind_only: bool,
    }
    let loopback = || {
        vec![
            IpNet::from(IpAddr::V4(Ipv4Addr::LOCALHOST)),
            IpNet::from(IpAddr::V6(Ipv6Addr::LOCALHOST)),
        ]
    };
    let mut rules: Vec<RuleOut> = Vec::new();
    for ((ident, ingress, proto), ports) in &groups {
        let direction = if *ingress {
            &Direction::Ingress
        } else {
            &Direction::Egress
        };
        let proto_out: &'static str = match proto.as_str() {
            "tcp" => "tcp",
            "udp" => "udp",
            "icmp" => "icmp",
            _ => "any",
        };
        if proto_out == "icmp" || proto_out == "any" {
            let mut seen = Seen::default();
            let mut peers = Vec::new();
            for ps in ports.values() {
                seen.merge(&ps.seen);
                peers.extend(ps.peers.iter().copied());
            }
            if peers.is_empty() {
                continue;
            }
            rules.push(RuleOut {
                ident: ident.clone(),
                direction: *direction,
                proto: proto_out,
                peers: cover(&peers, opts.aggregate_v4, opts.aggregate_v6),
                ports: None,
                seen,
                bind_only: false,
            });
            continue;
        }
        let mut by_peers: BTreeMap<(Vec<IpNet>, bool), (Vec<u16>, Seen)> = BTreeMap::new();
        for (port, ps) in ports {
            let peers: Vec<IpAddr> = ps.peers.iter().copied().collect();
            let bind_only = peers.is_empty();
            let nets = if bind_only {
                loopback()
            } else {
                cover(&peers, opts.aggregate_v4, opts.aggregate_v6)
            };
            let entry = by_peers.entry((nets, bind_only)).or_default();
            entry.0.push(*port);
            entry.1.merge(&ps.seen);
        }
        for ((peers, bind_only), (ports, seen)) in by_peers {
            rules.push(RuleOut {
                ident: ident.clone(),
                direction: *direction,
                proto: proto_out,
                peers,
                ports: Some(ports),
                seen,
                bind_only,
            });
        }
    }

    // Networks for rules with several CIDRs (equal sets share one).
    let mut networks: BTreeMap<Vec<IpNet>, String> = BTreeMap::new();
    let mut net_names = BTreeSet::new();
    for r in &rules {
        if r.peers.len() > 1 && !networks.contains_key(&r.peers) {
            let base = if r.peers == loopback() {
                format!("{}-local", r.ident)
            } else {
                format!("{}-{}-peers", r.ident, r.proto)
            };
            let mut name = base.clone();
            let mut n = 2;
            while !net_names.insert(name.clone()) {
                name = format!("{base}-{n}");
                n += 1;
            }
            networks.insert(r.peers.clone(), name);
        }
    }

    // The text.
    let total: u64 = flows.iter().map(|f| f.count).sum();
    let first = flows.iter().map(|f| f.first_ns).min().unwrap_or(0);
    let last = flows.iter().map(|f| f.last_ns).max().unwrap_or(0);
    let mut t = String::new();
    let _ = writeln!(
        t,
        "# Suggested by `ztctl suggest` at {} from {}:",
        rfc3339_ns(opts.now_ns),
        opts.source
    );
    let _ = writeln!(
        t,
        "# {} flows, {} events, seen from {} to {}; identities by {}{}{}.",
        flows.len(),
        total,
        rfc3339_ns(first),
        rfc3339_ns(last),
        match opts.identity_by {
            IdentityBy::Exe => "executable",
            IdentityBy::Unit => "unit",
            IdentityBy::User => "user",
        },
        opts.since
            .map(|d| format!(", flows of the last {}", humantime::format_duration(d)))
            .unwrap_or_default(),
        match (opts.aggregate_v4, opts.aggregate_v6) {
            (None, None) => String::new(),
            (a, b) => format!(
                ", peers widened to{}{}",
                a.map(|n| format!(" /{n} (IPv4)")).unwrap_or_default(),
                b.map(|n| format!(" /{n} (IPv6)")).unwrap_or_default()
            ),
        }
    );
    let _ = writeln!(
        t,
        "# It allows exactly what was seen. Review it, `ztctl check` it, then apply it with a\n\
         # safety net: `ztctl apply FILE --confirm-within 2m`, test, `ztctl confirm`."
    );
    for n in &notes {
        let _ = writeln!(t, "# Note: {n}.");
    }
    let _ = writeln!(t, "version = 1");
    let _ = writeln!(t, "mode = {}", quote(opts.mode.as_str()));
    for (key, facts) in &ids {
        let name = &names[key];
        let _ = writeln!(t);
        let uids: Vec<String> = facts
            .uids
            .iter()
            .map(|(u, n)| match n {
                Some(n) => format!("{u} ({n})"),
                None => u.to_string(),
            })
            .collect();
        let mut facts_line = format!("# uid {}", uids.join(", "));
        for (what, set) in [
            ("exe", &facts.exes),
            ("cgroup", &facts.cgroups),
            ("unit", &facts.units),
        ] {
            if !set.is_empty() {
                let list: Vec<&str> = set.iter().map(String::as_str).take(5).collect();
                let more = if set.len() > 5 { ", ..." } else { "" };
                let _ = write!(facts_line, "; {what} {}{more}", list.join(", "));
            }
        }
        let _ = writeln!(t, "{facts_line}");
        let _ = writeln!(t, "[identity.{name}]");
        match key {
            IdKey::Exe(p) => {
                let _ = writeln!(t, "exe = {}", quote(p));
                if facts.uids.len() == 1 {
                    if let Some(uid) = facts.uids.keys().next() {
                        let _ = writeln!(t, "uid = {uid}");
                    }
                }
            }
            IdKey::Cgroup(c) => {
                let _ = writeln!(t, "cgroup = {}", quote(c));
            }
            IdKey::Uid(uid) => {
                let _ = writeln!(t, "uid = {uid}");
            }
        }
        if facts.raw {
            let _ = writeln!(
                t,
                "# It created raw or ICMP sockets (a sock_create decision was recorded)."
            );
            let _ = writeln!(t, "raw = true");
        }
    }
    for (peers, name) in &networks {
        let _ = writeln!(t);
        let cidrs: Vec<String> = peers.iter().map(|n| quote(&net_text(n))).collect();
        let _ = writeln!(t, "[network.{name}]");
        let _ = writeln!(t, "cidrs = [{}]", cidrs.join(", "));
    }
    for r in &rules {
        let _ = writeln!(t);
        let _ = writeln!(t, "{}", r.seen.comment());
        if r.bind_only {
            let _ = writeln!(
                t,
                "# Listening was seen, no inbound traffic: only local clients are allowed; widen `peer` for others."
            );
        }
        if r.proto == "any" {
            let _ = writeln!(
                t,
                "# Protocols other than tcp, udp and icmp: a rule without ports covers every protocol."
            );
        }
        let _ = writeln!(t, "[[rule]]");
        let _ = writeln!(t, "action = \"allow\"");
        if r.direction == Direction::Ingress {
            let _ = writeln!(t, "direction = \"ingress\"");
        }
        let _ = writeln!(t, "identity = {}", quote(&r.ident));
        let peer = match networks.get(&r.peers) {
            Some(name) => name.clone(),
            None => r.peers.first().map(net_text).unwrap_or_default(),
        };
        let _ = writeln!(t, "peer = {}", quote(&peer));
        if let Some(ports) = &r.ports {
            let _ = writeln!(t, "ports = {}", ports_text(ports));
        }
        let _ = writeln!(t, "proto = {}", quote(r.proto));
    }
    Ok(Suggestion {
        text: t,
        identities: ids.len(),
        rules: rules.len(),
        flows: flows.len(),
        notes,
    })
}

/// Parse, validate and compile `text` as policy file `path` against this system; the
/// warnings on success.
pub fn verify(path: &Path, text: &str) -> Result<Vec<String>, LearnError> {
    let cgroup_root = sys::cgroup2_root().unwrap_or_else(|_| PathBuf::from("/sys/fs/cgroup"));
    let resolver = SystemResolver { cgroup_root };
    let sources = [(path.to_path_buf(), text.to_string())];
    match policy::load_sources(&sources, &resolver) {
        Ok((p, warnings)) => match policy::compile(&p) {
            Ok(_) => Ok(warnings.iter().map(ToString::to_string).collect()),
            Err(e) => Err(LearnError::Invalid(e.to_string())),
        },
        Err(diags) => Err(LearnError::Invalid(
            diags
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join("\n"),
        )),
    }
}

// ------------------------------------------------------------------------------------------
// diff
// ------------------------------------------------------------------------------------------

/// A recorded flow whose fate differs between two policies.
#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct DiffEntry {
    /// `egress`, `ingress`, `bind` or `socket`.
    pub kind: String,
    pub exe: Option<String>,
    pub uid: u32,
    pub gid: u32,
    pub cgroup: Option<String>,
    pub proto: String,
    pub peer: IpAddr,
    pub port: u16,
    /// Events recorded for the flow (all verdicts), and when it was last seen.
    pub events: u64,
    pub last_seen: String,
    /// The verdicts of OLD and NEW (`allow`, `audit`, `deny`).
    pub old: String,
    pub new: String,
}

/// What changes between two policies, over the recorded flows.
#[derive(Clone, Debug, Default, Serialize)]
pub struct DiffReport {
    /// Allowed (or audited) by OLD, denied by NEW.
    pub allowed_by_old_only: Vec<DiffEntry>,
    /// Denied by OLD, allowed (or audited) by NEW.
    pub allowed_by_new_only: Vec<DiffEntry>,
    /// Flows both policies treat alike.
    pub unchanged: usize,
}

impl DiffReport {
    pub fn is_empty(&self) -> bool {
        self.allowed_by_old_only.is_empty() && self.allowed_by_new_only.is_empty()
    }
}

fn eval_proto(p: &str) -> eval::Proto {
    p.parse().unwrap_or(eval::Proto::Other)
}

fn query(f: &Flow) -> eval::Query {
    let k = &f.key;
    eval::Query {
        exe: (k.exe_dev != 0 || k.exe_ino != 0).then_some(ExeKey {
            dev: k.exe_dev,
            ino: k.exe_ino,
        }),
        uid: k.uid,
        gid: k.gid,
        cgroup: k
            .cgroup
            .as_deref()
            .unwrap_or("")
            .trim_matches('/')
            .to_string(),
        peer: k.peer,
        port: k.port,
        proto: eval_proto(&k.proto),
        direction: if k.kind == FlowKind::Egress {
            Direction::Egress
        } else {
            Direction::Ingress
        },
    }
}

fn identity_ok(policy: &Policy, rule: &policy::Rule, q: &eval::Query) -> bool {
    rule.identity.is_none_or(|i| {
        policy
            .identities()
            .get(i)
            .is_some_and(|id| eval::identity_matches(id, q))
    })
}

/// The verdict `policy` gives flow `f` (`global_audit`: `ztd --mode audit`).
pub fn judge(policy: &Policy, f: &Flow, global_audit: bool) -> eval::Verdict {
    let q = query(f);
    let verdict = match f.key.kind {
        FlowKind::Egress | FlowKind::Ingress => policy::explain(policy, &q, false).verdict,
        // A bind needs an ingress allow naming the port, whatever its peer (README).
        FlowKind::Bind => {
            let granted = q.port == 0
                || policy.rules().iter().any(|r| {
                    r.direction == Direction::Ingress
                        && r.action == policy::Action::Allow
                        && identity_ok(policy, r, &q)
                        && match r.proto {
                            ProtoMatch::Tcp => q.proto == eval::Proto::Tcp,
                            ProtoMatch::Udp => q.proto == eval::Proto::Udp,
                            ProtoMatch::Any => {
                                matches!(q.proto, eval::Proto::Tcp | eval::Proto::Udp)
                            }
                            ProtoMatch::Icmp => false,
                        }
                        && r.ports.as_ref().is_none_or(|ps| {
                            ps.iter().any(|p| p.first <= q.port && q.port <= p.last)
                        })
                });
            if granted {
                eval::Verdict::Allow
            } else {
                eval::Verdict::Deny
            }
        }
        // Raw sockets need `raw = true`; ICMP sockets also an allow rule covering icmp.
        FlowKind::Socket => {
            let raw = policy
                .identities()
                .iter()
                .any(|id| id.raw && eval::identity_matches(id, &q));
            let icmp = q.proto == eval::Proto::Icmp
                && policy.rules().iter().any(|r| {
                    r.action == policy::Action::Allow
                        && (r.proto == ProtoMatch::Icmp
                            || (r.proto == ProtoMatch::Any && r.ports.is_none()))
                        && identity_ok(policy, r, &q)
                });
            if raw || icmp {
                eval::Verdict::Allow
            } else {
                eval::Verdict::Deny
            }
        }
    };
    if global_audit && verdict == eval::Verdict::Deny {
        eval::Verdict::Audit
    } else {
        verdict
    }
}

/// Judge every recorded flow (verdicts merged: a flow is who, which way, peer, port and
/// protocol) against `old` and `new`.
pub fn diff(old: &Policy, new: &Policy, flows: &[Flow], global_audit: bool) -> DiffReport {
    let mut merged: HashMap<flows::FlowKey, Flow> = HashMap::new();
    for f in flows {
        let mut key = f.key.clone();
        key.verdict = String::new();
        match merged.get_mut(&key) {
            Some(m) => m.merge(f),
            None => {
                let mut m = f.clone();
                m.key = key.clone();
                merged.insert(key, m);
            }
        }
    }
    let mut merged: Vec<Flow> = merged.into_values().collect();
    merged.sort_by(|a, b| a.key.cmp(&b.key));
    let mut report = DiffReport::default();
    for f in &merged {
        let (o, n) = (judge(old, f, global_audit), judge(new, f, global_audit));
        if o.proceeds() == n.proceeds() {
            report.unchanged += 1;
            continue;
        }
        let entry = DiffEntry {
            kind: f.key.kind.as_str().to_string(),
            exe: f.key.exe.clone(),
            uid: f.key.uid,
            gid: f.key.gid,
            cgroup: f.key.cgroup.clone(),
            proto: f.key.proto.clone(),
            peer: f.key.peer,
            port: f.key.port,
            events: f.count,
            last_seen: rfc3339_ns(f.last_ns),
            old: o.as_str().to_string(),
            new: n.as_str().to_string(),
        };
        if o.proceeds() {
            report.allowed_by_old_only.push(entry);
        } else {
            report.allowed_by_new_only.push(entry);
        }
    }
    report
}

/// One line for a person.
pub fn entry_line(e: &DiffEntry) -> String {
    let who = match &e.exe {
        Some(exe) => format!("{exe} uid {}", e.uid),
        None => format!("uid {}", e.uid),
    };
    let peer = match e.peer {
        IpAddr::V6(a) => format!("[{a}]:{}", e.port),
        a => format!("{a}:{}", e.port),
    };
    let what = match e.kind.as_str() {
        "egress" => format!("-> {peer}/{}", e.proto),
        "ingress" => format!("<- {} to port {}/{}", e.peer, e.port, e.proto),
        "bind" => format!("bind port {}/{}", e.port, e.proto),
        _ => format!("socket {}", e.proto),
    };
    format!(
        "  {:<8} {who} {what}  ({} events, last seen {}; {} -> {})",
        e.kind, e.events, e.last_seen, e.old, e.new
    )
}

// ------------------------------------------------------------------------------------------
// The ztctl commands
// ------------------------------------------------------------------------------------------

/// `ztctl suggest`.
#[derive(Debug, clap::Args)]
pub struct SuggestArgs {
    /// Only flows seen in the last DURATION (e.g. 90m, 24h, 7d); default: everything recorded.
    #[arg(long, value_name = "DURATION")]
    pub since: Option<String>,
    /// Name and match identities after their executables, systemd units, or users.
    #[arg(long, value_enum, default_value = "exe")]
    pub identity_by: IdentityBy,
    /// Write the policy to FILE (replaced atomically) instead of standard output.
    #[arg(long, value_name = "FILE")]
    pub out: Option<PathBuf>,
    /// Widen every IPv4 peer to its /N network (e.g. /24); default: exact addresses, merged
    /// only where every address of the wider network was seen.
    #[arg(long, value_name = "/N")]
    pub aggregate: Option<String>,
    /// Widen every IPv6 peer to its /N network (e.g. /64).
    #[arg(long, value_name = "/N")]
    pub aggregate6: Option<String>,
    /// Only flows with this verdict (repeatable: audit, deny, allow); default: all.
    #[arg(long, value_parser = ["audit", "deny", "allow"])]
    pub verdict: Vec<String>,
    /// Mode of the suggested file.
    #[arg(long, value_parser = ["enforce", "audit"], default_value = "enforce")]
    pub mode: String,
    /// Put PREFIX before every identity and network name (names are unique across all the
    /// files of a policy).
    #[arg(long, value_name = "PREFIX", default_value = "")]
    pub prefix: String,
    /// The flow store (ztd's --flows-dir); read directly, ztd need not run.
    #[arg(long, value_name = "DIR", default_value = flows::DEFAULT_DIR)]
    pub store: PathBuf,
}

fn read_store(dir: &Path) -> Result<Vec<Flow>, LearnError> {
    let snap = flows::read(dir)?;
    if snap.bad_lines > 0 {
        eprintln!(
            "ztctl: warning: {} unreadable lines in the flow store {} were skipped (a torn write after a crash?)",
            snap.bad_lines,
            dir.display()
        );
    }
    Ok(snap.flows)
}

/// Run `ztctl suggest`: exit 0 written, 1 failed, 2 usage.
pub fn suggest_main(a: &SuggestArgs) -> ExitCode {
    let usage = |msg: String| {
        eprintln!("ztctl suggest: {msg}");
        ExitCode::from(2)
    };
    let since = match a.since.as_deref().map(parse_duration).transpose() {
        Ok(s) => s,
        Err(e) => return usage(e.to_string()),
    };
    let v4 = match a
        .aggregate
        .as_deref()
        .map(|s| parse_prefix("--aggregate", s, false))
    {
        None => None,
        Some(Ok(n)) => Some(n),
        Some(Err(e)) => return usage(e.to_string()),
    };
    let v6 = match a
        .aggregate6
        .as_deref()
        .map(|s| parse_prefix("--aggregate6", s, true))
    {
        None => None,
        Some(Ok(n)) => Some(n),
        Some(Err(e)) => return usage(e.to_string()),
    };
    let fail = |e: LearnError| {
        eprintln!("ztctl suggest: {e}");
        ExitCode::from(1)
    };
    let flows = match read_store(&a.store) {
        Ok(f) => f,
        Err(e) => return fail(e),
    };
    let opts = SuggestOptions {
        identity_by: a.identity_by,
        since,
        now_ns: now_ns(),
        aggregate_v4: v4,
        aggregate_v6: v6,
        verdicts: a.verdict.clone(),
        mode: if a.mode == "audit" {
            policy::Mode::Audit
        } else {
            policy::Mode::Enforce
        },
        source: format!("the flow store {}", a.store.display()),
        prefix: if a.prefix.is_empty() {
            String::new()
        } else {
            sanitize(&a.prefix)
        },
    };
    let s = match suggest(&flows, &opts) {
        Ok(s) => s,
        Err(e) => return fail(e),
    };
    let name = a
        .out
        .clone()
        .unwrap_or_else(|| PathBuf::from("suggested.toml"));
    match verify(&name, &s.text) {
        Ok(warnings) => warnings.iter().for_each(|w| eprintln!("{w}")),
        Err(e) => return fail(e),
    }
    match &a.out {
        None => print!("{}", s.text),
        Some(out) => {
            let tmp = out.with_extension("toml.tmp");
            let written = std::fs::write(&tmp, &s.text).and_then(|()| std::fs::rename(&tmp, out));
            if let Err(e) = written {
                let _ = std::fs::remove_file(&tmp);
                eprintln!("ztctl suggest: writing {}: {e}", out.display());
                return ExitCode::from(1);
            }
        }
    }
    for n in &s.notes {
        eprintln!("ztctl suggest: note: {n}");
    }
    eprintln!(
        "ztctl suggest: {} identities, {} rules from {} flows{}",
        s.identities,
        s.rules,
        s.flows,
        a.out
            .as_ref()
            .map(|o| format!("; written to {}", o.display()))
            .unwrap_or_default()
    );
    ExitCode::SUCCESS
}

/// `ztctl diff`.
#[derive(Debug, clap::Args)]
pub struct DiffArgs {
    /// The current policy (file or directory).
    pub old: PathBuf,
    /// The candidate policy (file or directory).
    pub new: PathBuf,
    /// Only flows seen in the last DURATION (e.g. 24h); default: everything recorded.
    #[arg(long, value_name = "DURATION")]
    pub since: Option<String>,
    /// Global mode to judge in (ztd's --mode): in audit mode nothing is denied.
    #[arg(long, value_parser = ["enforce", "audit"], default_value = "enforce")]
    pub mode: String,
    /// Print one JSON object.
    #[arg(long)]
    pub json: bool,
    /// The flow store (ztd's --flows-dir); read directly, ztd need not run.
    #[arg(long, value_name = "DIR", default_value = flows::DEFAULT_DIR)]
    pub store: PathBuf,
}

/// Run `ztctl diff`: exit 0 no recorded flow changes, 1 some do, 2 trouble (as diff(1)).
pub fn diff_main(a: &DiffArgs) -> ExitCode {
    let trouble = |msg: String| {
        eprintln!("ztctl diff: {msg}");
        ExitCode::from(2)
    };
    let since = match a.since.as_deref().map(parse_duration).transpose() {
        Ok(s) => s,
        Err(e) => return trouble(e.to_string()),
    };
    let cgroup_root = sys::cgroup2_root().unwrap_or_else(|_| PathBuf::from("/sys/fs/cgroup"));
    let resolver = SystemResolver { cgroup_root };
    let load = |path: &Path| -> Result<Policy, ExitCode> {
        policy::load(&[path.to_path_buf()], &resolver)
            .map(|(p, _)| p)
            .map_err(|diags| {
                for d in &diags {
                    eprintln!("{d}");
                }
                trouble(format!("{} is not a valid policy", path.display()))
            })
    };
    let (old, new) = match (load(&a.old), load(&a.new)) {
        (Ok(o), Ok(n)) => (o, n),
        (Err(c), _) | (_, Err(c)) => return c,
    };
    let mut flows = match read_store(&a.store) {
        Ok(f) => f,
        Err(e) => return trouble(e.to_string()),
    };
    if let Some(d) = since {
        let cutoff = now_ns().saturating_sub(u64::try_from(d.as_nanos()).unwrap_or(u64::MAX));
        flows.retain(|f| f.last_ns >= cutoff);
    }
    let report = diff(&old, &new, &flows, a.mode == "audit");
    if a.json {
        match serde_json::to_string(&report) {
            Ok(text) => println!("{text}"),
            Err(e) => return trouble(e.to_string()),
        }
    } else {
        let events = |v: &[DiffEntry]| v.iter().map(|e| e.events).sum::<u64>();
        for (title, list) in [
            ("allowed by OLD, denied by NEW", &report.allowed_by_old_only),
            ("denied by OLD, allowed by NEW", &report.allowed_by_new_only),
        ] {
            println!(
                "{title}: {} flows, {} events",
                list.len(),
                events(list.as_slice())
            );
            for e in list {
                println!("{}", entry_line(e));
            }
        }
        println!("unchanged: {} flows", report.unchanged);
    }
    if report.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use crate::flows::FlowKey;

    fn ips(list: &[&str]) -> Vec<IpAddr> {
        list.iter().map(|s| s.parse().unwrap()).collect()
    }

    fn nets(list: &[&str]) -> Vec<IpNet> {
        list.iter().map(|s| s.parse().unwrap()).collect()
    }

    #[test]
    fn cover_merges_only_what_was_seen_in_full() {
        // .2 and .3 make the /31; .5 stays alone; nothing wider is invented.
        assert_eq!(
            cover(&ips(&["10.0.0.2", "10.0.0.3", "10.0.0.5"]), None, None),
            nets(&["10.0.0.2/31", "10.0.0.5/32"])
        );
        // All four of a /30 make the /30; duplicates are harmless.
        assert_eq!(
            cover(
                &ips(&["10.0.0.4", "10.0.0.5", "10.0.0.6", "10.0.0.7", "10.0.0.7"]),
                None,
                None
            ),
            nets(&["10.0.0.4/30"])
        );
        // .1 and .2 are adjacent but no /31 holds exactly them.
        assert_eq!(
            cover(&ips(&["10.0.0.1", "10.0.0.2"]), None, None),
            nets(&["10.0.0.1/32", "10.0.0.2/32"])
        );
        // IPv6, and IPv4-mapped IPv6 judged as IPv4.
        assert_eq!(
            cover(&ips(&["fd00::1", "::ffff:10.0.0.9"]), None, None),
            nets(&["10.0.0.9/32", "fd00::1/128"])
        );
    }

    #[test]
    fn cover_widens_on_request() {
        assert_eq!(
            cover(
                &ips(&["10.0.0.2", "10.0.0.200", "10.0.1.9", "fd00:1::5"]),
                Some(24),
                None
            ),
            nets(&["10.0.0.0/23", "fd00:1::5/128"])
        );
        assert_eq!(
            cover(&ips(&["fd00:1::5", "fd00:1::9"]), None, Some(64)),
            nets(&["fd00:1::/64"])
        );
    }

    #[test]
    fn prefixes_and_ports_are_parsed_and_written() {
        assert_eq!(parse_prefix("--aggregate", "/24", false).unwrap(), 24);
        assert_eq!(parse_prefix("--aggregate", "16", false).unwrap(), 16);
        assert!(parse_prefix("--aggregate", "/33", false).is_err());
        assert!(parse_prefix("--aggregate", "/4", false).is_err());
        assert!(parse_prefix("--aggregate", "24x", false).is_err());
        assert_eq!(parse_prefix("--aggregate6", "/64", true).unwrap(), 64);
        assert_eq!(
            ports_text(&[22, 80, 81, 443, 444, 445, 8000]),
            "[22, 80, 81, \"443-445\", 8000]"
        );
        assert_eq!(sanitize("zt-probe.copy"), "zt-probe_copy");
        assert_eq!(sanitize("any"), "any_");
        assert_eq!(quote("a\"b\\c"), "\"a\\\"b\\\\c\"");
    }

    #[test]
    fn durations_parse_like_the_events_filter() {
        assert_eq!(parse_duration("90m").unwrap(), Duration::from_secs(5400));
        assert_eq!(
            parse_duration("7d").unwrap(),
            Duration::from_secs(7 * 86_400)
        );
        assert!(parse_duration("-1h").is_err());
        assert!(parse_duration("soon").is_err());
    }

    fn flow(kind: FlowKind, uid: u32, peer: &str, port: u16, proto: &str, last: u64) -> Flow {
        Flow {
            key: FlowKey {
                kind,
                verdict: "audit".into(),
                exe: None,
                exe_dev: 0,
                exe_ino: 0,
                uid,
                gid: uid,
                cgroup: Some("/system.slice/web.service".into()),
                proto: proto.into(),
                peer: peer.parse().unwrap(),
                port,
            },
            user: None,
            group: None,
            unit: Some("web.service".into()),
            count: 3,
            first_ns: last - 10,
            last_ns: last,
            last: rfc3339_ns(last),
        }
    }

    fn opts(by: IdentityBy) -> SuggestOptions {
        SuggestOptions {
            identity_by: by,
            since: None,
            now_ns: 2_000_000_000_000_000_000,
            aggregate_v4: None,
            aggregate_v6: None,
            verdicts: vec![],
            mode: policy::Mode::Enforce,
            source: "a test".into(),
            prefix: String::new(),
        }
    }

    fn load(text: &str) -> Policy {
        let resolver = SystemResolver {
            cgroup_root: PathBuf::from("/nonexistent"),
        };
        policy::load_sources(&[(PathBuf::from("t.toml"), text.to_string())], &resolver)
            .unwrap_or_else(|d| panic!("{d:?}\n{text}"))
            .0
    }

    #[test]
    fn a_suggestion_allows_exactly_the_flows_seen() {
        let t = 1_900_000_000_000_000_000;
        let flows = vec![
            flow(FlowKind::Egress, 4001, "10.0.0.2", 443, "tcp", t),
            flow(FlowKind::Egress, 4001, "10.0.0.3", 443, "tcp", t + 1),
            flow(FlowKind::Egress, 4001, "10.0.0.3", 8443, "tcp", t),
            flow(FlowKind::Egress, 4001, "10.0.0.2", 8443, "tcp", t),
            flow(FlowKind::Egress, 4001, "192.0.2.1", 53, "udp", t),
            flow(FlowKind::Egress, 4002, "fd00::7", 5432, "tcp", t),
            flow(FlowKind::Egress, 4002, "10.9.0.1", 0, "icmp", t),
            flow(FlowKind::Ingress, 4002, "10.1.0.1", 8080, "tcp", t),
            flow(FlowKind::Bind, 4002, "0.0.0.0", 8080, "tcp", t),
            flow(FlowKind::Bind, 4002, "0.0.0.0", 9090, "tcp", t),
        ];
        let s = suggest(&flows, &opts(IdentityBy::User)).unwrap();
        let p = load(&s.text);
        assert_eq!(s.identities, 2, "{}", s.text);
        assert!(s.text.contains("peer = \"10.0.0.2/31\""), "{}", s.text);
        assert!(s.text.contains("ports = [443, 8443]"), "{}", s.text);
        assert!(
            s.text.contains("# 12 events (audit 12) in 4 flows"),
            "{}",
            s.text
        );
        for f in &flows {
            assert_eq!(
                judge(&p, f, false),
                eval::Verdict::Allow,
                "{f:?}\n{}",
                s.text
            );
        }
        // Nothing more: another peer, port, protocol or user is denied.
        for f in [
            flow(FlowKind::Egress, 4001, "10.0.0.4", 443, "tcp", t),
            flow(FlowKind::Egress, 4001, "10.0.0.2", 444, "tcp", t),
            flow(FlowKind::Egress, 4001, "10.0.0.2", 443, "udp", t),
            flow(FlowKind::Egress, 4003, "10.0.0.2", 443, "tcp", t),
            flow(FlowKind::Ingress, 4002, "10.1.0.2", 8080, "tcp", t),
            flow(FlowKind::Bind, 4002, "0.0.0.0", 8081, "tcp", t),
            flow(FlowKind::Socket, 4002, "0.0.0.0", 0, "other", t),
        ] {
            assert_eq!(
                judge(&p, &f, false),
                eval::Verdict::Deny,
                "{f:?}\n{}",
                s.text
            );
        }
        // By unit: one identity for both users.
        let s = suggest(&flows, &opts(IdentityBy::Unit)).unwrap();
        assert_eq!(s.identities, 1);
        assert!(s.text.contains("[identity.web]"), "{}", s.text);
        assert!(s.text.contains("cgroup = \"system.slice/web.service\""));
        // A login session is taken as the user's slice (the next session is another scope);
        // a prefix keeps names apart from other files'.
        let mut session = flow(FlowKind::Egress, 1000, "10.0.0.2", 22, "tcp", t);
        session.key.cgroup = Some("/user.slice/user-1000.slice/session-4.scope".into());
        let mut o = opts(IdentityBy::Unit);
        o.prefix = "learned-".into();
        let s = suggest(&[session], &o).unwrap();
        assert!(
            s.text.contains("[identity.learned-user-1000]"),
            "{}",
            s.text
        );
        assert!(
            s.text.contains("cgroup = \"user.slice/user-1000.slice\""),
            "{}",
            s.text
        );
        load(&s.text);
        // By executable: one that is gone is identified by its uid, with a note.
        let mut gone = flow(FlowKind::Egress, 4001, "10.0.0.2", 443, "tcp", t);
        gone.key.exe = Some("/nonexistent/zt-gone".into());
        let mut here = flow(FlowKind::Egress, 0, "10.0.0.2", 443, "tcp", t);
        here.key.exe = Some("/bin/sh".into());
        let s = suggest(&[gone, here], &opts(IdentityBy::Exe)).unwrap();
        assert!(
            s.text.contains("[identity.uid-4001]\nuid = 4001"),
            "{}",
            s.text
        );
        assert!(s.text.contains("exe = \"/bin/sh\"\nuid = 0"), "{}", s.text);
        assert!(
            s.notes.iter().any(|n| n.contains("/nonexistent/zt-gone")),
            "{:?}",
            s.notes
        );
        // /bin/sh is recorded with dev 0, ino 0 here (unknown): not called replaced; with
        // another inode, it is.
        assert!(
            !s.notes.iter().any(|n| n.contains("replaced")),
            "{:?}",
            s.notes
        );
        let mut old_sh = flow(FlowKind::Egress, 0, "10.0.0.2", 443, "tcp", t);
        old_sh.key.exe = Some("/bin/sh".into());
        (old_sh.key.exe_dev, old_sh.key.exe_ino) = (1, 1);
        let s = suggest(&[old_sh], &opts(IdentityBy::Exe)).unwrap();
        assert!(
            s.notes
                .iter()
                .any(|n| n.contains("replaced") && n.contains("/bin/sh")),
            "{:?}",
            s.notes
        );
        // Filters.
        let mut o = opts(IdentityBy::User);
        o.verdicts = vec!["deny".into()];
        assert!(matches!(suggest(&flows, &o), Err(LearnError::Empty { .. })));
        let mut o = opts(IdentityBy::User);
        o.since = Some(Duration::from_secs(1));
        assert!(matches!(suggest(&flows, &o), Err(LearnError::Empty { .. })));
    }

    #[test]
    fn diff_lists_the_flows_whose_fate_changes() {
        let t = 1_900_000_000_000_000_000;
        let flows = vec![
            flow(FlowKind::Egress, 4001, "10.0.0.2", 443, "tcp", t),
            flow(FlowKind::Egress, 4001, "10.0.0.3", 80, "tcp", t),
            flow(FlowKind::Egress, 4002, "10.0.0.3", 80, "tcp", t),
        ];
        let old = load(
            "version = 1\n[identity.a]\nuid = 4001\n[[rule]]\naction = \"allow\"\nidentity = \"a\"\npeer = \"10.0.0.0/24\"\nports = [443]\nproto = \"tcp\"\n",
        );
        let new = load(
            "version = 1\n[[rule]]\naction = \"allow\"\npeer = \"10.0.0.3\"\nports = [80]\nproto = \"tcp\"\n",
        );
        let r = diff(&old, &new, &flows, false);
        assert_eq!(r.allowed_by_old_only.len(), 1, "{r:#?}");
        assert_eq!(r.allowed_by_old_only[0].port, 443);
        assert_eq!(r.allowed_by_new_only.len(), 2, "{r:#?}");
        assert_eq!(r.unchanged, 0);
        assert!(diff(&old, &old, &flows, false).is_empty());
        // In global audit mode nothing is denied, so nothing changes.
        assert!(diff(&old, &new, &flows, true).is_empty());
    }
}
