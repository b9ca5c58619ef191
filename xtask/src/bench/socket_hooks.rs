//! Scenario `socket_hooks`: what zt adds to each UDP `connect()`, `sendto()` and `bind()`,
//! and how that grows with the rule count.
//!
//! Four sibling cgroups side by side: `bare` (nothing attached) and one per rule tier, each
//! guarded by its own ztd (started once for the scenario). The policies hold N rules of
//! mixed identities (uids, gids, cgroups), distinct CIDRs and port sets ([`super::rules`]);
//! the rules that let the bench's calls through (identity: uid 0 in that cgroup; peer
//! 127.0.0.1; udp 1024-65535, egress and ingress) come last, deep in the set. A round runs
//! every (op, variant) REPS times alternately; the probe times its own loop (start-up is
//! not in the figure).

use std::{cell::RefCell, path::Path};

use anyhow::{ensure, Context as _, Result};
use serde_json::{json, Value};

use super::{
    cgroup2_root, median, rules, BenchCgroup, Env, Medians, Ratio, Sample, Scenario, Sink, Target,
    Ztd,
};

const OPS: &[&str] = &["connect", "sendto", "bind"];
const REPS: usize = 3;

pub(super) struct SocketHooks {
    tiers: Vec<usize>,
    count: u64,
    variants: &'static [&'static str],
    state: RefCell<Option<Vec<Lane>>>,
}

struct Lane {
    tier: Option<usize>,
    /// Dropped before the cgroup.
    _ztd: Option<Ztd>,
    cgroup: BenchCgroup,
}

fn tier_name(t: Option<usize>) -> String {
    match t {
        None => "bare".into(),
        Some(n) => rules::short(n),
    }
}

impl SocketHooks {
    pub fn new(quick: bool) -> SocketHooks {
        let tiers = super::rules::tiers(quick, [10, 10_000, 100_000]);
        let mut v = Vec::new();
        for op in OPS {
            for t in std::iter::once(None).chain(tiers.iter().copied().map(Some)) {
                v.push(&*Box::leak(
                    format!("{op}/{}", tier_name(t)).into_boxed_str(),
                ));
            }
        }
        SocketHooks {
            tiers,
            count: if quick { 2_000 } else { 10_000 },
            variants: Box::leak(v.into_boxed_slice()),
            state: RefCell::new(None),
        }
    }

    fn policy(env: &Env, cgroup: &Path, n: usize) -> Result<String> {
        let root = cgroup2_root()?;
        let rel = cgroup
            .strip_prefix(&root)
            .context("bench cgroup outside the cgroup2 mount")?
            .display()
            .to_string();
        let ghost = env
            .cgroup
            .path
            .strip_prefix(&root)
            .context("bench cgroup")?
            .display()
            .to_string();
        let fill = rules::filler(n.saturating_sub(2), rules::Kinds::UidGidCgroup, &ghost, 5);
        Ok(format!(
            "# cargo xtask bench (socket_hooks): {n} rules; the bench's own come last.\nversion = 1\n\n{}[identity.bench]\nuid = 0\ncgroup = \"{rel}\"\n\n{}[[rule]]\naction = \"allow\"\nidentity = \"bench\"\npeer = \"127.0.0.1\"\nports = [\"1024-65535\"]\nproto = \"udp\"\n\n[[rule]]\naction = \"allow\"\ndirection = \"ingress\"\nidentity = \"bench\"\npeer = \"127.0.0.1\"\nports = [\"1024-65535\"]\nproto = \"udp\"\n",
            fill.identities, fill.rules
        ))
    }

    fn lanes(&self, env: &Env) -> Result<()> {
        if self.state.borrow().is_some() {
            return Ok(());
        }
        let mut lanes = Vec::new();
        for t in std::iter::once(None).chain(self.tiers.iter().copied().map(Some)) {
            let label = format!("hooks-{}", tier_name(t));
            let cgroup = env.sub_cgroup(&label)?;
            let ztd = match t {
                None => None,
                Some(n) => {
                    let text = Self::policy(env, &cgroup.path, n)?;
                    let policy = env.policy(&format!("policy-{label}.toml"), &text)?;
                    println!("    starting ztd with {n} rules ({label})");
                    Some(env.start_ztd_in(
                        &cgroup.path,
                        &policy,
                        &["--no-watch"],
                        Sink::Null,
                        &label,
                        None,
                        std::time::Duration::from_secs(120),
                    )?)
                }
            };
            lanes.push(Lane {
                tier: t,
                _ztd: ztd,
                cgroup,
            });
        }
        *self.state.borrow_mut() = Some(lanes);
        Ok(())
    }

    fn run_op(&self, env: &Env, lane: &Lane, op: &str) -> Result<f64> {
        let (proto, addr, spread) = match op {
            "connect" => ("udp", "127.0.0.1:1024", 1000),
            "sendto" => ("udp", "127.0.0.1:0", 1),
            _ => ("udp", "127.0.0.1:20000", 1000),
        };
        let f = env.flood_op(&lane.cgroup.path, None, op, proto, addr, self.count, spread)?;
        ensure!(
            f.ok == self.count && f.eperm == 0 && f.other == 0,
            "{op} x{} in {}: ok={} eperm={} other={}: every call should have succeeded",
            self.count,
            lane.cgroup.path.display(),
            f.ok,
            f.eperm,
            f.other
        );
        Ok(f.loop_ns as f64 / self.count as f64)
    }
}

impl Scenario for SocketHooks {
    fn id(&self) -> &'static str {
        "socket_hooks"
    }

    fn title(&self) -> String {
        format!(
            "ns per UDP connect()/sendto()/bind() in a test cgroup: no program vs zt with {} rules (mixed identities, CIDRs, port ranges; the caller's rule last); {} calls per run, median of {REPS} alternating runs per round",
            self.tiers.iter().map(|t| t.to_string()).collect::<Vec<_>>().join(", "),
            self.count
        )
    }

    fn unit(&self) -> &'static str {
        "ns/call"
    }

    fn variants(&self) -> &'static [&'static str] {
        self.variants
    }

    fn config(&self) -> Value {
        json!({
            "tiers": self.tiers,
            "calls_per_run": self.count,
            "reps_per_round": REPS,
            "ops": {
                "connect": "UDP connect() to 127.0.0.1:1024-2023 on one socket (no packet)",
                "sendto": "1-byte UDP sendto() on one unconnected socket to a socket of the probe on 127.0.0.1",
                "bind": "socket(), bind() to 127.0.0.1:20000-20999, close()",
            },
            "policies": "target/bench/policy-hooks-*.toml",
        })
    }

    fn measure(&self, env: &Env, variant: &str) -> Result<Sample> {
        let v = self
            .variants
            .iter()
            .find(|v| **v == variant)
            .context("unknown variant")?;
        let mut r = self.round(env, &[v])?;
        r.pop().map(|(_, s)| s).context("no sample")
    }

    fn round(&self, env: &Env, order: &[&'static str]) -> Result<Vec<(&'static str, Sample)>> {
        self.lanes(env)?;
        let state = self.state.borrow();
        let lanes = state.as_ref().context("lanes")?;
        let mut per: Vec<Vec<f64>> = vec![Vec::new(); order.len()];
        for rep in 0..REPS {
            for i in 0..order.len() {
                let idx = (i + rep) % order.len();
                let v = order[idx];
                let (op, tier) = v.split_once('/').context("variant")?;
                let lane = lanes
                    .iter()
                    .find(|l| tier_name(l.tier) == tier)
                    .context("lane")?;
                per[idx].push(
                    self.run_op(env, lane, op)
                        .with_context(|| format!("variant `{v}`"))?,
                );
            }
        }
        Ok(order
            .iter()
            .zip(per)
            .map(|(v, p)| {
                (
                    *v,
                    Sample::new(median(&p)).with("reps_ns_per_call", json!(p)),
                )
            })
            .collect())
    }

    fn ratios(&self, m: &Medians) -> Vec<Ratio> {
        let mut r = Vec::new();
        let (lo, hi) = (
            tier_name(self.tiers.first().copied()),
            tier_name(self.tiers.last().copied()),
        );
        for op in OPS {
            let bare = format!("{op}/bare");
            for t in &self.tiers {
                let v = format!("{op}/{}", tier_name(Some(*t)));
                r.push(Medians::derived(
                    format!("{v}: added ns per call"),
                    m.of(&v) - m.of(&bare),
                ));
                r.push(m.ratio(&v, &bare));
            }
            let added = |t: &str| m.of(&format!("{op}/{t}")) - m.of(&bare);
            r.push(Medians::derived(
                format!("{op}: added at {hi} / added at {lo}"),
                added(&hi) / added(&lo),
            ));
        }
        r
    }

    fn targets(&self, m: &Medians) -> Vec<Target> {
        let (lo, hi) = (
            tier_name(self.tiers.first().copied()),
            tier_name(self.tiers.last().copied()),
        );
        let mut t = Vec::new();
        for op in OPS {
            let bare = m.of(&format!("{op}/bare"));
            let a_lo = m.of(&format!("{op}/{lo}")) - bare;
            let a_hi = m.of(&format!("{op}/{hi}")) - bare;
            // Below ~10 ns the difference is noise: count it as flat.
            let ratio = a_hi / a_lo;
            t.push(Target::new(
                format!("{op}: added at {hi} <= 1.2x added at {lo}"),
                a_hi <= 1.2 * a_lo || a_hi - a_lo < 10.0,
                format!("{a_hi:.0} ns vs {a_lo:.0} ns ({ratio:.2}x)"),
            ));
            t.push(Target::new(
                format!("{op}: added at {hi} <= 300 ns"),
                a_hi <= 300.0,
                format!("{a_hi:.0} ns"),
            ));
        }
        t
    }
}
