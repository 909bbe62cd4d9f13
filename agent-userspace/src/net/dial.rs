//! Where upstream connections come from: the daemon's own network namespace, or one named
//! in the configuration (an egress namespace, or the fake internet in tests). A socket
//! belongs to the namespace it was created in, so a thread that entered the namespace
//! creates them and the proxy connects them from anywhere. The DNS resolver takes its
//! upstream UDP sockets from the same place.
use std::{
    fs::File,
    io,
    net::SocketAddr,
    os::fd::{AsRawFd, OwnedFd},
    path::Path,
    sync::{mpsc, Mutex},
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

/// Creates TCP and UDP sockets in a fixed network namespace, or the current one.
#[derive(Debug, Default)]
pub struct Dialer {
    factory: Option<Mutex<mpsc::Sender<(Kind, Reply)>>>,
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
        })
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
