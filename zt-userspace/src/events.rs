//! Decision events from the kernel ring buffer, turned into lines a person can scan.
//! (The full event pipeline — history, filters, JSON, metrics — builds on this.)

use std::{
    collections::HashMap,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

use zt_common::{DecisionEvent, Hook, Verdict};

/// Wall-clock nanoseconds minus CLOCK_MONOTONIC nanoseconds, to date kernel timestamps.
pub fn monotonic_to_realtime_offset() -> i128 {
    let now = |clock| {
        let mut ts = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // SAFETY: ts is a valid out-pointer.
        unsafe { libc::clock_gettime(clock, &mut ts) };
        ts.tv_sec as i128 * 1_000_000_000 + ts.tv_nsec as i128
    };
    now(libc::CLOCK_REALTIME) - now(libc::CLOCK_MONOTONIC)
}

/// `YYYY-MM-DDTHH:MM:SS.mmmZ` for nanoseconds since the epoch.
pub fn rfc3339(ns: i128) -> String {
    let secs = ns.div_euclid(1_000_000_000);
    let millis = ns.rem_euclid(1_000_000_000) / 1_000_000;
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    // Civil-from-days (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i128::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{millis:03}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// Parse a ring buffer record (checks the header's kind and layout version).
pub fn parse(bytes: &[u8]) -> Option<DecisionEvent> {
    DecisionEvent::from_bytes(bytes)
}

fn addr(family: u8, bytes: &[u8; 16]) -> IpAddr {
    if family == 4 {
        IpAddr::V4(Ipv4Addr::new(bytes[0], bytes[1], bytes[2], bytes[3]))
    } else {
        IpAddr::V6(Ipv6Addr::from(*bytes))
    }
}

pub fn peer(ev: &DecisionEvent) -> IpAddr {
    addr(ev.family, &ev.peer_addr)
}

/// The local address, if the kernel knew it.
pub fn local(ev: &DecisionEvent) -> Option<IpAddr> {
    (ev.local_addr != [0; 16]).then(|| addr(ev.family, &ev.local_addr))
}

pub fn proto_name(code: u8) -> &'static str {
    match code {
        0 => "tcp",
        1 => "udp",
        3 => "icmp",
        _ => "other",
    }
}

pub fn verdict_name(code: u8) -> &'static str {
    match Verdict::from_code(code) {
        Some(Verdict::Allow) => "allow",
        Some(Verdict::Deny) => "deny",
        Some(Verdict::Audit) => "audit",
        None => "?",
    }
}

/// The executable path of a process, read while it (probably) still runs.
pub fn exe_path(tgid: u32, cache: &mut HashMap<u32, String>) -> String {
    if let Some(p) = cache.get(&tgid) {
        return p.clone();
    }
    let path = std::fs::read_link(format!("/proc/{tgid}/exe"))
        .map(|p| p.display().to_string())
        .unwrap_or_else(|_| "?".to_string());
    if cache.len() > 4096 {
        cache.clear();
    }
    cache.insert(tgid, path.clone());
    path
}

/// One line per event.
pub fn format_line(ev: &DecisionEvent, offset_ns: i128, exe: &str, rule: &str) -> String {
    let comm_len = ev
        .comm
        .iter()
        .position(|&b| b == 0)
        .unwrap_or(ev.comm.len());
    let comm = String::from_utf8_lossy(&ev.comm[..comm_len]);
    let hook = Hook::from_code(ev.hook).map(Hook::name).unwrap_or("?");
    let addr = match peer(ev) {
        IpAddr::V4(a) => format!("{a}:{}", ev.peer_port),
        IpAddr::V6(a) => format!("[{a}]:{}", ev.peer_port),
    };
    let proto = proto_name(ev.proto);
    // Which way the decision looked: out to a peer, in from a peer to a local port, a bind
    // of a local address, or the creation of a socket.
    let local_end = match local(ev) {
        Some(IpAddr::V6(a)) => format!("[{a}]:{}", ev.local_port),
        Some(a) => format!("{a}:{}", ev.local_port),
        None => format!("port {}", ev.local_port),
    };
    let peer = match Hook::from_code(ev.hook) {
        Some(Hook::SkbIngress | Hook::Xdp) => format!("<- {addr} to {local_end}/{proto}"),
        Some(Hook::Bind4 | Hook::Bind6) => format!("bind {local_end}/{proto}"),
        Some(Hook::SockCreate) => format!("socket {proto}"),
        // `family` is the address family number here (17: AF_PACKET).
        Some(Hook::LsmSocketCreate) => format!("socket family {}", ev.family),
        _ => format!("-> {addr}/{proto}"),
    };
    format!(
        "{} {:<5} {:<11} pid={} uid={} gid={} exe={} comm={} {} rule={} gen={}",
        rfc3339(ev.ktime_ns as i128 + offset_ns),
        verdict_name(ev.verdict),
        hook,
        ev.tgid,
        ev.uid,
        ev.gid,
        crate::trust::escape(exe),
        crate::trust::escape(&comm),
        peer,
        crate::trust::escape(rule),
        ev.generation
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_formats_known_instants() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(
            rfc3339(1_795_737_600_123_000_000),
            "2026-11-27T00:00:00.123Z"
        );
    }

    #[test]
    fn short_records_are_refused() {
        assert!(parse(&[0u8; 8]).is_none());
        let mut ev = DecisionEvent::default();
        ev.header.kind = zt_common::EVENT_DECISION;
        ev.header.version = zt_common::EVENT_VERSION;
        assert!(parse(&ev.to_bytes()).is_some());
        assert!(parse(&[0u8; DecisionEvent::SIZE]).is_none(), "no header");
    }
}
