//! End-to-end tests of the policy pipeline (text → diagnostics / policy → compiled maps),
//! with a fake resolver so that they do not depend on the machine.

use std::collections::HashMap;
use std::io;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::Instant;

use ipnet::IpNet;
use zt_common::*;

use super::*;

struct Fake {
    users: HashMap<&'static str, u32>,
    groups: HashMap<&'static str, u32>,
    exes: HashMap<&'static str, ExeKey>,
    cgroups: HashMap<&'static str, u64>,
}

impl Fake {
    fn new() -> Fake {
        Fake {
            users: [("root", 0), ("www-data", 33), ("postgres", 70)].into(),
            groups: [("root", 0), ("www-data", 33), ("postgres", 70)].into(),
            exes: [
                (
                    "/usr/sbin/nginx",
                    ExeKey {
                        dev: 8 << 20 | 1,
                        ino: 100,
                    },
                ),
                (
                    "/usr/bin/curl",
                    ExeKey {
                        dev: 8 << 20 | 1,
                        ino: 200,
                    },
                ),
                // A second path to the same file (hard link or symlink).
                (
                    "/usr/local/bin/curl",
                    ExeKey {
                        dev: 8 << 20 | 1,
                        ino: 200,
                    },
                ),
            ]
            .into(),
            cgroups: [("system.slice/nginx.service", 5000), ("system.slice", 4000)].into(),
        }
    }
}

impl Resolve for Fake {
    fn uid_of(&self, user: &str) -> Option<u32> {
        self.users.get(user).copied()
    }
    fn gid_of(&self, group: &str) -> Option<u32> {
        self.groups.get(group).copied()
    }
    fn exe(&self, path: &Path) -> io::Result<ExeKey> {
        let p = path.to_str().unwrap_or_default();
        if p == "/usr/sbin" {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "not a regular file",
            ));
        }
        self.exes
            .get(p)
            .copied()
            .ok_or_else(|| io::Error::from(io::ErrorKind::NotFound))
    }
    fn cgroup_id(&self, rel: &str) -> io::Result<u64> {
        self.cgroups
            .get(rel)
            .copied()
            .ok_or_else(|| io::Error::from(io::ErrorKind::NotFound))
    }
}

type Loaded = Result<(Policy, Vec<Diagnostic>), Vec<Diagnostic>>;

fn load_texts(texts: &[(&str, &str)]) -> Loaded {
    let sources: Vec<(PathBuf, String)> = texts
        .iter()
        .map(|(p, t)| (PathBuf::from(p), t.to_string()))
        .collect();
    load_sources(&sources, &Fake::new())
}

/// The policy of one file `p.toml`; panics with the diagnostics if it has errors.
fn ok(text: &str) -> (Policy, Vec<Diagnostic>) {
    match load_texts(&[("p.toml", text)]) {
        Ok(x) => x,
        Err(d) => panic!("unexpected errors:\n{}", lines(&d)),
    }
}

fn compiled(text: &str) -> Compiled {
    compile(&ok(text).0).expect("compiles")
}

/// The diagnostics of a policy that must fail, one string each.
fn errors(texts: &[(&str, &str)]) -> Vec<String> {
    match load_texts(texts) {
        Ok(_) => panic!("policy unexpectedly loaded"),
        Err(d) => d.iter().map(ToString::to_string).collect(),
    }
}

fn lines(d: &[Diagnostic]) -> String {
    d.iter().map(|d| format!("{d}\n")).collect()
}

/// Asserts that exactly one diagnostic starts with `prefix` and contains `needle`.
fn has(diags: &[String], prefix: &str, needle: &str) {
    let hits = diags
        .iter()
        .filter(|d| d.starts_with(prefix) && d.contains(needle))
        .count();
    assert_eq!(
        hits,
        1,
        "want one `{prefix}…{needle}…` in:\n{}",
        diags.join("\n")
    );
}

const EXAMPLE: &str = r#"version = 1
mode = "enforce"                 # or "audit" (default "enforce")

[identity.web]                   # a named identity; every key given must match (AND)
exe = "/usr/sbin/nginx"
user = "www-data"
group = "www-data"
cgroup = "system.slice/nginx.service"

[network.db]
cidrs = ["10.0.2.0/24", "fd00:2::/64"]

[[rule]]
action = "allow"
direction = "egress"
identity = "web"
peer = "db"
ports = [5432, "8000-8100"]
proto = "tcp"
log = false
"#;

const V1: &str = "version = 1\n";

// ---- Accepted format ------------------------------------------------------------------

#[test]
fn the_reference_example_loads_and_compiles() {
    let (policy, warnings) = ok(EXAMPLE);
    assert!(warnings.is_empty(), "{}", lines(&warnings));
    assert_eq!(
        policy.counts(),
        Counts {
            files: 1,
            identities: 1,
            networks: 1,
            rules: 1
        }
    );
    let web = &policy.identities()[0];
    assert_eq!(web.name, "web");
    assert_eq!(
        web.loc,
        Loc {
            line: 4,
            column: 11
        }
    );
    assert_eq!(web.exe.as_ref().map(|e| e.key.ino), Some(100));
    assert_eq!((web.uid, web.gid), (Some(33), Some(33)));
    assert_eq!(
        web.cgroup,
        Some(CgroupMatch {
            path: "system.slice/nginx.service".into(),
            level: 2,
            id: Some(5000)
        })
    );
    let db = &policy.networks()[0];
    assert_eq!(db.cidrs.len(), 2);
    let rule = &policy.rules()[0];
    assert_eq!(
        (rule.id, rule.loc),
        (
            1,
            Loc {
                line: 13,
                column: 1
            }
        )
    );
    assert_eq!(rule.peer, Peer::Network(0));
    assert_eq!(
        rule.ports,
        Some(vec![
            PortRange {
                first: 5432,
                last: 5432
            },
            PortRange {
                first: 8000,
                last: 8100
            }
        ])
    );

    let c = compile(&policy).expect("compiles");
    assert_eq!(c.rules[0].summary(), "allow web -> db tcp/5432,8000-8100");
    assert_eq!(c.rules[0].to_string(), "allow web -> db tcp/5432,8000-8100");
    assert_eq!(c.rules[0].path, Path::new("p.toml"));
    assert_eq!(c.identities[0].bit, 1);
    assert_eq!(c.config.generation, 0);
    assert_eq!(c.config.flags, 0);
    assert_eq!(c.config.rules, 1);
    assert_eq!(c.config.cgroup_levels, 1 << 2);
    assert_eq!(c.cgroups, vec![(5000, 0b10)]);
    assert_eq!(
        c.exes,
        vec![(
            ExeKey {
                dev: 8 << 20 | 1,
                ino: 100
            },
            0b10
        )]
    );
    assert_eq!(c.net4, vec![(24, [10, 0, 2, 0], NET_CLASS_FIRST)]);
    assert_eq!(c.net6.len(), 1);
    assert_eq!(c.ports.len(), (PORT_PROTOS * PORTS_PER_PROTO) as usize);
    // tcp 5432 and 8000-8100 have classes; udp none.
    assert_ne!(c.ports[5432], 0);
    assert_ne!(c.ports[8000], 0);
    assert_eq!(c.ports[8000], c.ports[8100]);
    assert_eq!(c.ports[8101], 0);
    assert_eq!(c.ports[65536 + 5432], 0);
    // 2 nets x 2 port classes.
    assert_eq!(c.decisions.len(), 4);
    assert!(c
        .decisions
        .iter()
        .all(|(_, v)| v.allow == 0b10 && v.deny == 0));
    assert_eq!(c.rule_of.len(), 4);
}

#[test]
fn defaults_and_alternative_spellings() {
    let (policy, _) = ok(r#"
version = 1
identity = { ops = { uid = 0, gid = 0 } }
[[rule]]
action = "deny"
peer = "10.0.0.1"
[[rule]]
action = "allow"
identity = "ops"
peer = "::1"
ports = ["53"]
proto = "udp"
"#);
    assert_eq!(policy.files()[0].mode, Mode::Enforce);
    let r = &policy.rules()[0];
    assert_eq!(
        (r.identity, r.proto, r.ports.is_none(), r.log),
        (None, ProtoMatch::Any, true, false)
    );
    assert_eq!(r.identity_name, "any");
    assert_eq!(r.peer, Peer::Cidr("10.0.0.1/32".parse().expect("cidr")));
    assert_eq!(
        policy.rules()[1].peer,
        Peer::Cidr("::1/128".parse().expect("cidr"))
    );
    let c = compile(&policy).expect("compiles");
    assert_eq!(c.rules[0].summary(), "deny any -> 10.0.0.1 any");
    // TOML integer spellings.
    let (p, _) = ok("version = 0x1\n[identity.x]\nuid = 0x21\ngid = 1_000\n[[rule]]\naction = \"allow\"\npeer = \"any\"\nports = [0o20, +80]\n");
    assert_eq!(
        (p.identities()[0].uid, p.identities()[0].gid),
        (Some(33), Some(1000))
    );
    assert_eq!(
        p.rules()[0]
            .ports
            .as_ref()
            .map(|r| (r[0].first, r[1].first)),
        Some((16, 80))
    );
    let d = errors(&[("p.toml", "version = 1\n[identity.x]\nuid = -1\n")]);
    assert_eq!(
        d,
        vec!["p.toml:3:7: uid -1 is out of range: use 0 to 4294967294"]
    );
    assert_eq!(c.rules[1].summary(), "allow ops -> ::1 udp/53");
}

// ---- Errors, each at its exact line:column -----------------------------------------------

#[test]
fn toml_syntax_error_skips_semantic_checks() {
    let d = errors(&[(
        "p.toml",
        "version = 1\n[[rule]]\naction = \"allow\npeer = 3\n",
    )]);
    assert_eq!(d.len(), 1, "{d:?}");
    assert!(d[0].starts_with("p.toml:3:"), "{d:?}");
    assert!(d[0].contains("TOML syntax error"), "{d:?}");
    // Duplicate tables are a syntax error too.
    let d = errors(&[(
        "p.toml",
        "version = 1\n[identity.a]\nuid = 1\n[identity.a]\nuid = 2\n",
    )]);
    assert_eq!(d.len(), 1, "{d:?}");
    assert!(
        d[0].starts_with("p.toml:4:11: TOML syntax error: duplicate key"),
        "{d:?}"
    );
}

#[test]
fn unknown_keys_name_the_allowed_ones() {
    let d = errors(&[(
        "p.toml",
        r#"version = 1
colour = "blue"
[identity.a]
uid = 1
exec = "/usr/bin/curl"
[network.n]
cidr = ["10.0.0.0/8"]
[[rule]]
action = "allow"
peer = "any"
port = [80]
"#,
    )]);
    has(
        &d,
        "p.toml:2:1: unknown key `colour` in the policy file",
        "allowed keys: version, mode, identity, network, rule",
    );
    has(
        &d,
        "p.toml:5:1: unknown key `exec` in identity `a` (did you mean `exe`?)",
        "allowed keys: exe, sha256, user, uid, group, gid, cgroup, unit, user_unit, raw",
    );
    has(
        &d,
        "p.toml:7:1: unknown key `cidr`",
        "(did you mean `cidrs`?)",
    );
    // The network then also lacks cidrs.
    has(&d, "p.toml:6:10: network `n` has no `cidrs`", "");
    has(
        &d,
        "p.toml:11:1: unknown key `port` in [[rule]] (did you mean `ports`?)",
        "allowed keys: action, direction, identity, peer, ports, proto, log",
    );
    assert_eq!(d.len(), 5, "{d:#?}");
}

#[test]
fn wrong_types() {
    let d = errors(&[(
        "p.toml",
        r#"version = "1"
mode = 1
[identity.a]
uid = "33"
user = 33
[network.n]
cidrs = "10.0.0.0/8"
[[rule]]
action = true
peer = ["any"]
ports = 80
proto = 6
log = "yes"
identity = 1
direction = 0
"#,
    )]);
    has(
        &d,
        "p.toml:1:11: `version` must be an integer, not a string",
        "version = 1",
    );
    has(
        &d,
        "p.toml:2:8: `mode` must be a string, not an integer",
        "",
    );
    has(
        &d,
        "p.toml:4:7: `uid` must be an integer, not a string",
        "user = \"NAME\"",
    );
    has(
        &d,
        "p.toml:5:8: `user` must be a string, not an integer",
        "uid = N",
    );
    has(
        &d,
        "p.toml:7:9: `cidrs` must be an array of strings, not a string",
        "",
    );
    has(
        &d,
        "p.toml:9:10: `action` must be a string, not a boolean",
        "",
    );
    has(&d, "p.toml:10:8: `peer` must be a string, not an array", "");
    has(
        &d,
        "p.toml:11:9: `ports` must be an array, not an integer",
        "ports = [443]",
    );
    has(
        &d,
        "p.toml:12:9: `proto` must be a string, not an integer",
        "",
    );
    has(&d, "p.toml:13:7: `log` must be a boolean, not a string", "");
    has(&d, "p.toml:14:12: `identity` must be a string", "");
    has(&d, "p.toml:15:13: `direction` must be a string", "");
    assert_eq!(d.len(), 12, "{d:#?}");

    let d = errors(&[(
        "p.toml",
        "version = 1\nidentity = 3\nrule = { action = \"allow\" }\n[network]\nx = 1\n",
    )]);
    has(
        &d,
        "p.toml:2:12: `identity` must be a table of named identities",
        "[identity.NAME]",
    );
    has(
        &d,
        "p.toml:3:8: `rule` must be an array of tables",
        "[[rule]]",
    );
    has(
        &d,
        "p.toml:5:5: `network.x` must be a table, not an integer",
        "",
    );
}

#[test]
fn missing_required_keys() {
    let d = errors(&[(
        "p.toml",
        "mode = \"audit\"\n\n[[rule]]\nproto = \"tcp\"\n\n  [[rule]]\naction = \"deny\"\n",
    )]);
    has(&d, "p.toml:1:1: missing `version`", "version = 1");
    has(
        &d,
        "p.toml:3:1: rule is missing `action`",
        "action = \"allow\"",
    );
    has(&d, "p.toml:3:1: rule is missing `peer`", "peer = \"any\"");
    has(&d, "p.toml:6:3: rule is missing `peer`", "");
    assert_eq!(d.len(), 4, "{d:#?}");
}

#[test]
fn wrong_version_and_invalid_values() {
    let d = errors(&[(
        "p.toml",
        r#"version = 2
mode = "monitor"
[[rule]]
action = "permit"
direction = "outbound"
proto = "gre"
peer = "any"
"#,
    )]);
    has(
        &d,
        "p.toml:1:11: unsupported policy version 2",
        "version = 1",
    );
    has(
        &d,
        "p.toml:2:8: invalid mode `monitor`",
        "\"enforce\" or \"audit\"",
    );
    has(
        &d,
        "p.toml:4:10: invalid action `permit`",
        "\"allow\" or \"deny\"",
    );
    has(
        &d,
        "p.toml:5:13: invalid direction `outbound`",
        "use \"egress\" (outgoing, the default) or \"ingress\" (incoming)",
    );
    has(
        &d,
        "p.toml:6:9: invalid proto `gre`",
        "\"tcp\", \"udp\", \"icmp\" or \"any\"",
    );
    assert_eq!(d.len(), 5, "{d:#?}");
}

#[test]
fn ingress_direction_is_accepted() {
    let (policy, warnings) = ok(
        "version = 1\n[[rule]]\naction = \"allow\"\ndirection = \"ingress\"\npeer = \"any\"\n\
         [[rule]]\naction = \"allow\"\npeer = \"any\"\n[[rule]]\naction = \"deny\"\n\
         direction = \"egress\"\npeer = \"any\"\n",
    );
    assert!(warnings.is_empty(), "{}", lines(&warnings));
    let dirs: Vec<(u32, Direction)> = policy.rules().iter().map(|r| (r.id, r.direction)).collect();
    assert_eq!(
        dirs,
        [
            (1, Direction::Ingress),
            (2, Direction::Egress),
            (3, Direction::Egress)
        ]
    );
    assert_eq!(Direction::Ingress.as_str(), "ingress");
    assert_eq!(Direction::Egress.to_string(), "egress");
    assert_eq!(Direction::default(), Direction::Egress);
}

#[test]
fn unknown_names_in_rules() {
    let d = errors(&[(
        "p.toml",
        r#"version = 1
[identity.web]
uid = 33
[network.db]
cidrs = ["10.0.2.0/24"]
[[rule]]
action = "allow"
identity = "wbe"
peer = "dbb"
"#,
    )]);
    has(
        &d,
        "p.toml:8:12: unknown identity `wbe` (did you mean `web`?)",
        "declare [identity.wbe] or use a declared identity (web) or \"any\"",
    );
    has(
        &d,
        "p.toml:9:8: unknown network `dbb` (did you mean `db`?)",
        "declare [network.dbb]",
    );
    assert_eq!(d.len(), 2, "{d:#?}");
}

#[test]
fn bad_cidrs() {
    let d = errors(&[(
        "p.toml",
        r#"version = 1
[network.n]
cidrs = ["10.0.0.1/24", "10.0.0.0/33", "fd00::1/64", 7, "::ffff:10.0.0.0/104"]
[network."10.1.1.1"]
cidrs = []
[[rule]]
action = "deny"
peer = "300.1.1.1"
[[rule]]
action = "deny"
peer = "10.0.0.0/8x"
"#,
    )]);
    has(
        &d,
        "p.toml:3:10: `10.0.0.1/24` has host bits set: the network address is 10.0.0.0/24",
        "10.0.0.1/32",
    );
    has(&d, "p.toml:3:25: `10.0.0.0/33` is not a valid CIDR", "");
    has(
        &d,
        "p.toml:3:40: `fd00::1/64` has host bits set: the network address is fd00::/64",
        "",
    );
    has(
        &d,
        "p.toml:3:54: `cidrs` must be a string, not an integer",
        "",
    );
    has(
        &d,
        "p.toml:4:10: network name `10.1.1.1` looks like an address",
        "",
    );
    has(&d, "p.toml:5:9: `cidrs` is empty", "");
    has(
        &d,
        "p.toml:8:8: `300.1.1.1` is not a valid address or CIDR",
        "",
    );
    has(&d, "p.toml:11:8: `10.0.0.0/8x` is not a valid CIDR", "");
    assert_eq!(d.len(), 8, "{d:#?}");
}

#[test]
fn bad_ports() {
    let d = errors(&[(
        "p.toml",
        r#"version = 1
[[rule]]
action = "allow"
peer = "any"
ports = [0, 65536, "100-99", "1-65536", "a-b", 1.5, 65535, "1-65535"]
[[rule]]
action = "allow"
peer = "any"
ports = []
"#,
    )]);
    has(&d, "p.toml:5:10: port 0 is out of range", "1 to 65535");
    has(&d, "p.toml:5:13: port 65536 is out of range", "");
    has(
        &d,
        "p.toml:5:20: port range `100-99` is reversed: write \"99-100\"",
        "",
    );
    has(
        &d,
        "p.toml:5:30: port 65536 in `1-65536` is out of range",
        "",
    );
    has(&d, "p.toml:5:41: bad port range `a-b`", "\"first-last\"");
    has(
        &d,
        "p.toml:5:48: `ports` must be a list of port numbers",
        "not a float",
    );
    has(&d, "p.toml:9:9: `ports` is empty", "leave `ports` out");
    assert_eq!(d.len(), 7, "{d:#?}");
}

#[test]
fn identity_problems() {
    let d = errors(&[(
        "p.toml",
        r#"version = 1
[identity.a]
user = "nobody-here"
group = "nogroup-here"
[identity.b]
exe = "/usr/bin/missing"
uid = 1
user = "root"
[identity.c]
exe = "/usr/sbin"
gid = 1
group = "root"
[identity.d]
[identity.any]
uid = 1
[identity.e]
exe = "bin/sh"
uid = 4294967295
cgroup = "/system.slice"
[identity.f]
cgroup = "a/../b"
"#,
    )]);
    has(&d, "p.toml:3:8: unknown user `nobody-here`", "uid = N");
    has(&d, "p.toml:4:9: unknown group `nogroup-here`", "gid = N");
    has(
        &d,
        "p.toml:6:7: executable `/usr/bin/missing` does not exist",
        "install it or correct the path",
    );
    has(
        &d,
        "p.toml:8:1: both `uid` and `user` are given",
        "keep only one",
    );
    has(&d, "p.toml:10:7: exe `/usr/sbin` is not a regular file", "");
    has(&d, "p.toml:12:1: both `gid` and `group` are given", "");
    has(
        &d,
        "p.toml:13:11: identity `d` has no keys",
        "identity = \"any\"",
    );
    has(&d, "p.toml:14:11: `any` is a reserved name", "");
    has(&d, "p.toml:17:7: exe `bin/sh` is not an absolute path", "");
    has(&d, "p.toml:18:7: uid 4294967295 is out of range", "");
    has(
        &d,
        "p.toml:19:10: cgroup `/system.slice` is absolute",
        "\"system.slice\"",
    );
    has(&d, "p.toml:21:10: cgroup `a/../b` contains `..`", "");
    assert_eq!(d.len(), 12, "{d:#?}");
}

#[test]
fn missing_cgroup_is_a_warning_and_matches_nothing() {
    let (policy, warnings) = ok(r#"version = 1
[identity.later]
cgroup = "system.slice/later.service"
uid = 0
[[rule]]
action = "allow"
identity = "later"
peer = "any"
"#);
    assert_eq!(warnings.len(), 1);
    assert_eq!(warnings[0].severity, Severity::Warning);
    assert!(
        warnings[0]
            .to_string()
            .starts_with("p.toml:3:10: warning: cgroup `system.slice/later.service` does not exist (yet): identity `later` matches no process"),
        "{}",
        warnings[0]
    );
    let c = compile(&policy).expect("compiles");
    assert!(c.cgroups.is_empty());
    assert_eq!(
        c.config.cgroup_wildcard, 1,
        "only `any` is a cgroup wildcard"
    );
    assert_eq!(c.config.cgroup_levels, 0);
    assert_eq!(c.config.uid_wildcard, 1);
    assert_eq!(c.uids, vec![(0, 0b10)]);
}

#[test]
fn warnings_are_returned_with_errors() {
    let d = errors(&[(
        "p.toml",
        "version = 1\n[identity.x]\ncgroup = \"nope\"\n[[rule]]\naction = \"x\"\npeer = \"any\"\n",
    )]);
    assert_eq!(d.len(), 2, "{d:#?}");
    assert!(
        d[0].starts_with("p.toml:3:10: warning: cgroup `nope`"),
        "{d:#?}"
    );
    assert!(d[1].starts_with("p.toml:5:10: invalid action"), "{d:#?}");
}

#[test]
fn empty_policy_warns() {
    let (_, w) = ok(V1);
    assert_eq!(w.len(), 1);
    assert!(w[0]
        .to_string()
        .starts_with("p.toml:1:1: warning: the policy has no rules"));
}

// ---- Several files ------------------------------------------------------------------------

#[test]
fn errors_of_all_files_are_collected_in_order() {
    let d = errors(&[
        (
            "a.toml",
            "version = 1\n[[rule]]\naction = \"allow\"\npeer = \"any\"\nproto = \"sctp\"\n",
        ),
        (
            "b.toml",
            "version = 1\n[[rule]]\naction = \"maybe\"\npeer = \"10.0.0.1/8\"\n",
        ),
        ("c.toml", "version = = 1\n"),
    ]);
    assert_eq!(d.len(), 4, "{d:#?}");
    assert!(d[0].starts_with("a.toml:5:9: invalid proto"));
    assert!(d[1].starts_with("b.toml:3:10: invalid action"));
    assert!(d[2].starts_with("b.toml:4:8: `10.0.0.1/8` has host bits set"));
    assert!(d[3].starts_with("c.toml:1:"));
    assert!(d[3].contains("TOML syntax error"));
}

#[test]
fn names_are_unique_across_files() {
    let a = "version = 1\n[identity.web]\nuid = 33\n[network.db]\ncidrs = [\"10.0.0.0/8\"]\n";
    let b = "version = 1\nmode = \"audit\"\n\n[identity.web]\nuid = 34\n[network.db]\ncidrs = [\"10.0.0.0/8\"]\n";
    let d = errors(&[("a.toml", a), ("b.toml", b)]);
    assert_eq!(
        d,
        vec![
            "b.toml:4:11: identity `web` is already declared at a.toml:2:11: names must be \
             unique across all policy files; rename or remove one of them",
            "b.toml:6:10: network `db` is already declared at a.toml:4:10: names must be \
             unique across all policy files; rename or remove one of them",
        ]
    );
}

#[test]
fn names_declared_in_other_files_resolve() {
    let a = "version = 1\n[identity.web]\nuid = 33\n";
    let b = "version = 1\nmode = \"audit\"\n[network.db]\ncidrs = [\"10.0.0.0/8\"]\n[[rule]]\naction = \"deny\"\nidentity = \"web\"\npeer = \"db\"\n";
    let c = "version = 1\n[[rule]]\naction = \"allow\"\npeer = \"db\"\nidentity = \"web\"\n";
    let (policy, _) = load_texts(&[("a.toml", a), ("b.toml", b), ("c.toml", c)]).expect("loads");
    let rules = policy.rules();
    assert_eq!(
        (rules[0].id, rules[0].file, rules[0].mode),
        (1, 1, Mode::Audit)
    );
    assert_eq!(
        (rules[1].id, rules[1].file, rules[1].mode),
        (2, 2, Mode::Enforce)
    );
    assert_eq!(rules[1].identity, Some(0));
    assert_eq!(policy.files()[1].mode, Mode::Audit);
    assert_eq!(policy.files()[1].rules, 1);
    // A syntax error in one file makes unknown-name errors elsewhere say so.
    let d = errors(&[("a.toml", "version = \n"), ("c.toml", c)]);
    assert!(
        d.iter()
            .any(|e| e.contains("unknown identity `web`")
                && e.contains("could not be read or parsed")),
        "{d:#?}"
    );
}

#[test]
fn directory_policies() {
    let dir = tempfile::tempdir().expect("tempdir");
    let write =
        |name: &str, text: &str| std::fs::write(dir.path().join(name), text).expect("write");
    write(
        "20-b.toml",
        "version = 1\n[[rule]]\naction = \"allow\"\npeer = \"any\"\nidentity = \"web\"\n",
    );
    write("10-a.toml", "version = 1\n[identity.web]\nuid = 33\n[[rule]]\naction = \"deny\"\npeer = \"10.0.0.0/8\"\n");
    write(".hidden.toml", "this is not toml");
    write("notes.txt", "not a policy");
    std::fs::create_dir(dir.path().join("sub.toml")).expect("mkdir");
    let (policy, _) = load(&[dir.path().to_path_buf()], &Fake::new()).expect("loads");
    let names: Vec<_> = policy
        .files()
        .iter()
        .map(|f| {
            f.path
                .file_name()
                .and_then(|n| n.to_str())
                .unwrap_or_default()
                .to_string()
        })
        .collect();
    assert_eq!(names, ["10-a.toml", "20-b.toml"]);
    assert_eq!(policy.rules()[0].peer_text, "10.0.0.0/8");
    assert_eq!(policy.rules()[1].identity, Some(0));

    // A file named directly, next to its directory, is read once.
    let again = load(
        &[dir.path().join("10-a.toml"), dir.path().to_path_buf()],
        &Fake::new(),
    )
    .expect("loads");
    assert_eq!(again.0.files().len(), 2);

    // Errors point into the directory's files.
    write("30-c.toml", "version = 1\n[[rule]]\naction = \"allow\"\n");
    let d = load(&[dir.path().to_path_buf()], &Fake::new()).expect_err("fails");
    assert_eq!(d.len(), 1);
    assert_eq!(d[0].path, dir.path().join("30-c.toml"));
    assert_eq!((d[0].line, d[0].column), (2, 1));
}

#[test]
fn empty_directories_and_unreadable_files() {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(dir.path().join("README"), "x").expect("write");
    let d = load(&[dir.path().to_path_buf()], &Fake::new()).expect_err("empty dir");
    assert_eq!(d.len(), 1);
    assert_eq!(d[0].path, dir.path());
    assert!(d[0].to_string().ends_with(":1:1: no *.toml files in this policy directory: put the policy in NAME.toml files here (hidden files and subdirectories are ignored)"), "{}", d[0]);

    let missing = dir.path().join("missing.toml");
    let d = load(std::slice::from_ref(&missing), &Fake::new()).expect_err("missing file");
    assert_eq!(
        d[0].to_string(),
        format!(
            "{}:1:1: policy path does not exist: check the path",
            missing.display()
        )
    );

    let latin1 = dir.path().join("latin1.toml");
    std::fs::write(&latin1, b"version = 1\n# caf\xe9\n").expect("write");
    let d = load(std::slice::from_ref(&latin1), &Fake::new()).expect_err("not utf-8");
    assert_eq!((d[0].line, d[0].column), (2, 6));
    assert!(d[0].message.contains("not valid UTF-8"));

    let d = load(&[], &Fake::new()).expect_err("no paths");
    assert!(d[0].message.starts_with("no policy path given"));
}

// ---- Compilation ----------------------------------------------------------------------------

/// What the kernel would probe for a destination: the values of the (at most four) decision
/// keys, found as the programs do (LPM on the trie, port array, `any` classes).
fn probe(c: &Compiled, addr: &str, proto: Proto, port: u16) -> Vec<(DecisionKey, DecisionValue)> {
    probe_dir(c, Direction::Egress, addr, proto, port)
}

/// [`probe`] for either direction: for ingress, `addr` is the remote source and `port` the
/// local port, and every probed port class carries `INGRESS`.
fn probe_dir(
    c: &Compiled,
    dir: Direction,
    addr: &str,
    proto: Proto,
    port: u16,
) -> Vec<(DecisionKey, DecisionValue)> {
    let addr: IpAddr = addr.parse().expect("address");
    let (net_class, any) = match addr {
        IpAddr::V4(a) => {
            let a = u32::from(a);
            let best = c
                .net4
                .iter()
                .filter(|(len, net, _)| {
                    let mask = if *len == 0 { 0 } else { u32::MAX << (32 - len) };
                    a & mask == u32::from_be_bytes(*net)
                })
                .max_by_key(|(len, _, _)| *len);
            (best.map(|b| b.2), NET_CLASS_ANY4)
        }
        IpAddr::V6(a) => {
            let a = u128::from(a);
            let best = c
                .net6
                .iter()
                .filter(|(len, net, _)| {
                    let mask = if *len == 0 {
                        0
                    } else {
                        u128::MAX << (128 - len)
                    };
                    a & mask == u128::from_be_bytes(*net)
                })
                .max_by_key(|(len, _, _)| *len);
            (best.map(|b| b.2), NET_CLASS_ANY6)
        }
    };
    let (port_class, all) = port_classes(c, dir, proto, port);
    let mut keys = vec![];
    for net in net_class.into_iter().chain([any]) {
        for pc in [port_class, all] {
            if pc != 0 {
                keys.push(DecisionKey {
                    net_class: net,
                    port_class: pc,
                });
            }
        }
    }
    keys.iter()
        .filter_map(|k| c.decisions.iter().find(|(dk, _)| dk == k).copied())
        .collect()
}

/// The port class of `port` and the "every port" class of `proto`, as the programs look them
/// up (0: no class), with `INGRESS` for ingress.
fn port_classes(c: &Compiled, dir: Direction, proto: Proto, port: u16) -> (u32, u32) {
    let (port_class, all) = match proto {
        Proto::Tcp => (c.ports[usize::from(port)], PORT_CLASS_ALL_TCP),
        Proto::Udp => (c.ports[65536 + usize::from(port)], PORT_CLASS_ALL_UDP),
        Proto::Icmp => (0, PORT_CLASS_ALL_ICMP),
        Proto::Other => (0, PORT_CLASS_ALL_OTHER),
    };
    let flag = match dir {
        Direction::Egress => 0,
        Direction::Ingress => INGRESS,
    };
    let with = |pc: u32| if pc == 0 { 0 } else { pc | flag };
    (with(port_class), with(all))
}

/// Identity masks allowed / denied / audit-denied for a destination.
fn masks(c: &Compiled, addr: &str, proto: Proto, port: u16) -> (u64, u64, u64) {
    masks_dir(c, Direction::Egress, addr, proto, port)
}

/// [`masks`] for either direction.
fn masks_dir(c: &Compiled, dir: Direction, addr: &str, proto: Proto, port: u16) -> (u64, u64, u64) {
    probe_dir(c, dir, addr, proto, port)
        .iter()
        .fold((0, 0, 0), |m, (_, v)| {
            (m.0 | v.allow, m.1 | v.deny, m.2 | v.audit_deny)
        })
}

/// The verdict and deciding rule for a task matching identities `ids`, as `decide.rs` makes
/// it: the first probe with a matching bit wins per kind; deny, then audit deny, then allow,
/// then the default (audit for audit-only identities); the rule is the lowest matching bit's.
fn decide(
    c: &Compiled,
    dir: Direction,
    ids: u64,
    addr: &str,
    proto: Proto,
    port: u16,
) -> (Verdict, u32) {
    let mut hits: [Option<(DecisionValue, u64)>; 3] = [None; 3];
    for (_, v) in probe_dir(c, dir, addr, proto, port) {
        for (kind, mask) in [v.allow, v.deny, v.audit_deny].into_iter().enumerate() {
            if hits[kind].is_none() && mask & ids != 0 {
                hits[kind] = Some((v, mask & ids));
            }
        }
    }
    let rule = |kind: u32| {
        hits[kind as usize]
            .and_then(|(v, m)| rule_of(c, &v, m.trailing_zeros(), kind))
            .unwrap_or(RULE_DEFAULT)
    };
    if hits[RULE_KIND_DENY as usize].is_some() {
        (Verdict::Deny, rule(RULE_KIND_DENY))
    } else if hits[RULE_KIND_AUDIT_DENY as usize].is_some() {
        (Verdict::Audit, rule(RULE_KIND_AUDIT_DENY))
    } else if hits[RULE_KIND_ALLOW as usize].is_some() {
        (Verdict::Allow, rule(RULE_KIND_ALLOW))
    } else if ids & c.config.enforce_identities == 0 && ids & c.config.audit_identities != 0 {
        (Verdict::Audit, RULE_DEFAULT)
    } else {
        (Verdict::Deny, RULE_DEFAULT)
    }
}

/// Whether a task matching `ids` may bind local `port`, as the bind hook decides: port 0 always;
/// otherwise some allow bit at `(NET_CLASS_BIND, class | INGRESS)` of the port's class or of
/// every port of the protocol. `Some(rule)` (the granting rule) or `None` (refused).
fn bind(c: &Compiled, ids: u64, proto: Proto, port: u16) -> Option<u32> {
    if port == 0 {
        return Some(RULE_DEFAULT);
    }
    let (port_class, all) = port_classes(c, Direction::Ingress, proto, port);
    [port_class, all]
        .into_iter()
        .filter(|&pc| pc != 0)
        .filter_map(|pc| {
            let key = DecisionKey {
                net_class: NET_CLASS_BIND,
                port_class: pc,
            };
            c.decisions.iter().find(|(k, _)| *k == key).map(|(_, v)| *v)
        })
        .find(|v| v.allow & ids != 0)
        .and_then(|v| rule_of(c, &v, (v.allow & ids).trailing_zeros(), RULE_KIND_ALLOW))
}

/// The rule-of entry for one decision value, identity bit and kind.
fn rule_of(c: &Compiled, v: &DecisionValue, identity: u32, kind: u32) -> Option<u32> {
    c.rule_of
        .iter()
        .find(|(k, _)| k.entry == v.entry && k.identity == identity && k.kind == kind)
        .map(|(_, r)| *r)
}

#[test]
fn cidr_containment_is_closed() {
    let c = compiled(
        r#"version = 1
[identity.a]
uid = 1
[identity.b]
uid = 2
[network.wide]
cidrs = ["10.0.0.0/8", "::ffff:192.168.0.0/112"]
[[rule]]
action = "allow"
identity = "a"
peer = "wide"
[[rule]]
action = "deny"
identity = "b"
peer = "10.1.2.3"
[[rule]]
action = "allow"
identity = "b"
peer = "10.1.0.0/16"
[[rule]]
action = "allow"
peer = "0.0.0.0/0"
ports = [53]
"#,
    );
    // Trie: 10/8, 10.1/16, 10.1.2.3/32, 192.168/16 (from the mapped CIDR); 0/0 is ANY4 only.
    let lens: Vec<u32> = c.net4.iter().map(|n| n.0).collect();
    assert_eq!(c.net4.len(), 4, "{:?}", c.net4);
    assert!(!lens.contains(&0));
    assert!(c.net4.iter().any(|n| n.0 == 16 && n.1 == [192, 168, 0, 0]));
    assert!(c.net6.is_empty());
    let (a, b) = (0b10, 0b100);
    // The /32 carries the /8 (rule 1) and the /16 (rule 3) as well as its own deny (rule 2).
    assert_eq!(masks(&c, "10.1.2.3", Proto::Tcp, 80), (a | b, b, 0));
    assert_eq!(masks(&c, "10.1.2.4", Proto::Tcp, 80), (a | b, 0, 0));
    assert_eq!(masks(&c, "10.2.0.1", Proto::Udp, 9), (a, 0, 0));
    assert_eq!(masks(&c, "11.0.0.1", Proto::Other, 0), (0, 0, 0));
    assert_eq!(masks(&c, "11.0.0.1", Proto::Udp, 53), (1, 0, 0));
    assert_eq!(masks(&c, "192.168.7.7", Proto::Udp, 1), (a, 0, 0));
    // Rule 1 is behind bit a at the /32.
    let probed = probe(&c, "10.1.2.3", Proto::Tcp, 80);
    let at_32 = probed
        .iter()
        .find(|(_, v)| v.deny != 0)
        .map(|(_, v)| *v)
        .expect("the /32 has an entry");
    assert_eq!(rule_of(&c, &at_32, 1, RULE_KIND_ALLOW), Some(1));
    assert_eq!(rule_of(&c, &at_32, 2, RULE_KIND_DENY), Some(2));
    assert_eq!(rule_of(&c, &at_32, 2, RULE_KIND_ALLOW), Some(3));
}

#[test]
fn port_partition() {
    let c = compiled(
        r#"version = 1
[[rule]]
action = "allow"
peer = "any"
proto = "tcp"
ports = [1, "10-20", "15-30", 25, 65535]
[[rule]]
action = "deny"
peer = "any"
proto = "tcp"
ports = ["20-25", "65000-65535"]
[[rule]]
action = "allow"
peer = "any"
proto = "udp"
ports = ["1-65535"]
"#,
    );
    let tcp = |p: usize| c.ports[p];
    let udp = |p: usize| c.ports[65536 + p];
    assert_eq!(tcp(0), 0);
    assert_ne!(tcp(1), 0);
    assert_eq!(tcp(2), 0);
    assert_eq!(tcp(9), 0);
    // tcp cuts: 1 | (2-9) | 10-14 | 15-19 | 20 | 21-24 | 25 | 26-30 | (31-64999) | 65000-65534 | 65535
    let classes: Vec<u32> = [
        1, 10, 14, 15, 19, 20, 21, 24, 25, 26, 30, 65000, 65534, 65535,
    ]
    .iter()
    .map(|&p| tcp(p))
    .collect();
    assert_eq!(classes[1], classes[2]);
    assert_eq!(classes[3], classes[4]);
    assert_eq!(classes[6], classes[7]);
    assert_eq!(classes[9], classes[10]);
    assert_eq!(classes[11], classes[12]);
    let mut distinct = classes.clone();
    distinct.dedup();
    assert_eq!(distinct.len(), 9, "{classes:?}");
    assert!(classes.iter().all(|&c| c >= PORT_CLASS_FIRST));
    assert_eq!(tcp(31), 0);
    assert_eq!(tcp(64999), 0);
    // udp: one class for everything, distinct from all tcp classes.
    assert_ne!(udp(1), 0);
    assert_eq!(udp(1), udp(65535));
    assert!(!classes.contains(&udp(1)));
    assert_eq!(udp(0), 0);

    assert_eq!(masks(&c, "10.0.0.1", Proto::Tcp, 22), (1, 1, 0));
    assert_eq!(masks(&c, "10.0.0.1", Proto::Tcp, 19), (1, 0, 0));
    assert_eq!(masks(&c, "10.0.0.1", Proto::Tcp, 65535), (1, 1, 0));
    assert_eq!(masks(&c, "10.0.0.1", Proto::Tcp, 100), (0, 0, 0));
    assert_eq!(masks(&c, "10.0.0.1", Proto::Udp, 100), (1, 0, 0));
    assert_eq!(masks(&c, "::1", Proto::Udp, 65535), (1, 0, 0));
    assert_eq!(masks(&c, "::1", Proto::Other, 0), (0, 0, 0));
}

#[test]
fn proto_any_with_and_without_ports() {
    let c = compiled(
        r#"version = 1
[[rule]]
action = "allow"
peer = "10.0.0.0/8"
ports = [443]
[[rule]]
action = "allow"
peer = "10.0.0.0/8"
proto = "tcp"
ports = [80]
[[rule]]
action = "deny"
peer = "192.168.0.0/16"
[[rule]]
action = "deny"
peer = "172.16.0.0/12"
proto = "tcp"
"#,
    );
    // ports + any = tcp and udp, not other protocols.
    assert_eq!(masks(&c, "10.0.0.1", Proto::Tcp, 443), (1, 0, 0));
    assert_eq!(masks(&c, "10.0.0.1", Proto::Udp, 443), (1, 0, 0));
    assert_eq!(masks(&c, "10.0.0.1", Proto::Other, 0), (0, 0, 0));
    // ports + tcp = tcp only.
    assert_eq!(masks(&c, "10.0.0.1", Proto::Tcp, 80), (1, 0, 0));
    assert_eq!(masks(&c, "10.0.0.1", Proto::Udp, 80), (0, 0, 0));
    // No ports + any = every protocol, icmp included.
    for proto in [Proto::Tcp, Proto::Udp, Proto::Icmp, Proto::Other] {
        assert_eq!(masks(&c, "192.168.1.1", proto, 7), (0, 1, 0));
    }
    // ... but with ports, not icmp.
    assert_eq!(masks(&c, "10.0.0.1", Proto::Icmp, 0), (0, 0, 0));
    // No ports + tcp = every tcp port only.
    assert_eq!(masks(&c, "172.16.0.1", Proto::Tcp, 1), (0, 1, 0));
    assert_eq!(masks(&c, "172.16.0.1", Proto::Udp, 1), (0, 0, 0));
    assert_eq!(masks(&c, "172.16.0.1", Proto::Other, 0), (0, 0, 0));
    assert_eq!(masks(&c, "172.16.0.1", Proto::Icmp, 0), (0, 0, 0));
    // The exact keys of the first rule.
    let first: Vec<u32> = c
        .decisions
        .iter()
        .filter(|(k, _)| k.net_class == NET_CLASS_FIRST)
        .map(|(k, _)| k.port_class)
        .collect();
    assert!(first.iter().all(|&p| p >= PORT_CLASS_FIRST), "{first:?}");
    let deny: Vec<u32> = c
        .decisions
        .iter()
        .filter(|(_, v)| v.deny != 0)
        .map(|(k, _)| k.port_class)
        .collect();
    assert_eq!(
        deny,
        vec![
            PORT_CLASS_ALL_TCP,
            PORT_CLASS_ALL_TCP,
            PORT_CLASS_ALL_UDP,
            PORT_CLASS_ALL_OTHER,
            PORT_CLASS_ALL_ICMP
        ]
    );
}

#[test]
fn deny_in_audit_file_is_audit_deny() {
    let audit = r#"version = 1
mode = "audit"
[identity.legacy]
uid = 70
[[rule]]
action = "deny"
identity = "legacy"
peer = "any"
ports = [25]
[[rule]]
action = "allow"
identity = "legacy"
peer = "any"
ports = [5432]
"#;
    let enforce = r#"version = 1
[identity.web]
user = "www-data"
[[rule]]
action = "deny"
peer = "any"
ports = [25]
"#;
    let (policy, _) = load_texts(&[("a.toml", audit), ("b.toml", enforce)]).expect("loads");
    let c = compile(&policy).expect("compiles");
    assert_eq!(c.config.audit_identities, 0b10);
    assert_eq!(c.config.enforce_identities, 0b100);
    assert_eq!(masks(&c, "10.0.0.1", Proto::Tcp, 25), (0, 1, 0b10));
    assert_eq!(masks(&c, "fd00::1", Proto::Udp, 5432), (0b10, 0, 0));
    let v = probe(&c, "10.0.0.1", Proto::Tcp, 25)[0].1;
    assert_eq!(rule_of(&c, &v, 1, RULE_KIND_AUDIT_DENY), Some(1));
    assert_eq!(rule_of(&c, &v, 0, RULE_KIND_DENY), Some(3));
    assert_eq!(
        c.rules[0].to_string(),
        "deny legacy -> any tcp+udp/25 [audit]"
    );
    assert_eq!(c.rules[0].mode, Mode::Audit);
    assert_eq!(c.identities[0].mode, Mode::Audit);
    assert_eq!(c.identities[1].mode, Mode::Enforce);
}

#[test]
fn identity_masks_and_wildcards() {
    let c = compiled(
        r#"version = 1
[identity.nginx]
exe = "/usr/sbin/nginx"
[identity.curl_root]
exe = "/usr/bin/curl"
uid = 0
[identity.curl_alias]
exe = "/usr/local/bin/curl"
group = "postgres"
[identity.slice]
cgroup = "system.slice"
gid = 0
[identity.svc]
cgroup = "system.slice/nginx.service/"
user = "root"
[[rule]]
action = "allow"
peer = "any"
"#,
    );
    let (nginx, curl_root, curl_alias, slice, svc) = (1 << 1, 1 << 2, 1 << 3, 1 << 4, 1 << 5);
    let cfg = c.config;
    assert_eq!(cfg.exe_wildcard, 1 | slice | svc);
    assert_eq!(cfg.uid_wildcard, 1 | nginx | curl_alias | slice);
    assert_eq!(cfg.gid_wildcard, 1 | nginx | curl_root | svc);
    assert_eq!(cfg.cgroup_wildcard, 1 | nginx | curl_root | curl_alias);
    assert_eq!(cfg.enforce_identities, 0b11_1110);
    assert_eq!(cfg.audit_identities, 0);
    assert_eq!(cfg.cgroup_levels, (1 << 1) | (1 << 2));
    // Two paths to the same file: one key, both bits.
    assert_eq!(
        c.exes,
        vec![
            (
                ExeKey {
                    dev: 8 << 20 | 1,
                    ino: 100
                },
                nginx
            ),
            (
                ExeKey {
                    dev: 8 << 20 | 1,
                    ino: 200
                },
                curl_root | curl_alias
            ),
        ]
    );
    assert_eq!(c.uids, vec![(0, curl_root | svc)]);
    assert_eq!(c.gids, vec![(0, slice), (70, curl_alias)]);
    assert_eq!(c.cgroups, vec![(4000, slice), (5000, svc)]);
    let bits: Vec<(u32, &str)> = c
        .identities
        .iter()
        .map(|i| (i.bit, i.name.as_str()))
        .collect();
    assert_eq!(
        bits,
        [
            (1, "nginx"),
            (2, "curl_root"),
            (3, "curl_alias"),
            (4, "slice"),
            (5, "svc")
        ]
    );
}

#[test]
fn rule_of_picks_the_lowest_rule_id() {
    let c = compiled(
        r#"version = 1
[identity.w]
uid = 33
[[rule]]
action = "allow"
identity = "w"
peer = "10.0.0.0/8"
ports = ["1000-2000"]
[[rule]]
action = "allow"
identity = "w"
peer = "10.0.0.0/16"
ports = [1500]
[[rule]]
action = "allow"
identity = "w"
peer = "10.0.0.0/8"
ports = [1500]
[[rule]]
action = "allow"
peer = "10.0.0.0/16"
ports = [1500]
"#,
    );
    let probed = probe(&c, "10.0.0.1", Proto::Tcp, 1500);
    assert_eq!(probed.len(), 1);
    let v = probed[0].1;
    assert_eq!(v.allow, 0b11);
    assert_eq!(rule_of(&c, &v, 1, RULE_KIND_ALLOW), Some(1));
    assert_eq!(rule_of(&c, &v, 0, RULE_KIND_ALLOW), Some(4));
    // Entries are unique and 1-based; the rule-of map is sorted.
    let mut entries: Vec<u32> = c.decisions.iter().map(|(_, v)| v.entry).collect();
    entries.sort_unstable();
    assert_eq!(entries, (1..=c.decisions.len() as u32).collect::<Vec<_>>());
    assert!(c.rule_of.windows(2).all(|w| w[0].0 < w[1].0));
    assert!(c.decisions.windows(2).all(|w| w[0].0 < w[1].0));
}

#[test]
fn ipv4_mapped_and_any_families() {
    let c = compiled(
        r#"version = 1
[[rule]]
action = "allow"
peer = "::ffff:10.0.0.0/104"
[[rule]]
action = "allow"
peer = "::/0"
proto = "udp"
[[rule]]
action = "deny"
peer = "::ffff:0.0.0.0/96"
proto = "tcp"
"#,
    );
    assert_eq!(c.net4, vec![(8, [10, 0, 0, 0], NET_CLASS_FIRST)]);
    assert!(c.net6.is_empty());
    let keys: Vec<(u32, u32)> = c
        .decisions
        .iter()
        .map(|(k, _)| (k.net_class, k.port_class))
        .collect();
    assert_eq!(
        keys,
        vec![
            (NET_CLASS_ANY4, PORT_CLASS_ALL_TCP),
            (NET_CLASS_ANY6, PORT_CLASS_ALL_UDP),
            (NET_CLASS_FIRST, PORT_CLASS_ALL_TCP),
            (NET_CLASS_FIRST, PORT_CLASS_ALL_UDP),
            (NET_CLASS_FIRST, PORT_CLASS_ALL_OTHER),
            (NET_CLASS_FIRST, PORT_CLASS_ALL_ICMP),
        ]
    );
}

#[test]
fn capacity_limits() {
    let mut text = String::from(V1);
    for i in 0..64 {
        text.push_str(&format!("[identity.i{i}]\nuid = {i}\n"));
    }
    text.push_str("[[rule]]\naction = \"allow\"\npeer = \"any\"\n");
    let (policy, _) = ok(&text);
    let e = compile(&policy).expect_err("64 identities");
    assert_eq!(e, CompileError::TooManyIdentities { count: 64, max: 63 });
    assert!(e.to_string().contains("at most 63"));

    let mut policy = ok("version = 1\n[[rule]]\naction = \"allow\"\npeer = \"any\"\n").0;
    let rule = policy.rules[0].clone();
    policy.rules = vec![rule; MAX_RULES as usize];
    let e = compile(&policy).expect_err("too many rules");
    assert_eq!(
        e,
        CompileError::TooManyRules {
            count: MAX_RULES as usize,
            max: MAX_RULES as usize - 1
        }
    );
}

/// A policy with `n` rules: 90% distinct /32s spread over 10/8 with one port each, 9% /24s
/// with port 443, 1% /16s without ports (so every /32 also carries a /16's rules).
fn big_policy(n: usize) -> Policy {
    let base = ok(r#"version = 1
[identity.a]
uid = 1
[identity.b]
uid = 2
[[rule]]
action = "allow"
peer = "any"
"#)
    .0;
    let template = base.rules[0].clone();
    let mut policy = base;
    policy.rules = (0..n)
        .map(|i| {
            let n = i as u32;
            let (peer, ports) = match i % 100 {
                99 => (format!("10.{}.0.0/16", n % 256), None),
                90..=98 => (
                    format!("10.{}.{}.0/24", n % 256, (n / 256) % 256),
                    Some(vec![PortRange {
                        first: 443,
                        last: 443,
                    }]),
                ),
                _ => {
                    let port = 1000 + (n % 50) as u16;
                    (
                        format!("{}/32", std::net::Ipv4Addr::from(0x0a00_0000 + n * 167)),
                        Some(vec![PortRange {
                            first: port,
                            last: port,
                        }]),
                    )
                }
            };
            Rule {
                id: n + 1,
                action: if i % 7 == 0 {
                    Action::Deny
                } else {
                    Action::Allow
                },
                identity: [None, Some(0), Some(1)][i % 3],
                peer: Peer::Cidr(peer.parse::<IpNet>().expect("cidr")),
                peer_text: peer,
                ports,
                proto: if i % 2 == 0 {
                    ProtoMatch::Tcp
                } else {
                    ProtoMatch::Any
                },
                ..template.clone()
            }
        })
        .collect();
    policy
}

#[test]
fn a_100k_rule_policy_compiles_quickly() {
    let policy = big_policy(100_000);
    let start = Instant::now();
    let c = compile(&policy).expect("compiles");
    let took = start.elapsed();
    assert_eq!(c.rules.len(), 100_000);
    assert_eq!(c.config.rules, 100_000);
    assert!(c.net4.len() > 80_000);
    // Compiling is deterministic.
    let small = big_policy(10_000);
    assert_eq!(
        compile(&small).expect("compiles"),
        compile(&small).expect("compiles again")
    );
    // Generous bound for debug builds on slow machines; release is far below a second.
    assert!(took.as_secs_f64() < 10.0, "compile took {took:?}");
    eprintln!("100k rules compiled in {took:?}");
}

/// Resolves every name (for policies written for other machines).
struct Lenient;

impl Resolve for Lenient {
    fn uid_of(&self, _: &str) -> Option<u32> {
        Some(1000)
    }
    fn gid_of(&self, _: &str) -> Option<u32> {
        Some(1000)
    }
    fn exe(&self, path: &Path) -> io::Result<ExeKey> {
        let ino = path.as_os_str().len() as u64;
        Ok(ExeKey { dev: 1, ino })
    }
    fn cgroup_id(&self, rel: &str) -> io::Result<u64> {
        Ok(rel.len() as u64)
    }
    fn unit_cgroup(&self, unit: &str) -> io::Result<(String, u64)> {
        Ok((format!("system.slice/{unit}"), unit.len() as u64))
    }
}

#[test]
fn shipped_policies_load_and_compile() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../policies");
    if !dir.is_dir() {
        return;
    }
    let paths = vec![dir.join("default.toml"), dir.join("examples")];
    let (policy, warnings) = match load(&paths, &Lenient) {
        Ok(x) => x,
        Err(d) => panic!("shipped policies have errors:\n{}", lines(&d)),
    };
    assert!(warnings.is_empty(), "{}", lines(&warnings));
    assert!(policy.counts().files >= 2);
    compile(&policy).expect("shipped policies compile");
}

// ---- Ingress rules, bind grants, ICMP, raw sockets ------------------------------------------

/// The README's sshd example.
const SSHD: &str = r#"version = 1

[identity.sshd]
exe = "/usr/sbin/nginx"          # stands in for /usr/sbin/sshd
uid = 0

[network.admins]
cidrs = ["10.9.0.0/16", "fd00:9::/48"]

[[rule]]
action = "allow"
direction = "ingress"
identity = "sshd"
peer = "admins"
ports = [22]
proto = "tcp"

[[rule]]
action = "deny"
direction = "ingress"
identity = "any"
peer = "203.0.113.0/24"
"#;

#[test]
fn ingress_rules_compile_with_ingress_keys() {
    let text = format!(
        "{SSHD}
[identity.web]
user = \"www-data\"
[network.db]
cidrs = [\"10.2.0.0/24\"]
[[rule]]
action = \"allow\"
identity = \"web\"
peer = \"db\"
ports = [5432]
proto = \"tcp\"
"
    );
    let (policy, warnings) = ok(&text);
    assert!(warnings.is_empty(), "{}", lines(&warnings));
    let c = compile(&policy).expect("compiles");
    let (sshd, web) = (0b10, 0b100);
    // Rule ids count across both directions, in policy order.
    let rules: Vec<(u32, Direction, String)> = c
        .rules
        .iter()
        .map(|r| (r.id, r.direction, r.summary()))
        .collect();
    assert_eq!(
        rules,
        [
            (
                1,
                Direction::Ingress,
                "allow ingress sshd <- admins tcp/22".to_string()
            ),
            (
                2,
                Direction::Ingress,
                "deny ingress any <- 203.0.113.0/24 any".to_string()
            ),
            (3, Direction::Egress, "allow web -> db tcp/5432".to_string()),
        ]
    );
    assert_eq!(c.config.rules, 3);
    // Same net classes for both directions; ingress keys carry INGRESS, egress keys never.
    let tcp22 = c.ports[22];
    let tcp5432 = c.ports[5432];
    assert!(tcp22 >= PORT_CLASS_FIRST && tcp5432 >= PORT_CLASS_FIRST && tcp22 != tcp5432);
    let keys: Vec<(u32, u32)> = c
        .decisions
        .iter()
        .map(|(k, _)| (k.net_class, k.port_class))
        .collect();
    let ingress_any = [
        PORT_CLASS_ALL_TCP,
        PORT_CLASS_ALL_UDP,
        PORT_CLASS_ALL_OTHER,
        PORT_CLASS_ALL_ICMP,
    ];
    let mut want: Vec<(u32, u32)> = vec![(NET_CLASS_BIND, tcp22 | INGRESS)];
    // Trie: 10.2.0.0/24 (16), 10.9.0.0/16 (17), 203.0.113.0/24 (18), fd00:9::/48 (19).
    want.push((NET_CLASS_FIRST, tcp5432));
    want.push((NET_CLASS_FIRST + 1, tcp22 | INGRESS));
    want.extend(ingress_any.map(|pc| (NET_CLASS_FIRST + 2, pc | INGRESS)));
    want.push((NET_CLASS_FIRST + 3, tcp22 | INGRESS));
    assert_eq!(keys, want);
    assert!(c
        .decisions
        .iter()
        .all(|(k, _)| (k.port_class & INGRESS == 0) == (k.net_class == NET_CLASS_FIRST)));

    let ingress = |ids, addr, proto, port| decide(&c, Direction::Ingress, ids, addr, proto, port);
    let egress = |ids, addr, proto, port| decide(&c, Direction::Egress, ids, addr, proto, port);
    assert_eq!(
        ingress(sshd, "10.9.1.1", Proto::Tcp, 22),
        (Verdict::Allow, 1)
    );
    assert_eq!(
        ingress(sshd | 1, "fd00:9::7", Proto::Tcp, 22),
        (Verdict::Allow, 1)
    );
    // Wrong source, port, protocol or identity: the default deny.
    assert_eq!(
        ingress(sshd, "10.8.0.1", Proto::Tcp, 22),
        (Verdict::Deny, 0)
    );
    assert_eq!(
        ingress(sshd, "10.9.1.1", Proto::Tcp, 23),
        (Verdict::Deny, 0)
    );
    assert_eq!(
        ingress(sshd, "10.9.1.1", Proto::Udp, 22),
        (Verdict::Deny, 0)
    );
    assert_eq!(ingress(web, "10.9.1.1", Proto::Tcp, 22), (Verdict::Deny, 0));
    // The host-wide block list: every identity, every protocol.
    for ids in [1, sshd | 1, web | 1] {
        for proto in [Proto::Tcp, Proto::Udp, Proto::Icmp, Proto::Other] {
            assert_eq!(
                ingress(ids, "203.0.113.5", proto, 22),
                (Verdict::Deny, 2),
                "{ids:#b} {proto:?}"
            );
        }
    }
    // Ingress rules say nothing about egress, nor egress rules about ingress.
    assert_eq!(egress(sshd, "10.9.1.1", Proto::Tcp, 22), (Verdict::Deny, 0));
    assert_eq!(
        egress(web | 1, "203.0.113.5", Proto::Tcp, 22),
        (Verdict::Deny, 0)
    );
    assert_eq!(
        egress(web, "10.2.0.9", Proto::Tcp, 5432),
        (Verdict::Allow, 3)
    );
    assert_eq!(
        ingress(web, "10.2.0.9", Proto::Tcp, 5432),
        (Verdict::Deny, 0)
    );
    // The loader fills in the ephemeral range.
    assert_eq!((c.config.ephemeral_low, c.config.ephemeral_high), (0, 0));
}

#[test]
fn ingress_rules_of_audit_files_audit() {
    let c = compiled(
        r#"version = 1
mode = "audit"
[identity.db]
user = "postgres"
[[rule]]
action = "deny"
direction = "ingress"
identity = "db"
peer = "10.0.0.0/8"
ports = [5432]
proto = "tcp"
[[rule]]
action = "allow"
direction = "ingress"
identity = "db"
peer = "any"
ports = [5432]
proto = "tcp"
"#,
    );
    let db = 0b10;
    assert_eq!(
        masks_dir(&c, Direction::Ingress, "10.1.1.1", Proto::Tcp, 5432),
        (db, 0, db)
    );
    assert_eq!(
        decide(&c, Direction::Ingress, db, "10.1.1.1", Proto::Tcp, 5432),
        (Verdict::Audit, 1)
    );
    assert_eq!(
        decide(&c, Direction::Ingress, db, "192.0.2.1", Proto::Tcp, 5432),
        (Verdict::Allow, 2)
    );
    // Default deny of an audit-only identity is an audit.
    assert_eq!(
        decide(&c, Direction::Ingress, db, "192.0.2.1", Proto::Tcp, 80),
        (Verdict::Audit, 0)
    );
    // Allow rules of audit files grant binds too.
    assert_eq!(bind(&c, db, Proto::Tcp, 5432), Some(2));
    assert_eq!(
        c.rules[0].to_string(),
        "deny ingress db <- 10.0.0.0/8 tcp/5432 [audit]"
    );
}

#[test]
fn bind_grants() {
    let c = compiled(
        r#"version = 1
[identity.a]
uid = 1
[identity.b]
uid = 2
[identity.c]
uid = 3
[identity.d]
uid = 4
[[rule]]
action = "allow"
direction = "ingress"
identity = "a"
peer = "10.9.0.0/16"
ports = [22, "8000-8100"]
proto = "tcp"
[[rule]]
action = "allow"
direction = "ingress"
identity = "b"
peer = "any"
proto = "tcp"
[[rule]]
action = "deny"
direction = "ingress"
identity = "c"
peer = "any"
ports = [22]
[[rule]]
action = "allow"
direction = "ingress"
peer = "10.0.0.1"
ports = [53]
proto = "udp"
[[rule]]
action = "allow"
direction = "ingress"
identity = "a"
peer = "fd00::/8"
ports = ["20-30"]
proto = "tcp"
[[rule]]
action = "allow"
identity = "d"
peer = "any"
ports = [9000]
[[rule]]
action = "allow"
direction = "ingress"
identity = "d"
peer = "any"
"#,
    );
    let (a, b, cc, d) = (1 << 1, 1 << 2, 1 << 3, 1 << 4);
    // Ports and ranges, whatever the peer; the lowest granting rule is reported.
    assert_eq!(bind(&c, a, Proto::Tcp, 22), Some(1));
    assert_eq!(bind(&c, a | b, Proto::Tcp, 22), Some(1));
    assert_eq!(bind(&c, a, Proto::Tcp, 8000), Some(1));
    assert_eq!(bind(&c, a, Proto::Tcp, 8100), Some(1));
    assert_eq!(bind(&c, a, Proto::Tcp, 25), Some(5));
    assert_eq!(bind(&c, a, Proto::Tcp, 8101), None);
    assert_eq!(bind(&c, a, Proto::Tcp, 31), None);
    assert_eq!(bind(&c, a, Proto::Udp, 22), None);
    // Port 0 (an ephemeral port) is always allowed.
    assert_eq!(bind(&c, a, Proto::Udp, 0), Some(0));
    // No ports: every port of the protocol.
    assert_eq!(bind(&c, b, Proto::Tcp, 1), Some(2));
    assert_eq!(bind(&c, b, Proto::Tcp, 65535), Some(2));
    assert_eq!(bind(&c, b, Proto::Udp, 1), None);
    // Deny rules grant nothing.
    assert_eq!(bind(&c, cc, Proto::Tcp, 22), None);
    assert_eq!(bind(&c, cc, Proto::Udp, 22), None);
    // `any` (bit 0) matches every task.
    assert_eq!(bind(&c, 1, Proto::Udp, 53), Some(4));
    assert_eq!(bind(&c, 1 | cc, Proto::Udp, 53), Some(4));
    assert_eq!(bind(&c, 1, Proto::Tcp, 53), None);
    // Egress rules grant nothing; an ingress rule without ports and proto any grants every
    // port of every protocol.
    assert_eq!(bind(&c, d, Proto::Tcp, 9000), Some(7));
    assert_eq!(bind(&c, d, Proto::Udp, 9), Some(7));
    // Bind entries hold only allow masks; one entry per granted class (deny rules add none).
    let bind_keys: Vec<(u32, DecisionValue)> = c
        .decisions
        .iter()
        .filter(|(k, _)| k.net_class == NET_CLASS_BIND)
        .map(|(k, v)| (k.port_class, *v))
        .collect();
    assert!(bind_keys
        .iter()
        .all(|(pc, v)| pc & INGRESS != 0 && v.deny == 0 && v.audit_deny == 0 && v.allow != 0));
    let all: Vec<u32> = bind_keys
        .iter()
        .map(|(pc, _)| pc & !INGRESS)
        .filter(|&pc| pc < PORT_CLASS_FIRST)
        .collect();
    assert_eq!(
        all,
        [
            PORT_CLASS_ALL_TCP,
            PORT_CLASS_ALL_UDP,
            PORT_CLASS_ALL_OTHER,
            PORT_CLASS_ALL_ICMP
        ]
    );
    let all_tcp = bind_keys
        .iter()
        .find(|(pc, _)| *pc == PORT_CLASS_ALL_TCP | INGRESS)
        .map(|(_, v)| v.allow);
    assert_eq!(all_tcp, Some(b | d));
    // tcp 20-21 | 22 | 23-30 | 8000-8100 (rules 1, 3, 5) and udp 22 (rule 3), 53 (rule 4), 9000
    // (egress rule 6): the classes that have a grant.
    let granted: Vec<u32> = bind_keys
        .iter()
        .map(|(pc, _)| pc & !INGRESS)
        .filter(|&pc| pc >= PORT_CLASS_FIRST)
        .collect();
    let want: Vec<u32> = [20, 22, 23, 8000]
        .map(|p| c.ports[p])
        .into_iter()
        .chain([c.ports[65536 + 53]])
        .collect();
    assert_eq!(granted, want);
}

#[test]
fn egress_and_ingress_share_the_port_partition() {
    let c = compiled(
        r#"version = 1
[identity.x]
uid = 1
[identity.y]
uid = 2
[[rule]]
action = "allow"
identity = "x"
peer = "10.0.0.0/8"
ports = ["1000-2000"]
proto = "tcp"
[[rule]]
action = "allow"
direction = "ingress"
identity = "y"
peer = "10.0.0.0/8"
ports = ["1500-2500"]
proto = "tcp"
"#,
    );
    let (x, y) = (0b10, 0b100);
    let tcp = |p: usize| c.ports[p];
    // 1000-1499 | 1500-2000 | 2001-2500.
    assert_eq!(tcp(999), 0);
    assert_eq!(tcp(1000), tcp(1499));
    assert_eq!(tcp(1500), tcp(2000));
    assert_eq!(tcp(2001), tcp(2500));
    assert_eq!(tcp(2501), 0);
    let classes = [tcp(1000), tcp(1500), tcp(2001)];
    assert!(classes.iter().all(|&pc| pc >= PORT_CLASS_FIRST));
    assert!(classes[0] != classes[1] && classes[1] != classes[2] && classes[0] != classes[2]);
    // The same partition for both directions: egress has the first two classes, ingress the
    // last two, at the same net class.
    let keys: Vec<(u32, u32)> = c
        .decisions
        .iter()
        .filter(|(k, _)| k.net_class == NET_CLASS_FIRST)
        .map(|(k, _)| (k.net_class, k.port_class))
        .collect();
    let mut want = vec![
        (NET_CLASS_FIRST, classes[0]),
        (NET_CLASS_FIRST, classes[1]),
        (NET_CLASS_FIRST, classes[1] | INGRESS),
        (NET_CLASS_FIRST, classes[2] | INGRESS),
    ];
    want.sort_unstable();
    assert_eq!(keys, want);

    let d = |dir, ids, port| decide(&c, dir, ids, "10.1.1.1", Proto::Tcp, port).0;
    assert_eq!(d(Direction::Egress, x, 1200), Verdict::Allow);
    assert_eq!(d(Direction::Egress, x, 1800), Verdict::Allow);
    assert_eq!(d(Direction::Egress, x, 2200), Verdict::Deny);
    assert_eq!(d(Direction::Ingress, y, 1200), Verdict::Deny);
    assert_eq!(d(Direction::Ingress, y, 1800), Verdict::Allow);
    assert_eq!(d(Direction::Ingress, y, 2500), Verdict::Allow);
    assert_eq!(d(Direction::Egress, y, 1800), Verdict::Deny);
    assert_eq!(d(Direction::Ingress, x, 1800), Verdict::Deny);
    assert_eq!(bind(&c, y, Proto::Tcp, 1500), Some(2));
    assert_eq!(bind(&c, y, Proto::Tcp, 2500), Some(2));
    assert_eq!(bind(&c, y, Proto::Tcp, 1499), None);
    assert_eq!(bind(&c, x, Proto::Tcp, 1500), None);
}

#[test]
fn icmp_rules() {
    let c = compiled(
        r#"version = 1
[identity.mon]
uid = 1
[[rule]]
action = "allow"
identity = "mon"
peer = "10.0.0.0/8"
proto = "icmp"
[[rule]]
action = "allow"
direction = "ingress"
identity = "mon"
peer = "any"
proto = "icmp"
"#,
    );
    let mon = 0b10;
    let keys: Vec<(u32, u32)> = c
        .decisions
        .iter()
        .map(|(k, _)| (k.net_class, k.port_class))
        .collect();
    assert_eq!(
        keys,
        [
            (NET_CLASS_ANY4, PORT_CLASS_ALL_ICMP | INGRESS),
            (NET_CLASS_ANY6, PORT_CLASS_ALL_ICMP | INGRESS),
            (NET_CLASS_BIND, PORT_CLASS_ALL_ICMP | INGRESS),
            (NET_CLASS_FIRST, PORT_CLASS_ALL_ICMP),
        ]
    );
    // icmp uses no port classes.
    assert!(c.ports.iter().all(|&pc| pc == 0));
    assert_eq!(masks(&c, "10.1.2.3", Proto::Icmp, 0), (mon, 0, 0));
    assert_eq!(masks(&c, "10.1.2.3", Proto::Tcp, 7), (0, 0, 0));
    assert_eq!(masks(&c, "10.1.2.3", Proto::Other, 0), (0, 0, 0));
    assert_eq!(masks(&c, "11.0.0.1", Proto::Icmp, 0), (0, 0, 0));
    assert_eq!(
        decide(&c, Direction::Ingress, mon, "fd00::1", Proto::Icmp, 0),
        (Verdict::Allow, 2)
    );
    assert_eq!(c.rules[0].summary(), "allow mon -> 10.0.0.0/8 icmp");
    assert_eq!(c.rules[1].summary(), "allow ingress mon <- any icmp");
    assert_eq!(c.config.icmp_identities, mon);
    assert_eq!(c.config.raw_identities, 0);
}

#[test]
fn icmp_with_ports_is_an_error() {
    let d = errors(&[(
        "p.toml",
        r#"version = 1
[[rule]]
action = "allow"
peer = "any"
proto = "icmp"
ports = [8]
[[rule]]
action = "allow"
ports = ["1-10"]
peer = "any"
  proto = "icmp"
[[rule]]
action = "allow"
peer = "any"
proto = "icmpv6"
"#,
    )]);
    has(
        &d,
        "p.toml:6:9: `ports` cannot be used with proto = \"icmp\": ICMP has no ports",
        "remove `ports`",
    );
    // Wherever `proto` comes, the error is at `ports`.
    has(
        &d,
        "p.toml:9:9: `ports` cannot be used with proto = \"icmp\"",
        "",
    );
    has(
        &d,
        "p.toml:15:9: invalid proto `icmpv6`: write \"icmp\", which covers ICMP and ICMPv6",
        "",
    );
    assert_eq!(d.len(), 3, "{d:#?}");
}

#[test]
fn proto_any_without_ports_covers_icmp_in_both_directions() {
    let c = compiled(
        r#"version = 1
[[rule]]
action = "allow"
direction = "ingress"
peer = "10.0.0.0/8"
[[rule]]
action = "deny"
peer = "10.0.0.0/8"
ports = [7]
"#,
    );
    for proto in [Proto::Tcp, Proto::Udp, Proto::Icmp, Proto::Other] {
        assert_eq!(
            decide(&c, Direction::Ingress, 1, "10.1.1.1", proto, 9),
            (Verdict::Allow, 1),
            "{proto:?}"
        );
        assert_eq!(
            decide(&c, Direction::Egress, 1, "10.1.1.1", proto, 9),
            (Verdict::Deny, 0),
            "{proto:?}"
        );
    }
    assert_eq!(
        decide(&c, Direction::Egress, 1, "10.1.1.1", Proto::Udp, 7),
        (Verdict::Deny, 2)
    );
    assert_eq!(
        decide(&c, Direction::Ingress, 1, "10.1.1.1", Proto::Udp, 7),
        (Verdict::Allow, 1)
    );
    // An allow rule with proto any and no ports covers ICMP: its identity (here `any`, bit
    // 0) may create ICMP sockets.
    assert_eq!(c.config.icmp_identities, 1);
}

#[test]
fn raw_and_icmp_identities() {
    let c = compiled(
        r#"version = 1
[identity.pinger]
uid = 0
raw = true
[identity.icmper]
user = "www-data"
[identity.ingress_icmp]
user = "postgres"
[identity.denied]
uid = 5
[identity.plain]
uid = 6
raw = false
[identity.tcp_only]
uid = 7
[[rule]]
action = "allow"
identity = "icmper"
peer = "any"
proto = "icmp"
[[rule]]
action = "allow"
direction = "ingress"
identity = "ingress_icmp"
peer = "10.0.0.0/8"
proto = "icmp"
[[rule]]
action = "deny"
identity = "denied"
peer = "any"
proto = "icmp"
[[rule]]
action = "allow"
identity = "tcp_only"
peer = "any"
proto = "tcp"
"#,
    );
    let (pinger, icmper, ingress_icmp) = (1 << 1, 1 << 2, 1 << 3);
    assert_eq!(c.config.raw_identities, pinger);
    assert_eq!(c.config.icmp_identities, pinger | icmper | ingress_icmp);
    // `raw` does not change what the identity matches.
    assert_eq!(c.uids[0], (0, pinger));
    assert_eq!(c.config.uid_wildcard, 1);

    // `identity = "any"` with proto icmp: bit 0.
    let c = compiled(
        "version = 1\n[[rule]]\naction = \"allow\"\nidentity = \"any\"\npeer = \"any\"\n\
         proto = \"icmp\"\n",
    );
    assert_eq!((c.config.icmp_identities, c.config.raw_identities), (1, 0));
}

#[test]
fn raw_problems() {
    let d = errors(&[(
        "p.toml",
        r#"version = 1
[identity.a]
uid = 1
raw = "yes"
[identity.b]
raw = true
[identity.c]
raw = 1
rwa = true
"#,
    )]);
    has(
        &d,
        "p.toml:4:7: `raw` must be a boolean, not a string",
        "raw = true",
    );
    has(
        &d,
        "p.toml:5:11: identity `b` has no matching key, so it would match every process",
        "`raw` only grants a permission and does not select processes; give at least one of \
         exe, user, uid, group, gid, cgroup",
    );
    has(&d, "p.toml:7:11: identity `c` has no matching key", "");
    has(
        &d,
        "p.toml:8:7: `raw` must be a boolean, not an integer",
        "",
    );
    has(
        &d,
        "p.toml:9:1: unknown key `rwa` in identity `c` (did you mean `raw`?)",
        "",
    );
    assert_eq!(d.len(), 5, "{d:#?}");
}

#[test]
fn sshd_example_from_the_readme() {
    // The policy reference moved to docs/policy.md (installed as zt-policy(5)).
    let readme = include_str!("../../../docs/policy.md");
    let start = readme
        .find("[identity.sshd]")
        .expect("docs/policy.md has the sshd example");
    let end = start + readme[start..].find("```").expect("the example ends");
    let example = format!("version = 1\n{}", &readme[start..end]);
    let (policy, warnings) =
        match load_sources(&[(PathBuf::from("sshd.toml"), example.clone())], &Lenient) {
            Ok(x) => x,
            Err(d) => panic!(
                "docs/policy.md example has errors:\n{}\n{example}",
                lines(&d)
            ),
        };
    assert!(warnings.is_empty(), "{}", lines(&warnings));
    let c = compile(&policy).expect("compiles");
    let sshd = 0b10;
    assert!(c
        .rules
        .iter()
        .any(|r| r.summary() == "allow ingress sshd <- admins tcp/22"));
    assert_eq!(bind(&c, sshd, Proto::Tcp, 22), Some(1));
    assert_eq!(bind(&c, 1, Proto::Tcp, 22), None);
    assert_eq!(
        decide(&c, Direction::Ingress, sshd, "10.9.1.1", Proto::Tcp, 22).0,
        Verdict::Allow
    );
    assert_eq!(
        decide(&c, Direction::Ingress, sshd, "192.0.2.1", Proto::Tcp, 22).0,
        Verdict::Deny
    );
}
