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

/// `d` times `$ZT_TEST_TIME_SCALE` (default 1): the harness's finite waits (ztd ready,
/// status answers, output lines) stretched for slow machines, e.g. an emulated CPU in
/// `cargo xtask vm-test`. A wait polls its condition, so a bigger scale costs nothing when
/// things are fast.
pub fn patience(d: Duration) -> Duration {
    let scale = std::env::var("ZT_TEST_TIME_SCALE")
        .ok()
        .and_then(|s| s.parse::<u32>().ok())
        .filter(|s| *s > 0)
        .unwrap_or(1);
    d * scale
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
    /// The threads copying stdout and stderr into `output`.
    readers: Vec<std::thread::JoinHandle<()>>,
}

impl Ztd {
    /// Collect the lines `child` prints on stdout and stderr (both piped) into `output`.
    fn capture(mut child: Child, socket: PathBuf) -> Ztd {
        let output = Arc::new(Mutex::new(Vec::new()));
        let mut readers = Vec::new();
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
            readers.push(std::thread::spawn(move || {
                for line in BufReader::new(stream).lines().map_while(Result::ok) {
                    if let Ok(mut o) = output.lock() {
                        o.push(line);
                    }
                }
            }));
        }
        Ztd {
            child: Some(child),
            output,
            socket,
            readers,
        }
    }

    /// After the process exited: wait (up to 5 s) until its last lines are collected.
    fn drain_output(&mut self) {
        let end = Instant::now() + patience(Duration::from_secs(5));
        while Instant::now() < end && self.readers.iter().any(|r| !r.is_finished()) {
            std::thread::sleep(Duration::from_millis(10));
        }
        for r in self.readers.drain(..).filter(|r| r.is_finished()) {
            let _ = r.join();
        }
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    pub fn lines(&self) -> Vec<String> {
        self.output.lock().map(|v| v.clone()).unwrap_or_default()
    }

    /// Wait for a line of output containing every one of `needles`.
    pub fn wait_line(&self, needles: &[&str], timeout: Duration) -> Option<String> {
        let end = Instant::now() + patience(timeout);
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
        match control::request(
            &self.socket,
            &Request::Status,
            patience(Duration::from_secs(20)),
        ) {
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
                    self.drain_output();
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
        // A failing test shows ztd's log (libtest prints a failed test's output): the VM
        // runs of `cargo xtask vm-test` have no other way to see it.
        if std::thread::panicking() {
            eprintln!(
                "--- ztd output ---\n{}\n--- end of ztd output ---",
                self.lines().join("\n")
            );
        }
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
    /// ztd's state (`--flows-dir` is `flows` in it); kept across ztd restarts.
    pub state_dir: tempfile::TempDir,
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
            state_dir: tempfile::tempdir().expect("tempdir"),
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
        // Never the host's /etc/zt/ztd.toml: a test sets everything it needs.
        cmd.args(["--config", "/dev/null"])
            .arg("--policy")
            .arg(self.policy_dir.path())
            .arg("--cgroup")
            .arg(&self.cgroup.path)
            .arg("--bpffs")
            .arg(&self.pins.path)
            .arg("--socket")
            .arg(&self.socket)
            .arg("--flows-dir")
            .arg(self.flows_dir())
            .args(extra);
        cmd
    }

    /// ztd's flow store.
    pub fn flows_dir(&self) -> PathBuf {
        self.state_dir.path().join("flows")
    }

    /// Start `ztd` and wait until it answers `status`.
    pub fn start_ztd(&self, extra: &[&str]) -> Ztd {
        let ztd = self.spawn_ztd(extra);
        self.wait_ready(ztd, Instant::now() + patience(Duration::from_secs(30)))
    }

    fn wait_ready(&self, mut ztd: Ztd, end: Instant) -> Ztd {
        loop {
            if let Ok(Response::Status(_)) = control::request(
                &self.socket,
                &Request::Status,
                patience(Duration::from_secs(5)),
            ) {
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
                "ztd not ready after {:?}:\n{}",
                patience(Duration::from_secs(30)),
                ztd.lines().join("\n")
            );
        }
    }

    /// Start `ztd` without waiting.
    pub fn spawn_ztd(&self, extra: &[&str]) -> Ztd {
        self.spawn_ztd_cmd(self.ztd_command(extra))
    }

    /// Start `ztd` as `cmd` (e.g. [`Harness::ztd_command`] with an environment), wait until
    /// it answers `status`.
    pub fn start_ztd_cmd(&self, cmd: Command) -> Ztd {
        let ztd = self.spawn_ztd_cmd(cmd);
        self.wait_ready(ztd, Instant::now() + patience(Duration::from_secs(30)))
    }

    /// Start `ztd` as `cmd` without waiting.
    pub fn spawn_ztd_cmd(&self, mut cmd: Command) -> Ztd {
        let child = cmd
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn ztd");
        Ztd::capture(child, self.socket.clone())
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

    /// `bind()` (tcp: and `listen()`) from inside the guarded cgroup.
    pub fn bind(&self, proto: &str, addr: SocketAddr) -> String {
        self.probe_out(&[
            "bind",
            "--proto",
            proto,
            "--addr",
            &addr.to_string(),
            "--cgroup",
            &self.cgroup.path.display().to_string(),
        ])
    }

    /// Create a raw or ICMP socket from inside the guarded cgroup with primary group `gid`
    /// in network namespace `netns`, optionally pinging `ping`.
    pub fn socket(&self, kind: &str, gid: u32, netns: &Path, ping: Option<&str>) -> String {
        let gid = gid.to_string();
        let cg = self.cgroup.path.display().to_string();
        let ns = netns.display().to_string();
        let mut args = vec![
            "socket", "--kind", kind, "--cgroup", &cg, "--gid", &gid, "--netns", &ns,
        ];
        if let Some(p) = ping {
            args.extend(["--ping", p]);
        }
        self.probe_out(&args)
    }

    fn probe_out(&self, args: &[&str]) -> String {
        let out = Command::new(&self.probe)
            .args(args)
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

    /// Ids of the programs the kernel has attached to the guarded cgroup, per hook.
    pub fn attached_programs(&self) -> Vec<Vec<u32>> {
        let fd = sys::open_dir(&self.cgroup.path).expect("open cgroup");
        zt::loader::CGROUP_HOOKS
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
    /// Connect from this source address.
    pub fn src(self, ip: &str) -> Call {
        self.arg("--src", ip)
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
        Server::start_in(probe, bind, ports, netns, None)
    }

    /// Like [`Server::start`], from inside `cgroup` (a guarded listener).
    pub fn start_in(
        probe: &Path,
        bind: &[&str],
        ports: &[u16],
        netns: Option<&Path>,
        cgroup: Option<&Path>,
    ) -> Server {
        let mut cmd = Command::new(probe);
        if let Some(cg) = cgroup {
            cmd.arg("serve").arg("--cgroup").arg(cg);
        } else {
            cmd.arg("serve");
        }
        cmd.arg("--bind")
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
        let x = ((std::process::id() as u8) ^ (n as u8).wrapping_mul(37)) % 250 + 1;
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

    /// Let every group open ICMP echo ("ping") sockets in namespace `a` (a per-namespace
    /// sysctl).
    pub fn allow_ping_sockets_in_a(&self) {
        let out = Command::new("ip")
            .args([
                "netns",
                "exec",
                &self.a,
                "sysctl",
                "-qw",
                "net.ipv4.ping_group_range=0 2147483647",
            ])
            .output()
            .expect("sysctl");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// Add an address to `lo` of the server namespace `b` (`-6` for IPv6 ones is implied by
    /// the address), for sources a test sends from inside `b`.
    pub fn add_lo_addr_b(&self, cidr: &str) {
        let mut args = vec!["-n", &self.b];
        if cidr.contains(':') {
            args.push("-6");
        }
        args.extend(["addr", "add", cidr, "dev", "lo"]);
        if cidr.contains(':') {
            args.push("nodad");
        }
        ip(&args);
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

/// A probe that holds one connection open: it prints `ready` once connected, then sends
/// once per line on its stdin and prints the outcome. Killed by pid on drop.
struct HeldChild {
    child: Child,
    stdin: std::process::ChildStdin,
    stdout: BufReader<std::process::ChildStdout>,
}

impl HeldChild {
    fn spawn(mut cmd: Command, what: &str) -> HeldChild {
        let mut child = cmd
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {what}: {e}"));
        let stdin = child.stdin.take().expect("stdin");
        let mut stdout = BufReader::new(child.stdout.take().expect("stdout"));
        let mut line = String::new();
        let _ = stdout.read_line(&mut line);
        assert_eq!(line.trim(), "ready", "{what} did not connect");
        HeldChild {
            child,
            stdin,
            stdout,
        }
    }

    fn send(&mut self) -> String {
        use std::io::Write;
        let _ = self.stdin.write_all(b"go\n");
        let _ = self.stdin.flush();
        let mut line = String::new();
        let _ = self.stdout.read_line(&mut line);
        line.trim().to_string()
    }
}

impl Drop for HeldChild {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A UDP socket connected by a process in the guarded cgroup (possibly before zt started);
/// `send()` makes it send one datagram and returns the outcome. Killed on drop.
pub struct Held(HeldChild);

impl Held {
    pub fn connect(probe: &Path, cgroup: &Path, addr: SocketAddr) -> Held {
        let mut cmd = Command::new(probe);
        cmd.args(["hold", "--addr", &addr.to_string(), "--cgroup"])
            .arg(cgroup);
        Held(HeldChild::spawn(cmd, "hold"))
    }

    /// Like [`Held::connect`], with the socket bound to `bind_port` first (0: any) and every
    /// datagram sent with `sendmsg()` and control message `cmsg` (`none`, `tos`, `gso`,
    /// `pktinfo`: see zt-probe's `hold --cmsg`).
    pub fn connect_with(
        probe: &Path,
        cgroup: &Path,
        addr: SocketAddr,
        bind_port: u16,
        cmsg: &str,
    ) -> Held {
        let mut cmd = Command::new(probe);
        cmd.args(["hold", "--addr", &addr.to_string(), "--cgroup"])
            .arg(cgroup)
            .args(["--bind-port", &bind_port.to_string(), "--cmsg", cmsg]);
        Held(HeldChild::spawn(cmd, "hold"))
    }

    pub fn send(&mut self) -> String {
        self.0.send()
    }
}

/// A UDP receiver run by the probe (`zt-probe recv`) that never answers: it reports each
/// datagram as `got SRC PAYLOAD`. Killed on drop.
pub struct Receiver {
    child: Child,
    pub port: u16,
    lines: std::sync::mpsc::Receiver<String>,
    seen: Vec<String>,
}

impl Receiver {
    /// Receive on `bind` (an IPv6 address binds dual-stack) in `netns`, from `cgroup`.
    pub fn start(
        probe: &Path,
        bind: SocketAddr,
        netns: Option<&Path>,
        cgroup: Option<&Path>,
    ) -> Receiver {
        let mut cmd = Command::new(probe);
        cmd.args(["recv", "--bind", &bind.to_string()]);
        if let Some(ns) = netns {
            cmd.arg("--netns").arg(ns);
        }
        if let Some(cg) = cgroup {
            cmd.arg("--cgroup").arg(cg);
        }
        let mut child = cmd
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn recv");
        let mut out = BufReader::new(child.stdout.take().expect("stdout"));
        let mut line = String::new();
        let _ = out.read_line(&mut line);
        let port = line
            .trim()
            .strip_prefix("ready ")
            .and_then(|p| p.parse().ok())
            .unwrap_or_else(|| {
                let _ = child.kill();
                let _ = child.wait();
                panic!("recv did not start: {line:?}")
            });
        let (tx, lines) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for l in out.lines() {
                let Ok(l) = l else { break };
                if tx.send(l).is_err() {
                    break;
                }
            }
        });
        Receiver {
            child,
            port,
            lines,
            seen: Vec::new(),
        }
    }

    /// Wait (up to `timeout`) for a datagram whose payload is `payload`; true if it came.
    /// Every line read on the way is kept for [`Receiver::got`].
    pub fn wait_for(&mut self, payload: &str, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            if self.got(payload) {
                return true;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            match self.lines.recv_timeout(left) {
                Ok(l) => self.seen.push(l),
                Err(_) => return false,
            }
        }
    }

    /// Whether a datagram with payload `payload` was read so far.
    pub fn got(&self, payload: &str) -> bool {
        self.seen
            .iter()
            .any(|l| l.rsplit(' ').next() == Some(payload))
    }

    /// Lines read so far.
    pub fn seen(&self) -> &[String] {
        &self.seen
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

// =============================================================================================
// XDP front door (tests/tests/xdp.rs): running ztd inside a network namespace, sockets in a
// namespace from a dedicated thread, the policy + program fixture for BPF_PROG_TEST_RUN, and
// a frame builder.
// =============================================================================================

impl NetPair {
    /// The veth end in the client namespace `a`.
    pub fn veth_a(&self) -> String {
        format!("va{}", self.a.trim_start_matches("zta"))
    }
    /// The veth end in the server namespace `b`.
    pub fn veth_b(&self) -> String {
        format!("vb{}", self.b.trim_start_matches("ztb"))
    }
}

impl Harness {
    /// Start `ztd` inside the network namespace `netns` (joined with setns between fork and
    /// exec: the mount namespace, and so bpffs, stays the same) and wait until it answers.
    /// XDP attaches by ifindex in the daemon's own namespace, so `--xdp` then names an
    /// interface of `netns`, never one of the main namespace.
    pub fn start_ztd_in_netns(&self, netns: &Path, extra: &[&str]) -> Ztd {
        let ztd = self.spawn_ztd_in_netns(netns, extra);
        self.wait_ready(ztd, Instant::now() + patience(Duration::from_secs(30)))
    }

    /// Like [`Harness::start_ztd_in_netns`], without waiting.
    pub fn spawn_ztd_in_netns(&self, netns: &Path, extra: &[&str]) -> Ztd {
        use std::os::{fd::AsRawFd, unix::process::CommandExt};
        let ns =
            std::fs::File::open(netns).unwrap_or_else(|e| panic!("open {}: {e}", netns.display()));
        let ns_fd = ns.as_raw_fd();
        let mut cmd = self.ztd_command(extra);
        // SAFETY: setns is async-signal-safe; the fd stays open in the parent until spawn
        // returns (it is close-on-exec, so ztd does not inherit it).
        unsafe {
            cmd.pre_exec(move || {
                if libc::setns(ns_fd, libc::CLONE_NEWNET) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = cmd
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn ztd in netns");
        drop(ns);
        Ztd::capture(child, self.socket.clone())
    }

    /// Compile `policy` (one file's text) as ztd would, write it into this harness's pins as
    /// a generation with `flags` (`zt_common::FLAG_*`), and load the XDP program against
    /// the same pins — nothing is attached anywhere: run it with `XdpFixture::run`.
    pub fn xdp_fixture(&self, policy: &str, flags: u32) -> XdpFixture {
        let root = sys::cgroup2_root().expect("cgroup2 mount");
        let resolver = zt::policy::SystemResolver { cgroup_root: root };
        let sources = vec![(self.policy_dir.path().join("p.toml"), policy.to_string())];
        let (policy, _warnings) =
            zt::policy::load_sources(&sources, &resolver).unwrap_or_else(|d| {
                panic!(
                    "policy refused:\n{}",
                    d.iter()
                        .map(ToString::to_string)
                        .collect::<Vec<_>>()
                        .join("\n")
                )
            });
        let compiled = zt::policy::compile(&policy).expect("compile");
        let layout = Layout {
            bpffs: self.pins.path.clone(),
        };
        sys::ensure_bpffs(&layout.bpffs).expect("bpffs");
        let offsets = zt::btf::kernel_offsets().expect("kernel offsets");
        // The cgroup programs are loaded, not attached: only `attach_or_adopt` attaches.
        let mut loader =
            zt::loader::Loader::load(&layout, &self.cgroup.path, offsets, false).expect("load");
        loader.apply(&compiled, flags).expect("apply");
        let front = zt::xdp::XdpFront::load(&layout).expect("load XDP");
        XdpFixture {
            _loader: loader,
            front,
            compiled,
        }
    }

    /// The XDP program alone on this harness's (empty) pins: no policy written.
    pub fn xdp_without_policy(&self) -> zt::xdp::XdpFront {
        let layout = Layout {
            bpffs: self.pins.path.clone(),
        };
        sys::ensure_bpffs(&layout.bpffs).expect("bpffs");
        zt::xdp::XdpFront::load(&layout).expect("load XDP")
    }
}

/// A policy generation in pinned maps and the XDP program loaded against them.
pub struct XdpFixture {
    _loader: zt::loader::Loader,
    pub front: zt::xdp::XdpFront,
    pub compiled: zt::policy::Compiled,
}

impl XdpFixture {
    /// Run the program on `frame`: the XDP action and what it counted (summed over CPUs).
    pub fn run(&self, frame: &[u8]) -> (u32, zt::xdp::XdpCounters) {
        let before = self.front.total_counters().expect("counters");
        let action = self.front.test_run(frame).expect("BPF_PROG_TEST_RUN");
        let after = self.front.total_counters().expect("counters");
        (action, counters_delta(&before, &after))
    }

    /// The id of the rule whose summary is `summary`.
    pub fn rule_id(&self, summary: &str) -> u32 {
        self.compiled
            .rules
            .iter()
            .find(|r| r.summary() == summary)
            .map(|r| r.id)
            .unwrap_or_else(|| {
                panic!(
                    "no rule {summary:?}; rules: {:?}",
                    self.compiled
                        .rules
                        .iter()
                        .map(|r| r.summary())
                        .collect::<Vec<_>>()
                )
            })
    }
}

/// `after - before`, field by field.
pub fn counters_delta(
    before: &zt::xdp::XdpCounters,
    after: &zt::xdp::XdpCounters,
) -> zt::xdp::XdpCounters {
    zt::xdp::XdpCounters {
        passed: after.passed - before.passed,
        dropped_deny_list: after.dropped_deny_list - before.dropped_deny_list,
        dropped_closed_port: after.dropped_closed_port - before.dropped_closed_port,
        dropped_malformed: after.dropped_malformed - before.dropped_malformed,
        passed_not_judged: after.passed_not_judged - before.passed_not_judged,
        dropped_unparsed: after.dropped_unparsed - before.dropped_unparsed,
        no_policy: after.no_policy - before.no_policy,
        audited: after.audited - before.audited,
        events_sent: after.events_sent - before.events_sent,
        events_lost: after.events_lost - before.events_lost,
        events_skipped: after.events_skipped - before.events_skipped,
    }
}

/// Run `f` on a new thread that has joined the network namespace `netns` (setns changes only
/// the calling thread's namespace; the test's other threads stay where they are).
pub fn in_netns<T: Send + 'static>(netns: &Path, f: impl FnOnce() -> T + Send + 'static) -> T {
    let path = netns.to_path_buf();
    std::thread::spawn(move || {
        let ns =
            std::fs::File::open(&path).unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
        nix::sched::setns(&ns, nix::sched::CloneFlags::CLONE_NEWNET)
            .unwrap_or_else(|e| panic!("setns {}: {e}", path.display()));
        f()
    })
    .join()
    .expect("netns thread")
}

fn sockaddr(addr: SocketAddr) -> (libc::sockaddr_storage, libc::socklen_t) {
    // SAFETY: an all-zero sockaddr_storage is valid.
    let mut ss: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let len = match addr {
        SocketAddr::V4(a) => {
            // SAFETY: sockaddr_storage is large and aligned enough for sockaddr_in.
            let sin = unsafe { &mut *(&mut ss as *mut _ as *mut libc::sockaddr_in) };
            sin.sin_family = libc::AF_INET as libc::sa_family_t;
            sin.sin_port = a.port().to_be();
            sin.sin_addr.s_addr = u32::from_ne_bytes(a.ip().octets());
            std::mem::size_of::<libc::sockaddr_in>()
        }
        SocketAddr::V6(a) => {
            // SAFETY: sockaddr_storage is large and aligned enough for sockaddr_in6.
            let sin6 = unsafe { &mut *(&mut ss as *mut _ as *mut libc::sockaddr_in6) };
            sin6.sin6_family = libc::AF_INET6 as libc::sa_family_t;
            sin6.sin6_port = a.port().to_be();
            sin6.sin6_addr.s6_addr = a.ip().octets();
            std::mem::size_of::<libc::sockaddr_in6>()
        }
    };
    (ss, len as libc::socklen_t)
}

/// TCP connect from `src` (address and port; port 0 picks an ephemeral one) to `dst` in the
/// network namespace `netns`: `ok`, `refused`, `timeout` (nothing came back within
/// `timeout`) or `error:...`.
pub fn tcp_connect_from(
    netns: &Path,
    src: SocketAddr,
    dst: SocketAddr,
    timeout: Duration,
) -> String {
    in_netns(netns, move || {
        let family = if dst.is_ipv4() {
            libc::AF_INET
        } else {
            libc::AF_INET6
        };
        // SAFETY: plain socket calls on a descriptor this closure owns and closes.
        unsafe {
            let fd = libc::socket(
                family,
                libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
                0,
            );
            if fd < 0 {
                return format!("error:socket: {}", std::io::Error::last_os_error());
            }
            let fd = <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd);
            let raw = std::os::fd::AsRawFd::as_raw_fd(&fd);
            let one: libc::c_int = 1;
            libc::setsockopt(
                raw,
                libc::SOL_SOCKET,
                libc::SO_REUSEADDR,
                &one as *const _ as *const libc::c_void,
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            );
            let (s, slen) = sockaddr(src);
            if libc::bind(raw, &s as *const _ as *const libc::sockaddr, slen) != 0 {
                return format!("error:bind {src}: {}", std::io::Error::last_os_error());
            }
            let (d, dlen) = sockaddr(dst);
            if libc::connect(raw, &d as *const _ as *const libc::sockaddr, dlen) != 0 {
                let e = std::io::Error::last_os_error();
                if e.raw_os_error() != Some(libc::EINPROGRESS) {
                    return format!("error:connect: {e}");
                }
            }
            let mut pfd = libc::pollfd {
                fd: raw,
                events: libc::POLLOUT,
                revents: 0,
            };
            let n = libc::poll(&mut pfd, 1, timeout.as_millis() as libc::c_int);
            if n == 0 {
                return "timeout".to_string();
            }
            let mut err: libc::c_int = 0;
            let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
            libc::getsockopt(
                raw,
                libc::SOL_SOCKET,
                libc::SO_ERROR,
                &mut err as *mut _ as *mut libc::c_void,
                &mut len,
            );
            match err {
                0 => "ok".to_string(),
                libc::ECONNREFUSED => "refused".to_string(),
                libc::ETIMEDOUT => "timeout".to_string(),
                e => format!("error:{}", std::io::Error::from_raw_os_error(e)),
            }
        }
    })
}

/// Ethernet frames for `BPF_PROG_TEST_RUN`, built header by header (checksums are left
/// zero: the XDP program does not read them).
pub mod frames {
    pub const ETH_P_IP: u16 = 0x0800;
    pub const ETH_P_IPV6: u16 = 0x86dd;
    pub const ETH_P_ARP: u16 = 0x0806;
    pub const ETH_P_8021Q: u16 = 0x8100;
    pub const ETH_P_8021AD: u16 = 0x88a8;

    pub const HOPOPTS: u8 = 0;
    pub const ICMP: u8 = 1;
    pub const TCP: u8 = 6;
    pub const UDP: u8 = 17;
    pub const ROUTING: u8 = 43;
    pub const FRAGMENT: u8 = 44;
    pub const ICMPV6: u8 = 58;
    pub const DSTOPTS: u8 = 60;

    /// Ethernet header with VLAN tags (`tags` are their TPIDs, outermost first).
    pub fn eth(tags: &[u16], ethertype: u16) -> Vec<u8> {
        let mut f = vec![0x02, 0, 0, 0, 0, 0x01, 0x02, 0, 0, 0, 0, 0x02];
        for (i, tpid) in tags.iter().enumerate() {
            f.extend(tpid.to_be_bytes());
            f.extend((100 + i as u16).to_be_bytes());
        }
        f.extend(ethertype.to_be_bytes());
        f
    }

    /// An IPv4 header (IHL 5, total length right) and its payload.
    pub fn ipv4(src: [u8; 4], dst: [u8; 4], proto: u8, payload: &[u8]) -> Vec<u8> {
        ipv4_raw(src, dst, proto, payload, 5, None, 0)
    }

    /// An IPv4 header with IHL `ihl` (options zero-filled when above 5; a 20-byte header is
    /// written whatever `ihl` says), total length `total` (default: right) and the
    /// flags/fragment-offset word `frag`.
    pub fn ipv4_raw(
        src: [u8; 4],
        dst: [u8; 4],
        proto: u8,
        payload: &[u8],
        ihl: u8,
        total: Option<u16>,
        frag: u16,
    ) -> Vec<u8> {
        let header = 20.max(ihl as usize * 4);
        let total = total.unwrap_or((header + payload.len()) as u16);
        let mut p = vec![0x40 | (ihl & 0x0f), 0];
        p.extend(total.to_be_bytes());
        p.extend([0, 1]);
        p.extend(frag.to_be_bytes());
        p.extend([64, proto, 0, 0]);
        p.extend(src);
        p.extend(dst);
        p.resize(header, 0);
        p.extend(payload);
        p
    }

    /// An IPv6 header (payload length right) and its payload.
    pub fn ipv6(src: [u8; 16], dst: [u8; 16], next: u8, payload: &[u8]) -> Vec<u8> {
        ipv6_raw(src, dst, next, payload, payload.len() as u16)
    }

    /// An IPv6 header claiming payload length `plen`.
    pub fn ipv6_raw(src: [u8; 16], dst: [u8; 16], next: u8, payload: &[u8], plen: u16) -> Vec<u8> {
        let mut p = vec![0x60, 0, 0, 0];
        p.extend(plen.to_be_bytes());
        p.extend([next, 64]);
        p.extend(src);
        p.extend(dst);
        p.extend(payload);
        p
    }

    /// An 8-byte hop-by-hop, destination-options or routing header (PadN filled).
    pub fn ext(next: u8) -> Vec<u8> {
        vec![next, 0, 1, 4, 0, 0, 0, 0]
    }

    /// A longer options header: `(len + 1) * 8` bytes.
    pub fn ext_len(next: u8, len: u8) -> Vec<u8> {
        let mut e = vec![next, len, 1, (len as usize * 8 + 4) as u8];
        e.resize((len as usize + 1) * 8, 0);
        e
    }

    /// An IPv6 fragment header at `offset` (in 8-byte units).
    pub fn frag6(next: u8, offset: u16, more: bool) -> Vec<u8> {
        let mut e = vec![next, 0];
        e.extend(((offset << 3) | u16::from(more)).to_be_bytes());
        e.extend([0, 0, 0, 7]);
        e
    }

    /// A TCP SYN header (data offset 5).
    pub fn tcp(sport: u16, dport: u16) -> Vec<u8> {
        tcp_raw(sport, dport, 5)
    }

    /// A TCP SYN header claiming data offset `doff` (20 bytes written).
    pub fn tcp_raw(sport: u16, dport: u16, doff: u8) -> Vec<u8> {
        let mut t = Vec::new();
        t.extend(sport.to_be_bytes());
        t.extend(dport.to_be_bytes());
        t.extend([0, 0, 0, 1, 0, 0, 0, 0]);
        t.extend([doff << 4, 0x02, 0xff, 0xff, 0, 0, 0, 0]);
        t
    }

    /// A UDP header (length right) and payload.
    pub fn udp(sport: u16, dport: u16, payload: &[u8]) -> Vec<u8> {
        udp_raw(sport, dport, payload, (8 + payload.len()) as u16)
    }

    /// A UDP header claiming length `len`.
    pub fn udp_raw(sport: u16, dport: u16, payload: &[u8], len: u16) -> Vec<u8> {
        let mut u = Vec::new();
        u.extend(sport.to_be_bytes());
        u.extend(dport.to_be_bytes());
        u.extend(len.to_be_bytes());
        u.extend([0, 0]);
        u.extend(payload);
        u
    }

    /// An ICMP (or ICMPv6) echo request.
    pub fn echo(icmp_type: u8) -> Vec<u8> {
        vec![icmp_type, 0, 0, 0, 0, 1, 0, 1]
    }

    /// An ARP request (Ethernet/IPv4).
    pub fn arp() -> Vec<u8> {
        let mut a = vec![0, 1, 8, 0, 6, 4, 0, 1];
        a.extend([0x02, 0, 0, 0, 0, 0x02, 192, 0, 2, 10]);
        a.extend([0, 0, 0, 0, 0, 0, 198, 51, 100, 1]);
        a
    }

    /// The concatenation of `parts`.
    pub fn cat(parts: &[&[u8]]) -> Vec<u8> {
        parts.concat()
    }
}

// =============================================================================================
// Monitoring (tests/tests/monitoring.rs): decision events as `ztctl events --json` prints
// them, live followers, `ztctl status --json` as JSON, probe calls that report their pid,
// floods, /metrics over plain HTTP, and the daemon's memory.
// =============================================================================================

impl Call {
    /// The probe writes its pid to `path` before it acts.
    pub fn pid_file(self, path: &Path) -> Call {
        self.arg("--pid-file", path.display())
    }
    /// The probe stays alive `ms` after the call (so `ztd` can still resolve its exe).
    pub fn linger_ms(self, ms: u64) -> Call {
        self.arg("--linger-ms", ms)
    }
}

/// Read a pid file the probe wrote.
pub fn read_pid(path: &Path) -> u32 {
    std::fs::read_to_string(path)
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or_else(|| panic!("no pid in {}", path.display()))
}

/// The kernel's encoding of a device number (`major << 20 | minor`), as events carry it.
pub fn kernel_dev(st_dev: u64) -> u64 {
    let major = libc::major(st_dev as libc::dev_t) as u64;
    let minor = libc::minor(st_dev as libc::dev_t) as u64;
    (major << 20) | minor
}

/// `(dev, ino)` of a file as the kernel reports an executable in events.
pub fn exe_key(path: &Path) -> (u64, u64) {
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::metadata(path).unwrap_or_else(|e| panic!("stat {}: {e}", path.display()));
    (kernel_dev(meta.dev()), meta.ino())
}

/// A TCP port of 127.0.0.1 that is free now (bound and released).
pub fn free_tcp_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

/// Resident memory of a process in KiB (`VmRSS` in `/proc/PID/status`).
pub fn vm_rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_else(|e| panic!("/proc/{pid}/status: {e}"));
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or_else(|| panic!("no VmRSS in /proc/{pid}/status"))
}

/// `GET path` on `addr` over HTTP/1.1 (connection closed after one request): status code and
/// body.
pub fn http_get(addr: SocketAddr, path: &str) -> std::io::Result<(u16, String)> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nAccept: text/plain\r\n\r\n"
    )?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw)?;
    let text = String::from_utf8_lossy(&raw).into_owned();
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| std::io::Error::other(format!("no end of headers: {text:?}")))?;
    let code = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("no status line: {head:?}")))?;
    let chunked = head.lines().any(|l| {
        let l = l.to_ascii_lowercase();
        l.starts_with("transfer-encoding:") && l.contains("chunked")
    });
    let body = if chunked {
        dechunk(body)
    } else {
        body.to_string()
    };
    Ok((code, body))
}

/// Undo HTTP/1.1 chunked transfer coding.
fn dechunk(mut body: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = body.split_once("\r\n") {
        let n =
            usize::from_str_radix(size.split(';').next().unwrap_or("0").trim(), 16).unwrap_or(0);
        if n == 0 || rest.len() < n {
            break;
        }
        out.push_str(&rest[..n]);
        body = rest[n..].trim_start_matches("\r\n");
    }
    out
}

/// Parse the lines of `ztctl events --json` (or of a follower): every line must be a JSON
/// object with every contract field of [`zt::history::EVENT_RECORD_FIELDS`]; `{"missed":N}`
/// lines are skipped.
pub fn parse_event_lines(text: &str) -> Vec<zt::history::EventRecord> {
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .filter_map(|l| parse_event_line(l).unwrap_or_else(|e| panic!("{e}")))
        .collect()
}

/// One line of `ztctl events --json`: `Ok(None)` for a `{"missed":N}` or `{"notice":{...}}`
/// line, `Err` with the
/// reason if the line is not an event record of the contract.
pub fn parse_event_line(line: &str) -> Result<Option<zt::history::EventRecord>, String> {
    let v: serde_json::Value =
        serde_json::from_str(line).map_err(|e| format!("not JSON ({e}): {line}"))?;
    let obj = v
        .as_object()
        .ok_or_else(|| format!("not a JSON object: {line}"))?;
    if obj.len() == 1 && (obj.contains_key("missed") || obj.contains_key("notice")) {
        return Ok(None);
    }
    let missing: Vec<&str> = zt::history::EVENT_RECORD_FIELDS
        .iter()
        .copied()
        .filter(|f| !obj.contains_key(*f))
        .collect();
    if !missing.is_empty() {
        return Err(format!("event lacks fields {missing:?}: {line}"));
    }
    serde_json::from_value(v)
        .map(Some)
        .map_err(|e| format!("event does not match the EventRecord schema ({e}): {line}"))
}

impl Harness {
    /// `ztctl events --json ARGS...`: the records it prints (asserting it exits 0).
    pub fn events(&self, args: &[&str]) -> Vec<zt::history::EventRecord> {
        let mut all = vec!["events", "--json"];
        all.extend_from_slice(args);
        let out = self.ztctl(&all);
        assert!(
            out.status.success(),
            "ztctl {}: {}\n{}",
            all.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        parse_event_lines(&String::from_utf8_lossy(&out.stdout))
    }

    /// Poll `ztctl events --json ARGS` until at least `n` records pass `keep` (or `timeout`):
    /// the records that pass.
    pub fn wait_events(
        &self,
        args: &[&str],
        n: usize,
        timeout: Duration,
        keep: impl Fn(&zt::history::EventRecord) -> bool,
    ) -> Vec<zt::history::EventRecord> {
        let end = Instant::now() + timeout;
        loop {
            let got: Vec<_> = self.events(args).into_iter().filter(|r| keep(r)).collect();
            if got.len() >= n || Instant::now() >= end {
                return got;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// `ztctl status --json`, as JSON (whatever its exit code: unhealthy still prints).
    pub fn status_json(&self) -> serde_json::Value {
        let out = self.ztctl(&["status", "--json"]);
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
            panic!(
                "ztctl status --json is not JSON ({e}): {}\n{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            )
        })
    }

    /// Run the probe with `args` and return what it printed (one line), like the other
    /// helpers.
    pub fn probe_args(&self, args: &[&str]) -> String {
        self.probe_out(args)
    }

    /// `zt-probe flood` from inside the guarded cgroup: `(eperm, ok, other)`.
    pub fn flood(&self, proto: &str, addr: SocketAddr, count: u64, spread: u16) -> (u64, u64, u64) {
        self.flood_with(proto, addr, count, spread, &[])
    }

    /// [`Harness::flood`] with more probe flags (`--uid`, `--linger-ms`).
    pub fn flood_with(
        &self,
        proto: &str,
        addr: SocketAddr,
        count: u64,
        spread: u16,
        extra: &[&str],
    ) -> (u64, u64, u64) {
        let (addr, count, spread) = (addr.to_string(), count.to_string(), spread.to_string());
        let cg = self.cgroup.path.display().to_string();
        let mut args = vec![
            "flood",
            "--proto",
            proto,
            "--addr",
            &addr,
            "--count",
            &count,
            "--port-spread",
            &spread,
        ];
        args.extend(["--cgroup", &cg]);
        args.extend_from_slice(extra);
        let out = self.probe_out(&args);
        let field = |name: &str| {
            out.split_whitespace()
                .find_map(|kv| kv.strip_prefix(&format!("{name}=")))
                .and_then(|v| v.parse().ok())
                .unwrap_or_else(|| panic!("flood printed {out:?}"))
        };
        (field("eperm"), field("ok"), field("other"))
    }

    /// Start `ztctl events --follow --json ARGS` (killed by pid on drop).
    pub fn follow_events(&self, args: &[&str]) -> Follow {
        let mut child = Command::new(bin("ztctl"))
            .arg("--socket")
            .arg(&self.socket)
            .args(["events", "--follow", "--json"])
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn ztctl events --follow");
        let lines = Arc::new(Mutex::new(Vec::new()));
        let stderr = Arc::new(Mutex::new(Vec::new()));
        for (stream, sink) in [
            (
                child
                    .stdout
                    .take()
                    .map(|s| Box::new(s) as Box<dyn std::io::Read + Send>),
                Arc::clone(&lines),
            ),
            (
                child
                    .stderr
                    .take()
                    .map(|s| Box::new(s) as Box<dyn std::io::Read + Send>),
                Arc::clone(&stderr),
            ),
        ] {
            if let Some(stream) = stream {
                std::thread::spawn(move || {
                    for line in BufReader::new(stream).lines().map_while(Result::ok) {
                        if let Ok(mut o) = sink.lock() {
                            o.push(line);
                        }
                    }
                });
            }
        }
        Follow {
            child,
            lines,
            stderr,
        }
    }
}

/// A running `ztctl events --follow`; its output lines are collected; killed by pid on drop.
pub struct Follow {
    child: Child,
    pub lines: Arc<Mutex<Vec<String>>>,
    pub stderr: Arc<Mutex<Vec<String>>>,
}

impl Follow {
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn lines(&self) -> Vec<String> {
        self.lines.lock().map(|v| v.clone()).unwrap_or_default()
    }

    pub fn stderr(&self) -> Vec<String> {
        self.stderr.lock().map(|v| v.clone()).unwrap_or_default()
    }

    /// Has it exited (and with what)?
    pub fn try_exit(&mut self) -> Option<std::process::ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    /// The records printed so far (every line must be one, or a `{"missed":N}`).
    pub fn records(&self) -> Vec<zt::history::EventRecord> {
        parse_event_lines(&self.lines().join("\n"))
    }

    /// Wait until a printed record passes `keep`.
    pub fn wait_record(
        &self,
        timeout: Duration,
        keep: impl Fn(&zt::history::EventRecord) -> bool,
    ) -> Option<zt::history::EventRecord> {
        let end = Instant::now() + timeout;
        loop {
            if let Some(r) = self.records().into_iter().find(|r| keep(r)) {
                return Some(r);
            }
            if Instant::now() >= end {
                return None;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Follow {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Run `cmd` to completion with a deadline; on timeout it is killed (by pid) and `None` is
/// returned.
pub fn output_within(mut cmd: Command, timeout: Duration) -> Option<Output> {
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    let collect = |s: Option<Box<dyn std::io::Read + Send>>| {
        std::thread::spawn(move || {
            let mut buf = Vec::new();
            if let Some(mut s) = s {
                let _ = std::io::Read::read_to_end(&mut s, &mut buf);
            }
            buf
        })
    };
    let out = collect(
        child
            .stdout
            .take()
            .map(|s| Box::new(s) as Box<dyn std::io::Read + Send>),
    );
    let err = collect(
        child
            .stderr
            .take()
            .map(|s| Box::new(s) as Box<dyn std::io::Read + Send>),
    );
    let end = Instant::now() + timeout;
    let status = loop {
        if let Ok(Some(st)) = child.try_wait() {
            break Some(st);
        }
        if Instant::now() >= end {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let stdout = out.join().unwrap_or_default();
    let stderr = err.join().unwrap_or_default();
    status.map(|status| Output {
        status,
        stdout,
        stderr,
    })
}

// =============================================================================================
// Policy generations (tests/tests/generations.rs): a continuous load of UDP `connect()`s
// with per-address counts, a held TCP flow, and a loopback TCP echo server that keeps
// connections open.
// =============================================================================================

/// Per-address outcomes of a [`Load`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LoadCounts {
    pub ok: u64,
    pub eperm: u64,
    pub other: u64,
}

/// `zt-probe load` running in a cgroup: UDP `connect()`s in a loop over a list of addresses
/// until [`Load::finish`] (or its duration ends). Killed by pid on drop.
pub struct Load {
    child: Child,
    stdin: Option<std::process::ChildStdin>,
    stdout: BufReader<std::process::ChildStdout>,
    addrs: Vec<SocketAddr>,
}

impl Load {
    /// Run for at most `max`, sleeping `pause` after each round over `addrs`.
    pub fn start(
        probe: &Path,
        cgroup: &Path,
        addrs: &[SocketAddr],
        max: Duration,
        pause: Duration,
    ) -> Load {
        let list = addrs
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join(",");
        let mut child = Command::new(probe)
            .args(["load", "--addr-list", &list, "--duration-ms"])
            .arg(max.as_millis().to_string())
            .arg("--pause-us")
            .arg(pause.as_micros().to_string())
            .arg("--cgroup")
            .arg(cgroup)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("spawn load");
        let stdin = child.stdin.take();
        let mut stdout = BufReader::new(child.stdout.take().expect("stdout"));
        let mut line = String::new();
        let _ = stdout.read_line(&mut line);
        assert_eq!(line.trim(), "ready", "load did not start");
        Load {
            child,
            stdin,
            stdout,
            addrs: addrs.to_vec(),
        }
    }

    /// Stop the loop: the number of rounds and each address's counts, in the order given.
    pub fn finish(mut self) -> (u64, Vec<LoadCounts>) {
        use std::io::Write;
        if let Some(mut s) = self.stdin.take() {
            let _ = s.write_all(b"stop\n");
        }
        let mut line = String::new();
        let _ = self.stdout.read_line(&mut line);
        let v: serde_json::Value = serde_json::from_str(line.trim())
            .unwrap_or_else(|e| panic!("load printed {line:?}: {e}"));
        let rounds = v["rounds"].as_u64().expect("rounds");
        let ports = v["ports"].as_array().expect("ports");
        assert_eq!(ports.len(), self.addrs.len(), "{v}");
        let counts = ports
            .iter()
            .zip(&self.addrs)
            .map(|(p, a)| {
                assert_eq!(p["addr"], a.to_string(), "{v}");
                let n = |k: &str| p[k].as_u64().unwrap_or_else(|| panic!("{k} in {v}"));
                LoadCounts {
                    ok: n("ok"),
                    eperm: n("eperm"),
                    other: n("other"),
                }
            })
            .collect();
        (rounds, counts)
    }
}

impl Drop for Load {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A TCP connection held by `zt-probe hold-tcp` in a cgroup; [`HeldTcp::send`] writes once
/// and waits for the echo. Killed by pid on drop.
pub struct HeldTcp(HeldChild);

impl HeldTcp {
    pub fn connect(probe: &Path, cgroup: &Path, addr: SocketAddr, timeout: Duration) -> HeldTcp {
        let mut cmd = Command::new(probe);
        cmd.args(["hold-tcp", "--addr", &addr.to_string(), "--timeout-ms"])
            .arg(timeout.as_millis().to_string())
            .arg("--cgroup")
            .arg(cgroup);
        HeldTcp(HeldChild::spawn(cmd, "hold-tcp"))
    }

    pub fn send(&mut self) -> String {
        self.0.send()
    }
}

/// A TCP echo server on 127.0.0.1 (in the test process, outside any guarded cgroup) that
/// echoes every connection until it closes. Its threads end when the process does; the
/// listener is closed on drop (a connection to itself wakes the accept loop).
pub struct TcpEcho {
    pub port: u16,
    stop: Arc<std::sync::atomic::AtomicBool>,
}

impl TcpEcho {
    pub fn start() -> TcpEcho {
        use std::io::{Read, Write};
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind echo");
        let port = l.local_addr().expect("addr").port();
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let stopped = Arc::clone(&stop);
        std::thread::spawn(move || {
            for s in l.incoming() {
                if stopped.load(Ordering::Relaxed) {
                    break;
                }
                let Ok(mut s) = s else { continue };
                std::thread::spawn(move || {
                    let mut buf = [0u8; 256];
                    while let Ok(n) = s.read(&mut buf) {
                        if n == 0 || s.write_all(&buf[..n]).is_err() {
                            break;
                        }
                    }
                });
            }
        });
        TcpEcho { port, stop }
    }
}

impl Drop for TcpEcho {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        let _ = std::net::TcpStream::connect(("127.0.0.1", self.port));
    }
}

// =============================================================================================
// Differential testing (tests/tests/differential.rs): many calls per probe process, for one
// identity.
// =============================================================================================

/// Runs `exe` (the probe, or a copy of it) as `zt-probe batch` in `cgroup` with `uid`/`gid`,
/// feeds it `cases` (`PROTO ADDR:PORT [mapped] [send]`, one per entry) and returns one
/// outcome per case (`ok`, `eperm` or `error:...`). Panics if the probe does not answer every
/// case.
pub fn probe_batch(exe: &Path, cgroup: &Path, uid: u32, gid: u32, cases: &[String]) -> Vec<String> {
    use std::io::Write;
    let mut child = Command::new(exe)
        .arg("batch")
        .arg("--cgroup")
        .arg(cgroup)
        .arg("--uid")
        .arg(uid.to_string())
        .arg("--gid")
        .arg(gid.to_string())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn zt-probe batch");
    let mut input = String::new();
    for c in cases {
        input.push_str(c);
        input.push('\n');
    }
    let mut stdin = child.stdin.take().expect("probe stdin");
    let writer = std::thread::spawn(move || {
        let _ = stdin.write_all(input.as_bytes());
    });
    let out = child.wait_with_output().expect("wait for zt-probe batch");
    let _ = writer.join();
    let lines: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_string)
        .collect();
    assert_eq!(
        lines.len(),
        cases.len(),
        "zt-probe batch answered {} of {} cases: {lines:?}\nstderr: {}",
        lines.len(),
        cases.len(),
        String::from_utf8_lossy(&out.stderr)
    );
    lines
}

/// A fresh copy of an executable may be "text file busy" for a moment: another test
/// thread's fork can still hold the descriptor the copy was written through. Wait (poll)
/// until it executes.
pub fn wait_executable(exe: &Path) {
    let end = Instant::now() + Duration::from_secs(10);
    loop {
        match Command::new(exe).arg("--help").output() {
            Err(e) if e.raw_os_error() == Some(libc::ETXTBSY) && Instant::now() < end => {
                std::thread::sleep(Duration::from_millis(20));
            }
            _ => return,
        }
    }
}

/// A `zt-probe session` in a cgroup as uid/gid: connected UDP sockets kept across policy
/// changes, so that their later datagrams are judged by the egress backstop. Killed on drop.
pub struct ProbeSession {
    child: Child,
    stdin: std::process::ChildStdin,
    stdout: BufReader<std::process::ChildStdout>,
}

impl ProbeSession {
    pub fn start(exe: &Path, cgroup: &Path, uid: u32, gid: u32) -> ProbeSession {
        let mut child = Command::new(exe)
            .arg("session")
            .arg("--cgroup")
            .arg(cgroup)
            .arg("--uid")
            .arg(uid.to_string())
            .arg("--gid")
            .arg(gid.to_string())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("spawn zt-probe session");
        let stdin = child.stdin.take().expect("session stdin");
        let stdout = BufReader::new(child.stdout.take().expect("session stdout"));
        ProbeSession {
            child,
            stdin,
            stdout,
        }
    }

    /// Send one command line; its one-line answer.
    pub fn ask(&mut self, line: &str) -> String {
        use std::io::Write;
        self.stdin
            .write_all(format!("{line}\n").as_bytes())
            .and_then(|()| self.stdin.flush())
            .expect("write to zt-probe session");
        let mut answer = String::new();
        self.stdout
            .read_line(&mut answer)
            .expect("read from zt-probe session");
        assert!(
            !answer.is_empty(),
            "zt-probe session exited (asked {line:?})"
        );
        answer.trim().to_string()
    }
}

impl Drop for ProbeSession {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

// =============================================================================================
// Daemon lifecycle 2 (tests/tests/lifecycle2.rs): waiting for a status that satisfies a
// condition (tamper repair, file-watch reloads, apply rollback).
// =============================================================================================

impl Ztd {
    /// Poll `status` until `pred` holds; the last status either way (check it).
    pub fn wait_status(&self, timeout: Duration, pred: impl Fn(&Status) -> bool) -> Status {
        let end = Instant::now() + timeout;
        loop {
            let st = self.status();
            if pred(&st) || Instant::now() >= end {
                return st;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}
