//! `cargo xtask vm-test`: zt's integration tests on another kernel, inside a QEMU guest.
//!
//! The CI machine runs one kernel; users run others, whose verifiers may refuse what this one
//! accepts. This boots a kernel (Debian's newest 6.1 by default, `apt-get download`ed and
//! cached under `target/vm/`) under `qemu-system-x86_64 -accel tcg` (KVM is not available on
//! these machines) with an initramfs of its own: busybox, iproute2's `ip`, the release `ztd`,
//! `ztctl` and `zt-probe`, the integration test binaries (the same `tests/tests/*.rs` the host
//! runs, so every assertion keeps its positive control), their shared libraries and the
//! kernel modules the tests need (veth). The guest's `/init` runs the chosen tests and prints
//! a verdict; nothing touches the host's cgroups, bpffs or interfaces (the guest has no
//! network device at all).
//!
//! Suites: `smoke` is a fixed list of tests (checked to exist before booting, and counted
//! after: a renamed test cannot silently drop out); `full` runs every test binary but
//! `install` (which checks the build tree, not the kernel).

mod cpio;
mod systemd;

use std::{
    collections::{BTreeMap, BTreeSet},
    io::{BufRead as _, BufReader, Write as _},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::mpsc,
    time::{Duration, Instant},
};

use anyhow::{anyhow, bail, Context as _, Result};

use crate::{
    setup, tasks,
    util::{self, Ctx},
};

/// Which kernel boots.
#[derive(Clone, Debug)]
pub enum Kernel {
    /// Debian 12's kernel: the newest `linux-image-6.1.0-NN-amd64` in the apt sources.
    Debian61,
    /// The running kernel's own image (`/boot/vmlinuz-$(uname -r)`), when it is on disk.
    Host,
    /// A `vmlinuz` (modules from `../lib/modules/<release>` when next to it) or a
    /// `linux-image-*.deb`.
    Path(PathBuf),
}

impl std::str::FromStr for Kernel {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Ok(match s {
            "6.1" => Kernel::Debian61,
            "host" => Kernel::Host,
            "" => return Err("empty kernel".into()),
            p => Kernel::Path(PathBuf::from(p)),
        })
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Suite {
    /// A fixed list of tests covering every hook and the daemon's life cycle (~minutes).
    Smoke,
    /// Every integration test but the install checks (slow under emulation).
    Full,
    /// The Debian package under a real systemd: a Debian 12 root (mmdebstrap) with systemd
    /// as PID 1 installs `target/debian/zt_*.deb` and checks the unit's life cycle.
    Systemd,
}

pub struct Opts {
    pub kernel: Kernel,
    pub suite: Suite,
    /// Hard limit on the guest's run time; default 30 min (smoke), 3 h (full).
    pub timeout: Option<u64>,
    /// Skip `setup` and the release build (the caller did them: `cargo xtask test`).
    pub no_build: bool,
}

/// The smoke suite: (test binary, tests). Egress allow/deny over TCP, UDP `sendto`, IPv6 and
/// v4-mapped; bind grants and a guarded listener; raw sockets; XDP on a veth pair in driver
/// and skb mode; the backstop on a socket opened before zt; kill -9, restart and adoption;
/// reload; tamper repair; unload; and the exe-identity adversaries (copy, memfd).
const SMOKE: &[(&str, &[&str])] = &[
    (
        "egress",
        &[
            "cidr_port_range_and_protocol_across_namespaces",
            "connected_and_unconnected_udp_are_both_judged",
            "ipv6_and_ipv4_mapped_ipv6_are_judged_by_the_real_address",
            "exe_identity_admits_only_the_pinned_binary",
        ],
    ),
    (
        "inbound",
        &[
            "binding_is_limited_to_ports_an_ingress_rule_grants",
            "a_listener_receives_only_from_peers_its_ingress_rules_allow",
            "raw_and_icmp_sockets_need_a_grant",
            "the_egress_backstop_stops_a_socket_connected_before_zt_started",
        ],
    ),
    (
        "xdp",
        &[
            "front_door_on_a_veth_in_driver_mode",
            "front_door_on_a_veth_in_skb_mode",
        ],
    ),
    (
        "lifecycle",
        &[
            "kill_9_keeps_enforcement_and_a_restart_adopts_without_a_second_attachment",
            "reload_applies_a_valid_policy_and_keeps_the_last_good_one_otherwise",
            "ztctl_unload_removes_everything_with_or_without_a_daemon",
        ],
    ),
    (
        "lifecycle2",
        &["a_detached_link_is_reported_and_reattached_and_enforces_again"],
    ),
    (
        "bypass",
        &["copied_binary_is_denied", "memfd_exec_is_denied"],
    ),
    // The adversary tests of issue 12 that need only the kernel.
    (
        "adversary",
        &[
            "exe_swapped_with_pr_set_mm_map_is_still_the_exec_identity",
            "exe_swapped_from_a_clone_vm_child_is_still_the_exec_identity",
            "fork_child_and_thread_inherit_the_exec_identity",
        ],
    ),
    (
        "seams",
        &[
            "a_udp_listening_grant_is_not_an_egress_grant",
            "a_tcp_listening_grant_is_not_an_egress_grant",
            "a_packet_zt_cannot_parse_to_the_end_is_dropped",
            "connected_udp_sends_with_control_messages_are_judged_by_the_connected_peer",
        ],
    ),
    // The BPF LSM hook: the guest sets ZT_EXPECT_LSM=1, so it must be attached there.
    (
        "lsm",
        &["packet_sockets_need_raw_where_the_lsm_hook_is_attached"],
    ),
];

/// Test binaries the full suite leaves out, and why.
const FULL_EXCLUDED: &[(&str, &str)] = &[(
    "install",
    "checks the build tree and packaging, not the kernel",
)];

/// Kernel modules the tests need when the kernel has them as modules.
const MODULES: &[&str] = &["veth"];

/// Printed by the guest's `/init`; the host looks for them.
const BOOTED: &str = "ZT-VM: booted";
const RESULT: &str = "ZT-VM-RESULT: ";

pub fn vm_test(ctx: &Ctx, opts: &Opts) -> Result<()> {
    if opts.suite == Suite::Systemd {
        return systemd::vm_test(ctx, opts);
    }
    let started = Instant::now();
    let qemu = ensure_tool("qemu-system-x86_64", "qemu-system-x86")?;
    let busybox = ensure_tool("busybox", "busybox-static")?;
    let vm_dir = ctx.target_dir.join("vm");
    std::fs::create_dir_all(&vm_dir).with_context(|| format!("creating {}", vm_dir.display()))?;
    // First, so that an unavailable kernel is said before any build.
    let kernel = resolve_kernel(ctx, &opts.kernel)?;
    println!(
        "vm-test: kernel {} ({})",
        kernel.release,
        kernel.vmlinuz.display()
    );
    if !opts.no_build {
        setup::setup(ctx)?;
        tasks::build(ctx)?;
    }
    let built = build_tests(ctx)?;
    let suite = plan(opts.suite, &built)?;
    let expected: usize = suite.iter().map(|r| r.tests.len()).sum();
    println!(
        "vm-test: suite {:?}: {expected} tests in {} binaries",
        opts.suite,
        suite.len()
    );

    let initrd = vm_dir.join(format!("initramfs-{:?}.cpio", opts.suite).to_lowercase());
    let size = build_initramfs(ctx, &busybox, &kernel, &built, &suite, &initrd)?;
    println!(
        "vm-test: initramfs {} ({} MiB)",
        initrd.display(),
        size >> 20
    );

    let timeout = Duration::from_secs(opts.timeout.unwrap_or(match opts.suite {
        Suite::Smoke => 30 * 60,
        Suite::Full | Suite::Systemd => 3 * 60 * 60,
    }));
    let log = vm_dir.join(format!("console-{}.log", kernel.release));
    // Room for the archive, its unpacked copy and the tests.
    let mem_mib = 1024 + 2 * (size >> 20);
    let run = boot(
        &qemu,
        &kernel,
        &initrd,
        mem_mib,
        "console=ttyS0 rdinit=/init panic=-1 quiet loglevel=4",
        timeout,
        &log,
    )?;

    let counts = run.counts;
    let verdict = match (&run.result, run.timed_out) {
        (_, true) => Err(anyhow!(
            "the VM did not finish within {}s (hard timeout; killed)",
            timeout.as_secs()
        )),
        (None, false) => Err(anyhow!(
            "the VM stopped without a verdict (crash or panic?)"
        )),
        (Some(r), _) if r != "PASS" => Err(anyhow!("the suite failed inside the VM ({r})")),
        (Some(_), _) if counts.failed > 0 || counts.passed != expected as u64 => Err(anyhow!(
            "the VM passed {} of {expected} tests ({} failed): a test is missing or failed",
            counts.passed,
            counts.failed
        )),
        _ => Ok(()),
    };
    let boot_s = run.booted.map(|d| format!("{:.0}s", d.as_secs_f64()));
    let summary = format!(
        "vm-test: kernel {}: {} passed, {} failed; VM boot {}, VM total {:.0}s, vm-test total {:.0}s",
        kernel.release,
        counts.passed,
        counts.failed,
        boot_s.as_deref().unwrap_or("?"),
        run.elapsed.as_secs_f64(),
        started.elapsed().as_secs_f64()
    );
    if let Err(e) = verdict {
        println!();
        println!(
            "vm-test: console tail ({} lines; all of it in {}):",
            run.tail.len(),
            log.display()
        );
        for l in &run.tail {
            println!("  | {l}");
        }
        println!("{summary}");
        return Err(e.context(format!("vm-test on kernel {}", kernel.release)));
    }
    println!("{summary}");
    Ok(())
}

/// A command on PATH, installed with apt-get (as root) when missing.
fn ensure_tool(cmd: &str, package: &str) -> Result<PathBuf> {
    if let Some(p) = which(cmd) {
        return Ok(p);
    }
    if !util::is_root() {
        bail!("{cmd} is missing: install the Debian package {package} (apt-get install {package})");
    }
    println!("vm-test: {cmd} is missing; installing {package}");
    apt_get(&["install", "-y", "-qq", "--no-install-recommends", package]).or_else(|_| {
        apt_get(&["update", "-qq"])?;
        apt_get(&["install", "-y", "-qq", "--no-install-recommends", package])
    })?;
    which(cmd).ok_or_else(|| anyhow!("{package} is installed but {cmd} is still not on PATH"))
}

fn apt_get(args: &[&str]) -> Result<()> {
    util::run(
        Command::new("apt-get")
            .args(args)
            .env("DEBIAN_FRONTEND", "noninteractive"),
    )
}

fn which(cmd: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/sbin"].map(PathBuf::from))
        .map(|d| d.join(cmd))
        .find(|p| p.is_file())
}

/// A kernel image and where its modules are.
pub struct KernelImage {
    pub vmlinuz: PathBuf,
    pub release: String,
    /// `lib/modules/<release>` of this kernel, when known.
    pub modules: Option<PathBuf>,
}

fn resolve_kernel(ctx: &Ctx, which: &Kernel) -> Result<KernelImage> {
    let cache = ctx.target_dir.join("vm").join("kernels");
    match which {
        Kernel::Debian61 => debian_kernel(&cache, r"^linux-image-6\.1\.0-[0-9]+-amd64$"),
        Kernel::Host => host_kernel(),
        Kernel::Path(p) if p.extension().is_some_and(|e| e == "deb") => {
            let name = p
                .file_stem()
                .and_then(|s| s.to_str())
                .ok_or_else(|| anyhow!("{}: not a package file name", p.display()))?;
            unpack_deb(p, &cache.join(name))
        }
        Kernel::Path(p) => {
            if !p.is_file() {
                bail!("--kernel {}: no such file (give a vmlinuz, a linux-image .deb, `6.1` or `host`)", p.display());
            }
            let name = p.file_name().and_then(|n| n.to_str()).unwrap_or("");
            let release = name
                .strip_prefix("vmlinuz-")
                .map(str::to_string)
                .unwrap_or_else(|| name.to_string());
            let modules = p
                .parent()
                .filter(|d| d.ends_with("boot"))
                .and_then(Path::parent)
                .map(|root| root.join("lib/modules").join(&release))
                .filter(|d| d.is_dir());
            Ok(KernelImage {
                vmlinuz: p.clone(),
                release,
                modules,
            })
        }
    }
}

fn host_kernel() -> Result<KernelImage> {
    let release = nix::sys::utsname::uname()
        .context("uname")?
        .release()
        .to_string_lossy()
        .into_owned();
    let candidates = [
        PathBuf::from(format!("/boot/vmlinuz-{release}")),
        PathBuf::from(format!("/lib/modules/{release}/vmlinuz")),
    ];
    let Some(vmlinuz) = candidates.iter().find(|p| p.is_file()) else {
        bail!(
            "--kernel host: the running kernel's image ({release}) is not on this machine: none of {} exists (a Firecracker or container guest is booted from an image kept outside it). Pass --kernel PATH to a vmlinuz or a linux-image .deb, or --kernel 6.1",
            candidates.map(|p| p.display().to_string()).join(", ")
        );
    };
    let modules = Some(PathBuf::from(format!("/lib/modules/{release}"))).filter(|d| d.is_dir());
    Ok(KernelImage {
        vmlinuz: vmlinuz.clone(),
        release,
        modules,
    })
}

/// The newest package whose name matches `pattern` (names end in `-NN-amd64`: compared by
/// every number in them), downloaded once and unpacked under `cache`. Offline, the newest
/// one already cached is used.
fn debian_kernel(cache: &Path, pattern: &str) -> Result<KernelImage> {
    std::fs::create_dir_all(cache).with_context(|| format!("creating {}", cache.display()))?;
    let mut names = apt_search(pattern)?;
    if names.is_empty() && util::is_root() {
        apt_get(&["update", "-qq"])?;
        names = apt_search(pattern)?;
    }
    let cached = |name: &str| cache.join(name).join("boot").is_dir();
    let newest = |mut v: Vec<String>| {
        v.sort_by_key(|n| version_key(n));
        v.pop()
    };
    let name = match newest(names) {
        Some(n) => n,
        None => {
            let mut local = Vec::new();
            for e in std::fs::read_dir(cache)?.flatten() {
                let n = e.file_name().to_string_lossy().into_owned();
                if cached(&n) {
                    local.push(n);
                }
            }
            let n = newest(local).ok_or_else(|| {
                anyhow!("no package matches {pattern} in the apt sources (apt-cache search) and none is cached in {}", cache.display())
            })?;
            println!("vm-test: apt-cache knows no {pattern}; using the cached {n}");
            n
        }
    };
    let dir = cache.join(&name);
    if !cached(&name) {
        // The exact name: a glob would download every version.
        util::run(
            Command::new("apt-get")
                .args(["download", &name])
                .current_dir(cache),
        )?;
        let deb = std::fs::read_dir(cache)?
            .flatten()
            .map(|e| e.path())
            .find(|p| {
                p.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.starts_with(&format!("{name}_")) && n.ends_with(".deb"))
            })
            .ok_or_else(|| {
                anyhow!(
                    "apt-get download {name} left no {name}_*.deb in {}",
                    cache.display()
                )
            })?;
        let img = unpack_deb(&deb, &dir)?;
        let _ = std::fs::remove_file(&deb);
        return Ok(img);
    }
    kernel_in(&dir)
}

/// Numbers in a package name, for ordering `...-9-amd64` before `...-10-amd64`.
fn version_key(name: &str) -> Vec<u64> {
    name.split(|c: char| !c.is_ascii_digit())
        .filter_map(|p| p.parse().ok())
        .collect()
}

fn apt_search(pattern: &str) -> Result<Vec<String>> {
    let out = Command::new("apt-cache")
        .args(["search", "--names-only", pattern])
        .output()
        .context("running apt-cache (Debian's apt is needed to fetch a kernel)")?;
    if !out.status.success() {
        bail!(
            "apt-cache search failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().next().map(str::to_string))
        .collect())
}

fn unpack_deb(deb: &Path, dir: &Path) -> Result<KernelImage> {
    if !dir.join("boot").is_dir() {
        let tmp = dir.with_extension("unpacking");
        let _ = std::fs::remove_dir_all(&tmp);
        util::run(Command::new("dpkg-deb").arg("-x").arg(deb).arg(&tmp))?;
        let _ = std::fs::remove_dir_all(dir);
        std::fs::rename(&tmp, dir)
            .with_context(|| format!("renaming {} to {}", tmp.display(), dir.display()))?;
    }
    kernel_in(dir)
}

fn kernel_in(dir: &Path) -> Result<KernelImage> {
    let boot = dir.join("boot");
    let vmlinuz = std::fs::read_dir(&boot)
        .with_context(|| format!("reading {}", boot.display()))?
        .flatten()
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("vmlinuz-"))
        })
        .ok_or_else(|| anyhow!("no vmlinuz-* in {}", boot.display()))?;
    let release = vmlinuz
        .file_name()
        .and_then(|n| n.to_str())
        .and_then(|n| n.strip_prefix("vmlinuz-"))
        .unwrap_or_default()
        .to_string();
    let modules = Some(dir.join("lib/modules").join(&release)).filter(|d| d.is_dir());
    Ok(KernelImage {
        vmlinuz,
        release,
        modules,
    })
}

/// What `cargo test --no-run` built: the integration test binaries by name, and the debug
/// `zt-probe` they name by absolute path (`CARGO_BIN_EXE_zt-probe`).
struct Built {
    tests: BTreeMap<String, PathBuf>,
    probe: PathBuf,
}

fn build_tests(ctx: &Ctx) -> Result<Built> {
    // The same command line as `cargo xtask test`'s test step, so that nothing is rebuilt.
    let mut cmd = ctx.cargo();
    cmd.args([
        "test",
        "--workspace",
        "--exclude",
        "zt-ebpf",
        "--no-run",
        "--message-format=json-render-diagnostics",
    ]);
    let line = util::show(&cmd);
    println!("$ {line}");
    let out = cmd
        .stderr(Stdio::inherit())
        .output()
        .with_context(|| format!("could not start `{line}`"))?;
    util::check(out.status, &line)?;
    let tests_manifest = ctx.root.join("tests").join("Cargo.toml");
    let mut tests = BTreeMap::new();
    let mut probe = None;
    for l in String::from_utf8_lossy(&out.stdout).lines() {
        let Ok(v) = serde_json::from_str::<serde_json::Value>(l) else {
            continue;
        };
        if v["reason"] != "compiler-artifact" {
            continue;
        }
        let (Some(exe), Some(name)) = (v["executable"].as_str(), v["target"]["name"].as_str())
        else {
            continue;
        };
        if v["manifest_path"].as_str().map(Path::new) != Some(tests_manifest.as_path()) {
            continue;
        }
        let kinds = v["target"]["kind"].to_string();
        if kinds.contains("\"test\"") {
            tests.insert(name.to_string(), PathBuf::from(exe));
        } else if name == "zt-probe" && v["profile"]["test"] == false {
            // The binary itself (what `CARGO_BIN_EXE_zt-probe` names), not its unit tests.
            probe = Some(PathBuf::from(exe));
        }
    }
    let probe = probe.ok_or_else(|| anyhow!("`{line}` built no zt-probe"))?;
    if tests.is_empty() {
        bail!("`{line}` built no integration test binary");
    }
    Ok(Built { tests, probe })
}

/// One test binary's run inside the guest.
struct Run {
    bin: String,
    /// Exact test names; every test of the binary when `all`.
    tests: Vec<String>,
    all: bool,
}

/// The tests to run, checked against what the binaries list (`--list`) on the host.
fn plan(suite: Suite, built: &Built) -> Result<Vec<Run>> {
    let mut runs = Vec::new();
    let listed = |bin: &str| -> Result<BTreeSet<String>> {
        let exe = built
            .tests
            .get(bin)
            .ok_or_else(|| anyhow!("there is no test binary `{bin}` (tests/tests/{bin}.rs)"))?;
        let out = Command::new(exe)
            .args(["--list", "--format", "terse"])
            .output()
            .with_context(|| format!("{} --list", exe.display()))?;
        util::check(out.status, &format!("{} --list", exe.display()))?;
        Ok(String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| l.strip_suffix(": test"))
            .map(str::to_string)
            .collect())
    };
    match suite {
        Suite::Smoke => {
            // ZT_VM_ONLY=BIN[,BIN...] runs only those binaries' smoke tests (a quick check of
            // some areas).
            let only = std::env::var("ZT_VM_ONLY").ok().filter(|o| !o.is_empty());
            for (bin, names) in SMOKE {
                if only
                    .as_deref()
                    .is_some_and(|o| !o.split(',').any(|b| b == *bin))
                {
                    continue;
                }
                let have = listed(bin)?;
                let missing: Vec<_> = names.iter().filter(|n| !have.contains(**n)).collect();
                if !missing.is_empty() {
                    bail!("the smoke suite names tests that {bin} does not have: {missing:?} (renamed? update SMOKE in xtask/src/vm.rs)");
                }
                runs.push(Run {
                    bin: bin.to_string(),
                    tests: names.iter().map(|n| n.to_string()).collect(),
                    all: false,
                });
            }
        }
        Suite::Full => {
            for bin in built.tests.keys() {
                if FULL_EXCLUDED.iter().any(|(b, _)| b == bin) {
                    continue;
                }
                runs.push(Run {
                    bin: bin.clone(),
                    tests: listed(bin)?.into_iter().collect(),
                    all: true,
                });
            }
            for (bin, why) in FULL_EXCLUDED {
                println!("vm-test: not run in the VM: {bin} ({why})");
            }
        }
        Suite::Systemd => bail!("the systemd suite runs no test binaries"),
    }
    Ok(runs)
}

/// Shared libraries `ldd` reports for `exe` (nothing for a static binary).
fn libraries(exe: &Path) -> Result<Vec<PathBuf>> {
    let out = Command::new("ldd")
        .arg(exe)
        .output()
        .context("running ldd")?;
    let text = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        if text.contains("not a dynamic executable") || out.stderr.starts_with(b"\tnot a dynamic") {
            return Ok(Vec::new());
        }
        // Static binaries make ldd exit 1 with that message on stderr or stdout.
        let err = String::from_utf8_lossy(&out.stderr);
        if err.contains("not a dynamic executable") {
            return Ok(Vec::new());
        }
        bail!("ldd {} failed: {err}", exe.display());
    }
    let mut libs = Vec::new();
    for l in text.lines() {
        if l.contains("not found") {
            bail!("ldd {}: {}", exe.display(), l.trim());
        }
        let path = match l.split_once("=>") {
            Some((_, right)) => right.split_whitespace().next(),
            None => l.split_whitespace().next(),
        };
        if let Some(p) = path.filter(|p| p.starts_with('/')) {
            libs.push(PathBuf::from(p));
        }
    }
    Ok(libs)
}

/// A kernel module and the modules it depends on (its `.modinfo` `depends=`), dependencies
/// first; nothing when the kernel has it built in.
fn module_closure(dir: &Path, name: &str, out: &mut Vec<(String, Vec<u8>)>) -> Result<()> {
    if out.iter().any(|(n, _)| n == name) {
        return Ok(());
    }
    let builtin = std::fs::read_to_string(dir.join("modules.builtin")).unwrap_or_default();
    if builtin
        .lines()
        .any(|l| l.rsplit('/').next() == Some(&format!("{name}.ko")))
    {
        return Ok(());
    }
    let file = find_module(&dir.join("kernel"), name)?.ok_or_else(|| {
        anyhow!(
            "kernel module {name} is neither built in nor under {}",
            dir.display()
        )
    })?;
    let fname = file.to_string_lossy().into_owned();
    let bytes = if fname.ends_with(".ko") {
        std::fs::read(&file)?
    } else {
        let tool = if fname.ends_with(".xz") {
            "xz"
        } else if fname.ends_with(".zst") {
            "zstd"
        } else {
            "gzip"
        };
        let o = Command::new(tool)
            .arg("-dc")
            .arg(&file)
            .output()
            .with_context(|| format!("{tool} -dc {fname}"))?;
        util::check(o.status, &format!("{tool} -dc {fname}"))?;
        o.stdout
    };
    let depends = bytes
        .split(|b| *b == 0)
        .find_map(|s| s.strip_prefix(b"depends="))
        .map(|d| String::from_utf8_lossy(d).into_owned())
        .unwrap_or_default();
    for dep in depends.split(',').filter(|d| !d.is_empty()) {
        module_closure(dir, dep, out)?;
    }
    out.push((name.to_string(), bytes));
    Ok(())
}

fn find_module(dir: &Path, name: &str) -> Result<Option<PathBuf>> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Ok(None);
    };
    for e in entries.flatten() {
        let p = e.path();
        if e.file_type()?.is_dir() {
            if let Some(found) = find_module(&p, name)? {
                return Ok(Some(found));
            }
        } else if let Some(n) = p.file_name().and_then(|n| n.to_str()) {
            let alt = name.replace('_', "-");
            if [name, alt.as_str()]
                .iter()
                .any(|m| n == format!("{m}.ko") || n.starts_with(&format!("{m}.ko.")))
            {
                return Ok(Some(p));
            }
        }
    }
    Ok(None)
}

/// The guest's `/init`: mount what zt and the tests need, load the modules, run the suite,
/// print the verdict and power off. `@THREADS@` and `@SCALE@` are replaced.
const INIT: &str = r#"#!/bin/sh
/bin/busybox --install -s /bin
export PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/root TMPDIR=/tmp
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mount -t tmpfs tmpfs /tmp
mount -t tmpfs tmpfs /run
mount -t cgroup2 cgroup2 /sys/fs/cgroup
mount -t bpf bpf /sys/fs/bpf
mount -t securityfs securityfs /sys/kernel/security 2>/dev/null
ip link set lo up
echo "ZT-VM: booted: kernel $(uname -r) after $(cut -d' ' -f1 /proc/uptime)s; LSMs: $(cat /sys/kernel/security/lsm 2>/dev/null)"
for m in $(cat /zt/modules/order); do
  insmod "/zt/modules/$m.ko" || echo "ZT-VM: insmod $m failed"
done
status=0
while read -r bin filter; do
  echo "ZT-VM: running $bin (uptime $(cut -d' ' -f1 /proc/uptime)s)"
  ZT_EXPECT_LSM=1 ZT_BIN_DIR=/zt/bin ZT_TEST_TIME_SCALE=@SCALE@ RUST_BACKTRACE=1 "/zt/tests/$bin" $filter --test-threads=@THREADS@ </dev/null 2>&1 || status=1
done </zt/suite
echo "ZT-VM: suite done at uptime $(cut -d' ' -f1 /proc/uptime)s"
if [ "$status" = 0 ]; then echo "ZT-VM-RESULT: PASS"; else echo "ZT-VM-RESULT: FAIL"; fi
poweroff -f
"#;

fn build_initramfs(
    ctx: &Ctx,
    busybox: &Path,
    kernel: &KernelImage,
    built: &Built,
    suite: &[Run],
    out: &Path,
) -> Result<u64> {
    let mut t = cpio::Tree::default();
    let mut elves: Vec<PathBuf> = Vec::new();
    for d in [
        "/proc",
        "/sys",
        "/dev",
        "/tmp",
        "/run",
        "/root",
        "/etc",
        "/usr/bin",
        "/usr/sbin",
        "/sbin",
    ] {
        t.dir(d)?;
    }
    t.file("/bin/busybox", busybox)?;
    elves.push(busybox.to_path_buf());
    t.symlink("/bin/sh", "busybox")?;
    // iproute2's `ip` (the tests' `ip netns`, veth pairs), and bash (an interpreter test).
    let ip = ["/usr/sbin/ip", "/sbin/ip", "/usr/bin/ip", "/bin/ip"]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.is_file())
        .ok_or_else(|| anyhow!("iproute2's ip is missing (apt-get install iproute2)"))?;
    t.file("/usr/sbin/ip", &ip)?;
    elves.push(ip);
    if Path::new("/bin/bash").is_file() {
        t.file("/bin/bash", Path::new("/bin/bash"))?;
        elves.push("/bin/bash".into());
    }
    let rel = ctx.release_dir();
    for b in ["ztd", "ztctl", "zt-probe"] {
        let p = rel.join(b);
        t.file(&format!("/zt/bin/{b}"), &p)
            .with_context(|| format!("{b} (run `cargo xtask build`)"))?;
        elves.push(p);
    }
    t.same(&built.probe)?;
    elves.push(built.probe.clone());

    // Test binaries without their debug info (a tenth of the size; symbols stay).
    let stage = ctx.target_dir.join("vm").join("stage");
    std::fs::create_dir_all(&stage)?;
    let mut suite_text = String::new();
    for r in suite {
        let exe = &built.tests[&r.bin];
        let stripped = stage.join(&r.bin);
        util::check(
            Command::new("objcopy")
                .arg("--strip-debug")
                .arg(exe)
                .arg(&stripped)
                .status()
                .context("running objcopy (binutils)")?,
            &format!("objcopy --strip-debug {}", exe.display()),
        )?;
        t.file(&format!("/zt/tests/{}", r.bin), &stripped)?;
        elves.push(exe.clone());
        if r.all {
            suite_text.push_str(&format!("{}\n", r.bin));
        } else {
            suite_text.push_str(&format!("{} --exact {}\n", r.bin, r.tests.join(" ")));
        }
    }
    t.data("/zt/suite", suite_text, 0o644)?;

    let mut libs = BTreeSet::new();
    for e in &elves {
        libs.extend(libraries(e)?);
    }
    for l in &libs {
        if !t.contains(&l.to_string_lossy()) {
            t.same(l)?;
        }
    }

    let mut mods = Vec::new();
    match &kernel.modules {
        Some(dir) => {
            for m in MODULES {
                module_closure(dir, m, &mut mods)?;
            }
        }
        None => println!(
            "vm-test: no modules directory for {}: assuming {} built in",
            kernel.release,
            MODULES.join(", ")
        ),
    }
    let mut order = String::new();
    for (name, bytes) in mods {
        order.push_str(&format!("{name}\n"));
        t.data(&format!("/zt/modules/{name}.ko"), bytes, 0o644)?;
    }
    t.data("/zt/modules/order", order, 0o644)?;

    t.data(
        "/etc/passwd",
        "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n",
        0o644,
    )?;
    t.data("/etc/group", "root:x:0:\nnogroup:x:65534:\n", 0o644)?;
    t.data(
        "/init",
        INIT.replace("@THREADS@", &guest_threads().to_string())
            .replace("@SCALE@", &time_scale().to_string()),
        0o755,
    )?;
    t.write(out)
}

/// How much longer the harness waits inside the guest (`ZT_TEST_TIME_SCALE` there;
/// `ZT_VM_TIME_SCALE` here, default 10): TCG emulation on a shared machine makes ztd's start
/// (the verifier, above all) many times slower than on the host.
fn time_scale() -> u32 {
    std::env::var("ZT_VM_TIME_SCALE")
        .ok()
        .and_then(|v| v.parse().ok())
        .filter(|n| *n > 0)
        .unwrap_or(10)
}

/// Tests in parallel inside the guest (`ZT_VM_TEST_THREADS`, default 2: one per emulated
/// CPU; each test spends most of its time in ztd's start, and the harness's waits are
/// stretched by [`time_scale`]).
fn guest_threads() -> u32 {
    std::env::var("ZT_VM_TEST_THREADS")
        .ok()
        .and_then(|v| v.parse().ok())
        .filter(|n| *n > 0)
        .unwrap_or(2)
}

struct Outcome {
    result: Option<String>,
    timed_out: bool,
    booted: Option<Duration>,
    elapsed: Duration,
    tail: Vec<String>,
    counts: tasks::Counts,
}

fn boot(
    qemu: &Path,
    kernel: &KernelImage,
    initrd: &Path,
    mem_mib: u64,
    append: &str,
    timeout: Duration,
    log: &Path,
) -> Result<Outcome> {
    let mut cmd = Command::new(qemu);
    cmd.args(["-accel", "tcg", "-cpu", "max", "-smp", "2"])
        .arg("-m")
        .arg(mem_mib.to_string())
        .args(["-nographic", "-no-reboot", "-nic", "none"])
        .arg("-kernel")
        .arg(&kernel.vmlinuz)
        .arg("-initrd")
        .arg(initrd)
        .arg("-append")
        .arg(append)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let line = util::show(&cmd);
    println!("$ {line}");
    let started = Instant::now();
    let mut child = cmd
        .spawn()
        .with_context(|| format!("could not start `{line}`"))?;
    let (tx, rx) = mpsc::channel::<String>();
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
        let tx = tx.clone();
        std::thread::spawn(move || {
            let mut r = BufReader::new(stream);
            let mut buf = Vec::new();
            while let Ok(n) = r.read_until(b'\n', &mut buf) {
                if n == 0 {
                    break;
                }
                let l = String::from_utf8_lossy(&buf)
                    .trim_end_matches(['\n', '\r'])
                    .replace('\r', "");
                if tx.send(l).is_err() {
                    break;
                }
                buf.clear();
            }
        });
    }
    drop(tx);
    let mut logf =
        std::fs::File::create(log).with_context(|| format!("creating {}", log.display()))?;
    let deadline = started + timeout;
    let mut tail = std::collections::VecDeque::new();
    let mut out = Outcome {
        result: None,
        timed_out: false,
        booted: None,
        elapsed: Duration::ZERO,
        tail: Vec::new(),
        counts: tasks::Counts::default(),
    };
    loop {
        let now = Instant::now();
        if now >= deadline {
            out.timed_out = true;
            let _ = child.kill();
            break;
        }
        match rx.recv_timeout(deadline - now) {
            Ok(l) => {
                let _ = writeln!(logf, "{l}");
                // (The console may prefix the first line with terminal resets.)
                if out.booted.is_none() && l.contains(BOOTED) {
                    out.booted = Some(started.elapsed());
                }
                // The suite's own lines live; the kernel's only in the log and the tail.
                if out.booted.is_some() {
                    println!("vm| {l}");
                }
                if let Some((_, r)) = l.split_once(RESULT) {
                    out.result = Some(r.trim().to_string());
                }
                out.counts.add_line(&l);
                tail.push_back(l);
                if tail.len() > 80 {
                    tail.pop_front();
                }
            }
            Err(mpsc::RecvTimeoutError::Timeout) => continue,
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
        }
    }
    let _ = child.wait();
    out.elapsed = started.elapsed();
    out.tail = tail.into();
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernel_packages_order_by_number() {
        let mut v = [
            "linux-image-6.1.0-9-amd64".to_string(),
            "linux-image-6.1.0-57-amd64".to_string(),
            "linux-image-6.1.0-10-amd64".to_string(),
        ];
        v.sort_by_key(|n| version_key(n));
        assert_eq!(
            v.last().map(String::as_str),
            Some("linux-image-6.1.0-57-amd64")
        );
    }

    #[test]
    fn modules_come_after_their_dependencies_and_builtins_are_skipped() {
        let dir = tempfile::tempdir().unwrap();
        let net = dir.path().join("kernel/drivers/net");
        std::fs::create_dir_all(&net).unwrap();
        std::fs::write(net.join("veth.ko"), b"\0license=GPL\0depends=dep_a,core\0").unwrap();
        std::fs::write(net.join("dep-a.ko"), b"\0depends=core\0").unwrap();
        std::fs::write(net.join("core.ko"), b"\0depends=\0").unwrap();
        std::fs::write(
            dir.path().join("modules.builtin"),
            "kernel/net/ipv6/ipv6.ko\n",
        )
        .unwrap();
        let mut out = Vec::new();
        module_closure(dir.path(), "veth", &mut out).unwrap();
        module_closure(dir.path(), "ipv6", &mut out).unwrap();
        let names: Vec<&str> = out.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, ["core", "dep_a", "veth"]);
        assert!(module_closure(dir.path(), "absent", &mut out).is_err());
    }

    #[test]
    fn kernel_argument() {
        assert!(matches!("6.1".parse(), Ok(Kernel::Debian61)));
        assert!(matches!("host".parse(), Ok(Kernel::Host)));
        assert!(matches!("/x/vmlinuz".parse(), Ok(Kernel::Path(_))));
    }
}
