//! A reference evaluator: the verdict of docs/policy.md's "How a connection is judged", computed
//! directly from the parsed [`Policy`], rule by rule, without the compiled maps.
//!
//! It is slow (linear in the rule count) and simple on purpose: `ztctl explain` uses it to
//! say why a connection would be allowed or denied, and the differential tests compare the
//! kernel's verdicts (from the compiled maps) against it.

use std::fmt;
use std::net::IpAddr;
use std::path::PathBuf;

use serde::Serialize;

use super::{Action, Direction, ExeKey, Identity, Mode, Policy, Rule, RuleInfo};

/// The protocol of a connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Proto {
    Tcp,
    Udp,
    /// ICMP or ICMPv6.
    Icmp,
    /// Any other IP protocol.
    Other,
}

impl Proto {
    pub fn as_str(self) -> &'static str {
        match self {
            Proto::Tcp => "tcp",
            Proto::Udp => "udp",
            Proto::Icmp => "icmp",
            Proto::Other => "other",
        }
    }
}

impl fmt::Display for Proto {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for Proto {
    type Err = String;
    fn from_str(s: &str) -> Result<Proto, String> {
        match s {
            "tcp" => Ok(Proto::Tcp),
            "udp" => Ok(Proto::Udp),
            "icmp" => Ok(Proto::Icmp),
            "other" => Ok(Proto::Other),
            _ => Err(format!(
                "unknown protocol `{s}` (expected tcp, udp, icmp or other)"
            )),
        }
    }
}

/// One connection (or inbound packet) to judge, and who makes (or receives) it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Query {
    /// The task's executable (device in kernel encoding, inode); `None`: unknown (matches no
    /// identity with `exe`).
    pub exe: Option<ExeKey>,
    /// Effective uid.
    pub uid: u32,
    /// Effective gid.
    pub gid: u32,
    /// The task's cgroup, relative to the cgroup2 root (`""` is the root). Its ancestors are
    /// implied: an identity's cgroup matches when it is this cgroup or one above it.
    pub cgroup: String,
    /// Egress: the destination; ingress: the remote source.
    pub peer: IpAddr,
    /// Egress: the destination port; ingress: the local port.
    pub port: u16,
    pub proto: Proto,
    pub direction: Direction,
}

/// What zt decides.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Verdict {
    Allow,
    Deny,
    /// Allowed, and reported as a connection that would have been denied.
    Audit,
}

impl Verdict {
    pub fn as_str(self) -> &'static str {
        match self {
            Verdict::Allow => "allow",
            Verdict::Deny => "deny",
            Verdict::Audit => "audit",
        }
    }

    /// Whether the call proceeds (allow or audit).
    pub fn proceeds(self) -> bool {
        self != Verdict::Deny
    }
}

impl fmt::Display for Verdict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A rule that matched the query.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct MatchedRule {
    /// 1-based rule id (as in events and counters).
    pub id: u32,
    /// `path:line:column` of the rule's `[[rule]]`.
    pub location: String,
    pub action: Action,
    /// Mode of the rule's file.
    pub mode: Mode,
    /// E.g. `allow web -> db tcp/5432`.
    pub summary: String,
}

/// The verdict and why.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Explanation {
    pub verdict: Verdict,
    /// The rule that decided; `None`: the default deny (or default audit).
    pub deciding_rule: Option<MatchedRule>,
    /// Every matching rule, by id.
    pub matched: Vec<MatchedRule>,
    /// Names of the declared identities the task matches, in declaration order.
    pub matched_identities: Vec<String>,
    /// Whether the verdict is audit only because of the global audit mode.
    pub global_audit: bool,
}

impl Serialize for Action {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

impl Serialize for Mode {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

/// Whether the task of `q` is one of `id`'s processes: every key given matches.
pub fn identity_matches(id: &Identity, q: &Query) -> bool {
    // Disabled (missing file, sha256 mismatch): matches nothing, as in the kernel.
    if id.problem.is_some() {
        return false;
    }
    if let Some(exe) = &id.exe {
        if q.exe != Some(exe.key) {
            return false;
        }
    }
    if id.uid.is_some_and(|uid| uid != q.uid) || id.gid.is_some_and(|gid| gid != q.gid) {
        return false;
    }
    if let Some(cg) = &id.cgroup {
        // A cgroup that did not exist when the policy loaded matches nothing.
        if cg.id.is_none() || !cgroup_within(&q.cgroup, &cg.path) {
            return false;
        }
    }
    true
}

/// Whether cgroup `task` (relative path) is `ancestor` or below it.
fn cgroup_within(task: &str, ancestor: &str) -> bool {
    let parts = |p: &str| -> Vec<String> {
        p.split('/')
            .filter(|c| !c.is_empty() && *c != ".")
            .map(str::to_string)
            .collect()
    };
    let task = parts(task);
    let ancestor = parts(ancestor);
    task.len() >= ancestor.len() && task[..ancestor.len()] == ancestor[..]
}

/// The address as zt judges it: IPv4-mapped IPv6 is IPv4.
fn normalized(peer: IpAddr) -> IpAddr {
    match peer {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4),
        v4 => v4,
    }
}

/// Whether `rule` matches `q`, given which identities the task matches.
fn rule_matches(policy: &Policy, rule: &Rule, q: &Query, identities: &[bool]) -> bool {
    let peer = normalized(q.peer);
    rule_matches_port(rule, q, identities)
        && policy
            .peer_cidrs(rule)
            .is_none_or(|cidrs| cidrs.iter().any(|c| c.contains(&peer)))
}

/// `rule_matches` without the peer: direction, identity, protocol and port.
fn rule_matches_port(rule: &Rule, q: &Query, identities: &[bool]) -> bool {
    use super::ProtoMatch;
    if rule.direction != q.direction {
        return false;
    }
    if let Some(i) = rule.identity {
        if !identities.get(i).copied().unwrap_or(false) {
            return false;
        }
    }
    let port_ok = || {
        rule.ports
            .as_ref()
            .is_none_or(|ranges| ranges.iter().any(|r| r.first <= q.port && q.port <= r.last))
    };
    match rule.proto {
        ProtoMatch::Tcp => q.proto == Proto::Tcp && port_ok(),
        ProtoMatch::Udp => q.proto == Proto::Udp && port_ok(),
        ProtoMatch::Icmp => q.proto == Proto::Icmp,
        ProtoMatch::Any if rule.ports.is_some() => {
            matches!(q.proto, Proto::Tcp | Proto::Udp) && port_ok()
        }
        ProtoMatch::Any => true,
    }
}

/// `path:line:column` and summary of a rule.
pub fn describe_rule(policy: &Policy, rule: &Rule) -> MatchedRule {
    let path: PathBuf = policy.file_path(rule.file).to_path_buf();
    let info = RuleInfo {
        id: rule.id,
        path: path.clone(),
        line: rule.loc.line,
        column: rule.loc.column,
        action: rule.action,
        direction: rule.direction,
        identity: rule.identity_name.clone(),
        peer: rule.peer_text.clone(),
        ports: rule.ports.as_ref().map(|p| {
            p.iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join(",")
        }),
        proto: rule.proto,
        mode: rule.mode,
        log: rule.log,
    };
    MatchedRule {
        id: rule.id,
        location: format!("{}:{}:{}", path.display(), rule.loc.line, rule.loc.column),
        action: rule.action,
        mode: rule.mode,
        summary: info.summary(),
    }
}

/// Judges `q` against `policy`, rule by rule. `global_audit`: ztd runs with `--mode audit`
/// (every deny becomes audit).
pub fn explain(policy: &Policy, q: &Query, global_audit: bool) -> Explanation {
    let identities: Vec<bool> = policy
        .identities()
        .iter()
        .map(|id| identity_matches(id, q))
        .collect();
    let matched: Vec<&Rule> = policy
        .rules()
        .iter()
        .filter(|r| rule_matches(policy, r, q, &identities))
        .collect();
    judged(policy, &identities, matched, global_audit)
}

/// Judges a `bind()` of `q.port` (`q.proto`) by the task of `q`: allowed by any ingress
/// allow rule of the task's identities for that port, whatever its peer (listening is what
/// the rule grants; who may connect is judged per packet); deny rules do not apply to binds.
/// Otherwise the default verdict, as for a call. `q.direction` and `q.peer` are ignored.
pub fn explain_bind(policy: &Policy, q: &Query, global_audit: bool) -> Explanation {
    let q = Query {
        direction: super::Direction::Ingress,
        ..q.clone()
    };
    let identities: Vec<bool> = policy
        .identities()
        .iter()
        .map(|id| identity_matches(id, &q))
        .collect();
    let matched: Vec<&Rule> = policy
        .rules()
        .iter()
        .filter(|r| r.action == Action::Allow && rule_matches_port(r, &q, &identities))
        .collect();
    judged(policy, &identities, matched, global_audit)
}

/// The verdict of the rules that `matched` (in id order) for a task matching `identities`.
fn judged(
    policy: &Policy,
    identities: &[bool],
    matched: Vec<&Rule>,
    global_audit: bool,
) -> Explanation {
    // Rules are in id order, so the first of a kind is its lowest id.
    let first = |action: Action, mode: Option<Mode>| {
        matched
            .iter()
            .find(|r| r.action == action && mode.is_none_or(|m| r.mode == m))
            .copied()
    };
    let (mut verdict, deciding) = if let Some(r) = first(Action::Deny, Some(Mode::Enforce)) {
        (Verdict::Deny, Some(r))
    } else if let Some(r) = first(Action::Deny, Some(Mode::Audit)) {
        (Verdict::Audit, Some(r))
    } else if let Some(r) = first(Action::Allow, None) {
        (Verdict::Allow, Some(r))
    } else {
        let of_mode = |mode: Mode| {
            policy
                .identities()
                .iter()
                .zip(identities)
                .any(|(id, &m)| m && id.mode == mode)
        };
        if of_mode(Mode::Audit) && !of_mode(Mode::Enforce) {
            (Verdict::Audit, None)
        } else {
            (Verdict::Deny, None)
        }
    };
    let by_global = global_audit && verdict == Verdict::Deny;
    if by_global {
        verdict = Verdict::Audit;
    }
    Explanation {
        verdict,
        deciding_rule: deciding.map(|r| describe_rule(policy, r)),
        matched: matched.iter().map(|r| describe_rule(policy, r)).collect(),
        matched_identities: policy
            .identities()
            .iter()
            .zip(identities)
            .filter(|(_, &m)| m)
            .map(|(id, _)| id.name.clone())
            .collect(),
        global_audit: by_global,
    }
}

impl fmt::Display for Explanation {
    /// Human-readable, several lines.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "verdict     {}", self.verdict)?;
        if self.global_audit {
            f.write_str(" (deny, reported as audit: global audit mode)")?;
        }
        writeln!(f)?;
        match &self.deciding_rule {
            Some(r) => writeln!(f, "decided by  #{} {} {}", r.id, r.location, r.summary)?,
            None => writeln!(f, "decided by  default (no rule matched)")?,
        }
        if self.matched_identities.is_empty() {
            writeln!(f, "identities  (none)")?;
        } else {
            writeln!(f, "identities  {}", self.matched_identities.join(", "))?;
        }
        if self.matched.is_empty() {
            writeln!(f, "matched     (no rule)")?;
        }
        for (i, r) in self.matched.iter().enumerate() {
            let head = if i == 0 { "matched" } else { "" };
            let audit = if r.mode == Mode::Audit {
                " [audit]"
            } else {
                ""
            };
            writeln!(
                f,
                "{head:<11} #{} {} {}{audit}",
                r.id, r.location, r.summary
            )?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::io;
    use std::path::{Path, PathBuf};

    use super::super::{load_sources, Resolve};
    use super::*;

    struct Fake;

    const CURL: ExeKey = ExeKey {
        dev: 8 << 20 | 1,
        ino: 200,
    };

    impl Resolve for Fake {
        fn uid_of(&self, user: &str) -> Option<u32> {
            (user == "www-data").then_some(33)
        }
        fn gid_of(&self, group: &str) -> Option<u32> {
            (group == "www-data").then_some(33)
        }
        fn exe(&self, path: &Path) -> io::Result<ExeKey> {
            if path == Path::new("/usr/bin/curl") {
                Ok(CURL)
            } else {
                Err(io::Error::from(io::ErrorKind::NotFound))
            }
        }
        fn cgroup_id(&self, rel: &str) -> io::Result<u64> {
            match rel {
                "system.slice" => Ok(4000),
                "system.slice/nginx.service" => Ok(5000),
                _ => Err(io::Error::from(io::ErrorKind::NotFound)),
            }
        }
    }

    fn policy(files: &[(&str, &str)]) -> Policy {
        let sources: Vec<(PathBuf, String)> = files
            .iter()
            .map(|(p, t)| (PathBuf::from(p), t.to_string()))
            .collect();
        match load_sources(&sources, &Fake) {
            Ok((p, _)) => p,
            Err(d) => panic!("{d:?}"),
        }
    }

    fn q(peer: &str, port: u16, proto: Proto) -> Query {
        Query {
            exe: None,
            uid: 0,
            gid: 0,
            cgroup: String::new(),
            peer: peer.parse().expect("ip"),
            port,
            proto,
            direction: Direction::Egress,
        }
    }

    const BASE: &str = r#"version = 1
[identity.web]
uid = 33
[identity.nginx]
cgroup = "system.slice/nginx.service"
[identity.curl]
exe = "/usr/bin/curl"
gid = 33
[network.lan]
cidrs = ["10.0.0.0/8", "fd00::/8"]

[[rule]]
action = "allow"
identity = "web"
peer = "lan"
ports = [443, "8000-8100"]
proto = "tcp"

[[rule]]
action = "deny"
identity = "any"
peer = "10.1.0.0/16"

[[rule]]
action = "allow"
identity = "nginx"
peer = "0.0.0.0/0"
ports = [53]

[[rule]]
action = "allow"
identity = "curl"
peer = "::/0"
proto = "icmp"

[[rule]]
action = "allow"
direction = "ingress"
identity = "web"
peer = "any"
ports = [80]
proto = "tcp"
"#;

    #[test]
    fn binds_need_an_ingress_allow_of_the_port_whatever_its_peer() {
        let lan_only = format!(
            "{BASE}\n[[rule]]\naction = \"allow\"\ndirection = \"ingress\"\nidentity = \"web\"\n\
             peer = \"lan\"\nports = [8080]\nproto = \"udp\"\n\n[[rule]]\naction = \"deny\"\n\
             direction = \"ingress\"\nidentity = \"any\"\npeer = \"any\"\nports = [80]\n"
        );
        let p = policy(&[("p.toml", &lan_only)]);
        let mut web = q("0.0.0.0", 80, Proto::Tcp);
        web.uid = 33;
        // Rule 5 grants tcp/80 (an ingress deny of the same port does not refuse the bind:
        // deny rules judge peers, per packet).
        let e = explain_bind(&p, &web, false);
        assert_eq!(e.verdict, Verdict::Allow);
        assert_eq!(e.deciding_rule.as_ref().map(|r| r.id), Some(5));
        // A peer-restricted grant still grants the bind.
        web.port = 8080;
        web.proto = Proto::Udp;
        assert_eq!(explain_bind(&p, &web, false).verdict, Verdict::Allow);
        // Other proto, other port, other identity: the default; audit only in global audit.
        web.proto = Proto::Tcp;
        assert_eq!(explain_bind(&p, &web, false).verdict, Verdict::Deny);
        web.port = 80;
        web.uid = 0;
        assert_eq!(explain_bind(&p, &web, false).verdict, Verdict::Deny);
        assert_eq!(explain_bind(&p, &web, true).verdict, Verdict::Audit);
    }

    #[test]
    fn identities_networks_ports_and_deny_over_allow() {
        let p = policy(&[("p.toml", BASE)]);
        let mut web = q("10.2.3.4", 443, Proto::Tcp);
        web.uid = 33;
        let e = explain(&p, &web, false);
        assert_eq!(e.verdict, Verdict::Allow);
        assert_eq!(e.deciding_rule.as_ref().map(|r| r.id), Some(1));
        assert_eq!(
            e.deciding_rule.as_ref().map(|r| r.location.as_str()),
            Some("p.toml:12:1")
        );
        assert_eq!(e.matched_identities, ["web"]);
        // Port range edges.
        for (port, v) in [
            (8000, Verdict::Allow),
            (8100, Verdict::Allow),
            (8101, Verdict::Deny),
        ] {
            web.port = port;
            assert_eq!(explain(&p, &web, false).verdict, v, "{port}");
        }
        // Wrong proto, wrong uid.
        web.port = 443;
        web.proto = Proto::Udp;
        assert_eq!(explain(&p, &web, false).verdict, Verdict::Deny);
        web.proto = Proto::Tcp;
        web.uid = 34;
        let e = explain(&p, &web, false);
        assert_eq!(e.verdict, Verdict::Deny);
        assert!(e.deciding_rule.is_none() && e.matched.is_empty());
        // Deny beats allow whatever the order; the deny decides, both matched.
        let mut denied = q("10.1.2.3", 443, Proto::Tcp);
        denied.uid = 33;
        let e = explain(&p, &denied, false);
        assert_eq!(e.verdict, Verdict::Deny);
        assert_eq!(e.deciding_rule.as_ref().map(|r| r.id), Some(2));
        assert_eq!(e.matched.iter().map(|r| r.id).collect::<Vec<_>>(), [1, 2]);
        assert_eq!(e.matched[1].summary, "deny any -> 10.1.0.0/16 any");
        // IPv6 member of the network; IPv4-mapped peers are IPv4.
        let mut v6 = q("fd00::1", 8050, Proto::Tcp);
        v6.uid = 33;
        assert_eq!(explain(&p, &v6, false).verdict, Verdict::Allow);
        v6.peer = "::ffff:10.1.0.1".parse().expect("ip");
        assert_eq!(explain(&p, &v6, false).verdict, Verdict::Deny);
        v6.peer = "::ffff:10.9.0.1".parse().expect("ip");
        assert_eq!(explain(&p, &v6, false).verdict, Verdict::Allow);
        // Ingress rules do not judge egress and vice versa.
        let mut inbound = q("192.0.2.1", 80, Proto::Tcp);
        inbound.uid = 33;
        assert_eq!(explain(&p, &inbound, false).verdict, Verdict::Deny);
        inbound.direction = Direction::Ingress;
        assert_eq!(explain(&p, &inbound, false).verdict, Verdict::Allow);
    }

    #[test]
    fn cgroups_exes_and_proto_any() {
        let p = policy(&[("p.toml", BASE)]);
        // Cgroup: itself and below, not above; `any` with ports is tcp and udp only;
        // 0.0.0.0/0 is IPv4 only.
        let mut dns = q("192.0.2.53", 53, Proto::Udp);
        for (cg, v) in [
            ("system.slice/nginx.service", Verdict::Allow),
            ("system.slice/nginx.service/worker", Verdict::Allow),
            ("/system.slice/nginx.service/", Verdict::Allow),
            ("system.slice", Verdict::Deny),
            ("system.slice/nginx.service2", Verdict::Deny),
            ("", Verdict::Deny),
        ] {
            dns.cgroup = cg.to_string();
            assert_eq!(explain(&p, &dns, false).verdict, v, "{cg}");
        }
        dns.cgroup = "system.slice/nginx.service".into();
        dns.proto = Proto::Tcp;
        assert_eq!(explain(&p, &dns, false).verdict, Verdict::Allow);
        dns.proto = Proto::Icmp;
        assert_eq!(explain(&p, &dns, false).verdict, Verdict::Deny);
        dns.proto = Proto::Udp;
        dns.peer = "2001:db8::53".parse().expect("ip");
        assert_eq!(explain(&p, &dns, false).verdict, Verdict::Deny);
        // Exe and gid must both match; ::/0 is IPv6 only.
        let mut ping = q("2001:db8::1", 0, Proto::Icmp);
        ping.exe = Some(CURL);
        assert_eq!(explain(&p, &ping, false).verdict, Verdict::Deny);
        ping.gid = 33;
        assert_eq!(explain(&p, &ping, false).verdict, Verdict::Allow);
        ping.peer = "192.0.2.1".parse().expect("ip");
        assert_eq!(explain(&p, &ping, false).verdict, Verdict::Deny);
        // The host-wide deny has proto any without ports: every protocol.
        ping.peer = "10.1.1.1".parse().expect("ip");
        let e = explain(&p, &ping, false);
        assert_eq!(e.deciding_rule.map(|r| r.id), Some(2));
    }

    #[test]
    fn audit_files_and_global_audit() {
        let enforce = r#"version = 1
[identity.ops]
uid = 1000

[[rule]]
action = "deny"
identity = "ops"
peer = "10.0.0.0/8"
ports = [22]
"#;
        let audit = r#"version = 1
mode = "audit"
[identity.trial]
gid = 2000

[[rule]]
action = "deny"
identity = "trial"
peer = "10.0.0.0/8"

[[rule]]
action = "allow"
identity = "trial"
peer = "10.0.0.1"
ports = [22, 80]
proto = "tcp"
"#;
        let p = policy(&[("a.toml", enforce), ("b.toml", audit)]);
        let mut t = q("10.0.0.1", 22, Proto::Tcp);
        t.gid = 2000;
        // The audit file's deny beats its allow: audit, decided by rule 2.
        let e = explain(&p, &t, false);
        assert_eq!(e.verdict, Verdict::Audit);
        assert_eq!(e.deciding_rule.as_ref().map(|r| r.id), Some(2));
        assert_eq!(e.matched.len(), 2);
        // An enforce deny beats the audit deny.
        t.uid = 1000;
        let e = explain(&p, &t, false);
        assert_eq!(e.verdict, Verdict::Deny);
        assert_eq!(e.deciding_rule.map(|r| r.id), Some(1));
        // Default of an audit-only process: audit; also of an enforce one: deny.
        let mut d = q("192.0.2.1", 443, Proto::Tcp);
        d.gid = 2000;
        assert_eq!(explain(&p, &d, false).verdict, Verdict::Audit);
        assert!(explain(&p, &d, false).deciding_rule.is_none());
        d.uid = 1000;
        assert_eq!(explain(&p, &d, false).verdict, Verdict::Deny);
        d.gid = 0;
        assert_eq!(explain(&p, &d, false).verdict, Verdict::Deny);
        // Global audit turns every deny into audit, and says so.
        let e = explain(&p, &d, true);
        assert_eq!(e.verdict, Verdict::Audit);
        assert!(e.global_audit);
        assert!(e.to_string().contains("global audit"), "{e}");
        let json = serde_json::to_value(&e).expect("json");
        assert_eq!(json["verdict"], "audit");
        assert_eq!(json["deciding_rule"], serde_json::Value::Null);
    }

    #[test]
    fn missing_cgroup_matches_nothing() {
        let p = policy(&[(
            "p.toml",
            r#"version = 1
[identity.gone]
cgroup = "no/such"
[[rule]]
action = "allow"
identity = "gone"
peer = "any"
"#,
        )]);
        let mut t = q("127.0.0.1", 1, Proto::Tcp);
        t.cgroup = "no/such".into();
        assert_eq!(explain(&p, &t, false).verdict, Verdict::Deny);
    }
}
