//! The adversary suite: an unprivileged user (uid 65534) inside the guarded cgroup who tries
//! to pass for an allowed executable by changing what the kernel reports as its executable,
//! rather than by running it.
//!
//! The policy allows exactly one executable (`zt-app`, a private copy of the probe) to one
//! peer. Each attack is checked twice over: that it really worked (`/proc/<pid>/exe` names
//! `zt-app` afterwards: only zt stands in the way) and that zt still denied it with a deny
//! event — next to the positive control, `zt-app` itself as the same user, allowed.

use std::{
    io::{BufRead, BufReader, Write},
    net::SocketAddr,
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use zt_integration::{exe_key, Harness, Server, Ztd};

const PROBE: &str = env!("CARGO_BIN_EXE_zt-probe");
const NOBODY: &str = "65534";

fn lo4(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

struct World {
    h: Harness,
    _srv: Server,
    port: u16,
    dir: tempfile::TempDir,
    app: PathBuf,
}

impl World {
    fn new() -> World {
        let h = Harness::new(PROBE);
        let srv = Server::loopback(&h.probe, 1);
        let port = srv.ports[0];
        let dir = tempfile::tempdir().expect("tempdir");
        // uid 65534 must be able to open and run the files in it.
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755))
            .expect("chmod");
        let app = dir.path().join("zt-app");
        std::fs::copy(&h.probe, &app).expect("copy the probe");
        zt_integration::wait_executable(&app);
        h.write_policy(
            "p.toml",
            &format!(
                r#"version = 1
[identity.app]
exe = "{}"

[network.echo]
cidrs = ["127.0.0.1/32"]

[[rule]]
action = "allow"
identity = "app"
peer = "echo"
ports = [{port}]
"#,
                app.display()
            ),
        );
        World {
            h,
            _srv: srv,
            port,
            dir,
            app,
        }
    }

    fn start(&self) -> Ztd {
        self.h.start_ztd(&[])
    }

    /// `connect` to the echo server from the guarded cgroup as uid 65534.
    fn connect_args(&self, extra: &[&str]) -> Vec<String> {
        let mut args: Vec<String> = [
            "connect",
            "--proto",
            "tcp",
            "--addr",
            &lo4(self.port).to_string(),
            "--cgroup",
            &self.h.cgroup.path.display().to_string(),
            "--uid",
            NOBODY,
            "--gid",
            NOBODY,
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        args.extend(extra.iter().map(|s| s.to_string()));
        args
    }

    /// The exe swap, by the (not allowed) probe, naming `zt-app`.
    fn disguise_args(&self, clone_vm: bool) -> Vec<String> {
        let mut args: Vec<String> = [
            "disguise",
            "--proto",
            "tcp",
            "--addr",
            &lo4(self.port).to_string(),
            "--as",
            &self.app.display().to_string(),
            "--cgroup",
            &self.h.cgroup.path.display().to_string(),
            "--uid",
            NOBODY,
            "--gid",
            NOBODY,
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        if clone_vm {
            args.push("--clone-vm".into());
        }
        args
    }

    fn deny_event(&self, ztd: &Ztd, what: &str, tgid: u32) -> zt::history::EventRecord {
        let end = Instant::now() + Duration::from_secs(5);
        loop {
            if let Some(e) = self
                .h
                .events(&["--verdict", "deny"])
                .into_iter()
                .find(|e| e.peer_port == self.port && e.tgid == tgid)
            {
                return e;
            }
            assert!(
                Instant::now() < end,
                "{what}: no deny event; ztd said:\n{}",
                ztd.lines().join("\n")
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

/// Run `exe args`; `(stdout lines, pid)`.
fn run(exe: &Path, args: &[String]) -> (Vec<String>, u32) {
    let child = Command::new(exe)
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    let pid = child.id();
    let out = child.wait_with_output().expect("wait");
    let mut lines: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_string)
        .collect();
    if lines.is_empty() {
        lines.push(format!(
            "error:no output; stderr: {}",
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    (lines, pid)
}

fn attack(clone_vm: bool) {
    let w = World::new();
    let ztd = w.start();
    // Positive control: the allowed executable itself, as the same user, same call.
    let (out, _) = run(&w.app, &w.connect_args(&[]));
    assert_eq!(out, ["ok"], "zt-app as uid 65534 is allowed");

    let (out, pid) = run(&w.h.probe, &w.disguise_args(clone_vm));
    // The attack worked: the kernel now reports zt-app as the process's executable.
    assert_eq!(
        out.first().map(String::as_str),
        Some(format!("exe={}", w.app.display()).as_str()),
        "the exe swap must succeed (clone_vm={clone_vm}): {out:?}"
    );
    // ... and zt judged the file the process was exec'd from.
    assert_eq!(
        out.get(1).map(String::as_str),
        Some("eperm"),
        "a process that swapped its exe to the allowed one is denied (clone_vm={clone_vm}): {out:?}"
    );
    let e = w.deny_event(&ztd, "exe swap", pid);
    assert_eq!(
        (e.exe_dev, e.exe_ino),
        exe_key(&w.h.probe),
        "the event names the executable the kernel loaded: {e:?}"
    );
    assert_eq!(e.uid, 65534, "{e:?}");
}

#[test]
fn exe_swapped_with_pr_set_mm_map_is_still_the_exec_identity() {
    attack(false);
}

#[test]
fn exe_swapped_from_a_clone_vm_child_is_still_the_exec_identity() {
    attack(true);
}

#[test]
fn fork_child_and_thread_inherit_the_exec_identity() {
    let w = World::new();
    let ztd = w.start();
    for how in ["--in-fork", "--in-thread"] {
        let (out, _) = run(&w.app, &w.connect_args(&[how]));
        assert_eq!(out, ["ok"], "zt-app {how} inherits zt-app's identity");
    }
    // The same from another executable is denied: the child is judged, by its inheritance.
    let other = w.dir.path().join("zt-other");
    std::fs::copy(&w.h.probe, &other).expect("copy");
    zt_integration::wait_executable(&other);
    let (out, pid) = run(&other, &w.connect_args(&["--in-fork"]));
    assert_eq!(out, ["eperm"], "a fork of another executable is denied");
    let e =
        w.h.events(&["--verdict", "deny"])
            .into_iter()
            .find(|e| e.peer_port == w.port && e.tgid != pid && e.exe_ino == exe_key(&other).1);
    assert!(
        e.is_some(),
        "a deny event from the forked child (another tgid), naming zt-other; ztd said:\n{}",
        ztd.lines().join("\n")
    );
}

/// A `zt-app batch` process: one call per line written to it.
struct Batch {
    child: std::process::Child,
    out: BufReader<std::process::ChildStdout>,
}

impl Batch {
    fn start(exe: &Path, cgroup: &Path) -> Batch {
        let mut child = Command::new(exe)
            .args(["batch", "--cgroup"])
            .arg(cgroup)
            .args(["--uid", NOBODY, "--gid", NOBODY])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("spawn batch");
        let out = BufReader::new(child.stdout.take().expect("stdout"));
        Batch { child, out }
    }

    fn send(&mut self, line: &str) {
        let stdin = self.child.stdin.as_mut().expect("stdin");
        stdin
            .write_all(format!("{line}\n").as_bytes())
            .expect("write");
        stdin.flush().expect("flush");
    }

    /// One TCP connect; its outcome.
    fn connect(&mut self, addr: SocketAddr) -> String {
        self.send(&format!("tcp {addr}"));
        self.send("flush");
        let mut line = String::new();
        self.out.read_line(&mut line).expect("read");
        line.trim().to_string()
    }
}

impl Drop for Batch {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn a_process_running_before_zt_started_has_no_exe_identity_until_it_execs() {
    let w = World::new();
    let mut old = Batch::start(&w.app, &w.h.cgroup.path);
    // No zt yet: the call goes through (and proves the process is set up and running).
    assert_eq!(old.connect(lo4(w.port)), "ok", "before ztd");
    let ztd = w.start();
    // Positive control: zt-app started now is allowed.
    let (out, _) = run(&w.app, &w.connect_args(&[]));
    assert_eq!(out, ["ok"], "zt-app started after ztd");
    // The old process runs the same file, but zt never saw it exec: no exe identity.
    assert_eq!(
        old.connect(lo4(w.port)),
        "eperm",
        "a process running before zt started has no exe identity"
    );
    w.deny_event(&ztd, "no exec record", old.child.id());
    let st = w.h.status_json();
    assert!(
        st["decisions"]["no_exec_record"].as_u64().unwrap_or(0) >= 1,
        "status counts decisions about callers without an exec record: {st}"
    );
    let text = String::from_utf8_lossy(&w.h.ztctl(&["status"]).stdout).to_string();
    assert!(
        text.contains("no exec record"),
        "ztctl status says so:\n{text}"
    );
    // Once it execs (same pid, same cgroup and ids), it is zt-app again.
    old.send(&format!("exec {}", w.app.display()));
    // Wait for the new image before writing more (the old one could read ahead and take
    // the next lines with it).
    let cmdline = format!("/proc/{}/cmdline", old.child.id());
    let want = format!("{}\0batch\0", w.app.display());
    let end = Instant::now() + Duration::from_secs(10);
    while std::fs::read_to_string(&cmdline).unwrap_or_default() != want {
        assert!(Instant::now() < end, "the old process did not exec");
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(old.connect(lo4(w.port)), "ok", "after its exec");
}

#[test]
fn ztd_warns_when_ptrace_can_borrow_an_exe_identity() {
    let w = World::new();
    let ztd = w.start();
    let scope = std::fs::read_to_string("/proc/sys/kernel/yama/ptrace_scope")
        .ok()
        .and_then(|s| s.trim().parse::<u32>().ok());
    let warned = ztd.wait_line(&["ptrace"], Duration::from_secs(5)).is_some();
    match scope {
        Some(s) if s >= 2 => assert!(!warned, "no warning at ptrace_scope {s}"),
        _ => assert!(
            warned,
            "ptrace_scope {scope:?} (< 2 or no Yama) with an exe identity: ztd warns; it said:\n{}",
            ztd.lines().join("\n")
        ),
    }
}

#[test]
fn exec_records_outlive_ztd_and_a_removed_tracepoint_pin_is_repaired() {
    let w = World::new();
    let mut ztd = w.start();
    let other = w.dir.path().join("zt-other");
    std::fs::copy(&w.h.probe, &other).expect("copy");
    zt_integration::wait_executable(&other);
    let enforced = |when: &str| {
        assert_eq!(run(&w.app, &w.connect_args(&[])).0, ["ok"], "zt-app {when}");
        assert_eq!(
            run(&other, &w.connect_args(&[])).0,
            ["eperm"],
            "another executable {when}"
        );
    };
    enforced("at start");
    // Pinned: execs are recorded while no ztd runs.
    ztd.kill9();
    enforced("while ztd is down");
    let ztd = w.start();
    enforced("after a restart");
    let st = ztd.status();
    for name in ["sched_exec", "sched_fork", "sched_exit"] {
        let hook = st.hooks.iter().find(|h| h.hook == name);
        assert!(
            hook.is_some_and(|h| h.attached && h.prog_id > 0),
            "{name} attached after adoption: {:?}",
            st.hooks
        );
    }
    assert!(st.healthy, "{st:?}");

    // Tamper: unpin the exec tracepoint (its link detaches with the pin).
    std::fs::remove_file(w.h.pins.path.join("links/sched_exec")).expect("unpin");
    let st = ztd.status();
    assert!(
        st.problems.iter().any(|p| p.contains("sched_exec")),
        "reported: {st:?}"
    );
    let st = ztd.wait_status(Duration::from_secs(10), |s| s.healthy && s.repairs >= 1);
    assert!(st.healthy && st.repairs >= 1, "repaired: {st:?}");
    assert!(w.h.pins.path.join("links/sched_exec").exists(), "re-pinned");
    enforced("after the repair");
}
