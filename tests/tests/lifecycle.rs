//! The daemon's lifecycle against the real kernel: enforcement outlives `ztd`, a restart
//! adopts the pinned state without a second attachment, `ztctl unload` removes everything,
//! invalid policies change nothing, and `status` tells the truth.

use std::{net::SocketAddr, time::Duration};

use zt_integration::{Harness, Server};

const PROBE: &str = env!("CARGO_BIN_EXE_zt-probe");

fn lo4(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

fn allow_port(h: &Harness, port: u16) {
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
}

fn stderr(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stderr).to_string()
}

#[test]
fn kill_9_keeps_enforcement_and_a_restart_adopts_without_a_second_attachment() {
    let h = Harness::new(PROBE);
    let srv = Server::loopback(&h.probe, 2);
    let (open, closed) = (srv.ports[0], srv.ports[1]);
    allow_port(&h, open);
    let mut ztd = h.start_ztd(&[]);
    let before = h.attached_programs();
    assert!(
        before.iter().all(|ids| ids.len() == 1),
        "one program per hook: {before:?}"
    );

    ztd.kill9();
    assert_eq!(
        h.call("tcp", lo4(closed)),
        "eperm",
        "still enforced after kill -9"
    );
    assert_eq!(
        h.call("tcp", lo4(open)),
        "ok",
        "and still allowing after kill -9"
    );
    assert_eq!(
        h.attached_programs(),
        before,
        "nothing changed in the kernel"
    );

    let ztd = h.start_ztd(&[]);
    let after = h.attached_programs();
    assert!(
        after.iter().all(|ids| ids.len() == 1),
        "still one program per hook: {after:?}"
    );
    assert_ne!(
        after, before,
        "the programs were replaced in place by the new daemon"
    );
    assert!(
        ztd.wait_line(&["adopted"], Duration::from_secs(5))
            .is_some(),
        "ztd says it adopted: {:?}",
        ztd.lines()
    );
    let st = ztd.status();
    assert!(st.healthy, "{st:?}");
    assert_eq!(
        st.generation, 1,
        "the same policy: the restart kept the generation (nothing written)"
    );
    assert_eq!(h.call("tcp", lo4(closed)), "eperm");
    assert_eq!(h.call("tcp", lo4(open)), "ok");
}

#[test]
fn sigterm_keeps_enforcement() {
    let h = Harness::new(PROBE);
    let srv = Server::loopback(&h.probe, 2);
    let (open, closed) = (srv.ports[0], srv.ports[1]);
    allow_port(&h, open);
    let mut ztd = h.start_ztd(&[]);
    let status = ztd.terminate().expect("ztd exit status");
    assert!(status.success(), "clean exit: {status}");
    assert_eq!(
        h.call("tcp", lo4(closed)),
        "eperm",
        "enforced after SIGTERM"
    );
    assert_eq!(h.call("tcp", lo4(open)), "ok");
}

#[test]
fn ztctl_unload_removes_everything_with_or_without_a_daemon() {
    for with_daemon in [false, true] {
        let h = Harness::new(PROBE);
        let srv = Server::loopback(&h.probe, 1);
        let port = srv.ports[0];
        allow_port(&h, port + 1);
        let mut ztd = h.start_ztd(&[]);
        assert_eq!(h.call("tcp", lo4(port)), "eperm", "enforced before unload");
        if !with_daemon {
            ztd.kill9();
        }
        let pins = h.pins.path.display().to_string();
        let out = h.ztctl(&["unload", "--bpffs", &pins]);
        assert!(out.status.success(), "unload: {}", stderr(&out));
        assert!(!h.pins.path.exists(), "pin directory removed");
        assert!(
            h.attached_programs().iter().all(Vec::is_empty),
            "nothing attached: {:?}",
            h.attached_programs()
        );
        assert_eq!(
            h.call("tcp", lo4(port)),
            "ok",
            "no longer enforced (daemon: {with_daemon})"
        );
        if with_daemon {
            assert!(
                ztd.wait_exit(Duration::from_secs(10)).is_some(),
                "the daemon exited"
            );
        }
    }
}

#[test]
fn an_invalid_policy_is_refused_with_its_location_and_nothing_is_attached() {
    let h = Harness::new(PROBE);
    let path = h.write_policy(
        "bad.toml",
        r#"version = 1
[[rule]]
action = "allow"
peer = "10.0.0.0/33"
"#,
    );
    let mut ztd = h.spawn_ztd(&[]);
    let status = ztd.wait_exit(Duration::from_secs(30)).expect("ztd exits");
    assert!(!status.success());
    let located = format!("{}:4:", path.display());
    assert!(
        ztd.lines().iter().any(|l| l.starts_with(&located)),
        "expected an error at {located}: {:?}",
        ztd.lines()
    );
    assert!(
        h.attached_programs().iter().all(Vec::is_empty),
        "nothing attached"
    );
    assert!(!h.pins.path.join("links").exists(), "nothing pinned");
}

#[test]
fn ztctl_check_exit_codes_and_messages() {
    let h = Harness::new(PROBE);
    let good = h.write_policy(
        "good.toml",
        r#"version = 1
[network.db]
cidrs = ["10.0.2.0/24", "fd00:2::/64"]
[[rule]]
action = "allow"
peer = "db"
ports = [5432, "8000-8100"]
proto = "tcp"
"#,
    );
    let out = h.ztctl(&["check", &good.display().to_string()]);
    assert!(out.status.success(), "valid policy: {}", stderr(&out));

    let bad = h.policy_dir.path().join("bad.toml");
    std::fs::write(
        &bad,
        "version = 1\n[[rule]]\naction = \"allow\"\npeer = \"nowhere\"\nports = [70000]\n",
    )
    .expect("write");
    let out = h.ztctl(&["check", &bad.display().to_string()]);
    assert_eq!(out.status.code(), Some(1), "invalid policy");
    let err = stderr(&out);
    let at = |line: usize| format!("{}:{line}:", bad.display());
    assert!(err.contains(&at(4)), "unknown network at line 4: {err}");
    assert!(err.contains(&at(5)), "bad port at line 5: {err}");

    let out = h.ztctl(&["check"]);
    assert_eq!(out.status.code(), Some(2), "usage error");
    let out = h.ztctl(&["frobnicate"]);
    assert_eq!(out.status.code(), Some(2), "usage error");
}

#[test]
fn status_json_reports_health_hooks_and_moving_counters() {
    let h = Harness::new(PROBE);
    let srv = Server::loopback(&h.probe, 2);
    let (open, closed) = (srv.ports[0], srv.ports[1]);
    allow_port(&h, open);
    let _ztd = h.start_ztd(&[]);
    assert_eq!(h.call("tcp", lo4(open)), "ok");
    assert_eq!(h.call("tcp", lo4(closed)), "eperm");

    let out = h.ztctl(&["status", "--json"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("status is JSON");
    assert_eq!(v["healthy"], true, "{v}");
    assert_eq!(v["mode"], "enforce");
    assert_eq!(v["generation"], 1);
    assert_eq!(v["rules"], 1);
    let hooks = v["hooks"].as_array().expect("hooks");
    assert_eq!(
        hooks.len(),
        12,
        "9 cgroup hooks and 3 exec-identity tracepoints"
    );
    for hook in hooks {
        assert_eq!(hook["attached"], true, "{hook}");
        assert!(hook["prog_id"].as_u64().unwrap_or(0) > 0, "{hook}");
        assert!(hook["hook"].is_string());
    }
    let counters = v["counters"].as_array().expect("counters");
    let hits = |id: u64| {
        counters
            .iter()
            .find(|c| c["id"] == id)
            .and_then(|c| c["hits"].as_u64())
            .unwrap_or(0)
    };
    assert!(hits(1) >= 1, "the allow rule was hit: {counters:?}");
    assert!(hits(0) >= 1, "the default deny was hit: {counters:?}");
    let rule = counters.iter().find(|c| c["id"] == 1).expect("rule 1");
    assert!(
        rule["location"]
            .as_str()
            .unwrap_or("")
            .ends_with("p.toml:2:1"),
        "{rule}"
    );

    let text = h.ztctl(&["status"]);
    assert!(text.status.success());
    assert!(String::from_utf8_lossy(&text.stdout).contains("health      ok"));
}

#[test]
fn status_turns_unhealthy_when_a_program_is_detached_behind_our_back() {
    let h = Harness::new(PROBE);
    allow_port(&h, 9);
    // No repair (it would race the checks below): this test is about reporting.
    let ztd = h.start_ztd(&["--check-interval", "0s"]);
    assert!(ztd.status().healthy);
    // Tamper: remove one link's pin; with no fd left, the kernel detaches it.
    std::fs::remove_file(h.pins.path.join("links/connect4")).expect("unpin");
    // The kernel releases an unpinned link asynchronously (RCU, then a workqueue).
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    let mut st = ztd.status();
    while st.healthy && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
        st = ztd.status();
    }
    assert!(!st.healthy, "{st:?}");
    let c4 = st
        .hooks
        .iter()
        .find(|x| x.hook == "connect4")
        .expect("hook");
    assert!(!c4.attached);
    let out = h.ztctl(&["status"]);
    assert_eq!(out.status.code(), Some(1), "unhealthy status exits 1");
}

#[test]
fn reload_applies_a_valid_policy_and_keeps_the_last_good_one_otherwise() {
    let h = Harness::new(PROBE);
    let srv = Server::loopback(&h.probe, 2);
    let (a, b) = (srv.ports[0], srv.ports[1]);
    allow_port(&h, a);
    let ztd = h.start_ztd(&[]);
    assert_eq!(h.call("tcp", lo4(a)), "ok");
    assert_eq!(h.call("tcp", lo4(b)), "eperm");

    allow_port(&h, b);
    let out = h.ztctl(&["reload"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(h.call("tcp", lo4(b)), "ok", "the new generation allows b");
    assert_eq!(h.call("tcp", lo4(a)), "eperm", "and no longer a");
    assert_eq!(ztd.status().generation, 2);

    let path = h.write_policy(
        "p.toml",
        "version = 1\n[[rule]]\naction = \"maybe\"\npeer = \"any\"\n",
    );
    let out = h.ztctl(&["reload"]);
    assert_eq!(out.status.code(), Some(1), "an invalid policy is refused");
    assert!(
        stderr(&out).contains(&format!("{}:3:", path.display())),
        "{}",
        stderr(&out)
    );
    assert_eq!(
        h.call("tcp", lo4(b)),
        "ok",
        "the last good policy stays enforced"
    );
    assert_eq!(h.call("tcp", lo4(a)), "eperm");
    let st = ztd.status();
    assert_eq!(st.generation, 2);
    assert!(!st.last_reload.ok);
}
