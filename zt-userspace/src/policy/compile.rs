//! Compiling a [`Policy`] into the contents of one policy slot's maps, so that the kernel
//! decides with a bounded number of lookups (see the `zt-common` crate docs for the algorithm
//! this output is made for): identity bits and wildcard masks, LPM trie entries with net
//! classes closed over containment, the port-class array, and the decision and rule-of maps.
//!
//! Ingress rules compile exactly like egress rules (same net classes, same port classes: the
//! port partition is cut at the ranges of the rules of both directions), except that their
//! decision keys carry [`INGRESS`] in the port class. Ingress allow rules also grant their
//! identity the right to bind their ports: `allow` of `(NET_CLASS_BIND, port class | INGRESS)`.

use std::collections::BTreeMap;
use std::fmt;
use std::path::PathBuf;

use ipnet::IpNet;
use zt_common::{
    DecisionKey, DecisionValue, ExeKey, RuleOfKey, SlotConfig, ANY_IDENTITY_BIT, INGRESS,
    MAX_CGROUPS, MAX_DECISIONS, MAX_EXES, MAX_GIDS, MAX_IDENTITIES, MAX_NET4, MAX_NET6, MAX_RULES,
    MAX_RULE_OF, MAX_UIDS, NET_CLASS_ANY4, NET_CLASS_ANY6, NET_CLASS_BIND, NET_CLASS_FIRST,
    PORTS_PER_PROTO, PORT_CLASS_ALL_ICMP, PORT_CLASS_ALL_OTHER, PORT_CLASS_ALL_TCP,
    PORT_CLASS_ALL_UDP, PORT_CLASS_FIRST, PORT_PROTOS, RULE_KIND_ALLOW, RULE_KIND_AUDIT_DENY,
    RULE_KIND_DENY,
};

use super::{Action, Direction, Mode, Policy, ProtoMatch, Rule};

/// A policy that does not fit the kernel maps.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum CompileError {
    #[error(
        "the policy declares {count} identities, but at most {max} fit (one bit each in a \
         64-bit mask, bit 0 is `any`): merge identities that are treated alike"
    )]
    TooManyIdentities { count: usize, max: usize },
    #[error(
        "the policy has {count} rules, but at most {max} fit: merge rules (one rule can list \
         several ports, and a network several CIDRs)"
    )]
    TooManyRules { count: usize, max: usize },
    #[error(
        "the policy needs at least {needed} entries in the {map} map, which holds {max}: {hint}"
    )]
    MapFull {
        map: &'static str,
        needed: usize,
        max: usize,
        hint: &'static str,
    },
}

/// A rule as status output shows it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RuleInfo {
    pub id: u32,
    pub path: PathBuf,
    pub line: usize,
    pub column: usize,
    pub action: Action,
    pub direction: Direction,
    /// Identity name as written (`any` when omitted).
    pub identity: String,
    /// Peer as written.
    pub peer: String,
    /// Ports as `5432,8000-8100` (local ports for ingress); `None`: every port.
    pub ports: Option<String>,
    pub proto: ProtoMatch,
    /// Mode of the rule's file.
    pub mode: Mode,
    pub log: bool,
}

impl RuleInfo {
    /// E.g. `allow web -> db tcp/5432,8000-8100`, `deny any -> 10.0.0.0/8 any`; ingress
    /// rules say so and point from the peer: `allow ingress web <- admins tcp/22`.
    pub fn summary(&self) -> String {
        let what = match (&self.ports, self.proto) {
            (Some(ports), ProtoMatch::Any) => format!("tcp+udp/{ports}"),
            (Some(ports), proto) => format!("{proto}/{ports}"),
            (None, proto) => proto.to_string(),
        };
        match self.direction {
            Direction::Egress => {
                format!("{} {} -> {} {what}", self.action, self.identity, self.peer)
            }
            Direction::Ingress => format!(
                "{} ingress {} <- {} {what}",
                self.action, self.identity, self.peer
            ),
        }
    }
}

impl fmt::Display for RuleInfo {
    /// The summary, with ` [audit]` for rules of audit-mode files.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.summary())?;
        if self.mode == Mode::Audit {
            f.write_str(" [audit]")?;
        }
        Ok(())
    }
}

/// A declared identity and its bit.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IdentityInfo {
    /// 1..=63 (bit 0 is `any`).
    pub bit: u32,
    pub name: String,
    pub path: PathBuf,
    pub line: usize,
    pub column: usize,
    pub mode: Mode,
    /// What the identity resolved to (for `ztctl status` and change notices).
    pub exe: Option<super::ExeMatch>,
    /// `sha256` as written (hex), when pinned.
    pub sha256: Option<String>,
    pub uid: Option<u32>,
    pub user: Option<String>,
    pub gid: Option<u32>,
    pub group: Option<String>,
    pub unit: Option<String>,
    pub cgroup: Option<super::CgroupMatch>,
    /// Whether some process can match it now.
    pub matchable: bool,
    /// Why it matches nothing (a missing file, a hash mismatch), if it is a fault.
    pub problem: Option<String>,
}

/// The contents of one policy slot's maps. Every vector is sorted.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Compiled {
    /// `generation` and `flags` are 0: the loader sets those.
    pub config: SlotConfig,
    pub exes: Vec<(ExeKey, u64)>,
    pub uids: Vec<(u32, u64)>,
    pub gids: Vec<(u32, u64)>,
    pub cgroups: Vec<(u64, u64)>,
    /// (prefix length, address in network order, net class).
    pub net4: Vec<(u32, [u8; 4], u32)>,
    pub net6: Vec<(u32, [u8; 16], u32)>,
    /// `PORT_PROTOS * PORTS_PER_PROTO` entries, index `proto * 65536 + port`; 0 = no class.
    pub ports: Vec<u32>,
    pub decisions: Vec<(DecisionKey, DecisionValue)>,
    pub rule_of: Vec<(RuleOfKey, u32)>,
    /// By id (`rules[i].id == i + 1`).
    pub rules: Vec<RuleInfo>,
    /// By bit.
    pub identities: Vec<IdentityInfo>,
    /// The executables the policy pinned, by (device, inode): names events of processes
    /// that exited before their path could be read from /proc.
    pub exe_paths: Vec<(ExeKey, PathBuf)>,
}

fn check(
    map: &'static str,
    needed: usize,
    max: u32,
    hint: &'static str,
) -> Result<(), CompileError> {
    if needed > max as usize {
        Err(CompileError::MapFull {
            map,
            needed,
            max: max as usize,
            hint,
        })
    } else {
        Ok(())
    }
}

const HINT_NETS: &str = "use fewer distinct CIDRs (aggregate adjacent ones into shorter prefixes)";
const HINT_DECISIONS: &str = "use fewer distinct CIDRs and port ranges, or fewer rules that \
                              combine many CIDRs with many port ranges";

/// Compiles a validated policy.
pub fn compile(policy: &Policy) -> Result<Compiled, CompileError> {
    let max_identities = MAX_IDENTITIES - 1;
    if policy.identities.len() > max_identities {
        return Err(CompileError::TooManyIdentities {
            count: policy.identities.len(),
            max: max_identities,
        });
    }
    let max_rules = (MAX_RULES - 1) as usize;
    if policy.rules.len() > max_rules {
        return Err(CompileError::TooManyRules {
            count: policy.rules.len(),
            max: max_rules,
        });
    }

    let mut c = identities(policy)?;
    let ports = PortPartition::new(&policy.rules);
    // Ingress keys carry the INGRESS bit (classes stay sorted: every class is below it).
    let rule_ports: Vec<Vec<u32>> = policy
        .rules
        .iter()
        .map(|r| {
            let dir = match r.direction {
                Direction::Egress => 0,
                Direction::Ingress => INGRESS,
            };
            ports.classes(r).into_iter().map(|pc| pc | dir).collect()
        })
        .collect();
    let nets = Nets::new(policy)?;
    let mut out = Decisions::default();
    let meta: Vec<Hit> = policy.rules.iter().map(|r| Hit::new(0, 0, r)).collect();

    // Peers `any` (and /0) have their own net classes, probed for every destination. Bind
    // grants (NET_CLASS_BIND sorts between them and the CIDR classes) go in the same batch.
    let mut hits = Vec::new();
    for (ri, &(any4, any6)) in nets.any.iter().enumerate() {
        for (flag, class) in [(any4, NET_CLASS_ANY4), (any6, NET_CLASS_ANY6)] {
            if flag {
                hits.extend(rule_ports[ri].iter().map(|&pc| meta[ri].at(class, pc)));
            }
        }
    }
    for (ri, rule) in policy.rules.iter().enumerate() {
        if rule.direction == Direction::Ingress && rule.action == Action::Allow {
            hits.extend(
                rule_ports[ri]
                    .iter()
                    .map(|&pc| meta[ri].at(NET_CLASS_BIND, pc)),
            );
        }
    }
    out.emit(&mut hits)?;
    // Every trie entry carries the rules of every policy CIDR that contains it. Sorted by
    // (address, prefix length), CIDRs come in depth-first order of the containment tree, so
    // a stack holds exactly the entries that contain the current one.
    for fam in [&nets.v4, &nets.v6] {
        let mut stack: Vec<usize> = Vec::new();
        for (i, entry) in fam.entries.iter().enumerate() {
            while let Some(&top) = stack.last() {
                if fam.contains(&fam.entries[top], entry) {
                    break;
                }
                stack.pop();
            }
            stack.push(i);
            for &e in &stack {
                for &ri in &fam.entries[e].rules {
                    let m = meta[ri];
                    hits.extend(rule_ports[ri].iter().map(|&pc| m.at(entry.class, pc)));
                }
            }
            out.emit(&mut hits)?;
        }
    }

    c.net4 = nets
        .v4
        .entries
        .iter()
        .map(|e| (u32::from(e.len), (e.addr as u32).to_be_bytes(), e.class))
        .collect();
    c.net6 = nets
        .v6
        .entries
        .iter()
        .map(|e| (u32::from(e.len), e.addr.to_be_bytes(), e.class))
        .collect();
    c.decisions = out.decisions;
    c.rule_of = out.rule_of;
    // Rules with `log = true` report their allows too: the kernel reads the flag with the id.
    for (_, rule) in &mut c.rule_of {
        let logged = (*rule as usize)
            .checked_sub(1)
            .and_then(|i| policy.rules.get(i))
            .is_some_and(|r| r.log);
        if logged {
            *rule |= zt_common::RULE_LOG_FLAG;
        }
    }
    c.ports = ports.array;
    c.rules = policy
        .rules
        .iter()
        .map(|r| RuleInfo {
            id: r.id,
            path: policy.file_path(r.file).to_path_buf(),
            line: r.loc.line,
            column: r.loc.column,
            action: r.action,
            direction: r.direction,
            identity: r.identity_name.clone(),
            peer: r.peer_text.clone(),
            ports: r.ports.as_ref().map(|p| {
                p.iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join(",")
            }),
            proto: r.proto,
            mode: r.mode,
            log: r.log,
        })
        .collect();
    Ok(c)
}

/// Identity bits, wildcard masks and the exe/uid/gid/cgroup maps.
fn identities(policy: &Policy) -> Result<Compiled, CompileError> {
    let any: u64 = 1 << ANY_IDENTITY_BIT;
    let mut config = SlotConfig {
        exe_wildcard: any,
        uid_wildcard: any,
        gid_wildcard: any,
        cgroup_wildcard: any,
        rules: u32::try_from(policy.rules.len()).unwrap_or(u32::MAX),
        ..SlotConfig::default()
    };
    let mut exes: BTreeMap<ExeKey, u64> = BTreeMap::new();
    let mut uids: BTreeMap<u32, u64> = BTreeMap::new();
    let mut gids: BTreeMap<u32, u64> = BTreeMap::new();
    let mut cgroups: BTreeMap<u64, u64> = BTreeMap::new();
    let mut infos = Vec::with_capacity(policy.identities.len());
    for (i, id) in policy.identities.iter().enumerate() {
        let bit_index = i as u32 + 1;
        let bit: u64 = 1 << bit_index;
        infos.push(IdentityInfo {
            bit: bit_index,
            name: id.name.clone(),
            path: policy.file_path(id.file).to_path_buf(),
            line: id.loc.line,
            column: id.loc.column,
            mode: id.mode,
            exe: id.exe.clone(),
            sha256: id.sha256.as_ref().map(|s| super::hex(s)),
            uid: id.uid,
            user: id.user_name.clone(),
            gid: id.gid,
            group: id.group_name.clone(),
            unit: id.unit.clone(),
            cgroup: id.cgroup.clone(),
            matchable: id.matchable(),
            problem: id.problem.clone(),
        });
        if id.problem.is_some() {
            // Disabled: no map entry and no wildcard bit, so it matches nothing.
            continue;
        }
        match &id.exe {
            Some(exe) => *exes.entry(exe.key).or_default() |= bit,
            None => config.exe_wildcard |= bit,
        }
        match id.uid {
            Some(uid) => *uids.entry(uid).or_default() |= bit,
            None => config.uid_wildcard |= bit,
        }
        match id.gid {
            Some(gid) => *gids.entry(gid).or_default() |= bit,
            None => config.gid_wildcard |= bit,
        }
        match &id.cgroup {
            // A cgroup that did not exist at load time: no entry, not a wildcard, so the
            // identity matches nothing.
            Some(cg) => {
                if let Some(cgid) = cg.id {
                    *cgroups.entry(cgid).or_default() |= bit;
                    config.cgroup_levels |= 1 << cg.level;
                }
            }
            None => config.cgroup_wildcard |= bit,
        }
        match id.mode {
            Mode::Audit => config.audit_identities |= bit,
            Mode::Enforce => config.enforce_identities |= bit,
        }
        if id.raw {
            config.raw_identities |= bit;
            config.icmp_identities |= bit;
        }
    }
    // ICMP sockets: for identities that some allow rule (either direction) gives icmp —
    // `proto = "icmp"`, or `proto = "any"` without ports (every protocol).
    for rule in &policy.rules {
        let gives_icmp = rule.proto == ProtoMatch::Icmp
            || (rule.proto == ProtoMatch::Any && rule.ports.is_none());
        if rule.action == Action::Allow && gives_icmp {
            config.icmp_identities |= 1 << identity_bit(rule);
        }
    }
    let hint = "name fewer distinct values in identities";
    check("exe", exes.len(), MAX_EXES, hint)?;
    check("uid", uids.len(), MAX_UIDS, hint)?;
    check("gid", gids.len(), MAX_GIDS, hint)?;
    check("cgroup", cgroups.len(), MAX_CGROUPS, hint)?;
    Ok(Compiled {
        config,
        exes: exes.into_iter().collect(),
        uids: uids.into_iter().collect(),
        gids: gids.into_iter().collect(),
        cgroups: cgroups.into_iter().collect(),
        net4: Vec::new(),
        net6: Vec::new(),
        ports: Vec::new(),
        decisions: Vec::new(),
        rule_of: Vec::new(),
        rules: Vec::new(),
        identities: infos,
        exe_paths: {
            let mut paths: Vec<(ExeKey, PathBuf)> = policy
                .identities
                .iter()
                .filter(|id| id.problem.is_none())
                .filter_map(|id| id.exe.as_ref().map(|e| (e.key, e.path.clone())))
                .collect();
            paths.sort();
            paths.dedup_by(|a, b| a.0 == b.0);
            paths
        },
    })
}

/// One elementary port interval of one protocol (from `first` to the next interval's start),
/// class 0 if no rule has it.
#[derive(Clone, Copy, Debug)]
struct Interval {
    first: u32,
    class: u32,
}

/// The port space of tcp and udp, cut at every range endpoint of the rules (of both directions)
/// for that protocol.
struct PortPartition {
    array: Vec<u32>,
    /// Intervals of tcp and udp, sorted, covering 1..=65535.
    intervals: [Vec<Interval>; 2],
}

const TCP: usize = 0;
const UDP: usize = 1;

/// Whether a rule's ports are ports of protocol `p` (tcp or udp) of the port map.
fn applies(proto: ProtoMatch, p: usize) -> bool {
    match proto {
        ProtoMatch::Any => true,
        ProtoMatch::Tcp => p == TCP,
        ProtoMatch::Udp => p == UDP,
        ProtoMatch::Icmp => false,
    }
}

impl PortPartition {
    fn new(rules: &[Rule]) -> PortPartition {
        let per_proto = PORTS_PER_PROTO as usize;
        let mut array = vec![0u32; PORT_PROTOS as usize * per_proto];
        let mut intervals: [Vec<Interval>; 2] = [Vec::new(), Vec::new()];
        for (p, out) in intervals.iter_mut().enumerate() {
            // cut[x]: an interval starts at x. depth: +1 where a range starts, -1 after it ends.
            let mut cut = vec![false; per_proto + 1];
            let mut depth = vec![0i64; per_proto + 1];
            for rule in rules.iter().filter(|r| applies(r.proto, p)) {
                for r in rule.ports.iter().flatten() {
                    let (a, b) = (usize::from(r.first), usize::from(r.last) + 1);
                    cut[a] = true;
                    cut[b] = true;
                    depth[a] += 1;
                    depth[b] -= 1;
                }
            }
            let mut covered = 0i64;
            let mut start = 1usize;
            for port in 1..=per_proto {
                if port == per_proto || (port > 1 && cut[port]) {
                    // Close start..port.
                    // An interval's class is named by where it starts, so that a change to one
                    // rule renames no other interval's class (small reload diffs).
                    let class = if covered > 0 {
                        PORT_CLASS_FIRST + (p * per_proto + start) as u32
                    } else {
                        0
                    };
                    if class != 0 {
                        array[p * per_proto + start..p * per_proto + port].fill(class);
                    }
                    out.push(Interval {
                        first: start as u32,
                        class,
                    });
                    start = port;
                }
                covered += depth[port];
            }
        }
        PortPartition { array, intervals }
    }

    /// The port classes a rule covers, sorted.
    fn classes(&self, rule: &Rule) -> Vec<u32> {
        // ICMP has no ports (the parser refuses `ports` with icmp).
        if rule.proto == ProtoMatch::Icmp {
            return vec![PORT_CLASS_ALL_ICMP];
        }
        let Some(ranges) = &rule.ports else {
            return match rule.proto {
                ProtoMatch::Tcp => vec![PORT_CLASS_ALL_TCP],
                ProtoMatch::Udp => vec![PORT_CLASS_ALL_UDP],
                ProtoMatch::Icmp => vec![PORT_CLASS_ALL_ICMP],
                ProtoMatch::Any => vec![
                    PORT_CLASS_ALL_TCP,
                    PORT_CLASS_ALL_UDP,
                    PORT_CLASS_ALL_OTHER,
                    PORT_CLASS_ALL_ICMP,
                ],
            };
        };
        let mut out = Vec::new();
        for (p, intervals) in self.intervals.iter().enumerate() {
            if !applies(rule.proto, p) {
                continue;
            }
            for r in ranges {
                let (first, last) = (u32::from(r.first), u32::from(r.last));
                let start = intervals.partition_point(|iv| iv.first < first);
                out.extend(
                    intervals[start..]
                        .iter()
                        .take_while(|iv| iv.first <= last)
                        .map(|iv| iv.class)
                        .filter(|&c| c != 0),
                );
            }
        }
        out.sort_unstable();
        out.dedup();
        out
    }
}

/// A policy CIDR (other than /0) and the rules whose peer names exactly it.
struct NetEntry {
    addr: u128,
    len: u8,
    class: u32,
    rules: Vec<usize>,
}

/// The trie entries of one address family, sorted by (address, prefix length).
struct Family {
    bits: u8,
    entries: Vec<NetEntry>,
}

impl Family {
    fn new(bits: u8, mut cidrs: Vec<(u128, u8, usize)>) -> Family {
        cidrs.sort_unstable();
        let mut entries: Vec<NetEntry> = Vec::new();
        for (addr, len, rule) in cidrs {
            match entries.last_mut() {
                Some(e) if e.addr == addr && e.len == len => {
                    if e.rules.last() != Some(&rule) {
                        e.rules.push(rule);
                    }
                }
                _ => entries.push(NetEntry {
                    addr,
                    len,
                    class: 0,
                    rules: vec![rule],
                }),
            }
        }
        Family { bits, entries }
    }

    fn mask(&self, len: u8) -> u128 {
        if len == 0 {
            0
        } else {
            let all = if self.bits == 128 {
                u128::MAX
            } else {
                (1u128 << self.bits) - 1
            };
            (all << (self.bits - len)) & all
        }
    }

    /// Whether `outer` contains (or is) `inner`.
    fn contains(&self, outer: &NetEntry, inner: &NetEntry) -> bool {
        outer.len <= inner.len && inner.addr & self.mask(outer.len) == outer.addr
    }
}

struct Nets {
    /// Per rule: covers `any` for IPv4 / IPv6.
    any: Vec<(bool, bool)>,
    v4: Family,
    v6: Family,
}

impl Nets {
    fn new(policy: &Policy) -> Result<Nets, CompileError> {
        let mut any = Vec::with_capacity(policy.rules.len());
        let (mut v4, mut v6) = (Vec::new(), Vec::new());
        for (ri, rule) in policy.rules.iter().enumerate() {
            let mut a = (false, false);
            match policy.peer_cidrs(rule) {
                None => a = (true, true),
                Some(cidrs) => {
                    for cidr in cidrs {
                        match cidr {
                            IpNet::V4(n) if n.prefix_len() == 0 => a.0 = true,
                            IpNet::V6(n) if n.prefix_len() == 0 => a.1 = true,
                            IpNet::V4(n) => {
                                v4.push((u128::from(u32::from(n.network())), n.prefix_len(), ri))
                            }
                            IpNet::V6(n) => v6.push((u128::from(n.network()), n.prefix_len(), ri)),
                        }
                    }
                }
            }
            any.push(a);
        }
        let mut nets = Nets {
            any,
            v4: Family::new(32, v4),
            v6: Family::new(128, v6),
        };
        check("net4", nets.v4.entries.len(), MAX_NET4, HINT_NETS)?;
        check("net6", nets.v6.entries.len(), MAX_NET6, HINT_NETS)?;
        let mut next = NET_CLASS_FIRST;
        for fam in [&mut nets.v4, &mut nets.v6] {
            for e in &mut fam.entries {
                e.class = next;
                next += 1;
            }
        }
        Ok(nets)
    }
}

/// The identity bit of a rule's identity (`any` is bit 0).
fn identity_bit(rule: &Rule) -> u32 {
    rule.identity.map_or(ANY_IDENTITY_BIT, |i| i as u32 + 1)
}

/// One rule's contribution to one decision key, packed so that hits sort by key, then rule
/// id: net class (bits 96..), port class (64..), rule id (32..), identity bit (8..), kind.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
struct Hit(u128);

impl Hit {
    fn new(net_class: u32, port_class: u32, rule: &Rule) -> Hit {
        let bit = identity_bit(rule);
        let kind = match (rule.action, rule.mode) {
            (Action::Allow, _) => RULE_KIND_ALLOW,
            (Action::Deny, Mode::Enforce) => RULE_KIND_DENY,
            (Action::Deny, Mode::Audit) => RULE_KIND_AUDIT_DENY,
        };
        Hit(u128::from(net_class) << 96
            | u128::from(port_class) << 64
            | u128::from(rule.id) << 32
            | u128::from(bit) << 8
            | u128::from(kind))
    }

    /// The same rule's hit at another key.
    fn at(self, net_class: u32, port_class: u32) -> Hit {
        Hit(self.0 & u128::from(u64::MAX)
            | u128::from(net_class) << 96
            | u128::from(port_class) << 64)
    }

    fn key(self) -> DecisionKey {
        DecisionKey {
            net_class: (self.0 >> 96) as u32,
            port_class: (self.0 >> 64) as u32,
        }
    }

    fn same_key(self, other: Hit) -> bool {
        self.0 >> 64 == other.0 >> 64
    }

    fn rule(self) -> u32 {
        (self.0 >> 32) as u32
    }

    fn bit(self) -> u32 {
        (self.0 >> 8) as u32 & 0xff
    }

    fn kind(self) -> u32 {
        self.0 as u32 & 0xff
    }
}

/// The decision and rule-of maps, built in key order (callers emit keys in ascending order:
/// the `any` classes first, then trie entries by class).
#[derive(Default)]
struct Decisions {
    decisions: Vec<(DecisionKey, DecisionValue)>,
    rule_of: Vec<(RuleOfKey, u32)>,
    /// Scratch space: the rule-of entries of one key.
    group: Vec<(RuleOfKey, u32)>,
}

impl Decisions {
    /// Turns the hits of some keys (all new) into decision entries; empties `hits`.
    fn emit(&mut self, hits: &mut Vec<Hit>) -> Result<(), CompileError> {
        hits.sort_unstable();
        let group = &mut self.group;
        for chunk in hits.chunk_by(|a, b| a.same_key(*b)) {
            let entry = u32::try_from(self.decisions.len() + 1).unwrap_or(u32::MAX);
            let mut masks = [0u64; 3];
            group.clear();
            // Hits come by rule id: the first to set a bit is the lowest rule behind it.
            for &h in chunk {
                let (bit, kind) = (h.bit(), h.kind());
                let m = &mut masks[kind as usize];
                if *m & (1 << bit) == 0 {
                    *m |= 1 << bit;
                    group.push((
                        RuleOfKey {
                            entry,
                            identity: bit,
                            kind,
                            _pad: 0,
                        },
                        h.rule(),
                    ));
                }
            }
            group.sort_unstable();
            self.rule_of.extend_from_slice(group);
            self.decisions.push((
                chunk[0].key(),
                DecisionValue {
                    allow: masks[RULE_KIND_ALLOW as usize],
                    deny: masks[RULE_KIND_DENY as usize],
                    audit_deny: masks[RULE_KIND_AUDIT_DENY as usize],
                    entry,
                    _pad: 0,
                },
            ));
            check(
                "decision",
                self.decisions.len(),
                MAX_DECISIONS,
                HINT_DECISIONS,
            )?;
            check("rule-of", self.rule_of.len(), MAX_RULE_OF, HINT_DECISIONS)?;
        }
        hits.clear();
        Ok(())
    }
}
