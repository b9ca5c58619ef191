//! The XDP front door, loader side: `ztd --xdp IFACE` (repeatable) attaches the `xdp_front`
//! program of zt's eBPF object to IFACE. It drops, before the network stack, inbound packets
//! that no ingress rule could allow — sources in host-wide ingress deny lists, and TCP/UDP to
//! ports that no ingress allow rule opens (outside the ephemeral port range) — and malformed
//! headers; everything else goes on to the stack, where the cgroup hooks decide. See the
//! crate docs of `zt-ebpf/src/xdp.rs` for exactly what it drops and why.
//!
//! **Attach.** Native (driver) mode first, generic (skb) mode if the driver cannot
//! ([`XdpModePref::Auto`]); the mode in force is read back from the kernel (rtnetlink
//! `IFLA_XDP`). The bpf_link is pinned as `<bpffs>/links/xdp-<IFACE>`, so the front door
//! outlives `ztd`; a restarted `ztd` adopts it and replaces the program in place
//! (`BPF_LINK_UPDATE`: never detached, never doubled). `ztctl unload` removes the pin, which
//! detaches it.
//!
//! **Maps.** The program reads the policy slots the loader writes (same pinned maps), plus
//! `XDP_STATS` (per-CPU counters per receiving ifindex) and `XDP_EVENT_BUCKET` (event
//! sampling). The object is loaded a second time here against the same pins, so this module
//! needs nothing from [`crate::loader::Loader`] but its [`Layout`].

use std::{
    ffi::CString,
    io,
    os::fd::{AsFd, AsRawFd, BorrowedFd},
    path::{Path, PathBuf},
    time::Duration,
};

use aya::{
    maps::{MapData, PerCpuHashMap},
    programs::{
        links::{FdLink, LinkError},
        ProgramError, TestRun, TestRunOptions, Xdp, XdpMode,
    },
    Ebpf, EbpfLoader,
};
use serde::{Deserialize, Serialize};
use zt_common::{XdpStat, XDP_STAT_COUNT};

use crate::{
    loader::{HookStart, Layout, EBPF_OBJECT},
    sys,
};

/// Name of the XDP program in the eBPF object.
pub const XDP_PROGRAM: &str = "xdp_front";

/// Where the kernel keeps the ephemeral port range (per network namespace; IPv6 uses it too).
pub const PORT_RANGE_SYSCTL: &str = "/proc/sys/net/ipv4/ip_local_port_range";
/// The kernel's default ephemeral range, used when the sysctl cannot be read.
pub const DEFAULT_EPHEMERAL: (u16, u16) = (32768, 60999);

/// The ephemeral port range of this network namespace (`net.ipv4.ip_local_port_range`):
/// the XDP front door lets TCP/UDP to these ports pass (replies to our own connections).
pub fn ephemeral_range() -> (u16, u16) {
    std::fs::read_to_string(PORT_RANGE_SYSCTL)
        .ok()
        .and_then(|text| parse_port_range(&text))
        .unwrap_or(DEFAULT_EPHEMERAL)
}

/// `"32768\t60999\n"` → `(32768, 60999)`.
pub fn parse_port_range(text: &str) -> Option<(u16, u16)> {
    let mut it = text.split_whitespace().map(str::parse::<u16>);
    let low = it.next()?.ok()?;
    let high = it.next()?.ok()?;
    (low >= 1 && low <= high && it.next().is_none()).then_some((low, high))
}

/// The pin of the front door's link on `iface`.
pub fn link_path(layout: &Layout, iface: &str) -> PathBuf {
    layout.links_dir().join(format!("xdp-{iface}"))
}

/// Which XDP mode to attach in.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum XdpModePref {
    /// Native (driver) mode, generic (skb) mode if the driver cannot.
    #[default]
    Auto,
    Driver,
    Skb,
}

impl XdpModePref {
    pub fn as_str(self) -> &'static str {
        match self {
            XdpModePref::Auto => "auto",
            XdpModePref::Driver => "driver",
            XdpModePref::Skb => "skb",
        }
    }

    fn modes(self) -> &'static [(XdpMode, &'static str)] {
        match self {
            XdpModePref::Auto => &[(XdpMode::Driver, "driver"), (XdpMode::Skb, "skb")],
            XdpModePref::Driver => &[(XdpMode::Driver, "driver")],
            XdpModePref::Skb => &[(XdpMode::Skb, "skb")],
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum XdpError {
    #[error("loading zt's eBPF object for XDP failed: {0}")]
    Load(#[from] aya::EbpfError),
    #[error("XDP program {XDP_PROGRAM}: {0}")]
    Program(#[from] ProgramError),
    #[error("--xdp {0}: no such network interface (in ztd's network namespace)")]
    NoInterface(String),
    #[error("--xdp {iface}: attaching XDP failed: {tried}")]
    Attach { iface: String, tried: String },
    #[error("pinned XDP link {path}: {source}")]
    Link { path: PathBuf, source: io::Error },
    #[error("pinned XDP link {path} is attached to another interface (ifindex {found}) than {iface} (ifindex {want}): run `ztctl unload --bpffs {bpffs}` first, or use another --bpffs directory")]
    OtherInterface {
        path: PathBuf,
        iface: String,
        want: u32,
        found: u32,
        bpffs: PathBuf,
    },
    #[error("XDP map {map}: {source}")]
    Map {
        map: &'static str,
        source: aya::maps::MapError,
    },
}

fn link_err(path: &Path) -> impl FnOnce(io::Error) -> XdpError + '_ {
    move |source| XdpError::Link {
        path: path.to_path_buf(),
        source,
    }
}

/// The ifindex of `iface` in this network namespace.
pub fn ifindex(iface: &str) -> Result<u32, XdpError> {
    let name = CString::new(iface).map_err(|_| XdpError::NoInterface(iface.to_string()))?;
    // SAFETY: a valid NUL-terminated string.
    let index = unsafe { libc::if_nametoindex(name.as_ptr()) };
    if index == 0 {
        Err(XdpError::NoInterface(iface.to_string()))
    } else {
        Ok(index)
    }
}

/// Per-reason XDP counters of one interface, summed over CPUs.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct XdpCounters {
    /// Judged and passed (an open port, or an ephemeral one).
    pub passed: u64,
    /// Source in a host-wide ingress deny list.
    pub dropped_deny_list: u64,
    /// TCP/UDP to a port no ingress rule opens, outside the ephemeral range.
    pub dropped_closed_port: u64,
    /// Truncated or inconsistent headers.
    pub dropped_malformed: u64,
    /// IPv6 extension header chains not followed to the transport header.
    #[serde(default)]
    pub dropped_unparsed: u64,
    /// Not judged here (non-IP, ICMP, later fragments, ...): left to the stack.
    pub passed_not_judged: u64,
    /// No readable policy: passed.
    pub no_policy: u64,
    /// Would have been dropped; passed because the deciding policy audits.
    pub audited: u64,
    pub events_sent: u64,
    pub events_lost: u64,
    /// Events left out by sampling.
    pub events_skipped: u64,
}

impl XdpCounters {
    /// From counters indexed by [`XdpStat`].
    pub fn from_raw(raw: &[u64]) -> XdpCounters {
        let at = |s: XdpStat| raw.get(s as usize).copied().unwrap_or(0);
        XdpCounters {
            passed: at(XdpStat::Passed),
            dropped_deny_list: at(XdpStat::DroppedDenyList),
            dropped_closed_port: at(XdpStat::DroppedClosedPort),
            dropped_malformed: at(XdpStat::DroppedMalformed),
            dropped_unparsed: at(XdpStat::DroppedUnparsed),
            passed_not_judged: at(XdpStat::PassedNotJudged),
            no_policy: at(XdpStat::NoPolicy),
            audited: at(XdpStat::Audited),
            events_sent: at(XdpStat::EventSent),
            events_lost: at(XdpStat::EventLost),
            events_skipped: at(XdpStat::EventSkipped),
        }
    }

    /// Packets seen (each is counted under exactly one of these).
    pub fn packets(&self) -> u64 {
        self.passed
            + self.dropped_deny_list
            + self.dropped_closed_port
            + self.dropped_malformed
            + self.dropped_unparsed
            + self.passed_not_judged
            + self.no_policy
            + self.audited
    }
}

/// One interface's front door, as `ztctl status` shows it.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct XdpStatus {
    pub iface: String,
    /// `driver` or `skb` (as the kernel reports it), empty when not attached.
    pub mode: String,
    /// True only if the kernel shows the pinned link's program on the interface.
    pub attached: bool,
    pub prog_id: u32,
    pub counters: XdpCounters,
}

/// What [`XdpFront::attach_or_adopt`] did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct XdpStart {
    pub iface: String,
    pub ifindex: u32,
    pub start: HookStart,
    /// `driver` or `skb`.
    pub mode: String,
    /// Earlier attempts that failed (e.g. driver mode on a driver without native XDP).
    pub fallback: Option<String>,
}

/// The XDP program, loaded against zt's pinned maps.
pub struct XdpFront {
    ebpf: Ebpf,
    layout: Layout,
    /// Interfaces this front door was asked to guard.
    ifaces: Vec<String>,
    /// The ring buffer, once [`XdpFront::drain_events`] took it.
    events: Option<aya::maps::RingBuf<MapData>>,
}

impl XdpFront {
    /// Load the XDP program against the pinned maps under `layout` (creating them if absent).
    pub fn load(layout: &Layout) -> Result<XdpFront, XdpError> {
        let maps_dir = layout.maps_dir();
        std::fs::create_dir_all(&maps_dir).map_err(link_err(&maps_dir))?;
        std::fs::create_dir_all(layout.links_dir()).map_err(link_err(&layout.links_dir()))?;
        let mut ebpf = EbpfLoader::new()
            .default_map_pin_directory(&maps_dir)
            .load(EBPF_OBJECT)?;
        program_mut(&mut ebpf)?.load()?;
        Ok(XdpFront {
            ebpf,
            layout: layout.clone(),
            ifaces: Vec::new(),
            events: None,
        })
    }

    /// Attach the front door to `iface`, or adopt its pinned link by replacing the program
    /// in place. A pinned link whose interface is gone is replaced by a new one.
    pub fn attach_or_adopt(
        &mut self,
        iface: &str,
        pref: XdpModePref,
    ) -> Result<XdpStart, XdpError> {
        let index = ifindex(iface)?;
        let path = link_path(&self.layout, iface);
        if !self.ifaces.iter().any(|i| i == iface) {
            self.ifaces.push(iface.to_string());
        }
        if path.exists() {
            let link_fd = sys::obj_get(&path).map_err(link_err(&path))?;
            let info = link_info(link_fd.as_fd()).map_err(link_err(&path))?;
            if info.ifindex == index {
                let prog = program_mut(&mut self.ebpf)?;
                let prog_fd = prog.fd()?;
                sys::link_update(link_fd.as_fd(), prog_fd.as_fd()).map_err(link_err(&path))?;
                let new_id = link_info(link_fd.as_fd()).map_err(link_err(&path))?.prog_id;
                let mode = query_iface(index)
                    .ok()
                    .and_then(|q| q.mode_of(new_id))
                    .unwrap_or("")
                    .to_string();
                return Ok(XdpStart {
                    iface: iface.to_string(),
                    ifindex: index,
                    start: HookStart::Replaced,
                    mode,
                    fallback: None,
                });
            }
            if info.ifindex != 0 {
                return Err(XdpError::OtherInterface {
                    path,
                    iface: iface.to_string(),
                    want: index,
                    found: info.ifindex,
                    bpffs: self.layout.bpffs.clone(),
                });
            }
            // The interface behind the pinned link is gone: the link is defunct.
            std::fs::remove_file(&path).map_err(link_err(&path))?;
        }

        let mut tried = Vec::new();
        for (mode, name) in pref.modes() {
            match attach_pinned(&mut self.ebpf, index, *mode, &path) {
                Ok(()) => {
                    return Ok(XdpStart {
                        iface: iface.to_string(),
                        ifindex: index,
                        start: HookStart::Attached,
                        mode: name.to_string(),
                        fallback: (!tried.is_empty()).then(|| tried.join("; ")),
                    })
                }
                Err(e) => tried.push(format!("{name} mode: {e}")),
            }
        }
        Err(XdpError::Attach {
            iface: iface.to_string(),
            tried: tried.join("; "),
        })
    }

    /// The interfaces this front door guards, as the kernel reports them.
    pub fn status(&self) -> Vec<XdpStatus> {
        self.ifaces
            .iter()
            .map(|iface| status_of(&self.layout, iface, self.counters_of(iface)))
            .collect()
    }

    fn counters_of(&self, iface: &str) -> XdpCounters {
        ifindex(iface)
            .ok()
            .and_then(|i| self.counters(i).ok())
            .unwrap_or_default()
    }

    /// Counters of packets received on `ifindex` (summed over CPUs).
    pub fn counters(&self, ifindex: u32) -> Result<XdpCounters, XdpError> {
        let map = self.stats_map()?;
        match map.get(&ifindex, 0) {
            Ok(per_cpu) => Ok(sum(per_cpu.iter())),
            Err(aya::maps::MapError::KeyNotFound) => Ok(XdpCounters::default()),
            Err(source) => Err(XdpError::Map {
                map: "XDP_STATS",
                source,
            }),
        }
    }

    /// Counters of every interface together (test runs count under the loopback ifindex of
    /// the caller's namespace).
    pub fn total_counters(&self) -> Result<XdpCounters, XdpError> {
        let map = self.stats_map()?;
        let mut all = Vec::new();
        for item in map.iter() {
            let (_, per_cpu) = item.map_err(|source| XdpError::Map {
                map: "XDP_STATS",
                source,
            })?;
            all.extend(per_cpu.iter().copied());
        }
        Ok(sum(all.iter()))
    }

    fn stats_map(&self) -> Result<PerCpuHashMap<&MapData, u32, Counters>, XdpError> {
        let map = self.ebpf.map("XDP_STATS").ok_or(XdpError::Map {
            map: "XDP_STATS",
            source: aya::maps::MapError::InvalidName {
                name: "XDP_STATS".to_string(),
            },
        })?;
        PerCpuHashMap::try_from(map).map_err(|source| XdpError::Map {
            map: "XDP_STATS",
            source,
        })
    }

    /// Run the program once on `frame` (`BPF_PROG_TEST_RUN`, no interface involved);
    /// returns the XDP action (1 = drop, 2 = pass).
    pub fn test_run(&self, frame: &[u8]) -> Result<u32, XdpError> {
        Ok(self.run(frame, 1)?.0)
    }

    /// Run the program `repeat` times on `frame`; returns the action and the kernel's mean
    /// time per run.
    pub fn run(&self, frame: &[u8], repeat: u32) -> Result<(u32, Duration), XdpError> {
        let prog: &Xdp = self
            .ebpf
            .program(XDP_PROGRAM)
            .ok_or(ProgramError::NotLoaded)?
            .try_into()?;
        let result = prog.test_run(TestRunOptions {
            data_in: Some(frame),
            repeat: repeat.max(1),
            ..TestRunOptions::default()
        })?;
        Ok((result.return_value, result.duration))
    }

    /// The event ring buffer (shared with the loader through its pin), once.
    pub fn take_events(&mut self) -> Option<aya::maps::Map> {
        self.ebpf.take_map("EVENTS")
    }

    /// Every decision event waiting in the ring buffer, read here (tests and tools; the
    /// daemon reads the ring through the loader). Takes the ring on first use.
    pub fn drain_events(&mut self) -> Vec<zt_common::DecisionEvent> {
        if self.events.is_none() {
            self.events = self
                .take_events()
                .and_then(|m| aya::maps::RingBuf::try_from(m).ok());
        }
        let mut out = Vec::new();
        if let Some(ring) = self.events.as_mut() {
            while let Some(item) = ring.next() {
                out.extend(crate::events::parse(&item));
            }
        }
        out
    }

    /// The program's id in the kernel.
    pub fn prog_id(&self) -> Result<u32, XdpError> {
        let prog: &Xdp = self
            .ebpf
            .program(XDP_PROGRAM)
            .ok_or(ProgramError::NotLoaded)?
            .try_into()?;
        Ok(prog.info()?.id())
    }
}

type Counters = [u64; XDP_STAT_COUNT as usize];

fn sum<'a>(per_cpu: impl Iterator<Item = &'a Counters>) -> XdpCounters {
    let mut total = [0u64; XDP_STAT_COUNT as usize];
    for counters in per_cpu {
        for (t, c) in total.iter_mut().zip(counters) {
            *t += c;
        }
    }
    XdpCounters::from_raw(&total)
}

fn program_mut(ebpf: &mut Ebpf) -> Result<&mut Xdp, ProgramError> {
    ebpf.program_mut(XDP_PROGRAM)
        .ok_or(ProgramError::NotLoaded)?
        .try_into()
}

/// Attach by bpf_link in `mode` and pin the link at `path`; nothing stays attached on error.
fn attach_pinned(ebpf: &mut Ebpf, ifindex: u32, mode: XdpMode, path: &Path) -> io::Result<()> {
    let prog = program_mut(ebpf).map_err(io::Error::other)?;
    let id = prog
        .attach_to_if_index(ifindex, mode)
        .map_err(io::Error::other)?;
    let link = prog.take_link(id).map_err(io::Error::other)?;
    // A netlink attachment (kernels without XDP bpf_links) cannot be pinned: dropping it
    // detaches it again.
    let fd_link: FdLink = link
        .try_into()
        .map_err(|e: LinkError| io::Error::other(format!("not a bpf_link: {e}")))?;
    fd_link
        .pin(path)
        .map(|_| ())
        .map_err(|e| io::Error::other(format!("pinning {}: {e}", path.display())))
}

/// The interfaces with a pinned front-door link under `layout`.
pub fn pinned_ifaces(layout: &Layout) -> Vec<String> {
    let Ok(entries) = std::fs::read_dir(layout.links_dir()) else {
        return Vec::new();
    };
    let mut out: Vec<String> = entries
        .flatten()
        .filter_map(|e| {
            e.file_name()
                .to_str()
                .and_then(|n| n.strip_prefix("xdp-"))
                .map(str::to_string)
        })
        .collect();
    out.sort();
    out
}

/// Front doors pinned under `layout` for interfaces not in `keep` (an earlier run's `--xdp`).
/// Pins of defunct links (their interface is gone) are removed; live ones are returned and
/// left attached: only `ztctl unload` (or removing the pin) detaches a front door.
pub fn others(layout: &Layout, keep: &[String]) -> Vec<String> {
    pinned_ifaces(layout)
        .into_iter()
        .filter(|iface| !keep.contains(iface))
        .filter(|iface| {
            let path = link_path(layout, iface);
            let defunct = sys::obj_get(&path)
                .and_then(|fd| link_info(fd.as_fd()))
                .is_ok_and(|info| info.ifindex == 0);
            !(defunct && std::fs::remove_file(&path).is_ok())
        })
        .collect()
}

/// Status of the front door on `iface` from the pins and the kernel alone.
pub fn status_of(layout: &Layout, iface: &str, counters: XdpCounters) -> XdpStatus {
    let path = link_path(layout, iface);
    let prog_id = sys::obj_get(&path)
        .and_then(|fd| link_info(fd.as_fd()))
        .map(|i| i.prog_id)
        .unwrap_or(0);
    let mode = ifindex(iface)
        .ok()
        .and_then(|i| query_iface(i).ok())
        .and_then(|q| q.mode_of(prog_id))
        .filter(|_| prog_id != 0);
    XdpStatus {
        iface: iface.to_string(),
        mode: mode.unwrap_or("").to_string(),
        attached: mode.is_some(),
        prog_id,
        counters,
    }
}

/// What `BPF_OBJ_GET_INFO_BY_FD` says about a link.
#[derive(Clone, Copy, Debug)]
pub struct XdpLinkInfo {
    pub link_type: u32,
    pub prog_id: u32,
    /// 0 when the interface is gone (the link is defunct).
    pub ifindex: u32,
}

const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;
const BPF_LINK_TYPE_XDP: u32 = 6;

/// `struct bpf_link_info` of a link: type, id, prog_id, then (at offset 16) the union whose
/// `xdp.ifindex` this reads.
pub fn link_info(link: BorrowedFd<'_>) -> io::Result<XdpLinkInfo> {
    #[repr(C, align(8))]
    struct Info([u8; 256]);
    #[repr(C, align(8))]
    struct Attr([u8; 128]);
    let mut info = Info([0; 256]);
    let mut attr = Attr([0; 128]);
    attr.0[0..4].copy_from_slice(&(link.as_raw_fd() as u32).to_ne_bytes());
    attr.0[4..8].copy_from_slice(&(info.0.len() as u32).to_ne_bytes());
    attr.0[8..16].copy_from_slice(&(info.0.as_mut_ptr() as u64).to_ne_bytes());
    // SAFETY: attr is a zeroed bpf_attr for BPF_OBJ_GET_INFO_BY_FD pointing at a buffer of
    // the length given.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_OBJ_GET_INFO_BY_FD,
            attr.0.as_mut_ptr() as *mut libc::c_void,
            attr.0.len() as libc::c_uint,
        )
    };
    if ret < 0 {
        return Err(io::Error::last_os_error());
    }
    let u32_at = |off: usize| {
        u32::from_ne_bytes([
            info.0[off],
            info.0[off + 1],
            info.0[off + 2],
            info.0[off + 3],
        ])
    };
    let link_type = u32_at(0);
    if link_type != BPF_LINK_TYPE_XDP {
        return Err(io::Error::other(format!(
            "not an XDP link (bpf link type {link_type})"
        )));
    }
    Ok(XdpLinkInfo {
        link_type,
        prog_id: u32_at(8),
        ifindex: u32_at(16),
    })
}

/// The XDP programs the kernel runs on an interface, per mode (0: none).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct IfaceXdp {
    pub driver: u32,
    pub skb: u32,
    pub hw: u32,
}

impl IfaceXdp {
    /// The mode in which `prog_id` runs here.
    pub fn mode_of(&self, prog_id: u32) -> Option<&'static str> {
        if prog_id == 0 {
            None
        } else if self.driver == prog_id {
            Some("driver")
        } else if self.skb == prog_id {
            Some("skb")
        } else if self.hw == prog_id {
            Some("hw")
        } else {
            None
        }
    }
}

const RTM_NEWLINK: u16 = 16;
const RTM_GETLINK: u16 = 18;
const NLMSG_ERROR: u16 = 2;
const NLM_F_REQUEST: u16 = 1;
const IFLA_XDP: u16 = 43;
const IFLA_XDP_DRV_PROG_ID: u16 = 5;
const IFLA_XDP_SKB_PROG_ID: u16 = 6;
const IFLA_XDP_HW_PROG_ID: u16 = 7;
const NLA_TYPE_MASK: u16 = 0x3fff;

/// Ask rtnetlink which XDP programs run on `ifindex` (`RTM_GETLINK`, `IFLA_XDP`).
pub fn query_iface(ifindex: u32) -> io::Result<IfaceXdp> {
    // SAFETY: plain socket call; the fd is owned right after.
    let fd = unsafe {
        libc::socket(
            libc::AF_NETLINK,
            libc::SOCK_RAW | libc::SOCK_CLOEXEC,
            libc::NETLINK_ROUTE,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a new fd we own.
    let sock: std::os::fd::OwnedFd = unsafe { std::os::fd::FromRawFd::from_raw_fd(fd) };
    let timeout = libc::timeval {
        tv_sec: 2,
        tv_usec: 0,
    };
    // SAFETY: valid option pointer and length.
    unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            &timeout as *const libc::timeval as *const libc::c_void,
            std::mem::size_of::<libc::timeval>() as libc::socklen_t,
        )
    };

    // nlmsghdr (16) + ifinfomsg (16).
    let mut req = [0u8; 32];
    req[0..4].copy_from_slice(&32u32.to_ne_bytes());
    req[4..6].copy_from_slice(&RTM_GETLINK.to_ne_bytes());
    req[6..8].copy_from_slice(&NLM_F_REQUEST.to_ne_bytes());
    req[8..12].copy_from_slice(&1u32.to_ne_bytes());
    req[16] = libc::AF_UNSPEC as u8;
    req[20..24].copy_from_slice(&(ifindex as i32).to_ne_bytes());
    // SAFETY: sending a buffer we own.
    let sent = unsafe {
        libc::send(
            sock.as_raw_fd(),
            req.as_ptr() as *const libc::c_void,
            req.len(),
            0,
        )
    };
    if sent < 0 {
        return Err(io::Error::last_os_error());
    }
    let mut buf = vec![0u8; 64 * 1024];
    // SAFETY: receiving into a buffer we own.
    let n = unsafe {
        libc::recv(
            sock.as_raw_fd(),
            buf.as_mut_ptr() as *mut libc::c_void,
            buf.len(),
            0,
        )
    };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    parse_getlink(&buf[..n as usize])
}

fn u16_at(b: &[u8], off: usize) -> Option<u16> {
    Some(u16::from_ne_bytes(b.get(off..off + 2)?.try_into().ok()?))
}

fn u32_at(b: &[u8], off: usize) -> Option<u32> {
    Some(u32::from_ne_bytes(b.get(off..off + 4)?.try_into().ok()?))
}

/// Route attributes: `(type, payload)` pairs, 4-byte aligned.
fn attrs(mut b: &[u8]) -> Vec<(u16, &[u8])> {
    let mut out = Vec::new();
    while b.len() >= 4 {
        let (Some(len), Some(ty)) = (u16_at(b, 0), u16_at(b, 2)) else {
            break;
        };
        let len = len as usize;
        if len < 4 || len > b.len() {
            break;
        }
        out.push((ty & NLA_TYPE_MASK, &b[4..len]));
        b = &b[((len + 3) & !3).min(b.len())..];
    }
    out
}

fn parse_getlink(msg: &[u8]) -> io::Result<IfaceXdp> {
    let bad = || io::Error::new(io::ErrorKind::InvalidData, "unexpected rtnetlink answer");
    let ty = u16_at(msg, 4).ok_or_else(bad)?;
    if ty == NLMSG_ERROR {
        let errno = u32_at(msg, 16).ok_or_else(bad)? as i32;
        return Err(io::Error::from_raw_os_error(-errno));
    }
    if ty != RTM_NEWLINK {
        return Err(bad());
    }
    let len = (u32_at(msg, 0).ok_or_else(bad)? as usize).min(msg.len());
    let body = msg.get(32..len).ok_or_else(bad)?;
    let mut out = IfaceXdp::default();
    for (ty, payload) in attrs(body) {
        if ty != IFLA_XDP {
            continue;
        }
        for (ty, v) in attrs(payload) {
            let id = u32_at(v, 0).unwrap_or(0);
            match ty {
                IFLA_XDP_DRV_PROG_ID => out.driver = id,
                IFLA_XDP_SKB_PROG_ID => out.skb = id,
                IFLA_XDP_HW_PROG_ID => out.hw = id,
                _ => {}
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn port_ranges_parse() {
        assert_eq!(parse_port_range("32768\t60999\n"), Some((32768, 60999)));
        assert_eq!(parse_port_range("1024 65535"), Some((1024, 65535)));
        assert_eq!(parse_port_range("60999 32768"), None);
        assert_eq!(parse_port_range("x y"), None);
        assert_eq!(parse_port_range("0 10"), None);
        assert_eq!(parse_port_range(""), None);
    }

    #[test]
    fn ephemeral_range_is_sane() {
        let (low, high) = ephemeral_range();
        assert!(low >= 1 && low <= high, "{low}-{high}");
    }

    #[test]
    fn link_pins_are_named_by_interface() {
        let layout = Layout {
            bpffs: PathBuf::from("/sys/fs/bpf/zt"),
        };
        assert_eq!(
            link_path(&layout, "eth1"),
            PathBuf::from("/sys/fs/bpf/zt/links/xdp-eth1")
        );
    }

    #[test]
    fn counters_map_by_reason() {
        let mut raw = vec![0u64; XDP_STAT_COUNT as usize];
        raw[XdpStat::DroppedClosedPort as usize] = 3;
        raw[XdpStat::Passed as usize] = 2;
        raw[XdpStat::EventSkipped as usize] = 1;
        let c = XdpCounters::from_raw(&raw);
        assert_eq!(c.dropped_closed_port, 3);
        assert_eq!(c.passed, 2);
        assert_eq!(c.events_skipped, 1);
        assert_eq!(c.packets(), 5);
    }

    #[test]
    fn getlink_answers_parse() {
        // nlmsghdr + ifinfomsg + IFLA_XDP { IFLA_XDP_ATTACHED=1, IFLA_XDP_DRV_PROG_ID=77 }.
        let mut msg = vec![0u8; 32];
        msg[4..6].copy_from_slice(&RTM_NEWLINK.to_ne_bytes());
        let mut xdp = Vec::new();
        xdp.extend_from_slice(&5u16.to_ne_bytes());
        xdp.extend_from_slice(&2u16.to_ne_bytes());
        xdp.extend_from_slice(&[1, 0, 0, 0]);
        xdp.extend_from_slice(&8u16.to_ne_bytes());
        xdp.extend_from_slice(&IFLA_XDP_DRV_PROG_ID.to_ne_bytes());
        xdp.extend_from_slice(&77u32.to_ne_bytes());
        msg.extend_from_slice(&((4 + xdp.len()) as u16).to_ne_bytes());
        msg.extend_from_slice(&(IFLA_XDP | 0x8000).to_ne_bytes());
        msg.extend_from_slice(&xdp);
        let len = msg.len() as u32;
        msg[0..4].copy_from_slice(&len.to_ne_bytes());
        let q = parse_getlink(&msg).expect("parse");
        assert_eq!(q.driver, 77);
        assert_eq!(q.mode_of(77), Some("driver"));
        assert_eq!(q.mode_of(78), None);
    }
}
