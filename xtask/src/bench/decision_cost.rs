//! Scenario `decision_cost`: the cost of a decision, with and without an event per decision.

use std::path::Path;

use anyhow::{anyhow, bail, ensure, Context as _, Result};
use serde_json::{json, Map, Value};

use super::{median, ns, BenchCgroup, Env, Events, Medians, Ratio, Sample, Scenario, Sink, Ztd};

/// UDP `connect()`s to 127.0.0.1 (one socket; a connect sends nothing) from a cgroup of the
/// run: with no ztd (`bare`), with ztd allowing them without events (`events-off`), and
/// with ztd `--log-allowed`, where every allow is an event (`events-on`).
///
/// The three variants run side by side, each in its own sibling cgroup, each guarded cgroup
/// by its own ztd (fresh every round): the round alternates them run by run, REPS times, so
/// that the three figures of a round are taken within the same second or two — this VM's
/// speed drifts by up to ~1.7x over seconds, which one-variant-after-another rounds turned
/// into noise in the ratios. An idle daemon costs the other cgroups nothing: the hooks run
/// only for their own cgroup.
///
/// Per connect = (wall of a LARGE-connect run − wall of a SMALL-connect run) / (LARGE −
/// SMALL): process start-up cancels out. LARGE is chosen so that the ring buffer (4 MiB,
/// ~30,800 events of 136 bytes) holds a whole run's events even if the daemon read none, and
/// every connect of a round goes to its own port (the two runs use different port ranges),
/// so the 16/s rate limit never suppresses one: with events on, every timed connect makes an
/// event that reaches the daemon. A variant's figure of a round is the median of its REPS
/// pairs. ztd's stdout goes to /dev/null: this is the decision path's cost, not the disk's
/// (events_per_second compares the sinks).
pub(super) struct DecisionCost {
    /// Alternating (small, large) pairs per variant and round.
    reps: usize,
}

impl DecisionCost {
    /// `--quick`: 2 pairs per round instead of 7.
    pub fn new(quick: bool) -> DecisionCost {
        DecisionCost {
            reps: if quick { 2 } else { COST_REPS },
        }
    }
}

const COST_LARGE: u64 = 25_000;
const COST_SMALL: u64 = 1_000;
const COST_REPS: usize = 5;
const COST_LARGE_ADDR: &str = "127.0.0.1:1024";
const COST_SMALL_ADDR: &str = "127.0.0.1:40000";
const COST_WARMUP_ADDR: &str = "127.0.0.1:60000";

pub(super) const ALLOW_UDP_LOOPBACK: &str = r#"# cargo xtask bench: every UDP connect to 127.0.0.1 is allowed, whatever the port.
version = 1

[[rule]]
action = "allow"
peer = "127.0.0.1"
proto = "udp"
"#;

/// One variant of a decision_cost round: its daemon (dropped first), its cgroup, its runs.
struct Lane {
    variant: &'static str,
    ztd: Option<Ztd>,
    cgroup: BenchCgroup,
    events_on: bool,
    per_connect: Vec<f64>,
    /// The daemon's counters when the timed runs began, and after the last run.
    first: Option<Events>,
    last: Option<Events>,
}

impl Lane {
    fn new(env: &Env, variant: &'static str, policy: &Path) -> Result<Lane> {
        let label = format!("cost-{variant}");
        let cgroup = env.sub_cgroup(&label)?;
        let (ztd, events_on) = match variant {
            "bare" => (None, false),
            "events-off" => (
                Some(env.start_ztd(&cgroup.path, policy, &[], Sink::Null, &label)?),
                false,
            ),
            "events-on" => (
                Some(env.start_ztd(
                    &cgroup.path,
                    policy,
                    &["--log-allowed"],
                    Sink::Null,
                    &label,
                )?),
                true,
            ),
            other => bail!("unknown variant {other}"),
        };
        Ok(Lane {
            variant,
            ztd,
            cgroup,
            events_on,
            per_connect: Vec::new(),
            first: None,
            last: None,
        })
    }

    /// Warm up (the first connects after the programs are attached) on ports the timed runs
    /// do not use, and note the daemon's counters.
    fn warm_up(&mut self, env: &Env) -> Result<()> {
        env.flood_ok(&self.cgroup.path, COST_WARMUP_ADDR, COST_SMALL, 1000)?;
        if let Some(ztd) = &self.ztd {
            let e = ztd.drained()?.0;
            self.first = Some(e);
            self.last = Some(e);
        }
        Ok(())
    }

    /// One (small, large) pair; with a daemon, check each run's decisions and events and wait
    /// until the ring is drained, so that every run starts with an empty ring.
    fn pair(&mut self, env: &Env) -> Result<()> {
        let mut walls = Vec::new();
        for (addr, count) in [(COST_SMALL_ADDR, COST_SMALL), (COST_LARGE_ADDR, COST_LARGE)] {
            let spread = u16::try_from(count).context("port spread")?;
            walls.push(env.flood_ok(&self.cgroup.path, addr, count, spread)?.wall);
            if let (Some(ztd), Some(e0)) = (&self.ztd, self.last) {
                let now = ztd.drained()?.0;
                self.last = Some(now);
                let d = now.since(&e0);
                ensure!(
                    d.allowed == count,
                    "the kernel counted {} allowed decisions for {count} connects",
                    d.allowed
                );
                let expect = if self.events_on { count } else { 0 };
                ensure!(
                    d.produced == expect && d.suppressed == 0,
                    "expected {expect} events and none suppressed for {count} connects: {d:?}"
                );
            }
        }
        self.per_connect
            .push((ns(walls[1]) - ns(walls[0])) / (COST_LARGE - COST_SMALL) as f64);
        Ok(())
    }

    fn finish(self) -> Result<Sample> {
        let mut detail = Map::new();
        detail.insert("reps_ns_per_connect".into(), json!(self.per_connect));
        if let (Some(first), Some(last)) = (self.first, self.last) {
            let t = last.since(&first);
            detail.insert("events_produced".into(), json!(t.produced));
            detail.insert("events_delivered".into(), json!(t.delivered));
            detail.insert("events_lost_kernel".into(), json!(t.lost_kernel));
            detail.insert("events_lost_daemon".into(), json!(t.lost_daemon));
            detail.insert("events_suppressed".into(), json!(t.suppressed));
            if t.lost_kernel + t.lost_daemon > 0 {
                println!(
                    "    note: {}: {} events lost in the kernel, {} in the daemon: those connects made no complete event",
                    self.variant, t.lost_kernel, t.lost_daemon
                );
            }
        }
        let value = median(&self.per_connect);
        if let Some(ztd) = self.ztd {
            ztd.stop()?;
        }
        Ok(Sample { value, detail })
    }
}

impl Scenario for DecisionCost {
    fn id(&self) -> &'static str {
        "decision_cost"
    }

    fn title(&self) -> String {
        format!(
            "allowed UDP connect() to 127.0.0.1: no ztd, ztd without events, ztd --log-allowed (an event per connect), side by side in sibling cgroups; ns per connect = (wall({COST_LARGE}) - wall({COST_SMALL})) / {}, median of {} alternating pairs per round; ztd stdout -> /dev/null",
            COST_LARGE - COST_SMALL,
            self.reps
        )
    }

    fn unit(&self) -> &'static str {
        "ns/connect"
    }

    fn variants(&self) -> &'static [&'static str] {
        &["bare", "events-off", "events-on"]
    }

    fn config(&self) -> Value {
        json!({
            "large": COST_LARGE,
            "large_addr": COST_LARGE_ADDR,
            "small": COST_SMALL,
            "small_addr": COST_SMALL_ADDR,
            "port_spread": "= count (every connect of a run to its own port)",
            "reps_per_round": self.reps,
            "policy": ALLOW_UDP_LOOPBACK,
            "ztd_stdout": "/dev/null",
        })
    }

    fn measure(&self, env: &Env, variant: &str) -> Result<Sample> {
        let v = self
            .variants()
            .iter()
            .find(|v| **v == variant)
            .ok_or_else(|| anyhow!("unknown variant {variant}"))?;
        let mut r = self.round(env, &[v])?;
        r.pop().map(|(_, s)| s).ok_or_else(|| anyhow!("no sample"))
    }

    fn round(&self, env: &Env, order: &[&'static str]) -> Result<Vec<(&'static str, Sample)>> {
        let policy = env.policy("policy-allow-udp-loopback.toml", ALLOW_UDP_LOOPBACK)?;
        let mut lanes = Vec::new();
        for v in order {
            lanes.push(Lane::new(env, v, &policy).with_context(|| format!("variant `{v}`"))?);
        }
        for lane in &mut lanes {
            let v = lane.variant;
            lane.warm_up(env)
                .with_context(|| format!("variant `{v}`: warm-up"))?;
        }
        let n = lanes.len();
        for rep in 0..self.reps {
            for i in 0..n {
                let lane = &mut lanes[(i + rep) % n];
                let v = lane.variant;
                lane.pair(env)
                    .with_context(|| format!("variant `{v}`, pair {}", rep + 1))?;
            }
        }
        lanes
            .into_iter()
            .map(|lane| {
                let v = lane.variant;
                Ok((v, lane.finish().with_context(|| format!("variant `{v}`"))?))
            })
            .collect()
    }

    /// 5 rounds (of the run's 7) keep the whole run under 5 minutes.
    fn rounds(&self, default: usize) -> usize {
        default.min(5)
    }

    fn ratios(&self, m: &Medians) -> Vec<Ratio> {
        vec![
            m.ratio("events-on", "events-off"),
            m.ratio("events-off", "bare"),
            m.ratio("events-on", "bare"),
        ]
    }
}
