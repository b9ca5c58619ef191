//! zt as an installed service: the shipped policies and ztd.toml are valid, systemd's
//! readiness protocol (`Type=notify`) is spoken at the right moments, the configuration file
//! reaches the daemon under the command line, and decision events land in a rotated JSON
//! lines file. The file layout of `xtask install` and the .deb is checked by
//! `cargo xtask test` (steps "install layout" and "Debian package").

use std::{
    net::SocketAddr,
    os::unix::net::UnixDatagram,
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use zt_integration::{bin, Harness, Server};

const PROBE: &str = env!("CARGO_BIN_EXE_zt-probe");

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .to_path_buf()
}

fn lo4(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

fn ztctl_check(paths: &[PathBuf]) -> std::process::Output {
    Command::new(bin("ztctl"))
        .arg("check")
        .args(paths)
        .output()
        .expect("run ztctl check")
}

#[test]
fn every_shipped_policy_passes_check() {
    let root = repo();
    let mut files = vec![root.join("policies/default.toml")];
    let mut examples: Vec<PathBuf> = std::fs::read_dir(root.join("policies/examples"))
        .expect("policies/examples")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "toml"))
        .collect();
    examples.sort();
    assert!(examples.len() >= 5, "examples: {examples:?}");
    files.extend(examples);
    for f in &files {
        let out = ztctl_check(std::slice::from_ref(f));
        assert!(
            out.status.success(),
            "{}: {}",
            f.display(),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(String::from_utf8_lossy(&out.stdout).starts_with("ok: "));
    }
    // All together, as an operator copying every example into one directory would.
    let out = ztctl_check(&[root.join("policies"), root.join("policies/examples")]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Negative control: `check` does fail on a broken policy.
    let dir = tempfile::tempdir().expect("tempdir");
    let bad = dir.path().join("bad.toml");
    std::fs::write(
        &bad,
        "version = 1\n[[rule]]\naction = \"allow\"\npeer = \"nowhere\"\n",
    )
    .expect("write");
    let out = ztctl_check(&[bad]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("bad.toml:4:"));
}

/// Every key of the shipped ztd.toml, uncommented, is a valid setting: ztd gets past the
/// configuration and stops at the (missing) policy, before touching the kernel.
#[test]
fn shipped_ztd_toml_is_valid_with_every_setting() {
    let text = std::fs::read_to_string(repo().join("deploy/ztd.toml")).expect("ztd.toml");
    let mut keys = 0;
    let full: String = text
        .lines()
        .map(|l| match l.strip_prefix("# ") {
            Some(setting)
                if setting.split_once(" = ").is_some_and(|(k, _)| {
                    k.chars().all(|c| c.is_ascii_lowercase() || c == '-')
                }) =>
            {
                keys += 1;
                setting.to_string()
            }
            _ => l.to_string(),
        })
        .collect::<Vec<_>>()
        .join("\n");
    assert!(keys >= 12, "uncommented {keys} settings");
    let dir = tempfile::tempdir().expect("tempdir");
    let config = dir.path().join("ztd.toml");
    std::fs::write(&config, &full).expect("write");
    let missing = dir.path().join("no-such-policy");
    let out = Command::new(bin("ztd"))
        .arg("--config")
        .arg(&config)
        .arg("--policy")
        .arg(&missing)
        .arg("--cgroup")
        .arg(dir.path())
        .output()
        .expect("run ztd");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(!stderr.contains("ztd.toml:"), "a config error: {stderr}");

    // Positive control of the check: a bad value in the same file is exit 2 with its place.
    let bad = full.replace("history = 10000", "history = \"lots\"");
    assert_ne!(bad, full);
    std::fs::write(&config, &bad).expect("write");
    let out = Command::new(bin("ztd"))
        .arg("--config")
        .arg(&config)
        .output()
        .expect("run ztd");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    let line = 1 + bad
        .lines()
        .position(|l| l.starts_with("history ="))
        .expect("history line");
    assert!(
        stderr.contains(&format!("ztd.toml:{line}:11: `history`")),
        "{stderr}"
    );
}

/// Read datagrams from the notify socket until one contains `needle`; returns every
/// message received.
fn wait_notify(sock: &UnixDatagram, needle: &str, timeout: Duration) -> Vec<String> {
    let end = Instant::now() + timeout;
    let mut seen = Vec::new();
    let mut buf = [0u8; 4096];
    while Instant::now() < end {
        if let Ok(n) = sock.recv(&mut buf) {
            let msg = String::from_utf8_lossy(&buf[..n]).into_owned();
            let done = msg.lines().any(|l| l == needle);
            seen.push(msg);
            if done {
                return seen;
            }
        }
    }
    panic!("no {needle} within {timeout:?}; got {seen:?}");
}

#[test]
fn sd_notify_ready_once_enforcing_then_reloading_and_stopping() {
    let h = Harness::new(PROBE);
    let srv = Server::loopback(&h.probe, 2);
    let (open, closed) = (srv.ports[0], srv.ports[1]);
    h.write_policy(
        "p.toml",
        &format!(
            "version = 1\n[[rule]]\naction = \"allow\"\npeer = \"127.0.0.1\"\nports = [{open}]\nproto = \"tcp\"\n"
        ),
    );
    let dir = tempfile::tempdir().expect("tempdir");
    let sock_path = dir.path().join("notify.sock");
    let sock = UnixDatagram::bind(&sock_path).expect("bind notify socket");
    sock.set_read_timeout(Some(Duration::from_millis(100)))
        .expect("timeout");
    let mut cmd = h.ztd_command(&["--no-watch"]);
    cmd.env("NOTIFY_SOCKET", &sock_path);
    let mut ztd = h.spawn_ztd_cmd(cmd);

    let msgs = wait_notify(&sock, "READY=1", Duration::from_secs(30));
    // READY=1 means enforcing: the policy is in the kernel at that moment.
    assert_eq!(h.call("tcp", lo4(closed)), "eperm", "denied once ready");
    assert_eq!(h.call("tcp", lo4(open)), "ok", "positive control: allowed");
    let st = ztd.status();
    assert!(st.healthy && st.generation >= 1, "{st:?}");
    assert!(
        msgs.iter()
            .any(|m| m.contains("STATUS=enforcing generation")),
        "{msgs:?}"
    );
    assert!(
        !msgs.iter().any(|m| m.contains("STOPPING=1")),
        "nothing else before READY: {msgs:?}"
    );

    // A reload: RELOADING=1 (with MONOTONIC_USEC), then READY=1 once the new policy is in.
    h.write_policy(
        "p.toml",
        &format!(
            "version = 1\n[[rule]]\naction = \"allow\"\npeer = \"127.0.0.1\"\nports = [{open}, {closed}]\nproto = \"tcp\"\n"
        ),
    );
    let pid = nix::unistd::Pid::from_raw(ztd.pid().expect("pid") as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGHUP).expect("SIGHUP");
    let msgs = wait_notify(&sock, "RELOADING=1", Duration::from_secs(10));
    assert!(
        msgs.last().is_some_and(|m| m.contains("MONOTONIC_USEC=")),
        "{msgs:?}"
    );
    wait_notify(&sock, "READY=1", Duration::from_secs(30));
    assert_eq!(
        h.call("tcp", lo4(closed)),
        "ok",
        "the reloaded policy is in"
    );

    let st = ztd.terminate().expect("exit status");
    assert!(st.success(), "{st}");
    wait_notify(&sock, "STOPPING=1", Duration::from_secs(5));
}

#[test]
fn sd_notify_is_a_no_op_without_notify_socket() {
    let h = Harness::new(PROBE);
    h.write_policy("p.toml", "version = 1\n");
    let mut cmd = h.ztd_command(&["--no-watch"]);
    cmd.env_remove("NOTIFY_SOCKET");
    let mut ztd = h.start_ztd_cmd(cmd);
    assert!(ztd.status().healthy);
    assert!(ztd.terminate().expect("exit").success());
}

#[test]
fn config_file_settings_reach_ztd_and_flags_win() {
    let h = Harness::new(PROBE);
    let srv = Server::loopback(&h.probe, 1);
    let port = srv.ports[0];
    h.write_policy("p.toml", "version = 1\n");
    let dir = tempfile::tempdir().expect("tempdir");
    let config = dir.path().join("ztd.toml");
    std::fs::write(
        &config,
        "# settings for the test\nmode = \"audit\"\nno_watch = true\nhistory = 77\n",
    )
    .expect("write");
    let config_arg = config.to_str().expect("utf8");

    // From the file: audit mode (a default deny is reported, not enforced).
    let mut ztd = h.start_ztd(&["--config", config_arg]);
    let st = ztd.status();
    assert_eq!(st.mode, "audit");
    assert_eq!(st.events.history_capacity, 77);
    assert_eq!(h.call("tcp", lo4(port)), "ok", "audit: allowed");
    assert!(ztd.terminate().expect("exit").success());

    // The command line wins: enforce.
    let mut ztd = h.start_ztd(&["--config", config_arg, "--mode", "enforce"]);
    let st = ztd.status();
    assert_eq!(st.mode, "enforce");
    assert_eq!(
        st.events.history_capacity, 77,
        "the rest of the file applies"
    );
    assert_eq!(h.call("tcp", lo4(port)), "eperm", "enforce: denied");
    assert!(ztd.terminate().expect("exit").success());

    // A bad setting: exit 2, file:line:column, nothing started.
    std::fs::write(&config, "mode = \"audit\"\nxdp-mod = \"skb\"\n").expect("write");
    let out = h
        .ztd_command(&["--config", config_arg])
        .output()
        .expect("run ztd");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains(&format!(
            "{}:2:1: unknown setting `xdp-mod`",
            config.display()
        )),
        "{stderr}"
    );
    assert!(stderr.contains("did you mean `xdp-mode`"), "{stderr}");
    assert!(!h.socket.exists(), "nothing started");

    // An explicit file that does not exist is an error too.
    let out = h
        .ztd_command(&["--config", "/nonexistent/ztd.toml"])
        .output()
        .expect("run ztd");
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("/nonexistent/ztd.toml"));
}

fn read_lines(path: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect()
}

#[test]
fn events_file_gets_json_lines_and_rotates_by_size() {
    let h = Harness::new(PROBE);
    let srv = Server::loopback(&h.probe, 1);
    let open = srv.ports[0];
    h.write_policy(
        "p.toml",
        &format!(
            "version = 1\n[[rule]]\naction = \"allow\"\npeer = \"127.0.0.1\"\nports = [{open}]\nproto = \"tcp\"\n"
        ),
    );
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("events.jsonl");
    let max = 4000u64;
    let ztd = h.start_ztd(&[
        "--events-file",
        file.to_str().expect("utf8"),
        "--events-file-max-bytes",
        &max.to_string(),
        "--events-file-keep",
        "2",
    ]);
    assert_eq!(h.call("tcp", lo4(open)), "ok", "positive control");
    // Denied calls to distinct peers (distinct events, not rate-limited together).
    let denied: Vec<SocketAddr> = (2..=21)
        .map(|i| SocketAddr::from(([127, 0, 0, i], 9)))
        .collect();
    for addr in &denied {
        assert_eq!(h.call("tcp", *addr), "eperm", "{addr}");
    }
    let rotated = [
        dir.path().join("events.jsonl.1"),
        dir.path().join("events.jsonl.2"),
    ];
    let end = Instant::now() + Duration::from_secs(10);
    let all = loop {
        let mut all = Vec::new();
        for p in rotated.iter().rev().chain([&file]) {
            all.extend(read_lines(p));
        }
        let newest = all.iter().any(|v| v["peer_addr"] == "127.0.0.21");
        if newest || Instant::now() > end {
            break all;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    // The oldest lines were rotated away (keep = 2); what is kept is in order and complete.
    let peers: Vec<String> = all
        .iter()
        .filter(|v| v["verdict"] == "deny")
        .map(|v| v["peer_addr"].as_str().unwrap_or_default().to_string())
        .collect();
    assert!(
        !peers.is_empty(),
        "no deny lines; ztd said:\n{}",
        ztd.lines().join("\n")
    );
    let last = peers.last().expect("a peer");
    assert_eq!(
        last, "127.0.0.21",
        "the newest event is in the live file: {peers:?}"
    );
    let first = &all[0];
    assert_eq!(first["msg"], "decision");
    for key in [
        "time",
        "verdict",
        "hook",
        "tgid",
        "exe",
        "peer_port",
        "rule",
    ] {
        assert!(first.get(key).is_some(), "no `{key}` in {first}");
    }
    assert!(
        rotated[0].exists() && rotated[1].exists(),
        "rotated twice or more"
    );
    assert!(
        !dir.path().join("events.jsonl.3").exists(),
        "only two rotated files kept"
    );
    for p in rotated.iter().chain([&file]) {
        let len = std::fs::metadata(p).expect("stat").len();
        assert!(len <= max, "{}: {len} bytes > {max}", p.display());
    }
}

#[test]
fn help_and_exit_codes_for_operators() {
    for b in ["ztd", "ztctl"] {
        let out = Command::new(bin(b)).arg("--help").output().expect("run");
        assert_eq!(out.status.code(), Some(0), "{b} --help");
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(text.contains("Exit status"), "{b} --help:\n{text}");
        let out = Command::new(bin(b))
            .arg("--no-such-flag")
            .output()
            .expect("run");
        assert_eq!(out.status.code(), Some(2), "{b}: a usage error is 2");
        let out = Command::new(bin(b))
            .arg("--generate-man")
            .output()
            .expect("run");
        assert!(out.status.success());
        assert!(String::from_utf8_lossy(&out.stdout).contains(".SH \"EXIT STATUS\""));
    }
    // ztd without privileges: exit 1, says what it needs, creates nothing.
    let dir = tempfile::tempdir().expect("tempdir");
    let pins = dir.path().join("pins");
    let out = Command::new("setpriv")
        .args(["--reuid", "65534", "--regid", "65534", "--clear-groups"])
        .args(["--inh-caps=-all", "--bounding-set=-all"])
        .arg(bin("ztd"))
        .args(["--config", "/dev/null", "--policy", "/nonexistent"])
        .arg("--bpffs")
        .arg(&pins)
        .output()
        .expect("run setpriv ztd");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("needs root") && stderr.contains("CAP_BPF"),
        "{stderr}"
    );
    assert!(!pins.exists());
    // ztctl without a daemon: exit 1 and a message that says what to check.
    let out = Command::new(bin("ztctl"))
        .args(["--socket", "/nonexistent/zt.sock", "status"])
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("/nonexistent/zt.sock"), "{stderr}");
}

/// Lay out `files` the way the kubelet writes a ConfigMap volume: a timestamped directory,
/// `..data` pointing at it, and each key a symlink through `..data`. Updating writes a new
/// directory, swaps `..data` with a rename, and removes the old directory.
fn configmap_write(dir: &Path, version: u32, files: &[(&str, &str)]) {
    let data = dir.join(format!("..2026_11_27_00_00_0{version}.000000001"));
    std::fs::create_dir(&data).expect("mkdir version");
    for (name, text) in files {
        std::fs::write(data.join(name), text).expect("write key");
        let link = dir.join(name);
        if !link.exists() {
            std::os::unix::fs::symlink(Path::new("..data").join(name), &link).expect("symlink");
        }
    }
    let old = std::fs::read_link(dir.join("..data")).ok();
    let tmp = dir.join("..data_tmp");
    std::os::unix::fs::symlink(data.file_name().expect("name"), &tmp).expect("symlink tmp");
    std::fs::rename(&tmp, dir.join("..data")).expect("swap ..data");
    if let Some(old) = old {
        std::fs::remove_dir_all(dir.join(old)).expect("remove old version");
    }
}

#[test]
fn configmap_symlink_swap_is_picked_up_by_the_watch() {
    let h = Harness::new(PROBE);
    let srv = Server::loopback(&h.probe, 2);
    let (a, b) = (srv.ports[0], srv.ports[1]);
    let policy = |ports: &str| {
        format!(
            "version = 1\n[[rule]]\naction = \"allow\"\npeer = \"127.0.0.1\"\nports = [{ports}]\nproto = \"tcp\"\n"
        )
    };
    let cm = tempfile::tempdir().expect("tempdir");
    configmap_write(cm.path(), 1, &[("zt.toml", &policy(&a.to_string()))]);
    let mut cmd = h.ztd_command(&[]);
    // ztd reads both directories: the harness's (no rules) and the ConfigMap volume.
    h.write_policy("empty.toml", "version = 1\n");
    cmd.arg("--policy").arg(cm.path());
    let ztd = h.start_ztd_cmd(cmd);
    let gen = ztd.status().generation;
    assert_eq!(
        h.call("tcp", lo4(a)),
        "ok",
        "allowed by the ConfigMap's policy"
    );
    assert_eq!(h.call("tcp", lo4(b)), "eperm", "not yet allowed");

    configmap_write(cm.path(), 2, &[("zt.toml", &policy(&format!("{a}, {b}")))]);
    let end = Instant::now() + Duration::from_secs(10);
    while ztd.status().generation == gen {
        assert!(
            Instant::now() < end,
            "the ConfigMap update was not picked up; ztd said:\n{}",
            ztd.lines().join("\n")
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(
        h.call("tcp", lo4(b)),
        "ok",
        "the updated policy is enforced"
    );
    assert_eq!(
        h.call("tcp", lo4(a)),
        "ok",
        "and still allows the first port"
    );
}

/// The `KEY: |` blocks of the ConfigMaps in a manifest (4-space indented block scalars).
fn manifest_blocks(yaml: &str) -> Vec<(String, String)> {
    let mut out: Vec<(String, String)> = Vec::new();
    let mut current: Option<(String, String)> = None;
    for line in yaml.lines() {
        if let Some((_, text)) = current.as_mut() {
            if let Some(body) = line.strip_prefix("    ") {
                text.push_str(body);
                text.push('\n');
                continue;
            }
            if line.trim().is_empty() {
                text.push('\n');
                continue;
            }
            out.extend(current.take());
        }
        if let Some(key) = line.strip_prefix("  ").and_then(|l| l.strip_suffix(": |")) {
            if !key.starts_with(' ') {
                current = Some((key.to_string(), String::new()));
            }
        }
    }
    out.extend(current);
    out
}

#[test]
fn kubernetes_manifest_ships_a_valid_policy_and_config() {
    let yaml = std::fs::read_to_string(repo().join("deploy/kubernetes/zt-daemonset.yaml"))
        .expect("manifest");
    let blocks = manifest_blocks(&yaml);
    let dir = tempfile::tempdir().expect("tempdir");
    let policies = dir.path().join("policies");
    std::fs::create_dir(&policies).expect("mkdir");
    let mut config = None;
    for (key, text) in &blocks {
        if key == "ztd.toml" {
            config = Some(text.clone());
        } else {
            assert!(key.ends_with(".toml"), "{key}");
            std::fs::write(policies.join(key), text).expect("write");
        }
    }
    assert!(blocks.len() >= 3, "{blocks:?}");
    let out = ztctl_check(std::slice::from_ref(&policies));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The settings parse: ztd stops at the (missing) guarded cgroup or policy, not at them.
    let config_path = dir.path().join("ztd.toml");
    std::fs::write(&config_path, config.expect("a ztd.toml key")).expect("write");
    let out = Command::new(bin("ztd"))
        .arg("--config")
        .arg(&config_path)
        .args([
            "--cgroup",
            "/nonexistent-zt-cgroup",
            "--socket",
            "/nonexistent/zt.sock",
        ])
        .output()
        .expect("run ztd");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(!stderr.contains("ztd.toml:"), "{stderr}");
}
