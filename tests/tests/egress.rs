//! Egress enforcement against the real kernel: every denial is paired with a positive
//! control — the same call through the same harness, succeeding where policy allows it.

use std::{net::SocketAddr, time::Duration};

use zt_integration::{Call, Harness, NetPair, Server};

const PROBE: &str = env!("CARGO_BIN_EXE_zt-probe");

fn lo4(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

fn lo6(port: u16) -> SocketAddr {
    format!("[::1]:{port}").parse().expect("addr")
}

#[test]
fn exe_identity_admits_only_the_pinned_binary() {
    let h = Harness::new(PROBE);
    let srv = Server::loopback(&h.probe, 1);
    let port = srv.ports[0];
    h.write_policy(
        "p.toml",
        &format!(
            r#"version = 1
[identity.probe]
exe = "{}"

[[rule]]
action = "allow"
identity = "probe"
peer = "127.0.0.1/32"
ports = [{port}]
proto = "tcp"
"#,
            h.probe.display()
        ),
    );
    let ztd = h.start_ztd(&[]);

    assert_eq!(
        h.call("tcp", lo4(port)),
        "ok",
        "the pinned binary is allowed"
    );
    let dir = tempfile::tempdir().expect("tempdir");
    let copy = dir.path().join("zt-probe-copy");
    std::fs::copy(&h.probe, &copy).expect("copy probe");
    let copied = h.probe_call(
        Call::new("tcp", lo4(port))
            .cgroup(&h.cgroup.path)
            .exe(&copy),
    );
    assert_eq!(
        copied, "eperm",
        "a copy of the binary is another file: denied"
    );

    let line = ztd
        .wait_line(
            &["deny", "connect4", "zt-probe-copy"],
            Duration::from_secs(5),
        )
        .unwrap_or_else(|| panic!("no deny event; ztd said:\n{}", ztd.lines().join("\n")));
    assert!(line.contains(&format!("127.0.0.1:{port}/tcp")), "{line}");
    assert!(line.contains("rule=default"), "{line}");
}

#[test]
fn uid_and_gid_identities_use_the_ids_the_kernel_reports() {
    let h = Harness::new(PROBE);
    let srv = Server::loopback(&h.probe, 1);
    let port = srv.ports[0];
    h.write_policy(
        "p.toml",
        &format!(
            r#"version = 1
[identity.svc_user]
uid = 41001

[identity.svc_group]
gid = 42002

[[rule]]
action = "allow"
identity = "svc_user"
peer = "127.0.0.1"
ports = [{port}]

[[rule]]
action = "allow"
identity = "svc_group"
peer = "127.0.0.1"
ports = [{port}]
"#
        ),
    );
    let _ztd = h.start_ztd(&[]);
    let call = || Call::new("tcp", lo4(port)).cgroup(&h.cgroup.path);
    assert_eq!(
        h.probe_call(call().uid(41001).gid(50000)),
        "ok",
        "allowed uid"
    );
    assert_eq!(
        h.probe_call(call().uid(41002).gid(50000)),
        "eperm",
        "other uid"
    );
    assert_eq!(
        h.probe_call(call().uid(50000).gid(42002)),
        "ok",
        "allowed gid"
    );
    assert_eq!(
        h.probe_call(call().uid(50000).gid(42003)),
        "eperm",
        "other gid"
    );
}

#[test]
fn cgroup_identity_matches_its_descendants_only() {
    let h = Harness::new(PROBE);
    let srv = Server::loopback(&h.probe, 1);
    let port = srv.ports[0];
    let allowed = h.cgroup.child("allowed/worker");
    let other = h.cgroup.child("other");
    h.write_policy(
        "p.toml",
        &format!(
            r#"version = 1
[identity.job]
cgroup = "{}"

[[rule]]
action = "allow"
identity = "job"
peer = "127.0.0.1/32"
ports = [{port}]
proto = "tcp"
"#,
            h.cgroup.child_rel("allowed")
        ),
    );
    let _ztd = h.start_ztd(&[]);
    let from = |cg: &std::path::Path| h.probe_call(Call::new("tcp", lo4(port)).cgroup(cg));
    assert_eq!(
        from(&allowed),
        "ok",
        "a descendant of the identity's cgroup"
    );
    assert_eq!(from(&other), "eperm", "a sibling cgroup");
    assert_eq!(from(&h.cgroup.path), "eperm", "the parent cgroup");
}

#[test]
fn cidr_port_range_and_protocol_across_namespaces() {
    let h = Harness::new(PROBE);
    let net = NetPair::new();
    let _srv = Server::start(
        &h.probe,
        &["0.0.0.0", "::"],
        &[8050, 8200],
        Some(&net.path_b()),
    );
    h.write_policy(
        "networks.toml",
        &format!(
            r#"version = 1
[network.lab]
cidrs = ["198.18.{x}.0/24", "fd00:5a:{x}::/64"]
"#,
            x = net.x
        ),
    );
    h.write_policy(
        "rules.toml",
        r#"version = 1
[[rule]]
action = "allow"
peer = "lab"
ports = ["8000-8100"]
proto = "tcp"
"#,
    );
    let _ztd = h.start_ztd(&[]);
    let call = |proto: &str, addr| {
        h.probe_call(
            Call::new(proto, addr)
                .cgroup(&h.cgroup.path)
                .netns(&net.path_a()),
        )
    };
    assert_eq!(
        call("tcp", net.b_addr("main", 8050)),
        "ok",
        "in CIDR, in range"
    );
    assert_eq!(
        call("tcp", net.b_addr("same-net", 8050)),
        "ok",
        "other host, same CIDR"
    );
    assert_eq!(call("tcp", net.b_addr("v6", 8050)), "ok", "IPv6 CIDR");
    assert_eq!(
        call("tcp", net.b_addr("main", 8200)),
        "eperm",
        "port out of range"
    );
    assert_eq!(
        call("tcp", net.b_addr("other-net", 8050)),
        "eperm",
        "address outside the CIDR"
    );
    assert_eq!(
        call("udp", net.b_addr("main", 8050)),
        "eperm",
        "proto udp not allowed"
    );
    assert_eq!(
        call("tcp", net.b_addr("v6", 8200)),
        "eperm",
        "IPv6, port out of range"
    );
}

#[test]
fn ipv6_and_ipv4_mapped_ipv6_are_judged_by_the_real_address() {
    let h = Harness::new(PROBE);
    let srv = Server::loopback(&h.probe, 2);
    let (open, closed) = (srv.ports[0], srv.ports[1]);
    h.write_policy(
        "p.toml",
        &format!(
            r#"version = 1
[[rule]]
action = "allow"
peer = "127.0.0.1"
ports = [{open}]

[[rule]]
action = "allow"
peer = "::1/128"
ports = [{open}]
"#
        ),
    );
    let _ztd = h.start_ztd(&[]);
    let call = |c: Call| h.probe_call(c.cgroup(&h.cgroup.path));
    assert_eq!(call(Call::new("tcp", lo6(open))), "ok", "IPv6 allowed");
    assert_eq!(call(Call::new("tcp", lo6(closed))), "eperm", "IPv6 denied");
    assert_eq!(
        call(Call::new("tcp", lo4(open)).mapped()),
        "ok",
        "::ffff:127.0.0.1 judged as IPv4"
    );
    assert_eq!(
        call(Call::new("tcp", lo4(closed)).mapped()),
        "eperm",
        "mapped, port denied"
    );
    assert_eq!(
        call(Call::new("udp", lo4(open)).mapped().unconnected()),
        "ok",
        "mapped sendto"
    );
    assert_eq!(
        call(Call::new("udp", lo4(closed)).mapped().unconnected()),
        "eperm",
        "mapped sendto, port denied"
    );
}

#[test]
fn connected_and_unconnected_udp_are_both_judged() {
    let h = Harness::new(PROBE);
    let srv = Server::loopback(&h.probe, 2);
    let (open, closed) = (srv.ports[0], srv.ports[1]);
    h.write_policy(
        "p.toml",
        &format!(
            r#"version = 1
[[rule]]
action = "allow"
peer = "127.0.0.0/8"
ports = [{open}]
proto = "udp"
"#
        ),
    );
    let _ztd = h.start_ztd(&[]);
    let call = |c: Call| h.probe_call(c.cgroup(&h.cgroup.path));
    assert_eq!(
        call(Call::new("udp", lo4(open))),
        "ok",
        "connected UDP allowed"
    );
    assert_eq!(
        call(Call::new("udp", lo4(closed))),
        "eperm",
        "connected UDP denied"
    );
    assert_eq!(
        call(Call::new("udp", lo4(open)).unconnected()),
        "ok",
        "sendto allowed"
    );
    assert_eq!(
        call(Call::new("udp", lo4(closed)).unconnected()),
        "eperm",
        "sendto denied"
    );
    assert_eq!(
        call(Call::new("udp", lo6(open)).unconnected()),
        "eperm",
        "IPv6 not in the rule"
    );
    assert_eq!(
        call(Call::new("tcp", lo4(open))),
        "eperm",
        "tcp not in the rule"
    );
}

#[test]
fn a_matching_deny_wins_over_any_allow() {
    let h = Harness::new(PROBE);
    let srv = Server::loopback(&h.probe, 2);
    let (open, blocked) = (srv.ports[0], srv.ports[1]);
    h.write_policy(
        "p.toml",
        &format!(
            r#"version = 1
[[rule]]
action = "allow"
peer = "127.0.0.0/8"

[[rule]]
action = "deny"
peer = "127.0.0.1/32"
ports = [{blocked}]
proto = "tcp"
"#
        ),
    );
    let _ztd = h.start_ztd(&[]);
    assert_eq!(h.call("tcp", lo4(open)), "ok", "allowed by the broad rule");
    assert_eq!(
        h.call("tcp", lo4(blocked)),
        "eperm",
        "the narrower deny wins"
    );
    assert_eq!(h.call("udp", lo4(blocked)), "ok", "the deny is tcp only");
}

#[test]
fn processes_outside_the_guarded_cgroup_are_unaffected() {
    let h = Harness::new(PROBE);
    let srv = Server::loopback(&h.probe, 1);
    let port = srv.ports[0];
    h.write_policy(
        "p.toml",
        r#"version = 1
[[rule]]
action = "allow"
peer = "192.0.2.1"
"#,
    );
    let _ztd = h.start_ztd(&[]);
    assert_eq!(
        h.call("tcp", lo4(port)),
        "eperm",
        "inside the guarded cgroup: default deny"
    );
    assert_eq!(
        h.probe_call(Call::new("tcp", lo4(port))),
        "ok",
        "the same call from outside the cgroup"
    );
}

#[test]
fn global_audit_mode_reports_instead_of_denying() {
    let h = Harness::new(PROBE);
    let srv = Server::loopback(&h.probe, 1);
    let port = srv.ports[0];
    h.write_policy("p.toml", "version = 1\n");
    let ztd = h.start_ztd(&["--mode", "audit"]);
    assert_eq!(h.call("tcp", lo4(port)), "ok", "audit mode lets it through");
    ztd.wait_line(
        &["audit", "connect4", &format!("127.0.0.1:{port}")],
        Duration::from_secs(5),
    )
    .unwrap_or_else(|| panic!("no audit event:\n{}", ztd.lines().join("\n")));
    let st = ztd.status();
    assert_eq!(st.mode, "audit");
    assert!(st.decisions.audited >= 1, "{:?}", st.decisions);
}

#[test]
fn audit_file_reports_its_denials_while_enforce_files_enforce() {
    let h = Harness::new(PROBE);
    let srv = Server::loopback(&h.probe, 2);
    let (a, b) = (srv.ports[0], srv.ports[1]);
    h.write_policy(
        "a-audit.toml",
        &format!(
            r#"version = 1
mode = "audit"
[[rule]]
action = "deny"
peer = "127.0.0.1"
ports = [{a}]
"#
        ),
    );
    h.write_policy(
        "b-enforce.toml",
        &format!(
            r#"version = 1
[[rule]]
action = "allow"
peer = "127.0.0.1"
ports = [{a}]
"#
        ),
    );
    let ztd = h.start_ztd(&[]);
    assert_eq!(
        h.call("tcp", lo4(a)),
        "ok",
        "the audit-mode deny is reported, not enforced"
    );
    assert_eq!(
        h.call("tcp", lo4(b)),
        "eperm",
        "default deny still enforced"
    );
    ztd.wait_line(
        &["audit", &format!("127.0.0.1:{a}")],
        Duration::from_secs(5),
    )
    .unwrap_or_else(|| panic!("no audit event:\n{}", ztd.lines().join("\n")));
}

#[test]
fn a_hundred_thousand_rules_load_and_decide() {
    let h = Harness::new(PROBE);
    let srv = Server::loopback(&h.probe, 2);
    let (open, closed) = (srv.ports[0], srv.ports[1]);
    let mut text = String::from("version = 1\n");
    // 99,999 rules for addresses in 10.0.0.0/8, each its own port, then the one we use.
    for i in 0..99_999u32 {
        let port = 1 + i % 60_000;
        text.push_str(&format!(
            "[[rule]]\naction = \"allow\"\npeer = \"10.{}.{}.{}\"\nports = [{port}]\nproto = \"tcp\"\n",
            (i >> 16) & 0xff,
            (i >> 8) & 0xff,
            i & 0xff
        ));
    }
    text.push_str(&format!(
        "[[rule]]\naction = \"allow\"\npeer = \"127.0.0.1\"\nports = [{open}]\nproto = \"tcp\"\n"
    ));
    h.write_policy("big.toml", &text);
    let ztd = h.start_ztd(&[]);
    assert_eq!(ztd.status().rules, 100_000);
    assert_eq!(h.call("tcp", lo4(open)), "ok", "the 100,000th rule allows");
    assert_eq!(
        h.call("tcp", lo4(closed)),
        "eperm",
        "anything else is denied"
    );
}
