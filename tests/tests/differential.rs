//! Differential test: random policies and random calls; the kernel's verdict must equal the
//! reference evaluator's (`zt::policy::explain` and `explain_bind`, which read the parsed
//! policy rule by rule, never the maps). Judged per round:
//! - real `connect()`/`sendto()`/`bind()` calls from a guarded cgroup (proceeds or EPERM);
//! - the deny and audit events of those calls: audit is told apart from allow, and the
//!   deciding rule id must be the evaluator's;
//! - the egress backstop: UDP sockets connected under the previous round's policy send one
//!   datagram under this round's (after a reload or a restart that adopts the pins), judged
//!   by the `cgroup_skb` egress program alone.
//!
//! `ZT_DIFF_SEED=N` replays a run (the seed is printed at the start and in every failure);
//! `ZT_DIFF_ROUNDS` changes the number of policies (default 20, 108 cases each: 2,160 per run).
//! Peers are loopback only (127.0.0.0/8, `::1`, and 127.x as IPv4-mapped IPv6): a UDP
//! `connect()` sends nothing, and a TCP `connect()` is non-blocking and never waited for.

use std::{
    fmt::Write as _,
    net::{IpAddr, SocketAddr},
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use std::collections::{HashMap, HashSet};

use zt::{
    control::{self, Request, Response},
    policy::{
        self,
        eval::{Proto, Query},
        Direction, ExeKey, Resolve, SystemResolver,
    },
    sys,
};
use zt_integration::{probe_batch, Harness, ProbeSession};

const PROBE: &str = env!("CARGO_BIN_EXE_zt-probe");

/// xorshift64*: small and deterministic.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
    /// True with probability `num / den`.
    fn chance(&mut self, num: usize, den: usize) -> bool {
        self.below(den) < num
    }
    fn pick<T: Copy>(&mut self, items: &[T]) -> T {
        items[self.below(items.len())]
    }
}

const UIDS: &[u32] = &[0, 41001, 41002];
const GIDS: &[u32] = &[0, 42001, 42002];
const PORTS: &[u16] = &[
    1, 22, 53, 80, 443, 1023, 1024, 5000, 5001, 8080, 8443, 65535,
];
const CIDRS: &[&str] = &[
    "127.0.0.0/8",
    "127.1.0.0/16",
    "127.1.2.0/24",
    "127.1.2.3/32",
    "127.1.2.3",
    "127.0.0.1",
    "127.0.0.0/24",
    "127.128.0.0/9",
    "127.2.0.0/15",
    "0.0.0.0/0",
    "::/0",
    "::1",
    "::1/128",
    "::/64",
    "fd00::/8",
    "10.0.0.0/8",
    "::ffff:127.1.0.0/112",
    "::ffff:127.0.0.1",
];
const ADDRS: &[&str] = &[
    "127.0.0.1",
    "127.0.0.2",
    "127.1.2.3",
    "127.1.2.4",
    "127.1.3.1",
    "127.2.0.1",
    "127.3.255.255",
    "127.128.0.1",
    "127.255.255.254",
    "::1",
];

/// The cgroups tasks run in (index 0: the guarded cgroup itself).
struct Cgroups {
    rels: Vec<String>,
    paths: Vec<PathBuf>,
}

/// A probe session of one task and its kept UDP sockets (session index, what it connected).
type Held = (Task, ProbeSession, Vec<(usize, Case)>);

/// Who makes the calls of one probe process.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
struct Task {
    uid: u32,
    gid: u32,
    cgroup: usize,
    /// 0: the probe (named by `exe` identities), 1: a copy (another inode).
    exe: usize,
}

#[derive(Clone, Debug)]
struct Case {
    proto: Proto,
    addr: SocketAddr,
    mapped: bool,
    send: bool,
    /// `bind()` to `addr` (a local address) instead of reaching it.
    bind: bool,
}

impl Case {
    fn line(&self) -> String {
        let proto = self.proto.as_str();
        let mut l = format!("{proto} {}", self.addr);
        if self.mapped {
            l.push_str(" mapped");
        }
        if self.send {
            l.push_str(" send");
        }
        if self.bind {
            l.push_str(" bind");
        }
        l
    }

    /// What identifies this case's events of one task: hook family, address, port, proto.
    fn event_key(&self) -> (bool, IpAddr, u16, &'static str) {
        let ip = match self.peer() {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4),
            v4 => v4,
        };
        (self.bind, ip, self.addr.port(), self.proto.as_str())
    }

    /// The peer as the kernel sees it (mapped: the IPv4-mapped IPv6 address).
    fn peer(&self) -> IpAddr {
        match (self.mapped, self.addr.ip()) {
            (true, IpAddr::V4(v4)) => IpAddr::V6(v4.to_ipv6_mapped()),
            (_, ip) => ip,
        }
    }
}

fn ports(rng: &mut Rng) -> String {
    let n = 1 + rng.below(3);
    let items: Vec<String> = (0..n)
        .map(|_| {
            if rng.chance(1, 2) {
                rng.pick(PORTS).to_string()
            } else {
                let a = rng.pick(PORTS);
                let b = rng.pick(PORTS);
                format!("\"{}-{}\"", a.min(b), a.max(b))
            }
        })
        .collect();
    format!("[{}]", items.join(", "))
}

/// A random policy: 1-3 files (some in audit mode), identities by uid/gid/cgroup/exe,
/// networks of overlapping CIDRs, allow and deny rules (a few ingress ones, which must not
/// change any call's verdict).
fn random_policy(rng: &mut Rng, cgroups: &Cgroups, probe: &Path) -> Vec<(String, String)> {
    let files = 1 + rng.below(3);
    let mut texts: Vec<String> = Vec::new();
    let mut identities: Vec<String> = Vec::new();
    let mut networks: Vec<String> = Vec::new();
    for _ in 0..files {
        let mut t = String::from("version = 1\n");
        if rng.chance(1, 3) {
            t.push_str("mode = \"audit\"\n");
        }
        for _ in 0..rng.below(4) {
            let name = format!("id{}", identities.len());
            let _ = writeln!(t, "\n[identity.{name}]");
            let mut keys = 0;
            while keys == 0 {
                if rng.chance(1, 2) {
                    let _ = writeln!(t, "uid = {}", rng.pick(UIDS));
                    keys += 1;
                }
                if rng.chance(1, 2) {
                    let _ = writeln!(t, "gid = {}", rng.pick(GIDS));
                    keys += 1;
                }
                if rng.chance(1, 2) {
                    let cg = &cgroups.rels[rng.below(cgroups.rels.len())];
                    let _ = writeln!(t, "cgroup = \"{cg}\"");
                    keys += 1;
                }
                if keys < 2 && rng.chance(1, 4) {
                    let _ = writeln!(t, "exe = \"{}\"", probe.display());
                    keys += 1;
                }
            }
            identities.push(name);
        }
        for _ in 0..rng.below(3) {
            let name = format!("net{}", networks.len());
            let n = 1 + rng.below(3);
            let mut cidrs: Vec<&str> = (0..n).map(|_| rng.pick(CIDRS)).collect();
            cidrs.sort_unstable();
            cidrs.dedup();
            let list: Vec<String> = cidrs.iter().map(|c| format!("\"{c}\"")).collect();
            let _ = writeln!(t, "\n[network.{name}]\ncidrs = [{}]", list.join(", "));
            networks.push(name);
        }
        texts.push(t);
    }
    for t in texts.iter_mut() {
        for _ in 0..1 + rng.below(6) {
            let action = if rng.chance(3, 10) { "deny" } else { "allow" };
            let _ = writeln!(t, "\n[[rule]]\naction = \"{action}\"");
            if rng.chance(1, 10) {
                t.push_str("direction = \"ingress\"\n");
            }
            let identity = if identities.is_empty() || rng.chance(1, 4) {
                "any".to_string()
            } else {
                identities[rng.below(identities.len())].clone()
            };
            let _ = writeln!(t, "identity = \"{identity}\"");
            let peer = if rng.chance(1, 8) {
                "any".to_string()
            } else if !networks.is_empty() && rng.chance(1, 2) {
                networks[rng.below(networks.len())].clone()
            } else {
                rng.pick(CIDRS).to_string()
            };
            let _ = writeln!(t, "peer = \"{peer}\"");
            let proto = rng.pick(&["tcp", "udp", "any", "any", "tcp", "udp", "icmp"]);
            if proto != "any" || rng.chance(1, 2) {
                let _ = writeln!(t, "proto = \"{proto}\"");
            }
            if proto != "icmp" && rng.chance(2, 3) {
                let _ = writeln!(t, "ports = {}", ports(rng));
            }
        }
    }
    texts
        .into_iter()
        .enumerate()
        .map(|(i, t)| (format!("p{i}.toml"), t))
        .collect()
}

fn random_case(rng: &mut Rng) -> Case {
    let ip: IpAddr = rng.pick(ADDRS).parse().expect("address");
    let port = if rng.chance(1, 5) {
        1 + rng.below(65535) as u16
    } else {
        rng.pick(PORTS)
    };
    let proto = if rng.chance(1, 2) {
        Proto::Tcp
    } else {
        Proto::Udp
    };
    let bind = rng.chance(1, 6);
    Case {
        proto,
        addr: SocketAddr::new(ip, port),
        mapped: ip.is_ipv4() && rng.chance(3, 10),
        send: !bind && proto == Proto::Udp && rng.chance(1, 4),
        bind,
    }
}

fn seed() -> u64 {
    std::env::var("ZT_DIFF_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos() as u64)
                .unwrap_or(1)
        })
}

fn reload(h: &Harness) {
    match control::request(&h.socket, &Request::Reload, Duration::from_secs(30)) {
        Ok(Response::Ok { .. }) => {}
        other => panic!("reload failed: {other:?}"),
    }
}

#[test]
fn kernel_verdicts_equal_the_reference_evaluator() {
    let seed = seed();
    eprintln!("differential: ZT_DIFF_SEED={seed}");
    let rounds: usize = std::env::var("ZT_DIFF_ROUNDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(20);
    let mut rng = Rng(seed | 1);
    let started = Instant::now();

    let h = Harness::new(PROBE);
    let mut cgroups = Cgroups {
        rels: vec![h.cgroup.rel.clone()],
        paths: vec![h.cgroup.path.clone()],
    };
    for child in ["a", "a/b", "c"] {
        cgroups.paths.push(h.cgroup.child(child));
        cgroups.rels.push(h.cgroup.child_rel(child));
    }
    let copies = tempfile::tempdir().expect("tempdir");
    let copy = copies.path().join("zt-probe-copy");
    std::fs::copy(&h.probe, &copy).expect("copy probe");
    let exes = [h.probe.clone(), copy];
    let resolver = SystemResolver {
        cgroup_root: sys::cgroup2_root().expect("cgroup2 mount"),
    };
    let exe_keys: Vec<ExeKey> = exes
        .iter()
        .map(|e| resolver.exe(e).expect("stat probe"))
        .collect();

    let mut ztd: Option<zt_integration::Ztd> = None;
    let mut total = 0usize;
    let mut backstop_cases = 0usize;
    let mut backstop_eperm = 0usize;
    let mut events_checked = 0usize;
    let mut held: Vec<Held> = Vec::new();
    for round in 0..rounds {
        // A policy and cases for which the evaluator expects both outcomes (so that neither
        // an inert nor a deny-everything kernel can pass).
        let (files, policy, groups) = loop {
            let files = random_policy(&mut rng, &cgroups, &h.probe);
            let sources: Vec<(PathBuf, String)> = files
                .iter()
                .map(|(n, t)| (h.policy_dir.path().join(n), t.clone()))
                .collect();
            let policy = match policy::load_sources(&sources, &resolver) {
                Ok((p, _)) => p,
                Err(d) => panic!(
                    "seed {seed}: generated an invalid policy:\n{}\n{}",
                    d.iter().map(|d| format!("{d}\n")).collect::<String>(),
                    files
                        .iter()
                        .map(|(n, t)| format!("# {n}\n{t}"))
                        .collect::<String>()
                ),
            };
            // Distinct tasks, so that each event names the one task that caused it.
            let mut tasks: Vec<Task> = Vec::new();
            while tasks.len() < 6 {
                let task = Task {
                    uid: rng.pick(UIDS),
                    gid: rng.pick(GIDS),
                    cgroup: rng.below(cgroups.rels.len()),
                    exe: rng.below(2),
                };
                if !tasks.contains(&task) {
                    tasks.push(task);
                }
            }
            let groups: Vec<(Task, Vec<Case>)> = tasks
                .into_iter()
                .map(|task| (task, (0..18).map(|_| random_case(&mut rng)).collect()))
                .collect();
            let expected: Vec<bool> = groups
                .iter()
                .flat_map(|(task, cases)| {
                    cases.iter().map(|c| {
                        expect(&policy, task, c, &cgroups, &exe_keys)
                            .verdict
                            .proceeds()
                    })
                })
                .collect();
            if expected.iter().any(|&ok| ok) && expected.iter().any(|&ok| !ok) {
                break (files, policy, groups);
            }
        };

        // Install it: the first round starts ztd, every fourth restarts it (adopting the
        // pins), the others reload (a new generation written as a diff).
        for e in std::fs::read_dir(h.policy_dir.path())
            .expect("policy dir")
            .flatten()
        {
            let _ = std::fs::remove_file(e.path());
        }
        for (name, text) in &files {
            h.write_policy(name, text);
        }
        match ztd.as_mut() {
            Some(_) if round % 4 != 0 => reload(&h),
            _ => {
                if let Some(mut old) = ztd.take() {
                    old.kill9();
                }
                ztd = Some(h.start_ztd(&[]));
            }
        }

        let generation = ztd.as_ref().map(|z| z.status().generation).unwrap_or(0);

        // The backstop: sockets connected under the previous round's policy send now.
        let mut mismatches = Vec::new();
        for (task, session, kept) in held.iter_mut() {
            for (index, case) in kept.iter() {
                let e = expect(&policy, task, case, &cgroups, &exe_keys);
                let want = if e.verdict.proceeds() { "ok" } else { "eperm" };
                let got = session.ask(&format!("send {index}"));
                backstop_cases += 1;
                backstop_eperm += usize::from(got == "eperm");
                if got != want {
                    mismatches.push(format!(
                        "  backstop {task:?} {} (connected under the previous policy): kernel \
                         {got}, evaluator {want}\n{e}",
                        case.line()
                    ));
                }
            }
        }
        held.clear();

        let (mut ok, mut eperm) = (0usize, 0usize);
        for (task, cases) in &groups {
            let lines: Vec<String> = cases.iter().map(Case::line).collect();
            let got = probe_batch(
                &exes[task.exe],
                &cgroups.paths[task.cgroup],
                task.uid,
                task.gid,
                &lines,
            );
            for (case, outcome) in cases.iter().zip(&got) {
                let e = expect(&policy, task, case, &cgroups, &exe_keys);
                let want = if e.verdict.proceeds() { "ok" } else { "eperm" };
                match outcome.as_str() {
                    "ok" => ok += 1,
                    "eperm" => eperm += 1,
                    _ => {}
                }
                if outcome != want {
                    mismatches.push(format!(
                        "  {task:?} {}: kernel {outcome}, evaluator {want}\n{e}",
                        case.line()
                    ));
                }
            }
            total += cases.len();
        }

        // Events: each deny and audit verdict with the evaluator's rule, no event for an
        // allowed call (random policies never set `log`).
        if mismatches.is_empty() {
            events_checked += check_events(
                &h,
                generation,
                &groups,
                &policy,
                &cgroups,
                &exe_keys,
                &mut mismatches,
            );
        }

        let policy_text: String = files
            .iter()
            .map(|(n, t)| format!("# ---- {n}\n{t}"))
            .collect();
        assert!(
            mismatches.is_empty(),
            "seed {seed} round {round}: {} of {} cases differ (replay: ZT_DIFF_SEED={seed}):\n{}\
             \npolicy:\n{policy_text}\nztd said:\n{}",
            mismatches.len(),
            groups.iter().map(|g| g.1.len()).sum::<usize>(),
            mismatches
                .iter()
                .take(10)
                .cloned()
                .collect::<Vec<_>>()
                .join("\n"),
            ztd.as_ref()
                .map(|z| z.lines().join("\n"))
                .unwrap_or_default()
        );
        assert!(
            ok > 0 && eperm > 0,
            "seed {seed} round {round}: only ok={ok} eperm={eperm}\npolicy:\n{policy_text}"
        );

        // UDP sockets for the next round's backstop check: connected now (where this policy
        // lets them), used after the next policy is in force.
        for (task, _) in &groups {
            let mut session = ProbeSession::start(
                &exes[task.exe],
                &cgroups.paths[task.cgroup],
                task.uid,
                task.gid,
            );
            let mut kept = Vec::new();
            for index in 0..4 {
                let mut case = random_case(&mut rng);
                case.proto = Proto::Udp;
                case.send = false;
                case.bind = false;
                let mut line = format!("keep udp {}", case.addr);
                if case.mapped {
                    line.push_str(" mapped");
                }
                if session.ask(&line) == "ok" {
                    kept.push((index, case));
                }
            }
            held.push((*task, session, kept));
        }
    }
    eprintln!(
        "differential: {total} cases over {rounds} policies ({backstop_cases} backstop sends, \
         {backstop_eperm} refused; {events_checked} events checked) in {:.1?} (seed {seed})",
        started.elapsed()
    );
    assert!(total >= rounds * 100);
    // Neither an inert nor a drop-everything backstop can pass.
    assert!(
        rounds < 4 || (backstop_eperm > 0 && backstop_eperm < backstop_cases && events_checked > 0),
        "seed {seed}: the backstop or event checks never saw both outcomes \
         ({backstop_eperm} of {backstop_cases} sends refused, {events_checked} events)"
    );
}

/// Compare the round's deny and audit events with the evaluator: returns how many events
/// matched. Waits (polls) until every expected event arrived.
fn check_events(
    h: &Harness,
    generation: u64,
    groups: &[(Task, Vec<Case>)],
    policy: &policy::Policy,
    cgroups: &Cgroups,
    exe_keys: &[ExeKey],
    mismatches: &mut Vec<String>,
) -> usize {
    type Key = (Task, (bool, IpAddr, u16, &'static str));
    // What each (task, call) must have produced: the verdict and the rules that may be
    // named (the default, 0, or any matching rule of the deciding rule's action and mode: the
    // kernel names the first it probes, the evaluator the lowest id), or nothing for allow.
    let mut want: HashMap<Key, Option<(&'static str, Vec<u32>)>> = HashMap::new();
    for (task, cases) in groups {
        for case in cases {
            let e = expect(policy, task, case, cgroups, exe_keys);
            let w = match e.verdict {
                policy::eval::Verdict::Allow => None,
                v => Some((
                    v.as_str(),
                    match &e.deciding_rule {
                        None => vec![0],
                        Some(d) => e
                            .matched
                            .iter()
                            .filter(|m| m.action == d.action && m.mode == d.mode)
                            .map(|m| m.id)
                            .collect(),
                    },
                )),
            };
            want.insert((*task, case.event_key()), w);
        }
    }
    let task_of = |r: &zt::history::EventRecord| -> Option<Task> {
        groups.iter().map(|g| g.0).find(|t| {
            t.uid == r.uid
                && t.gid == r.gid
                && exe_keys[t.exe].ino == r.exe_ino
                && std::fs::metadata(&cgroups.paths[t.cgroup])
                    .map(|m| std::os::unix::fs::MetadataExt::ino(&m) == r.cgroup_id)
                    .unwrap_or(false)
        })
    };
    // Events are rate-limited per (exe, uid, hook, verdict, peer or bound end): far more
    // than a round makes of one key.
    let expected: HashSet<&Key> = want
        .iter()
        .filter(|(_, w)| w.is_some())
        .map(|(k, _)| k)
        .collect();
    let call_hooks = [
        "connect4", "connect6", "sendmsg4", "sendmsg6", "bind4", "bind6",
    ];
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let records: Vec<_> = h
            .events(&[])
            .into_iter()
            .filter(|r| r.generation == generation && call_hooks.contains(&r.hook.as_str()))
            .collect();
        let mut seen: HashMap<Key, Vec<(String, u32)>> = HashMap::new();
        for r in &records {
            let Some(task) = task_of(r) else { continue };
            let bind = r.hook.starts_with("bind");
            let (addr, port) = if bind {
                (r.local_addr.unwrap_or(r.peer_addr), r.local_port)
            } else {
                (r.peer_addr, r.peer_port)
            };
            let proto = match r.proto.as_str() {
                "tcp" => "tcp",
                "udp" => "udp",
                _ => "other",
            };
            seen.entry((task, (bind, addr, port, proto)))
                .or_default()
                .push((r.verdict.clone(), r.rule_id));
        }
        let complete = expected.iter().all(|k| seen.contains_key(*k));
        if complete || Instant::now() >= deadline {
            let mut matched = 0;
            for (key, events) in &seen {
                match want.get(key) {
                    // An event of a call this round did not make: another generation's.
                    None => {}
                    Some(None) => mismatches.push(format!(
                        "  {:?} {:?}: allowed by the evaluator, kernel reported {events:?}",
                        key.0, key.1
                    )),
                    Some(Some((verdict, rules))) => {
                        for (v, r) in events {
                            if v != verdict || !rules.contains(r) {
                                mismatches.push(format!(
                                    "  {:?} {:?}: kernel event {v} rule {r}, evaluator \
                                     {verdict} by one of rules {rules:?}",
                                    key.0, key.1
                                ));
                            } else {
                                matched += 1;
                            }
                        }
                    }
                }
            }
            for key in expected.iter().filter(|k| !seen.contains_key(**k)) {
                let of_task: Vec<String> = seen
                    .iter()
                    .filter(|(k, _)| k.0 == key.0)
                    .map(|(k, v)| format!("{:?} {v:?}", k.1))
                    .collect();
                mismatches.push(format!(
                    "  {:?} {:?}: no event, evaluator {:?}; the task's events: {of_task:?}",
                    key.0, key.1, want[*key]
                ));
            }
            return matched;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn expect(
    policy: &policy::Policy,
    task: &Task,
    case: &Case,
    cgroups: &Cgroups,
    exe_keys: &[ExeKey],
) -> policy::Explanation {
    let q = Query {
        exe: Some(exe_keys[task.exe]),
        uid: task.uid,
        gid: task.gid,
        cgroup: cgroups.rels[task.cgroup].clone(),
        peer: case.peer(),
        port: case.addr.port(),
        proto: case.proto,
        direction: Direction::Egress,
    };
    if case.bind {
        policy::explain_bind(policy, &q, false)
    } else {
        policy::explain(policy, &q, false)
    }
}

#[test]
fn ztctl_explain_reads_the_running_ztd_policy() {
    let h = Harness::new(PROBE);
    let path = h.write_policy(
        "p.toml",
        r#"version = 1
[identity.svc]
uid = 41001

[[rule]]
action = "allow"
identity = "svc"
peer = "127.0.0.0/8"
ports = ["5000-5010"]
proto = "udp"

[[rule]]
action = "deny"
identity = "any"
peer = "127.1.0.0/16"
"#,
    );
    let _ztd = h.start_ztd(&[]);
    let explain = |args: &[&str]| -> serde_json::Value {
        let mut all = vec!["explain", "--exe", PROBE, "--json"];
        all.extend_from_slice(args);
        let out = h.ztctl(&all);
        assert_eq!(
            out.status.code(),
            Some(0),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).expect("one JSON object")
    };
    let allowed = explain(&[
        "--uid",
        "41001",
        "--peer",
        "127.0.0.1:5005",
        "--proto",
        "udp",
    ]);
    assert_eq!(allowed["verdict"], "allow", "{allowed}");
    let loc = format!("{}:5:1", path.display());
    assert_eq!(
        allowed["deciding_rule"]["location"],
        loc.as_str(),
        "{allowed}"
    );
    assert_eq!(allowed["matched_identities"][0], "svc", "{allowed}");
    // The kernel agrees.
    let got = probe_batch(
        &h.probe,
        &h.cgroup.path,
        41001,
        0,
        &["udp 127.0.0.1:5005".into(), "udp 127.1.0.1:5005".into()],
    );
    assert_eq!(got, ["ok", "eperm"]);
    let denied = explain(&[
        "--uid",
        "41001",
        "--peer",
        "127.1.0.1:5005",
        "--proto",
        "udp",
    ]);
    assert_eq!(denied["verdict"], "deny", "{denied}");
    assert_eq!(denied["deciding_rule"]["id"], 2, "{denied}");
    assert_eq!(
        denied["matched"].as_array().map(Vec::len),
        Some(2),
        "{denied}"
    );
    let default = explain(&["--peer", "[::1]:5005", "--proto", "udp"]);
    assert_eq!(default["verdict"], "deny", "{default}");
    assert!(default["deciding_rule"].is_null(), "{default}");
    // Without a daemon and without --policy: exit 2.
    let out = std::process::Command::new(zt_integration::bin("ztctl"))
        .args([
            "--socket",
            "/nonexistent/zt.sock",
            "explain",
            "--exe",
            PROBE,
        ])
        .args(["--peer", "127.0.0.1:1", "--proto", "tcp"])
        .output()
        .expect("run ztctl");
    assert_eq!(out.status.code(), Some(2));
}
