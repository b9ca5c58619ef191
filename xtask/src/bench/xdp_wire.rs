//! Scenario `xdp_wire`: dropping a flood on the wire, zt's XDP front door vs nftables.
//!
//! Each variant has its own pair of namespaces of the run: a sender (`wire-<v>-s`) and a
//! guarded one (`wire-<v>-g`) joined by a veth. The sender's probe (`zt-probe blast`: a raw
//! IP socket, `sendmmsg` of 64) sends UDP datagrams for a fixed time, their sources cycling
//! over the /24s of a 10,000-CIDR block list. The guarded side:
//!
//! - `none`: no filter; the datagrams go up to UDP (no listener: `NoPorts`);
//! - `zt`: ztd (in that namespace) with `--xdp` on the veth and the CIDRs as a host-wide
//!   ingress deny list: dropped in XDP (native mode: what `--xdp-mode auto` picks on veth);
//! - `zt-skb`: the same with `--xdp-mode skb` (generic XDP, in the stack's receive path);
//! - `nft-netdev`: an nft `netdev` ingress chain on the veth, `ip saddr @blocked drop`;
//! - `nft-inet`: an nft `inet` input chain, the same rule.
//!
//! The figure is the packets the guarded side handled per second of sending — counted where
//! each variant ends them (UDP's counters, zt's XDP counters, the nft rule's counter) — so
//! what a filter costs shows as a lower rate; each is reported as a ratio of `none`'s.

use std::{cell::RefCell, time::Duration};

use anyhow::{ensure, Context as _, Result};
use serde_json::{json, Value};

use super::{net, rules, BenchCgroup, Env, Medians, Ratio, Sample, Scenario, Sink, Target, Ztd};

const VARIANTS: &[&str] = &["none", "zt", "zt-skb", "nft-netdev", "nft-inet"];
const DST: &str = "10.254.0.2";
const DPORT: u16 = 9;

pub(super) struct XdpWire {
    cidrs: usize,
    blast: Duration,
    state: RefCell<Option<Vec<Lane>>>,
}

/// Dropped in field order: daemon, namespaces, cgroup.
struct Lane {
    name: &'static str,
    ztd: Option<Ztd>,
    sender: net::Netns,
    guarded: net::Netns,
    _cgroup: Option<BenchCgroup>,
    skip: Option<String>,
}

impl XdpWire {
    pub fn new(quick: bool) -> XdpWire {
        XdpWire {
            cidrs: if quick { 8 } else { 10_000 },
            blast: Duration::from_millis(if quick { 200 } else { 500 }),
            state: RefCell::new(None),
        }
    }

    /// The /24s of the list: the sources of the flood.
    fn slash24s(&self) -> u32 {
        (self.cidrs / 8).max(1) as u32
    }

    fn cidr_list(&self) -> Vec<String> {
        (0..self.cidrs.max(8)).map(rules::cidr).collect()
    }

    fn zt_policy(&self) -> String {
        format!(
            "# cargo xtask bench (xdp_wire): a host-wide ingress deny list of {} CIDRs.\nversion = 1\n\n[network.blocked]\ncidrs = [\n{}]\n\n[[rule]]\naction = \"deny\"\ndirection = \"ingress\"\npeer = \"blocked\"\n",
            self.cidrs.max(8),
            self.cidr_list()
                .iter()
                .map(|c| format!("  \"{c}\",\n"))
                .collect::<String>()
        )
    }

    fn nft(&self, family: &str) -> String {
        let hook = if family == "netdev" {
            "type filter hook ingress device \"wg\" priority -500;"
        } else {
            "type filter hook input priority 0; policy accept;"
        };
        format!(
            "table {family} ztbench {{\n  counter drops {{ }}\n  set blocked {{\n    type ipv4_addr\n    flags interval\n    elements = {{\n{}    }}\n  }}\n  chain filter {{\n    {hook}\n    ip saddr @blocked counter name drops drop\n  }}\n}}\n",
            self.cidr_list()
                .iter()
                .map(|c| format!("      {},\n", c.trim_end_matches("/32")))
                .collect::<String>()
        )
    }

    fn lanes(&self, env: &Env) -> Result<()> {
        if self.state.borrow().is_some() {
            return Ok(());
        }
        let mut lanes = Vec::new();
        for name in VARIANTS {
            let sender = net::Netns::new(&env.tag, &format!("wire-{name}-s"))?;
            let guarded = net::Netns::new(&env.tag, &format!("wire-{name}-g"))?;
            net::veth(&sender, "ws", &guarded, "wg")?;
            guarded.sysctl("net.ipv4.conf.all.rp_filter", "0")?;
            guarded.sysctl("net.ipv4.conf.wg.rp_filter", "0")?;
            guarded.cmd("ip", &["route", "add", "default", "via", "10.254.0.1"])?;
            let mut skip = None;
            let mut ztd = None;
            let mut cgroup = None;
            match *name {
                "zt" | "zt-skb" => {
                    let cg = env.sub_cgroup(&format!("wire-{name}"))?;
                    let policy = env.policy("policy-wire.toml", &self.zt_policy())?;
                    let mode = if *name == "zt" { "auto" } else { "skb" };
                    println!(
                        "    starting ztd --xdp wg --xdp-mode {mode} in {} ({} CIDRs)",
                        guarded.name, self.cidrs
                    );
                    ztd = Some(env.start_ztd_in(
                        &cg.path,
                        &policy,
                        &["--no-watch", "--xdp", "wg", "--xdp-mode", mode],
                        Sink::Null,
                        &format!("wire-{name}"),
                        Some(&guarded.path()),
                        Duration::from_secs(120),
                    )?);
                    cgroup = Some(cg);
                }
                "nft-netdev" | "nft-inet" => {
                    if !net::have("nft") {
                        skip = Some("nft not installed (apt-get install nftables)".into());
                    } else {
                        let family = if *name == "nft-netdev" {
                            "netdev"
                        } else {
                            "inet"
                        };
                        let file = env.out.join(format!("nft-wire-{family}.nft"));
                        std::fs::write(&file, self.nft(family))?;
                        if let Err(e) = guarded.nft_file(&file) {
                            skip = Some(format!("nft -f refused the ruleset: {e:#}"));
                        }
                    }
                }
                _ => {}
            }
            lanes.push(Lane {
                name,
                ztd,
                sender,
                guarded,
                _cgroup: cgroup,
                skip,
            });
        }
        *self.state.borrow_mut() = Some(lanes);
        Ok(())
    }

    /// Packets the guarded side has ended so far, where this variant ends them.
    fn handled(lane: &Lane) -> Result<u64> {
        match lane.name {
            "none" => Ok(lane.guarded.snmp("Udp", "InDatagrams")?
                + lane.guarded.snmp("Udp", "NoPorts")?
                + lane.guarded.snmp("Udp", "InErrors")?),
            "zt" | "zt-skb" => {
                let st = lane.ztd.as_ref().context("ztd")?.status()?;
                let c = &st["xdp"][0]["counters"];
                ensure!(
                    c.is_object(),
                    "ztctl status shows no XDP counters: {}",
                    st["xdp"]
                );
                Ok([
                    "passed",
                    "dropped_deny_list",
                    "dropped_closed_port",
                    "dropped_malformed",
                    "passed_not_judged",
                    "no_policy",
                    "audited",
                ]
                .iter()
                .filter_map(|k| c[*k].as_u64())
                .sum())
            }
            _ => {
                let family = if lane.name == "nft-netdev" {
                    "netdev"
                } else {
                    "inet"
                };
                let text = lane
                    .guarded
                    .cmd("nft", &["list", "counter", family, "ztbench", "drops"])?;
                text.split_whitespace()
                    .skip_while(|w| *w != "packets")
                    .nth(1)
                    .and_then(|v| v.parse().ok())
                    .with_context(|| format!("no packet count in {text:?}"))
            }
        }
    }

    fn run(&self, env: &Env, lane: &Lane) -> Result<Sample> {
        let udp0 = lane.guarded.snmp("Udp", "NoPorts")?;
        let xdp_mode = match &lane.ztd {
            Some(z) => z.status()?["xdp"][0]["mode"].clone(),
            None => Value::Null,
        };
        let before = Self::handled(lane)?;
        let run = env.probe_in(
            None,
            Some(&lane.sender.path()),
            &[
                "blast".into(),
                "--dst".into(),
                DST.into(),
                "--dport".into(),
                DPORT.to_string(),
                "--src-base".into(),
                "11.0.0.1".into(),
                "--src-count".into(),
                self.slash24s().to_string(),
                "--src-step".into(),
                "256".into(),
                "--duration-ms".into(),
                self.blast.as_millis().to_string(),
            ],
        )?;
        ensure!(
            run.success,
            "`{}` failed: {} {}",
            run.line,
            run.stdout,
            run.stderr
        );
        let sent = run.field("sent")?;
        let ns = run.field("ns")?;
        // Let the receive side finish what is queued.
        std::thread::sleep(Duration::from_millis(50));
        let handled = Self::handled(lane)?.saturating_sub(before);
        let reached_udp = lane.guarded.snmp("Udp", "NoPorts")?.saturating_sub(udp0);
        if lane.name != "none" {
            ensure!(
                reached_udp <= sent / 100,
                "{}: {reached_udp} of {sent} datagrams reached UDP: the filter did not drop them",
                lane.name
            );
        }
        Ok(Sample::new(handled as f64 / (ns as f64 / 1e9))
            .with("sent", sent)
            .with("handled", handled)
            .with("reached_udp", reached_udp)
            .with("send_ns", ns)
            .with("xdp_mode", xdp_mode)
            .with("sent_per_s", sent as f64 / (ns as f64 / 1e9)))
    }
}

impl Scenario for XdpWire {
    fn id(&self) -> &'static str {
        "xdp_wire"
    }

    fn title(&self) -> String {
        format!(
            "a UDP flood from {} blocked /24s over a veth between test namespaces, {} CIDRs to drop: packets handled per second with no filter, zt XDP, nft netdev ingress set, nft inet input set",
            self.slash24s(),
            self.cidrs
        )
    }

    fn unit(&self) -> &'static str {
        "pkts/s"
    }

    fn variants(&self) -> &'static [&'static str] {
        VARIANTS
    }

    fn config(&self) -> Value {
        json!({
            "cidrs": self.cidrs,
            "blast_ms": self.blast.as_millis() as u64,
            "sources": format!("11.0.J.1 for J < {} (the list's /24s), spoofed from a raw socket", self.slash24s()),
            "dst": format!("{DST}:{DPORT} (no listener)"),
            "load": "zt-probe blast: raw IPv4 socket, sendmmsg of 64 46-byte datagrams",
            "counted_at": {
                "none": "guarded netns /proc/net/snmp Udp InDatagrams+NoPorts+InErrors",
                "zt": "ztctl status xdp counters (every outcome)",
                "zt-skb": "ztctl status xdp counters (every outcome)",
                "nft-netdev": "the drop rule's named counter",
                "nft-inet": "the drop rule's named counter",
            },
            "policy": "target/bench/policy-wire.toml; nft: target/bench/nft-wire-*.nft",
        })
    }

    fn measure(&self, _env: &Env, _variant: &str) -> Result<Sample> {
        anyhow::bail!("xdp_wire is measured per round")
    }

    fn round(&self, env: &Env, order: &[&'static str]) -> Result<Vec<(&'static str, Sample)>> {
        self.lanes(env)?;
        let state = self.state.borrow();
        let lanes = state.as_ref().context("lanes")?;
        order
            .iter()
            .map(|v| {
                let lane = lanes.iter().find(|l| l.name == *v).context("lane")?;
                let s = match &lane.skip {
                    Some(why) => Sample::skipped(why.clone()),
                    None => self
                        .run(env, lane)
                        .with_context(|| format!("variant `{v}`"))?,
                };
                Ok((*v, s))
            })
            .collect()
    }

    fn ratios(&self, m: &Medians) -> Vec<Ratio> {
        vec![
            m.ratio("zt", "none"),
            m.ratio("zt-skb", "none"),
            m.ratio("nft-netdev", "none"),
            m.ratio("nft-inet", "none"),
            m.ratio("zt", "nft-netdev"),
            m.ratio("zt", "nft-inet"),
            m.ratio("zt-skb", "nft-netdev"),
        ]
    }

    fn targets(&self, m: &Medians) -> Vec<Target> {
        let best = m.of("nft-netdev").max(m.of("nft-inet"));
        ["zt", "zt-skb"]
            .iter()
            .map(|v| {
                let z = m.of(v);
                Target::new(
                    format!("{v} >= 1.1x the best nftables configuration"),
                    z >= 1.1 * best,
                    format!("{:.2}x ({z:.0} vs {best:.0} pkts/s)", z / best),
                )
            })
            .collect()
    }
}
