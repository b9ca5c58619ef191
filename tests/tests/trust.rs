//! ztd trusts only what root alone controls (issue 12, items 6 and 7): policy files a user
//! may write are refused, control requests are authorised by the peer's credentials, unit
//! identities resolve only to cgroups a user cannot make, a guarded cgroup a user may move
//! processes out of is reported, and names from the system cannot forge log lines. Every
//! refusal is paired with the same action succeeding where it is allowed.

use std::{
    net::SocketAddr,
    os::unix::{fs::PermissionsExt, process::CommandExt},
    path::Path,
    process::{Command, Output},
    time::{Duration, Instant},
};

use zt_integration::{bin, wait_executable, Call, Harness, Server};

const PROBE: &str = env!("CARGO_BIN_EXE_zt-probe");
const NOBODY: u32 = 65534;

fn lo4(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn allow_tcp(port: u16) -> String {
    format!(
        "version = 1\n[[rule]]\naction = \"allow\"\npeer = \"127.0.0.1\"\nports = [{port}]\nproto = \"tcp\"\n"
    )
}

fn chmod(path: &Path, mode: u32) {
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .unwrap_or_else(|e| panic!("chmod {}: {e}", path.display()));
}

fn chown(path: &Path, uid: u32) {
    std::os::unix::fs::chown(path, Some(uid), None)
        .unwrap_or_else(|e| panic!("chown {}: {e}", path.display()));
}

/// `ztctl ARGS` as uid/gid 65534 with supplementary `groups`.
fn ztctl_as_nobody(h: &Harness, groups: &[u32], args: &[&str]) -> Output {
    let groups: Vec<libc::gid_t> = groups.to_vec();
    let mut cmd = Command::new(bin("ztctl"));
    cmd.arg("--socket").arg(&h.socket).args(args);
    // SAFETY: only async-signal-safe calls (setgroups, setgid, setuid) between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            if libc::setgroups(groups.len(), groups.as_ptr()) != 0
                || libc::setgid(NOBODY) != 0
                || libc::setuid(NOBODY) != 0
            {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    cmd.output().expect("run ztctl as nobody")
}

#[test]
fn a_policy_file_others_may_write_is_refused_and_the_policy_in_force_stays() {
    let h = Harness::new(PROBE);
    let srv = Server::loopback(&h.probe, 2);
    let (open, closed) = (srv.ports[0], srv.ports[1]);
    let file = h.write_policy("p.toml", &allow_tcp(open));
    let ztd = h.start_ztd(&[]);
    assert_eq!(h.call("tcp", lo4(open)), "ok");
    assert_eq!(h.call("tcp", lo4(closed)), "eperm");

    // A world-writable file with a new allow rule: refused, by the file watch and by reload.
    // (The mode first: a chmod does not wake the file watch, the write does.)
    chmod(&file, 0o666);
    std::fs::write(&file, allow_tcp(closed)).expect("write");
    let end = Instant::now() + Duration::from_secs(5);
    while !ztd.lines().iter().any(|l| l.contains("mode 0666")) {
        assert!(Instant::now() < end, "{}", ztd.lines().join("\n"));
        std::thread::sleep(Duration::from_millis(50));
    }
    let out = h.ztctl(&["reload"]);
    assert!(!out.status.success());
    let said = text(&out);
    assert!(
        said.contains(&file.display().to_string()) && said.contains("mode 0666"),
        "{said}"
    );
    assert_eq!(
        h.call("tcp", lo4(closed)),
        "eperm",
        "the new rule is not applied"
    );
    assert_eq!(h.call("tcp", lo4(open)), "ok", "the policy in force stays");
    let out = h.ztctl(&["check", &file.display().to_string()]);
    assert!(!out.status.success(), "check refuses it too");
    assert!(text(&out).contains("mode 0666"), "{}", text(&out));

    // A file owned by another user: refused as well.
    chown(&file, NOBODY);
    chmod(&file, 0o644);
    let out = h.ztctl(&["reload"]);
    assert!(!out.status.success());
    assert!(text(&out).contains("uid 65534"), "{}", text(&out));
    assert_eq!(h.call("tcp", lo4(closed)), "eperm");

    // Positive control: root's 0644 file with the same content is applied.
    chown(&file, 0);
    let out = h.ztctl(&["reload"]);
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(h.call("tcp", lo4(closed)), "ok");
}

#[test]
fn control_requests_are_authorised_by_the_peers_credentials() {
    let h = Harness::new(PROBE);
    let srv = Server::loopback(&h.probe, 1);
    let policy = h.write_policy("p.toml", &allow_tcp(srv.ports[0]));
    let mut ztd = h.start_ztd(&[]);
    let mode = std::fs::metadata(&h.socket)
        .expect("socket")
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600, "the socket is created 0600");
    // Whatever the socket's mode: the kernel's word on who connects decides.
    chmod(&h.socket, 0o666);
    for args in [
        vec!["reload"],
        vec![
            "apply",
            &policy.to_str().expect("utf-8"),
            "--confirm-within",
            "30s",
        ],
        vec!["confirm"],
        vec!["status"],
    ] {
        let out = ztctl_as_nobody(&h, &[], &args);
        assert!(!out.status.success(), "{args:?} as nobody: {}", text(&out));
        assert!(
            text(&out).contains("permission denied"),
            "{args:?}: {}",
            text(&out)
        );
        let logged = format!("refused `{}` from uid 65534", args[0]);
        assert!(
            ztd.wait_line(&[&logged], Duration::from_secs(3)).is_some(),
            "{}",
            ztd.lines().join("\n")
        );
    }
    // Positive control: root's requests work.
    let out = h.ztctl(&["reload"]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(h.ztctl(&["status"]).status.success());
    ztd.terminate();

    // With --control-group, its members read status and events; changes stay root's.
    let group = 4242u32;
    let ztd = h.start_ztd(&["--control-group", &group.to_string()]);
    let meta = std::fs::metadata(&h.socket).expect("socket");
    assert_eq!(
        (
            meta.permissions().mode() & 0o777,
            std::os::unix::fs::MetadataExt::gid(&meta)
        ),
        (0o660, group),
        "the socket belongs to the control group"
    );
    let out = ztctl_as_nobody(&h, &[group], &["status", "--json"]);
    assert!(text(&out).contains("\"generation\""), "{}", text(&out));
    let out = ztctl_as_nobody(&h, &[group], &["events"]);
    assert!(out.status.success(), "{}", text(&out));
    let out = ztctl_as_nobody(&h, &[group], &["reload"]);
    assert!(!out.status.success());
    assert!(text(&out).contains("root only"), "{}", text(&out));
    // Not a member: the socket's mode keeps it out already (and ztd would refuse it).
    let out = ztctl_as_nobody(&h, &[group + 1], &["status"]);
    assert!(!out.status.success());
    assert!(
        text(&out).to_lowercase().contains("permission denied"),
        "{}",
        text(&out)
    );
    drop(ztd);
}

#[test]
fn a_socket_path_in_a_directory_others_may_write_is_refused() {
    let h = Harness::new(PROBE);
    h.write_policy("p.toml", &allow_tcp(9));
    let dir = tempfile::tempdir().expect("tempdir");
    chmod(dir.path(), 0o777);
    let socket = dir.path().join("ztd.sock");
    let out = ztd_cmd(&h, &h.cgroup.path, &socket)
        .output()
        .expect("run ztd");
    assert!(!out.status.success());
    assert!(text(&out).contains("not safe"), "{}", text(&out));
    assert!(!socket.exists());
    // Something that is not a socket at the path: refused, left alone.
    chmod(dir.path(), 0o755);
    std::fs::write(&socket, "not a socket").expect("write");
    let out = ztd_cmd(&h, &h.cgroup.path, &socket)
        .output()
        .expect("run ztd");
    assert!(text(&out).contains("is not a socket"), "{}", text(&out));
    assert_eq!(
        std::fs::read_to_string(&socket).expect("kept"),
        "not a socket"
    );
    // Positive control: a stale socket in a root-only directory is replaced.
    std::fs::remove_file(&socket).expect("rm");
    drop(std::os::unix::net::UnixListener::bind(&socket).expect("stale socket"));
    let mut ztd = h.spawn_ztd_cmd(ztd_cmd(&h, &h.cgroup.path, &socket));
    ztd.socket = socket.clone();
    assert!(
        ztd.wait_line(&["control socket"], Duration::from_secs(30))
            .is_some(),
        "{}",
        ztd.lines().join("\n")
    );
}

#[test]
fn a_newline_in_an_executable_name_cannot_forge_an_event_line() {
    let h = Harness::new(PROBE);
    let srv = Server::loopback(&h.probe, 2);
    let (open, closed) = (srv.ports[0], srv.ports[1]);
    h.write_policy("p.toml", &allow_tcp(open));
    let ztd = h.start_ztd(&["--log-allowed"]);
    let forged = "2030-01-01T00:00:00.000000000Z allow connect4 pid=1 FORGED";
    let dir = tempfile::tempdir().expect("tempdir");
    let exe = dir.path().join(format!("zt-evil\n{forged}"));
    std::fs::copy(&h.probe, &exe).expect("copy");
    wait_executable(&exe);
    // The probe lingers so that ztd still finds its executable under /proc.
    let call = |port| {
        h.probe_call(
            Call::new("tcp", lo4(port))
                .cgroup(&h.cgroup.path)
                .exe(&exe)
                .linger_ms(1000),
        )
    };
    assert_eq!(call(closed), "eperm");
    assert_eq!(
        call(open),
        "ok",
        "positive control: the copy runs and connects"
    );
    let seen = ztd.wait_line(&["zt-evil\\x0a"], Duration::from_secs(5));
    assert!(seen.is_some(), "{}", ztd.lines().join("\n"));
    for line in ztd.lines() {
        assert!(!line.starts_with("2030-01-01"), "a forged line: {line}");
        if line.contains("zt-evil") {
            assert!(
                line.contains("FORGED"),
                "the name stays on its line: {line}"
            );
        }
    }
    let out = h.ztctl(&["events"]);
    let shown = String::from_utf8_lossy(&out.stdout);
    assert!(shown.contains("zt-evil\\x0a"), "{shown}");
    assert!(
        !shown.lines().any(|l| l.starts_with("2030-01-01")),
        "{shown}"
    );
    // JSON keeps the real name (escaped by JSON itself).
    let events = h.events(&[]);
    assert!(
        events.iter().any(|e| e
            .exe
            .as_deref()
            .is_some_and(|x| x.ends_with(&format!("zt-evil\n{forged}")))),
        "{events:?}"
    );
}

#[test]
fn a_unit_cgroup_a_user_made_is_not_the_unit() {
    let h = Harness::new(PROBE);
    let srv = Server::loopback(&h.probe, 2);
    let (port, user_port) = (srv.ports[0], srv.ports[1]);
    let units = h.cgroup.child("units");
    // A subtree delegated to uid 65534, where it made a cgroup named like the unit.
    let delegated = h.cgroup.child("units/delegated.slice");
    let fake = h.cgroup.child("units/delegated.slice/zt-web.service");
    chown(&delegated, NOBODY);
    chown(&fake, NOBODY);
    // The user's own manager, with a user unit.
    let mgr = h
        .cgroup
        .child("units/user.slice/user-65534.slice/user@65534.service");
    let user_unit = h
        .cgroup
        .child("units/user.slice/user-65534.slice/user@65534.service/app.slice/zt-sync.service");
    for d in [mgr.clone(), mgr.join("app.slice"), user_unit.clone()] {
        chown(&d, NOBODY);
    }
    h.write_policy(
        "p.toml",
        &format!(
            r#"version = 1
[identity.web]
unit = "zt-web.service"

[identity.sync]
user_unit = "65534:zt-sync.service"

[[rule]]
action = "allow"
identity = "web"
peer = "127.0.0.1"
ports = [{port}]
proto = "tcp"

[[rule]]
action = "allow"
identity = "sync"
peer = "127.0.0.1"
ports = [{user_port}]
proto = "tcp"
"#
        ),
    );
    let system = h.cgroup.child("units/system.slice");
    let ztd = h.start_ztd(&["--units-root", &units.display().to_string()]);
    let from = |cg: &Path, port: u16| h.probe_call(Call::new("tcp", lo4(port)).cgroup(cg));
    assert_eq!(
        from(&fake, port),
        "eperm",
        "a user-made cgroup named like the unit gets nothing"
    );
    assert!(
        ztd.lines().iter().any(|l| l.contains("uid 65534")),
        "the warning says why: {}",
        ztd.lines().join("\n")
    );
    // The user's unit, named as such, is matched.
    assert_eq!(from(&user_unit, user_port), "ok", "user_unit resolves");
    assert_eq!(
        from(&user_unit, port),
        "eperm",
        "but is not the system unit"
    );
    // Positive control: the real (root-made) unit starts; ztd follows it.
    let real = system.join("zt-web.service");
    std::fs::create_dir(&real).expect("mkdir");
    let end = Instant::now() + Duration::from_secs(3);
    while from(&real, port) != "ok" {
        assert!(Instant::now() < end, "{}", ztd.lines().join("\n"));
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(from(&fake, port), "eperm", "the fake still gets nothing");
}

/// ztd for `h`, guarding `cgroup` and serving `socket` (instead of the harness's).
fn ztd_cmd(h: &Harness, cgroup: &Path, socket: &Path) -> Command {
    let mut cmd = Command::new(bin("ztd"));
    cmd.args(["--config", "/dev/null"])
        .arg("--policy")
        .arg(h.policy_dir.path())
        .arg("--cgroup")
        .arg(cgroup)
        .arg("--bpffs")
        .arg(&h.pins.path)
        .arg("--socket")
        .arg(socket)
        .arg("--flows-dir")
        .arg(h.flows_dir());
    cmd
}

/// Runs ztd guarding `cgroup` instead of the harness's cgroup.
fn ztd_guarding(h: &Harness, cgroup: &Path) -> zt_integration::Ztd {
    h.start_ztd_cmd(ztd_cmd(h, cgroup, &h.socket))
}

#[test]
fn a_guarded_cgroup_a_user_may_move_processes_out_of_is_reported() {
    let h = Harness::new(PROBE);
    // An exe identity in a directory uid 65534 may write, without sha256.
    let dir = tempfile::tempdir().expect("tempdir");
    let app = dir.path().join("app");
    std::fs::copy(&h.probe, &app).expect("copy");
    h.write_policy(
        "p.toml",
        &format!(
            "version = 1\n[identity.app]\nexe = \"{}\"\n[[rule]]\naction = \"allow\"\nidentity = \"app\"\npeer = \"127.0.0.1\"\nports = [9]\nproto = \"tcp\"\n",
            app.display()
        ),
    );
    let guarded = h.cgroup.child("guarded");
    let procs = h.cgroup.path.join("cgroup.procs");

    // Control: nothing delegated, a root-only executable: no warning.
    let mut ztd = ztd_guarding(&h, &guarded);
    let st = h.status_json();
    assert_eq!(st["warnings"], serde_json::json!([]), "{st}");
    ztd.terminate();

    chown(&procs, NOBODY);
    chown(dir.path(), NOBODY);
    let ztd = ztd_guarding(&h, &guarded);
    let st = h.status_json();
    let warnings = st["warnings"].to_string();
    assert!(
        warnings.contains(&h.cgroup.path.display().to_string())
            && warnings.contains("uid 65534 may write"),
        "{st}"
    );
    assert!(warnings.contains("non-root user can replace"), "{st}");
    assert!(
        ztd.lines()
            .iter()
            .any(|l| l.contains("move its processes out")),
        "{}",
        ztd.lines().join("\n")
    );
    let human = String::from_utf8_lossy(&h.ztctl(&["status"]).stdout).to_string();
    assert!(human.contains("warning     the guarded cgroup"), "{human}");
    chown(&procs, 0);
}
