//! Scenario `egress`: identity-aware egress, zt vs nftables. The same allow-list both ways —
//! zt: identities by uid and cgroup; nftables: `meta skuid` and `socket cgroupv2` with sets
//! of uids, peers and ports — and the rate of TCP connects (full handshake, abortive close)
//! over loopback from a cgroup of the run, each variant in its own network namespace with
//! its own accepting peer (outside the guarded cgroup):
//!
//! - `bare`: no filter;
//! - `zt`: ztd guarding the client's cgroup with the allow-list;
//! - `nft`: the namespace's `inet` output chain, `policy drop`, the allow-list as sets
//!   (packets other than a bare SYN are accepted first: the identity checks run per new
//!   connection, as zt's connect4 does; no conntrack).
//!
//! OpenSnitch is listed and skipped: see [`OPENSNITCH`].

use std::{
    cell::RefCell,
    io::{BufRead as _, BufReader},
    process::{Child, Command, Stdio},
    time::Duration,
};

use anyhow::{ensure, Context as _, Result};
use serde_json::{json, Value};

use super::{
    cgroup2_root, enter_before_exec, median, net, BenchCgroup, Env, Medians, Ratio, Sample,
    Scenario, Sink, Target, Ztd,
};

const PORT: u16 = 5000;
const REPS: usize = 5;
/// Filler identities (uids) and peers of the allow-list besides the bench's own.
const FILL_UIDS: u32 = 20;
const FILL_PEERS: usize = 200;

/// Why OpenSnitch is not measured here.
pub const OPENSNITCH: &str = "not run: opensnitchd is host-wide — it installs its NFQUEUE rules in the main namespace's nftables/iptables and watches processes with kprobes (compiled out on this kernel); it cannot be confined to a test network namespace without risking this shared machine's traffic";

pub(super) struct Egress {
    count: u64,
    state: RefCell<Option<Vec<Lane>>>,
}

/// One variant's world; dropped in field order (daemon, peer, namespace, cgroup).
struct Lane {
    name: &'static str,
    _ztd: Option<Ztd>,
    sink: SinkProc,
    netns: net::Netns,
    cgroup: BenchCgroup,
    skip: Option<String>,
}

/// The accepting peer; killed (by pid) on drop.
struct SinkProc(Option<Child>);

impl Drop for SinkProc {
    fn drop(&mut self) {
        if let Some(mut c) = self.0.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn peers() -> Vec<String> {
    let mut v = vec!["127.0.0.1/32".to_string()];
    for i in 0..FILL_PEERS {
        v.push(format!("10.{}.{}.0/24", 100 + i / 256, i % 256));
    }
    v
}

const PORTS_TOML: &str = "[443, 5000, \"8000-8100\"]";
const PORTS_NFT: &str = "443, 5000, 8000-8100";

impl Egress {
    pub fn new(quick: bool) -> Egress {
        Egress {
            count: if quick { 300 } else { 3_000 },
            state: RefCell::new(None),
        }
    }

    fn zt_policy(rel: &str) -> String {
        let mut s = format!(
            "# cargo xtask bench (egress): the allow-list (see nft-egress.nft for nftables').\nversion = 1\n\n[network.allowed]\ncidrs = [{}]\n\n[identity.bench]\nuid = 0\ncgroup = \"{rel}\"\n\n[[rule]]\naction = \"allow\"\nidentity = \"bench\"\npeer = \"allowed\"\nports = {PORTS_TOML}\nproto = \"tcp\"\n\n",
            peers().iter().map(|p| format!("\"{p}\"")).collect::<Vec<_>>().join(", ")
        );
        for k in 0..FILL_UIDS {
            s.push_str(&format!(
                "[identity.u{k}]\nuid = {}\n\n[[rule]]\naction = \"allow\"\nidentity = \"u{k}\"\npeer = \"allowed\"\nports = {PORTS_TOML}\nproto = \"tcp\"\n\n",
                2000 + k
            ));
        }
        s
    }

    fn nft_ruleset(cg_path: &str, level: usize) -> String {
        let uids: Vec<String> = (0..FILL_UIDS).map(|k| (2000 + k).to_string()).collect();
        format!(
            "table inet ztbench {{\n  set bench_uids {{ type uid; elements = {{ 0 }} }}\n  set fill_uids {{ type uid; elements = {{ {} }} }}\n  set peers {{ type ipv4_addr; flags interval; elements = {{ {} }} }}\n  set ports {{ type inet_service; flags interval; elements = {{ {PORTS_NFT} }} }}\n  chain output {{\n    type filter hook output priority 0; policy drop;\n    tcp flags & (syn | ack) != syn accept\n    meta skuid @bench_uids socket cgroupv2 level {level} \"{cg_path}\" ip daddr @peers tcp dport @ports accept\n    meta skuid @fill_uids ip daddr @peers tcp dport @ports accept\n  }}\n}}\n",
            uids.join(", "),
            peers().iter().map(|p| p.trim_end_matches("/32").to_string()).collect::<Vec<_>>().join(", ")
        )
    }

    fn lanes(&self, env: &Env) -> Result<()> {
        if self.state.borrow().is_some() {
            return Ok(());
        }
        let root = cgroup2_root()?;
        let mut lanes = Vec::new();
        for name in ["bare", "zt", "nft"] {
            let label = format!("egress-{name}");
            let cgroup = env.sub_cgroup(&label)?;
            let netns = net::Netns::new(&env.tag, &label)?;
            let mut cmd = Command::new(env.probe());
            cmd.args(["tcp-sink", "--addr", &format!("127.0.0.1:{PORT}")])
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(Stdio::inherit());
            enter_before_exec(&mut cmd, None, Some(&netns.path()))?;
            let mut child = cmd.spawn().context("starting zt-probe tcp-sink")?;
            let mut line = String::new();
            BufReader::new(child.stdout.take().context("sink stdout")?).read_line(&mut line)?;
            let sink = SinkProc(Some(child));
            ensure!(line.trim() == "ready", "tcp-sink said {line:?}");
            let mut skip = None;
            let ztd = match name {
                "zt" => {
                    let rel = cgroup.path.strip_prefix(&root)?.display().to_string();
                    let policy = env.policy("policy-egress.toml", &Self::zt_policy(&rel))?;
                    Some(env.start_ztd_in(
                        &cgroup.path,
                        &policy,
                        &["--no-watch"],
                        Sink::Null,
                        &label,
                        None,
                        Duration::from_secs(60),
                    )?)
                }
                "nft" => {
                    if !net::have("nft") {
                        skip = Some("nft not installed (apt-get install nftables)".to_string());
                    } else {
                        match net::nft_cgroup(&root, &cgroup.path) {
                            None => {
                                skip = Some(format!(
                                    "nft resolves `socket cgroupv2` paths under /sys/fs/cgroup; the cgroup2 mount {} is elsewhere",
                                    root.display()
                                ))
                            }
                            Some((path, level)) => {
                                let file = env.out.join("nft-egress.nft");
                                std::fs::write(&file, Self::nft_ruleset(&path, level))?;
                                if let Err(e) = netns.nft_file(&file) {
                                    skip = Some(format!("nft -f refused the ruleset: {e:#}"));
                                }
                            }
                        }
                    }
                    None
                }
                _ => None,
            };
            lanes.push(Lane {
                name,
                _ztd: ztd,
                sink,
                netns,
                cgroup,
                skip,
            });
        }
        *self.state.borrow_mut() = Some(lanes);
        Ok(())
    }

    fn run(&self, env: &Env, lane: &Lane) -> Result<f64> {
        let _ = &lane.sink;
        let f = env.flood_op(
            &lane.cgroup.path,
            Some(&lane.netns.path()),
            "handshake",
            "tcp",
            &format!("127.0.0.1:{PORT}"),
            self.count,
            1,
        )?;
        ensure!(
            f.ok == self.count,
            "{}: {} of {} TCP connects succeeded (eperm={} other={})",
            lane.name,
            f.ok,
            self.count,
            f.eperm,
            f.other
        );
        Ok(self.count as f64 / (f.loop_ns as f64 / 1e9))
    }
}

impl Scenario for Egress {
    fn id(&self) -> &'static str {
        "egress"
    }

    fn title(&self) -> String {
        format!(
            "TCP connects/s over loopback in a test netns, allow-list by uid + cgroup: no filter, zt, nftables (meta skuid, socket cgroupv2, sets); {} connects per run, median of {REPS} alternating runs per round",
            self.count
        )
    }

    fn unit(&self) -> &'static str {
        "connects/s"
    }

    fn variants(&self) -> &'static [&'static str] {
        &["bare", "zt", "nft", "opensnitch"]
    }

    fn config(&self) -> Value {
        json!({
            "connects_per_run": self.count,
            "reps_per_round": REPS,
            "peer": format!("127.0.0.1:{PORT}, an accept-and-close loop outside the guarded cgroup"),
            "allow_list": format!("uid 0 in the client's cgroup, and {FILL_UIDS} other uids; {} peers; tcp ports {PORTS_NFT}", FILL_PEERS + 1),
            "zt_policy": "target/bench/policy-egress.toml",
            "nft_ruleset": "target/bench/nft-egress.nft",
            "opensnitch": OPENSNITCH,
        })
    }

    fn measure(&self, _env: &Env, _variant: &str) -> Result<Sample> {
        anyhow::bail!("egress is measured per round")
    }

    fn round(&self, env: &Env, order: &[&'static str]) -> Result<Vec<(&'static str, Sample)>> {
        self.lanes(env)?;
        let state = self.state.borrow();
        let lanes = state.as_ref().context("lanes")?;
        let mut per: Vec<Vec<f64>> = vec![Vec::new(); order.len()];
        for rep in 0..REPS {
            for i in 0..order.len() {
                let idx = (i + rep) % order.len();
                let Some(lane) = lanes.iter().find(|l| l.name == order[idx]) else {
                    continue;
                };
                if lane.skip.is_none() {
                    per[idx].push(
                        self.run(env, lane)
                            .with_context(|| format!("variant `{}`", lane.name))?,
                    );
                }
            }
        }
        Ok(order
            .iter()
            .zip(per)
            .map(|(v, p)| {
                let skip = if *v == "opensnitch" {
                    Some(OPENSNITCH.to_string())
                } else {
                    lanes
                        .iter()
                        .find(|l| l.name == *v)
                        .and_then(|l| l.skip.clone())
                };
                let s = match skip {
                    Some(why) => Sample::skipped(why),
                    None => Sample::new(median(&p)).with("reps_connects_per_s", json!(p)),
                };
                (*v, s)
            })
            .collect())
    }

    fn ratios(&self, m: &Medians) -> Vec<Ratio> {
        vec![
            m.ratio("zt", "bare"),
            m.ratio("nft", "bare"),
            m.ratio("zt", "nft"),
        ]
    }

    fn targets(&self, m: &Medians) -> Vec<Target> {
        let (z, n) = (m.of("zt"), m.of("nft"));
        vec![Target::new(
            "zt connect rate >= nftables'",
            z >= n,
            format!("{z:.0} vs {n:.0} connects/s ({:.3}x)", z / n),
        )]
    }
}
