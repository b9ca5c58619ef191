//! The zt policy: what operators write (TOML, format version 1) and what the kernel programs
//! read (the per-slot maps of `zt-common`).
//!
//! The pipeline is [`load`] (read the files, parse each into a syntax tree with positions,
//! validate names across files, resolve users, groups, executables and cgroups against the
//! running system through [`Resolve`]) followed by [`compile()`] (identity bits, net classes,
//! port classes, decision entries). Every problem is a [`Diagnostic`]
//! `path:line:column: message`; all of them are collected before giving up. The operator's
//! reference is docs/policy.md (installed as zt-policy(5)).

mod compile;
pub(crate) mod diag;
pub mod eval;
mod parse;
mod resolve;
mod validate;

#[cfg(test)]
mod fuzz;
#[cfg(test)]
mod identity_tests;
#[cfg(test)]
mod tests;

use std::fmt;
use std::path::{Path, PathBuf};

use ipnet::IpNet;

pub use compile::{compile, CompileError, Compiled, IdentityInfo, RuleInfo};
pub use diag::{Diagnostic, Loc, Severity};
pub use eval::{explain, explain_bind, Explanation, Query};
pub use resolve::{
    find_unit, hex, kernel_dev, unit_search_dirs, LiveResolver, Resolve, SystemResolver,
};
pub use zt_common::ExeKey;

/// The only policy format version this build understands.
pub const POLICY_VERSION: i64 = 1;

/// Whether a file's deny verdicts are enforced or only reported.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum Mode {
    #[default]
    Enforce,
    Audit,
}

impl Mode {
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Enforce => "enforce",
            Mode::Audit => "audit",
        }
    }
}

impl fmt::Display for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What a rule does when it matches.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Action {
    Allow,
    Deny,
}

impl Action {
    pub fn as_str(self) -> &'static str {
        match self {
            Action::Allow => "allow",
            Action::Deny => "deny",
        }
    }
}

impl fmt::Display for Action {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Which traffic a rule is about.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum Direction {
    /// Outgoing: `identity` is the local process that connects or sends, `peer` the
    /// destination, `ports` destination ports.
    #[default]
    Egress,
    /// Incoming: `identity` is the local process that listens or receives, `peer` the remote
    /// source, `ports` local ports.
    Ingress,
}

impl Direction {
    pub fn as_str(self) -> &'static str {
        match self {
            Direction::Egress => "egress",
            Direction::Ingress => "ingress",
        }
    }
}

impl fmt::Display for Direction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The `proto` of a rule.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum ProtoMatch {
    Tcp,
    Udp,
    /// ICMP and ICMPv6 (echo sockets and raw ICMP); never has ports.
    Icmp,
    /// With `ports`: tcp and udp. Without: every protocol (tcp, udp, icmp and others).
    #[default]
    Any,
}

impl ProtoMatch {
    pub fn as_str(self) -> &'static str {
        match self {
            ProtoMatch::Tcp => "tcp",
            ProtoMatch::Udp => "udp",
            ProtoMatch::Icmp => "icmp",
            ProtoMatch::Any => "any",
        }
    }
}

impl fmt::Display for ProtoMatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An inclusive port range, `1 <= first <= last <= 65535`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PortRange {
    pub first: u16,
    pub last: u16,
}

impl fmt::Display for PortRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.first == self.last {
            write!(f, "{}", self.first)
        } else {
            write!(f, "{}-{}", self.first, self.last)
        }
    }
}

/// The `peer` of a rule, resolved.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Peer {
    /// Every IPv4 and IPv6 address.
    Any,
    /// A declared network (index into [`Policy::networks`]).
    Network(usize),
    /// A CIDR literal (IPv4-mapped IPv6 already converted to IPv4).
    Cidr(IpNet),
}

/// One policy file as loaded.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PolicyFile {
    pub path: PathBuf,
    pub mode: Mode,
    pub identities: usize,
    pub networks: usize,
    pub rules: usize,
}

/// An `exe` pinned at load time.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExeMatch {
    /// As written in the policy.
    pub path: PathBuf,
    /// Device (kernel encoding) and inode of the file the path resolved to at load time.
    pub key: ExeKey,
    /// The file the path resolved to through symlinks (when it differs from `path`).
    pub real_path: Option<PathBuf>,
}

/// A `cgroup` of an identity.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CgroupMatch {
    /// Relative to the cgroup2 root, as written (without leading/trailing slashes).
    pub path: String,
    /// Number of path components (the cgroup's level; the root is level 0).
    pub level: u32,
    /// Cgroup id; `None` when it did not exist at load time (the identity matches nothing).
    pub id: Option<u64>,
}

/// A named identity (`[identity.NAME]`); every attribute given must match.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Identity {
    pub name: String,
    /// Index into [`Policy::files`].
    pub file: usize,
    pub loc: Loc,
    pub mode: Mode,
    pub exe: Option<ExeMatch>,
    pub uid: Option<u32>,
    pub gid: Option<u32>,
    pub cgroup: Option<CgroupMatch>,
    /// `raw = true`: the identity may create raw sockets (and ICMP sockets).
    pub raw: bool,
    /// `sha256`: the content `exe` must have.
    pub sha256: Option<[u8; 32]>,
    /// `unit`: the systemd unit whose cgroup `cgroup` is (resolved, possibly not found).
    pub unit: Option<String>,
    /// `user` / `group` as written, when given by name.
    pub user_name: Option<String>,
    pub group_name: Option<String>,
    /// Why the identity matches nothing right now (its file is missing, its content is not
    /// the pinned `sha256`); `None`: it matches what it resolved to.
    pub problem: Option<String>,
}

impl Identity {
    /// Whether some process can match the identity now.
    pub fn matchable(&self) -> bool {
        self.problem.is_none() && self.cgroup.as_ref().is_none_or(|c| c.id.is_some())
    }
}

/// A named set of CIDRs (`[network.NAME]`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Network {
    pub name: String,
    pub file: usize,
    pub loc: Loc,
    /// Distinct CIDRs in the order written (IPv4-mapped IPv6 converted to IPv4).
    pub cidrs: Vec<IpNet>,
}

/// One `[[rule]]`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rule {
    /// 1-based, in policy order (files sorted by name, then order in the file).
    pub id: u32,
    pub file: usize,
    /// Position of the rule's table (`[[rule]]`).
    pub loc: Loc,
    pub mode: Mode,
    pub action: Action,
    pub direction: Direction,
    /// Index into [`Policy::identities`]; `None` is `any`. For ingress, the local process
    /// that listens or receives.
    pub identity: Option<usize>,
    /// As written (`any` when omitted).
    pub identity_name: String,
    pub peer: Peer,
    /// As written.
    pub peer_text: String,
    /// Destination ports (egress) or local ports (ingress); `None`: every port.
    pub ports: Option<Vec<PortRange>>,
    pub proto: ProtoMatch,
    pub log: bool,
}

/// How big a policy is.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counts {
    pub files: usize,
    pub identities: usize,
    pub networks: usize,
    pub rules: usize,
}

/// A validated policy with every name resolved against the running system.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Policy {
    pub(crate) files: Vec<PolicyFile>,
    pub(crate) identities: Vec<Identity>,
    pub(crate) networks: Vec<Network>,
    pub(crate) rules: Vec<Rule>,
}

impl Policy {
    /// The files, in load order.
    pub fn files(&self) -> &[PolicyFile] {
        &self.files
    }

    /// Declared identities in declaration order (identity `i` gets bit `i + 1`).
    pub fn identities(&self) -> &[Identity] {
        &self.identities
    }

    pub fn networks(&self) -> &[Network] {
        &self.networks
    }

    /// Rules in policy order (`rules()[i].id == i + 1`).
    pub fn rules(&self) -> &[Rule] {
        &self.rules
    }

    pub fn counts(&self) -> Counts {
        Counts {
            files: self.files.len(),
            identities: self.identities.len(),
            networks: self.networks.len(),
            rules: self.rules.len(),
        }
    }

    /// The path of file `index` (empty if out of range).
    pub fn file_path(&self, index: usize) -> &Path {
        self.files
            .get(index)
            .map_or(Path::new(""), |f| f.path.as_path())
    }

    /// The CIDRs a rule's peer stands for (`None` for `any`).
    pub fn peer_cidrs<'a>(&'a self, rule: &'a Rule) -> Option<&'a [IpNet]> {
        match &rule.peer {
            Peer::Any => None,
            Peer::Network(i) => Some(self.networks.get(*i).map_or(&[][..], |n| &n.cidrs)),
            Peer::Cidr(c) => Some(std::slice::from_ref(c)),
        }
    }
}

/// Reads, validates and resolves a policy.
///
/// Each path is a policy file, or a directory whose `*.toml` files (non-recursive, sorted by
/// file name, hidden files skipped) are read; all files form one policy. On success returns the
/// policy and its warnings; on failure every diagnostic (errors and warnings), sorted by file
/// and position.
pub fn load(
    paths: &[PathBuf],
    resolver: &dyn Resolve,
) -> Result<(Policy, Vec<Diagnostic>), Vec<Diagnostic>> {
    let mut diags = Vec::new();
    let mut sources = Vec::new();
    for path in parse::discover(paths, &mut diags) {
        match parse::read_source(&path) {
            Ok(text) => sources.push((path, text)),
            Err(d) => diags.push(d),
        }
    }
    finish(&sources, resolver, diags)
}

/// Reads the policy files as [`load`] does, without checking them: `(sources, diagnostics)`
/// (a file that cannot be read is an error diagnostic). With [`load_sources`], the text
/// that was compiled can be kept and resolved again later.
pub fn read_sources(paths: &[PathBuf]) -> (Sources, Vec<Diagnostic>) {
    let mut diags = Vec::new();
    let mut sources = Vec::new();
    for path in parse::discover(paths, &mut diags) {
        match parse::read_source(&path) {
            Ok(text) => sources.push((path, text)),
            Err(d) => diags.push(d),
        }
    }
    (sources, diags)
}

/// The policy paths and the files [`load`] would read from them that a non-root user could
/// change ([`crate::trust::untrusted_reason`]), as error diagnostics: ztd refuses such a
/// policy.
pub fn untrusted_files(paths: &[PathBuf]) -> Vec<Diagnostic> {
    let mut ignored = Vec::new();
    let files = parse::discover(paths, &mut ignored);
    crate::trust::policy_diagnostics(paths, &files)
}

/// Policy files as read: `(path, text)` in policy order.
pub type Sources = Vec<(PathBuf, String)>;

/// [`load`], also returning the text it read (for resolving the same policy again later).
pub fn load_keeping_sources(
    paths: &[PathBuf],
    resolver: &dyn Resolve,
) -> Result<(Policy, Vec<Diagnostic>, Sources), Vec<Diagnostic>> {
    let (sources, diags) = read_sources(paths);
    let (policy, warnings) = finish(&sources, resolver, diags)?;
    Ok((policy, warnings, sources))
}

/// Like [`load`], for policy text already in memory: `(path used in diagnostics, text)` in
/// policy order.
pub fn load_sources(
    sources: &[(PathBuf, String)],
    resolver: &dyn Resolve,
) -> Result<(Policy, Vec<Diagnostic>), Vec<Diagnostic>> {
    finish(sources, resolver, Vec::new())
}

fn finish(
    sources: &[(PathBuf, String)],
    resolver: &dyn Resolve,
    mut diags: Vec<Diagnostic>,
) -> Result<(Policy, Vec<Diagnostic>), Vec<Diagnostic>> {
    let files: Vec<parse::FileAst> = sources
        .iter()
        .filter_map(|(path, text)| parse::parse_file(path, text, &mut diags))
        .collect();
    let any_file_failed = files.len() < sources.len();
    let policy = validate::build(files, any_file_failed, resolver, &mut diags);
    let order: Vec<&Path> = sources.iter().map(|(p, _)| p.as_path()).collect();
    diags.sort_by_key(|d| {
        let file = order.iter().position(|p| *p == d.path.as_path());
        (file, d.line, d.column)
    });
    if diags.iter().any(Diagnostic::is_error) {
        Err(diags)
    } else {
        Ok((policy, diags))
    }
}
