//! Where upstream connections come from: the daemon's own network namespace, or one named
//! in the configuration (an egress namespace, or the fake internet in tests). A socket
//! belongs to the namespace it was created in, so a thread that entered the namespace
//! creates them and the proxy connects them from anywhere.
use std::{
    fs::File,
    io,
    net::SocketAddr,
    os::fd::{AsRawFd, OwnedFd},
    path::Path,
    sync::{mpsc, Mutex},
};

use tokio::net::{TcpSocket, TcpStream};

type Reply = tokio::sync::oneshot::Sender<io::Result<OwnedFd>>;

/// A non-blocking, close-on-exec TCP socket in the calling thread's network namespace.
fn new_socket(v6: bool) -> io::Result<OwnedFd> {
    let domain = if v6 { libc::AF_INET6 } else { libc::AF_INET };
    // SAFETY: plain socket(2) call; the result is checked before taking ownership.
    let fd = unsafe {
        libc::socket(
            domain,
            libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            0,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd is a freshly created descriptor we own.
    Ok(unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) })
}

/// Creates TCP sockets in a fixed network namespace, or the current one.
#[derive(Debug, Default)]
pub struct Dialer {
    factory: Option<Mutex<mpsc::Sender<(bool, Reply)>>>,
}

impl Dialer {
    /// A dialer whose sockets live in the network namespace at `netns`.
    pub fn in_netns(netns: &Path) -> io::Result<Self> {
        let ns = File::open(netns)?;
        let (tx, rx) = mpsc::channel::<(bool, Reply)>();
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
                while let Ok((v6, reply)) = rx.recv() {
                    let _ = reply.send(new_socket(v6));
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
        let Some(factory) = &self.factory else {
            return TcpStream::connect(addr).await;
        };
        let (tx, rx) = tokio::sync::oneshot::channel();
        factory
            .lock()
            .map_err(|_| io::Error::other("upstream netns dialer poisoned"))?
            .send((addr.is_ipv6(), tx))
            .map_err(|_| io::Error::other("upstream netns thread is gone"))?;
        let fd = rx
            .await
            .map_err(|_| io::Error::other("upstream netns thread is gone"))??;
        let socket = TcpSocket::from_std_stream(std::net::TcpStream::from(fd));
        socket.connect(addr).await
    }
}
