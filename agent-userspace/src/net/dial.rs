//! Where upstream connections come from: the daemon's own network namespace, or one named
//! in the configuration (an egress namespace, or the fake internet in tests). A socket
//! belongs to the namespace it was created in, so a thread that entered the namespace
//! creates them and the proxy connects them from anywhere. The DNS resolver takes its
//! upstream UDP sockets from the same place.
use std::{
    fs::File,
    io,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    os::fd::{AsRawFd, OwnedFd},
    path::Path,
    sync::{mpsc, Arc, Mutex},
    time::{Duration, Instant},
};

use tokio::net::{TcpSocket, TcpStream, UdpSocket};

type Reply = tokio::sync::oneshot::Sender<io::Result<OwnedFd>>;

/// What the namespace thread is asked to make.
#[derive(Clone, Copy, Debug)]
enum Kind {
    /// An unconnected TCP socket.
    Tcp { v6: bool },
    /// A UDP socket bound to the unspecified address, port 0 (a fresh random port).
    Udp { v6: bool },
}

/// A non-blocking, close-on-exec socket in the calling thread's network namespace.
fn new_socket(kind: Kind) -> io::Result<OwnedFd> {
    let (v6, type_) = match kind {
        Kind::Tcp { v6 } => (v6, libc::SOCK_STREAM),
        Kind::Udp { v6 } => (v6, libc::SOCK_DGRAM),
    };
    let domain = if v6 { libc::AF_INET6 } else { libc::AF_INET };
    // SAFETY: plain socket(2) call; the result is checked before taking ownership.
    let fd = unsafe { libc::socket(domain, type_ | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd is a freshly created descriptor we own.
    let fd = unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) };
    if let Kind::Udp { v6 } = kind {
        // The socket already belongs to this namespace; binding here just hands the caller
        // one that is ready to use, on a port the kernel picks.
        bind_unspecified(&fd, v6)?;
    }
    Ok(fd)
}

/// Binds a socket to the unspecified address of its family, port 0.
fn bind_unspecified(fd: &OwnedFd, v6: bool) -> io::Result<()> {
    let rc = if v6 {
        let addr = libc::sockaddr_in6 {
            sin6_family: libc::AF_INET6 as libc::sa_family_t,
            sin6_port: 0,
            sin6_flowinfo: 0,
            sin6_addr: libc::in6_addr { s6_addr: [0; 16] },
            sin6_scope_id: 0,
        };
        // SAFETY: `addr` is a valid sockaddr_in6 and the length is its size.
        unsafe {
            libc::bind(
                fd.as_raw_fd(),
                (&raw const addr).cast::<libc::sockaddr>(),
                std::mem::size_of_val(&addr) as libc::socklen_t,
            )
        }
    } else {
        let addr = libc::sockaddr_in {
            sin_family: libc::AF_INET as libc::sa_family_t,
            sin_port: 0,
            sin_addr: libc::in_addr { s_addr: 0 },
            sin_zero: [0; 8],
        };
        // SAFETY: `addr` is a valid sockaddr_in and the length is its size.
        unsafe {
            libc::bind(
                fd.as_raw_fd(),
                (&raw const addr).cast::<libc::sockaddr>(),
                std::mem::size_of_val(&addr) as libc::socklen_t,
            )
        }
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// The addresses of the calling thread's network namespace's interfaces.
pub fn local_addresses() -> io::Result<Vec<IpAddr>> {
    let mut head: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs fills `head` with a list this function frees below.
    if unsafe { libc::getifaddrs(&mut head) } != 0 {
        return Err(io::Error::last_os_error());
    }
    let mut out = Vec::new();
    let mut at = head;
    while !at.is_null() {
        // SAFETY: `at` is a node of the list getifaddrs returned, not yet freed.
        let ifa = unsafe { &*at };
        if !ifa.ifa_addr.is_null() {
            // SAFETY: `ifa_addr` points at a sockaddr whose family says its real type.
            match i32::from(unsafe { (*ifa.ifa_addr).sa_family }) {
                libc::AF_INET => {
                    // SAFETY: an AF_INET address is a sockaddr_in.
                    let sin = unsafe { &*(ifa.ifa_addr as *const libc::sockaddr_in) };
                    out.push(IpAddr::V4(Ipv4Addr::from(u32::from_be(
                        sin.sin_addr.s_addr,
                    ))));
                }
                libc::AF_INET6 => {
                    // SAFETY: an AF_INET6 address is a sockaddr_in6.
                    let sin6 = unsafe { &*(ifa.ifa_addr as *const libc::sockaddr_in6) };
                    out.push(IpAddr::V6(Ipv6Addr::from(sin6.sin6_addr.s6_addr)));
                }
                _ => {}
            }
        }
        at = ifa.ifa_next;
    }
    // SAFETY: the list getifaddrs returned, freed once.
    unsafe { libc::freeifaddrs(head) };
    Ok(out)
}

/// How long a reading of the daemon namespace's own addresses is used.
const OWN_ADDRESSES_FOR: Duration = Duration::from_secs(1);

/// Creates TCP and UDP sockets in a fixed network namespace, or the current one.
#[derive(Debug, Default)]
pub struct Dialer {
    factory: Option<Mutex<mpsc::Sender<(Kind, Reply)>>>,
    /// The current namespace's own addresses, when last read.
    own: Mutex<Option<(Instant, Arc<Vec<IpAddr>>)>>,
}

impl Dialer {
    /// A dialer whose sockets live in the network namespace at `netns`.
    pub fn in_netns(netns: &Path) -> io::Result<Self> {
        let ns = File::open(netns)?;
        let (tx, rx) = mpsc::channel::<(Kind, Reply)>();
        let (ready_tx, ready_rx) = mpsc::channel();
        std::thread::Builder::new()
            .name("egress-upstream-netns".into())
            .spawn(move || {
                // SAFETY: setns affects only this thread, which does nothing else.
                let entered = unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) };
                let _ = ready_tx.send(if entered == 0 {
                    Ok(())
                } else {
                    Err(io::Error::last_os_error())
                });
                if entered != 0 {
                    return;
                }
                while let Ok((kind, reply)) = rx.recv() {
                    let _ = reply.send(new_socket(kind));
                }
            })?;
        ready_rx
            .recv()
            .map_err(|_| io::Error::other("upstream netns thread died"))??;
        Ok(Self {
            factory: Some(Mutex::new(tx)),
            own: Mutex::default(),
        })
    }

    /// Whether `ip` is an address of this host, dialled from the daemon's own network
    /// namespace: a connection to it arrives over loopback, at services bound to any
    /// address, whatever a firewall does to traffic from outside. Always false for a
    /// dialer in an upstream namespace of its own (the operator chose where it dials
    /// from). The interfaces' addresses are read at most once a second; an address none
    /// holds is looked up in the routing (a `local` route delivers it here all the same).
    pub fn is_own_address(&self, ip: IpAddr) -> io::Result<bool> {
        if self.factory.is_some() {
            return Ok(false);
        }
        let ip = ip.to_canonical();
        let mut own = self.own.lock().unwrap_or_else(|p| p.into_inner());
        let fresh = own
            .as_ref()
            .filter(|(at, _)| at.elapsed() < OWN_ADDRESSES_FOR)
            .map(|(_, list)| list.clone());
        let list = match fresh {
            Some(list) => list,
            None => {
                let list = Arc::new(local_addresses()?);
                *own = Some((Instant::now(), list.clone()));
                list
            }
        };
        drop(own);
        Ok(list.contains(&ip) || super::route::is_local(ip)?)
    }

    /// Connects to `addr` from this dialer's namespace.
    pub async fn connect(&self, addr: SocketAddr) -> io::Result<TcpStream> {
        if self.factory.is_none() {
            return TcpStream::connect(addr).await;
        }
        let fd = self.make(Kind::Tcp { v6: addr.is_ipv6() }).await?;
        let socket = TcpSocket::from_std_stream(std::net::TcpStream::from(fd));
        socket.connect(addr).await
    }

    /// A UDP socket in this dialer's namespace, bound to the unspecified IPv4 (or, with
    /// `v6`, IPv6) address and a port the kernel picks. Each call gets a new socket and so
    /// a new random source port.
    pub async fn udp_socket(&self, v6: bool) -> io::Result<UdpSocket> {
        let fd = if self.factory.is_none() {
            new_socket(Kind::Udp { v6 })?
        } else {
            self.make(Kind::Udp { v6 }).await?
        };
        UdpSocket::from_std(std::net::UdpSocket::from(fd))
    }

    /// Asks the namespace thread for a socket. Only called when there is one.
    async fn make(&self, kind: Kind) -> io::Result<OwnedFd> {
        let Some(factory) = &self.factory else {
            return Err(io::Error::other("dialer has no upstream netns thread"));
        };
        let (tx, rx) = tokio::sync::oneshot::channel();
        factory
            .lock()
            .map_err(|_| io::Error::other("upstream netns dialer poisoned"))?
            .send((kind, tx))
            .map_err(|_| io::Error::other("upstream netns thread is gone"))?;
        rx.await
            .map_err(|_| io::Error::other("upstream netns thread is gone"))?
    }
}

#[cfg(test)]
#[expect(clippy::unwrap_used, reason = "tests fail loudly")]
mod tests {
    use std::net::{IpAddr, Ipv4Addr};

    /// The daemon namespace's own addresses are found (loopback always is; a mapped form
    /// counts as its IPv4 address); an address of no interface is not one.
    #[test]
    fn own_addresses_are_found() {
        let all = super::local_addresses().unwrap();
        assert!(all.contains(&IpAddr::V4(Ipv4Addr::LOCALHOST)), "{all:?}");
        let dialer = super::Dialer::default();
        assert!(dialer
            .is_own_address(IpAddr::V4(Ipv4Addr::LOCALHOST))
            .unwrap());
        assert!(dialer
            .is_own_address("::ffff:127.0.0.1".parse().unwrap())
            .unwrap());
        let elsewhere: IpAddr = "192.0.2.123".parse().unwrap();
        assert!(!all.contains(&elsewhere));
        assert!(!dialer.is_own_address(elsewhere).unwrap());
    }
}
