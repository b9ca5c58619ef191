//! The BPF LSM `socket_create` hook, a stronger hook where the kernel offers one. Where it is
//! attached (a kernel with BPF LSM, e.g. Debian's 6.1 under `cargo xtask vm-test`, which sets
//! `ZT_EXPECT_LSM=1`): an `AF_PACKET` socket from a guarded process without `raw = true` is
//! refused with EPERM and reported, while the same call succeeds for a granted identity and
//! outside the guarded cgroup. Where the kernel refuses it (this development host's 6.18):
//! `ztctl status` says so, the daemon is healthy and the cgroup hooks still judge sockets.
//! With `ZT_EXPECT_LSM=1` the unavailable branch fails: the VM suite cannot pass silently.

use std::{
    path::Path,
    time::{Duration, Instant},
};

use zt_integration::{patience, Harness};

const PROBE: &str = env!("CARGO_BIN_EXE_zt-probe");
/// How long an event may take from the kernel to `ztctl events`.
const WAIT: Duration = Duration::from_secs(5);
const GRANTED_GID: u32 = 43101;
const PLAIN_GID: u32 = 43102;
/// `AF_PACKET`, as the event's `family` carries it.
const AF_PACKET: u8 = 17;

fn policy() -> String {
    format!(
        r#"version = 1
[identity.sniffer]
gid = {GRANTED_GID}
raw = true

[[rule]]
action = "allow"
identity = "sniffer"
peer = "127.0.0.1/32"
proto = "icmp"
"#
    )
}

/// `zt-probe socket --kind KIND` with primary group `gid`, in `cgroup` (or, with `None`, in
/// the test's own cgroup, outside the guarded one).
fn socket(h: &Harness, kind: &str, gid: u32, cgroup: Option<&Path>) -> String {
    let gid = gid.to_string();
    let cg = cgroup.map(|c| c.display().to_string());
    let mut args = vec!["socket", "--kind", kind, "--gid", &gid];
    if let Some(cg) = &cg {
        args.extend(["--cgroup", cg.as_str()]);
    }
    h.probe_args(&args)
}

fn expect_lsm() -> bool {
    std::env::var("ZT_EXPECT_LSM").is_ok_and(|v| v == "1")
}

#[test]
fn packet_sockets_need_raw_where_the_lsm_hook_is_attached() {
    let h = Harness::new(PROBE);
    h.write_policy("p.toml", &policy());
    let mut ztd = h.start_ztd(&[]);
    let st = ztd.status();
    let cg = h.cgroup.path.clone();
    if st.lsm != "socket_create attached" {
        eprintln!("lsm: {}", st.lsm);
        assert!(
            !expect_lsm(),
            "ZT_EXPECT_LSM=1 but the LSM hook is not attached: lsm = {:?}\nztd output:\n{}",
            st.lsm,
            ztd.lines().join("\n")
        );
        // Reported, never silent, and not a degradation: the baseline runs whole.
        assert!(
            st.lsm.starts_with("unavailable (") && st.lsm.ends_with(')'),
            "status must say why the LSM hook is unavailable: {:?}",
            st.lsm
        );
        assert!(
            st.healthy && st.degraded.is_empty() && st.problems.is_empty(),
            "healthy without the LSM hook: {st:#?}"
        );
        assert!(
            ztd.lines().iter().any(|l| l.contains("lsm: unavailable (")),
            "the start-up line names the LSM hook's absence: {:#?}",
            ztd.lines()
        );
        let human = h.ztctl(&["status"]);
        let human = String::from_utf8_lossy(&human.stdout);
        assert!(
            human.contains("lsm         unavailable ("),
            "ztctl status: {human}"
        );
        // Everything else works: the cgroup hook still refuses a raw inet socket without
        // the grant and lets the granted identity have one.
        assert_eq!(socket(&h, "raw", PLAIN_GID, Some(&cg)), "eperm", "no grant");
        assert_eq!(
            socket(&h, "raw", GRANTED_GID, Some(&cg)),
            "ok",
            "raw = true"
        );
        // And what the LSM hook would add is honestly absent: AF_PACKET is not judged here.
        assert_eq!(
            socket(&h, "packet", PLAIN_GID, Some(&cg)),
            "ok",
            "without BPF LSM an AF_PACKET socket is not judged"
        );
        return;
    }
    assert!(st.healthy, "{st:#?}");
    let human = h.ztctl(&["status"]);
    let human = String::from_utf8_lossy(&human.stdout);
    assert!(
        human.contains("lsm         socket_create attached"),
        "ztctl status: {human}"
    );
    // Positive controls first: outside the guarded cgroup (the hook is global, its scope is
    // not), and a guarded identity with `raw = true`.
    assert_eq!(
        socket(&h, "packet", PLAIN_GID, None),
        "ok",
        "outside the guarded cgroup"
    );
    assert_eq!(
        socket(&h, "packet", GRANTED_GID, Some(&cg)),
        "ok",
        "raw = true"
    );
    assert_eq!(
        socket(&h, "packet", PLAIN_GID, Some(&cg)),
        "eperm",
        "a guarded process without raw = true"
    );
    let keep = |r: &zt::history::EventRecord| r.hook == "lsm_socket_create" && r.gid == PLAIN_GID;
    let got = h.wait_events(&["--verdict", "deny"], 1, WAIT, keep);
    assert!(
        !got.is_empty(),
        "no lsm_socket_create deny event; all events: {:#?}",
        h.events(&[])
    );
    assert_eq!(got[0].family, AF_PACKET, "{:#?}", got[0]);
    assert_eq!(got[0].rule, "default", "{:#?}", got[0]);
    let granted: Vec<_> = h
        .events(&[])
        .into_iter()
        .filter(|r| r.hook == "lsm_socket_create" && r.gid != PLAIN_GID)
        .collect();
    assert!(granted.is_empty(), "allowed sockets reported: {granted:#?}");
    let st = ztd.status();
    assert!(st.decisions.family_denied >= 1, "{:#?}", st.decisions);
    // The LSM link is pinned with the others, and `ztctl unload` detaches it too.
    assert!(
        h.pins.path.join("links/lsm_socket_create").exists(),
        "the LSM link is pinned"
    );
    ztd.kill9();
    assert_eq!(
        socket(&h, "packet", PLAIN_GID, Some(&cg)),
        "eperm",
        "still refused after kill -9 (pinned)"
    );
    let pins = h.pins.path.display().to_string();
    let out = h.ztctl(&["unload", "--bpffs", &pins]);
    assert!(
        out.status.success(),
        "unload: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The last reference goes after an RCU grace period: poll.
    let deadline = Instant::now() + patience(Duration::from_secs(10));
    let mut last = socket(&h, "packet", PLAIN_GID, Some(&cg));
    while last != "ok" && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
        last = socket(&h, "packet", PLAIN_GID, Some(&cg));
    }
    assert_eq!(last, "ok", "unload detached the LSM hook");
}
