//! Scenario `apply`: policy apply time. One ztd (`--no-watch`) is asked to `ztctl reload`
//! policies of the rule tiers (from an almost empty one: parse, compile, load into the
//! maps, flip), and a one-rule change on top of the largest; the same allow-list as an
//! nftables ruleset (`meta skuid`/`meta skgid` . `ip daddr` . `th dport` interval sets) is
//! loaded with `nft -f` in a network namespace of the run, and the one-rule change is made
//! both ways nftables users would: the whole file again (atomic replace) and `nft add
//! element`. Figures are wall times of the commands; ztd's own breakdown
//! (`status.last_reload.timings`, when the daemon reports it) is kept in the samples.

use std::{cell::RefCell, path::PathBuf, time::Duration};

use anyhow::{ensure, Context as _, Result};
use serde_json::{json, Map, Value};

use super::{net, rules, BenchCgroup, Env, Medians, Ratio, Sample, Scenario, Sink, Target, Ztd};

pub(super) struct Apply {
    tiers: Vec<usize>,
    variants: &'static [&'static str],
    state: RefCell<Option<State>>,
}

struct State {
    ztd: Ztd,
    _cgroup: BenchCgroup,
    policy: PathBuf,
    netns: Option<net::Netns>,
    nft_skip: Option<String>,
}

use super::rules::short as k;

const EXTRA_RULE: &str = "[[rule]]\naction = \"allow\"\nidentity = \"u0\"\npeer = \"12.0.0.1/32\"\nports = [9999]\nproto = \"tcp\"\n";
const EXTRA_ELEMENT: &str = "add element inet ztbench skuid_2000_tcp { 12.0.0.2 . 9999 }\n";

impl Apply {
    pub fn new(quick: bool) -> Apply {
        let tiers = if quick {
            vec![2, 5]
        } else {
            vec![10_000, 100_000]
        };
        let last = k(tiers[tiers.len() - 1]);
        let mut v = Vec::new();
        for t in &tiers {
            v.push(format!("zt/{}", k(*t)));
        }
        v.push(format!("zt/{last}+1"));
        for t in &tiers {
            v.push(format!("nft/{}", k(*t)));
        }
        v.push(format!("nft/{last}+1"));
        v.push(format!("nft-element/{last}+1"));
        let v: Vec<&'static str> = v
            .into_iter()
            .map(|s| &*Box::leak(s.into_boxed_str()))
            .collect();
        Apply {
            tiers,
            variants: Box::leak(v.into_boxed_slice()),
            state: RefCell::new(None),
        }
    }

    fn toml(n: usize, extra: bool) -> String {
        let f = rules::filler(n, rules::Kinds::UidGid, "", 0);
        format!(
            "# cargo xtask bench (apply): {n} rules{}.\nversion = 1\n\n{}{}{}",
            if extra { " and one more" } else { "" },
            f.identities,
            f.rules,
            if extra { EXTRA_RULE } else { "" }
        )
    }

    fn state(&self, env: &Env) -> Result<()> {
        if self.state.borrow().is_some() {
            return Ok(());
        }
        let cgroup = env.sub_cgroup("apply")?;
        let policy = env.out.join("policy-apply.toml");
        std::fs::write(&policy, Self::toml(1, false))?;
        let ztd = env.start_ztd_in(
            &cgroup.path,
            &policy,
            &["--no-watch"],
            Sink::Null,
            "apply",
            None,
            Duration::from_secs(60),
        )?;
        let (netns, nft_skip) = if !net::have("nft") {
            (
                None,
                Some("nft not installed (apt-get install nftables)".to_string()),
            )
        } else {
            (Some(net::Netns::new(&env.tag, "apply")?), None)
        };
        *self.state.borrow_mut() = Some(State {
            ztd,
            _cgroup: cgroup,
            policy,
            netns,
            nft_skip,
        });
        Ok(())
    }

    /// Write the policy and `ztctl reload`; (wall ms, daemon timings if reported).
    fn reload(st: &State, text: &str) -> Result<Sample> {
        std::fs::write(&st.policy, text)?;
        let (out, wall) = st.ztd.ztctl(&["reload"])?;
        ensure!(
            out.status.success(),
            "ztctl reload failed ({}): {}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout).trim(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
        let status = st.ztd.status()?;
        ensure!(
            status["last_reload"]["ok"] != Value::Bool(false),
            "reload refused: {}",
            status["last_reload"]
        );
        let mut s = Sample::new(wall.as_secs_f64() * 1e3)
            .with("generation", status["generation"].clone())
            .with("rules", status["rules"].clone());
        if let Some(t) = status["last_reload"]
            .get("timings")
            .filter(|t| t.is_object())
        {
            s = s.with("daemon_timings", t.clone());
        }
        Ok(s)
    }
}

impl Scenario for Apply {
    fn id(&self) -> &'static str {
        "apply"
    }

    fn title(&self) -> String {
        format!(
            "policy apply time: `ztctl reload` of {} rules (from ~0) and a one-rule change on top, vs `nft -f` of the same allow-list in a test netns (whole file, and `nft add element`)",
            self.tiers.iter().map(|t| t.to_string()).collect::<Vec<_>>().join(" and ")
        )
    }

    fn unit(&self) -> &'static str {
        "ms"
    }

    fn variants(&self) -> &'static [&'static str] {
        self.variants
    }

    fn config(&self) -> Value {
        json!({
            "tiers": self.tiers,
            "zt": "ztd --no-watch; policy file rewritten, then `ztctl reload` (wall time); from a 1-rule policy for the full loads",
            "one_rule_change": EXTRA_RULE,
            "nft": "nft -f of table inet ztbench (an interval set of daddr . dport per uid|gid and protocol, a rule per set in an output chain, policy drop) after `delete table`; +1: the whole file again with one element more (atomic replace); then `nft add element` of another on top",
            "nft_element": EXTRA_ELEMENT,
        })
    }

    /// `nft -f` of 100k interval elements takes seconds: 2 rounds keep the run under 5 min.
    fn rounds(&self, default: usize) -> usize {
        default.min(2)
    }

    fn measure(&self, _env: &Env, _variant: &str) -> Result<Sample> {
        anyhow::bail!("apply is measured per round")
    }

    fn round(&self, env: &Env, order: &[&'static str]) -> Result<Vec<(&'static str, Sample)>> {
        self.state(env)?;
        let state = self.state.borrow();
        let st = state.as_ref().context("state")?;
        let last = *self.tiers.last().context("tiers")?;
        let mut got: Map<String, Value> = Map::new();
        let mut samples: Vec<(String, Sample)> = Vec::new();
        // zt and nft alternate which goes first.
        let zt_first = order.first().is_some_and(|v| v.starts_with("zt"));
        for side in if zt_first {
            ["zt", "nft"]
        } else {
            ["nft", "zt"]
        } {
            if side == "zt" {
                for t in &self.tiers {
                    Self::reload(st, &Self::toml(1, false))?;
                    let s = Self::reload(st, &Self::toml(*t, false))
                        .with_context(|| format!("reload of {t} rules"))?;
                    samples.push((format!("zt/{}", k(*t)), s));
                }
                let s = Self::reload(st, &Self::toml(last, true)).context("one-rule change")?;
                samples.push((format!("zt/{}+1", k(last)), s));
                Self::reload(st, &Self::toml(1, false))?;
            } else {
                let names = [
                    self.tiers
                        .iter()
                        .map(|t| format!("nft/{}", k(*t)))
                        .collect::<Vec<_>>(),
                    vec![
                        format!("nft/{}+1", k(last)),
                        format!("nft-element/{}+1", k(last)),
                    ],
                ]
                .concat();
                match (&st.netns, &st.nft_skip) {
                    (Some(ns), None) => {
                        for t in &self.tiers {
                            let f = rules::filler(*t, rules::Kinds::UidGid, "", 0);
                            let file = env.out.join(format!("nft-apply-{}.nft", k(*t)));
                            std::fs::write(&file, rules::nft_ruleset(&f))?;
                            let _ = ns.cmd("nft", &["delete", "table", "inet", "ztbench"]);
                            let d = ns.nft_file(&file)?;
                            samples.push((
                                format!("nft/{}", k(*t)),
                                Sample::new(d.as_secs_f64() * 1e3),
                            ));
                        }
                        let mut f = rules::filler(last, rules::Kinds::UidGid, "", 0);
                        f.nft.push(rules::NftElem {
                            key: "skuid",
                            id: 2000,
                            proto: "tcp",
                            elem: "12.0.0.1 . 9999".into(),
                        });
                        let file = env.out.join(format!("nft-apply-{}+1.nft", k(last)));
                        std::fs::write(&file, rules::nft_ruleset(&f))?;
                        let d = ns.nft_file(&file)?;
                        samples.push((
                            format!("nft/{}+1", k(last)),
                            Sample::new(d.as_secs_f64() * 1e3),
                        ));
                        // On top of that, one more element the incremental way.
                        let file = env.out.join("nft-apply-element.nft");
                        std::fs::write(&file, EXTRA_ELEMENT)?;
                        let d = ns.nft_file(&file)?;
                        samples.push((
                            format!("nft-element/{}+1", k(last)),
                            Sample::new(d.as_secs_f64() * 1e3),
                        ));
                        let _ = ns.cmd("nft", &["delete", "table", "inet", "ztbench"]);
                    }
                    (_, skip) => {
                        let why = skip.clone().unwrap_or_else(|| "no namespace".into());
                        for n in names {
                            samples.push((n, Sample::skipped(why.clone())));
                        }
                    }
                }
            }
        }
        got.clear();
        let mut out = Vec::new();
        for v in order {
            let i = samples
                .iter()
                .position(|(n, _)| n == v)
                .with_context(|| format!("variant {v} not measured"))?;
            out.push((*v, samples.swap_remove(i).1));
        }
        Ok(out)
    }

    fn ratios(&self, m: &Medians) -> Vec<Ratio> {
        let mut r = Vec::new();
        for t in &self.tiers {
            r.push(m.ratio(&format!("zt/{}", k(*t)), &format!("nft/{}", k(*t))));
        }
        let last = k(*self.tiers.last().unwrap_or(&0));
        r.push(m.ratio(&format!("zt/{last}+1"), &format!("nft/{last}+1")));
        r.push(m.ratio(&format!("zt/{last}+1"), &format!("nft-element/{last}+1")));
        r
    }

    fn targets(&self, m: &Medians) -> Vec<Target> {
        let last = k(*self.tiers.last().unwrap_or(&0));
        let zt = m.of(&format!("zt/{last}"));
        let nft = m.of(&format!("nft/{last}"));
        let one = m.of(&format!("zt/{last}+1"));
        vec![
            Target::new(
                format!("full load of {last} rules <= 0.5x nft -f"),
                zt <= 0.5 * nft,
                format!("{zt:.0} ms vs nft {nft:.0} ms ({:.2}x)", zt / nft),
            ),
            Target::new(
                format!("one-rule change on top of {last} <= 20 ms"),
                one <= 20.0,
                format!("{one:.1} ms"),
            ),
        ]
    }
}
