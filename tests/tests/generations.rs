//! Policy generations against the real kernel (issue 5: a policy lifecycle without gaps):
//! thousands of flips under load, `kill -9` during load and during a reload, flows opened
//! under a removed rule, and bad inputs that must keep the last good generation. Every
//! denial is paired with a positive control.

use std::{
    net::SocketAddr,
    process::{Command, Output, Stdio},
    time::{Duration, Instant},
};

use zt_integration::{bin, Harness, Held, HeldTcp, Load, LoadCounts, Server, TcpEcho, Ztd};

const PROBE: &str = env!("CARGO_BIN_EXE_zt-probe");

fn lo4(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).to_string()
}

/// A policy allowing UDP to 127.0.0.1 on `ports` (and nothing else).
fn udp_policy(ports: &[u16]) -> String {
    let list = ports
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(", ");
    format!(
        r#"version = 1
[[rule]]
action = "allow"
peer = "127.0.0.1"
ports = [{list}]
proto = "udp"
"#
    )
}

fn reload(h: &Harness) -> Output {
    h.ztctl(&["reload"])
}

/// A small deterministic PRNG (xorshift64*), seeded from the clock; the seed is printed so a
/// failing run can be replayed.
struct Rng(u64);

impl Rng {
    fn from_clock() -> Rng {
        let seed = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(1)
            | 1;
        eprintln!("rng seed {seed}");
        Rng(seed)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d) % n.max(1)
    }
}

/// The four ports of the flip tests: allowed by both policies, by neither, by A only, by B
/// only; each served by a UDP (and TCP) echo server so that real calls can check verdicts.
struct Ports {
    both: u16,
    none: u16,
    a: u16,
    b: u16,
}

impl Ports {
    fn of(srv: &Server) -> Ports {
        Ports {
            both: srv.ports[0],
            none: srv.ports[1],
            a: srv.ports[2],
            b: srv.ports[3],
        }
    }
    fn policy(&self, b: bool) -> String {
        udp_policy(&[self.both, if b { self.b } else { self.a }])
    }
    fn addrs(&self) -> Vec<SocketAddr> {
        [self.both, self.none, self.a, self.b]
            .into_iter()
            .map(lo4)
            .collect()
    }
    /// Real UDP calls (with echo) show exactly policy A's (or B's) verdicts.
    fn assert_verdicts(&self, h: &Harness, b: bool, when: &str) {
        let want = |allowed: bool| if allowed { "ok" } else { "eperm" };
        for (port, allowed, what) in [
            (self.both, true, "P_both"),
            (self.none, false, "P_none"),
            (self.a, !b, "P_a"),
            (self.b, b, "P_b"),
        ] {
            assert_eq!(
                h.call("udp", lo4(port)),
                want(allowed),
                "{what} under policy {} {when}",
                if b { "B" } else { "A" }
            );
        }
    }
}

fn assert_load(counts: &[LoadCounts], when: &str) {
    let [both, none, ..] = counts else {
        panic!("four counts expected: {counts:?}")
    };
    assert!(both.ok > 0, "the load ran ({when}): {counts:?}");
    assert_eq!(both.eperm, 0, "P_both never failed ({when}): {counts:?}");
    assert_eq!(none.ok, 0, "P_none never succeeded ({when}): {counts:?}");
    assert!(none.eperm > 0, "P_none was tried ({when}): {counts:?}");
    assert!(
        counts.iter().all(|c| c.other == 0),
        "no other outcome ({when}): {counts:?}"
    );
}

/// The issue's 2,000 flips, each a `ztctl reload` after rewriting the file. A flip writes
/// only what differs from what the idle slot holds (the loader remembers what it wrote), so
/// 2,000 take well under the budget; the budget only bounds a pathological machine, and all
/// 2,000 must happen.
const MAX_FLIPS: u64 = 2_000;
const FLIP_BUDGET: Duration = Duration::from_secs(75);
const MIN_FLIPS: u64 = 2_000;
/// The load sleeps this long after each round of four `connect()`s (thousands of rounds a
/// second still), so that it does not take a whole core from the daemon it is testing.
const LOAD_PAUSE: Duration = Duration::from_micros(200);

#[test]
fn two_thousand_flips_under_load_never_mix_the_two_policies() {
    let h = Harness::new(PROBE);
    let srv = Server::loopback(&h.probe, 4);
    let p = Ports::of(&srv);
    h.write_policy("p.toml", &p.policy(false));
    let ztd = h.start_ztd(&[]);
    p.assert_verdicts(&h, false, "at start");
    let gen0 = ztd.status().generation;

    let load = Load::start(
        &h.probe,
        &h.cgroup.path,
        &p.addrs(),
        FLIP_BUDGET + Duration::from_secs(60),
        LOAD_PAUSE,
    );
    let start = Instant::now();
    let mut flips = 0u64;
    while flips < MAX_FLIPS && start.elapsed() < FLIP_BUDGET {
        // Flip number n (from 1) installs B when n is odd.
        let to_b = flips.is_multiple_of(2);
        h.write_policy("p.toml", &p.policy(to_b));
        let out = reload(&h);
        assert!(out.status.success(), "flip {}: {}", flips + 1, stderr(&out));
        flips += 1;
    }
    let took = start.elapsed();
    let (rounds, counts) = load.finish();
    eprintln!(
        "{flips} flips in {:.1} s ({:.0} flips/s); load: {rounds} rounds, {counts:?}",
        took.as_secs_f64(),
        flips as f64 / took.as_secs_f64()
    );
    assert!(
        flips >= MIN_FLIPS,
        "only {flips} flips fit in {FLIP_BUDGET:?}"
    );

    assert_load(&counts, "during the flips");
    let (a, b) = (counts[2], counts[3]);
    assert!(
        a.ok > 0 && a.eperm > 0,
        "P_a saw both verdicts under load: {a:?}"
    );
    assert!(
        b.ok > 0 && b.eperm > 0,
        "P_b saw both verdicts under load: {b:?}"
    );

    let st = ztd.status();
    assert_eq!(
        st.generation,
        gen0 + flips,
        "one generation per flip ({flips} flips)"
    );
    assert!(st.healthy, "{st:?}");
    p.assert_verdicts(&h, flips % 2 == 1, "after the last flip");
}

#[test]
fn kill_9_during_load_and_during_a_reload_never_opens_a_window() {
    let h = Harness::new(PROBE);
    let srv = Server::loopback(&h.probe, 4);
    let p = Ports::of(&srv);
    let mut b = false;
    h.write_policy("p.toml", &p.policy(b));
    let mut ztd: Option<Ztd> = Some(h.start_ztd(&[]));
    let mut rng = Rng::from_clock();
    let load = Load::start(
        &h.probe,
        &h.cgroup.path,
        &p.addrs(),
        Duration::from_secs(120),
        LOAD_PAUSE,
    );

    for round in 0..8 {
        std::thread::sleep(Duration::from_millis(50 + rng.below(300)));
        let mut reloading = None;
        if round % 2 == 1 {
            // Kill it right after sending a reload: before, during or after the flip.
            b = !b;
            h.write_policy("p.toml", &p.policy(b));
            let child = Command::new(bin("ztctl"))
                .arg("--socket")
                .arg(&h.socket)
                .arg("reload")
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("spawn ztctl reload");
            reloading = Some(child);
            // A reload takes tens of ms here: 0-100 ms lands before, during or after it.
            std::thread::sleep(Duration::from_micros(rng.below(100_000)));
        }
        if let Some(mut z) = ztd.take() {
            z.kill9();
        }
        if let Some(mut c) = reloading {
            let applied = c.wait().map(|st| st.success()).unwrap_or(false);
            eprintln!("round {round}: killed after a reload (reload answered: {applied})");
        }
        // The daemon is down for a while; the load goes on.
        std::thread::sleep(Duration::from_millis(rng.below(200)));
        ztd = Some(h.start_ztd(&[]));
        let attached = h.attached_programs();
        assert!(
            attached.iter().all(|ids| ids.len() == 1),
            "exactly one program per hook after restart {round}: {attached:?}"
        );
        // No manual action: the restarted daemon enforces the file as it is now.
        p.assert_verdicts(&h, b, &format!("after restart {round}"));
    }
    let (rounds, counts) = load.finish();
    eprintln!("load: {rounds} rounds, {counts:?}");
    assert_load(&counts, "across every kill -9 and restart");
    let st = ztd.as_ref().expect("ztd").status();
    assert!(st.healthy, "{st:?}");
}

/// Poll `send` every 100 ms from `start` until it returns something other than `ok`: that
/// outcome and when the failing send was issued (since `start`). Gives up after 3 s.
fn first_failure(start: Instant, mut send: impl FnMut() -> String) -> (String, Duration) {
    loop {
        let issued = start.elapsed();
        let got = send();
        if got != "ok" || issued > Duration::from_secs(3) {
            return (got, issued);
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn flows_opened_under_a_removed_rule_stop_within_one_second() {
    let h = Harness::new(PROBE);
    let srv = Server::loopback(&h.probe, 2);
    let (udp_keep, udp_drop) = (srv.ports[0], srv.ports[1]);
    let (tcp_keep, tcp_drop) = (TcpEcho::start(), TcpEcho::start());
    let policy = |udp: &[u16], tcp: &[u16]| {
        let list = |p: &[u16]| {
            p.iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join(", ")
        };
        format!(
            r#"version = 1
[[rule]]
action = "allow"
peer = "127.0.0.1"
ports = [{}]
proto = "udp"

[[rule]]
action = "allow"
peer = "127.0.0.1"
ports = [{}]
proto = "tcp"
"#,
            list(udp),
            list(tcp)
        )
    };
    h.write_policy(
        "p.toml",
        &policy(&[udp_keep, udp_drop], &[tcp_keep.port, tcp_drop.port]),
    );
    let ztd = h.start_ztd(&[]);

    let cg = &h.cgroup.path;
    let mut u_keep = Held::connect(&h.probe, cg, lo4(udp_keep));
    let mut u_drop = Held::connect(&h.probe, cg, lo4(udp_drop));
    let echo_wait = Duration::from_millis(500);
    let mut t_keep = HeldTcp::connect(&h.probe, cg, lo4(tcp_keep.port), echo_wait);
    let mut t_drop = HeldTcp::connect(&h.probe, cg, lo4(tcp_drop.port), echo_wait);
    for (what, got) in [
        ("udp keep", u_keep.send()),
        ("udp drop", u_drop.send()),
        ("tcp keep", t_keep.send()),
        ("tcp drop", t_drop.send()),
    ] {
        assert_eq!(got, "ok", "{what} works while its rule exists");
    }
    let gen = ztd.status().generation;

    h.write_policy("p.toml", &policy(&[udp_keep], &[tcp_keep.port]));
    let start = Instant::now();
    let out = reload(&h);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(ztd.status().generation, gen + 1);

    let (got, at) = first_failure(start, || u_drop.send());
    assert_eq!(
        got, "eperm",
        "the held UDP socket's send is refused by the egress backstop"
    );
    assert!(at < Duration::from_secs(1), "UDP stopped only after {at:?}");
    let (got, tcp_at) = first_failure(start, || t_drop.send());
    assert!(
        got == "timeout" || got == "eperm",
        "the held TCP flow no longer echoes: {got}"
    );
    assert!(
        tcp_at < Duration::from_secs(1),
        "TCP stopped only after {tcp_at:?}"
    );
    eprintln!("after the reload: UDP refused from {at:?}, TCP from {tcp_at:?}");
    assert_eq!(
        u_drop.send(),
        "eperm",
        "and stays refused (UDP, removed rule)"
    );

    // Positive controls: flows whose rule is still there keep working, after the others
    // stopped.
    for _ in 0..3 {
        assert_eq!(
            u_keep.send(),
            "ok",
            "held UDP socket to a still-allowed port"
        );
        assert_eq!(t_keep.send(), "ok", "held TCP flow to a still-allowed port");
    }
}

#[test]
fn bad_inputs_keep_the_old_generation() {
    let h = Harness::new(PROBE);
    let srv = Server::loopback(&h.probe, 2);
    let (allowed, denied) = (srv.ports[0], srv.ports[1]);
    let good = format!(
        r#"version = 1
[network.lo]
cidrs = ["127.0.0.1/32"]

[[rule]]
action = "allow"
peer = "lo"
ports = [{allowed}]
proto = "udp"
"#
    );
    let path = h.write_policy("p.toml", &good);
    let ztd = h.start_ztd(&[]);
    let gen = ztd.status().generation;
    let old_enforced = |what: &str| {
        let st = ztd.status();
        assert_eq!(st.generation, gen, "{what}: generation unchanged");
        assert!(!st.last_reload.ok, "{what}: the reload is reported refused");
        assert_eq!(h.call("udp", lo4(allowed)), "ok", "{what}: old allow holds");
        assert_eq!(
            h.call("udp", lo4(denied)),
            "eperm",
            "{what}: old deny holds"
        );
    };
    let refused = |what: &str, located: &str| {
        let out = reload(&h);
        assert_eq!(out.status.code(), Some(1), "{what} is refused");
        let err = stderr(&out);
        assert!(
            err.contains(located),
            "{what}: expected {located:?} in:\n{err}"
        );
        old_enforced(what);
    };
    let at =
        |file: &str, line: usize| format!("{}:{line}:", h.policy_dir.path().join(file).display());
    assert_eq!(h.call("udp", lo4(allowed)), "ok");
    assert_eq!(h.call("udp", lo4(denied)), "eperm");

    h.write_policy("p.toml", "version = 1\n[[rule]\naction = \"allow\"\n");
    refused("a syntax error", &at("p.toml", 2));

    h.write_policy(
        "p.toml",
        &good.replace("peer = \"lo\"", "peer = \"nowhere\""),
    );
    refused("an unknown name", &at("p.toml", 7));

    h.write_policy("p.toml", &good);
    h.write_policy(
        "q.toml",
        "version = 1\n[network.lo]\ncidrs = [\"::1/128\"]\n",
    );
    refused("a duplicate name", &at("q.toml", 2));
    std::fs::remove_file(h.policy_dir.path().join("q.toml")).expect("rm q.toml");

    h.write_policy("p.toml", &good.replace("127.0.0.1/32", "127.0.0.1/33"));
    refused("a bad CIDR", &at("p.toml", 3));

    h.write_policy("p.toml", "");
    refused("an empty file (no version)", &at("p.toml", 1));

    std::fs::remove_file(&path).expect("rm p.toml");
    refused(
        "a directory whose only file was deleted",
        &format!("{}:1:1: no *.toml files", h.policy_dir.path().display()),
    );

    {
        use std::io::Write;
        let mut f = std::fs::File::create(&path).expect("create");
        let junk =
            "junk junk junk junk junk junk junk junk junk junk junk junk junk\n".repeat(1024);
        for _ in 0..(50 << 20) / junk.len() {
            f.write_all(junk.as_bytes()).expect("write junk");
        }
    }
    let started = Instant::now();
    let out = reload(&h);
    assert_eq!(out.status.code(), Some(1), "50 MB of junk is refused");
    assert!(
        stderr(&out).contains(&at("p.toml", 1)) && stderr(&out).len() < 64 * 1024,
        "refused cleanly, with a short located message: {} bytes: {:.2000}",
        stderr(&out).len(),
        stderr(&out)
    );
    eprintln!("50 MB junk refused in {:?}", started.elapsed());
    old_enforced("50 MB of junk");

    // `version = 1` and no rules is valid, and allows nothing: never allow-all.
    h.write_policy("p.toml", "version = 1\n");
    let out = reload(&h);
    assert!(out.status.success(), "empty policy: {}", stderr(&out));
    assert_eq!(ztd.status().generation, gen + 1);
    assert_eq!(
        h.call("udp", lo4(allowed)),
        "eperm",
        "an empty policy denies what the old one allowed"
    );
    assert_eq!(h.call("udp", lo4(denied)), "eperm");

    // Write-then-rename (a hidden temporary file is ignored until renamed) is applied.
    let tmp = h.policy_dir.path().join(".p.toml.tmp");
    std::fs::write(&tmp, &good).expect("write tmp");
    std::fs::rename(&tmp, &path).expect("rename");
    let out = reload(&h);
    assert!(out.status.success(), "renamed file: {}", stderr(&out));
    let st = ztd.status();
    assert_eq!(st.generation, gen + 2);
    assert!(st.last_reload.ok);
    assert_eq!(
        h.call("udp", lo4(allowed)),
        "ok",
        "the renamed policy applies"
    );
    assert_eq!(h.call("udp", lo4(denied)), "eperm");
}

/// Issue 12, item 8: after `ACTIVE` flips, the slot just left is written again only after an
/// RCU grace period, so no running decision reads a slot while it changes. Reloads (A and B
/// alternate which of two ports is allowed) and identity re-resolutions (a cgroup identity
/// whose cgroup is removed and recreated: each a new generation of the same rules) are
/// interleaved while a probe connects to both ports in a loop. Every decision event names the
/// generation it was made under; each must carry exactly that generation's verdict for its
/// port. Policy B has one rule more than A, so ztd's `generation N: R rules` lines tell which
/// policy each generation holds.
#[test]
fn reloads_and_reresolutions_interleaved_never_mix_two_generations_in_one_decision() {
    let h = Harness::new(PROBE);
    let srv = Server::loopback(&h.probe, 4);
    let p = Ports::of(&srv);
    let flap = h.cgroup.child("flap");
    let policy = |b: bool| {
        format!(
            "{}\n[identity.flapping]\ncgroup = \"{}\"\n\n[[rule]]\naction = \"allow\"\nidentity = \"flapping\"\npeer = \"127.0.0.1\"\nports = [9]\nproto = \"udp\"\n{}",
            p.policy(b),
            h.cgroup.child_rel("flap"),
            if b {
                "\n[[rule]]\naction = \"allow\"\npeer = \"127.0.0.2\"\nports = [9]\nproto = \"udp\"\n"
            } else {
                ""
            }
        )
    };
    h.write_policy("p.toml", &policy(false));
    let ztd = h.start_ztd(&["--log-allowed", "--no-watch", "--history", "100000"]);
    p.assert_verdicts(&h, false, "at start");
    let load = Load::start(
        &h.probe,
        &h.cgroup.path,
        &p.addrs(),
        Duration::from_secs(300),
        LOAD_PAUSE,
    );
    let reresolved = |ztd: &zt_integration::Ztd| {
        ztd.lines()
            .iter()
            .filter(|l| l.contains("identities re-resolved"))
            .count()
    };
    let mut b = false;
    for round in 0..60 {
        // Removing or re-creating the cgroup changes what `flapping` resolves to: ztd
        // re-resolves on its own (a new generation) — wait for it, then reload.
        let before = reresolved(&ztd);
        if flap.exists() {
            let _ = std::fs::remove_dir(&flap);
        } else {
            let _ = std::fs::create_dir(&flap);
        }
        let end = Instant::now() + Duration::from_secs(2);
        while reresolved(&ztd) == before && Instant::now() < end {
            std::thread::sleep(Duration::from_millis(10));
        }
        b = !b;
        h.write_policy("p.toml", &policy(b));
        let out = reload(&h);
        assert!(out.status.success(), "reload {round}: {}", stderr(&out));
    }
    // Let the last re-resolutions land, then stop the load.
    std::thread::sleep(Duration::from_millis(500));
    let (rounds, counts) = load.finish();
    eprintln!("load: {rounds} rounds, {counts:?}");
    assert_load(&counts, "during reloads and re-resolutions");

    // generation -> policy B?, from ztd's lines.
    let mut policy_of = std::collections::HashMap::new();
    for line in ztd.lines() {
        let Some(at) = line.find("generation ") else {
            continue;
        };
        let rest = &line[at + "generation ".len()..];
        let Some((gen, rest)) = rest.split_once(": ") else {
            continue;
        };
        let (Ok(gen), Some(rules)) = (
            gen.parse::<u64>(),
            rest.split_once(" rules").map(|(n, _)| n),
        ) else {
            continue;
        };
        match rules.parse::<u32>() {
            Ok(2) => policy_of.insert(gen, false),
            Ok(3) => policy_of.insert(gen, true),
            _ => continue,
        };
    }
    let reresolved = reresolved(&ztd);
    assert!(
        reresolved >= 30,
        "the cgroup flaps were re-resolved into generations ({reresolved}):\n{}",
        ztd.lines().join("\n")
    );
    let events = h.events(&[]);
    let mut checked = [[0u64; 2]; 2];
    let mut mixed = Vec::new();
    for e in events
        .iter()
        .filter(|e| e.peer_port == p.a || e.peer_port == p.b)
    {
        let Some(&in_b) = policy_of.get(&e.generation) else {
            panic!(
                "event of generation {} that ztd never reported: {e:?}",
                e.generation
            );
        };
        let allowed = (e.peer_port == p.b) == in_b;
        let verdict_allowed = e.verdict == "allow";
        checked[usize::from(e.peer_port == p.b)][usize::from(verdict_allowed)] += 1;
        if allowed != verdict_allowed {
            mixed.push(format!(
                "generation {} (policy {}), port {}: {}",
                e.generation,
                if in_b { "B" } else { "A" },
                e.peer_port,
                e.verdict
            ));
        }
    }
    eprintln!(
        "{} generations seen, {reresolved} re-resolutions; events checked [P_a deny/allow, P_b deny/allow]: {checked:?}",
        policy_of.len()
    );
    assert!(mixed.is_empty(), "mixed verdicts: {mixed:#?}");
    // Positive control: both ports were seen allowed and denied, under both policies.
    assert!(
        checked.iter().flatten().all(|&n| n > 0),
        "both verdicts on both ports: {checked:?}"
    );
}
