//! `cargo xtask bench`'s XDP per-packet helper: loads zt's XDP front door against policies of
//! several CIDR counts (each in its own pin directory, nothing attached anywhere), a trivial
//! XDP_PASS program, and — when given its program id — xdp-filter's program, then answers
//! the bench's requests: each stdin line `REPEAT VARIANT...` is answered with one JSON line
//! `{"VARIANT": {"ns": mean ns per packet, "action": N}, ...}` measured with
//! `BPF_PROG_TEST_RUN`. Variants: `trivial`, `zt-<n>-{hit,miss,deep}`,
//! `xdpf-<n>-{hit,miss,deep}` (n: a size given with `--sizes`).
//!
//! The CIDRs of size n: every eighth (i % 8 == 7) a /24 in 11.0.0.0/8, the others /32s at odd addresses
//! of 10.0.0.0/8. `hit` comes from the last /32 (deep in the set), `deep` from its even
//! neighbour (31 bits shared with an entry: the longest walk that misses), `miss` from
//! 192.0.2.1. The frames are UDP to an ephemeral port, so that a miss passes.
//!
//! The pins it makes (`<pins-prefix>-<n>`) stay until `ztctl unload --bpffs` (the bench's
//! guard runs it).

use std::{
    collections::BTreeMap,
    io::{BufRead as _, Write as _},
    net::Ipv4Addr,
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
    path::PathBuf,
};

use anyhow::{anyhow, bail, ensure, Context as _, Result};
use clap::Parser;
use serde_json::{json, Map, Value};
use zt::loader::{Layout, Loader};
use zt_integration::frames;

#[derive(Parser)]
struct Args {
    /// The cgroup the (never attached) cgroup programs are loaded for.
    #[arg(long)]
    cgroup: PathBuf,
    /// Pin directories are `<PINS_PREFIX>-<n>`.
    #[arg(long)]
    pins_prefix: String,
    #[arg(long, value_delimiter = ',')]
    sizes: Vec<usize>,
    /// xdp-filter's program (loaded by `xdp-filter load` on a veth of a bench namespace).
    #[arg(long)]
    xdp_filter_prog: Option<u32>,
    /// Write the size-n policy to stdout and exit (for the docs and for checking).
    #[arg(long)]
    print_policy: Option<usize>,
}

const XDP_DROP: u32 = 1;
const XDP_PASS: u32 = 2;

fn cidr(i: usize) -> (Ipv4Addr, u8) {
    if i % 8 == 7 {
        let j = (i / 8) as u32;
        (Ipv4Addr::from((11u32 << 24) | (j << 8)), 24)
    } else {
        (Ipv4Addr::from((10u32 << 24) + 2 * i as u32 + 1), 32)
    }
}

fn policy(n: usize) -> String {
    let mut s = String::from(
        "# cargo xtask bench (xdp): a host-wide ingress deny list of N CIDRs.\nversion = 1\n\n[network.blocked]\ncidrs = [\n",
    );
    for i in 0..n {
        let (a, p) = cidr(i);
        s.push_str(&format!("  \"{a}/{p}\",\n"));
    }
    s.push_str("]\n\n[[rule]]\naction = \"deny\"\ndirection = \"ingress\"\npeer = \"blocked\"\n");
    s
}

/// The last /32 of size n.
fn last32(n: usize) -> Ipv4Addr {
    let i = (0..n).rev().find(|i| i % 8 != 7).unwrap_or(0);
    cidr(i).0
}

fn frame(src: Ipv4Addr) -> Vec<u8> {
    let (lo, hi) = zt::xdp::ephemeral_range();
    let port = lo + (hi - lo) / 2;
    let udp = frames::udp(40000, port, &[0u8; 18]);
    frames::cat(&[
        &frames::eth(&[], frames::ETH_P_IP),
        &frames::ipv4(src.octets(), [198, 51, 100, 1], frames::UDP, &udp),
    ])
}

fn frames_of(n: usize) -> [(&'static str, Vec<u8>, u32); 3] {
    let hit = last32(n);
    let deep = Ipv4Addr::from(u32::from(hit) + 1);
    [
        ("hit", frame(hit), XDP_DROP),
        ("miss", frame(Ipv4Addr::new(192, 0, 2, 1)), XDP_PASS),
        ("deep", frame(deep), XDP_PASS),
    ]
}

// ------------------------------------------------------------------------------------------
// Raw bpf(2): the trivial program and xdp-filter's program and map (not zt's: aya does those).
// ------------------------------------------------------------------------------------------

const BPF_MAP_UPDATE_ELEM: i64 = 2;
const BPF_MAP_DELETE_ELEM: i64 = 3;
const BPF_PROG_LOAD: i64 = 5;
const BPF_PROG_TEST_RUN: i64 = 10;
const BPF_PROG_GET_FD_BY_ID: i64 = 13;
const BPF_MAP_GET_FD_BY_ID: i64 = 14;
const BPF_OBJ_GET_INFO_BY_FD: i64 = 15;
const BPF_PROG_TYPE_XDP: u32 = 6;
const ATTR: usize = 128;

fn put32(a: &mut [u8], off: usize, v: u32) {
    a[off..off + 4].copy_from_slice(&v.to_ne_bytes());
}
fn put64(a: &mut [u8], off: usize, v: u64) {
    a[off..off + 8].copy_from_slice(&v.to_ne_bytes());
}
fn get32(a: &[u8], off: usize) -> u32 {
    u32::from_ne_bytes([a[off], a[off + 1], a[off + 2], a[off + 3]])
}

fn bpf(cmd: i64, attr: &mut [u8; ATTR]) -> std::io::Result<i64> {
    // SAFETY: attr is a zero-padded bpf_attr of ATTR bytes, valid for the call; pointers in
    // it point at live buffers of the caller.
    let r = unsafe { libc::syscall(libc::SYS_bpf, cmd, attr.as_mut_ptr(), ATTR as u32) };
    if r < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(r)
}

fn fd_of(r: i64) -> OwnedFd {
    // SAFETY: r is a new fd returned by bpf(2).
    unsafe { OwnedFd::from_raw_fd(r as i32) }
}

/// `r0 = XDP_PASS; exit`.
fn load_trivial() -> Result<OwnedFd> {
    let insns: [u64; 2] = [
        // BPF_ALU64 | BPF_MOV | BPF_K (0xb7), dst r0, imm 2.
        0xb7 | (u64::from(XDP_PASS) << 32),
        // BPF_JMP | BPF_EXIT.
        0x95,
    ];
    let license = b"GPL\0";
    let mut a = [0u8; ATTR];
    put32(&mut a, 0, BPF_PROG_TYPE_XDP);
    put32(&mut a, 4, insns.len() as u32);
    put64(&mut a, 8, insns.as_ptr() as u64);
    put64(&mut a, 16, license.as_ptr() as u64);
    a[48..56].copy_from_slice(b"zt_bench");
    Ok(fd_of(
        bpf(BPF_PROG_LOAD, &mut a).context("loading the trivial XDP_PASS program")?,
    ))
}

/// `BPF_PROG_TEST_RUN`: (action, mean ns per run).
fn test_run(prog: &OwnedFd, data: &[u8], repeat: u32) -> Result<(u32, f64)> {
    let mut a = [0u8; ATTR];
    put32(&mut a, 0, prog.as_raw_fd() as u32);
    put32(&mut a, 8, data.len() as u32);
    put64(&mut a, 16, data.as_ptr() as u64);
    put32(&mut a, 32, repeat);
    bpf(BPF_PROG_TEST_RUN, &mut a).context("BPF_PROG_TEST_RUN")?;
    Ok((get32(&a, 4), f64::from(get32(&a, 36))))
}

fn info(fd: &OwnedFd) -> Result<Vec<u8>> {
    let mut buf = vec![0u8; 256];
    let mut a = [0u8; ATTR];
    put32(&mut a, 0, fd.as_raw_fd() as u32);
    put32(&mut a, 4, buf.len() as u32);
    put64(&mut a, 8, buf.as_mut_ptr() as u64);
    bpf(BPF_OBJ_GET_INFO_BY_FD, &mut a).context("BPF_OBJ_GET_INFO_BY_FD")?;
    Ok(buf)
}

fn name_at(info: &[u8], off: usize) -> String {
    let raw = &info[off..off + 16];
    let end = raw.iter().position(|b| *b == 0).unwrap_or(16);
    String::from_utf8_lossy(&raw[..end]).into_owned()
}

fn possible_cpus() -> Result<usize> {
    let text = std::fs::read_to_string("/sys/devices/system/cpu/possible")?;
    let mut n = 0;
    for part in text.trim().split(',') {
        match part.split_once('-') {
            Some((a, b)) => n += b.parse::<usize>()? - a.parse::<usize>()? + 1,
            None => n += 1,
        }
    }
    Ok(n)
}

/// xdp-filter's program and its IPv4 map (`filter_ipv4`: per-CPU hash, key the address in
/// network order, value flags: 1 = match the source).
struct XdpFilter {
    prog: OwnedFd,
    map: OwnedFd,
    max_entries: usize,
    value: Vec<u8>,
    loaded: Vec<u32>,
    size: usize,
}

impl XdpFilter {
    fn open(prog_id: u32) -> Result<XdpFilter> {
        let mut a = [0u8; ATTR];
        put32(&mut a, 0, prog_id);
        let prog = fd_of(bpf(BPF_PROG_GET_FD_BY_ID, &mut a).context("xdp-filter's program")?);
        let mut ids = vec![0u32; 32];
        let mut buf = vec![0u8; 256];
        let mut a = [0u8; ATTR];
        put32(&mut a, 0, prog.as_raw_fd() as u32);
        put32(&mut a, 4, buf.len() as u32);
        put64(&mut a, 8, buf.as_mut_ptr() as u64);
        // bpf_prog_info: nr_map_ids at 52, map_ids at 56.
        put32(&mut buf, 52, ids.len() as u32);
        put64(&mut buf, 56, ids.as_mut_ptr() as u64);
        bpf(BPF_OBJ_GET_INFO_BY_FD, &mut a).context("xdp-filter's program info")?;
        let n = (get32(&buf, 52) as usize).min(ids.len());
        for id in &ids[..n] {
            let mut a = [0u8; ATTR];
            put32(&mut a, 0, *id);
            let map = fd_of(bpf(BPF_MAP_GET_FD_BY_ID, &mut a)?);
            let mi = info(&map)?;
            // bpf_map_info: value_size 12, max_entries 16, name 24.
            if name_at(&mi, 24) == "filter_ipv4" {
                let per_cpu = (get32(&mi, 12) as usize).div_ceil(8) * 8;
                let cpus = possible_cpus()?;
                let mut value = vec![0u8; per_cpu * cpus];
                for c in 0..cpus {
                    value[c * per_cpu] = 1;
                }
                return Ok(XdpFilter {
                    prog,
                    map,
                    max_entries: get32(&mi, 16) as usize,
                    value,
                    loaded: Vec::new(),
                    size: usize::MAX,
                });
            }
        }
        bail!("xdp-filter's program (id {prog_id}) has no filter_ipv4 map")
    }

    /// Make the map hold the first address of each of the size-n CIDRs.
    fn fill(&mut self, n: usize) -> Result<()> {
        if self.size == n {
            return Ok(());
        }
        for key in std::mem::take(&mut self.loaded) {
            let k = key.to_be_bytes();
            let mut a = [0u8; ATTR];
            put32(&mut a, 0, self.map.as_raw_fd() as u32);
            put64(&mut a, 8, k.as_ptr() as u64);
            bpf(BPF_MAP_DELETE_ELEM, &mut a).context("emptying filter_ipv4")?;
        }
        self.size = usize::MAX;
        for i in 0..n {
            let (addr, prefix) = cidr(i);
            let host = u32::from(addr) + u32::from(prefix < 32);
            let k = host.to_be_bytes();
            let mut a = [0u8; ATTR];
            put32(&mut a, 0, self.map.as_raw_fd() as u32);
            put64(&mut a, 8, k.as_ptr() as u64);
            put64(&mut a, 16, self.value.as_ptr() as u64);
            bpf(BPF_MAP_UPDATE_ELEM, &mut a).context("filling filter_ipv4")?;
            self.loaded.push(host);
        }
        self.size = n;
        Ok(())
    }
}

struct Zt {
    _loader: Loader,
    front: zt::xdp::XdpFront,
}

fn load_zt(args: &Args, n: usize) -> Result<Zt> {
    let root = zt::sys::cgroup2_root().context("cgroup2 mount")?;
    let resolver = zt::policy::SystemResolver { cgroup_root: root };
    let path = PathBuf::from(format!("{}-{n}.toml", args.pins_prefix));
    let (policy, _) = zt::policy::load_sources(&[(path, policy(n))], &resolver).map_err(|d| {
        anyhow!(
            "policy refused: {}",
            d.iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join("; ")
        )
    })?;
    let compiled = zt::policy::compile(&policy)?;
    let layout = Layout {
        bpffs: PathBuf::from(format!("{}-{n}", args.pins_prefix)),
    };
    zt::sys::ensure_bpffs(&layout.bpffs)?;
    let offsets = zt::btf::kernel_offsets()?;
    let mut loader = Loader::load(&layout, &args.cgroup, offsets, false)?;
    loader.apply(&compiled, 0)?;
    let front = zt::xdp::XdpFront::load(&layout)?;
    Ok(Zt {
        _loader: loader,
        front,
    })
}

fn main() -> Result<()> {
    let args = Args::parse();
    if let Some(n) = args.print_policy {
        print!("{}", policy(n));
        return Ok(());
    }
    let trivial = load_trivial()?;
    let mut zt = BTreeMap::new();
    for &n in &args.sizes {
        let z = load_zt(&args, n).with_context(|| format!("zt with {n} CIDRs"))?;
        for (kind, f, want) in frames_of(n) {
            let got = z.front.test_run(&f)?;
            ensure!(got == want, "zt-{n}-{kind}: action {got}, expected {want}");
        }
        zt.insert(n, z);
    }
    let mut filter = match args.xdp_filter_prog {
        Some(id) => Some(XdpFilter::open(id)?),
        None => None,
    };
    let max = filter.as_ref().map(|f| f.max_entries);
    println!(
        "{}",
        json!({ "ready": true, "xdp_filter_max_entries": max })
    );
    std::io::stdout().flush()?;

    for line in std::io::stdin().lock().lines() {
        let line = line?;
        let mut words = line.split_whitespace();
        let Some(repeat) = words.next() else { break };
        let repeat: u32 = repeat.parse().context("REPEAT")?;
        let mut out = Map::new();
        for v in words {
            out.insert(
                v.to_string(),
                run(v, repeat, &trivial, &zt, filter.as_mut())?,
            );
        }
        println!("{}", Value::Object(out));
        std::io::stdout().flush()?;
    }
    Ok(())
}

fn run(
    v: &str,
    repeat: u32,
    trivial: &OwnedFd,
    zt: &BTreeMap<usize, Zt>,
    filter: Option<&mut XdpFilter>,
) -> Result<Value> {
    if v == "trivial" {
        let (action, ns) = test_run(trivial, &frame(Ipv4Addr::new(192, 0, 2, 1)), repeat)?;
        return Ok(json!({ "ns": ns, "action": action }));
    }
    let mut parts = v.splitn(3, '-');
    let (Some(who), Some(n), Some(kind)) = (parts.next(), parts.next(), parts.next()) else {
        bail!("unknown variant {v}");
    };
    let n: usize = n.parse().with_context(|| format!("variant {v}"))?;
    let (_, f, want) = frames_of(n)
        .into_iter()
        .find(|(k, _, _)| *k == kind)
        .ok_or_else(|| anyhow!("unknown frame kind in {v}"))?;
    match who {
        "zt" => {
            let z = zt.get(&n).ok_or_else(|| anyhow!("size {n} not loaded"))?;
            let (action, d) = z.front.run(&f, repeat)?;
            ensure!(action == want, "{v}: action {action}, expected {want}");
            Ok(json!({ "ns": d.as_nanos() as f64, "action": action }))
        }
        "xdpf" => {
            let Some(filter) = filter else {
                return Ok(
                    json!({ "skipped": "xdp-filter is not loaded (see the scenario's notes)" }),
                );
            };
            if n > filter.max_entries {
                return Ok(
                    json!({ "skipped": format!("xdp-filter's filter_ipv4 map holds at most {} addresses", filter.max_entries) }),
                );
            }
            filter.fill(n)?;
            let (action, ns) = test_run(&filter.prog, &f, repeat)?;
            ensure!(action == want, "{v}: action {action}, expected {want}");
            Ok(json!({ "ns": ns, "action": action }))
        }
        _ => bail!("unknown variant {v}"),
    }
}
