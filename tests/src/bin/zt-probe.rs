//! `zt-probe`: the client and server the integration tests drive. The client joins a cgroup,
//! a network namespace and a uid/gid (in that order, so it still has the rights to), then
//! makes one network call and prints what happened as one word: `ok`, `eperm`, `refused`,
//! `timeout`, or `error:<reason>`. The server echoes TCP and UDP on the given ports.

use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpListener, TcpStream, UdpSocket},
    os::fd::AsFd,
    path::PathBuf,
    time::Duration,
};

use clap::{Parser, Subcommand, ValueEnum};

#[derive(Parser)]
struct Args {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Clone, Copy, ValueEnum, PartialEq)]
enum SocketKind {
    /// SOCK_RAW, IPPROTO_ICMP.
    Raw,
    /// SOCK_DGRAM, IPPROTO_ICMP (an unprivileged "ping" socket).
    Icmp,
    /// AF_PACKET, SOCK_RAW, protocol 0 (link-layer access, below every cgroup hook).
    Packet,
}

#[derive(Clone, Copy, ValueEnum, PartialEq)]
enum Proto {
    Tcp,
    Udp,
}

/// A control message sent with every datagram of `hold --cmsg`.
#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Cmsg {
    /// None: plain `send()`.
    None,
    /// `IP_TOS` / `IPV6_TCLASS` (ECN bits, as QUIC stacks send).
    Tos,
    /// `UDP_SEGMENT` (GSO) with a segment size larger than the datagram.
    Gso,
    /// `IP_PKTINFO` / `IPV6_PKTINFO` with no source or interface.
    Pktinfo,
}

/// What `bound` does from its bound socket.
#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum BoundOp {
    /// `connect()` then send and wait for the echo.
    Connect,
    /// UDP: `sendto()` and wait for the echo.
    Sendto,
    /// TCP: `sendto(MSG_FASTOPEN)` (TCP Fast Open) and wait for the echo.
    Fastopen,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum FloodOp {
    Connect,
    Sendto,
    Bind,
    Handshake,
}

#[derive(Subcommand)]
enum Cmd {
    /// Make one call and print its outcome.
    Connect {
        #[arg(long)]
        proto: Proto,
        #[arg(long)]
        addr: SocketAddr,
        /// UDP only: `sendto()` without `connect()`.
        #[arg(long)]
        unconnected: bool,
        /// Send from an AF_INET6 socket even to an IPv4 address (as `::ffff:a.b.c.d`).
        #[arg(long)]
        mapped: bool,
        #[arg(long)]
        cgroup: Option<PathBuf>,
        #[arg(long)]
        netns: Option<PathBuf>,
        #[arg(long)]
        gid: Option<u32>,
        #[arg(long)]
        uid: Option<u32>,
        /// Effective uid to run with while the real uid is `--uid`.
        #[arg(long)]
        euid: Option<u32>,
        /// Wait this long (ms) after joining the cgroup, before the call.
        #[arg(long, default_value_t = 0)]
        delay_ms: u64,
        /// Source address to bind before connecting (port 0).
        #[arg(long)]
        src: Option<std::net::IpAddr>,
        /// Rename the task (`prctl(PR_SET_NAME)`, what `comm` shows) before the call.
        #[arg(long)]
        comm: Option<String>,
        /// Make the call from a new thread of this process.
        #[arg(long)]
        in_thread: bool,
        /// Make the call from a forked child process (a new process, not exec'd).
        #[arg(long)]
        in_fork: bool,
        /// TCP only: connect through io_uring (`IOSQE_ASYNC`: run by an `iou-wrk` thread).
        #[arg(long)]
        io_uring: bool,
        /// After joining `--cgroup`, move this process to another cgroup (cgroup2 dir).
        #[arg(long)]
        move_to: Option<PathBuf>,
        #[command(flatten)]
        report: Report,
    },
    /// Replace this process with another program: `execv(PATH)` with `argv[0]` = ARGV0
    /// (default PATH) and ARGS, or with `--memfd`, with a copy of PATH in an anonymous
    /// memory file (`memfd_create` + `fexecve`). Prints only on failure.
    Exec {
        #[arg(long)]
        path: PathBuf,
        #[arg(long)]
        argv0: Option<String>,
        #[arg(long)]
        memfd: bool,
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// `bind()` (and for tcp `listen()`) to ADDR and print the outcome.
    Bind {
        #[arg(long)]
        proto: Proto,
        #[arg(long)]
        addr: SocketAddr,
        #[arg(long)]
        cgroup: Option<PathBuf>,
        #[arg(long)]
        uid: Option<u32>,
        #[command(flatten)]
        report: Report,
    },
    /// Create a socket of a kind zt controls at creation and print the outcome.
    Socket {
        #[arg(long)]
        kind: SocketKind,
        #[arg(long)]
        cgroup: Option<PathBuf>,
        /// Primary group to run as (the uid stays 0, keeping CAP_NET_RAW).
        #[arg(long)]
        gid: Option<u32>,
        #[arg(long)]
        netns: Option<PathBuf>,
        /// Also send an ICMP echo request to this IPv4 address and wait for the reply.
        #[arg(long)]
        ping: Option<std::net::Ipv4Addr>,
        #[command(flatten)]
        report: Report,
    },
    /// Create an unconnected UDP socket, pass it over SCM_RIGHTS to a child process running as
    /// `to_uid`, which sends one datagram to ADDR on it: prints the child's outcome.
    PassFd {
        #[arg(long)]
        addr: SocketAddr,
        #[arg(long)]
        cgroup: Option<PathBuf>,
        #[arg(long)]
        to_uid: u32,
    },
    /// Connect a UDP socket to ADDR now, print `ready`, then for every line on stdin send a
    /// datagram on that socket and print the outcome: a socket opened before zt started.
    Hold {
        #[arg(long)]
        addr: SocketAddr,
        #[arg(long)]
        cgroup: Option<PathBuf>,
        /// Bind this local port (SO_REUSEADDR) before connecting.
        #[arg(long, default_value_t = 0)]
        bind_port: u16,
        /// Send every datagram with `sendmsg()` and this control message.
        #[arg(long, value_enum, default_value = "none")]
        cmsg: Cmsg,
    },
    /// Bind a TCP or UDP socket (SO_REUSEADDR) to PORT on the unspecified address of ADDR's
    /// family, then reach ADDR from it (`--op`), send 4 bytes and wait for their echo; print
    /// the outcome. A server's listening port used as a client's source port.
    Bound {
        #[arg(long)]
        proto: Proto,
        #[arg(long)]
        port: u16,
        #[arg(long)]
        addr: SocketAddr,
        #[arg(long, value_enum, default_value = "connect")]
        op: BoundOp,
        #[arg(long)]
        cgroup: Option<PathBuf>,
    },
    /// Receive UDP on BIND (an IPv6 address binds dual-stack: IPV6_V6ONLY off) without
    /// answering: print `ready PORT`, then `got SRC PAYLOAD` per datagram.
    Recv {
        #[arg(long)]
        bind: SocketAddr,
        #[arg(long)]
        netns: Option<PathBuf>,
        #[arg(long)]
        cgroup: Option<PathBuf>,
    },
    /// Send one UDP datagram with PAYLOAD from SRC (port 0) to ADDR without waiting for
    /// anything; print the outcome.
    SendUdp {
        #[arg(long)]
        src: std::net::IpAddr,
        #[arg(long)]
        addr: SocketAddr,
        #[arg(long)]
        payload: String,
        #[arg(long)]
        netns: Option<PathBuf>,
        #[arg(long)]
        cgroup: Option<PathBuf>,
    },
    /// Send one hand-built IPv6 UDP datagram with PAYLOAD from SRC to DST:PORT, with EXT
    /// destination-options extension headers (8 bytes each) before the UDP header, on a raw
    /// socket (IPPROTO_RAW: the header is ours); print the outcome.
    SendExt6 {
        #[arg(long)]
        src: std::net::Ipv6Addr,
        #[arg(long)]
        dst: std::net::Ipv6Addr,
        #[arg(long)]
        port: u16,
        #[arg(long)]
        ext: u8,
        #[arg(long)]
        payload: String,
        #[arg(long)]
        netns: Option<PathBuf>,
    },
    /// Echo on TCP and UDP at `port` for every `bind` address; print `ready PORT...`.
    Serve {
        #[arg(long, value_delimiter = ',')]
        bind: Vec<std::net::IpAddr>,
        /// Ports to serve; 0 picks a free one (the same number for every address and both
        /// protocols).
        #[arg(long, value_delimiter = ',')]
        ports: Vec<u16>,
        #[arg(long)]
        netns: Option<PathBuf>,
        /// Serve from inside this cgroup (a guarded listener).
        #[arg(long)]
        cgroup: Option<PathBuf>,
    },
    /// The executable-identity attack zt must stop: join `--cgroup`, become `--uid`/`--gid`,
    /// then make `/proc/self/exe` name AS: enter a new user namespace, replace every mapping
    /// of this program's own file by an anonymous copy, and `prctl(PR_SET_MM, PR_SET_MM_MAP)`
    /// with AS's fd as the new exe — in this process, or with `--clone-vm` in a `CLONE_VM`
    /// child (sharing this process's memory) that then exits, leaving this process in the
    /// initial user namespace. Prints `exe=<what /proc/self/exe names now>` (or
    /// `error:<step>:<reason>`), then makes one call like `connect` and prints its outcome.
    Disguise {
        #[arg(long)]
        proto: Proto,
        #[arg(long)]
        addr: SocketAddr,
        #[arg(long = "as")]
        as_exe: PathBuf,
        #[arg(long)]
        clone_vm: bool,
        #[arg(long)]
        cgroup: Option<PathBuf>,
        #[arg(long)]
        uid: Option<u32>,
        #[arg(long)]
        gid: Option<u32>,
    },
    /// Join the cgroup and take the uid/gid once, then for every stdin line
    /// `PROTO ADDR:PORT [mapped] [send]` (tcp or udp) make one call on a fresh socket and print
    /// one outcome per line: `ok` (the call proceeded: connected, in progress, refused),
    /// `eperm`, or `error:<reason>`. `mapped`: from an AF_INET6 socket to `::ffff:a.b.c.d`;
    /// `send` (udp): `sendto()` without `connect()`; `bind`: `bind()` to ADDR:PORT instead
    /// (`ok` also when the kernel refuses it after zt: in use, privileged port). Nothing
    /// waits for a peer. A line `flush` writes out the outcomes so far; `exec PATH` flushes
    /// and replaces this process with `PATH batch` (same pid, cgroup, ids and stdin).
    Batch {
        #[arg(long)]
        cgroup: Option<PathBuf>,
        #[arg(long)]
        uid: Option<u32>,
        #[arg(long)]
        gid: Option<u32>,
    },
    /// Join the cgroup and take the uid/gid once, then answer stdin lines one at a time
    /// (flushing each answer): `keep udp ADDR:PORT [mapped]` connects a UDP socket and keeps
    /// it (`ok` or `eperm`; kept sockets are numbered from 0 in the order they were kept,
    /// refused ones included), `send N` sends one datagram on kept socket N (`ok`, `eperm`,
    /// or `error:<reason>`): what the egress backstop decides for a flow opened earlier.
    Session {
        #[arg(long)]
        cgroup: Option<PathBuf>,
        #[arg(long)]
        uid: Option<u32>,
        #[arg(long)]
        gid: Option<u32>,
    },
    /// Make COUNT `connect()` attempts to ADDR's address, cycling the destination port over
    /// PORT_SPREAD values from ADDR's port up (UDP: one socket, no packet sent; TCP: a
    /// non-blocking socket per attempt), and print `eperm=X ok=Y other=Z`.
    Flood {
        #[arg(long)]
        proto: Proto,
        #[arg(long)]
        addr: SocketAddr,
        #[arg(long)]
        count: u64,
        #[arg(long, default_value_t = 1)]
        port_spread: u16,
        #[arg(long)]
        cgroup: Option<PathBuf>,
        #[arg(long)]
        uid: Option<u32>,
        /// Stay alive this long (ms) after printing the counts.
        #[arg(long, default_value_t = 0)]
        linger_ms: u64,
        /// The call looped (the bench): `connect` (default), `sendto` (UDP, one unconnected
        /// socket; port 0 in ADDR: to a socket the probe binds on ADDR's IP first), `bind`
        /// (UDP socket, bind, close per call) or `handshake` (TCP, blocking connect and an
        /// abortive close, so no TIME_WAIT is left). The loop's time is printed as `ns=`.
        #[arg(long, value_enum, default_value = "connect")]
        op: FloodOp,
    },
    /// Send spoofed-source UDP datagrams (a raw IP socket, `sendmmsg` in batches of 64) to
    /// DST:DPORT for DURATION_MS, the source cycling over SRC_COUNT addresses from SRC_BASE
    /// in steps of SRC_STEP; print `sent=N ns=T` (the bench's wire load).
    Blast {
        #[arg(long)]
        dst: std::net::Ipv4Addr,
        #[arg(long)]
        dport: u16,
        #[arg(long)]
        src_base: std::net::Ipv4Addr,
        #[arg(long, default_value_t = 1)]
        src_count: u32,
        #[arg(long, default_value_t = 1)]
        src_step: u32,
        #[arg(long)]
        duration_ms: u64,
    },
    /// Accept TCP connections on ADDR and close them at once, until killed (the bench's
    /// connect-rate peer); prints `ready` once listening.
    TcpSink {
        #[arg(long)]
        addr: SocketAddr,
    },
    /// Loop UDP `connect()`s (one socket, no packet sent) over every address of ADDR_LIST
    /// until DURATION_MS has passed or stdin is closed (or gets a line), counting each
    /// address's outcomes; print `ready` when started, then one JSON summary:
    /// `{"rounds":N,"ports":[{"addr":"...","ok":X,"eperm":Y,"other":Z}, ...]}`.
    Load {
        #[arg(long, value_delimiter = ',')]
        addr_list: Vec<SocketAddr>,
        #[arg(long)]
        duration_ms: u64,
        /// Sleep this long (µs) after each round, leaving CPU to the daemon under test.
        #[arg(long, default_value_t = 0)]
        pause_us: u64,
        #[arg(long)]
        cgroup: Option<PathBuf>,
    },
    /// Open a TCP connection to ADDR now, print `ready`, then for every line on stdin write
    /// 4 bytes and wait up to TIMEOUT_MS for their echo: prints `ok`, `eperm`, `timeout`,
    /// ... (after a failure the connection is not reused: every later line prints `broken`).
    HoldTcp {
        #[arg(long)]
        addr: SocketAddr,
        #[arg(long)]
        cgroup: Option<PathBuf>,
        #[arg(long, default_value_t = 500)]
        timeout_ms: u64,
    },
}

/// Flags of the one-call subcommands (connect, bind, socket) for tests that check the
/// events a call produces.
#[derive(clap::Args, Default)]
struct Report {
    /// Write this process's pid (its tgid; the call is made by the main thread) to PATH
    /// before doing anything else.
    #[arg(long)]
    pid_file: Option<PathBuf>,
    /// Stay alive this long (ms) after printing the outcome, so that the daemon can still
    /// read `/proc/<pid>/exe` when it reports the call.
    #[arg(long, default_value_t = 0)]
    linger_ms: u64,
}

impl Report {
    fn start(&self) {
        if let Some(path) = &self.pid_file {
            if let Err(e) = std::fs::write(path, std::process::id().to_string()) {
                eprintln!("pid file {}: {e}", path.display());
            }
        }
    }

    /// Print the outcome, then linger.
    fn finish(&self, outcome: &str) {
        println!("{outcome}");
        let _ = std::io::stdout().flush();
        std::thread::sleep(Duration::from_millis(self.linger_ms));
    }
}

fn main() {
    match Args::parse().cmd {
        Cmd::Connect {
            proto,
            addr,
            unconnected,
            mapped,
            cgroup,
            netns,
            gid,
            uid,
            euid,
            delay_ms,
            src,
            comm,
            in_thread,
            in_fork,
            io_uring,
            move_to,
            report,
        } => {
            report.start();
            if let Err(e) = enter(cgroup, netns, gid, uid, euid) {
                println!("error:setup:{e}");
                return;
            }
            if let Some(cg) = move_to {
                if let Err(e) = std::fs::write(cg.join("cgroup.procs"), b"0") {
                    println!("error:move:{e}");
                    return;
                }
            }
            if let Some(name) = comm {
                let name = std::ffi::CString::new(name).unwrap_or_default();
                // SAFETY: PR_SET_NAME reads a NUL-terminated string we own.
                unsafe { libc::prctl(libc::PR_SET_NAME, name.as_ptr(), 0, 0, 0) };
            }
            std::thread::sleep(Duration::from_millis(delay_ms));
            let addr = if mapped {
                match addr {
                    SocketAddr::V4(v4) => {
                        SocketAddr::new(v4.ip().to_ipv6_mapped().into(), v4.port())
                    }
                    v6 => v6,
                }
            } else {
                addr
            };
            let result = if io_uring {
                outcome(uring_connect(addr))
            } else if in_fork {
                in_child(|| outcome(call(proto, addr, unconnected, src)))
            } else if in_thread {
                std::thread::spawn(move || outcome(call(proto, addr, unconnected, src)))
                    .join()
                    .unwrap_or_else(|_| "error:thread panicked".to_string())
            } else {
                outcome(call(proto, addr, unconnected, src))
            };
            report.finish(&result);
        }
        Cmd::Exec {
            path,
            argv0,
            memfd,
            args,
        } => println!("error:exec:{}", exec(&path, argv0, memfd, &args)),
        Cmd::Bind {
            proto,
            addr,
            cgroup,
            uid,
            report,
        } => {
            report.start();
            if let Err(e) = enter(cgroup, None, None, uid, None) {
                println!("error:setup:{e}");
                return;
            }
            let r = match proto {
                Proto::Tcp => bind_tcp(addr).map(drop),
                Proto::Udp => bind_udp(addr).map(drop),
            };
            report.finish(&outcome(r));
        }
        Cmd::Socket {
            kind,
            cgroup,
            gid,
            netns,
            ping,
            report,
        } => {
            report.start();
            if let Err(e) = enter(cgroup, netns, gid, None, None) {
                println!("error:setup:{e}");
                return;
            }
            let (family, ty, protocol) = match kind {
                SocketKind::Raw => (libc::AF_INET, libc::SOCK_RAW, libc::IPPROTO_ICMP),
                SocketKind::Icmp => (libc::AF_INET, libc::SOCK_DGRAM, libc::IPPROTO_ICMP),
                SocketKind::Packet => (libc::AF_PACKET, libc::SOCK_RAW, 0),
            };
            // SAFETY: plain socket(2); the fd is owned right away.
            let fd = unsafe { libc::socket(family, ty, protocol) };
            if fd < 0 {
                report.finish(&outcome(Err(std::io::Error::last_os_error())));
                return;
            }
            // SAFETY: fd is a new, valid descriptor.
            let sock = UdpSocket::from(unsafe {
                <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd)
            });
            match ping {
                None => report.finish("ok"),
                Some(to) => report.finish(&outcome(echo(&sock, to, kind))),
            }
        }
        Cmd::PassFd {
            addr,
            cgroup,
            to_uid,
        } => {
            if let Err(e) = enter(cgroup, None, None, None, None) {
                println!("error:setup:{e}");
                return;
            }
            println!("{}", pass_fd(addr, to_uid));
        }
        Cmd::Hold {
            addr,
            cgroup,
            bind_port,
            cmsg,
        } => {
            if let Err(e) = enter(cgroup, None, None, None, None) {
                println!("error:setup:{e}");
                return;
            }
            hold(addr, bind_port, cmsg);
        }
        Cmd::Bound {
            proto,
            port,
            addr,
            op,
            cgroup,
        } => {
            if let Err(e) = enter(cgroup, None, None, None, None) {
                println!("error:setup:{e}");
                return;
            }
            println!("{}", outcome(bound(proto, port, addr, op)));
        }
        Cmd::Recv {
            bind,
            netns,
            cgroup,
        } => {
            if let Err(e) = enter(cgroup, netns, None, None, None) {
                println!("error:setup:{e}");
                return;
            }
            recv(bind);
        }
        Cmd::SendUdp {
            src,
            addr,
            payload,
            netns,
            cgroup,
        } => {
            if let Err(e) = enter(cgroup, netns, None, None, None) {
                println!("error:setup:{e}");
                return;
            }
            let r = UdpSocket::bind(SocketAddr::new(src, 0))
                .and_then(|s| s.send_to(payload.as_bytes(), addr))
                .map(drop);
            println!("{}", outcome(r));
        }
        Cmd::SendExt6 {
            src,
            dst,
            port,
            ext,
            payload,
            netns,
        } => {
            if let Err(e) = enter(None, netns, None, None, None) {
                println!("error:setup:{e}");
                return;
            }
            println!(
                "{}",
                outcome(send_ext6(src, dst, port, ext, payload.as_bytes()))
            );
        }
        Cmd::Serve {
            bind,
            ports,
            netns,
            cgroup,
        } => {
            if let Err(e) = enter(cgroup, netns, None, None, None) {
                eprintln!("serve: {e}");
                std::process::exit(1);
            }
            serve(&bind, &ports);
        }
        Cmd::Disguise {
            proto,
            addr,
            as_exe,
            clone_vm,
            cgroup,
            uid,
            gid,
        } => {
            if let Err(e) = enter(cgroup, None, gid, uid, None) {
                println!("error:setup:{e}");
                return;
            }
            match disguise::run(&as_exe, clone_vm) {
                Ok(()) => match std::fs::read_link("/proc/self/exe") {
                    Ok(p) => println!("exe={}", p.display()),
                    Err(e) => println!("error:readlink:{e}"),
                },
                Err(e) => {
                    println!("error:{e}");
                    return;
                }
            }
            println!("{}", outcome(call(proto, addr, false, None)));
        }
        Cmd::Batch { cgroup, uid, gid } => {
            if let Err(e) = enter(cgroup, None, gid, uid, None) {
                println!("error:setup:{e}");
                return;
            }
            batch();
        }
        Cmd::Session { cgroup, uid, gid } => {
            if let Err(e) = enter(cgroup, None, gid, uid, None) {
                println!("error:setup:{e}");
                return;
            }
            session();
        }
        Cmd::Flood {
            proto,
            addr,
            count,
            port_spread,
            cgroup,
            uid,
            linger_ms,
            op,
        } => {
            if let Err(e) = enter(cgroup, None, None, uid, None) {
                println!("error:setup:{e}");
                return;
            }
            let t = std::time::Instant::now();
            let (eperm, ok, other) = match op {
                FloodOp::Connect => flood(proto, addr, count, port_spread),
                other => flood_op(other, addr, count, port_spread),
            };
            let ns = t.elapsed().as_nanos();
            println!("eperm={eperm} ok={ok} other={other} ns={ns}");
            let _ = std::io::stdout().flush();
            std::thread::sleep(Duration::from_millis(linger_ms));
        }
        Cmd::Blast {
            dst,
            dport,
            src_base,
            src_count,
            src_step,
            duration_ms,
        } => match blast(
            dst,
            dport,
            src_base,
            src_count,
            src_step,
            Duration::from_millis(duration_ms),
        ) {
            Ok((sent, ns)) => println!("sent={sent} ns={ns}"),
            Err(e) => {
                println!("error:blast:{e}");
                std::process::exit(1);
            }
        },
        Cmd::TcpSink { addr } => {
            if let Err(e) = tcp_sink(addr) {
                println!("error:listen:{e}");
                std::process::exit(1);
            }
        }
        Cmd::Load {
            addr_list,
            duration_ms,
            pause_us,
            cgroup,
        } => {
            if let Err(e) = enter(cgroup, None, None, None, None) {
                println!("error:setup:{e}");
                return;
            }
            load(
                &addr_list,
                Duration::from_millis(duration_ms),
                Duration::from_micros(pause_us),
            );
        }
        Cmd::HoldTcp {
            addr,
            cgroup,
            timeout_ms,
        } => {
            if let Err(e) = enter(cgroup, None, None, None, None) {
                println!("error:setup:{e}");
                return;
            }
            hold_tcp(addr, Duration::from_millis(timeout_ms.max(1)));
        }
    }
}

/// `Cmd::Flood` with `--op sendto|bind|handshake`: `(eperm, ok, other)`.
fn flood_op(op: FloodOp, addr: SocketAddr, count: u64, spread: u16) -> (u64, u64, u64) {
    use std::os::fd::AsRawFd;
    let domain = if addr.is_ipv4() {
        libc::AF_INET
    } else {
        libc::AF_INET6
    };
    let spread = u64::from(spread.max(1));
    let (mut eperm, mut ok, mut other) = (0u64, 0u64, 0u64);
    let mut tally = |r: nix::Result<()>| match r {
        Ok(()) => ok += 1,
        Err(nix::errno::Errno::EPERM) => eperm += 1,
        Err(_) => other += 1,
    };
    let port_of = |i: u64| (u64::from(addr.port()) + i % spread).min(65535) as u16;
    match op {
        FloodOp::Connect => return flood(Proto::Udp, addr, count, spread as u16),
        FloodOp::Sendto => {
            let Ok(fd) = socket(domain, libc::SOCK_DGRAM) else {
                return (0, 0, count);
            };
            // Port 0: to our own socket (no ICMP port-unreachable per datagram).
            let (sink, target) = if addr.port() == 0 {
                match bind_udp(SocketAddr::new(addr.ip(), 0)).and_then(|s| {
                    let a = s.local_addr()?;
                    Ok((s, a))
                }) {
                    Ok((s, a)) => (Some(s), a),
                    Err(_) => return (0, 0, count),
                }
            } else {
                (None, addr)
            };
            let sweep = if sink.is_some() { 1 } else { spread };
            for i in 0..count {
                let port = (u64::from(target.port()) + i % sweep).min(65535) as u16;
                let to =
                    nix::sys::socket::SockaddrStorage::from(SocketAddr::new(target.ip(), port));
                let r = nix::sys::socket::sendto(
                    fd.as_raw_fd(),
                    b"z",
                    &to,
                    nix::sys::socket::MsgFlags::empty(),
                );
                tally(r.map(|_| ()));
            }
            drop(sink);
        }
        FloodOp::Bind => {
            for i in 0..count {
                let at =
                    nix::sys::socket::SockaddrStorage::from(SocketAddr::new(addr.ip(), port_of(i)));
                match socket(domain, libc::SOCK_DGRAM) {
                    Ok(fd) => tally(nix::sys::socket::bind(fd.as_raw_fd(), &at)),
                    Err(_) => tally(Err(nix::errno::Errno::EBADF)),
                }
            }
        }
        FloodOp::Handshake => {
            for i in 0..count {
                let to =
                    nix::sys::socket::SockaddrStorage::from(SocketAddr::new(addr.ip(), port_of(i)));
                match socket(domain, libc::SOCK_STREAM) {
                    Ok(fd) => {
                        let r = nix::sys::socket::connect(fd.as_raw_fd(), &to);
                        // Abortive close: an RST, no TIME_WAIT to exhaust the ports.
                        let _ = nix::sys::socket::setsockopt(
                            &fd,
                            nix::sys::socket::sockopt::Linger,
                            &libc::linger {
                                l_onoff: 1,
                                l_linger: 0,
                            },
                        );
                        tally(r);
                    }
                    Err(_) => tally(Err(nix::errno::Errno::EBADF)),
                }
            }
        }
    }
    (eperm, ok, other)
}

/// See `Cmd::Blast`: datagrams sent, and the time it took.
fn blast(
    dst: std::net::Ipv4Addr,
    dport: u16,
    src_base: std::net::Ipv4Addr,
    src_count: u32,
    src_step: u32,
    duration: Duration,
) -> std::io::Result<(u64, u128)> {
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
    const BATCH: usize = 64;
    const LEN: usize = 20 + 8 + 18;
    // SAFETY: plain socket(2); owned right away.
    let fd = unsafe {
        libc::socket(
            libc::AF_INET,
            libc::SOCK_RAW | libc::SOCK_CLOEXEC,
            libc::IPPROTO_RAW,
        )
    };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: fd is new and valid.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let base = u32::from(src_base);
    let count = src_count.max(1);
    let mut packets = vec![[0u8; LEN]; BATCH];
    let mut next = 0u32;
    let fill = |p: &mut [u8; LEN], src: u32| {
        p[0] = 0x45;
        p[2..4].copy_from_slice(&(LEN as u16).to_be_bytes());
        p[8] = 64;
        p[9] = libc::IPPROTO_UDP as u8;
        p[12..16].copy_from_slice(&src.to_be_bytes());
        p[16..20].copy_from_slice(&dst.octets());
        p[20..22].copy_from_slice(&40000u16.to_be_bytes());
        p[22..24].copy_from_slice(&dport.to_be_bytes());
        p[24..26].copy_from_slice(&((LEN - 20) as u16).to_be_bytes());
        // UDP checksum 0: none (IPv4); the kernel fills in the IP header checksum.
    };
    // SAFETY: zeroed sockaddr_in is a valid value.
    let mut to: libc::sockaddr_in = unsafe { std::mem::zeroed() };
    to.sin_family = libc::AF_INET as libc::sa_family_t;
    to.sin_addr.s_addr = u32::from(dst).to_be();
    let start = std::time::Instant::now();
    let mut sent = 0u64;
    while start.elapsed() < duration {
        for p in packets.iter_mut() {
            fill(p, base.wrapping_add((next % count).wrapping_mul(src_step)));
            next = next.wrapping_add(1);
        }
        let mut iov: Vec<libc::iovec> = packets
            .iter_mut()
            .map(|p| libc::iovec {
                iov_base: p.as_mut_ptr().cast(),
                iov_len: LEN,
            })
            .collect();
        let mut msgs: Vec<libc::mmsghdr> = iov
            .iter_mut()
            .map(|v| {
                // SAFETY: zeroed msghdr is valid; the pointers outlive the call below.
                let mut h: libc::mmsghdr = unsafe { std::mem::zeroed() };
                h.msg_hdr.msg_name = (&mut to as *mut libc::sockaddr_in).cast();
                h.msg_hdr.msg_namelen = std::mem::size_of::<libc::sockaddr_in>() as u32;
                h.msg_hdr.msg_iov = v;
                h.msg_hdr.msg_iovlen = 1;
                h
            })
            .collect();
        // SAFETY: msgs/iov/packets/to are valid for the call.
        let n = unsafe { libc::sendmmsg(fd.as_raw_fd(), msgs.as_mut_ptr(), BATCH as u32, 0) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::ENOBUFS) {
                continue;
            }
            return Err(e);
        }
        sent += n as u64;
    }
    Ok((sent, start.elapsed().as_nanos()))
}

/// See `Cmd::TcpSink`.
fn tcp_sink(addr: SocketAddr) -> std::io::Result<()> {
    let listener = bind_tcp(addr)?;
    // A deep accept queue: a full one drops SYNs, and the client waits a second to retry.
    // SAFETY: listen(2) on our listening socket.
    if unsafe { libc::listen(std::os::fd::AsRawFd::as_raw_fd(&listener), 4096) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    println!("ready");
    let _ = std::io::stdout().flush();
    loop {
        if let Ok((s, _)) = listener.accept() {
            drop(s);
        }
    }
}

/// A TCP connect submitted to io_uring with `IOSQE_ASYNC` (so an `iou-wrk` worker thread
/// makes it), then the usual echo on the connected socket.
fn uring_connect(addr: SocketAddr) -> std::io::Result<()> {
    use io_uring::{opcode, squeue::Flags, types, IoUring};
    use nix::sys::socket::SockaddrLike;
    use std::os::fd::AsRawFd;
    let domain = if addr.is_ipv4() {
        libc::AF_INET
    } else {
        libc::AF_INET6
    };
    let fd = socket(domain, libc::SOCK_STREAM)?;
    let to = nix::sys::socket::SockaddrStorage::from(addr);
    let mut ring = IoUring::new(4)?;
    let op = opcode::Connect::new(types::Fd(fd.as_raw_fd()), to.as_ptr(), to.len())
        .build()
        .flags(Flags::ASYNC)
        .user_data(1);
    // SAFETY: the socket and the address outlive the submission (we wait for it below).
    unsafe { ring.submission().push(&op) }.map_err(std::io::Error::other)?;
    ring.submit_and_wait(1)?;
    let cqe = ring
        .completion()
        .next()
        .ok_or_else(|| std::io::Error::other("no completion"))?;
    if cqe.result() < 0 {
        return Err(std::io::Error::from_raw_os_error(-cqe.result()));
    }
    let mut s = TcpStream::from(fd);
    s.set_read_timeout(Some(TIMEOUT))?;
    s.write_all(b"ping")?;
    let mut buf = [0u8; 4];
    s.read_exact(&mut buf)?;
    expect_echo(&buf)
}

/// See `Cmd::Exec`; returns only on failure, with the reason.
fn exec(path: &std::path::Path, argv0: Option<String>, memfd: bool, args: &[String]) -> String {
    use std::ffi::CString;
    use std::os::unix::ffi::OsStrExt;
    let cstr = |s: &[u8]| CString::new(s).unwrap_or_default();
    let mut argv = vec![cstr(
        argv0
            .as_deref()
            .map(str::as_bytes)
            .unwrap_or(path.as_os_str().as_bytes()),
    )];
    argv.extend(args.iter().map(|a| cstr(a.as_bytes())));
    let env: Vec<CString> = std::env::vars_os()
        .map(|(k, v)| {
            let mut kv = k.as_bytes().to_vec();
            kv.push(b'=');
            kv.extend_from_slice(v.as_bytes());
            cstr(&kv)
        })
        .collect();
    if memfd {
        let fd = match nix::sys::memfd::memfd_create(
            c"zt-probe-memfd",
            nix::sys::memfd::MFdFlags::MFD_CLOEXEC,
        ) {
            Ok(fd) => fd,
            Err(e) => return format!("memfd_create: {e}"),
        };
        let mut file = std::fs::File::from(fd);
        match std::fs::read(path) {
            Ok(bytes) => {
                if let Err(e) = file.write_all(&bytes) {
                    return format!("write memfd: {e}");
                }
            }
            Err(e) => return format!("read {}: {e}", path.display()),
        }
        let e = nix::unistd::fexecve(file.as_fd(), &argv, &env);
        return format!("fexecve: {e:?}");
    }
    let e = nix::unistd::execve(&cstr(path.as_os_str().as_bytes()), &argv, &env);
    format!("execve: {e:?}")
}

/// See `Cmd::Flood`: `(eperm, ok, other)`.
fn flood(proto: Proto, addr: SocketAddr, count: u64, spread: u16) -> (u64, u64, u64) {
    use std::os::fd::AsRawFd;
    let domain = if addr.is_ipv4() {
        libc::AF_INET
    } else {
        libc::AF_INET6
    };
    let spread = u64::from(spread.max(1));
    let (mut eperm, mut ok, mut other) = (0u64, 0u64, 0u64);
    let udp = match proto {
        Proto::Udp => match socket(domain, libc::SOCK_DGRAM) {
            Ok(fd) => Some(fd),
            Err(_) => return (0, 0, count),
        },
        Proto::Tcp => None,
    };
    for i in 0..count {
        let port = (u64::from(addr.port()) + i % spread).min(65535) as u16;
        let to = nix::sys::socket::SockaddrStorage::from(SocketAddr::new(addr.ip(), port));
        let tcp;
        let fd = match &udp {
            Some(fd) => fd.as_raw_fd(),
            None => match socket(domain, libc::SOCK_STREAM | libc::SOCK_NONBLOCK) {
                Ok(fd) => {
                    tcp = fd;
                    tcp.as_raw_fd()
                }
                Err(_) => {
                    other += 1;
                    continue;
                }
            },
        };
        match nix::sys::socket::connect(fd, &to) {
            Ok(()) | Err(nix::errno::Errno::EINPROGRESS) => ok += 1,
            Err(nix::errno::Errno::EPERM) => eperm += 1,
            Err(_) => other += 1,
        }
    }
    (eperm, ok, other)
}

fn enter(
    cgroup: Option<PathBuf>,
    netns: Option<PathBuf>,
    gid: Option<u32>,
    uid: Option<u32>,
    euid: Option<u32>,
) -> std::io::Result<()> {
    if let Some(cg) = cgroup {
        std::fs::write(cg.join("cgroup.procs"), b"0")?;
    }
    if let Some(ns) = netns {
        let f = std::fs::File::open(ns)?;
        nix::sched::setns(f.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET)?;
    }
    if let Some(gid) = gid {
        let gid = nix::unistd::Gid::from_raw(gid);
        nix::unistd::setgroups(&[gid])?;
        nix::unistd::setresgid(gid, gid, gid)?;
    }
    if let Some(uid) = uid {
        let real = nix::unistd::Uid::from_raw(uid);
        let effective = nix::unistd::Uid::from_raw(euid.unwrap_or(uid));
        nix::unistd::setresuid(real, effective, effective)?;
    }
    Ok(())
}

const TIMEOUT: Duration = Duration::from_secs(3);

fn call(
    proto: Proto,
    addr: SocketAddr,
    unconnected: bool,
    src: Option<std::net::IpAddr>,
) -> std::io::Result<()> {
    match proto {
        Proto::Tcp => {
            let mut s = match src {
                None => TcpStream::connect_timeout(&addr, TIMEOUT)?,
                Some(ip) => connect_from(ip, addr)?,
            };
            s.set_read_timeout(Some(TIMEOUT))?;
            s.write_all(b"ping")?;
            let mut buf = [0u8; 4];
            s.read_exact(&mut buf)?;
            expect_echo(&buf)
        }
        Proto::Udp => {
            let local: SocketAddr = match src {
                Some(ip) => SocketAddr::new(ip, 0),
                None if addr.is_ipv4() => "0.0.0.0:0".parse().map_err(std::io::Error::other)?,
                None => "[::]:0".parse().map_err(std::io::Error::other)?,
            };
            let s = UdpSocket::bind(local)?;
            s.set_read_timeout(Some(TIMEOUT))?;
            if unconnected {
                s.send_to(b"ping", addr)?;
            } else {
                s.connect(addr)?;
                s.send(b"ping")?;
            }
            let mut buf = [0u8; 4];
            let n = s.recv(&mut buf)?;
            expect_echo(&buf[..n])
        }
    }
}

fn expect_echo(buf: &[u8]) -> std::io::Result<()> {
    if buf == b"ping" {
        Ok(())
    } else {
        Err(std::io::Error::other("wrong echo"))
    }
}

fn outcome(r: std::io::Result<()>) -> String {
    match r {
        Ok(()) => "ok".to_string(),
        Err(e) => match e.raw_os_error() {
            Some(libc::EPERM) => "eperm".to_string(),
            Some(libc::ECONNREFUSED) => "refused".to_string(),
            Some(libc::EAGAIN) | Some(libc::ETIMEDOUT) => "timeout".to_string(),
            _ if e.kind() == std::io::ErrorKind::TimedOut
                || e.kind() == std::io::ErrorKind::WouldBlock =>
            {
                "timeout".to_string()
            }
            _ => format!("error:{e}"),
        },
    }
}

fn serve(bind: &[std::net::IpAddr], ports: &[u16]) {
    let mut chosen = Vec::new();
    let mut tcp = Vec::new();
    let mut udp = Vec::new();
    for &want in ports {
        // Find one port number free on every address for both protocols.
        let mut attempt = 0;
        loop {
            attempt += 1;
            match bind_all(bind, want) {
                Ok((port, t, u)) => {
                    chosen.push(port);
                    tcp.extend(t);
                    udp.extend(u);
                    break;
                }
                Err(e) if want == 0 && attempt < 50 => {
                    let _ = e;
                }
                Err(e) => {
                    eprintln!("serve: cannot bind port {want}: {e}");
                    std::process::exit(1);
                }
            }
        }
    }
    for l in tcp {
        std::thread::spawn(move || {
            for stream in l.incoming().flatten() {
                std::thread::spawn(move || {
                    let mut s = stream;
                    let mut buf = [0u8; 4];
                    if s.read_exact(&mut buf).is_ok() {
                        let _ = s.write_all(&buf);
                    }
                });
            }
        });
    }
    for u in udp {
        std::thread::spawn(move || {
            let mut buf = [0u8; 64];
            while let Ok((n, from)) = u.recv_from(&mut buf) {
                let _ = u.send_to(&buf[..n], from);
            }
        });
    }
    let list: Vec<String> = chosen.iter().map(|p| p.to_string()).collect();
    println!("ready {}", list.join(" "));
    let _ = std::io::stdout().flush();
    loop {
        std::thread::sleep(Duration::from_secs(3600));
    }
}

type Bound = (u16, Vec<TcpListener>, Vec<UdpSocket>);

fn bind_all(bind: &[std::net::IpAddr], want: u16) -> std::io::Result<Bound> {
    let mut port = want;
    let mut tcp = Vec::new();
    let mut udp = Vec::new();
    for ip in bind {
        let l = bind_tcp(SocketAddr::new(*ip, port))?;
        port = l.local_addr()?.port();
        tcp.push(l);
        udp.push(bind_udp(SocketAddr::new(*ip, port))?);
    }
    Ok((port, tcp, udp))
}

/// IPv6 listeners are v6-only so that an IPv4 listener can share the port number.
fn bind_tcp(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let domain = if addr.is_ipv4() {
        libc::AF_INET
    } else {
        libc::AF_INET6
    };
    let fd = socket(domain, libc::SOCK_STREAM)?;
    bind_fd(&fd, addr)?;
    // SAFETY: fd is a valid bound socket.
    if unsafe { libc::listen(std::os::fd::AsRawFd::as_raw_fd(&fd), 128) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(TcpListener::from(fd))
}

fn bind_udp(addr: SocketAddr) -> std::io::Result<UdpSocket> {
    let domain = if addr.is_ipv4() {
        libc::AF_INET
    } else {
        libc::AF_INET6
    };
    let fd = socket(domain, libc::SOCK_DGRAM)?;
    bind_fd(&fd, addr)?;
    Ok(UdpSocket::from(fd))
}

fn socket(domain: i32, ty: i32) -> std::io::Result<std::os::fd::OwnedFd> {
    use std::os::fd::{FromRawFd, OwnedFd};
    // SAFETY: plain socket(2); the fd is owned right away.
    let fd = unsafe { libc::socket(domain, ty | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: fd is a new, valid descriptor.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let one: libc::c_int = 1;
    let set = |level, name| {
        // SAFETY: valid fd and option pointer.
        unsafe {
            libc::setsockopt(
                std::os::fd::AsRawFd::as_raw_fd(&fd),
                level,
                name,
                &one as *const _ as *const libc::c_void,
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        }
    };
    set(libc::SOL_SOCKET, libc::SO_REUSEADDR);
    if domain == libc::AF_INET6 {
        set(libc::IPPROTO_IPV6, libc::IPV6_V6ONLY);
    }
    Ok(fd)
}

fn bind_fd(fd: &std::os::fd::OwnedFd, addr: SocketAddr) -> std::io::Result<()> {
    let sa = nix::sys::socket::SockaddrStorage::from(addr);
    nix::sys::socket::bind(std::os::fd::AsRawFd::as_raw_fd(fd), &sa)?;
    Ok(())
}

/// A TCP connection from a chosen source address (ephemeral port), with a timeout.
fn connect_from(src: std::net::IpAddr, to: SocketAddr) -> std::io::Result<TcpStream> {
    use std::os::fd::AsRawFd;
    let domain = if to.is_ipv4() {
        libc::AF_INET
    } else {
        libc::AF_INET6
    };
    let fd = socket(domain, libc::SOCK_STREAM)?;
    bind_fd(&fd, SocketAddr::new(src, 0))?;
    let sa = nix::sys::socket::SockaddrStorage::from(to);
    // Non-blocking connect with a poll timeout.
    // SAFETY: valid fd.
    unsafe {
        let flags = libc::fcntl(fd.as_raw_fd(), libc::F_GETFL);
        libc::fcntl(fd.as_raw_fd(), libc::F_SETFL, flags | libc::O_NONBLOCK);
    }
    match nix::sys::socket::connect(fd.as_raw_fd(), &sa) {
        Ok(()) => {}
        Err(nix::errno::Errno::EINPROGRESS) => {
            let mut pfd = libc::pollfd {
                fd: fd.as_raw_fd(),
                events: libc::POLLOUT,
                revents: 0,
            };
            // SAFETY: one valid pollfd.
            let n = unsafe { libc::poll(&mut pfd, 1, TIMEOUT.as_millis() as i32) };
            if n == 0 {
                return Err(std::io::Error::from_raw_os_error(libc::ETIMEDOUT));
            }
            let err: i32 =
                nix::sys::socket::getsockopt(&fd, nix::sys::socket::sockopt::SocketError)?;
            if err != 0 {
                return Err(std::io::Error::from_raw_os_error(err));
            }
        }
        Err(e) => return Err(e.into()),
    }
    // SAFETY: valid fd.
    unsafe {
        let flags = libc::fcntl(fd.as_raw_fd(), libc::F_GETFL);
        libc::fcntl(fd.as_raw_fd(), libc::F_SETFL, flags & !libc::O_NONBLOCK);
    }
    Ok(TcpStream::from(fd))
}

/// One ICMP echo request on an ICMP socket, and its reply.
fn echo(sock: &UdpSocket, to: std::net::Ipv4Addr, kind: SocketKind) -> std::io::Result<()> {
    // type 8 (echo request), code 0, checksum, id, seq 1, payload.
    let mut pkt = [8u8, 0, 0, 0, 0x12, 0x34, 0, 1, b'z', b't', b'z', b't'];
    let sum = checksum(&pkt);
    pkt[2..4].copy_from_slice(&sum.to_be_bytes());
    sock.set_read_timeout(Some(TIMEOUT))?;
    sock.send_to(&pkt, SocketAddr::new(to.into(), 0))?;
    let mut buf = [0u8; 256];
    loop {
        let n = sock.recv(&mut buf)?;
        // Raw sockets see the IP header first; ping sockets see only ICMP.
        let icmp = match kind {
            SocketKind::Raw => &buf[((buf[0] & 0x0f) as usize * 4).min(n)..n],
            SocketKind::Icmp | SocketKind::Packet => &buf[..n],
        };
        if icmp.first() == Some(&0) {
            return Ok(());
        }
    }
}

fn checksum(data: &[u8]) -> u16 {
    let mut sum: u32 = 0;
    for chunk in data.chunks(2) {
        let word = u16::from_be_bytes([chunk[0], *chunk.get(1).unwrap_or(&0)]);
        sum += word as u32;
    }
    while sum >> 16 != 0 {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// Connect now; send later, once per stdin line.
fn hold(addr: SocketAddr, bind_port: u16, cmsg: Cmsg) {
    let sock = match held_socket(addr, bind_port) {
        Ok(s) => s,
        Err(e) => {
            println!("{}", outcome(Err(e)));
            return;
        }
    };
    let _ = sock.set_read_timeout(Some(TIMEOUT));
    println!("ready");
    let _ = std::io::stdout().flush();
    let mut line = String::new();
    while std::io::stdin()
        .read_line(&mut line)
        .map(|n| n > 0)
        .unwrap_or(false)
    {
        line.clear();
        let r = send_with(&sock, addr.is_ipv6(), cmsg).and_then(|_| {
            let mut buf = [0u8; 4];
            let n = sock.recv(&mut buf)?;
            expect_echo(&buf[..n])
        });
        println!("{}", outcome(r));
        let _ = std::io::stdout().flush();
    }
}

fn held_socket(addr: SocketAddr, bind_port: u16) -> std::io::Result<UdpSocket> {
    let domain = if addr.is_ipv4() {
        libc::AF_INET
    } else {
        libc::AF_INET6
    };
    let fd = socket(domain, libc::SOCK_DGRAM)?;
    let local = if addr.is_ipv4() {
        SocketAddr::from(([0, 0, 0, 0], bind_port))
    } else {
        SocketAddr::from(([0u16; 8], bind_port))
    };
    bind_fd(&fd, local)?;
    let sock = UdpSocket::from(fd);
    sock.connect(addr)?;
    Ok(sock)
}

/// `send()` of "ping" on a connected socket, with one control message.
fn send_with(sock: &UdpSocket, v6: bool, cmsg: Cmsg) -> std::io::Result<usize> {
    use std::os::fd::AsRawFd;
    let (level, kind, data): (i32, i32, Vec<u8>) = match (cmsg, v6) {
        (Cmsg::None, _) => return sock.send(b"ping"),
        (Cmsg::Tos, false) => (libc::IPPROTO_IP, libc::IP_TOS, 1i32.to_ne_bytes().to_vec()),
        (Cmsg::Tos, true) => (
            libc::IPPROTO_IPV6,
            libc::IPV6_TCLASS,
            1i32.to_ne_bytes().to_vec(),
        ),
        (Cmsg::Gso, _) => (
            libc::SOL_UDP,
            libc::UDP_SEGMENT,
            1200u16.to_ne_bytes().to_vec(),
        ),
        (Cmsg::Pktinfo, false) => (
            libc::IPPROTO_IP,
            libc::IP_PKTINFO,
            vec![0u8; std::mem::size_of::<libc::in_pktinfo>()],
        ),
        (Cmsg::Pktinfo, true) => (
            libc::IPPROTO_IPV6,
            libc::IPV6_PKTINFO,
            vec![0u8; std::mem::size_of::<libc::in6_pktinfo>()],
        ),
    };
    // SAFETY: CMSG_SPACE is a pure size computation.
    let space = unsafe { libc::CMSG_SPACE(data.len() as u32) } as usize;
    let mut control = vec![0u8; space];
    let mut payload = *b"ping";
    let mut iov = libc::iovec {
        iov_base: payload.as_mut_ptr().cast(),
        iov_len: payload.len(),
    };
    // SAFETY: msghdr is plain data; every pointer set below outlives the sendmsg call.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    msg.msg_controllen = space as _;
    // SAFETY: the control buffer holds one cmsg of CMSG_SPACE(len) bytes.
    unsafe {
        let c = libc::CMSG_FIRSTHDR(&msg);
        (*c).cmsg_level = level;
        (*c).cmsg_type = kind;
        (*c).cmsg_len = libc::CMSG_LEN(data.len() as u32) as _;
        std::ptr::copy_nonoverlapping(data.as_ptr(), libc::CMSG_DATA(c), data.len());
    }
    // SAFETY: valid fd and msghdr (no name: the connected peer).
    let n = unsafe { libc::sendmsg(sock.as_raw_fd(), &msg, 0) };
    if n < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

/// See `Cmd::Bound`.
fn bound(proto: Proto, port: u16, addr: SocketAddr, op: BoundOp) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    let domain = if addr.is_ipv4() {
        libc::AF_INET
    } else {
        libc::AF_INET6
    };
    let local = if addr.is_ipv4() {
        SocketAddr::from(([0, 0, 0, 0], port))
    } else {
        SocketAddr::from(([0u16; 8], port))
    };
    match proto {
        Proto::Udp => {
            let fd = socket(domain, libc::SOCK_DGRAM)?;
            bind_fd(&fd, local)?;
            let s = UdpSocket::from(fd);
            s.set_read_timeout(Some(TIMEOUT))?;
            match op {
                BoundOp::Connect => {
                    s.connect(addr)?;
                    s.send(b"ping")?;
                }
                _ => {
                    s.send_to(b"ping", addr)?;
                }
            }
            let mut buf = [0u8; 4];
            let n = s.recv(&mut buf)?;
            expect_echo(&buf[..n])
        }
        Proto::Tcp => {
            let fd = socket(domain, libc::SOCK_STREAM)?;
            bind_fd(&fd, local)?;
            let sa = nix::sys::socket::SockaddrStorage::from(addr);
            if op == BoundOp::Fastopen {
                let payload = b"ping";
                // SAFETY: valid fd, buffer and address.
                let n = unsafe {
                    libc::sendto(
                        fd.as_raw_fd(),
                        payload.as_ptr().cast(),
                        payload.len(),
                        libc::MSG_FASTOPEN,
                        nix::sys::socket::SockaddrLike::as_ptr(&sa),
                        nix::sys::socket::SockaddrLike::len(&sa),
                    )
                };
                if n < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                let mut s = TcpStream::from(fd);
                s.set_read_timeout(Some(TIMEOUT))?;
                let mut buf = [0u8; 4];
                s.read_exact(&mut buf)?;
                return expect_echo(&buf);
            }
            nix::sys::socket::connect(fd.as_raw_fd(), &sa)?;
            let mut s = TcpStream::from(fd);
            s.set_read_timeout(Some(TIMEOUT))?;
            s.write_all(b"ping")?;
            let mut buf = [0u8; 4];
            s.read_exact(&mut buf)?;
            expect_echo(&buf)
        }
    }
}

/// See `Cmd::Recv`.
fn recv(bind: SocketAddr) {
    let domain = if bind.is_ipv4() {
        libc::AF_INET
    } else {
        libc::AF_INET6
    };
    let sock = socket(domain, libc::SOCK_DGRAM).and_then(|fd| {
        if domain == libc::AF_INET6 {
            nix::sys::socket::setsockopt(&fd, nix::sys::socket::sockopt::Ipv6V6Only, &false)?;
        }
        bind_fd(&fd, bind)?;
        Ok(UdpSocket::from(fd))
    });
    let sock = match sock {
        Ok(s) => s,
        Err(e) => {
            println!("{}", outcome(Err(e)));
            return;
        }
    };
    let port = sock.local_addr().map(|a| a.port()).unwrap_or(0);
    println!("ready {port}");
    let _ = std::io::stdout().flush();
    let mut buf = [0u8; 256];
    while let Ok((n, from)) = sock.recv_from(&mut buf) {
        let ip = match from.ip() {
            std::net::IpAddr::V6(v6) => v6
                .to_ipv4_mapped()
                .map(std::net::IpAddr::V4)
                .unwrap_or(std::net::IpAddr::V6(v6)),
            v4 => v4,
        };
        println!("got {ip} {}", String::from_utf8_lossy(&buf[..n]));
        let _ = std::io::stdout().flush();
    }
}

/// See `Cmd::SendExt6`.
fn send_ext6(
    src: std::net::Ipv6Addr,
    dst: std::net::Ipv6Addr,
    port: u16,
    ext: u8,
    payload: &[u8],
) -> std::io::Result<()> {
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
    const DSTOPTS: u8 = 60;
    const UDP: u8 = 17;
    let udp_len = 8 + payload.len();
    let mut udp = Vec::with_capacity(udp_len);
    udp.extend_from_slice(&40000u16.to_be_bytes());
    udp.extend_from_slice(&port.to_be_bytes());
    udp.extend_from_slice(&(udp_len as u16).to_be_bytes());
    udp.extend_from_slice(&[0, 0]);
    udp.extend_from_slice(payload);
    // Checksum over the pseudo-header (addresses, length, next header 17) and the datagram.
    let mut pseudo = Vec::new();
    pseudo.extend_from_slice(&src.octets());
    pseudo.extend_from_slice(&dst.octets());
    pseudo.extend_from_slice(&(udp_len as u32).to_be_bytes());
    pseudo.extend_from_slice(&[0, 0, 0, UDP]);
    pseudo.extend_from_slice(&udp);
    let sum = match checksum(&pseudo) {
        0 => 0xffff,
        s => s,
    };
    udp[6..8].copy_from_slice(&sum.to_be_bytes());
    let mut chain = Vec::new();
    for i in 0..ext {
        let next = if i + 1 == ext { UDP } else { DSTOPTS };
        // Next header, length 0 (8 bytes), PadN option of 4 bytes.
        chain.extend_from_slice(&[next, 0, 1, 4, 0, 0, 0, 0]);
    }
    let first = if ext == 0 { UDP } else { DSTOPTS };
    let plen = chain.len() + udp.len();
    let mut pkt = vec![0x60, 0, 0, 0];
    pkt.extend_from_slice(&(plen as u16).to_be_bytes());
    pkt.extend_from_slice(&[first, 64]);
    pkt.extend_from_slice(&src.octets());
    pkt.extend_from_slice(&dst.octets());
    pkt.extend_from_slice(&chain);
    pkt.extend_from_slice(&udp);
    // SAFETY: plain socket(2); owned right away.
    let fd = unsafe { libc::socket(libc::AF_INET6, libc::SOCK_RAW, libc::IPPROTO_RAW) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: fd is a new, valid descriptor.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let to = nix::sys::socket::SockaddrStorage::from(SocketAddr::from((dst, 0)));
    // SAFETY: valid fd, buffer and address.
    let n = unsafe {
        libc::sendto(
            fd.as_raw_fd(),
            pkt.as_ptr().cast(),
            pkt.len(),
            0,
            nix::sys::socket::SockaddrLike::as_ptr(&to),
            nix::sys::socket::SockaddrLike::len(&to),
        )
    };
    if n < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// See `Cmd::PassFd`. Single-threaded until the fork, so forking is sound.
fn pass_fd(addr: SocketAddr, to_uid: u32) -> String {
    use nix::sys::socket::{
        recvmsg, sendmsg, socketpair, AddressFamily, ControlMessage, ControlMessageOwned, MsgFlags,
        SockFlag, SockType,
    };
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
    let local = if addr.is_ipv4() {
        "0.0.0.0:0"
    } else {
        "[::]:0"
    };
    let udp = match UdpSocket::bind(local) {
        Ok(s) => s,
        Err(e) => return outcome(Err(e)),
    };
    let (parent, child) = match socketpair(
        AddressFamily::Unix,
        SockType::Stream,
        None,
        SockFlag::empty(),
    ) {
        Ok(p) => p,
        Err(e) => return format!("error:socketpair:{e}"),
    };
    let mut out = [0i32; 2];
    // SAFETY: a pipe for the child's answer.
    if unsafe { libc::pipe(out.as_mut_ptr()) } != 0 {
        return "error:pipe".to_string();
    }
    // SAFETY: this process has a single thread here.
    match unsafe { nix::unistd::fork() } {
        Err(e) => format!("error:fork:{e}"),
        Ok(nix::unistd::ForkResult::Child) => {
            drop(parent);
            let uid = nix::unistd::Uid::from_raw(to_uid);
            let answer = match nix::unistd::setresuid(uid, uid, uid) {
                Err(e) => format!("error:setuid:{e}"),
                Ok(()) => {
                    let mut buf = [0u8; 1];
                    let mut iov = [std::io::IoSliceMut::new(&mut buf)];
                    let mut cmsg = nix::cmsg_space!([std::os::fd::RawFd; 1]);
                    match recvmsg::<()>(
                        child.as_raw_fd(),
                        &mut iov,
                        Some(&mut cmsg),
                        MsgFlags::empty(),
                    ) {
                        Err(e) => format!("error:recvmsg:{e}"),
                        Ok(msg) => {
                            let fd = msg.cmsgs().ok().and_then(|mut c| {
                                c.find_map(|m| match m {
                                    ControlMessageOwned::ScmRights(fds) => fds.first().copied(),
                                    _ => None,
                                })
                            });
                            match fd {
                                None => "error:no fd passed".to_string(),
                                Some(fd) => {
                                    // SAFETY: the fd was just received and is ours.
                                    let s = UdpSocket::from(unsafe { OwnedFd::from_raw_fd(fd) });
                                    let _ = s.set_read_timeout(Some(TIMEOUT));
                                    outcome(s.send_to(b"ping", addr).and_then(|_| {
                                        let mut b = [0u8; 4];
                                        let n = s.recv(&mut b)?;
                                        expect_echo(&b[..n])
                                    }))
                                }
                            }
                        }
                    }
                }
            };
            // SAFETY: write to our pipe, then leave without running the parent's destructors.
            unsafe {
                libc::write(out[1], answer.as_ptr().cast(), answer.len());
                libc::_exit(0);
            }
        }
        Ok(nix::unistd::ForkResult::Parent { child: pid }) => {
            drop(child);
            // SAFETY: the write end belongs to the child now.
            unsafe { libc::close(out[1]) };
            let fds = [udp.as_raw_fd()];
            let iov = [std::io::IoSlice::new(b"f")];
            let sent = sendmsg::<()>(
                parent.as_raw_fd(),
                &iov,
                &[ControlMessage::ScmRights(&fds)],
                MsgFlags::empty(),
                None,
            );
            let _ = nix::sys::wait::waitpid(pid, None);
            if let Err(e) = sent {
                return format!("error:sendmsg:{e}");
            }
            // SAFETY: the read end is ours.
            let mut reader = std::fs::File::from(unsafe { OwnedFd::from_raw_fd(out[0]) });
            let mut answer = String::new();
            let _ = reader.read_to_string(&mut answer);
            answer
        }
    }
}

/// See `Cmd::Load`.
fn load(addrs: &[SocketAddr], duration: Duration, pause: Duration) {
    use std::os::fd::AsRawFd;
    use std::sync::atomic::{AtomicBool, Ordering};
    let stop = std::sync::Arc::new(AtomicBool::new(false));
    {
        let stop = std::sync::Arc::clone(&stop);
        std::thread::spawn(move || {
            let mut line = String::new();
            let _ = std::io::stdin().read_line(&mut line);
            stop.store(true, Ordering::Relaxed);
        });
    }
    let mut v4 = None;
    let mut v6 = None;
    // (ok, eperm, other) per address.
    let mut counts = vec![(0u64, 0u64, 0u64); addrs.len()];
    let mut rounds = 0u64;
    println!("ready");
    let _ = std::io::stdout().flush();
    let end = std::time::Instant::now() + duration;
    while !stop.load(Ordering::Relaxed) && std::time::Instant::now() < end {
        for (addr, c) in addrs.iter().zip(counts.iter_mut()) {
            let slot = if addr.is_ipv4() { &mut v4 } else { &mut v6 };
            if slot.is_none() {
                let domain = if addr.is_ipv4() {
                    libc::AF_INET
                } else {
                    libc::AF_INET6
                };
                *slot = socket(domain, libc::SOCK_DGRAM).ok();
            }
            let Some(fd) = slot.as_ref() else {
                c.2 += 1;
                continue;
            };
            let to = nix::sys::socket::SockaddrStorage::from(*addr);
            match nix::sys::socket::connect(fd.as_raw_fd(), &to) {
                Ok(()) => c.0 += 1,
                Err(nix::errno::Errno::EPERM) => c.1 += 1,
                Err(_) => c.2 += 1,
            }
        }
        rounds += 1;
        if !pause.is_zero() {
            std::thread::sleep(pause);
        }
    }
    let ports: Vec<serde_json::Value> = addrs
        .iter()
        .zip(&counts)
        .map(|(a, (ok, eperm, other))| {
            serde_json::json!({"addr": a.to_string(), "ok": ok, "eperm": eperm, "other": other})
        })
        .collect();
    println!("{}", serde_json::json!({"rounds": rounds, "ports": ports}));
    let _ = std::io::stdout().flush();
}

/// See `Cmd::HoldTcp`.
fn hold_tcp(addr: SocketAddr, timeout: Duration) {
    let mut sock = match TcpStream::connect_timeout(&addr, TIMEOUT) {
        Ok(s) => s,
        Err(e) => {
            println!("{}", outcome(Err(e)));
            return;
        }
    };
    let _ = sock.set_read_timeout(Some(timeout));
    let _ = sock.set_nodelay(true);
    println!("ready");
    let _ = std::io::stdout().flush();
    let mut broken = false;
    let mut line = String::new();
    while std::io::stdin()
        .read_line(&mut line)
        .map(|n| n > 0)
        .unwrap_or(false)
    {
        line.clear();
        let answer = if broken {
            "broken".to_string()
        } else {
            let r = sock.write_all(b"ping").and_then(|()| {
                let mut buf = [0u8; 4];
                sock.read_exact(&mut buf)?;
                expect_echo(&buf)
            });
            broken = r.is_err();
            outcome(r)
        };
        println!("{answer}");
        let _ = std::io::stdout().flush();
    }
}

/// See `Cmd::Session`.
fn session() {
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
    let stdin = std::io::stdin();
    let mut out = std::io::stdout().lock();
    let mut kept: Vec<Option<OwnedFd>> = Vec::new();
    let mut line = String::new();
    while stdin.read_line(&mut line).map(|n| n > 0).unwrap_or(false) {
        let words: Vec<&str> = line.split_whitespace().collect();
        let answer = match words.as_slice() {
            ["keep", "udp", addr, rest @ ..] => match addr.parse::<SocketAddr>() {
                Ok(addr) => {
                    let addr = match (rest.contains(&"mapped"), addr) {
                        (true, SocketAddr::V4(v4)) => {
                            SocketAddr::new(v4.ip().to_ipv6_mapped().into(), v4.port())
                        }
                        (_, a) => a,
                    };
                    let domain = if addr.is_ipv4() {
                        libc::AF_INET
                    } else {
                        libc::AF_INET6
                    };
                    // SAFETY: plain socket(2); the fd is owned right away.
                    let fd =
                        unsafe { libc::socket(domain, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
                    if fd < 0 {
                        kept.push(None);
                        outcome(Err(std::io::Error::last_os_error()))
                    } else {
                        // SAFETY: fd is a new, valid descriptor.
                        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
                        let to = nix::sys::socket::SockaddrStorage::from(addr);
                        match nix::sys::socket::connect(fd.as_raw_fd(), &to) {
                            Ok(()) => {
                                kept.push(Some(fd));
                                "ok".to_string()
                            }
                            Err(e) => {
                                kept.push(None);
                                if e == nix::errno::Errno::EPERM {
                                    "eperm".to_string()
                                } else {
                                    format!("error:{e}")
                                }
                            }
                        }
                    }
                }
                Err(_) => format!("error:bad address {addr}"),
            },
            ["send", n] => match n.parse::<usize>().ok().and_then(|i| kept.get(i)) {
                Some(Some(fd)) => match nix::sys::socket::send(
                    fd.as_raw_fd(),
                    b"zt",
                    nix::sys::socket::MsgFlags::MSG_DONTWAIT,
                ) {
                    Ok(_)
                    | Err(nix::errno::Errno::ECONNREFUSED)
                    | Err(nix::errno::Errno::EAGAIN) => "ok".to_string(),
                    Err(nix::errno::Errno::EPERM) => "eperm".to_string(),
                    Err(e) => format!("error:{e}"),
                },
                _ => format!("error:no kept socket {n}"),
            },
            _ => "error:bad line".to_string(),
        };
        let _ = writeln!(out, "{answer}");
        let _ = out.flush();
        line.clear();
    }
}

/// See `Cmd::Batch`.
fn batch() {
    let stdin = std::io::stdin();
    let mut out = std::io::BufWriter::new(std::io::stdout().lock());
    let mut line = String::new();
    while stdin.read_line(&mut line).map(|n| n > 0).unwrap_or(false) {
        let words: Vec<&str> = line.split_whitespace().collect();
        match words.as_slice() {
            [] => {}
            ["flush"] => {
                let _ = out.flush();
            }
            ["exec", path] => {
                let _ = out.flush();
                let e = exec(
                    std::path::Path::new(path),
                    None,
                    false,
                    &["batch".to_string()],
                );
                let _ = writeln!(out, "error:{e}");
                let _ = out.flush();
            }
            _ => {
                let _ = writeln!(out, "{}", batch_case(&words));
            }
        }
        line.clear();
    }
    let _ = out.flush();
}

fn batch_case(words: &[&str]) -> String {
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
    let (Some(proto), Some(addr)) = (words.first(), words.get(1)) else {
        return "error:bad line".to_string();
    };
    let Ok(addr) = addr.parse::<SocketAddr>() else {
        return format!("error:bad address {addr}");
    };
    let mapped = words.contains(&"mapped");
    let send = words.contains(&"send");
    let bind = words.contains(&"bind");
    let addr = match (mapped, addr) {
        (true, SocketAddr::V4(v4)) => SocketAddr::new(v4.ip().to_ipv6_mapped().into(), v4.port()),
        (_, a) => a,
    };
    let ty = match *proto {
        "tcp" => libc::SOCK_STREAM | libc::SOCK_NONBLOCK,
        "udp" => libc::SOCK_DGRAM,
        other => return format!("error:bad proto {other}"),
    };
    let domain = if addr.is_ipv4() {
        libc::AF_INET
    } else {
        libc::AF_INET6
    };
    // Dual-stack (not v6-only) so that mapped addresses work.
    // SAFETY: plain socket(2); the fd is owned right away.
    let fd = unsafe { libc::socket(domain, ty | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return outcome(Err(std::io::Error::last_os_error()));
    }
    // SAFETY: fd is a new, valid descriptor.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let to = nix::sys::socket::SockaddrStorage::from(addr);
    if bind {
        let _ = nix::sys::socket::setsockopt(&fd, nix::sys::socket::sockopt::ReuseAddr, &true);
        return match nix::sys::socket::bind(fd.as_raw_fd(), &to) {
            // Past zt's hook: the kernel's own checks may still refuse the address.
            Ok(()) | Err(nix::errno::Errno::EADDRINUSE) | Err(nix::errno::Errno::EACCES) => {
                "ok".to_string()
            }
            Err(nix::errno::Errno::EPERM) => "eperm".to_string(),
            Err(e) => format!("error:{e}"),
        };
    }
    let r = if send {
        nix::sys::socket::sendto(
            fd.as_raw_fd(),
            b"zt",
            &to,
            nix::sys::socket::MsgFlags::MSG_DONTWAIT,
        )
        .map(drop)
    } else {
        nix::sys::socket::connect(fd.as_raw_fd(), &to)
    };
    match r {
        Ok(())
        | Err(nix::errno::Errno::EINPROGRESS)
        | Err(nix::errno::Errno::ECONNREFUSED)
        | Err(nix::errno::Errno::EAGAIN) => "ok".to_string(),
        Err(nix::errno::Errno::EPERM) => "eperm".to_string(),
        Err(e) => format!("error:{e}"),
    }
}

/// See `Cmd::Disguise`. Everything here runs with no other thread in this process.
mod disguise {
    use std::{ffi::c_void, os::fd::AsRawFd, path::Path};

    /// `struct prctl_mm_map` (linux/prctl.h).
    #[repr(C)]
    #[derive(Clone, Copy, Default)]
    struct MmMap {
        start_code: u64,
        end_code: u64,
        start_data: u64,
        end_data: u64,
        start_brk: u64,
        brk: u64,
        start_stack: u64,
        arg_start: u64,
        arg_end: u64,
        env_start: u64,
        env_end: u64,
        auxv: u64,
        auxv_size: u32,
        exe_fd: u32,
    }

    const PR_SET_MM: i32 = 35;
    const PR_SET_MM_MAP: u64 = 14;

    /// One mapping of this program's own file: `[start, end)` and its protection.
    #[derive(Clone, Copy)]
    struct Region {
        start: usize,
        end: usize,
        prot: i32,
    }

    /// What the `CLONE_VM` child needs, and where it reports (shared memory).
    struct Job {
        map: MmMap,
        regions: Vec<Region>,
        error: Option<String>,
    }

    fn errno(step: &str) -> String {
        format!("{step}:{}", std::io::Error::last_os_error())
    }

    pub fn run(as_exe: &Path, clone_vm: bool) -> Result<(), String> {
        let file = std::fs::File::open(as_exe).map_err(|e| format!("open:{e}"))?;
        let map = MmMap {
            exe_fd: file.as_raw_fd() as u32,
            ..current_layout()?
        };
        let regions = own_regions()?;
        let mut job = Job {
            map,
            regions,
            error: None,
        };
        if !clone_vm {
            return swap(&job.map, &job.regions);
        }
        let mut stack = vec![0u8; 1 << 20];
        // SAFETY: the stack is ours and outlives the child (we wait for it); the child
        // shares our memory (CLONE_VM) and reports through `job`, which we read only after
        // it exited.
        let pid = unsafe {
            let top = stack.as_mut_ptr().add(stack.len() & !15);
            libc::clone(
                child,
                top.cast(),
                libc::CLONE_VM | libc::SIGCHLD,
                std::ptr::from_mut(&mut job).cast(),
            )
        };
        if pid < 0 {
            return Err(errno("clone"));
        }
        let mut status = 0;
        // SAFETY: plain waitpid on our child.
        if unsafe { libc::waitpid(pid, &mut status, 0) } != pid {
            return Err(errno("waitpid"));
        }
        drop(stack);
        match job.error.take() {
            Some(e) => Err(format!("child:{e}")),
            None if status == 0 => Ok(()),
            None => Err(format!("child:status {status}")),
        }
    }

    extern "C" fn child(arg: *mut c_void) -> i32 {
        // SAFETY: `arg` is the parent's `Job`, untouched by the parent until we exit.
        let job = unsafe { &mut *arg.cast::<Job>() };
        match swap(&job.map, &job.regions) {
            Ok(()) => 0,
            Err(e) => {
                job.error = Some(e);
                1
            }
        }
    }

    /// Enter a user namespace (CAP_CHECKPOINT_RESTORE there), unmap our own file, swap exe.
    fn swap(map: &MmMap, regions: &[Region]) -> Result<(), String> {
        // SAFETY: plain system calls; each region is replaced by an identical anonymous copy
        // (the code running here included: mremap swaps it in one step).
        unsafe {
            if libc::unshare(libc::CLONE_NEWUSER) != 0 {
                return Err(errno("unshare"));
            }
            for r in regions {
                let len = r.end - r.start;
                let copy = libc::mmap(
                    std::ptr::null_mut(),
                    len,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                    -1,
                    0,
                );
                if copy == libc::MAP_FAILED {
                    return Err(errno("mmap"));
                }
                if r.prot & libc::PROT_READ != 0 {
                    std::ptr::copy_nonoverlapping(r.start as *const u8, copy.cast::<u8>(), len);
                }
                if libc::mprotect(copy, len, r.prot) != 0 {
                    return Err(errno("mprotect"));
                }
                let moved = libc::mremap(
                    copy,
                    len,
                    len,
                    libc::MREMAP_MAYMOVE | libc::MREMAP_FIXED,
                    r.start as *mut c_void,
                );
                if moved == libc::MAP_FAILED {
                    return Err(errno("mremap"));
                }
            }
            let mut map = *map;
            map.brk = libc::sbrk(0) as u64;
            if libc::prctl(
                PR_SET_MM,
                PR_SET_MM_MAP,
                std::ptr::from_ref(&map),
                std::mem::size_of::<MmMap>(),
                0,
            ) != 0
            {
                return Err(errno("prctl"));
            }
        }
        Ok(())
    }

    /// The memory layout `PR_SET_MM_MAP` must be given back unchanged, from
    /// `/proc/self/stat` (fields 26-28 and 45-51).
    fn current_layout() -> Result<MmMap, String> {
        let stat = std::fs::read_to_string("/proc/self/stat").map_err(|e| format!("stat:{e}"))?;
        let rest = stat.rsplit_once(')').map(|(_, r)| r).ok_or("stat:format")?;
        // Field 3 (state) is the first after the command name.
        let fields: Vec<u64> = rest
            .split_whitespace()
            .map(|f| f.parse().unwrap_or(0))
            .collect();
        let field = |n: usize| fields.get(n - 3).copied().unwrap_or(0);
        Ok(MmMap {
            start_code: field(26),
            end_code: field(27),
            start_stack: field(28),
            start_data: field(45),
            end_data: field(46),
            start_brk: field(47),
            arg_start: field(48),
            arg_end: field(49),
            env_start: field(50),
            env_end: field(51),
            ..MmMap::default()
        })
    }

    /// Every mapping of the file `/proc/self/exe` names.
    fn own_regions() -> Result<Vec<Region>, String> {
        let exe = std::fs::read_link("/proc/self/exe").map_err(|e| format!("exe:{e}"))?;
        let exe = exe.to_string_lossy().into_owned();
        let maps = std::fs::read_to_string("/proc/self/maps").map_err(|e| format!("maps:{e}"))?;
        let mut out = Vec::new();
        for line in maps.lines() {
            let cols: Vec<&str> = line.splitn(6, ' ').collect();
            let path = cols.get(5).map(|p| p.trim_start()).unwrap_or("");
            if path != exe {
                continue;
            }
            let (Some(range), Some(perms)) = (cols.first(), cols.get(1)) else {
                continue;
            };
            let Some((a, b)) = range.split_once('-') else {
                continue;
            };
            let (Ok(start), Ok(end)) = (usize::from_str_radix(a, 16), usize::from_str_radix(b, 16))
            else {
                continue;
            };
            let p = perms.as_bytes();
            let mut prot = libc::PROT_NONE;
            if p.first() == Some(&b'r') {
                prot |= libc::PROT_READ;
            }
            if p.get(1) == Some(&b'w') {
                prot |= libc::PROT_WRITE;
            }
            if p.get(2) == Some(&b'x') {
                prot |= libc::PROT_EXEC;
            }
            out.push(Region { start, end, prot });
        }
        if out.is_empty() {
            return Err(format!("maps:no mapping of {exe}"));
        }
        Ok(out)
    }
}

/// Run `f` in a forked child; its outcome comes back as the exit code (ok 0, eperm 1).
fn in_child(f: impl FnOnce() -> String) -> String {
    // SAFETY: single-threaded here; the child only makes one call and exits.
    match unsafe { libc::fork() } {
        -1 => format!("error:fork:{}", std::io::Error::last_os_error()),
        0 => {
            let code = match f().as_str() {
                "ok" => 0,
                "eperm" => 1,
                _ => 2,
            };
            // SAFETY: leave the child at once, without running the parent's exit handlers.
            unsafe { libc::_exit(code) }
        }
        pid => {
            let mut status = 0;
            // SAFETY: plain waitpid on our child.
            unsafe { libc::waitpid(pid, &mut status, 0) };
            match libc::WIFEXITED(status).then(|| libc::WEXITSTATUS(status)) {
                Some(0) => "ok".to_string(),
                Some(1) => "eperm".to_string(),
                _ => format!("error:child status {status}"),
            }
        }
    }
}
