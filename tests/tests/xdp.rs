//! The XDP front door (`ztd --xdp IFACE`).
//!
//! 1. The packet path, with `BPF_PROG_TEST_RUN` on crafted frames: the program is loaded
//!    through the library as the daemon loads it, against a compiled policy in the pinned maps
//!    of a test pin directory, and attached nowhere. Every case checks the action and that
//!    exactly one counter of the expected reason moved.
//! 2. Real attachment to a veth inside a test network namespace (ztd runs inside that
//!    namespace), in driver and in skb mode, with real sockets from the other namespace.
//!    Every denial is paired with a positive control.

use std::{net::SocketAddr, time::Duration};

use zt::xdp::XdpCounters;
use zt_common::{Hook, Verdict, FLAG_GLOBAL_AUDIT};
use zt_integration::{frames::*, tcp_connect_from, Call, Harness, NetPair, Server, XdpFixture};

const PROBE: &str = env!("CARGO_BIN_EXE_zt-probe");

const XDP_DROP: u32 = 1;
const XDP_PASS: u32 = 2;

/// Ports open for anyone (tcp 8080, udp 5353), for one identity from 10/8 (tcp 8443-8444),
/// a host-wide deny list, and an egress rule (which must open nothing inbound).
const POLICY: &str = r#"version = 1
[identity.web]
uid = 33

[network.blocked]
cidrs = ["203.0.113.0/24", "2001:db8:bad::/48"]

[[rule]]
action = "allow"
direction = "ingress"
peer = "any"
ports = [8080]
proto = "tcp"

[[rule]]
action = "allow"
direction = "ingress"
peer = "any"
ports = [5353]
proto = "udp"

[[rule]]
action = "allow"
direction = "ingress"
identity = "web"
peer = "10.0.0.0/8"
ports = ["8443-8444"]
proto = "tcp"

[[rule]]
action = "deny"
direction = "ingress"
peer = "blocked"

[[rule]]
action = "allow"
peer = "any"
ports = [9090]
proto = "tcp"
"#;

const GOOD4: [u8; 4] = [192, 0, 2, 10];
const BAD4: [u8; 4] = [203, 0, 113, 7];
const LOCAL4: [u8; 4] = [198, 51, 100, 1];

fn v6(s: &str) -> [u8; 16] {
    s.parse::<std::net::Ipv6Addr>().expect("ipv6").octets()
}

fn good6() -> [u8; 16] {
    v6("2001:db8:1::10")
}
fn bad6() -> [u8; 16] {
    v6("2001:db8:bad::7")
}
fn local6() -> [u8; 16] {
    v6("2001:db8:2::1")
}

/// An ephemeral port of this namespace (what the loader wrote into the slot).
fn ephemeral_port() -> u16 {
    let (low, high) = zt::xdp::ephemeral_range();
    low + (high - low) / 2
}

/// A closed port: below the ephemeral range, opened by no ingress rule.
const CLOSED: u16 = 9999;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Reason {
    Passed,
    DenyList,
    ClosedPort,
    Malformed,
    NotJudged,
    Audited,
    Unparsed,
}

fn reason_count(c: &XdpCounters, r: Reason) -> u64 {
    match r {
        Reason::Passed => c.passed,
        Reason::DenyList => c.dropped_deny_list,
        Reason::ClosedPort => c.dropped_closed_port,
        Reason::Malformed => c.dropped_malformed,
        Reason::NotJudged => c.passed_not_judged,
        Reason::Audited => c.audited,
        Reason::Unparsed => c.dropped_unparsed,
    }
}

/// Run `frame`; assert the action and that exactly one packet was counted, under `reason`.
fn expect(fx: &XdpFixture, what: &str, frame: &[u8], action: u32, reason: Reason) {
    let (got, delta) = fx.run(frame);
    assert_eq!(
        got, action,
        "{what}: action {got} (1 = drop, 2 = pass), counted {delta:?}"
    );
    assert_eq!(
        (delta.packets(), reason_count(&delta, reason)),
        (1, 1),
        "{what}: counted {delta:?}, expected one under {reason:?}"
    );
}

fn pass(fx: &XdpFixture, what: &str, frame: &[u8]) {
    expect(fx, what, frame, XDP_PASS, Reason::Passed)
}
fn closed(fx: &XdpFixture, what: &str, frame: &[u8]) {
    expect(fx, what, frame, XDP_DROP, Reason::ClosedPort)
}
fn denied(fx: &XdpFixture, what: &str, frame: &[u8]) {
    expect(fx, what, frame, XDP_DROP, Reason::DenyList)
}
fn malformed(fx: &XdpFixture, what: &str, frame: &[u8]) {
    expect(fx, what, frame, XDP_DROP, Reason::Malformed)
}
fn not_judged(fx: &XdpFixture, what: &str, frame: &[u8]) {
    expect(fx, what, frame, XDP_PASS, Reason::NotJudged)
}

fn tcp4(src: [u8; 4], dport: u16) -> Vec<u8> {
    cat(&[
        &eth(&[], ETH_P_IP),
        &ipv4(src, LOCAL4, TCP, &tcp(40000, dport)),
    ])
}
fn udp4(src: [u8; 4], dport: u16) -> Vec<u8> {
    cat(&[
        &eth(&[], ETH_P_IP),
        &ipv4(src, LOCAL4, UDP, &udp(40000, dport, b"hello")),
    ])
}
fn tcp6(src: [u8; 16], dport: u16) -> Vec<u8> {
    cat(&[
        &eth(&[], ETH_P_IPV6),
        &ipv6(src, local6(), TCP, &tcp(40000, dport)),
    ])
}
fn udp6(src: [u8; 16], dport: u16) -> Vec<u8> {
    cat(&[
        &eth(&[], ETH_P_IPV6),
        &ipv6(src, local6(), UDP, &udp(40000, dport, b"hello")),
    ])
}

#[test]
fn open_closed_and_ephemeral_ports_ipv4_and_ipv6_tcp_and_udp() {
    let h = Harness::new(PROBE);
    let fx = h.xdp_fixture(POLICY, 0);
    let eph = ephemeral_port();

    pass(&fx, "v4 tcp to an open port", &tcp4(GOOD4, 8080));
    closed(&fx, "v4 tcp to a closed port", &tcp4(GOOD4, CLOSED));
    pass(&fx, "v4 tcp to an ephemeral port", &tcp4(GOOD4, eph));
    pass(&fx, "v4 udp to an open port", &udp4(GOOD4, 5353));
    closed(&fx, "v4 udp to a closed port", &udp4(GOOD4, CLOSED));
    pass(&fx, "v4 udp to an ephemeral port", &udp4(GOOD4, eph));
    closed(
        &fx,
        "v4 udp to a port open for tcp only",
        &udp4(GOOD4, 8080),
    );
    closed(
        &fx,
        "v4 tcp to a port open for udp only",
        &tcp4(GOOD4, 5353),
    );

    pass(&fx, "v6 tcp to an open port", &tcp6(good6(), 8080));
    closed(&fx, "v6 tcp to a closed port", &tcp6(good6(), CLOSED));
    pass(&fx, "v6 tcp to an ephemeral port", &tcp6(good6(), eph));
    pass(&fx, "v6 udp to an open port", &udp6(good6(), 5353));
    closed(&fx, "v6 udp to a closed port", &udp6(good6(), CLOSED));
    pass(&fx, "v6 udp to an ephemeral port", &udp6(good6(), eph));

    // A port opened for one identity and one network is open as far as XDP can tell (the
    // cgroup_skb hook judges the peer per socket); an egress rule opens nothing inbound.
    pass(&fx, "a port some identity may serve", &tcp4(GOOD4, 8444));
    pass(&fx, "same, IPv6 source", &tcp6(good6(), 8443));
    closed(&fx, "a port only an egress rule names", &tcp4(GOOD4, 9090));
    closed(&fx, "next to an open range", &tcp4(GOOD4, 8445));
}

#[test]
fn host_wide_deny_lists_drop_by_source() {
    let h = Harness::new(PROBE);
    let fx = h.xdp_fixture(POLICY, 0);
    let eph = ephemeral_port();

    denied(&fx, "v4 deny-listed source, open port", &tcp4(BAD4, 8080));
    pass(
        &fx,
        "control: another source, same port",
        &tcp4(GOOD4, 8080),
    );
    denied(&fx, "v4 deny-listed source, udp", &udp4(BAD4, 5353));
    denied(
        &fx,
        "the deny list wins over the ephemeral exemption",
        &tcp4(BAD4, eph),
    );
    pass(
        &fx,
        "control: ephemeral port, another source",
        &tcp4(GOOD4, eph),
    );
    denied(&fx, "v6 deny-listed source", &tcp6(bad6(), 8080));
    pass(
        &fx,
        "control: v6 source next to the list",
        &tcp6(v6("2001:db8:bae::7"), 8080),
    );
    denied(&fx, "v6 deny-listed source, udp", &udp6(bad6(), 5353));
    // ::ffff:203.0.113.7 is judged as 203.0.113.7.
    denied(
        &fx,
        "IPv4-mapped IPv6 source",
        &tcp6(v6("::ffff:203.0.113.7"), 8080),
    );
    pass(
        &fx,
        "control: IPv4-mapped, not listed",
        &tcp6(v6("::ffff:192.0.2.10"), 8080),
    );
    // ICMP is not judged here, even from a listed source (the stack and cgroup hooks are).
    not_judged(
        &fx,
        "ICMP echo from a listed source",
        &cat(&[&eth(&[], ETH_P_IP), &ipv4(BAD4, LOCAL4, ICMP, &echo(8))]),
    );
    not_judged(
        &fx,
        "ICMPv6 echo",
        &cat(&[
            &eth(&[], ETH_P_IPV6),
            &ipv6(good6(), local6(), ICMPV6, &echo(128)),
        ]),
    );
    not_judged(&fx, "ARP", &cat(&[&eth(&[], ETH_P_ARP), &arp()]));
}

#[test]
fn truncated_and_malformed_headers_are_dropped_never_judged() {
    let h = Harness::new(PROBE);
    let fx = h.xdp_fixture(POLICY, 0);
    let ip = eth(&[], ETH_P_IP);
    let ip6 = eth(&[], ETH_P_IPV6);
    let good_tcp = ipv4(GOOD4, LOCAL4, TCP, &tcp(40000, 8080));
    let good_tcp6 = ipv6(good6(), local6(), TCP, &tcp(40000, 8080));

    // Controls: the same packets whole are passed.
    pass(&fx, "control: whole v4", &cat(&[&ip, &good_tcp]));
    pass(&fx, "control: whole v6", &cat(&[&ip6, &good_tcp6]));

    // The kernel refuses test frames shorter than an Ethernet header; a VLAN tag cut short
    // is the truncated link layer.
    assert!(fx.front.test_run(&[0u8; 13]).is_err(), "13-byte frame");
    malformed(
        &fx,
        "truncated VLAN tag",
        &cat(&[&eth(&[], ETH_P_8021Q), &[0, 100]]),
    );
    malformed(&fx, "truncated IPv4 header", &cat(&[&ip, &good_tcp[..12]]));
    malformed(
        &fx,
        "truncated IPv6 header",
        &cat(&[&ip6, &good_tcp6[..30]]),
    );
    // Cut inside the transport header: the ports of an open port are there, the rest is not.
    let cut_tcp = ipv4(GOOD4, LOCAL4, TCP, &tcp(40000, 8080)[..10]);
    malformed(&fx, "truncated TCP header", &cat(&[&ip, &cut_tcp]));
    let cut_udp = ipv4(GOOD4, LOCAL4, UDP, &udp(40000, 5353, b"")[..6]);
    malformed(&fx, "truncated UDP header", &cat(&[&ip, &cut_udp]));
    let cut_tcp6 = ipv6(good6(), local6(), TCP, &tcp(40000, 8080)[..19]);
    malformed(&fx, "truncated TCP header (v6)", &cat(&[&ip6, &cut_tcp6]));

    let payload = tcp(40000, 8080);
    for ihl in [0u8, 4] {
        malformed(
            &fx,
            &format!("IHL {ihl}"),
            &cat(&[&ip, &ipv4_raw(GOOD4, LOCAL4, TCP, &payload, ihl, None, 0)]),
        );
    }
    malformed(
        &fx,
        "total length beyond the frame",
        &cat(&[&ip, &ipv4_raw(GOOD4, LOCAL4, TCP, &payload, 5, Some(41), 0)]),
    );
    malformed(
        &fx,
        "total length below the header",
        &cat(&[&ip, &ipv4_raw(GOOD4, LOCAL4, TCP, &payload, 5, Some(19), 0)]),
    );
    // The frame holds a whole TCP header, but the IP packet ends before it does.
    malformed(
        &fx,
        "total length cutting the TCP header",
        &cat(&[&ip, &ipv4_raw(GOOD4, LOCAL4, TCP, &payload, 5, Some(30), 0)]),
    );
    malformed(
        &fx,
        "IPv4 version field is not 4",
        &cat(&[&ip, &[0x65], &good_tcp[1..]]),
    );
    malformed(
        &fx,
        "IPv6 version field is not 6",
        &cat(&[&ip6, &[0x40], &good_tcp6[1..]]),
    );
    malformed(
        &fx,
        "IPv6 payload length beyond the frame",
        &cat(&[&ip6, &ipv6_raw(good6(), local6(), TCP, &payload, 21)]),
    );
    malformed(
        &fx,
        "TCP data offset 4",
        &cat(&[&ip, &ipv4(GOOD4, LOCAL4, TCP, &tcp_raw(40000, 8080, 4))]),
    );
    malformed(
        &fx,
        "TCP data offset beyond the packet",
        &cat(&[&ip, &ipv4(GOOD4, LOCAL4, TCP, &tcp_raw(40000, 8080, 6))]),
    );
    malformed(
        &fx,
        "UDP length 4",
        &cat(&[
            &ip,
            &ipv4(GOOD4, LOCAL4, UDP, &udp_raw(40000, 5353, b"xy", 4)),
        ]),
    );
    malformed(
        &fx,
        "UDP length beyond the packet",
        &cat(&[
            &ip,
            &ipv4(GOOD4, LOCAL4, UDP, &udp_raw(40000, 5353, b"xy", 11)),
        ]),
    );
    // An extension header claiming more bytes than the packet has.
    malformed(
        &fx,
        "IPv6 extension header running past the packet",
        &cat(&[
            &ip6,
            &ipv6(
                good6(),
                local6(),
                HOPOPTS,
                &cat(&[&[TCP, 3, 1, 4, 0, 0, 0, 0], &tcp(40000, 8080)]),
            ),
        ]),
    );

    // Ethernet padding after a short packet is not part of it: judged normally.
    let mut padded = cat(&[&ip, &good_tcp]);
    padded.resize(60.max(padded.len() + 6), 0);
    pass(&fx, "a padded frame", &padded);
}

#[test]
fn vlan_tags_are_looked_through() {
    let h = Harness::new(PROBE);
    let fx = h.xdp_fixture(POLICY, 0);
    let v4 = |tags: &[u16], src, port| {
        cat(&[
            &eth(tags, ETH_P_IP),
            &ipv4(src, LOCAL4, TCP, &tcp(40000, port)),
        ])
    };
    let v6f = |tags: &[u16], src, port| {
        cat(&[
            &eth(tags, ETH_P_IPV6),
            &ipv6(src, local6(), TCP, &tcp(40000, port)),
        ])
    };
    pass(
        &fx,
        "one 802.1Q tag, open port",
        &v4(&[ETH_P_8021Q], GOOD4, 8080),
    );
    closed(
        &fx,
        "one 802.1Q tag, closed port",
        &v4(&[ETH_P_8021Q], GOOD4, CLOSED),
    );
    denied(
        &fx,
        "one tag, listed source",
        &v4(&[ETH_P_8021Q], BAD4, 8080),
    );
    let qinq = [ETH_P_8021AD, ETH_P_8021Q];
    pass(&fx, "QinQ, v4 open port", &v4(&qinq, GOOD4, 8080));
    closed(&fx, "QinQ, v4 closed port", &v4(&qinq, GOOD4, CLOSED));
    pass(&fx, "QinQ, v6 open port", &v6f(&qinq, good6(), 8080));
    closed(&fx, "QinQ, v6 closed port", &v6f(&qinq, good6(), CLOSED));
    denied(&fx, "QinQ, v6 listed source", &v6f(&qinq, bad6(), 8080));
    not_judged(
        &fx,
        "a third tag is not looked through",
        &v4(&[ETH_P_8021AD, ETH_P_8021Q, ETH_P_8021Q], GOOD4, CLOSED),
    );
    not_judged(
        &fx,
        "ARP in a VLAN",
        &cat(&[&eth(&[ETH_P_8021Q], ETH_P_ARP), &arp()]),
    );
}

#[test]
fn ipv6_extension_headers_and_fragments() {
    let h = Harness::new(PROBE);
    let fx = h.xdp_fixture(POLICY, 0);
    let with = |next: u8, exts: &[u8], l4: &[u8]| {
        cat(&[
            &eth(&[], ETH_P_IPV6),
            &ipv6(good6(), local6(), next, &cat(&[exts, l4])),
        ])
    };
    // Hop-by-hop, then destination options, then TCP: judged on the TCP header.
    let hbh_dst = cat(&[&ext(DSTOPTS), &ext(TCP)]);
    pass(
        &fx,
        "HBH + DSTOPTS + TCP open",
        &with(HOPOPTS, &hbh_dst, &tcp(40000, 8080)),
    );
    closed(
        &fx,
        "HBH + DSTOPTS + TCP closed",
        &with(HOPOPTS, &hbh_dst, &tcp(40000, CLOSED)),
    );
    let long = cat(&[&ext_len(ROUTING, 2), &ext(DSTOPTS), &ext(UDP)]);
    pass(
        &fx,
        "HBH (24 bytes) + routing + DSTOPTS + UDP open",
        &with(HOPOPTS, &long, &udp(40000, 5353, b"x")),
    );
    closed(
        &fx,
        "same, UDP closed",
        &with(HOPOPTS, &long, &udp(40000, CLOSED, b"x")),
    );
    let with_src = |src: [u8; 16], exts: &[u8], l4: &[u8]| {
        cat(&[
            &eth(&[], ETH_P_IPV6),
            &ipv6(src, local6(), HOPOPTS, &cat(&[exts, l4])),
        ])
    };
    denied(
        &fx,
        "listed source behind extension headers",
        &with_src(bad6(), &hbh_dst, &tcp(40000, 8080)),
    );

    // Fragments: the first carries the ports and is judged; later ones are not.
    let first = frag6(TCP, 0, true);
    pass(
        &fx,
        "first fragment, open port",
        &with(FRAGMENT, &first, &tcp(40000, 8080)),
    );
    closed(
        &fx,
        "first fragment, closed port",
        &with(FRAGMENT, &first, &tcp(40000, CLOSED)),
    );
    not_judged(
        &fx,
        "non-first IPv6 fragment",
        &with(FRAGMENT, &frag6(TCP, 3, false), &[0u8; 16]),
    );
    not_judged(
        &fx,
        "non-first IPv6 fragment after HBH",
        &with(
            HOPOPTS,
            &cat(&[&ext(FRAGMENT), &frag6(TCP, 185, true)]),
            &[0u8; 16],
        ),
    );
    // More extension headers than the parser follows: the port is unknown, so dropped.
    let seven = cat(&[
        &ext(DSTOPTS),
        &ext(DSTOPTS),
        &ext(DSTOPTS),
        &ext(DSTOPTS),
        &ext(DSTOPTS),
        &ext(DSTOPTS),
        &ext(TCP),
    ]);
    expect(
        &fx,
        "seven extension headers",
        &with(HOPOPTS, &seven, &tcp(40000, 8080)),
        XDP_DROP,
        Reason::Unparsed,
    );
    let six = cat(&[
        &ext(DSTOPTS),
        &ext(DSTOPTS),
        &ext(DSTOPTS),
        &ext(DSTOPTS),
        &ext(DSTOPTS),
        &ext(TCP),
    ]);
    closed(
        &fx,
        "six extension headers are followed",
        &with(HOPOPTS, &six, &tcp(40000, CLOSED)),
    );

    // IPv4 fragments.
    let frag4 = |frag: u16, l4: &[u8]| {
        cat(&[
            &eth(&[], ETH_P_IP),
            &ipv4_raw(GOOD4, LOCAL4, TCP, l4, 5, None, frag),
        ])
    };
    not_judged(&fx, "non-first IPv4 fragment", &frag4(100, &[0u8; 24]));
    not_judged(
        &fx,
        "non-first IPv4 fragment, more to come",
        &frag4(0x2000 | 3, &[0u8; 24]),
    );
    closed(
        &fx,
        "first IPv4 fragment (MF), closed port",
        &frag4(0x2000, &tcp(40000, CLOSED)),
    );
    pass(
        &fx,
        "first IPv4 fragment (MF), open port",
        &frag4(0x2000, &tcp(40000, 8080)),
    );
    pass(&fx, "DF set, open port", &frag4(0x4000, &tcp(40000, 8080)));
    // IPv4 options: the transport header starts after them.
    let opts = |port| {
        cat(&[
            &eth(&[], ETH_P_IP),
            &ipv4_raw(GOOD4, LOCAL4, TCP, &tcp(40000, port), 7, None, 0),
        ])
    };
    pass(&fx, "IPv4 options, open port", &opts(8080));
    closed(&fx, "IPv4 options, closed port", &opts(CLOSED));
}

#[test]
fn audit_policies_pass_and_count_what_they_would_drop() {
    // An audit file's deny list: audited, passed; closed ports are still dropped (the file
    // declares no identity, so no process is an audit process).
    let h = Harness::new(PROBE);
    let audit_list = r#"version = 1
mode = "audit"
[[rule]]
action = "allow"
direction = "ingress"
peer = "any"
ports = [8080]
proto = "tcp"
[[rule]]
action = "deny"
direction = "ingress"
peer = "203.0.113.0/24"
"#;
    let fx = h.xdp_fixture(audit_list, 0);
    expect(
        &fx,
        "audit-mode deny list",
        &tcp4(BAD4, 8080),
        XDP_PASS,
        Reason::Audited,
    );
    pass(&fx, "control: another source", &tcp4(GOOD4, 8080));
    closed(&fx, "closed port", &tcp4(GOOD4, CLOSED));
    drop(fx);

    // ztd --mode audit: nothing is dropped for policy; malformed headers still are.
    let h = Harness::new(PROBE);
    let fx = h.xdp_fixture(POLICY, FLAG_GLOBAL_AUDIT);
    expect(
        &fx,
        "--mode audit, listed source",
        &tcp4(BAD4, 8080),
        XDP_PASS,
        Reason::Audited,
    );
    expect(
        &fx,
        "--mode audit, closed port",
        &tcp4(GOOD4, CLOSED),
        XDP_PASS,
        Reason::Audited,
    );
    pass(&fx, "--mode audit, open port", &tcp4(GOOD4, 8080));
    malformed(
        &fx,
        "--mode audit, malformed",
        &cat(&[
            &eth(&[], ETH_P_IP),
            &ipv4_raw(GOOD4, LOCAL4, TCP, &tcp(1, 8080), 4, None, 0),
        ]),
    );
    drop(fx);

    // A policy with an audit-mode identity: its processes may listen on any port (their
    // default deny is an audit), so closed ports are audited, not dropped; an enforce deny
    // list still drops.
    let h = Harness::new(PROBE);
    let audit_identity = r#"version = 1
mode = "audit"
[identity.trial]
uid = 4242
[[rule]]
action = "deny"
direction = "ingress"
peer = "203.0.113.0/24"
"#;
    let fx = h.xdp_fixture(audit_identity, 0);
    expect(
        &fx,
        "closed port with audit identities",
        &tcp4(GOOD4, CLOSED),
        XDP_PASS,
        Reason::Audited,
    );
    expect(
        &fx,
        "audit deny list",
        &tcp4(BAD4, CLOSED),
        XDP_PASS,
        Reason::Audited,
    );
}

#[test]
fn no_policy_passes_and_counts() {
    let h = Harness::new(PROBE);
    let front = h.xdp_without_policy();
    let before = front.total_counters().expect("counters");
    assert_eq!(front.test_run(&tcp4(BAD4, CLOSED)).expect("run"), XDP_PASS);
    let after = front.total_counters().expect("counters");
    assert_eq!(after.no_policy - before.no_policy, 1, "{after:?}");
    // Parsing still happens first: malformed is dropped even then.
    let bad = cat(&[&eth(&[], ETH_P_IP), &[0x45, 0, 0]]);
    assert_eq!(front.test_run(&bad).expect("run"), XDP_DROP);
}

#[test]
fn drops_are_reported_as_sampled_events() {
    let h = Harness::new(PROBE);
    let mut fx = h.xdp_fixture(POLICY, 0);
    fx.front.drain_events();

    // One drop of each kind: an event each (the bucket starts full).
    denied(&fx, "listed source", &tcp4(BAD4, 8080));
    closed(&fx, "closed port", &udp6(good6(), CLOSED));
    pass(&fx, "open port: no event", &tcp4(GOOD4, 8080));
    let events = fx.front.drain_events();
    assert_eq!(events.len(), 2, "{events:?}");
    let deny_rule = fx.rule_id("deny ingress any <- blocked any");
    let e = &events[0];
    assert_eq!(
        (e.hook, e.verdict, e.family, e.proto, e.local_port, e.rule),
        (Hook::Xdp as u8, Verdict::Deny as u8, 4, 0, 8080, deny_rule),
        "{e:?}"
    );
    assert_eq!(&e.peer_addr[..4], &BAD4, "the source address");
    assert_eq!((e.pid, e.tgid, e.uid, e.gid, e.cgroup_id), (0, 0, 0, 0, 0));
    assert!(e.generation >= 1);
    let e = &events[1];
    assert_eq!(
        (e.hook, e.verdict, e.family, e.proto, e.local_port, e.rule),
        (Hook::Xdp as u8, Verdict::Deny as u8, 6, 1, CLOSED, 0),
        "{e:?}"
    );
    assert_eq!(e.peer_addr, good6());

    // A flood: every drop counted, events sampled by the per-CPU token bucket.
    let before = fx.front.total_counters().expect("counters");
    let (action, _) = fx.front.run(&tcp4(GOOD4, CLOSED), 5000).expect("run");
    assert_eq!(action, XDP_DROP);
    let d = zt_integration::counters_delta(&before, &fx.front.total_counters().expect("counters"));
    assert_eq!(d.dropped_closed_port, 5000, "{d:?}");
    assert_eq!(
        d.events_sent + d.events_lost + d.events_skipped,
        5000,
        "{d:?}"
    );
    let burst = zt_ebpf_burst() * zt::loader::nr_cpus() as u64;
    assert!(
        d.events_sent >= 1 && d.events_sent <= burst + 5,
        "sampled: {d:?} (burst {burst})"
    );
    assert_eq!(fx.front.drain_events().len() as u64, d.events_sent);
}

/// `EVENT_BURST` of zt-ebpf/src/xdp.rs.
fn zt_ebpf_burst() -> u64 {
    32
}

/// Kernel time per packet for a few paths (printed; compare only within one run).
#[test]
fn cost_per_packet() {
    let h = Harness::new(PROBE);
    let fx = h.xdp_fixture(POLICY, 0);
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("ARP (parse only)", cat(&[&eth(&[], ETH_P_ARP), &arp()])),
        ("v4 tcp open port", tcp4(GOOD4, 8080)),
        ("v4 tcp closed port (drop)", tcp4(GOOD4, CLOSED)),
        ("v4 tcp deny list (drop)", tcp4(BAD4, 8080)),
        ("v6 tcp open port", tcp6(good6(), 8080)),
        (
            "v6 HBH+DST tcp open",
            cat(&[
                &eth(&[], ETH_P_IPV6),
                &ipv6(
                    good6(),
                    local6(),
                    HOPOPTS,
                    &cat(&[&ext(DSTOPTS), &ext(TCP), &tcp(1, 8080)]),
                ),
            ]),
        ),
    ];
    for (what, frame) in cases {
        let (_, per_run) = fx.front.run(&frame, 200_000).expect("run");
        println!("xdp cost: {what:<28} {:>5} ns/packet", per_run.as_nanos());
    }
}

/// `n` destination-options headers, the last announcing UDP.
fn dstopts(n: usize) -> Vec<u8> {
    let mut out = Vec::new();
    for i in 0..n {
        out.extend(ext(if i + 1 == n { UDP } else { DSTOPTS }));
    }
    out
}

#[test]
fn a_header_chain_the_front_door_cannot_follow_is_dropped() {
    let h = Harness::new(PROBE);
    // As the cgroup_skb test (seams.rs): udp 5353 may be reached only from fd00::99.
    let fx = h.xdp_fixture(
        r#"version = 1
[[rule]]
action = "allow"
direction = "ingress"
peer = "fd00::99"
ports = [5353]
proto = "udp"
"#,
        0,
    );
    let frame = |src: [u8; 16], n: usize| {
        let next = if n == 0 { UDP } else { DSTOPTS };
        cat(&[
            &eth(&[], ETH_P_IPV6),
            &ipv6(
                src,
                local6(),
                next,
                &cat(&[&dstopts(n), &udp(40000, 5353, b"x")]),
            ),
        ])
    };
    for src in [v6("::1"), v6("fd00::99")] {
        // Up to six headers the port is known (open: the cgroup_skb hook judges the peer).
        for n in [0, 5, 6] {
            pass(&fx, &format!("{n} headers"), &frame(src, n));
        }
        // Beyond that the port is unknown: dropped, whoever sends.
        for n in [7, 9] {
            expect(
                &fx,
                &format!("{n} headers"),
                &frame(src, n),
                XDP_DROP,
                Reason::Unparsed,
            );
        }
    }
    // In audit mode the same packet passes, counted as audited.
    let audit = Harness::new(PROBE);
    let fx = audit.xdp_fixture(POLICY, FLAG_GLOBAL_AUDIT);
    expect(
        &fx,
        "9 headers, --mode audit",
        &frame(v6("::1"), 9),
        XDP_PASS,
        Reason::Audited,
    );
}

// ------------------------------------------------------------------------------------------
// Real attachment, inside test network namespaces.
// ------------------------------------------------------------------------------------------

/// The front door's policy for a NetPair: tcp/udp 8080 open for anyone, 198.19.X.1 (the
/// client namespace's second address) deny-listed; 8081 is served but opened by no rule.
fn netpair_policy(net: &NetPair) -> String {
    format!(
        r#"version = 1
[[rule]]
action = "allow"
direction = "ingress"
peer = "any"
ports = [8080]

[[rule]]
action = "deny"
direction = "ingress"
peer = "198.19.{}.1"
"#,
        net.x
    )
}

const OPEN: u16 = 8080;
const SERVED_CLOSED: u16 = 8081;
/// A fixed, non-ephemeral source port for the server namespace's own connections.
const FIXED_SRC_PORT: u16 = 7000;
/// Where the client namespace serves, for the server namespace's own egress.
const CLIENT_SIDE_PORT: u16 = 9000;

fn sock(s: &str) -> SocketAddr {
    s.parse().expect("socket address")
}

/// Every outcome the scenario checks, from the client namespace `a` (and from `b` out).
#[derive(Debug, PartialEq, Eq)]
struct Outcomes {
    open_v4: String,
    closed_v4: String,
    open_v6: String,
    closed_v6: String,
    udp_open: String,
    udp_closed: String,
    from_listed: String,
    from_other: String,
    egress_ephemeral: String,
    egress_fixed_port: String,
}

fn outcomes(h: &Harness, net: &NetPair) -> Outcomes {
    let x = net.x;
    let from_a =
        |proto: &str, addr: SocketAddr| h.probe_call(Call::new(proto, addr).netns(&net.path_a()));
    let b_to_a = |src: &str| {
        tcp_connect_from(
            &net.path_b(),
            sock(src),
            sock(&format!("198.18.{x}.1:{CLIENT_SIDE_PORT}")),
            Duration::from_secs(3),
        )
    };
    Outcomes {
        open_v4: from_a("tcp", net.b_addr("main", OPEN)),
        closed_v4: from_a("tcp", net.b_addr("main", SERVED_CLOSED)),
        open_v6: from_a("tcp", net.b_addr("v6", OPEN)),
        closed_v6: from_a("tcp", net.b_addr("v6", SERVED_CLOSED)),
        udp_open: from_a("udp", net.b_addr("main", OPEN)),
        udp_closed: from_a("udp", net.b_addr("main", SERVED_CLOSED)),
        // To 198.19.X.2 the client's source is 198.19.X.1 (the listed one).
        from_listed: from_a("tcp", net.b_addr("other-net", OPEN)),
        from_other: from_a("tcp", net.b_addr("main", OPEN)),
        egress_ephemeral: b_to_a(&format!("198.18.{x}.2:0")),
        egress_fixed_port: b_to_a(&format!("198.18.{x}.2:{FIXED_SRC_PORT}")),
    }
}

fn all_ok() -> Outcomes {
    let ok = || "ok".to_string();
    Outcomes {
        open_v4: ok(),
        closed_v4: ok(),
        open_v6: ok(),
        closed_v6: ok(),
        udp_open: ok(),
        udp_closed: ok(),
        from_listed: ok(),
        from_other: ok(),
        egress_ephemeral: ok(),
        egress_fixed_port: ok(),
    }
}

fn guarded() -> Outcomes {
    let ok = || "ok".to_string();
    let timeout = || "timeout".to_string();
    Outcomes {
        open_v4: ok(),
        closed_v4: timeout(),
        open_v6: ok(),
        closed_v6: timeout(),
        udp_open: ok(),
        udp_closed: timeout(),
        from_listed: timeout(),
        from_other: ok(),
        egress_ephemeral: ok(),
        // The SYN-ACK comes back to port 7000: not ephemeral, not opened.
        egress_fixed_port: timeout(),
    }
}

struct World {
    h: Harness,
    net: NetPair,
    _servers: Vec<Server>,
}

fn world() -> World {
    let h = Harness::new(PROBE);
    let net = NetPair::new();
    h.write_policy("p.toml", &netpair_policy(&net));
    // Servers are not in the guarded cgroup: only the front door judges their traffic.
    let b = Server::start(
        &h.probe,
        &["0.0.0.0", "::"],
        &[OPEN, SERVED_CLOSED],
        Some(&net.path_b()),
    );
    let a = Server::start(
        &h.probe,
        &["0.0.0.0"],
        &[CLIENT_SIDE_PORT],
        Some(&net.path_a()),
    );
    World {
        h,
        net,
        _servers: vec![b, a],
    }
}

fn attach_scenario(mode: &str) {
    let w = world();
    let (h, net) = (&w.h, &w.net);
    // Positive control: without the front door everything connects.
    assert_eq!(outcomes(h, net), all_ok(), "before ztd");

    let iface = net.veth_b();
    let ztd = h.start_ztd_in_netns(&net.path_b(), &["--xdp", &iface, "--xdp-mode", mode]);
    let st = ztd.status();
    assert_eq!(st.xdp.len(), 1, "{:?}", st.xdp);
    let x = &st.xdp[0];
    assert_eq!(
        (x.iface.as_str(), x.mode.as_str(), x.attached),
        (iface.as_str(), mode, true),
        "{x:?}"
    );
    assert!(x.prog_id != 0);
    assert!(st.healthy, "healthy with the front door attached: {st:?}");
    let text = h.ztctl(&["status"]);
    let text = String::from_utf8_lossy(&text.stdout);
    assert!(
        text.contains("XDP IFACE") && text.contains(&format!("{iface:<16} {mode:<7} yes")),
        "{text}"
    );

    assert_eq!(
        outcomes(h, net),
        guarded(),
        "with the front door ({mode} mode)"
    );

    let c = ztd.status().xdp[0].counters.clone();
    assert!(c.dropped_closed_port >= 3, "{c:?}");
    assert!(c.dropped_deny_list >= 1, "{c:?}");
    assert!(c.passed >= 5, "{c:?}");
    assert!(c.passed_not_judged >= 1, "ARP/ND are not judged: {c:?}");
    assert_eq!(c.dropped_malformed, 0, "{c:?}");
    let line = ztd
        .wait_line(
            &["deny", "xdp", &format!("198.19.{}.1", net.x)],
            Duration::from_secs(5),
        )
        .unwrap_or_else(|| panic!("no xdp deny event:\n{}", ztd.lines().join("\n")));
    assert!(line.contains(&format!("to port {OPEN}/tcp")), "{line}");

    // `ztctl unload` detaches it: everything connects again. The link goes when its last
    // holder closes it (ztd exits after answering): poll the interface until no XDP program
    // is on it, then judge.
    let out = h.ztctl(&["unload", "--bpffs", &h.pins.path.display().to_string()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let iface = net.veth_b();
    let end = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let link = std::process::Command::new("ip")
            .args(["-n", &net.b, "link", "show", "dev", &iface])
            .output()
            .expect("ip link show");
        let text = String::from_utf8_lossy(&link.stdout).to_string();
        if !text.contains("xdp") {
            break;
        }
        assert!(
            std::time::Instant::now() < end,
            "XDP still on {iface} after unload:\n{text}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(outcomes(h, net), all_ok(), "after unload");
}

#[test]
fn front_door_on_a_veth_in_driver_mode() {
    attach_scenario("driver");
}

#[test]
fn front_door_on_a_veth_in_skb_mode() {
    attach_scenario("skb");
}

#[test]
fn front_door_outlives_ztd_and_a_restart_adopts_it() {
    let w = world();
    let (h, net) = (&w.h, &w.net);
    let iface = net.veth_b();
    let closed_from_a =
        || h.probe_call(Call::new("tcp", net.b_addr("main", SERVED_CLOSED)).netns(&net.path_a()));
    let open_from_a =
        || h.probe_call(Call::new("tcp", net.b_addr("main", OPEN)).netns(&net.path_a()));
    assert_eq!(closed_from_a(), "ok", "control before ztd");

    let mut ztd = h.start_ztd_in_netns(&net.path_b(), &["--xdp", &iface]);
    let first = ztd.status().xdp[0].clone();
    assert_eq!(
        first.mode, "driver",
        "auto prefers driver mode on veth: {first:?}"
    );
    assert!(first.attached);
    ztd.kill9();

    // Pinned: still guarding with no daemon.
    assert_eq!(closed_from_a(), "timeout", "still dropped after kill -9");
    assert_eq!(open_from_a(), "ok", "and still passing after kill -9");

    // A restart adopts the pinned link: a new program in place, same link, same mode.
    let ztd = h.start_ztd_in_netns(&net.path_b(), &["--xdp", &iface]);
    assert!(
        ztd.wait_line(&["XDP front door", "adopted"], Duration::from_secs(5))
            .is_some(),
        "{}",
        ztd.lines().join("\n")
    );
    let second = ztd.status().xdp[0].clone();
    assert!(second.attached, "{second:?}");
    assert_eq!(second.mode, "driver");
    assert_ne!(second.prog_id, first.prog_id, "the program was replaced");
    let q = zt_integration::in_netns(&net.path_b(), {
        let iface = iface.clone();
        move || zt::xdp::query_iface(zt::xdp::ifindex(&iface).expect("ifindex")).expect("query")
    });
    assert_eq!(
        (q.driver, q.skb),
        (second.prog_id, 0),
        "exactly one XDP program on the interface"
    );
    assert_eq!(closed_from_a(), "timeout");
    assert_eq!(open_from_a(), "ok");

    let out = h.ztctl(&["unload", "--bpffs", &h.pins.path.display().to_string()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(closed_from_a(), "ok", "detached by unload");
    let q = zt_integration::in_netns(&net.path_b(), move || {
        zt::xdp::query_iface(zt::xdp::ifindex(&iface).expect("ifindex")).expect("query")
    });
    assert_eq!((q.driver, q.skb), (0, 0), "nothing left on the interface");
}

#[test]
fn an_unknown_interface_is_refused_before_anything_is_attached() {
    let h = Harness::new(PROBE);
    let net = NetPair::new();
    h.write_policy("p.toml", &netpair_policy(&net));
    // Inside the test namespace, like every XDP test: nothing could reach the main one.
    let mut ztd = h.spawn_ztd_in_netns(&net.path_b(), &["--xdp", "zt-no-such-if0"]);
    let st = ztd.wait_exit(Duration::from_secs(20)).expect("ztd exits");
    assert!(!st.success());
    assert!(
        ztd.lines()
            .iter()
            .any(|l| l.contains("zt-no-such-if0") && l.contains("no such network interface")),
        "{}",
        ztd.lines().join("\n")
    );
    assert!(
        h.attached_programs().iter().all(Vec::is_empty),
        "nothing attached"
    );
}
