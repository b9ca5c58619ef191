//! Harness for zt's integration tests against the real kernel. Every resource a test makes —
//! a child cgroup, a bpffs pin directory, a control socket, network namespaces, processes —
//! is owned by a guard that removes it on drop, also when the test fails. Nothing is ever
//! attached to the root cgroup or to an interface of the main network namespace.

use std::{
    io::{BufRead, BufReader},
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    sync::{
        atomic::{AtomicU32, Ordering},
        Arc, Mutex,
    },
    time::{Duration, Instant},
};

use zt::{
    control::{self, Request, Response, Status},
    loader::{self, Layout},
    sys,
};

static NEXT_ID: AtomicU32 = AtomicU32::new(0);

/// A short name unique to this process and call.
pub fn unique(prefix: &str) -> String {
    format!(
        "{prefix}{}-{}",
        std::process::id(),
        NEXT_ID.fetch_add(1, Ordering::Relaxed)
    )
}

/// Where `ztd` and `ztctl` are: `$ZT_BIN_DIR`, else `<workspace>/target/release`.
pub fn bin_dir() -> PathBuf {
    std::env::var_os("ZT_BIN_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/release"))
}

pub fn bin(name: &str) -> PathBuf {
    let path = bin_dir().join(name);
    assert!(
        path.exists(),
        "{} is missing: run `cargo xtask build` (or `cargo xtask test`) first",
        path.display()
    );
    path
}

fn require_root() {
    assert!(
        nix::unistd::Uid::effective().is_root(),
        "integration tests need root (cgroups, bpffs, network namespaces)"
    );
}

/// A cgroup we created under the cgroup2 mount; removed (with its children) on drop, after
/// killing the processes in it — which are only the probes this test started there.
pub struct Cgroup {
    pub path: PathBuf,
    /// Path relative to the cgroup2 root, as policies name it.
    pub rel: String,
}

impl Cgroup {
    pub fn new_top(name: &str) -> Cgroup {
        require_root();
        let root = sys::cgroup2_root().expect("cgroup2 mount");
        let path = root.join(name);
        std::fs::create_dir(&path).unwrap_or_else(|e| panic!("mkdir {}: {e}", path.display()));
        Cgroup {
            path,
            rel: name.to_string(),
        }
    }

    /// A child cgroup; dropped with its parent at the latest.
    pub fn child(&self, name: &str) -> PathBuf {
        let path = self.path.join(name);
        std::fs::create_dir_all(&path).unwrap_or_else(|e| panic!("mkdir {}: {e}", path.display()));
        path
    }

    pub fn child_rel(&self, name: &str) -> String {
        format!("{}/{name}", self.rel)
    }

    fn remove(dir: &Path) {
        if let Ok(entries) = std::fs::read_dir(dir) {
            for e in entries.flatten() {
                if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                    Self::remove(&e.path());
                }
            }
        }
        for _ in 0..50 {
            if let Ok(procs) = std::fs::read_to_string(dir.join("cgroup.procs")) {
                for pid in procs
                    .split_whitespace()
                    .filter_map(|p| p.parse::<i32>().ok())
                {
                    let _ = nix::sys::signal::kill(
                        nix::unistd::Pid::from_raw(pid),
                        nix::sys::signal::Signal::SIGKILL,
                    );
                }
            }
            if std::fs::remove_dir(dir).is_ok() || !dir.exists() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        eprintln!("warning: could not remove cgroup {}", dir.display());
    }
}

impl Drop for Cgroup {
    fn drop(&mut self) {
        Self::remove(&self.path);
    }
}

/// A bpffs pin directory; everything in it is unpinned (detaching links) on drop.
pub struct PinDir {
    pub path: PathBuf,
}

impl PinDir {
    pub fn new(name: &str) -> PinDir {
        require_root();
        let path = Path::new("/sys/fs/bpf").join(name);
        sys::ensure_bpffs(Path::new("/sys/fs/bpf")).expect("bpffs");
        PinDir { path }
    }
}

impl Drop for PinDir {
    fn drop(&mut self) {
        let _ = loader::unload(&Layout {
            bpffs: self.path.clone(),
        });
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

/// A running `ztd` we started; killed (by pid) on drop. Its output is collected.
pub struct Ztd {
    child: Option<Child>,
    pub output: Arc<Mutex<Vec<String>>>,
    pub socket: PathBuf,
}

impl Ztd {
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    pub fn lines(&self) -> Vec<String> {
        self.output.lock().map(|v| v.clone()).unwrap_or_default()
    }

    /// Wait for a line of output containing every one of `needles`.
    pub fn wait_line(&self, needles: &[&str], timeout: Duration) -> Option<String> {
        let end = Instant::now() + timeout;
        while Instant::now() < end {
            if let Some(l) = self
                .lines()
                .into_iter()
                .find(|l| needles.iter().all(|n| l.contains(n)))
            {
                return Some(l);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        None
    }

    pub fn status(&self) -> Status {
        match control::request(&self.socket, &Request::Status, Duration::from_secs(20)) {
            Ok(Response::Status(st)) => *st,
            other => panic!(
                "status failed: {other:?}\nztd output:\n{}",
                self.lines().join("\n")
            ),
        }
    }

    /// `kill -9`, and wait for it.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM, and wait for the exit status.
    pub fn terminate(&mut self) -> Option<std::process::ExitStatus> {
        let mut c = self.child.take()?;
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(c.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
        c.wait().ok()
    }

    /// Wait for the process to exit by itself.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let end = Instant::now() + timeout;
        while Instant::now() < end {
            if let Some(c) = self.child.as_mut() {
                if let Ok(Some(st)) = c.try_wait() {
                    self.child = None;
                    return Some(st);
                }
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        None
    }
}

impl Drop for Ztd {
    fn drop(&mut self) {
        self.kill9();
        let _ = std::fs::remove_file(&self.socket);
    }
}

/// One test's world: a guarded cgroup, pin directory, socket and policy directory.
pub struct Harness {
    pub name: String,
    pub cgroup: Cgroup,
    pub pins: PinDir,
    pub socket: PathBuf,
    pub policy_dir: tempfile::TempDir,
    pub probe: PathBuf,
}

impl Harness {
    pub fn new(probe: &str) -> Harness {
        let name = unique("zt-test-");
        Harness {
            cgroup: Cgroup::new_top(&name),
            pins: PinDir::new(&name),
            socket: std::env::temp_dir().join(format!("{name}.sock")),
            policy_dir: tempfile::tempdir().expect("tempdir"),
            probe: PathBuf::from(probe),
            name,
        }
    }

    /// Write `policy.toml` (replacing earlier files of that name).
    pub fn write_policy(&self, file: &str, text: &str) -> PathBuf {
        let path = self.policy_dir.path().join(file);
        std::fs::write(&path, text).expect("write policy");
        path
    }

    pub fn ztd_command(&self, extra: &[&str]) -> Command {
        let mut cmd = Command::new(bin("ztd"));
        cmd.arg("--policy")
            .arg(self.policy_dir.path())
            .arg("--cgroup")
            .arg(&self.cgroup.path)
            .arg("--bpffs")
            .arg(&self.pins.path)
            .arg("--socket")
            .arg(&self.socket)
            .args(extra);
        cmd
    }

    /// Start `ztd` and wait until it answers `status`.
    pub fn start_ztd(&self, extra: &[&str]) -> Ztd {
        let ztd = self.spawn_ztd(extra);
        self.wait_ready(ztd, Instant::now() + Duration::from_secs(30))
    }

    fn wait_ready(&self, mut ztd: Ztd, end: Instant) -> Ztd {
        loop {
            if let Ok(Response::Status(_)) =
                control::request(&self.socket, &Request::Status, Duration::from_secs(5))
            {
                return ztd;
            }
            if let Some(st) = ztd.wait_exit(Duration::from_millis(100)) {
                panic!(
                    "ztd exited with {st} before it was ready:\n{}",
                    ztd.lines().join("\n")
                );
            }
            assert!(
                Instant::now() < end,
                "ztd not ready after 30 s:\n{}",
                ztd.lines().join("\n")
            );
        }
    }

    /// Start `ztd` without waiting.
    pub fn spawn_ztd(&self, extra: &[&str]) -> Ztd {
        let mut child = self
            .ztd_command(extra)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn ztd");
        let output = Arc::new(Mutex::new(Vec::new()));
        for stream in [
            child
                .stdout
                .take()
                .map(|s| Box::new(s) as Box<dyn std::io::Read + Send>),
            child
                .stderr
                .take()
                .map(|s| Box::new(s) as Box<dyn std::io::Read + Send>),
        ]
        .into_iter()
        .flatten()
        {
            let output = Arc::clone(&output);
            std::thread::spawn(move || {
                for line in BufReader::new(stream).lines().map_while(Result::ok) {
                    if let Ok(mut o) = output.lock() {
                        o.push(line);
                    }
                }
            });
        }
        Ztd {
            child: Some(child),
            output,
            socket: self.socket.clone(),
        }
    }

    pub fn ztctl(&self, args: &[&str]) -> Output {
        Command::new(bin("ztctl"))
            .arg("--socket")
            .arg(&self.socket)
            .args(args)
            .output()
            .expect("run ztctl")
    }

    /// A probe call from inside the guarded cgroup.
    pub fn call(&self, proto: &str, addr: SocketAddr) -> String {
        self.probe_call(Call::new(proto, addr).cgroup(&self.cgroup.path))
    }

    pub fn probe_call(&self, call: Call) -> String {
        call.run(&self.probe)
    }

    /// Ids of the programs the kernel has attached to the guarded cgroup, per hook.
    pub fn attached_programs(&self) -> Vec<Vec<u32>> {
        let fd = sys::open_dir(&self.cgroup.path).expect("open cgroup");
        zt_common::Hook::ALL
            .into_iter()
            .map(|h| {
                sys::prog_query(std::os::fd::AsFd::as_fd(&fd), loader::attach_type(h))
                    .expect("BPF_PROG_QUERY")
            })
            .collect()
    }
}

/// One probe call and the identity it makes it with.
#[derive(Clone, Debug)]
pub struct Call {
    args: Vec<String>,
    exe: Option<PathBuf>,
}

impl Call {
    pub fn new(proto: &str, addr: SocketAddr) -> Call {
        Call {
            args: vec![
                "connect".into(),
                "--proto".into(),
                proto.into(),
                "--addr".into(),
                addr.to_string(),
            ],
            exe: None,
        }
    }
    fn arg(mut self, k: &str, v: impl ToString) -> Call {
        self.args.push(k.into());
        self.args.push(v.to_string());
        self
    }
    pub fn cgroup(self, path: &Path) -> Call {
        self.arg("--cgroup", path.display())
    }
    pub fn netns(self, path: &Path) -> Call {
        self.arg("--netns", path.display())
    }
    pub fn uid(self, uid: u32) -> Call {
        self.arg("--uid", uid)
    }
    /// Run with real uid `uid` and effective uid `euid`.
    pub fn real_and_effective_uid(self, uid: u32, euid: u32) -> Call {
        self.arg("--uid", uid).arg("--euid", euid)
    }
    pub fn gid(self, gid: u32) -> Call {
        self.arg("--gid", gid)
    }
    pub fn unconnected(mut self) -> Call {
        self.args.push("--unconnected".into());
        self
    }
    pub fn mapped(mut self) -> Call {
        self.args.push("--mapped".into());
        self
    }
    /// Run this executable (a copy of the probe, say) instead of the probe.
    pub fn exe(mut self, exe: &Path) -> Call {
        self.exe = Some(exe.to_path_buf());
        self
    }
    pub fn run(&self, probe: &Path) -> String {
        let out = Command::new(self.exe.as_deref().unwrap_or(probe))
            .args(&self.args)
            .output()
            .expect("run zt-probe");
        let text = String::from_utf8_lossy(&out.stdout).trim().to_string();
        if text.is_empty() {
            format!(
                "error:no output; stderr: {}",
                String::from_utf8_lossy(&out.stderr)
            )
        } else {
            text
        }
    }
}

/// Echo servers (TCP and UDP) run by the probe, killed by pid on drop.
pub struct Server {
    child: Child,
    pub ports: Vec<u16>,
}

impl Server {
    /// Serve on `bind` addresses; `ports` 0 picks free ones.
    pub fn start(probe: &Path, bind: &[&str], ports: &[u16], netns: Option<&Path>) -> Server {
        let mut cmd = Command::new(probe);
        cmd.arg("serve")
            .arg("--bind")
            .arg(bind.join(","))
            .arg("--ports")
            .arg(
                ports
                    .iter()
                    .map(|p| p.to_string())
                    .collect::<Vec<_>>()
                    .join(","),
            )
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        if let Some(ns) = netns {
            cmd.arg("--netns").arg(ns);
        }
        let mut child = cmd.spawn().expect("spawn server");
        let mut line = String::new();
        if let Some(out) = child.stdout.take() {
            let _ = BufReader::new(out).read_line(&mut line);
        }
        let ports = line
            .trim()
            .strip_prefix("ready ")
            .unwrap_or_else(|| {
                let _ = child.kill();
                panic!("server did not start: {line:?}")
            })
            .split_whitespace()
            .filter_map(|p| p.parse().ok())
            .collect();
        Server { child, ports }
    }

    /// Loopback servers (127.0.0.1 and ::1) on `n` free ports.
    pub fn loopback(probe: &Path, n: usize) -> Server {
        Server::start(probe, &["127.0.0.1", "::1"], &vec![0; n], None)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Two network namespaces joined by a veth pair (client side `a`, server side `b`), with
/// IPv4 and IPv6 addresses; deleted on drop. Nothing touches the main namespace.
pub struct NetPair {
    pub a: String,
    pub b: String,
    /// Third octet used in the 198.18.X.0/24 and 198.19.X.0/24 test networks.
    pub x: u8,
}

fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().expect("run ip");
    assert!(
        out.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

impl NetPair {
    pub fn new() -> NetPair {
        require_root();
        let n = NEXT_ID.fetch_add(1, Ordering::Relaxed);
        let tag = format!("{}{}", std::process::id() % 100_000, n);
        let x = ((std::process::id() as u8) ^ (n as u8 * 37)) % 250 + 1;
        let pair = NetPair {
            a: format!("zta{tag}"),
            b: format!("ztb{tag}"),
            x,
        };
        ip(&["netns", "add", &pair.a]);
        ip(&["netns", "add", &pair.b]);
        let (va, vb) = (format!("va{tag}"), format!("vb{tag}"));
        ip(&[
            "link", "add", &va, "netns", &pair.a, "type", "veth", "peer", "name", &vb, "netns",
            &pair.b,
        ]);
        let a4 = [format!("198.18.{x}.1/24"), format!("198.19.{x}.1/24")];
        let b4 = [
            format!("198.18.{x}.2/24"),
            format!("198.18.{x}.3/24"),
            format!("198.19.{x}.2/24"),
        ];
        for addr in &a4 {
            ip(&["-n", &pair.a, "addr", "add", addr, "dev", &va]);
        }
        for addr in &b4 {
            ip(&["-n", &pair.b, "addr", "add", addr, "dev", &vb]);
        }
        ip(&[
            "-n",
            &pair.a,
            "-6",
            "addr",
            "add",
            &format!("fd00:5a:{x}::1/64"),
            "dev",
            &va,
            "nodad",
        ]);
        ip(&[
            "-n",
            &pair.b,
            "-6",
            "addr",
            "add",
            &format!("fd00:5a:{x}::2/64"),
            "dev",
            &vb,
            "nodad",
        ]);
        for (ns, dev) in [(&pair.a, &va), (&pair.b, &vb)] {
            ip(&["-n", ns, "link", "set", "lo", "up"]);
            ip(&["-n", ns, "link", "set", dev, "up"]);
        }
        pair
    }

    pub fn path_a(&self) -> PathBuf {
        Path::new("/run/netns").join(&self.a)
    }
    pub fn path_b(&self) -> PathBuf {
        Path::new("/run/netns").join(&self.b)
    }
    /// An address of the server namespace.
    pub fn b_addr(&self, which: &str, port: u16) -> SocketAddr {
        let x = self.x;
        let s = match which {
            "main" => format!("198.18.{x}.2:{port}"),
            "same-net" => format!("198.18.{x}.3:{port}"),
            "other-net" => format!("198.19.{x}.2:{port}"),
            "v6" => format!("[fd00:5a:{x}::2]:{port}"),
            other => panic!("unknown address {other}"),
        };
        s.parse().expect("address")
    }
}

impl Default for NetPair {
    fn default() -> Self {
        NetPair::new()
    }
}

impl Drop for NetPair {
    fn drop(&mut self) {
        for ns in [&self.a, &self.b] {
            let _ = Command::new("ip").args(["netns", "del", ns]).output();
        }
    }
}
