//! Learning mode against the real kernel: programs of a test cgroup (the probe and a copy of
//! it, as root and as another user) reach servers in a network namespace while `ztd` runs in
//! audit mode; the flow store survives a restart of `ztd`; `ztctl suggest` (with `ztd` down)
//! writes a policy that passes `ztctl check`; enforced, it lets every recorded flow through
//! (the positive controls) and denies new ones, with their deny events; `ztctl diff` names
//! the flows two policies disagree on.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use zt::flows::{self, Flow, FlowKind};
use zt_integration::{Call, Harness, NetPair, Server, Ztd};

const PROBE: &str = env!("CARGO_BIN_EXE_zt-probe");
const WAIT: Duration = Duration::from_secs(10);
const OTHER_UID: u32 = 41007;

/// The probe as the kernel knows it: symlinks resolved.
fn probe_path() -> PathBuf {
    std::fs::canonicalize(PROBE).expect("canonical probe path")
}

/// One recorded (or new) flow: which program, as whom, to where.
#[derive(Clone, Debug)]
struct Case {
    exe: PathBuf,
    uid: u32,
    proto: &'static str,
    addr: SocketAddr,
}

impl Case {
    fn run(&self, h: &Harness, net: &NetPair) -> String {
        let mut call = Call::new(self.proto, self.addr)
            .cgroup(&h.cgroup.path)
            .netns(&net.path_a())
            .exe(&self.exe)
            .linger_ms(300);
        if self.uid != 0 {
            call = call.uid(self.uid);
        }
        h.probe_call(call)
    }

    fn matches(&self, f: &Flow) -> bool {
        f.key.kind == FlowKind::Egress
            && f.key.exe.as_deref() == self.exe.to_str()
            && f.key.uid == self.uid
            && f.key.proto == self.proto
            && f.key.peer == self.addr.ip()
            && f.key.port == self.addr.port()
    }
}

/// Wait until the store holds a flow for every case (ztd flushes on its interval).
fn wait_store(dir: &Path, cases: &[&Case], ztd: &Ztd) -> Vec<Flow> {
    let end = Instant::now() + WAIT;
    loop {
        let flows = flows::read(dir).map(|s| s.flows).unwrap_or_default();
        if cases.iter().all(|c| flows.iter().any(|f| c.matches(f))) {
            return flows;
        }
        assert!(
            Instant::now() < end,
            "the store lacks flows of {cases:#?}: {flows:#?}\nztd output:\n{}",
            ztd.lines().join("\n")
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn ztctl_ok(h: &Harness, args: &[&str]) -> String {
    let out = h.ztctl(args);
    assert!(
        out.status.success(),
        "ztctl {}: {}\nstdout: {}\nstderr: {}",
        args.join(" "),
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn a_suggested_policy_allows_every_recorded_flow_and_denies_new_ones() {
    let h = Harness::new(PROBE);
    let net = NetPair::new();
    let srv = Server::start(&h.probe, &["0.0.0.0", "::"], &[0, 0], Some(&net.path_b()));
    let (p1, p2) = (srv.ports[0], srv.ports[1]);
    let copy_dir = tempfile::tempdir().expect("tempdir");
    let copy = copy_dir.path().join("zt-probe-copy");
    std::fs::copy(&h.probe, &copy).expect("copy probe");
    let probe = probe_path();
    let store = h.flows_dir();
    let case = |exe: &Path, uid, proto, which, port| Case {
        exe: exe.to_path_buf(),
        uid,
        proto,
        addr: net.b_addr(which, port),
    };
    // Before the restart: the probe as root, to two neighbours (one /31) and another net.
    let before = [
        case(&probe, 0, "tcp", "main", p1),
        case(&probe, 0, "tcp", "same-net", p1),
        case(&probe, 0, "udp", "other-net", p2),
    ];
    // After the restart: the copy as another user, over IPv6 and IPv4.
    let after = [
        case(&copy, OTHER_UID, "tcp", "v6", p1),
        case(&copy, OTHER_UID, "tcp", "main", p2),
    ];

    // 1. Record in audit mode, across a restart of ztd.
    h.write_policy("p.toml", "version = 1\n");
    let mut ztd = h.start_ztd(&["--mode", "audit"]);
    for c in &before {
        assert_eq!(c.run(&h, &net), "ok", "audit mode lets {c:?} through");
    }
    let audited = h.wait_events(&["--verdict", "audit"], before.len(), WAIT, |_| true);
    assert!(audited.len() >= before.len(), "{audited:#?}");
    assert!(ztd.terminate().is_some());
    let flows = wait_store(&store, &before.iter().collect::<Vec<_>>(), &ztd);
    for c in &before {
        let f = flows.iter().find(|f| c.matches(f)).expect("flow");
        assert_eq!(f.key.verdict, "audit", "{f:#?}");
        assert!(f.count >= 1, "{f:#?}");
        assert_eq!(
            f.key.cgroup.as_deref(),
            Some(format!("/{}", h.cgroup.rel).as_str()),
            "{f:#?}"
        );
        let (dev, ino) = zt_integration::exe_key(&c.exe);
        assert_eq!((f.key.exe_dev, f.key.exe_ino), (dev, ino), "{f:#?}");
    }

    let ztd = h.start_ztd(&["--mode", "audit", "--flows-flush-interval", "200ms"]);
    for c in &after {
        assert_eq!(c.run(&h, &net), "ok", "audit mode lets {c:?} through");
    }
    // Flushed while ztd runs, next to what the first run recorded.
    let all: Vec<&Case> = before.iter().chain(after.iter()).collect();
    let flows = wait_store(&store, &all, &ztd);
    let st = ztd.status().flows.expect("status reports the flow store");
    assert!(st.recording && st.dir == store && st.flushes >= 1, "{st:?}");
    let f = flows.iter().find(|f| after[0].matches(f)).expect("flow");
    assert_eq!(f.user, None, "uid {OTHER_UID} has no name here: {f:#?}");
    drop(ztd);

    // 2. Suggest, with ztd down, and check.
    let out_dir = tempfile::tempdir().expect("tempdir");
    let suggested = out_dir.path().join("suggested.toml");
    let store_arg = store.display().to_string();
    let suggested_arg = suggested.display().to_string();
    ztctl_ok(
        &h,
        &[
            "suggest",
            "--store",
            &store_arg,
            "--identity-by",
            "exe",
            "--since",
            "1h",
            "--out",
            &suggested_arg,
        ],
    );
    let text = std::fs::read_to_string(&suggested).expect("suggested policy");
    println!("{text}");
    let x = net.x;
    assert!(
        text.contains(&format!("peer = \"198.18.{x}.2/31\"")),
        "the two neighbours make a /31:\n{text}"
    );
    assert!(
        text.contains(&format!("exe = \"{}\"", probe.display()))
            && text.contains(&format!("exe = \"{}\"", copy.display())),
        "{text}"
    );
    assert!(text.contains(&format!("uid = {OTHER_UID}")), "{text}");
    assert!(text.contains("events (audit "), "{text}");
    let checked = ztctl_ok(&h, &["check", &suggested_arg]);
    assert!(checked.starts_with("ok:"), "{checked}");
    // By user and by unit (the test cgroup is no unit: the cgroup itself) too.
    for (by, expect) in [
        ("user", format!("uid = {OTHER_UID}")),
        ("unit", format!("cgroup = \"{}\"", h.cgroup.rel)),
    ] {
        let file = out_dir.path().join(format!("by-{by}.toml"));
        let file_arg = file.display().to_string();
        ztctl_ok(
            &h,
            &[
                "suggest",
                "--store",
                &store_arg,
                "--identity-by",
                by,
                "--out",
                &file_arg,
            ],
        );
        let text = std::fs::read_to_string(&file).expect("suggested policy");
        assert!(text.contains(&expect), "--identity-by {by}:\n{text}");
        assert!(!text.contains("exe = "), "--identity-by {by}:\n{text}");
        ztctl_ok(&h, &["check", &file_arg]);
    }
    // The same without ztd's store: a clear error, exit 1.
    let missing = h.ztctl(&["suggest", "--store", "/nonexistent/zt-flows"]);
    assert_eq!(missing.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&missing.stderr).contains("does not exist"));

    // 3. Enforce it: every recorded flow still works, new ones are denied.
    std::fs::remove_file(h.policy_dir.path().join("p.toml")).expect("remove policy");
    std::fs::copy(&suggested, h.policy_dir.path().join("suggested.toml")).expect("copy");
    let mut ztd = h.start_ztd(&["--mode", "enforce", "--flows-flush-interval", "200ms"]);
    for c in &all {
        assert_eq!(c.run(&h, &net), "ok", "recorded flow {c:?} is allowed");
    }
    let new = [
        // A peer the probe never reached on this port.
        case(&probe, 0, "tcp", "other-net", p1),
        // A recorded peer and port, but by the other program.
        case(&copy, OTHER_UID, "tcp", "same-net", p1),
        // The recorded program and peer, as another user.
        case(&probe, OTHER_UID, "tcp", "main", p1),
    ];
    for c in &new {
        assert_eq!(c.run(&h, &net), "eperm", "new flow {c:?} is denied");
    }
    let denied = h.wait_events(&["--verdict", "deny"], new.len(), WAIT, |_| true);
    for c in &new {
        assert!(
            denied.iter().any(|r| r.peer_addr == c.addr.ip()
                && r.peer_port == c.addr.port()
                && r.uid == c.uid
                && r.exe.as_deref() == c.exe.to_str()),
            "a deny event for {c:?}: {denied:#?}"
        );
    }
    assert_eq!(
        denied.len(),
        new.len(),
        "no replayed flow was denied: {denied:#?}"
    );
    assert!(ztd.terminate().is_some());

    // 4. diff: OLD (the suggestion) against NEW (the probe's tcp to the whole /24s on p1).
    let probe_s = probe.display().to_string();
    let new_policy = out_dir.path().join("new.toml");
    std::fs::write(
        &new_policy,
        format!(
            "version = 1\n[identity.probe]\nexe = {probe_s:?}\n[[rule]]\naction = \"allow\"\n\
             identity = \"probe\"\npeer = \"198.18.{x}.0/24\"\nports = [{p1}]\nproto = \"tcp\"\n\
             [[rule]]\naction = \"allow\"\nidentity = \"probe\"\npeer = \"198.19.{x}.0/24\"\n\
             ports = [{p1}]\nproto = \"tcp\"\n"
        ),
    )
    .expect("write new policy");
    let new_arg = new_policy.display().to_string();
    let out = h.ztctl(&[
        "diff",
        &suggested_arg,
        &new_arg,
        "--store",
        &store_arg,
        "--json",
    ]);
    assert_eq!(
        out.status.code(),
        Some(1),
        "differences: exit 1; stderr: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: serde_json::Value =
        serde_json::from_slice(&out.stdout).expect("diff --json is one JSON object");
    let pick = |list: &str| -> Vec<(String, u32, String, String, u16)> {
        let mut v: Vec<_> = report[list]
            .as_array()
            .expect("list")
            .iter()
            .map(|e| {
                (
                    e["exe"].as_str().unwrap_or("").to_string(),
                    e["uid"].as_u64().unwrap_or(0) as u32,
                    e["proto"].as_str().unwrap_or("").to_string(),
                    e["peer"].as_str().unwrap_or("").to_string(),
                    e["port"].as_u64().unwrap_or(0) as u16,
                )
            })
            .collect();
        v.sort();
        v
    };
    let expect = |cases: &[&Case]| {
        let mut v: Vec<_> = cases
            .iter()
            .map(|c| {
                (
                    c.exe.display().to_string(),
                    c.uid,
                    c.proto.to_string(),
                    c.addr.ip().to_string(),
                    c.addr.port(),
                )
            })
            .collect();
        v.sort();
        v
    };
    // The suggestion allows the udp flow and the copy's flows; NEW does not.
    assert_eq!(
        pick("allowed_by_old_only"),
        expect(&[&before[2], &after[0], &after[1]]),
        "{report:#}"
    );
    // NEW allows the probe's new peer (as root) and the probe as another user.
    assert_eq!(
        pick("allowed_by_new_only"),
        expect(&[&new[0], &new[2]]),
        "{report:#}"
    );
    // The same policy on both sides: no difference, exit 0.
    let same = h.ztctl(&[
        "diff",
        &suggested_arg,
        &suggested_arg,
        "--store",
        &store_arg,
    ]);
    assert_eq!(same.status.code(), Some(0));
    let text = String::from_utf8_lossy(&same.stdout);
    assert!(
        text.contains("allowed by OLD, denied by NEW: 0 flows"),
        "{text}"
    );
}

#[test]
fn a_suggested_policy_covers_a_guarded_server_and_its_clients() {
    let h = Harness::new(PROBE);
    let net = NetPair::new();
    let store = h.flows_dir();
    h.write_policy("p.toml", "version = 1\n");
    let mut ztd = h.start_ztd(&["--mode", "audit", "--flows-flush-interval", "200ms"]);
    // A server of the guarded cgroup on an explicit port, in the server namespace; clients
    // in the other namespace (not guarded).
    let port = 18080;
    let srv = Server::start_in(
        &h.probe,
        &["0.0.0.0"],
        &[port],
        Some(&net.path_b()),
        Some(&h.cgroup.path),
    );
    let from_a =
        |which: &str| h.probe_call(Call::new("tcp", net.b_addr(which, port)).netns(&net.path_a()));
    assert_eq!(from_a("main"), "ok", "audit mode lets the client in");
    let end = Instant::now() + WAIT;
    let flows = loop {
        let flows = flows::read(&store).map(|s| s.flows).unwrap_or_default();
        if flows.iter().any(|f| f.key.kind == FlowKind::Ingress)
            && flows.iter().any(|f| f.key.kind == FlowKind::Bind)
        {
            break flows;
        }
        assert!(
            Instant::now() < end,
            "no ingress and bind flows: {flows:#?}\n{}",
            ztd.lines().join("\n")
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(
        flows.iter().all(|f| f.key.kind != FlowKind::Egress),
        "a server's replies are no egress flows: {flows:#?}"
    );
    assert!(ztd.terminate().is_some());
    drop(srv);

    // Suggest (ztd down), check, enforce.
    let out_dir = tempfile::tempdir().expect("tempdir");
    let suggested = out_dir.path().join("server.toml");
    let (store_arg, suggested_arg) = (store.display().to_string(), suggested.display().to_string());
    ztctl_ok(
        &h,
        &["suggest", "--store", &store_arg, "--out", &suggested_arg],
    );
    let text = std::fs::read_to_string(&suggested).expect("suggested policy");
    println!("{text}");
    let x = net.x;
    assert!(text.contains("direction = \"ingress\""), "{text}");
    assert!(
        text.contains(&format!("peer = \"198.18.{x}.1\"")),
        "the client seen: {text}"
    );
    assert!(
        !text.contains("198.19."),
        "no client from the other network was seen: {text}"
    );
    ztctl_ok(&h, &["check", &suggested_arg]);
    std::fs::remove_file(h.policy_dir.path().join("p.toml")).expect("remove policy");
    std::fs::copy(&suggested, h.policy_dir.path().join("server.toml")).expect("copy");
    let _ztd = h.start_ztd(&["--mode", "enforce"]);
    // The server binds its ports again (the grants), and the recorded client gets in.
    let _srv = Server::start_in(
        &h.probe,
        &["0.0.0.0"],
        &[port],
        Some(&net.path_b()),
        Some(&h.cgroup.path),
    );
    assert_eq!(from_a("main"), "ok", "the recorded client is allowed");
    // A client from the other network never was: its SYN is dropped.
    assert_eq!(
        from_a("other-net"),
        "timeout",
        "an unrecorded client is dropped"
    );
    let denied = h.wait_events(&["--verdict", "deny"], 1, WAIT, |r| {
        r.hook == "skb_ingress" && r.local_port == port
    });
    assert!(
        denied
            .iter()
            .all(|r| r.peer_addr.to_string() == format!("198.19.{x}.1")),
        "{denied:#?}"
    );
    assert!(!denied.is_empty(), "a deny event for the unrecorded client");
    // And nothing the recorded flows did was denied.
    let all_denied = h.events(&["--verdict", "deny"]);
    assert!(
        all_denied
            .iter()
            .all(|r| r.peer_addr.to_string() == format!("198.19.{x}.1")),
        "{all_denied:#?}"
    );
}

/// Every event delivered (and every event the kernel's rate limit folded into one) is counted
/// in the store, in a few lines per flow, however many events there were.
#[test]
fn a_flood_is_counted_in_full_in_a_few_lines() {
    const N: u64 = 30_000;
    const SPREAD: u16 = 8;
    let h = Harness::new(PROBE);
    let srv = Server::loopback(&h.probe, 1);
    h.write_policy(
        "p.toml",
        &format!(
            "version = 1\n[[rule]]\naction = \"allow\"\npeer = \"127.0.0.1\"\nports = [{}]\nproto = \"udp\"\n",
            srv.ports[0]
        ),
    );
    let mut ztd = h.start_ztd(&["--flows-flush-interval", "500ms"]);
    // Positive control: allowed where the policy says so.
    let ok = h.flood_with(
        "udp",
        SocketAddr::from(([127, 0, 0, 1], srv.ports[0])),
        100,
        1,
        &[],
    );
    assert_eq!(ok, (0, 100, 0));
    let base = 30_000;
    let start = Instant::now();
    let (eperm, _, _) = h.flood_with(
        "udp",
        SocketAddr::from(([127, 0, 0, 2], base)),
        N,
        SPREAD,
        &["--linger-ms", "1500"],
    );
    assert_eq!(eperm, N, "every connect denied");
    // Drained: everything produced was read (or lost, and counted as such).
    let end = Instant::now() + WAIT;
    let st = loop {
        let st = ztd.status();
        let e = &st.events;
        if e.delivered + e.lost_kernel + e.lost_daemon == e.produced {
            break st;
        }
        assert!(Instant::now() < end, "not drained: {:?}", st.events);
        std::thread::sleep(Duration::from_millis(200));
    };
    let took = start.elapsed();
    assert_eq!(st.events.evicted, 0, "the history holds every event");
    let records = h.events(&["--verdict", "deny"]);
    let expected: u64 = records.iter().map(|r| 1 + u64::from(r.suppressed)).sum();
    assert!(ztd.terminate().is_some());
    let flows = flows::read(&h.flows_dir()).expect("store").flows;
    let denied: Vec<&Flow> = flows.iter().filter(|f| f.key.verdict == "deny").collect();
    let counted: u64 = denied.iter().map(|f| f.count).sum();
    assert_eq!(
        counted, expected,
        "the store counts every delivered event and what each stood for: {:?}",
        st.events
    );
    let ports: std::collections::BTreeSet<u16> = denied.iter().map(|f| f.key.port).collect();
    assert_eq!(ports.len(), usize::from(SPREAD), "{denied:#?}");
    let lines: usize = std::fs::read_dir(h.flows_dir())
        .expect("store dir")
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().ends_with(".jsonl"))
        .map(|e| {
            std::fs::read_to_string(e.path())
                .expect("read")
                .lines()
                .count()
        })
        .sum();
    let flushes = took.as_millis() as usize / 500 + 3;
    eprintln!(
        "{N} denials: {} delivered, {} suppressed, {} flows, {lines} lines on disk in {took:?}",
        st.events.delivered,
        st.events.suppressed,
        flows.len()
    );
    assert!(
        lines <= flows.len() * flushes,
        "{lines} lines for {} flows in {flushes} flushes",
        flows.len()
    );
}

/// A store that cannot be opened is reported by `status`; ztd guards all the same.
#[test]
fn a_store_that_cannot_be_opened_is_reported_and_enforcement_goes_on() {
    let h = Harness::new(PROBE);
    let srv = Server::loopback(&h.probe, 2);
    // A file where the store's directory should be.
    std::fs::write(h.flows_dir(), b"not a directory").expect("write");
    h.write_policy(
        "p.toml",
        &format!(
            "version = 1\n[[rule]]\naction = \"allow\"\npeer = \"127.0.0.1\"\nports = [{}]\nproto = \"tcp\"\n",
            srv.ports[0]
        ),
    );
    let ztd = h.start_ztd(&[]);
    let st = ztd.status().flows.expect("status reports the flow store");
    assert!(!st.recording, "{st:?}");
    assert!(
        st.error.contains(&h.flows_dir().display().to_string()),
        "{st:?}"
    );
    let text = String::from_utf8_lossy(&h.ztctl(&["status"]).stdout).into_owned();
    assert!(text.contains("flows       NOT recorded"), "{text}");
    let lo = |port: u16| SocketAddr::from(([127, 0, 0, 1], port));
    assert_eq!(h.call("tcp", lo(srv.ports[0])), "ok", "allowed");
    assert_eq!(h.call("tcp", lo(srv.ports[1])), "eperm", "denied");
    // --no-flows: nothing to report.
    drop(ztd);
    let ztd = h.start_ztd(&["--no-flows"]);
    assert!(ztd.status().flows.is_none());
}
