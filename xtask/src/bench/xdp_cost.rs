//! Scenario `xdp_cost`: per-packet cost of zt's XDP front door with `BPF_PROG_TEST_RUN`
//! (no interface involved), against a trivial XDP_PASS program and against xdp-filter
//! (Debian's xdp-tools) in the same run.
//!
//! The helper `zt-xdp-bench` (tests/src/bin) loads the front door against deny lists of each
//! CIDR tier (own pin directories; nothing attached), loads the trivial program, and test-runs
//! crafted frames on request: `hit` (source in the last /32 of the list: dropped), `miss`
//! (192.0.2.1: passes) and `deep` (the even neighbour of that /32: a miss that walks the
//! trie deepest). xdp-filter is loaded by its own CLI on a veth inside a namespace of the run
//! (skb mode), and its `filter_ipv4` map is filled with the first address of each CIDR (it
//! matches exact addresses only; its map holds 10,000); the helper test-runs its program by
//! id. The figure is the kernel's mean ns per run over REPEAT runs.

use std::{
    cell::RefCell,
    io::{BufRead as _, BufReader, Write as _},
    path::PathBuf,
    process::{Child, ChildStdin, ChildStdout, Command, Stdio},
};

use anyhow::{anyhow, ensure, Context as _, Result};
use serde_json::{json, Value};

use super::{net, rules, BenchCgroup, Env, Medians, Ratio, Sample, Scenario, Target};

const KINDS: &[&str] = &["hit", "miss", "deep"];

pub(super) struct XdpCost {
    tiers: Vec<usize>,
    repeat: u32,
    variants: &'static [&'static str],
    state: RefCell<Option<State>>,
}

/// Dropped in field order: the helper (and its pins), xdp-filter, the namespace, the cgroup.
struct State {
    helper: Helper,
    _filter: Option<XdpFilterGuard>,
    _netns: Option<net::Netns>,
    _cgroup: BenchCgroup,
    filter_note: String,
}

struct Helper {
    child: Child,
    stdin: Option<ChildStdin>,
    stdout: BufReader<ChildStdout>,
    pins: Vec<PathBuf>,
    ztctl: PathBuf,
}

impl Helper {
    fn ask(&mut self, line: &str) -> Result<Value> {
        let stdin = self.stdin.as_mut().context("helper stdin closed")?;
        writeln!(stdin, "{line}")?;
        stdin.flush()?;
        let mut answer = String::new();
        self.stdout.read_line(&mut answer)?;
        ensure!(
            !answer.is_empty(),
            "zt-xdp-bench exited (see its stderr above)"
        );
        serde_json::from_str(&answer).with_context(|| format!("zt-xdp-bench said {answer:?}"))
    }
}

impl Drop for Helper {
    fn drop(&mut self) {
        drop(self.stdin.take());
        let end = std::time::Instant::now() + std::time::Duration::from_secs(10);
        loop {
            match self.child.try_wait() {
                Ok(Some(_)) => break,
                Ok(None) if std::time::Instant::now() < end => {
                    std::thread::sleep(std::time::Duration::from_millis(20))
                }
                _ => {
                    let _ = self.child.kill();
                    let _ = self.child.wait();
                    break;
                }
            }
        }
        for p in &self.pins {
            if p.exists() {
                let _ = Command::new(&self.ztctl)
                    .arg("unload")
                    .arg("--bpffs")
                    .arg(p)
                    .stdin(Stdio::null())
                    .stdout(Stdio::null())
                    .status();
            }
            if p.exists() {
                eprintln!("bench: warning: {} still exists", p.display());
            }
        }
    }
}

/// `xdp-filter unload IFACE` in the namespace on drop; and libxdp's working directory
/// (`/sys/fs/bpf/xdp`) removed again if this run made it and it is empty.
struct XdpFilterGuard {
    netns: String,
    iface: String,
    made_libxdp_dir: bool,
}

const LIBXDP_DIR: &str = "/sys/fs/bpf/xdp";

impl Drop for XdpFilterGuard {
    fn drop(&mut self) {
        let _ = Command::new("nsenter")
            .arg(format!("--net=/run/netns/{}", self.netns))
            .args(["--", "xdp-filter", "unload", &self.iface])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        if self.made_libxdp_dir {
            // Fails, harmlessly, if anything else is in it.
            let _ = std::fs::remove_dir(LIBXDP_DIR);
        }
    }
}

impl XdpCost {
    pub fn new(quick: bool) -> XdpCost {
        let tiers = super::rules::tiers(quick, [1_000, 10_000, 100_000]);
        let mut v = vec!["trivial".to_string()];
        for who in ["zt", "xdpf"] {
            for t in &tiers {
                for kind in KINDS {
                    v.push(format!("{who}-{t}-{kind}"));
                }
            }
        }
        let v: Vec<&'static str> = v
            .into_iter()
            .map(|s| &*Box::leak(s.into_boxed_str()))
            .collect();
        XdpCost {
            tiers,
            repeat: if quick { 10_000 } else { 1_000_000 },
            variants: Box::leak(v.into_boxed_slice()),
            state: RefCell::new(None),
        }
    }

    /// Load xdp-filter on a veth in a namespace of the run: (its program id, guards) or why
    /// not.
    fn xdp_filter(env: &Env) -> std::result::Result<(u32, net::Netns, XdpFilterGuard), String> {
        if !net::have("xdp-filter") {
            return Err("xdp-filter not installed (apt-get install xdp-tools)".into());
        }
        let ns = net::Netns::new(&env.tag, "xdpf").map_err(|e| format!("{e:#}"))?;
        ns.cmd(
            "ip",
            &["link", "add", "xa", "type", "veth", "peer", "name", "xb"],
        )
        .and_then(|_| ns.cmd("ip", &["link", "set", "xa", "up"]))
        .and_then(|_| ns.cmd("ip", &["link", "set", "xb", "up"]))
        .map_err(|e| format!("{e:#}"))?;
        let guard = XdpFilterGuard {
            netns: ns.name.clone(),
            iface: "xa".into(),
            made_libxdp_dir: !std::path::Path::new(LIBXDP_DIR).exists(),
        };
        ns.cmd("xdp-filter", &["load", "xa", "-m", "skb"])
            .map_err(|e| format!("xdp-filter load failed: {e:#}"))?;
        let status = ns
            .cmd("xdp-loader", &["status", "xa"])
            .map_err(|e| format!("{e:#}"))?;
        let id = status
            .lines()
            .filter(|l| l.trim_start().starts_with("xa"))
            .flat_map(|l| l.split_whitespace())
            .find_map(|w| w.parse::<u32>().ok())
            .ok_or_else(|| format!("no program id in `xdp-loader status xa`: {status}"))?;
        Ok((id, ns, guard))
    }

    fn state(&self, env: &Env) -> Result<()> {
        if self.state.borrow().is_some() {
            return Ok(());
        }
        let cgroup = env.sub_cgroup("xdp")?;
        let (prog, netns, filter, note) = match Self::xdp_filter(env) {
            Ok((id, ns, g)) => (
                Some(id),
                Some(ns),
                Some(g),
                format!("xdp-filter program id {id}"),
            ),
            Err(why) => {
                println!("    xdp-filter rows skipped: {why}");
                (None, None, None, why)
            }
        };
        let prefix = format!("{}/{}-xdp", crate::util::BPFFS, env.tag);
        let sizes = self
            .tiers
            .iter()
            .map(|t| t.to_string())
            .collect::<Vec<_>>()
            .join(",");
        let mut cmd = Command::new(env.bin.join("zt-xdp-bench"));
        cmd.arg("--cgroup")
            .arg(&cgroup.path)
            .arg("--pins-prefix")
            .arg(&prefix)
            .arg("--sizes")
            .arg(&sizes)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        if let Some(id) = prog {
            cmd.arg("--xdp-filter-prog").arg(id.to_string());
        }
        println!("    loading zt's XDP front door with {sizes} CIDRs");
        let mut child = cmd.spawn().context("starting zt-xdp-bench")?;
        let stdin = child.stdin.take();
        let stdout = BufReader::new(child.stdout.take().context("helper stdout")?);
        let mut helper = Helper {
            child,
            stdin,
            stdout,
            pins: self
                .tiers
                .iter()
                .map(|t| PathBuf::from(format!("{prefix}-{t}")))
                .collect(),
            ztctl: env.bin.join("ztctl"),
        };
        let mut ready = String::new();
        helper.stdout.read_line(&mut ready)?;
        let ready: Value = serde_json::from_str(&ready)
            .map_err(|_| anyhow!("zt-xdp-bench did not start (its stderr is above): {ready:?}"))?;
        ensure!(ready["ready"] == Value::Bool(true), "zt-xdp-bench: {ready}");
        *self.state.borrow_mut() = Some(State {
            helper,
            _filter: filter,
            _netns: netns,
            _cgroup: cgroup,
            filter_note: note,
        });
        Ok(())
    }

    fn name(v: &str) -> String {
        // zt-100000-hit -> zt-100k-hit (for the ratio labels).
        let mut p = v.splitn(3, '-');
        match (p.next(), p.next().and_then(|n| n.parse().ok()), p.next()) {
            (Some(w), Some(n), Some(k)) => format!("{w}-{}-{k}", rules::short(n)),
            _ => v.to_string(),
        }
    }
}

impl Scenario for XdpCost {
    fn id(&self) -> &'static str {
        "xdp_cost"
    }

    fn title(&self) -> String {
        format!(
            "XDP ns per packet (BPF_PROG_TEST_RUN, {} repeats): trivial XDP_PASS, zt's front door with {} deny-list CIDRs (hit, miss, deep miss), xdp-filter with the same addresses",
            self.repeat,
            self.tiers.iter().map(|t| t.to_string()).collect::<Vec<_>>().join(", ")
        )
    }

    fn unit(&self) -> &'static str {
        "ns/pkt"
    }

    fn variants(&self) -> &'static [&'static str] {
        self.variants
    }

    fn config(&self) -> Value {
        let note = self
            .state
            .borrow()
            .as_ref()
            .map(|s| s.filter_note.clone())
            .unwrap_or_default();
        json!({
            "repeat": self.repeat,
            "tiers": self.tiers,
            "frames": "UDP to an ephemeral port; hit = last /32 of the list, miss = 192.0.2.1, deep = the hit's even neighbour",
            "policy": "zt-xdp-bench --print-policy N",
            "xdp_filter": note,
        })
    }

    /// The kernel's own timing over 1M runs is steady: 3 rounds keep the run under 5 min.
    fn rounds(&self, default: usize) -> usize {
        default.min(3)
    }

    fn measure(&self, _env: &Env, _variant: &str) -> Result<Sample> {
        anyhow::bail!("xdp_cost is measured per round")
    }

    fn round(&self, env: &Env, order: &[&'static str]) -> Result<Vec<(&'static str, Sample)>> {
        self.state(env)?;
        let mut state = self.state.borrow_mut();
        let st = state.as_mut().context("state")?;
        let answer = st
            .helper
            .ask(&format!("{} {}", self.repeat, order.join(" ")))?;
        order
            .iter()
            .map(|v| {
                let a = &answer[*v];
                let s = match a["skipped"].as_str() {
                    Some(why) => Sample::skipped(why),
                    None => Sample::new(
                        a["ns"]
                            .as_f64()
                            .with_context(|| format!("{v}: no figure in {answer}"))?,
                    )
                    .with("action", a["action"].clone()),
                };
                Ok((*v, s))
            })
            .collect()
    }

    fn ratios(&self, m: &Medians) -> Vec<Ratio> {
        let mut r = Vec::new();
        let lo = self.tiers[0];
        let hi = self.tiers[self.tiers.len() - 1];
        for kind in KINDS {
            for t in &self.tiers {
                r.push(m.ratio(&format!("zt-{t}-{kind}"), "trivial"));
            }
            let mut x = m.ratio(&format!("zt-{hi}-{kind}"), &format!("zt-{lo}-{kind}"));
            x.name = format!(
                "{} / {}",
                Self::name(&format!("zt-{hi}-{kind}")),
                Self::name(&format!("zt-{lo}-{kind}"))
            );
            r.push(x);
            for t in &self.tiers {
                let f = format!("xdpf-{t}-{kind}");
                if !m.of(&f).is_nan() {
                    r.push(m.ratio(&format!("zt-{t}-{kind}"), &f));
                }
            }
        }
        r
    }

    fn targets(&self, m: &Medians) -> Vec<Target> {
        let lo = self.tiers[0];
        let hi = self.tiers[self.tiers.len() - 1];
        let mut t = Vec::new();
        for kind in KINDS {
            let (a, b) = (
                m.of(&format!("zt-{hi}-{kind}")),
                m.of(&format!("zt-{lo}-{kind}")),
            );
            t.push(Target::new(
                format!("{kind}: {} / {} <= 1.3", rules::short(hi), rules::short(lo)),
                a / b <= 1.3,
                format!("{:.2} ({a:.0} / {b:.0} ns)", a / b),
            ));
            for n in &self.tiers {
                let (z, f) = (
                    m.of(&format!("zt-{n}-{kind}")),
                    m.of(&format!("xdpf-{n}-{kind}")),
                );
                if !f.is_nan() {
                    t.push(Target::new(
                        format!("{kind} at {}: zt <= xdp-filter", rules::short(*n)),
                        z <= f,
                        format!("{z:.0} vs {f:.0} ns"),
                    ));
                }
            }
        }
        t
    }
}
