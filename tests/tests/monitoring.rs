//! Monitoring against the real kernel: every decision event as `ztctl events --json` prints
//! it (one per denial, with the caller's identity), audit and `log = true` events, the
//! filters, live following, the accounting under a flood (bounded memory, nothing unaccounted
//! for), `ztctl top`, `/metrics` and JSON logs. Every denial is paired with a positive
//! control through the same harness, and every "no event" with an event that did arrive.

use std::{
    net::{IpAddr, SocketAddr},
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use zt::history::EventRecord;
use zt_integration::{
    exe_key, free_tcp_port, http_get, output_within, read_pid, vm_rss_kib, Call, Harness, Held,
    NetPair, Server, Ztd,
};

const PROBE: &str = env!("CARGO_BIN_EXE_zt-probe");
/// How long an event may take from the kernel to `ztctl events`.
const WAIT: Duration = Duration::from_secs(5);
/// How long the probe stays alive after its call, so that `ztd` can still read its exe.
const LINGER_MS: u64 = 1000;

fn lo4(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

fn lo6(port: u16) -> SocketAddr {
    format!("[::1]:{port}").parse().expect("addr")
}

/// The probe as the kernel knows it: symlinks resolved.
fn probe_path() -> PathBuf {
    std::fs::canonicalize(PROBE).expect("canonical probe path")
}

fn ip(s: &str) -> IpAddr {
    s.parse().expect("address")
}

/// The 1-based line of `text` that is exactly `line` (trimmed), the `n`-th such (from 1).
fn line_no(text: &str, line: &str, n: usize) -> usize {
    text.lines()
        .enumerate()
        .filter(|(_, l)| l.trim() == line)
        .nth(n - 1)
        .map(|(i, _)| i + 1)
        .unwrap_or_else(|| panic!("no {line:?} #{n} in policy"))
}

/// Where ztd says rule `id` is written (`ztctl status --json` counters).
fn rule_location(h: &Harness, id: u32) -> String {
    let st = h.status_json();
    st["counters"]
        .as_array()
        .and_then(|cs| cs.iter().find(|c| c["id"] == id))
        .and_then(|c| c["location"].as_str())
        .unwrap_or_else(|| panic!("no counter for rule {id}: {st}"))
        .to_string()
}

/// Name of a uid / gid, as the events should carry it.
fn user_name(uid: u32) -> Option<String> {
    nix::unistd::User::from_uid(nix::unistd::Uid::from_raw(uid))
        .ok()
        .flatten()
        .map(|u| u.name)
}

fn group_name(gid: u32) -> Option<String> {
    nix::unistd::Group::from_gid(nix::unistd::Gid::from_raw(gid))
        .ok()
        .flatten()
        .map(|g| g.name)
}

fn cgroup_inode(path: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path).expect("stat cgroup").ino()
}

fn dump(ztd: &Ztd) -> String {
    ztd.lines().join("\n")
}

/// Exactly one record of `ztctl events --json ARGS` passes `keep`: waits for it, then
/// leaves time for a duplicate to show up, and returns it.
fn exactly_one(
    h: &Harness,
    ztd: &Ztd,
    args: &[&str],
    what: &str,
    keep: impl Fn(&EventRecord) -> bool,
) -> EventRecord {
    let got = h.wait_events(args, 1, WAIT, &keep);
    assert!(
        !got.is_empty(),
        "no event for {what} in `ztctl events --json {}`; all events: {:#?}\nztd output:\n{}",
        args.join(" "),
        h.events(&[]),
        dump(ztd)
    );
    std::thread::sleep(Duration::from_millis(700));
    let mut got: Vec<EventRecord> = h.events(args).into_iter().filter(|r| keep(r)).collect();
    assert_eq!(got.len(), 1, "exactly one event for {what}: {got:#?}");
    got.remove(0)
}

/// No record of `ztctl events --json` passes `keep` — checked once an event made after the
/// call in question (`barrier`) has arrived, so a late event would have been seen.
fn none_before_barrier(
    h: &Harness,
    what: &str,
    keep: impl Fn(&EventRecord) -> bool,
    barrier: impl Fn(&EventRecord) -> bool,
) {
    let seen = h.wait_events(&[], 1, WAIT, &barrier);
    assert!(!seen.is_empty(), "the barrier event for {what} never came");
    let bad: Vec<EventRecord> = h.events(&[]).into_iter().filter(|r| keep(r)).collect();
    assert!(bad.is_empty(), "unexpected events for {what}: {bad:#?}");
}

/// The caller identity of a task-hook event (connect, sendmsg, bind, sock_create).
fn assert_caller(r: &EventRecord, h: &Harness, pid: u32, uid: u32, gid: u32) {
    let exe = probe_path();
    let (dev, ino) = exe_key(&exe);
    assert_eq!(
        (r.pid, r.tgid),
        (pid, pid),
        "pid/tgid of the (single-threaded) probe: {r:#?}"
    );
    assert_eq!((r.uid, r.gid), (uid, gid), "uid/gid: {r:#?}");
    assert_eq!(r.user, user_name(uid), "user name: {r:#?}");
    assert_eq!(r.group, group_name(gid), "group name: {r:#?}");
    assert_eq!(
        r.cgroup_id,
        cgroup_inode(&h.cgroup.path),
        "cgroup id: {r:#?}"
    );
    assert_eq!(
        r.cgroup.as_deref(),
        Some(format!("/{}", h.cgroup.rel).as_str()),
        "cgroup path: {r:#?}"
    );
    assert_eq!((r.exe_dev, r.exe_ino), (dev, ino), "exe dev/ino: {r:#?}");
    assert_eq!(
        r.exe.as_deref(),
        Some(exe.to_str().expect("utf-8 path")),
        "exe path: {r:#?}"
    );
    assert_eq!(r.comm, "zt-probe", "comm: {r:#?}");
}

/// Fields every record must have right whatever the hook.
fn assert_common(r: &EventRecord, verdict: &str, hook: &str, generation: u64, since_ns: u64) {
    assert_eq!(r.verdict, verdict, "{r:#?}");
    assert_eq!(r.hook, hook, "{r:#?}");
    assert_eq!(r.generation, generation, "{r:#?}");
    assert!(r.seq >= 1, "{r:#?}");
    let now = zt::history::now_ns();
    assert!(
        r.time_ns + 2_000_000_000 >= since_ns && r.time_ns <= now + 2_000_000_000,
        "time_ns {} not within the test's window [{since_ns}, {now}]: {r:#?}",
        r.time_ns
    );
    assert_eq!(
        r.time,
        zt::history::rfc3339_ns(r.time_ns),
        "time is time_ns in RFC 3339: {r:#?}"
    );
    assert_eq!(r.suppressed, 0, "nothing rate-limited here: {r:#?}");
}

fn generation(h: &Harness) -> u64 {
    h.status_json()["generation"]
        .as_u64()
        .expect("status generation")
}

// -------------------------------------------------------------------------------------------
// 1. One event per denial, for every hook, with the right fields.
// -------------------------------------------------------------------------------------------

#[test]
fn connect_and_sendmsg_denials_are_one_event_each_with_the_callers_identity() {
    let h = Harness::new(PROBE);
    let srv = Server::loopback(&h.probe, 5);
    let (open, c4, c6, s4, s6) = (
        srv.ports[0],
        srv.ports[1],
        srv.ports[2],
        srv.ports[3],
        srv.ports[4],
    );
    let text = format!(
        r#"version = 1
[[rule]]
action = "allow"
peer = "127.0.0.1"
ports = [{open}]

[[rule]]
action = "allow"
peer = "::1"
ports = [{open}]

[[rule]]
action = "deny"
peer = "127.0.0.1"
ports = [{c4}]
proto = "tcp"
"#
    );
    let path = h.write_policy("p.toml", &text);
    let deny_line = line_no(&text, "[[rule]]", 3);
    let ztd = h.start_ztd(&[]);
    let gen = generation(&h);
    let deny_location = rule_location(&h, 3);
    assert_eq!(
        deny_location,
        format!("{}:{deny_line}:1", path.display()),
        "counters name the deny rule by path:line:column"
    );
    let dir = tempfile::tempdir().expect("tempdir");

    // Positive controls: the same kinds of call where the policy allows them.
    let call = |c: Call| h.probe_call(c.cgroup(&h.cgroup.path));
    assert_eq!(call(Call::new("tcp", lo4(open))), "ok", "tcp v4 allowed");
    assert_eq!(call(Call::new("tcp", lo6(open))), "ok", "tcp v6 allowed");
    assert_eq!(
        call(Call::new("udp", lo4(open)).unconnected()),
        "ok",
        "sendto v4 allowed"
    );
    assert_eq!(
        call(Call::new("udp", lo6(open)).unconnected()),
        "ok",
        "sendto v6 allowed"
    );

    struct Case {
        hook: &'static str,
        call: Call,
        peer: SocketAddr,
        proto: &'static str,
        family: u8,
        uid: u32,
        gid: u32,
        rule_id: u32,
    }
    let cases = [
        Case {
            hook: "connect4",
            call: Call::new("tcp", lo4(c4)).uid(41001).gid(42001),
            peer: lo4(c4),
            proto: "tcp",
            family: 4,
            uid: 41001,
            gid: 42001,
            rule_id: 3,
        },
        Case {
            hook: "connect6",
            call: Call::new("tcp", lo6(c6)),
            peer: lo6(c6),
            proto: "tcp",
            family: 6,
            uid: 0,
            gid: 0,
            rule_id: 0,
        },
        Case {
            hook: "sendmsg4",
            call: Call::new("udp", lo4(s4))
                .unconnected()
                .uid(41002)
                .gid(42002),
            peer: lo4(s4),
            proto: "udp",
            family: 4,
            uid: 41002,
            gid: 42002,
            rule_id: 0,
        },
        Case {
            hook: "sendmsg6",
            call: Call::new("udp", lo6(s6)).unconnected(),
            peer: lo6(s6),
            proto: "udp",
            family: 6,
            uid: 0,
            gid: 0,
            rule_id: 0,
        },
    ];
    for case in cases {
        let pid_file = dir.path().join(format!("{}.pid", case.hook));
        let since = zt::history::now_ns();
        let out = h.probe_call(
            case.call
                .cgroup(&h.cgroup.path)
                .pid_file(&pid_file)
                .linger_ms(LINGER_MS),
        );
        assert_eq!(out, "eperm", "{}: denied", case.hook);
        let pid = read_pid(&pid_file);
        let peer = case.peer.ip().to_string();
        let r = exactly_one(
            &h,
            &ztd,
            &["--verdict", "deny", "--peer", &peer],
            case.hook,
            |r| r.peer_addr == case.peer.ip() && r.peer_port == case.peer.port(),
        );
        assert_common(&r, "deny", case.hook, gen, since);
        assert_caller(&r, &h, pid, case.uid, case.gid);
        assert_eq!(r.proto, case.proto, "{r:#?}");
        assert_eq!(r.family, case.family, "{r:#?}");
        assert_eq!(r.rule_id, case.rule_id, "{r:#?}");
        if case.rule_id == 0 {
            assert_eq!(r.rule, "default", "{r:#?}");
        } else {
            assert_eq!(r.rule, deny_location, "{r:#?}");
        }
    }
    // And the allowed calls made no deny event.
    let allowed: Vec<EventRecord> = h
        .events(&["--verdict", "deny"])
        .into_iter()
        .filter(|r| r.peer_port == open)
        .collect();
    assert!(allowed.is_empty(), "allowed calls reported: {allowed:#?}");
}

#[test]
fn bind_denials_are_one_event_each_naming_the_local_port() {
    let h = Harness::new(PROBE);
    let (granted, other) = (free_tcp_port(), free_tcp_port());
    h.write_policy(
        "p.toml",
        &format!(
            r#"version = 1
[[rule]]
action = "allow"
direction = "ingress"
peer = "any"
ports = [{granted}]
proto = "tcp"
"#
        ),
    );
    let ztd = h.start_ztd(&[]);
    let gen = generation(&h);
    let dir = tempfile::tempdir().expect("tempdir");
    let cg = h.cgroup.path.display().to_string();
    let bind = |addr: SocketAddr, uid: u32, pid_file: &Path| {
        let (addr, uid, pid_file) = (
            addr.to_string(),
            uid.to_string(),
            pid_file.display().to_string(),
        );
        h.probe_args(&[
            "bind",
            "--proto",
            "tcp",
            "--addr",
            &addr,
            "--cgroup",
            &cg,
            "--uid",
            &uid,
            "--pid-file",
            &pid_file,
            "--linger-ms",
            &LINGER_MS.to_string(),
        ])
    };
    assert_eq!(
        bind(lo4(granted), 41003, &dir.path().join("ok.pid")),
        "ok",
        "the granted port"
    );
    for (hook, addr, family) in [("bind4", lo4(other), 4u8), ("bind6", lo6(other), 6)] {
        let pid_file = dir.path().join(format!("{hook}.pid"));
        let since = zt::history::now_ns();
        assert_eq!(bind(addr, 41003, &pid_file), "eperm", "{hook}: ungranted");
        let pid = read_pid(&pid_file);
        let r = exactly_one(&h, &ztd, &["--verdict", "deny"], hook, |r| {
            r.local_port == other && r.hook == hook
        });
        assert_common(&r, "deny", hook, gen, since);
        assert_caller(&r, &h, pid, 41003, 0);
        assert_eq!((r.proto.as_str(), r.family), ("tcp", family), "{r:#?}");
        assert_eq!(r.local_addr, Some(addr.ip()), "the address bound: {r:#?}");
        assert_eq!(r.peer_port, 0, "a bind has no peer: {r:#?}");
        assert!(r.peer_addr.is_unspecified(), "a bind has no peer: {r:#?}");
        assert_eq!((r.rule_id, r.rule.as_str()), (0, "default"), "{r:#?}");
    }
    let all = h.events(&["--verdict", "deny"]);
    assert_eq!(
        all.iter().filter(|r| r.local_port == other).count(),
        2,
        "one event per denied bind: {all:#?}"
    );
    assert!(
        all.iter().all(|r| r.local_port != granted),
        "the granted bind was reported: {all:#?}"
    );
}

#[test]
fn a_refused_raw_socket_is_one_sock_create_event() {
    let h = Harness::new(PROBE);
    let net = NetPair::new();
    let x = net.x;
    h.write_policy(
        "p.toml",
        &format!(
            r#"version = 1
[identity.netadmin]
gid = 43001
raw = true

[[rule]]
action = "allow"
identity = "netadmin"
peer = "198.18.{x}.0/24"
proto = "icmp"
"#
        ),
    );
    let ztd = h.start_ztd(&[]);
    let gen = generation(&h);
    let dir = tempfile::tempdir().expect("tempdir");
    let (cg, ns) = (
        h.cgroup.path.display().to_string(),
        net.path_a().display().to_string(),
    );
    let socket = |gid: u32, pid_file: &Path| {
        let (gid, pid_file) = (gid.to_string(), pid_file.display().to_string());
        h.probe_args(&[
            "socket",
            "--kind",
            "raw",
            "--cgroup",
            &cg,
            "--gid",
            &gid,
            "--netns",
            &ns,
            "--pid-file",
            &pid_file,
            "--linger-ms",
            &LINGER_MS.to_string(),
        ])
    };
    assert_eq!(
        socket(43001, &dir.path().join("ok.pid")),
        "ok",
        "raw = true"
    );
    let pid_file = dir.path().join("no.pid");
    let since = zt::history::now_ns();
    assert_eq!(socket(43002, &pid_file), "eperm", "no raw grant");
    let pid = read_pid(&pid_file);
    let r = exactly_one(&h, &ztd, &["--verdict", "deny"], "sock_create", |r| {
        r.hook == "sock_create" && r.gid == 43002
    });
    assert_common(&r, "deny", "sock_create", gen, since);
    assert_caller(&r, &h, pid, 0, 43002);
    assert_eq!((r.proto.as_str(), r.family), ("icmp", 4), "{r:#?}");
    assert_eq!((r.peer_port, r.local_port), (0, 0), "{r:#?}");
    assert_eq!((r.rule_id, r.rule.as_str()), (0, "default"), "{r:#?}");
    let granted: Vec<EventRecord> = h
        .events(&[])
        .into_iter()
        .filter(|r| r.hook == "sock_create" && r.gid == 43001)
        .collect();
    assert!(
        granted.is_empty(),
        "the granted socket was reported: {granted:#?}"
    );
}

#[test]
fn a_backstop_drop_is_one_skb_egress_event() {
    let h = Harness::new(PROBE);
    let srv = Server::loopback(&h.probe, 2);
    let (open, closed) = (srv.ports[0], srv.ports[1]);
    // Connected before any program is attached: only the egress backstop can see them.
    let mut allowed = Held::connect(&h.probe, &h.cgroup.path, lo4(open));
    let mut forbidden = Held::connect(&h.probe, &h.cgroup.path, lo4(closed));
    h.write_policy(
        "p.toml",
        &format!(
            r#"version = 1
[[rule]]
action = "allow"
peer = "127.0.0.1"
ports = [{open}]
proto = "udp"
"#
        ),
    );
    let ztd = h.start_ztd(&[]);
    let gen = generation(&h);
    assert_eq!(allowed.send(), "ok", "the allowed peer");
    let since = zt::history::now_ns();
    assert_eq!(forbidden.send(), "eperm", "the backstop drops it");
    let r = exactly_one(
        &h,
        &ztd,
        &["--verdict", "deny", "--peer", "127.0.0.1"],
        "skb_egress",
        |r| r.peer_port == closed,
    );
    assert_common(&r, "deny", "skb_egress", gen, since);
    assert_eq!(r.peer_addr, ip("127.0.0.1"), "{r:#?}");
    assert_eq!((r.proto.as_str(), r.family), ("udp", 4), "{r:#?}");
    assert_eq!((r.rule_id, r.rule.as_str()), (0, "default"), "{r:#?}");
    assert_eq!(r.uid, 0, "judged by the socket's uid: {r:#?}");
    assert_ne!(r.local_port, 0, "the held socket's port: {r:#?}");
    let other: Vec<EventRecord> = h
        .events(&["--verdict", "deny"])
        .into_iter()
        .filter(|r| r.peer_port == open)
        .collect();
    assert!(
        other.is_empty(),
        "the allowed send was reported: {other:#?}"
    );
}

#[test]
fn a_block_list_drop_is_one_skb_ingress_event() {
    let h = Harness::new(PROBE);
    let net = NetPair::new();
    let _srv = Server::start(&h.probe, &["0.0.0.0"], &[8050], Some(&net.path_b()));
    let x = net.x;
    let text = format!(
        r#"version = 1
[[rule]]
action = "allow"
peer = "any"

[[rule]]
action = "deny"
direction = "ingress"
identity = "any"
peer = "198.18.{x}.2"
"#
    );
    let path = h.write_policy("p.toml", &text);
    let ztd = h.start_ztd(&[]);
    let gen = generation(&h);
    let location = rule_location(&h, 2);
    assert_eq!(
        location,
        format!("{}:{}:1", path.display(), line_no(&text, "[[rule]]", 2))
    );
    // UDP: one request, one reply, sent from the address the route picks (198.18.x.2 on
    // the first network, 198.19.x.2 on the other).
    let call = |which: &str| {
        h.probe_call(
            Call::new("udp", net.b_addr(which, 8050))
                .cgroup(&h.cgroup.path)
                .netns(&net.path_a()),
        )
    };
    assert_eq!(
        call("other-net"),
        "ok",
        "replies from an unlisted host arrive"
    );
    let since = zt::history::now_ns();
    assert_eq!(
        call("main"),
        "timeout",
        "the reply from the blocked host is dropped"
    );
    let blocked = format!("198.18.{x}.2");
    let r = exactly_one(
        &h,
        &ztd,
        &["--verdict", "deny", "--peer", &blocked],
        "skb_ingress",
        |r| r.peer_port == 8050,
    );
    assert_common(&r, "deny", "skb_ingress", gen, since);
    assert_eq!(r.peer_addr, ip(&blocked), "the remote: {r:#?}");
    assert_eq!(r.peer_port, 8050, "the remote's port: {r:#?}");
    assert_ne!(r.local_port, 0, "the client's (ephemeral) port: {r:#?}");
    assert_eq!(
        r.local_addr,
        Some(ip(&format!("198.18.{x}.1"))),
        "the client's address: {r:#?}"
    );
    assert_eq!((r.proto.as_str(), r.family), ("udp", 4), "{r:#?}");
    assert_eq!(
        (r.rule_id, r.rule.as_str()),
        (2, location.as_str()),
        "{r:#?}"
    );
    let other = format!("198.19.{x}.2");
    let unlisted = h.events(&["--peer", &other]);
    assert!(
        unlisted.iter().all(|r| r.verdict != "deny"),
        "the unlisted host was reported: {unlisted:#?}"
    );
}

// -------------------------------------------------------------------------------------------
// 2. Audit: allowed, reported as `audit`, never as `deny`.
// -------------------------------------------------------------------------------------------

#[test]
fn global_audit_mode_reports_audit_events_and_no_denials() {
    let h = Harness::new(PROBE);
    let srv = Server::loopback(&h.probe, 1);
    let port = srv.ports[0];
    h.write_policy("p.toml", "version = 1\n");
    let ztd = h.start_ztd(&["--mode", "audit"]);
    let since = zt::history::now_ns();
    assert_eq!(h.call("tcp", lo4(port)), "ok", "audit mode lets it through");
    let r = exactly_one(
        &h,
        &ztd,
        &["--verdict", "audit", "--peer", "127.0.0.1"],
        "audit connect4",
        |r| r.peer_port == port && r.hook == "connect4",
    );
    assert_common(&r, "audit", "connect4", generation(&h), since);
    assert_eq!((r.rule_id, r.rule.as_str()), (0, "default"), "{r:#?}");
    let denied = h.events(&["--verdict", "deny"]);
    assert!(denied.is_empty(), "audit mode denied nothing: {denied:#?}");
}

#[test]
fn an_audit_file_reports_audit_events_while_enforce_files_deny() {
    let h = Harness::new(PROBE);
    let srv = Server::loopback(&h.probe, 2);
    let (a, b) = (srv.ports[0], srv.ports[1]);
    let audit_text = format!(
        r#"version = 1
mode = "audit"
[[rule]]
action = "deny"
peer = "127.0.0.1"
ports = [{a}]
"#
    );
    let audit_path = h.write_policy("a-audit.toml", &audit_text);
    h.write_policy(
        "b-enforce.toml",
        &format!(
            r#"version = 1
[[rule]]
action = "allow"
peer = "127.0.0.1"
ports = [{a}]
"#
        ),
    );
    let ztd = h.start_ztd(&[]);
    let gen = generation(&h);
    let since = zt::history::now_ns();
    assert_eq!(
        h.call("tcp", lo4(a)),
        "ok",
        "the audit-file deny is not enforced"
    );
    // (The connection's first packet is judged again by skb_egress, and audited again:
    // one event per hook.)
    let r = exactly_one(&h, &ztd, &["--peer", "127.0.0.1"], "audit", |r| {
        r.peer_port == a && r.hook == "connect4"
    });
    assert_common(&r, "audit", "connect4", gen, since);
    assert_eq!(r.rule_id, 1, "the audit file's deny rule: {r:#?}");
    assert_eq!(
        r.rule,
        format!("{}:3:1", audit_path.display()),
        "rule location: {r:#?}"
    );
    // Positive control: enforcement (and its deny events) still on for the rest.
    assert_eq!(
        h.call("tcp", lo4(b)),
        "eperm",
        "default deny still enforced"
    );
    let d = exactly_one(&h, &ztd, &["--verdict", "deny"], "deny", |r| {
        r.peer_port == b
    });
    assert_eq!(d.verdict, "deny");
    let wrong: Vec<EventRecord> = h
        .events(&["--verdict", "deny"])
        .into_iter()
        .filter(|r| r.peer_port == a)
        .collect();
    assert!(
        wrong.is_empty(),
        "the audited call was reported as denied: {wrong:#?}"
    );
}

// -------------------------------------------------------------------------------------------
// 3. Allowed decisions are reported when the rule says `log = true` (or with --log-allowed).
// -------------------------------------------------------------------------------------------

#[test]
fn log_true_reports_the_allows_of_that_rule_only() {
    let h = Harness::new(PROBE);
    let srv = Server::loopback(&h.probe, 3);
    let (logged, quiet, barrier) = (srv.ports[0], srv.ports[1], srv.ports[2]);
    let text = format!(
        r#"version = 1
[[rule]]
action = "allow"
peer = "127.0.0.1"
ports = [{logged}]
proto = "tcp"
log = true

[[rule]]
action = "allow"
peer = "127.0.0.1"
ports = [{quiet}]
proto = "tcp"
"#
    );
    let path = h.write_policy("p.toml", &text);
    let ztd = h.start_ztd(&[]);
    let gen = generation(&h);
    let since = zt::history::now_ns();
    assert_eq!(h.call("tcp", lo4(logged)), "ok");
    let r = exactly_one(&h, &ztd, &["--verdict", "allow"], "the logged allow", |r| {
        r.peer_port == logged && r.hook == "connect4"
    });
    assert_common(&r, "allow", "connect4", gen, since);
    assert_eq!(r.rule_id, 1, "{r:#?}");
    assert_eq!(r.rule, format!("{}:2:1", path.display()), "{r:#?}");

    assert_eq!(h.call("tcp", lo4(quiet)), "ok", "allowed, not logged");
    assert_eq!(h.call("tcp", lo4(barrier)), "eperm", "the barrier");
    none_before_barrier(
        &h,
        "an allow of a rule without log",
        |r| r.peer_port == quiet,
        |r| r.verdict == "deny" && r.peer_port == barrier,
    );
}

#[test]
fn log_allowed_reports_every_allow() {
    let h = Harness::new(PROBE);
    let srv = Server::loopback(&h.probe, 1);
    let port = srv.ports[0];
    h.write_policy(
        "p.toml",
        &format!(
            r#"version = 1
[[rule]]
action = "allow"
peer = "127.0.0.1"
ports = [{port}]
proto = "tcp"
"#
        ),
    );
    let ztd = h.start_ztd(&["--log-allowed"]);
    assert_eq!(h.call("tcp", lo4(port)), "ok");
    let r = exactly_one(
        &h,
        &ztd,
        &["--verdict", "allow"],
        "allow with --log-allowed",
        |r| r.peer_port == port && r.hook == "connect4",
    );
    assert_eq!(r.rule_id, 1, "{r:#?}");
}

// -------------------------------------------------------------------------------------------
// 4. Filters.
// -------------------------------------------------------------------------------------------

fn seqs(records: &[EventRecord]) -> Vec<u64> {
    records.iter().map(|r| r.seq).collect()
}

#[test]
fn events_filters_select_by_verdict_uid_exe_peer_and_age() {
    let h = Harness::new(PROBE);
    let srv = Server::loopback(&h.probe, 4);
    let (open, closed, aud, fresh) = (srv.ports[0], srv.ports[1], srv.ports[2], srv.ports[3]);
    h.write_policy(
        "a.toml",
        &format!(
            r#"version = 1
[identity.svc]
uid = 41001

[[rule]]
action = "allow"
identity = "svc"
peer = "127.0.0.1"
ports = [{open}]
proto = "tcp"
log = true
"#
        ),
    );
    h.write_policy(
        "b-audit.toml",
        &format!(
            r#"version = 1
mode = "audit"
[[rule]]
action = "deny"
peer = "127.0.0.1"
ports = [{aud}]
proto = "tcp"
"#
        ),
    );
    let ztd = h.start_ztd(&[]);
    let copy_dir = tempfile::tempdir().expect("tempdir");
    let copy = copy_dir.path().join("zt-probe-copy");
    std::fs::copy(&h.probe, &copy).expect("copy probe");
    let call = |c: Call| h.probe_call(c.cgroup(&h.cgroup.path).linger_ms(300));
    assert_eq!(
        call(Call::new("tcp", lo4(open)).uid(41001)),
        "ok",
        "E1 allow (logged)"
    );
    assert_eq!(
        call(Call::new("tcp", lo4(closed)).uid(41001)),
        "eperm",
        "E2"
    );
    assert_eq!(call(Call::new("tcp", lo4(closed))), "eperm", "E3 (root)");
    assert_eq!(call(Call::new("tcp", lo4(aud))), "ok", "E4 audit");
    assert_eq!(call(Call::new("tcp", lo6(closed))), "eperm", "E5 (IPv6)");
    assert_eq!(
        call(Call::new("tcp", lo4(closed)).exe(&copy)),
        "eperm",
        "E6 (copy)"
    );
    // Wait until all six are in.
    let all = h.wait_events(&[], 6, WAIT, |r| {
        r.hook == "connect4" || r.hook == "connect6"
    });
    assert!(all.len() >= 6, "{all:#?}\n{}", dump(&ztd));
    let all = h.events(&[]);
    let find = |what: &str, f: &dyn Fn(&EventRecord) -> bool| -> u64 {
        let found: Vec<&EventRecord> = all.iter().filter(|r| f(r)).collect();
        assert_eq!(found.len(), 1, "{what}: {found:#?}");
        found[0].seq
    };
    let probe = probe_path().display().to_string();
    let e1 = find("E1", &|r| {
        r.verdict == "allow" && r.hook == "connect4" && r.peer_port == open
    });
    let e2 = find("E2", &|r| {
        r.verdict == "deny" && r.uid == 41001 && r.peer_port == closed
    });
    let e3 = find("E3", &|r| {
        r.verdict == "deny"
            && r.uid == 0
            && r.hook == "connect4"
            && r.peer_port == closed
            && r.exe.as_deref() == Some(probe.as_str())
    });
    let e4 = find("E4", &|r| {
        r.verdict == "audit" && r.hook == "connect4" && r.peer_port == aud
    });
    let e5 = find("E5", &|r| r.verdict == "deny" && r.hook == "connect6");
    let e6 = find("E6", &|r| {
        r.verdict == "deny" && r.exe.as_deref() == Some(copy.to_str().expect("utf-8"))
    });

    // Each filter returns exactly the records its predicate keeps, oldest first.
    let check = |args: &[&str], keep: &dyn Fn(&EventRecord) -> bool, has: &[u64], not: &[u64]| {
        let want: Vec<u64> = seqs(&all.iter().filter(|r| keep(r)).cloned().collect::<Vec<_>>());
        let got = seqs(&h.events(args));
        assert_eq!(got, want, "ztctl events --json {}", args.join(" "));
        for s in has {
            assert!(got.contains(s), "{args:?} should hold #{s}: {got:?}");
        }
        for s in not {
            assert!(!got.contains(s), "{args:?} should not hold #{s}: {got:?}");
        }
        let mut sorted = got.clone();
        sorted.sort_unstable();
        assert_eq!(got, sorted, "oldest first");
    };
    check(
        &["--verdict", "deny"],
        &|r| r.verdict == "deny",
        &[e2, e3, e5, e6],
        &[e1, e4],
    );
    check(
        &["--verdict", "audit"],
        &|r| r.verdict == "audit",
        &[e4],
        &[e1, e2, e3, e5, e6],
    );
    check(
        &["--verdict", "allow"],
        &|r| r.verdict == "allow",
        &[e1],
        &[e2, e3, e4, e5, e6],
    );
    check(
        &["--uid", "41001"],
        &|r| r.uid == 41001,
        &[e1, e2],
        &[e3, e4, e5, e6],
    );
    check(
        &["--verdict", "deny", "--uid", "41001"],
        &|r| r.verdict == "deny" && r.uid == 41001,
        &[e2],
        &[e1, e3, e4, e5, e6],
    );
    check(
        &["--exe", &probe],
        &|r| r.exe.as_deref() == Some(probe.as_str()),
        &[e1, e2, e3, e4, e5],
        &[e6],
    );
    check(
        &["--exe", copy.to_str().expect("utf-8")],
        &|r| r.seq == e6,
        &[e6],
        &[e1, e2, e3, e4, e5],
    );
    check(&["--exe", "zt-probe-copy"], &|r| r.seq == e6, &[e6], &[e3]);
    check(
        &["--peer", "127.0.0.1/32"],
        &|r| r.peer_addr == ip("127.0.0.1"),
        &[e1, e2, e3, e4, e6],
        &[e5],
    );
    check(
        &["--peer", "::ffff:127.0.0.0/104"],
        &|r| r.peer_addr == ip("127.0.0.1"),
        &[e1, e2, e3, e4, e6],
        &[e5],
    );
    check(
        &["--peer", "::1"],
        &|r| r.peer_addr == ip("::1"),
        &[e5],
        &[e1, e2, e3, e4, e6],
    );
    check(
        &["--peer", "10.0.0.0/8"],
        &|_| false,
        &[],
        &[e1, e2, e3, e4, e5, e6],
    );

    // Age: everything so far is older than the window after this sleep.
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(call(Call::new("tcp", lo4(fresh))), "eperm", "E7 (fresh)");
    let e7 = h.wait_events(&[], 1, WAIT, |r| r.peer_port == fresh);
    assert_eq!(e7.len(), 1, "{e7:#?}");
    let e7 = e7[0].seq;
    let recent = seqs(&h.events(&["--since", "2s"]));
    assert!(
        recent.contains(&e7),
        "--since 2s holds the fresh event: {recent:?}"
    );
    for old in [e1, e2, e3, e4, e5, e6] {
        assert!(
            !recent.contains(&old),
            "--since 2s excludes #{old}: {recent:?}"
        );
    }
    let hour = seqs(&h.events(&["--since", "1h"]));
    for s in [e1, e2, e3, e4, e5, e6, e7] {
        assert!(hour.contains(&s), "--since 1h holds #{s}: {hour:?}");
    }

    // Bad filters are refused, with the value named.
    for (args, bad) in [
        (&["--verdict", "drop"][..], "drop"),
        (&["--since", "soon"][..], "soon"),
        (&["--peer", "10.0.0.0/33"][..], "10.0.0.0/33"),
    ] {
        let mut all_args = vec!["events", "--json"];
        all_args.extend_from_slice(args);
        let out = h.ztctl(&all_args);
        assert!(!out.status.success(), "{args:?} refused");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(bad), "{args:?}: {err}");
    }
}

// -------------------------------------------------------------------------------------------
// 5. --follow.
// -------------------------------------------------------------------------------------------

#[test]
fn follow_prints_the_history_then_new_events_as_they_happen() {
    let h = Harness::new(PROBE);
    let srv = Server::loopback(&h.probe, 3);
    let (open, before, after) = (srv.ports[0], srv.ports[1], srv.ports[2]);
    h.write_policy(
        "p.toml",
        &format!(
            r#"version = 1
[[rule]]
action = "allow"
peer = "127.0.0.1"
ports = [{open}]
proto = "tcp"
"#
        ),
    );
    let ztd = h.start_ztd(&[]);
    assert_eq!(h.call("tcp", lo4(before)), "eperm");
    let old = h.wait_events(&[], 1, WAIT, |r| r.peer_port == before);
    assert_eq!(old.len(), 1, "{}", dump(&ztd));

    let mut follow = h.follow_events(&["--verdict", "deny"]);
    let first = follow
        .wait_record(WAIT, |r| r.peer_port == before)
        .unwrap_or_else(|| {
            panic!(
                "the history was not printed first: {:?} {:?}",
                follow.lines(),
                follow.stderr()
            )
        });
    assert_eq!(first.seq, old[0].seq);

    assert_eq!(
        h.call("tcp", lo4(open)),
        "ok",
        "positive control: not a denial"
    );
    let start = Instant::now();
    assert_eq!(h.call("tcp", lo4(after)), "eperm");
    let live = follow
        .wait_record(WAIT, |r| r.peer_port == after)
        .unwrap_or_else(|| {
            panic!(
                "the new denial did not arrive within {WAIT:?}: {:?} {:?}\n{}",
                follow.lines(),
                follow.stderr(),
                dump(&ztd)
            )
        });
    eprintln!("live event after {:?}", start.elapsed());
    assert_eq!(live.verdict, "deny");
    assert!(live.seq > first.seq, "{live:#?}");
    let records = follow.records();
    assert!(
        records.iter().all(|r| r.verdict == "deny"),
        "the filter applies to the live tail too: {records:#?}"
    );
    assert!(records.iter().all(|r| r.peer_port != open), "{records:#?}");
    let order: Vec<u16> = records.iter().map(|r| r.peer_port).collect();
    assert_eq!(
        order,
        vec![before, after],
        "history, then live, no duplicate"
    );
    assert!(follow.try_exit().is_none(), "--follow keeps running");
}

// -------------------------------------------------------------------------------------------
// 6. A flood: every denial accounted for, memory bounded.
// -------------------------------------------------------------------------------------------

/// A field of `status.events`, or a panic naming the missing field.
fn ev(st: &serde_json::Value, key: &str) -> u64 {
    st["events"][key]
        .as_u64()
        .unwrap_or_else(|| panic!("status --json has no events.{key}: {st}"))
}

/// Poll status until the ring buffer is drained (everything produced was read or lost).
fn drained_status(h: &Harness, timeout: Duration) -> serde_json::Value {
    let end = Instant::now() + timeout;
    loop {
        let st = h.status_json();
        let (produced, delivered, lost_kernel, lost_daemon) = (
            ev(&st, "produced"),
            ev(&st, "delivered"),
            ev(&st, "lost_kernel"),
            ev(&st, "lost_daemon"),
        );
        if delivered + lost_daemon + lost_kernel == produced {
            return st;
        }
        assert!(
            Instant::now() < end,
            "the ring buffer was not drained after {timeout:?}: {}",
            st["events"]
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn a_flood_of_denials_is_fully_accounted_for_in_bounded_memory() {
    const N: u64 = 100_000;
    const SPREAD: u16 = 1000;
    const BASE: u16 = 20_000;
    let h = Harness::new(PROBE);
    h.write_policy(
        "p.toml",
        r#"version = 1
[[rule]]
action = "allow"
peer = "127.0.0.2"
proto = "udp"
"#,
    );
    let ztd = h.start_ztd(&["--history", "5000"]);
    let pid = ztd.pid().expect("ztd pid");
    // Positive control: the same connects where allowed.
    assert_eq!(
        h.flood("udp", SocketAddr::from(([127, 0, 0, 2], BASE)), 1000, 10),
        (0, 1000, 0)
    );
    let before = drained_status(&h, Duration::from_secs(20));
    let rss_before = vm_rss_kib(pid);

    let start = Instant::now();
    let (eperm, ok, other) = h.flood("udp", lo4(BASE), N, SPREAD);
    let took = start.elapsed();
    assert_eq!((eperm, ok, other), (N, 0, 0), "every connect denied");

    let st = drained_status(&h, Duration::from_secs(20));
    let rss_after = vm_rss_kib(pid);
    eprintln!(
        "flood took {took:?}; events {}; rss {rss_before} -> {rss_after} KiB",
        st["events"]
    );
    let (produced, delivered, lost_kernel, lost_daemon, suppressed) = (
        ev(&st, "produced"),
        ev(&st, "delivered"),
        ev(&st, "lost_kernel"),
        ev(&st, "lost_daemon"),
        ev(&st, "suppressed"),
    );
    assert_eq!(
        produced,
        delivered + lost_kernel + lost_daemon,
        "produced == delivered + lost_kernel + lost_daemon: {}",
        st["events"]
    );
    let accounted = (produced + suppressed) - (ev(&before, "produced") + ev(&before, "suppressed"));
    assert!(
        accounted >= N,
        "every denial is an event or counted as suppressed: {accounted} < {N}: {}",
        st["events"]
    );
    assert_eq!(
        accounted, N,
        "nothing else was denied in this window: {}",
        st["events"]
    );
    let denied = st["decisions"]["denied"].as_u64().expect("denied")
        - before["decisions"]["denied"].as_u64().expect("denied");
    assert_eq!(denied, N, "the kernel counted every denial");
    // The rate limit: 16 events per second per (exe, uid, hook, verdict, peer, port).
    let windows = took.as_secs() + 2;
    assert!(
        produced - ev(&before, "produced") <= u64::from(SPREAD) * 16 * windows,
        "at most 16 events per second per flow: {}",
        st["events"]
    );
    assert!(suppressed > 0, "100 per flow in {took:?} exceeds the limit");

    // The history is bounded.
    let (history, capacity) = (ev(&st, "history"), ev(&st, "history_capacity"));
    assert_eq!(capacity, 5000, "--history 5000");
    assert!(history <= capacity, "{}", st["events"]);
    assert_eq!(history, delivered.min(capacity), "{}", st["events"]);
    let kept = h.events(&[]);
    assert_eq!(
        kept.len() as u64,
        history,
        "ztctl events prints the history"
    );
    assert!(
        kept.iter().all(|r| r.verdict == "deny"
            && r.peer_addr == ip("127.0.0.1")
            && (BASE..BASE + SPREAD).contains(&r.peer_port)),
        "only the flood's denials"
    );
    let ring = ev(&st, "ring_size_bytes");
    assert_eq!(ring, u64::from(zt_common::EVENT_RING_BYTES));
    assert!(ev(&st, "ring_fill_bytes") <= ring);

    assert!(
        rss_after < rss_before + 64 * 1024,
        "ztd's memory grew from {rss_before} KiB to {rss_after} KiB"
    );
}

#[test]
fn rate_limited_events_carry_the_suppressed_count() {
    let h = Harness::new(PROBE);
    h.write_policy(
        "p.toml",
        r#"version = 1
[[rule]]
action = "allow"
peer = "127.0.0.2"
proto = "udp"
"#,
    );
    let ztd = h.start_ztd(&[]);
    let port = 23_456;
    assert_eq!(
        h.flood("udp", SocketAddr::from(([127, 0, 0, 2], port)), 100, 1),
        (0, 100, 0),
        "positive control"
    );
    let before = h.status_json();
    // 100 denials of one flow within a second: 16 events, 84 suppressed.
    let start = Instant::now();
    assert_eq!(h.flood("udp", lo4(port), 100, 1), (100, 0, 0));
    assert!(
        start.elapsed() < Duration::from_millis(900),
        "the burst fits in one window"
    );
    let burst = h.wait_events(&["--verdict", "deny"], 16, WAIT, |r| r.peer_port == port);
    assert_eq!(
        burst.len(),
        16,
        "16 events in the first second: {}",
        dump(&ztd)
    );
    assert!(burst.iter().all(|r| r.suppressed == 0), "{burst:#?}");
    // The next event of that flow, a window later, carries the count.
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(h.flood("udp", lo4(port), 1, 1), (1, 0, 0));
    let all = h.wait_events(&["--verdict", "deny"], 17, WAIT, |r| r.peer_port == port);
    assert_eq!(all.len(), 17, "{all:#?}");
    std::thread::sleep(Duration::from_millis(500));
    let all: Vec<EventRecord> = h
        .events(&["--verdict", "deny"])
        .into_iter()
        .filter(|r| r.peer_port == port)
        .collect();
    assert_eq!(all.len(), 17, "16 + 1 events, no more: {all:#?}");
    assert_eq!(all[16].suppressed, 84, "{:#?}", all[16]);
    let after = h.status_json();
    assert_eq!(ev(&after, "suppressed") - ev(&before, "suppressed"), 84);
}

// -------------------------------------------------------------------------------------------
// 7. ztctl top, and status' top_denied.
// -------------------------------------------------------------------------------------------

#[test]
fn top_shows_the_busiest_rule_and_status_the_top_denied_flows() {
    let h = Harness::new(PROBE);
    let text = r#"version = 1
[[rule]]
action = "allow"
peer = "127.0.0.2"
proto = "udp"

[[rule]]
action = "allow"
peer = "127.0.0.3"
proto = "udp"
"#;
    h.write_policy("p.toml", text);
    let ztd = h.start_ztd(&[]);
    let (busy_port, other_port) = (40_000, 40_001);
    assert_eq!(
        h.flood("udp", SocketAddr::from(([127, 0, 0, 2], 30_000)), 2000, 10),
        (0, 2000, 0)
    );
    assert_eq!(
        h.flood("udp", SocketAddr::from(([127, 0, 0, 3], 30_000)), 5, 1),
        (0, 5, 0)
    );
    // Below the rate limit, so every one is an event.
    let linger = LINGER_MS.to_string();
    assert_eq!(
        h.flood_with("udp", lo4(busy_port), 10, 1, &["--linger-ms", &linger]),
        (10, 0, 0)
    );
    assert_eq!(
        h.flood_with("udp", lo4(other_port), 3, 1, &["--linger-ms", &linger]),
        (3, 0, 0)
    );
    let got = h.wait_events(&["--verdict", "deny"], 13, WAIT, |_| true);
    assert_eq!(got.len(), 13, "{}", dump(&ztd));

    let st = h.status_json();
    let top = st["top_denied"]
        .as_array()
        .unwrap_or_else(|| panic!("status --json has no top_denied: {st}"));
    let probe = probe_path().display().to_string();
    let entry = |i: usize| {
        (
            top[i]["identity"].as_str().unwrap_or("?").to_string(),
            top[i]["peer"].as_str().unwrap_or("?").to_string(),
            top[i]["count"].as_u64().unwrap_or(0),
        )
    };
    assert!(top.len() >= 2, "{top:?}");
    assert_eq!(
        entry(0),
        (probe.clone(), format!("127.0.0.1:{busy_port}/udp"), 10),
        "{top:?}"
    );
    assert_eq!(
        entry(1),
        (probe, format!("127.0.0.1:{other_port}/udp"), 3),
        "{top:?}"
    );

    let busiest = rule_location(&h, 1);
    let mut cmd = std::process::Command::new(zt_integration::bin("ztctl"));
    cmd.arg("--socket")
        .arg(&h.socket)
        .args(["top", "--iterations", "2", "--interval", "1"]);
    let start = Instant::now();
    let out = output_within(cmd, Duration::from_secs(20)).expect("ztctl top exits by itself");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "ztctl top: {}\n{stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        start.elapsed() >= Duration::from_millis(900),
        "two frames one second apart"
    );
    assert!(
        stdout.matches(busiest.as_str()).count() >= 2,
        "each of the two frames shows the busiest rule {busiest}:\n{stdout}"
    );
    let busiest_at = stdout.find(busiest.as_str()).unwrap_or(usize::MAX);
    let quieter = rule_location(&h, 2);
    if let Some(q) = stdout.find(quieter.as_str()) {
        assert!(busiest_at < q, "the busiest rule comes first:\n{stdout}");
    }
    assert!(
        stdout.contains(&format!("127.0.0.1:{busy_port}")),
        "the top denied flow:\n{stdout}"
    );
}

// -------------------------------------------------------------------------------------------
// 8. /metrics.
// -------------------------------------------------------------------------------------------

fn scrape(addr: SocketAddr) -> prometheus_parse::Scrape {
    let (code, body) = http_get(addr, "/metrics").expect("GET /metrics");
    assert_eq!(code, 200, "{body}");
    prometheus_parse::Scrape::parse(body.lines().map(|l| Ok(l.to_string())))
        .unwrap_or_else(|e| panic!("not Prometheus text ({e}):\n{body}"))
}

fn value(s: &prometheus_parse::Sample) -> f64 {
    match s.value {
        prometheus_parse::Value::Counter(v)
        | prometheus_parse::Value::Gauge(v)
        | prometheus_parse::Value::Untyped(v) => v,
        ref other => panic!("{}: unexpected {other:?}", s.metric),
    }
}

/// Sum of the samples of `metric` whose labels include every `(name, value)` of `labels`.
fn sum(scrape: &prometheus_parse::Scrape, metric: &str, labels: &[(&str, &str)]) -> Option<u64> {
    let matching: Vec<f64> = scrape
        .samples
        .iter()
        .filter(|s| s.metric == metric && labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v)))
        .map(value)
        .collect();
    (!matching.is_empty()).then(|| matching.iter().sum::<f64>() as u64)
}

#[test]
fn metrics_agree_with_status() {
    let h = Harness::new(PROBE);
    let srv = Server::loopback(&h.probe, 3);
    let (open, closed, aud) = (srv.ports[0], srv.ports[1], srv.ports[2]);
    let policy = |port: u16| {
        format!(
            r#"version = 1
[[rule]]
action = "allow"
peer = "127.0.0.1"
ports = [{port}]
proto = "tcp"
"#
        )
    };
    h.write_policy("a.toml", &policy(open));
    h.write_policy(
        "b-audit.toml",
        &format!(
            r#"version = 1
mode = "audit"
[[rule]]
action = "deny"
peer = "127.0.0.1"
ports = [{aud}]
proto = "tcp"
"#
        ),
    );
    let port = free_tcp_port();
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let listen = addr.to_string();
    let ztd = h.start_ztd(&["--metrics", &listen]);
    for _ in 0..3 {
        assert_eq!(h.call("tcp", lo4(open)), "ok");
    }
    assert_eq!(h.call("tcp", lo4(closed)), "eperm");
    assert_eq!(h.call("tcp", lo4(closed)), "eperm");
    assert_eq!(h.call("tcp", lo4(aud)), "ok", "audited");
    let got = h.wait_events(&[], 3, WAIT, |r| {
        r.verdict != "allow" && r.hook == "connect4"
    });
    assert_eq!(got.len(), 3, "{}", dump(&ztd));

    // Status, metrics, status: retried until nothing moved in between.
    let (st, m) = (0..10)
        .find_map(|_| {
            let a = h.status_json();
            let m = scrape(addr);
            let b = h.status_json();
            (a["decisions"] == b["decisions"] && a["counters"] == b["counters"]).then_some((b, m))
        })
        .expect("the counters settle");
    let d = &st["decisions"];
    for (verdict, field) in [
        ("allow", "allowed"),
        ("deny", "denied"),
        ("audit", "audited"),
    ] {
        assert_eq!(
            sum(&m, "zt_decisions_total", &[("verdict", verdict)]),
            d[field].as_u64(),
            "zt_decisions_total{{verdict={verdict}}} vs status decisions.{field}"
        );
    }
    assert_eq!(
        sum(
            &m,
            "zt_decisions_total",
            &[("verdict", "deny"), ("hook", "connect4")]
        ),
        Some(2),
        "two denied connect4"
    );
    assert_eq!(
        sum(&m, "zt_policy_generation", &[]),
        st["generation"].as_u64()
    );
    assert_eq!(sum(&m, "zt_healthy", &[]), Some(1));
    assert_eq!(sum(&m, "zt_last_reload_success", &[]), Some(1));
    for c in st["counters"].as_array().expect("counters") {
        let id = c["id"].as_u64().expect("id").to_string();
        assert_eq!(
            sum(&m, "zt_rule_hits_total", &[("rule_id", &id)]),
            c["hits"].as_u64(),
            "rule {id}: {c}"
        );
    }
    let hits = |id: &str| sum(&m, "zt_rule_hits_total", &[("rule_id", id)]).unwrap_or(0);
    assert!(hits("1") >= 3, "the allow rule was hit");
    assert!(hits("0") >= 2, "the default deny was hit");
    // The event accounting, drained.
    let st = drained_status(&h, Duration::from_secs(20));
    let m = scrape(addr);
    let stage =
        |metric: &str, stage: &str| sum(&m, metric, &[("stage", stage)]).unwrap_or(u64::MAX);
    assert_eq!(
        stage("zt_events_total", "produced"),
        stage("zt_events_total", "delivered")
            + stage("zt_events_lost_total", "kernel")
            + stage("zt_events_lost_total", "daemon"),
    );
    assert_eq!(stage("zt_events_total", "produced"), ev(&st, "produced"));
    assert_eq!(stage("zt_events_total", "delivered"), ev(&st, "delivered"));
    assert!(sum(&m, "zt_ring_buffer_fill_bytes", &[]).is_some());

    // A reload moves the generation in both.
    h.write_policy("a.toml", &policy(closed));
    let out = h.ztctl(&["reload"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let m = scrape(addr);
    assert_eq!(sum(&m, "zt_policy_generation", &[]), Some(2));
    assert_eq!(generation(&h), 2);
    assert_eq!(
        h.call("tcp", lo4(closed)),
        "ok",
        "the new policy is in force"
    );

    let (code, _) = http_get(addr, "/elsewhere").expect("GET");
    assert_eq!(code, 404);
}

// -------------------------------------------------------------------------------------------
// 9. --log-format json.
// -------------------------------------------------------------------------------------------

/// Every line is a JSON object with string `time` (RFC 3339 UTC), `level` and `msg`.
fn assert_json_lines(lines: &[String]) -> Vec<serde_json::Map<String, serde_json::Value>> {
    assert!(!lines.is_empty(), "ztd printed nothing");
    lines
        .iter()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap_or_else(|e| {
                panic!("not a JSON line ({e}): {l}\nall:\n{}", lines.join("\n"))
            });
            let o = v
                .as_object()
                .unwrap_or_else(|| panic!("not a JSON object: {l}"))
                .clone();
            for key in ["time", "level", "msg"] {
                assert!(
                    o.get(key).is_some_and(|x| x.is_string()),
                    "no string {key:?}: {l}"
                );
            }
            let time = o["time"].as_str().unwrap_or("");
            assert!(
                time.len() >= 20 && time.ends_with('Z') && time.as_bytes().get(10) == Some(&b'T'),
                "time is RFC 3339 UTC: {l}"
            );
            o
        })
        .collect()
}

/// Is this log object the event of a `verdict` connect4 to 127.0.0.1:`port`? Event lines
/// carry the record's fields under their contract names (the record's own `time` cannot
/// share the line's `time` key: `log_line` renames it `field.time`).
fn is_event_line(o: &serde_json::Map<String, serde_json::Value>, verdict: &str, port: u16) -> bool {
    let s = |k: &str| o.get(k).and_then(|v| v.as_str());
    s("hook") == Some("connect4")
        && s("verdict") == Some(verdict)
        && s("peer_addr") == Some("127.0.0.1")
        && o.get("peer_port").and_then(|v| v.as_u64()) == Some(u64::from(port))
}

#[test]
fn json_log_format_makes_every_line_a_json_object() {
    let h = Harness::new(PROBE);
    let srv = Server::loopback(&h.probe, 2);
    let (open, closed) = (srv.ports[0], srv.ports[1]);
    h.write_policy(
        "p.toml",
        &format!(
            r#"version = 1
[[rule]]
action = "allow"
peer = "127.0.0.1"
ports = [{open}]
proto = "tcp"
"#
        ),
    );
    // Control: in the default text format the event line is not JSON.
    {
        let ztd = h.start_ztd(&[]);
        assert_eq!(h.call("tcp", lo4(closed)), "eperm");
        let line = ztd
            .wait_line(&["deny", "connect4", &format!("127.0.0.1:{closed}")], WAIT)
            .unwrap_or_else(|| panic!("no event line:\n{}", dump(&ztd)));
        assert!(
            serde_json::from_str::<serde_json::Value>(&line).is_err(),
            "{line}"
        );
    }
    let mut ztd = h.start_ztd(&["--log-format", "json", "--log-allowed"]);
    assert_eq!(h.call("tcp", lo4(open)), "ok");
    assert_eq!(h.call("tcp", lo4(closed)), "eperm");
    let out = h.ztctl(&["reload"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Wait for the event line, then stop ztd so its last lines are in.
    let end = Instant::now() + WAIT;
    while Instant::now() < end
        && !ztd
            .lines()
            .iter()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter_map(|v| v.as_object().cloned())
            .any(|o| is_event_line(&o, "deny", closed))
    {
        std::thread::sleep(Duration::from_millis(100));
    }
    let status = ztd.terminate().expect("ztd exit status");
    assert!(status.success(), "{status}");
    std::thread::sleep(Duration::from_millis(200));
    let lines = ztd.lines();
    let objects = assert_json_lines(&lines);
    let event = objects
        .iter()
        .find(|o| is_event_line(o, "deny", closed))
        .unwrap_or_else(|| panic!("the deny event is a JSON line:\n{}", lines.join("\n")));
    let missing: Vec<&str> = zt::history::EVENT_RECORD_FIELDS
        .iter()
        .copied()
        .filter(|f| *f != "time" && !event.contains_key(*f))
        .collect();
    assert!(
        missing.is_empty(),
        "the event line lacks {missing:?}: {event:?}"
    );
    assert!(
        objects.iter().any(|o| is_event_line(o, "allow", open)),
        "--log-allowed: the allowed call is a JSON line too:\n{}",
        lines.join("\n")
    );
}

#[test]
fn json_log_format_covers_a_refused_policy() {
    let h = Harness::new(PROBE);
    h.write_policy(
        "bad.toml",
        "version = 1\n[[rule]]\naction = \"allow\"\npeer = \"10.0.0.0/33\"\n",
    );
    let mut ztd = h.spawn_ztd(&["--log-format", "json"]);
    let status = ztd.wait_exit(Duration::from_secs(30)).expect("ztd exits");
    assert!(!status.success(), "an invalid policy is refused");
    std::thread::sleep(Duration::from_millis(200));
    let lines = ztd.lines();
    let objects = assert_json_lines(&lines);
    assert!(
        objects.iter().any(|o| o
            .values()
            .any(|v| v.as_str().is_some_and(|s| s.contains("bad.toml:4:")))),
        "the diagnostic (path:line:column) is in a JSON line:\n{}",
        lines.join("\n")
    );
}
