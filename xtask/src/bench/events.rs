//! Scenario `events_per_second`: decision events per second, end to end.

use anyhow::{bail, ensure, Result};
use serde_json::{json, Map, Value};

use super::{
    decision_cost::ALLOW_UDP_LOOPBACK, Env, Events, Medians, Ratio, Sample, Scenario, Sink, Target,
    POLL,
};

/// ztd with `--log-allowed --history 100000`; a flood of allowed UDP connects, each port hit
/// at most twice (far below the 16/s rate limit); delivered/s = events the daemon delivered,
/// over the time from the flood's start until status shows the ring buffer drained. The
/// variants differ in where ztd's stdout (one line per event) goes: a file under
/// target/bench, or /dev/null. The baseline for the rate is the kernel's: the events the
/// flood produced per second of flood.
pub(super) struct EventThroughput {
    /// Connects per flood.
    count: u64,
}

impl EventThroughput {
    /// `--quick`: floods of 20,000 instead of 100,000.
    pub fn new(quick: bool) -> EventThroughput {
        EventThroughput {
            count: if quick { 20_000 } else { EPS_COUNT },
        }
    }
}

const EPS_COUNT: u64 = 100_000;
const EPS_SPREAD: u16 = 50_000;
const EPS_ADDR: &str = "127.0.0.1:1024";

impl Scenario for EventThroughput {
    fn id(&self) -> &'static str {
        "events_per_second"
    }

    fn title(&self) -> String {
        format!(
            "decision events delivered per second, end to end: ztd --log-allowed --history 100000, {} allowed UDP connects over {EPS_SPREAD} ports; from flood start until drained",
            self.count
        )
    }

    fn unit(&self) -> &'static str {
        "delivered/s"
    }

    fn variants(&self) -> &'static [&'static str] {
        &["stdout-file", "stdout-null"]
    }

    fn config(&self) -> Value {
        json!({
            "count": self.count,
            "port_spread": EPS_SPREAD,
            "addr": EPS_ADDR,
            "ztd_flags": ["--log-allowed", "--history", "100000"],
            "policy": ALLOW_UDP_LOOPBACK,
            "ztd_stdout": {
                "stdout-file": "target/bench/ztd-eps-stdout-file.log",
                "stdout-null": "/dev/null",
            },
            "poll_interval_ms": POLL.as_millis() as u64,
        })
    }

    fn measure(&self, env: &Env, variant: &str) -> Result<Sample> {
        let label = format!("eps-{variant}");
        let sink = match variant {
            "stdout-file" => Sink::File(env.out.join(format!("ztd-{label}.log"))),
            "stdout-null" => Sink::Null,
            other => bail!("unknown variant {other}"),
        };
        let policy = env.policy("policy-allow-udp-loopback.toml", ALLOW_UDP_LOOPBACK)?;
        let cgroup = env.sub_cgroup(&label)?;
        let ztd = env.start_ztd(
            &cgroup.path,
            &policy,
            &["--log-allowed", "--history", "100000"],
            sink.clone(),
            &label,
        )?;
        // Warm-up on ports the flood does not use.
        env.flood_ok(&cgroup.path, "127.0.0.1:60000", 100, 100)?;
        let (before, _) = ztd.drained()?;

        let flood = env.flood_ok(&cgroup.path, EPS_ADDR, self.count, EPS_SPREAD)?;
        let flood_wall = flood.wall;
        let (after, seen) = ztd.drained()?;
        let elapsed = seen.duration_since(flood.started);
        // A separate read for the accounting identity.
        let st = ztd.status()?;
        let abs = Events::from_status(&st)?;
        ensure!(
            abs.produced == abs.delivered + abs.lost_kernel + abs.lost_daemon,
            "ACCOUNTING BROKEN: produced ({}) != delivered ({}) + lost_kernel ({}) + lost_daemon ({}): {}",
            abs.produced,
            abs.delivered,
            abs.lost_kernel,
            abs.lost_daemon,
            st["events"]
        );
        let d = after.since(&before);
        ensure!(
            d.allowed == self.count,
            "the kernel counted {} allowed decisions for {} connects",
            d.allowed,
            self.count
        );
        ensure!(
            d.produced + d.suppressed == self.count,
            "ACCOUNTING BROKEN: {} produced + {} suppressed events for {} allowed connects with --log-allowed: {}",
            d.produced,
            d.suppressed,
            self.count,
            st["events"]
        );
        println!(
            "    accounting ok: produced {} == delivered {} + lost_kernel {} + lost_daemon {}; suppressed {}; ztd stdout -> {}",
            d.produced,
            d.delivered,
            d.lost_kernel,
            d.lost_daemon,
            d.suppressed,
            sink.describe()
        );
        let secs = elapsed.as_secs_f64();
        let mut detail = Map::new();
        detail.insert("ztd_stdout".into(), json!(sink.describe()));
        detail.insert("flood_s".into(), json!(flood_wall.as_secs_f64()));
        detail.insert("until_drained_s".into(), json!(secs));
        detail.insert("produced".into(), json!(d.produced));
        detail.insert("delivered".into(), json!(d.delivered));
        detail.insert("lost_kernel".into(), json!(d.lost_kernel));
        detail.insert("lost_daemon".into(), json!(d.lost_daemon));
        detail.insert("suppressed".into(), json!(d.suppressed));
        detail.insert(
            "produced_per_s_of_flood".into(),
            json!(d.produced as f64 / flood_wall.as_secs_f64()),
        );
        detail.insert(
            "delivered_fraction".into(),
            json!(d.delivered as f64 / d.produced.max(1) as f64),
        );
        ztd.stop()?;
        Ok(Sample {
            value: d.delivered as f64 / secs,
            detail,
        })
    }

    fn targets(&self, m: &Medians) -> Vec<Target> {
        // Unaccounted loss fails the round itself (the accounting checks above).
        let v = m.of("stdout-null");
        let f = m.of("stdout-file");
        vec![
            Target::new(
                "events delivered end to end >= 1M/s (stdout -> /dev/null)",
                v >= 1e6,
                format!("{v:.0}/s ({:.2}x the target)", v / 1e6),
            ),
            Target::new(
                "events delivered end to end >= 1M/s (stdout -> file)",
                f >= 1e6,
                format!("{f:.0}/s ({:.2}x the target)", f / 1e6),
            ),
        ]
    }

    /// 5 rounds (of the run's 7) keep the whole run under 5 minutes.
    fn rounds(&self, default: usize) -> usize {
        default.min(5)
    }

    fn ratios(&self, m: &Medians) -> Vec<Ratio> {
        let mut r = vec![m.ratio("stdout-file", "stdout-null")];
        for v in self.variants() {
            r.push(Medians::derived(
                format!("{v}: delivered/s / produced/s of flood"),
                m.of(v) / m.field(v, Some("produced_per_s_of_flood")),
            ));
            r.push(Medians::derived(
                format!("{v}: delivered / produced"),
                m.field(v, Some("delivered_fraction")),
            ));
        }
        r
    }
}
