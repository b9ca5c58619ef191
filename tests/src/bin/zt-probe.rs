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
enum Proto {
    Tcp,
    Udp,
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
    },
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
        } => {
            if let Err(e) = enter(cgroup, netns, gid, uid, euid) {
                println!("error:setup:{e}");
                return;
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
            println!("{}", outcome(call(proto, addr, unconnected)));
        }
        Cmd::Serve { bind, ports, netns } => {
            if let Err(e) = enter(None, netns, None, None, None) {
                eprintln!("serve: {e}");
                std::process::exit(1);
            }
            serve(&bind, &ports);
        }
    }
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

fn call(proto: Proto, addr: SocketAddr, unconnected: bool) -> std::io::Result<()> {
    match proto {
        Proto::Tcp => {
            let mut s = TcpStream::connect_timeout(&addr, TIMEOUT)?;
            s.set_read_timeout(Some(TIMEOUT))?;
            s.write_all(b"ping")?;
            let mut buf = [0u8; 4];
            s.read_exact(&mut buf)?;
            expect_echo(&buf)
        }
        Proto::Udp => {
            let local: SocketAddr = if addr.is_ipv4() {
                "0.0.0.0:0".parse().map_err(std::io::Error::other)?
            } else {
                "[::]:0".parse().map_err(std::io::Error::other)?
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
