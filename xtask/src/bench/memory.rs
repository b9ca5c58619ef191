//! Scenario `memory`: ztd's peak RSS (`VmHWM`) and the kernel memory of its maps (the sum of
//! `memlock` over the distinct maps it holds, from `/proc/PID/fdinfo`), after starting with
//! policies of the rule tiers. A fresh ztd per tier and round, in its own cgroup.

use std::{collections::BTreeMap, fs, time::Duration};

use anyhow::{Context as _, Result};
use serde_json::{json, Value};

use super::{rules, Env, Medians, Ratio, Sample, Scenario, Sink, Target};

pub(super) struct Memory {
    tiers: Vec<usize>,
    variants: &'static [&'static str],
}

use super::rules::short as k;

impl Memory {
    pub fn new(quick: bool) -> Memory {
        let tiers = super::rules::tiers(quick, [10, 10_000, 100_000]);
        let mut v = Vec::new();
        for t in &tiers {
            v.push(&*Box::leak(format!("rss/{}", k(*t)).into_boxed_str()));
            v.push(&*Box::leak(format!("maps/{}", k(*t)).into_boxed_str()));
        }
        Memory {
            tiers,
            variants: Box::leak(v.into_boxed_slice()),
        }
    }
}

/// (VmHWM, VmRSS) of `pid` in KiB.
pub(super) fn rss_kib(pid: u32) -> Result<(u64, u64)> {
    let text = fs::read_to_string(format!("/proc/{pid}/status"))?;
    let field = |name: &str| -> Result<u64> {
        text.lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .with_context(|| format!("no {name} in /proc/{pid}/status"))
    };
    Ok((field("VmHWM:")?, field("VmRSS:")?))
}

/// Total `memlock` bytes and count of the distinct BPF maps `pid` holds open.
pub(super) fn map_memlock(pid: u32) -> Result<(u64, usize)> {
    let mut maps: BTreeMap<u64, u64> = BTreeMap::new();
    for e in fs::read_dir(format!("/proc/{pid}/fd"))? {
        let e = e?;
        let Ok(target) = fs::read_link(e.path()) else {
            continue;
        };
        if target.to_string_lossy() != "anon_inode:bpf-map" {
            continue;
        }
        let Ok(info) = fs::read_to_string(format!(
            "/proc/{pid}/fdinfo/{}",
            e.file_name().to_string_lossy()
        )) else {
            continue;
        };
        let get = |k: &str| {
            info.lines()
                .find_map(|l| l.strip_prefix(k))
                .and_then(|v| v.trim().parse::<u64>().ok())
        };
        if let (Some(id), Some(mem)) = (get("map_id:"), get("memlock:")) {
            maps.insert(id, mem);
        }
    }
    Ok((maps.values().sum(), maps.len()))
}

impl Scenario for Memory {
    fn id(&self) -> &'static str {
        "memory"
    }

    fn title(&self) -> String {
        format!(
            "ztd peak RSS (VmHWM) and kernel map memory (memlock of its maps) after loading {} rules",
            self.tiers
                .iter()
                .map(|t| t.to_string())
                .collect::<Vec<_>>()
                .join(", ")
        )
    }

    fn unit(&self) -> &'static str {
        "MiB"
    }

    fn variants(&self) -> &'static [&'static str] {
        self.variants
    }

    fn config(&self) -> Value {
        json!({ "tiers": self.tiers, "policy": "rules::filler, uid/gid/cgroup identities (as socket_hooks)" })
    }

    fn rounds(&self, default: usize) -> usize {
        default.min(2)
    }

    fn measure(&self, _env: &Env, _variant: &str) -> Result<Sample> {
        anyhow::bail!("memory is measured per round")
    }

    fn round(&self, env: &Env, order: &[&'static str]) -> Result<Vec<(&'static str, Sample)>> {
        let mut out = Vec::new();
        let root = super::cgroup2_root()?;
        let ghost = env
            .cgroup
            .path
            .strip_prefix(&root)
            .context("bench cgroup")?
            .display()
            .to_string();
        for t in &self.tiers {
            let label = format!("mem-{}", k(*t));
            let cgroup = env.sub_cgroup(&label)?;
            let f = rules::filler(*t, rules::Kinds::UidGidCgroup, &ghost, 5);
            let text = format!(
                "# cargo xtask bench (memory): {t} rules.\nversion = 1\n\n{}{}",
                f.identities, f.rules
            );
            let policy = env.policy(&format!("policy-{label}.toml"), &text)?;
            let ztd = env.start_ztd_in(
                &cgroup.path,
                &policy,
                &["--no-watch"],
                Sink::Null,
                &label,
                None,
                Duration::from_secs(120),
            )?;
            let pid = ztd.pid().context("ztd pid")?;
            let (hwm, rss) = rss_kib(pid)?;
            let (mem, n) = map_memlock(pid)?;
            ztd.stop()?;
            drop(cgroup);
            let rss_v = format!("rss/{}", k(*t));
            let map_v = format!("maps/{}", k(*t));
            for v in order {
                if **v == rss_v {
                    out.push((
                        *v,
                        Sample::new(hwm as f64 / 1024.0)
                            .with("vm_hwm_kib", hwm)
                            .with("vm_rss_kib", rss),
                    ));
                } else if **v == map_v {
                    out.push((
                        *v,
                        Sample::new(mem as f64 / 1048576.0)
                            .with("memlock_bytes", mem)
                            .with("maps", n),
                    ));
                }
            }
        }
        Ok(out)
    }

    fn ratios(&self, m: &Medians) -> Vec<Ratio> {
        let (lo, hi) = (k(self.tiers[0]), k(self.tiers[self.tiers.len() - 1]));
        vec![
            m.ratio(&format!("rss/{hi}"), &format!("rss/{lo}")),
            m.ratio(&format!("maps/{hi}"), &format!("maps/{lo}")),
        ]
    }

    fn targets(&self, m: &Medians) -> Vec<Target> {
        let hi = k(self.tiers[self.tiers.len() - 1]);
        let v = m.of(&format!("rss/{hi}"));
        vec![Target::new(
            format!("ztd peak RSS at {hi} rules <= 50 MiB"),
            v <= 50.0,
            format!("{v:.1} MiB"),
        )]
    }
}
