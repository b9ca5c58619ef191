//! The daemon's lifecycle, part 2 (issue 5), against the real kernel: tampering is found
//! and repaired, policy file changes reload by themselves, `ztctl apply` rolls back unless
//! confirmed, and a restart with the same policy keeps its generation.

use std::{net::SocketAddr, os::fd::AsFd, path::Path, time::Duration};

use zt_integration::{free_tcp_port, http_get, Call, Harness, NetPair, Server, Ztd};

const PROBE: &str = env!("CARGO_BIN_EXE_zt-probe");

fn lo4(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

fn allow_text(port: u16) -> String {
    format!(
        r#"version = 1
[[rule]]
action = "allow"
peer = "127.0.0.1"
ports = [{port}]
proto = "tcp"
"#
    )
}

fn stderr(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stderr).to_string()
}

/// `open` is allowed and `closed` denied, with real calls from the guarded cgroup.
fn assert_enforced(h: &Harness, open: u16, closed: u16, what: &str) {
    assert_eq!(h.call("tcp", lo4(open)), "ok", "{what}: allowed call");
    assert_eq!(h.call("tcp", lo4(closed)), "eperm", "{what}: denied call");
}

/// Wait until ztd reports healthy again after a repair, and exactly one program per hook
/// is attached (an unpinned link is released by the kernel asynchronously).
fn wait_repaired(h: &Harness, ztd: &Ztd) {
    let st = ztd.wait_status(Duration::from_secs(10), |s| s.healthy && s.repairs >= 1);
    assert!(
        st.healthy && st.repairs >= 1 && st.problems.is_empty(),
        "repaired: {st:?}\n{}",
        ztd.lines().join("\n")
    );
    assert!(!st.last_repair.is_empty(), "{st:?}");
    let end = std::time::Instant::now() + Duration::from_secs(5);
    while h.attached_programs().iter().any(|ids| ids.len() != 1) {
        assert!(
            std::time::Instant::now() < end,
            "one program per hook after the repair: {:?}",
            h.attached_programs()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(
        ztd.wait_line(&["ztd: repaired:"], Duration::from_secs(2))
            .is_some(),
        "ztd logs the repair: {:?}",
        ztd.lines()
    );
}

#[test]
fn an_unpinned_link_is_reported_and_reattached_and_enforces_again() {
    let h = Harness::new(PROBE);
    let srv = Server::loopback(&h.probe, 2);
    let (open, closed) = (srv.ports[0], srv.ports[1]);
    h.write_policy("p.toml", &allow_text(open));
    let ztd = h.start_ztd(&[]);
    assert_enforced(&h, open, closed, "at start");
    assert!(ztd.status().healthy);

    std::fs::remove_file(h.pins.path.join("links/connect4")).expect("unpin");
    let st = ztd.status();
    assert!(!st.healthy, "unhealthy right after the tamper: {st:?}");
    assert!(
        st.problems.iter().any(|p| p.contains("connect4")),
        "the reason names the hook: {:?}",
        st.problems
    );
    assert!(
        ztd.wait_line(&["ztd: tamper:", "connect4"], Duration::from_secs(5))
            .is_some(),
        "ztd logs the tamper: {:?}",
        ztd.lines()
    );
    wait_repaired(&h, &ztd);
    assert!(h.pins.path.join("links/connect4").exists(), "re-pinned");
    assert_enforced(&h, open, closed, "after the repair");
}

#[test]
fn a_detached_link_is_reported_and_reattached_and_enforces_again() {
    let h = Harness::new(PROBE);
    let srv = Server::loopback(&h.probe, 2);
    let (open, closed) = (srv.ports[0], srv.ports[1]);
    h.write_policy("p.toml", &allow_text(open));
    let ztd = h.start_ztd(&[]);
    assert_enforced(&h, open, closed, "at start");

    // BPF_LINK_DETACH through the pinned link: the pin stays, the link is detached.
    let link = zt::sys::obj_get(&h.pins.path.join("links/connect4")).expect("open link pin");
    zt::sys::link_detach(link.as_fd()).expect("BPF_LINK_DETACH");
    drop(link);
    let st = ztd.status();
    assert!(!st.healthy, "unhealthy right after the detach: {st:?}");
    assert!(
        st.problems
            .iter()
            .any(|p| p.contains("connect4") && p.contains("not attached")),
        "{:?}",
        st.problems
    );
    wait_repaired(&h, &ztd);
    assert_enforced(&h, open, closed, "after the repair");
}

#[test]
fn a_removed_map_pin_is_repinned() {
    let h = Harness::new(PROBE);
    let srv = Server::loopback(&h.probe, 2);
    let (open, closed) = (srv.ports[0], srv.ports[1]);
    h.write_policy("p.toml", &allow_text(open));
    let ztd = h.start_ztd(&["--check-interval", "500ms"]);
    let pin = h.pins.path.join("maps/DECISION_0");
    assert!(pin.exists());
    std::fs::remove_file(&pin).expect("unpin map");
    let st = ztd.status();
    assert!(
        !st.healthy && st.problems.iter().any(|p| p.contains("DECISION_0")),
        "{st:?}"
    );
    let st = ztd.wait_status(Duration::from_secs(10), |s| s.healthy && s.repairs >= 1);
    assert!(st.healthy, "{st:?}");
    assert!(pin.exists(), "the map is pinned again");
    assert!(st.last_repair.contains("DECISION_0"), "{st:?}");
    assert_enforced(&h, open, closed, "after the re-pin");
}

#[test]
fn with_check_interval_zero_problems_are_reported_but_not_repaired() {
    let h = Harness::new(PROBE);
    h.write_policy("p.toml", &allow_text(9));
    let metrics = lo4(free_tcp_port());
    let listen = metrics.to_string();
    let ztd = h.start_ztd(&["--check-interval", "0s", "--metrics", &listen]);
    let (_, body) = http_get(metrics, "/metrics").expect("GET /metrics");
    assert!(body.lines().any(|l| l.trim() == "zt_healthy 1"), "{body}");
    std::fs::remove_file(h.pins.path.join("maps/PORTS_1")).expect("unpin map");
    std::thread::sleep(Duration::from_secs(3));
    let st = ztd.status();
    assert!(!st.healthy && st.repairs == 0, "{st:?}");
    let (code, body) = http_get(metrics, "/metrics").expect("GET /metrics");
    assert_eq!(code, 200);
    assert!(
        body.lines().any(|l| l.trim() == "zt_healthy 0"),
        "the gauge drops: {body}"
    );
    let out = h.ztctl(&["status"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("PORTS_1"),
        "the text status says why"
    );
}

#[test]
fn policy_file_changes_reload_by_themselves() {
    let h = Harness::new(PROBE);
    let srv = Server::loopback(&h.probe, 2);
    let (a, b) = (srv.ports[0], srv.ports[1]);
    let path = h.write_policy("p.toml", &allow_text(a));
    let ztd = h.start_ztd(&[]);
    assert_enforced(&h, a, b, "at start");
    assert_eq!(ztd.status().generation, 1);

    // In place.
    std::fs::write(&path, allow_text(b)).expect("edit in place");
    let st = ztd.wait_status(Duration::from_secs(3), |s| s.generation == 2);
    assert_eq!(st.generation, 2, "an in-place edit applies: {st:?}");
    assert!(st.last_reload.ok);
    assert_enforced(&h, b, a, "after the in-place edit");

    // Write-then-rename (editors, config management): the temporary file is ignored.
    let tmp = h.policy_dir.path().join(".p.toml.swp");
    std::fs::write(&tmp, allow_text(a)).expect("write tmp");
    std::fs::rename(&tmp, &path).expect("rename");
    let st = ztd.wait_status(Duration::from_secs(3), |s| s.generation == 3);
    assert_eq!(st.generation, 3, "write-then-rename applies: {st:?}");
    assert_enforced(&h, a, b, "after write-then-rename");

    // Invalid: refused, the last good generation stays enforced.
    std::fs::write(&path, "version = 1\n[[rule]]\naction = \"maybe\"\n").expect("write bad");
    let st = ztd.wait_status(Duration::from_secs(3), |s| !s.last_reload.ok);
    assert!(!st.last_reload.ok, "the invalid edit is refused: {st:?}");
    assert_eq!(st.generation, 3, "generation unchanged");
    assert_enforced(&h, a, b, "after the invalid edit");
    assert!(
        ztd.wait_line(&[&format!("{}:3:", path.display())], Duration::from_secs(2))
            .is_some(),
        "the error is logged with its location: {:?}",
        ztd.lines()
    );

    // A new file in the directory is part of the policy too.
    std::fs::write(&path, allow_text(a)).expect("fix");
    h.write_policy("q.toml", &allow_text(b));
    let st = ztd.wait_status(Duration::from_secs(3), |s| s.generation == 4);
    assert_eq!(st.generation, 4, "{st:?}");
    assert_eq!(h.call("tcp", lo4(a)), "ok");
    assert_eq!(h.call("tcp", lo4(b)), "ok");
}

fn other_policy(dir: &Path, port: u16) -> std::path::PathBuf {
    let path = dir.join("new.toml");
    std::fs::write(&path, allow_text(port)).expect("write");
    path
}

#[test]
fn an_unconfirmed_apply_is_rolled_back() {
    let h = Harness::new(PROBE);
    let srv = Server::loopback(&h.probe, 2);
    let (a, b) = (srv.ports[0], srv.ports[1]);
    h.write_policy("p.toml", &allow_text(a));
    let ztd = h.start_ztd(&[]);
    assert_enforced(&h, a, b, "at start");
    let dir = tempfile::tempdir().expect("tempdir");
    let new = other_policy(dir.path(), b);

    let out = h.ztctl(&[
        "apply",
        &new.display().to_string(),
        "--confirm-within",
        "3s",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let st = ztd.status();
    assert_eq!(st.generation, 2);
    let pending = st.pending_apply.expect("a pending apply");
    assert_eq!(pending.path, new);
    assert_eq!(pending.generation, 2);
    assert_enforced(&h, b, a, "the applied policy is in force");

    let st = ztd.wait_status(Duration::from_secs(8), |s| s.pending_apply.is_none());
    assert!(st.pending_apply.is_none(), "{st:?}");
    assert_eq!(st.generation, 3, "rolled back as a new generation");
    assert_enforced(&h, a, b, "rolled back");
    assert!(
        ztd.wait_line(&["rolled back"], Duration::from_secs(2))
            .is_some(),
        "{:?}",
        ztd.lines()
    );
    let out = h.ztctl(&["confirm"]);
    assert_eq!(out.status.code(), Some(1), "nothing left to confirm");
}

#[test]
fn a_confirmed_apply_stays_and_becomes_the_policy_path() {
    let h = Harness::new(PROBE);
    let srv = Server::loopback(&h.probe, 3);
    let (a, b, c) = (srv.ports[0], srv.ports[1], srv.ports[2]);
    h.write_policy("p.toml", &allow_text(a));
    let ztd = h.start_ztd(&[]);
    let dir = tempfile::tempdir().expect("tempdir");
    let new = other_policy(dir.path(), b);

    let out = h.ztctl(&[
        "apply",
        &new.display().to_string(),
        "--confirm-within",
        "3s",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let out = h.ztctl(&["confirm"]);
    assert!(out.status.success(), "{}", stderr(&out));
    std::thread::sleep(Duration::from_secs(4));
    let st = ztd.status();
    assert!(st.pending_apply.is_none());
    assert_eq!(st.generation, 2, "not rolled back");
    assert_eq!(st.policy, vec![new.clone()]);
    assert_enforced(&h, b, a, "confirmed");

    // The confirmed path is the one reloads (and the file watch) read now.
    std::fs::write(&new, allow_text(c)).expect("edit");
    let st = ztd.wait_status(Duration::from_secs(3), |s| s.generation == 3);
    assert_eq!(st.generation, 3, "{st:?}");
    assert_enforced(&h, c, b, "the confirmed file's edit applied");
}

#[test]
fn an_invalid_apply_changes_nothing() {
    let h = Harness::new(PROBE);
    let srv = Server::loopback(&h.probe, 2);
    let (a, b) = (srv.ports[0], srv.ports[1]);
    h.write_policy("p.toml", &allow_text(a));
    let ztd = h.start_ztd(&[]);
    let dir = tempfile::tempdir().expect("tempdir");
    let bad = dir.path().join("bad.toml");
    std::fs::write(
        &bad,
        "version = 1\n[[rule]]\naction = \"allow\"\npeer = \"10.0.0.0/33\"\n",
    )
    .expect("write");
    let out = h.ztctl(&["apply", &bad.display().to_string()]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains(&format!("{}:4:", bad.display())),
        "{}",
        stderr(&out)
    );
    let st = ztd.status();
    assert_eq!(st.generation, 1);
    assert!(st.pending_apply.is_none());
    assert_enforced(&h, a, b, "unchanged");
}

#[test]
fn a_restart_with_a_changed_policy_writes_the_next_generation() {
    let h = Harness::new(PROBE);
    let srv = Server::loopback(&h.probe, 2);
    let (a, b) = (srv.ports[0], srv.ports[1]);
    h.write_policy("p.toml", &allow_text(a));
    let mut ztd = h.start_ztd(&[]);
    assert_eq!(ztd.status().generation, 1);
    ztd.kill9();
    h.write_policy("p.toml", &allow_text(b));
    let ztd = h.start_ztd(&[]);
    let st = ztd.status();
    assert!(st.healthy, "{st:?}");
    assert_eq!(st.generation, 2, "a changed policy is the next generation");
    assert_enforced(&h, b, a, "the new policy");
    drop(ztd);

    // And the same policy again: generation kept, programs replaced in place.
    let before = h.attached_programs();
    let ztd = h.start_ztd(&[]);
    let st = ztd.status();
    assert_eq!(st.generation, 2, "the same policy keeps its generation");
    let after = h.attached_programs();
    assert!(after.iter().all(|ids| ids.len() == 1), "{after:?}");
    assert_ne!(after, before, "programs replaced in place");
    assert_enforced(&h, b, a, "kept");
}

#[test]
fn a_detached_or_unpinned_xdp_front_door_is_reattached() {
    let h = Harness::new(PROBE);
    let net = NetPair::new();
    h.write_policy(
        "p.toml",
        "version = 1\n[[rule]]\naction = \"allow\"\ndirection = \"ingress\"\npeer = \"any\"\nports = [8080]\n",
    );
    let _srv = Server::start(&h.probe, &["0.0.0.0"], &[8080, 8081], Some(&net.path_b()));
    let from_a =
        |port| h.probe_call(Call::new("tcp", net.b_addr("main", port)).netns(&net.path_a()));
    let iface = net.veth_b();
    let ztd = h.start_ztd_in_netns(
        &net.path_b(),
        &["--xdp", &iface, "--check-interval", "500ms"],
    );
    let pin = h.pins.path.join(format!("links/xdp-{iface}"));
    assert!(ztd.status().xdp[0].attached);
    assert_eq!(
        from_a(8081),
        "timeout",
        "the front door drops a closed port"
    );

    // BPF_LINK_DETACH through the pin.
    let before = ztd.status().repairs;
    let link = zt::sys::obj_get(&pin).expect("open xdp link pin");
    zt::sys::link_detach(link.as_fd()).expect("BPF_LINK_DETACH");
    drop(link);
    // Seen as a problem, or (the check runs every 500 ms) already repaired.
    let st = ztd.status();
    assert!(
        (!st.healthy && st.problems.iter().any(|p| p.contains("xdp")))
            || (st.repairs > before && st.last_repair.contains("xdp")),
        "{st:?}"
    );
    let st = ztd.wait_status(Duration::from_secs(10), |s| {
        s.healthy && s.repairs > before && s.last_repair.contains("xdp")
    });
    assert!(st.healthy && st.xdp[0].attached, "{st:?}");

    // Unpinned (the kernel releases the link asynchronously; the repair retries).
    std::fs::remove_file(&pin).expect("unpin");
    let st = ztd.wait_status(Duration::from_secs(10), |s| {
        s.healthy && s.repairs >= before + 2
    });
    assert!(st.healthy && st.xdp[0].attached, "{st:?}");
    assert!(pin.exists());
    assert_eq!(from_a(8080), "ok", "positive control after the repairs");
    assert_eq!(from_a(8081), "timeout", "dropped again after the repairs");
}
