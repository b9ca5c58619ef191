//! The bypass suite: what a local user tries to borrow the identity of an allowed program.
//!
//! Each test runs against a policy that allows exactly one identity (a private copy of the
//! probe, `zt-app`, run as root, unless the test says otherwise) to one peer (the loopback
//! echo server's port), and asserts the denial **and** the deny event — next to a positive
//! control: the real identity, same harness, same call, succeeding.

use std::{
    net::SocketAddr,
    os::unix::process::CommandExt,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use zt_integration::{exe_key, Harness, Held, Server, Ztd};

const PROBE: &str = env!("CARGO_BIN_EXE_zt-probe");

/// How long a poll for something ztd notices may take before the test fails: generous, as
/// the wait ends as soon as it is seen (how fast ztd notices is the benchmark's business).
const NOTICE_WAIT: Duration = Duration::from_secs(20);

fn lo4(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

fn lo6(port: u16) -> SocketAddr {
    format!("[::1]:{port}").parse().expect("addr")
}

/// One test's world: harness, echo server, a private copy of the probe that the policy
/// allows (`app`), and a directory for the impostors.
struct World {
    h: Harness,
    _srv: Server,
    port: u16,
    dir: tempfile::TempDir,
    app: PathBuf,
    ztd: Option<Ztd>,
}

impl World {
    /// `identity` is the body of `[identity.app]`; `{app}` stands for the app's path.
    fn new(identity: &str) -> World {
        let h = Harness::new(PROBE);
        let srv = Server::loopback(&h.probe, 1);
        let port = srv.ports[0];
        let dir = tempfile::tempdir().expect("tempdir");
        let app = dir.path().join("zt-app");
        std::fs::copy(&h.probe, &app).expect("copy the probe");
        let body = identity.replace("{app}", &app.display().to_string());
        h.write_policy(
            "p.toml",
            &format!(
                r#"version = 1
[identity.app]
{body}

[network.echo]
cidrs = ["127.0.0.1/32", "::1/128"]

[[rule]]
action = "allow"
identity = "app"
peer = "echo"
ports = [{port}]
"#
            ),
        );
        World {
            h,
            _srv: srv,
            port,
            dir,
            app,
            ztd: None,
        }
    }

    fn exe_only() -> World {
        World::new("exe = \"{app}\"\nuser = \"root\"")
    }

    fn start(mut self, extra: &[&str]) -> World {
        self.ztd = Some(self.h.start_ztd(extra));
        self
    }

    fn ztd(&self) -> &Ztd {
        self.ztd.as_ref().expect("ztd started")
    }

    /// A copy of the probe at `name` in the test directory: another file.
    fn impostor(&self, name: &str) -> PathBuf {
        let path = self.dir.path().join(name);
        std::fs::copy(&self.h.probe, &path).expect("copy");
        path
    }

    /// `connect` arguments from inside the guarded cgroup.
    fn connect_args(&self, proto: &str, addr: SocketAddr) -> Vec<String> {
        vec![
            "connect".into(),
            "--proto".into(),
            proto.into(),
            "--addr".into(),
            addr.to_string(),
            "--cgroup".into(),
            self.h.cgroup.path.display().to_string(),
        ]
    }

    fn tcp(&self) -> Vec<String> {
        self.connect_args("tcp", lo4(self.port))
    }

    /// Denied with a deny event for that process and port.
    fn assert_denied(&self, what: &str, (outcome, pid): (String, u32)) {
        assert_eq!(outcome, "eperm", "{what}: must be denied");
        self.deny_event(what, |e| e.tgid == pid);
    }

    fn deny_event(
        &self,
        what: &str,
        pred: impl Fn(&zt::history::EventRecord) -> bool,
    ) -> zt::history::EventRecord {
        let end = Instant::now() + Duration::from_secs(5);
        loop {
            let events = self.h.events(&["--verdict", "deny"]);
            if let Some(e) = events
                .into_iter()
                .find(|e| e.peer_port == self.port && pred(e))
            {
                assert_eq!(e.rule, "default", "{what}: denied by the default verdict");
                return e;
            }
            assert!(
                Instant::now() < end,
                "{what}: no deny event; ztd said:\n{}",
                self.ztd().lines().join("\n")
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Notices in `ztctl events --json`.
    fn notices(&self) -> Vec<serde_json::Value> {
        let out = self.h.ztctl(&["events", "--json"]);
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter_map(|v| v.get("notice").cloned())
            .collect()
    }

    fn wait_notice(&self, kind: &str, timeout: Duration) -> serde_json::Value {
        let end = Instant::now() + timeout;
        loop {
            if let Some(n) = self.notices().into_iter().find(|n| n["kind"] == kind) {
                return n;
            }
            assert!(
                Instant::now() < end,
                "no {kind} notice within {timeout:?}; ztd said:\n{}",
                self.ztd().lines().join("\n")
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn status_identity(&self) -> serde_json::Value {
        let out = self.h.ztctl(&["status", "--json"]);
        let v: serde_json::Value =
            serde_json::from_slice(&out.stdout).expect("status --json is JSON");
        v["identities_resolved"][0].clone()
    }
}

/// Run a command; `(first stdout line, pid)`.
fn run(mut cmd: Command) -> (String, u32) {
    let child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    let pid = child.id();
    let out = child.wait_with_output().expect("wait");
    let text = String::from_utf8_lossy(&out.stdout).trim().to_string();
    if text.is_empty() {
        (
            format!(
                "error:no output; stderr: {}",
                String::from_utf8_lossy(&out.stderr)
            ),
            pid,
        )
    } else {
        (text, pid)
    }
}

fn cmd(exe: &Path, args: &[String]) -> Command {
    let mut c = Command::new(exe);
    c.args(args);
    c
}

fn with(mut args: Vec<String>, extra: &[&str]) -> Vec<String> {
    args.extend(extra.iter().map(|s| s.to_string()));
    args
}

#[test]
fn renamed_process_comm_is_not_an_identity() {
    let w = World::exe_only().start(&[]);
    let copy = w.impostor("zt-evil");
    let (ok, _) = run(cmd(&w.app, &with(w.tcp(), &["--comm", "evil"])));
    assert_eq!(
        ok, "ok",
        "renaming the allowed program does not lose its identity"
    );
    w.assert_denied(
        "a copy renamed with prctl(PR_SET_NAME) to zt-app",
        run(cmd(&copy, &with(w.tcp(), &["--comm", "zt-app"]))),
    );
    let e = w.deny_event("comm is reported", |e| e.comm == "zt-app");
    assert_eq!(e.exe_ino, exe_key(&copy).1, "the event names the real file");
}

#[test]
fn argv0_is_not_an_identity() {
    let w = World::exe_only().start(&[]);
    let copy = w.impostor("zt-evil");
    let app = w.app.display().to_string();
    let mut real = cmd(&w.app, &w.tcp());
    real.arg0("curl");
    assert_eq!(
        run(real).0,
        "ok",
        "argv[0] does not matter for the real file"
    );
    let mut fake = cmd(&copy, &with(w.tcp(), &["--linger-ms", "1500"]));
    fake.arg0(&app);
    let (outcome, pid) = run(fake);
    w.assert_denied(
        "a copy started with argv[0] = the allowed path",
        (outcome, pid),
    );
    // argv is in the event for people; the decision used the file.
    let e = w.deny_event("argv is reported", |e| e.tgid == pid);
    assert_eq!(e.exe_ino, exe_key(&copy).1);
    let argv = e.argv.unwrap_or_default();
    assert_eq!(
        argv.first(),
        Some(&app),
        "argv[0] as the process set it: {argv:?}"
    );
    // Through execve, too.
    let exec = with(
        vec![
            "exec".into(),
            "--path".into(),
            copy.display().to_string(),
            "--argv0".into(),
            app,
        ],
        &w.tcp().iter().map(String::as_str).collect::<Vec<_>>(),
    );
    w.assert_denied(
        "execve(copy, argv[0] = allowed path)",
        run(cmd(&w.h.probe, &exec)),
    );
}

#[test]
fn copied_binary_is_denied() {
    let w = World::exe_only().start(&[]);
    let copy = w.impostor("zt-app-copy");
    assert_eq!(run(cmd(&w.app, &w.tcp())).0, "ok", "positive control");
    w.assert_denied("a byte-identical copy", run(cmd(&copy, &w.tcp())));
}

#[test]
fn symlink_to_another_file_is_denied_and_to_the_file_itself_allowed() {
    let w = World::exe_only().start(&[]);
    let copy = w.impostor("zt-app-copy");
    let links = tempfile::tempdir().expect("tempdir");
    let to_real = links.path().join("zt-app");
    let to_copy = links.path().join("zt-app-too");
    std::os::unix::fs::symlink(&w.app, &to_real).expect("symlink");
    std::os::unix::fs::symlink(&copy, &to_copy).expect("symlink");
    assert_eq!(
        run(cmd(&to_real, &w.tcp())).0,
        "ok",
        "a symlink to the allowed file runs the allowed file"
    );
    w.assert_denied(
        "a symlink named like the app, to a copy",
        run(cmd(&to_copy, &w.tcp())),
    );
}

#[test]
fn hardlink_is_the_same_file_and_matches() {
    // A hard link is another name for the same inode: the same file, the same content. Only
    // someone who may write to the directory can make one, and it cannot change the content
    // (writing through it writes the allowed file itself, which `sha256` then catches).
    let w = World::exe_only().start(&[]);
    let link = w.dir.path().join("zt-app-hardlink");
    std::fs::hard_link(&w.app, &link).expect("hard link");
    assert_eq!(run(cmd(&link, &w.tcp())).0, "ok", "same inode: matches");
    let copy = w.impostor("zt-app-copy");
    w.assert_denied("a copy next to the hard link", run(cmd(&copy, &w.tcp())));
}

/// Unmounts on drop.
struct BindMount(PathBuf);

impl Drop for BindMount {
    fn drop(&mut self) {
        let _ = nix::mount::umount2(&self.0, nix::mount::MntFlags::MNT_DETACH);
    }
}

#[test]
fn bind_mount_over_the_path_is_denied() {
    let w = World::exe_only().start(&[]);
    assert_eq!(run(cmd(&w.app, &w.tcp())).0, "ok", "positive control");
    let other = w.impostor("zt-other");
    nix::mount::mount(
        Some(&other),
        &w.app,
        None::<&str>,
        nix::mount::MsFlags::MS_BIND,
        None::<&str>,
    )
    .expect("bind mount");
    let _guard = BindMount(w.app.clone());
    w.assert_denied(
        "the allowed path with another file bind-mounted over it",
        run(cmd(&w.app, &w.tcp())),
    );
}

#[test]
fn memfd_exec_is_denied() {
    let w = World::exe_only().start(&[]);
    let app = w.app.display().to_string();
    let tcp = w.tcp();
    let tcp: Vec<&str> = tcp.iter().map(String::as_str).collect();
    let plain = with(vec!["exec".into(), "--path".into(), app.clone()], &tcp);
    assert_eq!(
        run(cmd(&w.app, &plain)).0,
        "ok",
        "the app exec'ing itself from its file"
    );
    let memfd = with(
        vec!["exec".into(), "--memfd".into(), "--path".into(), app],
        &tcp,
    );
    w.assert_denied(
        "the app's own bytes run from a memfd",
        run(cmd(&w.app, &memfd)),
    );
}

#[test]
fn exec_of_another_binary_from_the_allowed_process_is_denied() {
    let w = World::exe_only().start(&[]);
    let copy = w.impostor("zt-child");
    let tcp = w.tcp();
    let tcp: Vec<&str> = tcp.iter().map(String::as_str).collect();
    assert_eq!(
        run(cmd(
            &w.app,
            &with(
                vec!["exec".into(), "--path".into(), w.app.display().to_string()],
                &tcp
            )
        ))
        .0,
        "ok"
    );
    w.assert_denied(
        "the allowed process exec'ing another binary",
        run(cmd(
            &w.app,
            &with(
                vec!["exec".into(), "--path".into(), copy.display().to_string()],
                &tcp,
            ),
        )),
    );
    w.assert_denied(
        "the allowed process exec'ing a shell",
        run(cmd(
            &w.app,
            &with(
                vec!["exec".into(), "--path".into(), "/bin/sh".into()],
                &["-c", &format!("exec {} {}", copy.display(), tcp.join(" "))],
            ),
        )),
    );
}

#[test]
fn thread_of_the_allowed_process_is_allowed() {
    let w = World::exe_only().start(&[]);
    assert_eq!(
        run(cmd(&w.app, &with(w.tcp(), &["--in-thread"]))).0,
        "ok",
        "a thread is its process"
    );
    let copy = w.impostor("zt-threaded");
    let (outcome, pid) = run(cmd(&copy, &with(w.tcp(), &["--in-thread"])));
    w.assert_denied("a thread of a copy", (outcome, pid));
    let e = w.deny_event("thread", |e| e.tgid == pid);
    assert_ne!(e.pid, e.tgid, "made by the second thread: {e:?}");
}

#[test]
fn io_uring_worker_of_the_allowed_process_is_allowed() {
    // io_uring runs an IOSQE_ASYNC connect in an `iou-wrk` thread of the submitting
    // process: it is that process (same exe, same credentials).
    let w = World::exe_only().start(&[]);
    assert_eq!(
        run(cmd(&w.app, &with(w.tcp(), &["--io-uring"]))).0,
        "ok",
        "io_uring connect by the app"
    );
    let copy = w.impostor("zt-uring");
    let (outcome, pid) = run(cmd(&copy, &with(w.tcp(), &["--io-uring"])));
    w.assert_denied("io_uring connect by a copy", (outcome, pid));
    let e = w.deny_event("io_uring", |e| e.tgid == pid);
    assert_ne!(
        e.pid, e.tgid,
        "made by a worker thread of the process: {e:?}"
    );
}

#[test]
fn an_interpreter_is_the_identity_not_the_script() {
    // Documented: `exe = bash` admits every bash script; a copy of bash is another file.
    // (bash can connect by itself through /dev/tcp.)
    let w = World::new("exe = \"/bin/bash\"");
    let w = w.start(&[]);
    let script = |bash: &Path| {
        use std::os::unix::ffi::OsStrExt;
        let procs =
            std::ffi::CString::new(w.h.cgroup.path.join("cgroup.procs").as_os_str().as_bytes())
                .expect("path");
        let mut c = Command::new(bash);
        c.args([
            "-c",
            &format!(
                "(exec 3<>/dev/tcp/127.0.0.1/{}) 2>/dev/null && echo ok || echo eperm",
                w.port
            ),
        ]);
        // SAFETY: only async-signal-safe calls (open, write, close) between fork and exec.
        unsafe {
            c.pre_exec(move || {
                let fd = libc::open(procs.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
                if fd < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                let n = libc::write(fd, b"0".as_ptr().cast(), 1);
                libc::close(fd);
                if n == 1 {
                    Ok(())
                } else {
                    Err(std::io::Error::last_os_error())
                }
            });
        }
        run(c).0
    };
    assert_eq!(script(Path::new("/bin/bash")), "ok", "any bash script");
    let copy = w.dir.path().join("bash");
    std::fs::copy("/bin/bash", &copy).expect("copy bash");
    assert_eq!(script(&copy), "eperm", "a copy of the interpreter");
    let ino = exe_key(&copy).1;
    w.deny_event("a copy of bash", |e| e.exe_ino == ino);
}

#[test]
fn ld_preload_keeps_the_exe_identity() {
    // Documented limit: code injected into the allowed process (LD_PRELOAD, ptrace by the
    // same user) runs as that process. Scope such programs by user, cgroup or unit too.
    let w = World::exe_only().start(&[]);
    let lib = [
        "/lib/x86_64-linux-gnu/libm.so.6",
        "/lib/aarch64-linux-gnu/libm.so.6",
    ]
    .into_iter()
    .find(|p| Path::new(p).exists())
    .expect("libm");
    let mut c = cmd(&w.app, &w.tcp());
    c.env("LD_PRELOAD", lib);
    assert_eq!(
        run(c).0,
        "ok",
        "LD_PRELOAD into the allowed binary: same exe"
    );
    let copy = w.impostor("zt-preloaded");
    let mut c = cmd(&copy, &w.tcp());
    c.env("LD_PRELOAD", lib);
    w.assert_denied("LD_PRELOAD into a copy", run(c));
}

#[test]
fn setuid_to_another_uid_after_start_is_denied() {
    let w = World::exe_only().start(&[]);
    assert_eq!(run(cmd(&w.app, &w.tcp())).0, "ok", "as root");
    w.assert_denied(
        "the allowed binary after setresuid(65534)",
        run(cmd(&w.app, &with(w.tcp(), &["--uid", "65534"]))),
    );
    let e = w.deny_event("uid reported", |e| e.uid == 65534);
    assert_eq!(e.exe_ino, exe_key(&w.app).1);
}

#[test]
fn moving_to_another_cgroup_is_judged_as_the_new_cgroup() {
    let h_rel_placeholder = "{cg}";
    let w = World::new(&format!(
        "exe = \"{{app}}\"\ncgroup = \"{h_rel_placeholder}\""
    ));
    // The cgroup is only known once the harness exists: rewrite the policy.
    let allowed = w.h.cgroup.child("allowed");
    let other = w.h.cgroup.child("other");
    let text = std::fs::read_to_string(w.h.policy_dir.path().join("p.toml")).expect("read");
    w.h.write_policy(
        "p.toml",
        &text.replace(h_rel_placeholder, &w.h.cgroup.child_rel("allowed")),
    );
    let w = w.start(&[]);
    let args = |extra: &[&str]| {
        with(
            vec![
                "connect".into(),
                "--proto".into(),
                "tcp".into(),
                "--addr".into(),
                lo4(w.port).to_string(),
                "--cgroup".into(),
                allowed.display().to_string(),
            ],
            extra,
        )
    };
    assert_eq!(
        run(cmd(&w.app, &args(&[]))).0,
        "ok",
        "in the allowed cgroup"
    );
    w.assert_denied(
        "moved itself from the allowed cgroup to a sibling",
        run(cmd(
            &w.app,
            &args(&["--move-to", &other.display().to_string()]),
        )),
    );
}

#[test]
fn udp_without_connect_is_judged_too() {
    let w = World::exe_only().start(&[]);
    let udp = with(w.connect_args("udp", lo4(w.port)), &["--unconnected"]);
    assert_eq!(run(cmd(&w.app, &udp)).0, "ok", "sendto by the app");
    let copy = w.impostor("zt-sendto");
    w.assert_denied("sendto by a copy", run(cmd(&copy, &udp)));
}

#[test]
fn ipv6_is_judged_like_ipv4() {
    let w = World::exe_only().start(&[]);
    let v6 = w.connect_args("tcp", lo6(w.port));
    assert_eq!(run(cmd(&w.app, &v6)).0, "ok", "the app over IPv6");
    let copy = w.impostor("zt-v6");
    w.assert_denied("a copy over IPv6", run(cmd(&copy, &v6)));
    let udp6 = with(w.connect_args("udp", lo6(w.port)), &["--unconnected"]);
    w.assert_denied("a copy, unconnected UDP over IPv6", run(cmd(&copy, &udp6)));
}

#[test]
fn ipv4_mapped_ipv6_is_judged_as_ipv4() {
    let w = World::exe_only().start(&[]);
    for proto in ["tcp", "udp"] {
        let mapped = with(w.connect_args(proto, lo4(w.port)), &["--mapped"]);
        assert_eq!(
            run(cmd(&w.app, &mapped)).0,
            "ok",
            "{proto} ::ffff:127.0.0.1 by the app"
        );
        let copy = w.impostor(&format!("zt-mapped-{proto}"));
        w.assert_denied(
            &format!("{proto} to ::ffff:127.0.0.1 by a copy"),
            run(cmd(&copy, &mapped)),
        );
    }
}

#[test]
fn socket_created_before_ztd_started_is_not_trusted() {
    let w = World::new("exe = \"{app}\"\nuser = \"root\"");
    let copy = w.impostor("zt-early");
    // Connected before any program is attached: no hook saw it being made.
    let mut early_copy = Held::connect(&copy, &w.h.cgroup.path, lo4(w.port));
    let mut early_app = Held::connect(&w.app, &w.h.cgroup.path, lo4(w.port));
    assert_eq!(early_copy.send(), "ok", "before zt everything passes");
    let w = w.start(&[]);
    assert_eq!(
        run(cmd(&w.app, &with(w.connect_args("udp", lo4(w.port)), &[]))).0,
        "ok",
        "positive control: the app's new socket"
    );
    assert_eq!(
        early_copy.send(),
        "eperm",
        "the copy's early socket is cut off"
    );
    // Fail closed: a socket whose creator no hook saw has no executable, so even the app's
    // own early socket no longer matches an exe identity (documented in the README).
    assert_eq!(
        early_app.send(),
        "eperm",
        "an unattributed socket matches no exe"
    );
    w.deny_event("the early socket's packets", |e| e.hook == "skb_egress");
}

#[test]
fn upgrade_by_rename_follows_the_new_file() {
    let w = World::exe_only().start(&[]);
    let old = exe_key(&w.app);
    assert_eq!(run(cmd(&w.app, &w.tcp())).0, "ok");
    // A package manager's write-then-rename: a new inode at the same path.
    let staged = w.dir.path().join(".zt-app.new");
    std::fs::copy(&w.h.probe, &staged).expect("stage");
    std::fs::rename(&staged, &w.app).expect("rename");
    let n = w.wait_notice("exe_replaced", NOTICE_WAIT);
    assert_eq!(n["identity"], "app");
    assert_eq!(n["code"], 1);
    assert_eq!(
        n["generation"],
        w.ztd().status().generation,
        "the notice names the generation that follows the new file"
    );
    let new = exe_key(&w.app);
    assert_ne!(old, new);
    let st = w.status_identity();
    assert_eq!(st["exe_ino"], new.1, "status shows the new inode: {st}");
    assert_eq!(st["matchable"], true);
    assert_eq!(
        run(cmd(&w.app, &w.tcp())).0,
        "ok",
        "the new file is allowed"
    );
    let lines = w.ztd().lines().join("\n");
    assert!(lines.contains("exe_replaced"), "logged: {lines}");
    let text = w.h.ztctl(&["events"]);
    let text = String::from_utf8_lossy(&text.stdout);
    assert!(
        text.contains("notice exe_replaced identity=app"),
        "ztctl events shows the notice: {text}"
    );
}

#[test]
fn a_cgroup_created_after_start_is_followed() {
    let w = World::new("exe = \"{app}\"\ncgroup = \"{cg}\"");
    let late_rel = w.h.cgroup.child_rel("late");
    let text = std::fs::read_to_string(w.h.policy_dir.path().join("p.toml")).expect("read");
    w.h.write_policy("p.toml", &text.replace("{cg}", &late_rel));
    let w = w.start(&[]);
    let st = w.status_identity();
    assert_eq!(st["matchable"], false, "absent at start: {st}");
    let other = w.h.cgroup.child("other");
    let created = Instant::now();
    let late = w.h.cgroup.child("late");
    let call = |cg: &Path| {
        let mut a = w.connect_args("tcp", lo4(w.port));
        a.pop();
        a.push(cg.display().to_string());
        run(cmd(&w.app, &a))
    };
    let got = loop {
        let got = call(&late).0;
        if got == "ok" || created.elapsed() > Duration::from_secs(1) {
            break got;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(got, "ok", "followed within 1 s of mkdir");
    w.wait_notice("cgroup_changed", Duration::from_secs(1));
    assert_eq!(w.status_identity()["matchable"], true);
    w.assert_denied("the app in a sibling cgroup", call(&other));
}

fn sha256_of(path: &Path) -> String {
    let out = Command::new("sha256sum")
        .arg(path)
        .output()
        .expect("sha256sum");
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .expect("digest")
        .to_string()
}

#[test]
fn sha256_mismatch_disables_the_identity_and_a_good_file_restores_it() {
    let w = World::new("exe = \"{app}\"\nsha256 = \"{sum}\"\nuser = \"root\"");
    let sum = sha256_of(&w.app);
    let text = std::fs::read_to_string(w.h.policy_dir.path().join("p.toml")).expect("read");
    w.h.write_policy("p.toml", &text.replace("{sum}", &sum));
    let w = w.start(&[]);
    assert_eq!(run(cmd(&w.app, &w.tcp())).0, "ok", "the pinned content");
    let good = w.dir.path().join("good-copy");
    std::fs::copy(&w.app, &good).expect("keep a good copy");

    // Deleted and replaced by a file with other content (still a working program).
    std::fs::remove_file(&w.app).expect("rm");
    let mut bytes = std::fs::read(&w.h.probe).expect("read probe");
    bytes.extend_from_slice(b"\0tampered");
    std::fs::write(&w.app, &bytes).expect("write");
    std::fs::set_permissions(&w.app, std::os::unix::fs::PermissionsExt::from_mode(0o755))
        .expect("chmod");
    let n = w.wait_notice("sha256_mismatch", NOTICE_WAIT);
    assert_eq!(n["code"], 3);
    w.assert_denied(
        "a replaced file with other content",
        run(cmd(&w.app, &w.tcp())),
    );
    let st = w.status_identity();
    assert_eq!(st["matchable"], false, "{st}");
    assert!(
        st["problem"]
            .as_str()
            .unwrap_or("")
            .contains("sha256 mismatch"),
        "{st}"
    );
    let status = w.ztd().status();
    assert!(
        !status.healthy,
        "status is unhealthy while an identity is disabled"
    );
    assert!(status.problems.iter().any(|p| p.contains("identity app")));

    // The right content comes back (write-then-rename): the identity matches again.
    let staged = w.dir.path().join(".zt-app.new");
    std::fs::copy(&good, &staged).expect("stage");
    std::fs::rename(&staged, &w.app).expect("rename");
    w.wait_notice("restored", NOTICE_WAIT);
    assert_eq!(run(cmd(&w.app, &w.tcp())).0, "ok", "restored");
    assert!(w.ztd().status().problems.is_empty());
}

#[test]
fn in_place_rewrite_is_caught_by_sha256() {
    let w = World::new("exe = \"{app}\"\nsha256 = \"{sum}\"");
    let sum = sha256_of(&w.app);
    let text = std::fs::read_to_string(w.h.policy_dir.path().join("p.toml")).expect("read");
    w.h.write_policy("p.toml", &text.replace("{sum}", &sum));
    let w = w.start(&[]);
    assert_eq!(run(cmd(&w.app, &w.tcp())).0, "ok");
    let inode = exe_key(&w.app);
    // Same inode, new content: the dev+inode pin alone would still match.
    let mut f = std::fs::OpenOptions::new()
        .append(true)
        .open(&w.app)
        .expect("open for append");
    std::io::Write::write_all(&mut f, b"\0more").expect("append");
    drop(f);
    assert_eq!(exe_key(&w.app), inode);
    w.wait_notice("sha256_mismatch", NOTICE_WAIT);
    w.assert_denied(
        "the same inode with other content",
        run(cmd(&w.app, &w.tcp())),
    );
}

#[test]
fn unit_restart_with_a_recreated_cgroup_is_followed_and_the_old_id_dropped() {
    let w = World::new("unit = \"web.service\"");
    let units = w.h.cgroup.child("units");
    let slice = w.h.cgroup.child("units/system.slice");
    let unit_dir = w.h.cgroup.child("units/system.slice/web.service");
    let other = w.h.cgroup.child("units/system.slice/other.service");
    let w = w.start(&["--units-root", &units.display().to_string()]);
    let first_id = exe_key_dir(&unit_dir);
    let st = w.status_identity();
    assert_eq!(st["cgroup_id"], first_id, "{st}");
    assert_eq!(st["matchable"], true);
    let call = |cg: &Path| {
        let mut a = w.connect_args("tcp", lo4(w.port));
        a.pop();
        a.push(cg.display().to_string());
        run(cmd(&w.h.probe, &a))
    };
    assert_eq!(call(&unit_dir).0, "ok", "a process of the unit");
    w.assert_denied("a process of another unit", call(&other));

    // The unit restarts: its cgroup is removed and made again, with a new id.
    std::fs::remove_dir(&unit_dir).expect("rmdir");
    w.wait_notice("cgroup_gone", NOTICE_WAIT);
    let restarted = Instant::now();
    std::fs::create_dir(&unit_dir).expect("mkdir");
    let new_id = exe_key_dir(&unit_dir);
    assert_ne!(first_id, new_id, "a recreated cgroup has a new id");
    let end = restarted + Duration::from_secs(1);
    let got = loop {
        let got = call(&unit_dir).0;
        if got == "ok" || Instant::now() >= end {
            break got;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(got, "ok", "followed within 1 s");
    w.wait_notice("cgroup_changed", Duration::from_secs(1));
    let st = w.status_identity();
    assert_eq!(st["cgroup_id"], new_id, "{st}");
    w.assert_denied("still not another unit", call(&other));
    let _ = slice;
}

fn exe_key_dir(dir: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(dir).expect("stat").ino()
}

#[test]
fn status_lists_what_each_identity_resolved_to() {
    let w = World::exe_only().start(&[]);
    let st = w.status_identity();
    let (dev, ino) = exe_key(&w.app);
    assert_eq!(st["name"], "app");
    assert_eq!(st["exe_ino"], ino);
    assert_eq!(
        st["exe_dev"],
        format!("{}:{}", dev >> 20, dev & 0xf_ffff),
        "{st}"
    );
    assert_eq!(st["user"], "root");
    assert_eq!(st["uid"], 0);
    assert_eq!(st["matchable"], true);
    let human = w.h.ztctl(&["status"]);
    let text = String::from_utf8_lossy(&human.stdout);
    assert!(text.contains("IDENTITY"), "{text}");
    assert!(text.contains(&format!(":{ino}")), "{text}");
    assert!(text.contains("user root = uid 0"), "{text}");
    // The positive control and a denial, so that the status is of a working policy.
    assert_eq!(run(cmd(&w.app, &w.tcp())).0, "ok");
    let copy = w.impostor("zt-status");
    w.assert_denied("a copy", run(cmd(&copy, &w.tcp())));
}

#[test]
fn replacement_is_followed_even_while_the_policy_file_is_being_edited() {
    let w = World::exe_only().start(&[]);
    // A half-written policy file: the file watch refuses it, the last good policy stays.
    w.h.write_policy("p.toml", "version = 1\n[identity.app\n");
    let refused = Instant::now() + NOTICE_WAIT;
    while !w.ztd().lines().iter().any(|l| l.contains("reload refused")) {
        assert!(Instant::now() < refused, "{}", w.ztd().lines().join("\n"));
        std::thread::sleep(Duration::from_millis(50));
    }
    let staged = w.dir.path().join(".zt-app.new");
    std::fs::copy(&w.h.probe, &staged).expect("stage");
    std::fs::rename(&staged, &w.app).expect("rename");
    // Identities are resolved again from the text that was compiled, not the broken file.
    w.wait_notice("exe_replaced", NOTICE_WAIT);
    assert_eq!(
        run(cmd(&w.app, &w.tcp())).0,
        "ok",
        "the new file is allowed"
    );
    let copy = w.impostor("zt-copy");
    w.assert_denied("a copy", run(cmd(&copy, &w.tcp())));
}
