//! Inbound zero trust against the real kernel: who may listen (bind), who may reach a
//! listener (cgroup_skb ingress, judged by the socket's owner), host-wide block lists, raw and
//! ICMP sockets, and the egress backstop for sockets that escaped the connect hooks. Every
//! denial is paired with a positive control through the same harness.

use std::{net::SocketAddr, time::Duration};

use zt_integration::{Call, Harness, Held, NetPair, Server};

const PROBE: &str = env!("CARGO_BIN_EXE_zt-probe");

fn lo4(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

/// A port that is free now (bound and released).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

#[test]
fn binding_is_limited_to_ports_an_ingress_rule_grants() {
    let h = Harness::new(PROBE);
    let (granted, other) = (free_port(), free_port());
    h.write_policy(
        "p.toml",
        &format!(
            r#"version = 1
[[rule]]
action = "allow"
direction = "ingress"
peer = "any"
ports = [{granted}]
proto = "tcp"
"#
        ),
    );
    let _ztd = h.start_ztd(&[]);
    assert_eq!(h.bind("tcp", lo4(granted)), "ok", "granted port");
    assert_eq!(
        h.bind("tcp", lo4(other)),
        "eperm",
        "ungranted port, even on loopback"
    );
    assert_eq!(
        h.bind("udp", lo4(granted)),
        "eperm",
        "the grant is tcp only"
    );
    assert_eq!(
        h.bind("tcp", lo4(0)),
        "ok",
        "port 0 (ephemeral) is always allowed"
    );
    let any6: SocketAddr = format!("[::]:{granted}").parse().expect("addr");
    assert_eq!(h.bind("tcp", any6), "ok", "IPv6 bind of the granted port");
}

#[test]
fn a_listener_receives_only_from_peers_its_ingress_rules_allow() {
    let h = Harness::new(PROBE);
    let net = NetPair::new();
    let x = net.x;
    // Clients in namespace a have 198.18.x.1 and 198.19.x.1; only the first is allowed.
    h.write_policy(
        "p.toml",
        &format!(
            r#"version = 1
[[rule]]
action = "allow"
direction = "ingress"
peer = "198.18.{x}.1"
ports = [8050]
"#
        ),
    );
    let _ztd = h.start_ztd(&[]);
    let _srv = Server::start_in(
        &h.probe,
        &["0.0.0.0"],
        &[8050],
        Some(&net.path_b()),
        Some(&h.cgroup.path),
    );
    let from = |proto: &str, src: &str| {
        h.probe_call(
            Call::new(proto, net.b_addr("main", 8050))
                .netns(&net.path_a())
                .src(src),
        )
    };
    assert_eq!(
        from("tcp", &format!("198.18.{x}.1")),
        "ok",
        "allowed peer, tcp"
    );
    assert_eq!(
        from("udp", &format!("198.18.{x}.1")),
        "ok",
        "allowed peer, udp"
    );
    assert_eq!(
        from("tcp", &format!("198.19.{x}.1")),
        "timeout",
        "other peer: SYN dropped"
    );
    assert_eq!(
        from("udp", &format!("198.19.{x}.1")),
        "timeout",
        "other peer: datagram dropped"
    );
}

#[test]
fn a_host_wide_block_list_cuts_replies_to_guarded_clients_too() {
    let h = Harness::new(PROBE);
    let net = NetPair::new();
    let _srv = Server::start(&h.probe, &["0.0.0.0"], &[8050], Some(&net.path_b()));
    let x = net.x;
    h.write_policy(
        "p.toml",
        &format!(
            r#"version = 1
[[rule]]
action = "allow"
peer = "any"

[[rule]]
action = "deny"
direction = "ingress"
identity = "any"
peer = "198.18.{x}.3"
"#
        ),
    );
    let ztd = h.start_ztd(&[]);
    // TCP: the SYN-ACK comes from exactly the address connected to.
    let call = |which: &str| {
        h.probe_call(
            Call::new("tcp", net.b_addr(which, 8050))
                .cgroup(&h.cgroup.path)
                .netns(&net.path_a()),
        )
    };
    assert_eq!(call("main"), "ok", "replies from an unlisted host arrive");
    assert_eq!(
        call("same-net"),
        "timeout",
        "replies from a blocked host are dropped"
    );
    ztd.wait_line(
        &["deny", "skb_ingress", &format!("198.18.{x}.3")],
        Duration::from_secs(5),
    )
    .unwrap_or_else(|| {
        panic!(
            "no drop event: {:?}\n{}",
            ztd.status().decisions,
            ztd.lines().join("\n")
        )
    });
}

#[test]
fn raw_and_icmp_sockets_need_a_grant() {
    let h = Harness::new(PROBE);
    let net = NetPair::new();
    net.allow_ping_sockets_in_a();
    let x = net.x;
    h.write_policy(
        "p.toml",
        &format!(
            r#"version = 1
[identity.netadmin]
gid = 43001
raw = true

[identity.pinger]
gid = 43002

[[rule]]
action = "allow"
identity = "pinger"
peer = "198.18.{x}.2"
proto = "icmp"

[[rule]]
action = "allow"
identity = "netadmin"
peer = "198.18.{x}.0/24"
proto = "icmp"
"#
        ),
    );
    let _ztd = h.start_ztd(&[]);
    let a = net.path_a();
    // The uid stays 0 (CAP_NET_RAW): only zt can refuse these; identities go by gid.
    assert_eq!(h.socket("raw", 43001, &a, None), "ok", "raw = true");
    assert_eq!(h.socket("raw", 43002, &a, None), "eperm", "no raw grant");
    assert_eq!(h.socket("raw", 43003, &a, None), "eperm", "no grant at all");
    assert_eq!(
        h.socket("icmp", 43002, &a, None),
        "ok",
        "an icmp rule grants ping sockets"
    );
    assert_eq!(
        h.socket("icmp", 43001, &a, None),
        "ok",
        "raw = true grants ping sockets too"
    );
    assert_eq!(h.socket("icmp", 43003, &a, None), "eperm", "no icmp rule");
    let target = format!("198.18.{x}.2");
    let other = format!("198.18.{x}.3");
    assert_eq!(
        h.socket("icmp", 43002, &a, Some(&target)),
        "ok",
        "echo to the allowed peer"
    );
    assert_ne!(
        h.socket("icmp", 43002, &a, Some(&other)),
        "ok",
        "echo to another peer"
    );
    assert_eq!(
        h.socket("raw", 43001, &a, Some(&other)),
        "ok",
        "raw echo within the /24"
    );
}

#[test]
fn the_egress_backstop_stops_a_socket_connected_before_zt_started() {
    let h = Harness::new(PROBE);
    let srv = Server::loopback(&h.probe, 2);
    let (open, closed) = (srv.ports[0], srv.ports[1]);
    // Both sockets connect before any program is attached: the connect hooks never see them.
    let mut allowed = Held::connect(&h.probe, &h.cgroup.path, lo4(open));
    let mut forbidden = Held::connect(&h.probe, &h.cgroup.path, lo4(closed));
    assert_eq!(allowed.send(), "ok");
    assert_eq!(forbidden.send(), "ok", "before zt: everything passes");
    h.write_policy(
        "p.toml",
        &format!(
            r#"version = 1
[[rule]]
action = "allow"
peer = "127.0.0.1"
ports = [{open}]
proto = "udp"
"#
        ),
    );
    let ztd = h.start_ztd(&[]);
    assert_eq!(allowed.send(), "ok", "the allowed peer is still reachable");
    assert_eq!(
        forbidden.send(),
        "eperm",
        "the backstop drops the forbidden peer"
    );
    ztd.wait_line(
        &["deny", "skb_egress", &format!("127.0.0.1:{closed}")],
        Duration::from_secs(5),
    )
    .unwrap_or_else(|| panic!("no backstop event:\n{}", ztd.lines().join("\n")));
}

#[test]
fn a_socket_passed_over_scm_rights_is_judged_for_the_process_using_it() {
    let h = Harness::new(PROBE);
    let srv = Server::loopback(&h.probe, 2);
    let (mine, theirs) = (srv.ports[0], srv.ports[1]);
    // root may send anywhere on loopback; uid 44001 only to `mine`.
    h.write_policy(
        "p.toml",
        &format!(
            r#"version = 1
[identity.root]
uid = 0

[identity.restricted]
uid = 44001

[[rule]]
action = "allow"
identity = "root"
peer = "127.0.0.1"
proto = "udp"

[[rule]]
action = "allow"
identity = "restricted"
peer = "127.0.0.1"
ports = [{mine}]
proto = "udp"
"#
        ),
    );
    let _ztd = h.start_ztd(&[]);
    let pass = |port: u16| {
        let cg = h.cgroup.path.display().to_string();
        let out = std::process::Command::new(&h.probe)
            .args([
                "pass-fd",
                "--addr",
                &lo4(port).to_string(),
                "--cgroup",
                &cg,
                "--to-uid",
                "44001",
            ])
            .output()
            .expect("pass-fd");
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    };
    assert_eq!(
        pass(mine),
        "ok",
        "the receiver may use the passed socket where it may go"
    );
    assert_eq!(
        pass(theirs),
        "eperm",
        "but not where only the sender may go"
    );
}
