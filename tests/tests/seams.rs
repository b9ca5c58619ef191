//! Seams an adversary would use between zt's hooks (issue 12, items 2-5), each closed and
//! proven against the real kernel with a positive control in the same test:
//!
//! - a listening grant is not an egress grant: a socket bound to a granted port reaches only
//!   what the egress rules allow, or answers what it received (accepted TCP connections, UDP
//!   peers that sent first);
//! - a packet zt cannot parse to the end (too many IPv6 extension headers) is dropped;
//! - sends on a connected UDP socket that carry a control message are judged by the socket's
//!   connected peer;
//! - the per-socket verdict cache keys on the address family (an IPv4 peer and an IPv6 peer
//!   with the same leading bytes are two peers).

use std::{net::SocketAddr, path::Path, time::Duration};

use zt_integration::{Call, Harness, Held, NetPair, Receiver, Server};

const PROBE: &str = env!("CARGO_BIN_EXE_zt-probe");

/// A port that is free now (bound and released).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

fn lo(v6: bool, port: u16) -> SocketAddr {
    if v6 {
        SocketAddr::from((std::net::Ipv6Addr::LOCALHOST, port))
    } else {
        SocketAddr::from(([127, 0, 0, 1], port))
    }
}

/// `zt-probe bound`: from a socket bound to `port` (a granted one), reach `addr` with `op`.
fn bound(h: &Harness, proto: &str, port: u16, addr: SocketAddr, op: &str) -> String {
    let out = std::process::Command::new(&h.probe)
        .args([
            "bound",
            "--proto",
            proto,
            "--port",
            &port.to_string(),
            "--addr",
            &addr.to_string(),
            "--op",
            op,
            "--cgroup",
        ])
        .arg(&h.cgroup.path)
        .output()
        .expect("run zt-probe bound");
    let text = String::from_utf8_lossy(&out.stdout).trim().to_string();
    if text.is_empty() {
        format!("error:no output: {}", String::from_utf8_lossy(&out.stderr))
    } else {
        text
    }
}

/// Ingress grants on `granted` (tcp and udp, from anyone) and egress to the loopback
/// server port `open` only.
fn listen_policy(granted: &[u16], open: u16) -> String {
    let ports = granted
        .iter()
        .map(|p| p.to_string())
        .collect::<Vec<_>>()
        .join(", ");
    format!(
        r#"version = 1
[network.loopback]
cidrs = ["127.0.0.1", "::1"]

[[rule]]
action = "allow"
direction = "ingress"
peer = "any"
ports = [{ports}]

[[rule]]
action = "allow"
peer = "loopback"
ports = [{open}]
"#
    )
}

#[test]
fn a_udp_listening_grant_is_not_an_egress_grant() {
    let h = Harness::new(PROBE);
    let targets = Server::loopback(&h.probe, 2);
    let (open, closed) = (targets.ports[0], targets.ports[1]);
    let (serve, attack, early) = (free_port(), free_port(), free_port());
    // Sockets that escaped the call hooks: bound to a granted port and connected before zt
    // started (the backstop is all that sees them).
    let held = |to: SocketAddr| Held::connect_with(&h.probe, &h.cgroup.path, to, early, "none");
    let mut early_closed = held(lo(false, closed));
    let mut early_open = held(lo(false, open));
    let mut early_closed6 = held(lo(true, closed));
    assert_eq!(early_closed.send(), "ok", "before zt everything passes");
    assert_eq!(
        early_closed6.send(),
        "ok",
        "before zt everything passes (v6)"
    );
    h.write_policy("p.toml", &listen_policy(&[serve, attack, early], open));
    let ztd = h.start_ztd(&[]);

    for v6 in [false, true] {
        for op in ["sendto", "connect"] {
            assert_eq!(
                bound(&h, "udp", attack, lo(v6, closed), op),
                "eperm",
                "udp {op} from the granted port to a peer no egress rule allows (v6: {v6})"
            );
            assert_eq!(
                bound(&h, "udp", attack, lo(v6, open), op),
                "ok",
                "the same {op} to a peer an egress rule allows (v6: {v6})"
            );
        }
    }
    ztd.wait_line(
        &["deny", "sendmsg4", &format!("127.0.0.1:{closed}")],
        Duration::from_secs(5),
    )
    .unwrap_or_else(|| panic!("no deny event:\n{}", ztd.lines().join("\n")));

    // The backstop: no reply record for these peers, so the egress rules judge.
    assert_eq!(early_closed.send(), "eperm", "backstop, v4");
    assert_eq!(early_closed6.send(), "eperm", "backstop, v6");
    assert_eq!(early_open.send(), "ok", "backstop positive control");

    // The server on the granted port still answers its clients (replies to peers that sent
    // to it first), in both families.
    let _srv = Server::start_in(
        &h.probe,
        &["127.0.0.1", "::1"],
        &[serve],
        None,
        Some(&h.cgroup.path),
    );
    for v6 in [false, true] {
        assert_eq!(
            h.probe_call(Call::new("udp", lo(v6, serve))),
            "ok",
            "an unguarded client gets the guarded server's answer (v6: {v6})"
        );
        assert_eq!(
            h.probe_call(Call::new("udp", lo(v6, serve)).unconnected()),
            "ok",
            "unconnected client (v6: {v6})"
        );
    }
    let st = ztd.status();
    assert!(
        st.decisions.replies_allowed > 0 && st.decisions.replies_recorded > 0,
        "replies counted: {:?}",
        st.decisions
    );
}

#[test]
fn a_tcp_listening_grant_is_not_an_egress_grant() {
    let h = Harness::new(PROBE);
    let targets = Server::loopback(&h.probe, 2);
    let (open, closed) = (targets.ports[0], targets.ports[1]);
    let (serve, attack) = (free_port(), free_port());
    h.write_policy("p.toml", &listen_policy(&[serve, attack], open));
    let ztd = h.start_ztd(&[]);

    for v6 in [false, true] {
        for op in ["connect", "fastopen"] {
            assert_eq!(
                bound(&h, "tcp", attack, lo(v6, closed), op),
                "eperm",
                "tcp {op} from the granted port to a peer no egress rule allows (v6: {v6})"
            );
        }
        assert_eq!(
            bound(&h, "tcp", attack, lo(v6, open), "connect"),
            "ok",
            "the same connect to a peer an egress rule allows (v6: {v6})"
        );
    }
    ztd.wait_line(
        &["deny", "connect6", &format!("{closed}")],
        Duration::from_secs(5),
    )
    .unwrap_or_else(|| panic!("no deny event:\n{}", ztd.lines().join("\n")));

    // The server on the granted port still answers: accepted connections inherit the
    // listener's storage and never opened a connection themselves.
    let _srv = Server::start_in(
        &h.probe,
        &["127.0.0.1", "::1"],
        &[serve],
        None,
        Some(&h.cgroup.path),
    );
    for v6 in [false, true] {
        assert_eq!(
            h.probe_call(Call::new("tcp", lo(v6, serve))),
            "ok",
            "an unguarded client is served over tcp (v6: {v6})"
        );
    }
}

/// Policy for the extension header test: udp `port` may be reached only from `fd00::99`.
fn granted_from_fd00_99(port: u16) -> String {
    format!(
        r#"version = 1
[[rule]]
action = "allow"
direction = "ingress"
peer = "fd00::99"
ports = [{port}]
proto = "udp"
"#
    )
}

/// `zt-probe send-ext6` from `src` to `[::1]:port` inside `netns` (unguarded).
fn send_ext6(h: &Harness, netns: &Path, src: &str, port: u16, ext: u8, payload: &str) {
    let out = std::process::Command::new(&h.probe)
        .args([
            "send-ext6",
            "--src",
            src,
            "--dst",
            "::1",
            "--port",
            &port.to_string(),
            "--ext",
            &ext.to_string(),
            "--payload",
            payload,
            "--netns",
        ])
        .arg(netns)
        .output()
        .expect("run send-ext6");
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "ok",
        "send-ext6 {src} {ext}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn a_packet_zt_cannot_parse_to_the_end_is_dropped() {
    let h = Harness::new(PROBE);
    let net = NetPair::new();
    let port = free_port();
    h.write_policy("p.toml", &granted_from_fd00_99(port));
    let ztd = h.start_ztd(&[]);
    let ns = net.path_b();
    let mut rx = Receiver::start(
        &h.probe,
        SocketAddr::from((std::net::Ipv6Addr::UNSPECIFIED, port)),
        Some(&ns),
        Some(&h.cgroup.path),
    );
    let wait = Duration::from_secs(5);
    let before = ztd.status().decisions.unparsed_dropped;

    // From the denied source: nothing, however many extension headers.
    for ext in [0u8, 5, 7, 9] {
        send_ext6(&h, &ns, "::1", port, ext, &format!("denied{ext}"));
    }
    // The granted source: delivered with 0, 5 and 7 extension headers (parsed to the end).
    for ext in [0u8, 5, 7] {
        let payload = format!("granted{ext}");
        send_ext6(&h, &ns, "fd00::99", port, ext, &payload);
        assert!(
            rx.wait_for(&payload, wait),
            "the granted source with {ext} extension headers is delivered; got {:?}",
            rx.seen()
        );
    }
    // 9 headers: more than zt follows: dropped even from the granted source. The marker
    // after it is sent later on the same path, so once the marker is in, so would it be.
    send_ext6(&h, &ns, "fd00::99", port, 9, "granted9");
    send_ext6(&h, &ns, "fd00::99", port, 0, "marker");
    assert!(rx.wait_for("marker", wait), "marker: {:?}", rx.seen());
    for ext in [0u8, 5, 7, 9] {
        assert!(
            !rx.got(&format!("denied{ext}")),
            "the denied source with {ext} extension headers reached the listener: {:?}",
            rx.seen()
        );
    }
    assert!(
        !rx.got("granted9"),
        "an unparsed chain is dropped: {:?}",
        rx.seen()
    );
    let after = ztd.status().decisions.unparsed_dropped;
    assert!(
        after >= before + 2,
        "the two 9-header datagrams are counted as unparsed drops: {before} -> {after}"
    );
    ztd.wait_line(&["deny", "skb_ingress", "fd00::99"], wait)
        .unwrap_or_else(|| panic!("no unparsed-drop event:\n{}", ztd.lines().join("\n")));
}

#[test]
fn connected_udp_sends_with_control_messages_are_judged_by_the_connected_peer() {
    let h = Harness::new(PROBE);
    let targets = Server::loopback(&h.probe, 2);
    let (open, closed) = (targets.ports[0], targets.ports[1]);
    // Connected before zt: the sends are judged at the sendmsg hook, by the peer.
    let mut early = Vec::new();
    for v6 in [false, true] {
        for cmsg in ["tos", "gso", "pktinfo"] {
            let mut held = Held::connect_with(&h.probe, &h.cgroup.path, lo(v6, closed), 0, cmsg);
            assert_eq!(held.send(), "ok", "before zt ({cmsg}, v6: {v6})");
            early.push((v6, cmsg, held));
        }
    }
    h.write_policy(
        "p.toml",
        &format!(
            r#"version = 1
[network.loopback]
cidrs = ["127.0.0.1", "::1"]

[[rule]]
action = "allow"
peer = "loopback"
ports = [{open}]
proto = "udp"
"#
        ),
    );
    let ztd = h.start_ztd(&[]);
    for v6 in [false, true] {
        for cmsg in ["none", "tos", "gso", "pktinfo"] {
            let mut held = Held::connect_with(&h.probe, &h.cgroup.path, lo(v6, open), 0, cmsg);
            assert_eq!(
                held.send(),
                "ok",
                "a connected send with {cmsg} to an allowed peer (v6: {v6})"
            );
            assert_eq!(held.send(), "ok", "again ({cmsg}, v6: {v6})");
        }
    }
    for (v6, cmsg, held) in &mut early {
        assert_eq!(
            held.send(),
            "eperm",
            "a connected send with {cmsg} to a denied peer (v6: {v6})"
        );
    }
    for hook in ["sendmsg4", "sendmsg6"] {
        ztd.wait_line(
            &["deny", hook, &format!(":{closed}")],
            Duration::from_secs(5),
        )
        .unwrap_or_else(|| {
            panic!(
                "no {hook} deny event naming the connected peer:\n{}",
                ztd.lines().join("\n")
            )
        });
    }
}

#[test]
fn the_socket_cache_tells_an_ipv4_peer_from_an_ipv6_peer_with_the_same_bytes() {
    let h = Harness::new(PROBE);
    let net = NetPair::new();
    let port = free_port();
    // 7f00:1:: is 127.0.0.1 followed by zeros: the same 16 bytes as zt's IPv4 encoding.
    net.add_lo_addr_b("7f00:1::/128");
    net.add_lo_addr_b("fd00:aa::1/128");
    h.write_policy(
        "p.toml",
        &format!(
            r#"version = 1
[network.peers]
cidrs = ["127.0.0.1", "fd00:aa::1"]

[[rule]]
action = "allow"
direction = "ingress"
peer = "peers"
ports = [{port}]
proto = "udp"
"#
        ),
    );
    let _ztd = h.start_ztd(&[]);
    let ns = net.path_b();
    let mut rx = Receiver::start(
        &h.probe,
        SocketAddr::from((std::net::Ipv6Addr::UNSPECIFIED, port)),
        Some(&ns),
        Some(&h.cgroup.path),
    );
    let send = |src: &str, to: SocketAddr, payload: &str| {
        let out = std::process::Command::new(&h.probe)
            .args([
                "send-udp",
                "--src",
                src,
                "--addr",
                &to.to_string(),
                "--payload",
                payload,
                "--netns",
            ])
            .arg(&ns)
            .output()
            .expect("send-udp");
        assert_eq!(
            String::from_utf8_lossy(&out.stdout).trim(),
            "ok",
            "send from {src}"
        );
    };
    let wait = Duration::from_secs(5);
    let v4 = SocketAddr::from(([127, 0, 0, 1], port));
    let v6 = SocketAddr::from((std::net::Ipv6Addr::LOCALHOST, port));
    send("127.0.0.1", v4, "v4-first");
    assert!(
        rx.wait_for("v4-first", wait),
        "allowed v4 peer: {:?}",
        rx.seen()
    );
    // Its verdict is cached now; the IPv6 peer with the same bytes must be judged itself.
    send("7f00:1::", v6, "v6-same-bytes");
    send("fd00:aa::1", v6, "v6-allowed");
    assert!(
        rx.wait_for("v6-allowed", wait),
        "an allowed IPv6 peer reaches the same socket: {:?}",
        rx.seen()
    );
    send("127.0.0.1", v4, "v4-again");
    assert!(rx.wait_for("v4-again", wait), "{:?}", rx.seen());
    assert!(
        !rx.got("v6-same-bytes"),
        "the IPv6 peer rode on the IPv4 peer's cached verdict: {:?}",
        rx.seen()
    );
}
