//! What a reload costs (issue 7, policy apply time) and that its shortcuts keep the meaning:
//! rule hit counters start from zero in a reused slot, whichever path zeroed them; a one-rule
//! change writes a handful of map entries and enforces the change; every successful load
//! reports its timings in `status`.

use std::{
    net::SocketAddr,
    time::{Duration, Instant},
};

use zt_integration::{Harness, Server, Ztd};

const PROBE: &str = env!("CARGO_BIN_EXE_zt-probe");

fn lo4(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

/// `extra` rules for 10.x addresses (each its own port), then one allowing tcp to `port`.
fn policy(extra: u32, port: u16) -> String {
    let mut text = String::from("version = 1\n");
    for i in 0..extra {
        text.push_str(&format!(
            "[[rule]]\naction = \"allow\"\npeer = \"10.{}.{}.{}\"\nports = [{}]\nproto = \"tcp\"\n",
            (i >> 16) & 0xff,
            (i >> 8) & 0xff,
            i & 0xff,
            1 + i % 60_000
        ));
    }
    text.push_str(&format!(
        "[[rule]]\naction = \"allow\"\npeer = \"127.0.0.1\"\nports = [{port}]\nproto = \"tcp\"\n"
    ));
    text
}

fn hits_of(ztd: &Ztd, id: u32) -> u64 {
    ztd.status()
        .counters
        .iter()
        .find(|c| c.id == id)
        .map_or(0, |c| c.hits)
}

fn reload_ok(h: &Harness) {
    let out = h.ztctl(&["reload"]);
    assert!(
        out.status.success(),
        "reload failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Gen 1 (slot 0) counts hits; gen 2 (slot 1) and gen 3 (slot 0 again) must start at zero.
/// `pause`: time between reloads — short, the apply zeroes the slot; long, the idle-slot
/// catch-up already did.
fn hits_start_from_zero(pause: Duration) {
    let h = Harness::new(PROBE);
    let srv = Server::loopback(&h.probe, 2);
    let (a, b) = (srv.ports[0], srv.ports[1]);
    h.write_policy("p.toml", &policy(0, a));
    let ztd = h.start_ztd(&["--no-watch"]);
    for _ in 0..3 {
        assert_eq!(h.call("tcp", lo4(a)), "ok", "rule 1 allows");
    }
    assert!(
        hits_of(&ztd, 1) >= 3,
        "the counter moved: {:?}",
        ztd.status().counters
    );

    // Same rule id, another meaning (and another slot).
    h.write_policy("p.toml", &policy(0, b));
    reload_ok(&h);
    assert_eq!(ztd.status().generation, 2);
    assert_eq!(hits_of(&ztd, 1), 0, "generation 2 starts from zero");
    std::thread::sleep(pause);

    // Back to slot 0, whose counter of rule 1 moved in generation 1.
    h.write_policy("p.toml", &policy(0, a));
    reload_ok(&h);
    let st = ztd.status();
    assert_eq!(st.generation, 3);
    assert!(
        st.counters.iter().all(|c| c.hits == 0),
        "a reused slot starts from zero: {:?}",
        st.counters
    );
    // Positive control: the counter still counts.
    assert_eq!(h.call("tcp", lo4(a)), "ok");
    assert_eq!(h.call("tcp", lo4(b)), "eperm", "b is no longer allowed");
    assert_eq!(hits_of(&ztd, 1), 1, "one hit counted in generation 3");
}

#[test]
fn hit_counters_of_a_reused_slot_restart_from_zero_right_after_a_flip() {
    hits_start_from_zero(Duration::ZERO);
}

#[test]
fn hit_counters_of_a_reused_slot_restart_from_zero_after_the_idle_catch_up() {
    hits_start_from_zero(Duration::from_secs(1));
}

#[test]
fn a_one_rule_change_writes_a_handful_of_entries_and_reports_its_timings() {
    const EXTRA: u32 = 5_000;
    let h = Harness::new(PROBE);
    let srv = Server::loopback(&h.probe, 2);
    let (a, b) = (srv.ports[0], srv.ports[1]);
    h.write_policy("p.toml", &policy(EXTRA, a));
    let ztd = h.start_ztd(&["--no-watch"]);
    let st = ztd.status();
    let t = st
        .last_reload
        .timings
        .expect("the initial load reports timings");
    assert!(
        t.map_updates >= u64::from(EXTRA) * 2,
        "the initial load writes every rule's entries: {t:?}"
    );
    assert_eq!(t.total_us, t.parse_us + t.compile_us + t.apply_us, "{t:?}");
    assert!(
        t.parse_us > 0 && t.compile_us > 0 && t.apply_us > 0,
        "{t:?}"
    );

    // Let the idle slot catch up, then change one rule's port.
    let end = Instant::now() + Duration::from_secs(2);
    while Instant::now() < end {
        std::thread::sleep(Duration::from_millis(100));
    }
    h.write_policy("p.toml", &policy(EXTRA, b));
    reload_ok(&h);
    let st = ztd.status();
    assert_eq!(st.generation, 2);
    let t = st.last_reload.timings.expect("a reload reports timings");
    assert!(
        t.map_updates + t.map_deletes <= 16,
        "one changed rule writes a handful of entries, not {EXTRA}: {t:?}"
    );
    assert!(t.map_updates > 0, "{t:?}");
    assert_eq!(h.call("tcp", lo4(b)), "ok", "the changed rule allows b");
    assert_eq!(h.call("tcp", lo4(a)), "eperm", "and no longer a");

    // An unchanged policy writes nothing and keeps the generation.
    reload_ok(&h);
    let st = ztd.status();
    assert_eq!(st.generation, 2);
    let t = st.last_reload.timings.expect("timings");
    assert_eq!((t.map_updates, t.map_deletes), (0, 0), "{t:?}");

    // A refused reload reports no timings and changes nothing.
    h.write_policy(
        "p.toml",
        "version = 1\n[[rule]]\naction = \"allow\"\npeer = \"bad\"\n",
    );
    assert!(!h.ztctl(&["reload"]).status.success());
    let st = ztd.status();
    assert!(!st.last_reload.ok && st.last_reload.timings.is_none());
    assert_eq!(h.call("tcp", lo4(b)), "ok");
}
