//! The TCP and UDP sockets of the calling thread's network namespace, as the kernel's
//! `sock_diag` netlink interface lists them (with the cgroup each was created in), and
//! closing one there (`SOCK_DESTROY`, the kernel's `CONFIG_INET_DIAG_DESTROY`: what
//! `ss -K` does). A destroyed TCP socket is reset; its owner's next call fails with
//! `ECONNABORTED`.

use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use netlink_packet_core::{
    NetlinkHeader, NetlinkMessage, NetlinkPayload, NLM_F_ACK, NLM_F_DUMP, NLM_F_REQUEST,
};
use netlink_packet_sock_diag::{
    constants::{AF_INET, AF_INET6, IPPROTO_TCP, IPPROTO_UDP},
    inet::{nlas::Nla, ExtensionFlags, InetRequest, SocketId, StateFlags},
    SockDiagMessage,
};

/// `SOCK_DESTROY` (`linux/sock_diag.h`).
const SOCK_DESTROY: u16 = 21;
/// `INET_DIAG_CGROUP_ID` (`linux/inet_diag.h`): the id of the cgroup the socket was
/// created in.
const INET_DIAG_CGROUP_ID: u16 = 21;
/// One socket of a listing.
#[derive(Clone, Debug)]
pub struct InetSocket {
    /// IPv6 (else IPv4).
    pub v6: bool,
    pub tcp: bool,
    pub local: SocketAddr,
    pub peer: SocketAddr,
    /// The cgroup it was created in (`None` from a kernel that does not say).
    pub cgroup_id: Option<u64>,
    /// Its owner's user id.
    pub uid: u32,
    /// `SO_COOKIE`: the socket cookie the kernel programs see.
    pub cookie: u64,
    /// The socket's inode number (`socket:[N]` in `/proc/PID/fd`).
    pub inode: u64,
    family: u8,
    id: SocketId,
}

/// The TCP sockets with a peer (connecting, connected, closing: not listening, not in
/// TIME_WAIT, which holds no socket to close, not a handshake half-open to a listener,
/// which is no socket of its own yet) and the connected UDP sockets, both families.
pub fn connected() -> io::Result<Vec<InetSocket>> {
    let tcp = StateFlags::all()
        - StateFlags::LISTEN
        - StateFlags::TIME_WAIT
        - StateFlags::CLOSE
        // The kernel lists half-open handshakes (`NEW_SYN_RECV`, with no cgroup) along
        // with `SYN_RECV`.
        - StateFlags::SYN_RECV;
    let mut sockets = list(IPPROTO_TCP, tcp)?;
    sockets.extend(list(IPPROTO_UDP, StateFlags::ESTABLISHED)?);
    Ok(sockets)
}

/// The sockets of `protocol` in `states`, both families.
fn list(protocol: u8, states: StateFlags) -> io::Result<Vec<InetSocket>> {
    let socket = open()?;
    let mut out = Vec::new();
    for family in [AF_INET, AF_INET6] {
        let id = if family == AF_INET {
            SocketId::new_v4()
        } else {
            SocketId::new_v6()
        };
        let request = InetRequest {
            family,
            protocol,
            extensions: ExtensionFlags::empty(),
            states,
            socket_id: id,
        };
        send(&socket, request, NLM_F_REQUEST | NLM_F_DUMP, None)?;
        receive(&socket, |message| {
            if let SockDiagMessage::InetResponse(response) = message {
                let h = &response.header;
                let cgroup_id = response.nlas.iter().find_map(|nla| match nla {
                    Nla::Other(attr)
                        if netlink_packet_utils::nla::Nla::kind(attr) == INET_DIAG_CGROUP_ID =>
                    {
                        let mut value = [0u8; 8];
                        (netlink_packet_utils::nla::Nla::value_len(attr) == 8).then(|| {
                            netlink_packet_utils::nla::Nla::emit_value(attr, &mut value);
                            u64::from_ne_bytes(value)
                        })
                    }
                    _ => None,
                });
                out.push(InetSocket {
                    v6: h.family == AF_INET6,
                    tcp: protocol == IPPROTO_TCP,
                    local: SocketAddr::new(h.socket_id.source_address, h.socket_id.source_port),
                    peer: SocketAddr::new(
                        h.socket_id.destination_address,
                        h.socket_id.destination_port,
                    ),
                    cgroup_id,
                    uid: h.uid,
                    cookie: u64::from_ne_bytes(h.socket_id.cookie),
                    inode: u64::from(h.inode),
                    family: h.family,
                    id: h.socket_id.clone(),
                });
            }
        })?;
    }
    Ok(out)
}

/// Closes `socket` (it must be of the calling thread's namespace): `true` if it was,
/// `false` if no such socket was found (gone meanwhile).
pub fn destroy(socket: &InetSocket) -> io::Result<bool> {
    let nl = open()?;
    let request = InetRequest {
        family: socket.family,
        protocol: if socket.tcp { IPPROTO_TCP } else { IPPROTO_UDP },
        extensions: ExtensionFlags::empty(),
        states: StateFlags::all(),
        socket_id: socket.id.clone(),
    };
    send(&nl, request, NLM_F_REQUEST | NLM_F_ACK, Some(SOCK_DESTROY))?;
    match receive(&nl, |_| {}) {
        Ok(()) => Ok(true),
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(false),
        Err(e) => Err(e),
    }
}

fn open() -> io::Result<OwnedFd> {
    netlink_socket(libc::NETLINK_SOCK_DIAG)
}

/// A netlink socket of `protocol` (`NETLINK_SOCK_DIAG`, `NETLINK_ROUTE`), talking to the
/// kernel in the calling thread's network namespace.
pub(super) fn netlink_socket(protocol: libc::c_int) -> io::Result<OwnedFd> {
    // SAFETY: plain socket(2); the descriptor is owned from here.
    let fd = unsafe {
        libc::socket(
            libc::AF_NETLINK,
            libc::SOCK_RAW | libc::SOCK_CLOEXEC,
            protocol,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` was just opened and is owned by nothing else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn send(
    socket: &OwnedFd,
    request: InetRequest,
    flags: u16,
    message_type: Option<u16>,
) -> io::Result<()> {
    let mut header = NetlinkHeader::default();
    header.flags = flags;
    let mut packet = NetlinkMessage::new(header, SockDiagMessage::InetRequest(request).into());
    packet.finalize();
    if let Some(kind) = message_type {
        packet.header.message_type = kind;
    }
    let mut buf = vec![0; packet.buffer_len()];
    packet.serialize(&mut buf);
    // SAFETY: zeroed `sockaddr_nl` (the kernel, pid 0) and a buffer that lives across
    // the call.
    let sent = unsafe {
        let mut kernel: libc::sockaddr_nl = std::mem::zeroed();
        kernel.nl_family = libc::AF_NETLINK as libc::sa_family_t;
        libc::sendto(
            socket.as_raw_fd(),
            buf.as_ptr().cast(),
            buf.len(),
            0,
            std::ptr::from_ref(&kernel).cast(),
            std::mem::size_of::<libc::sockaddr_nl>() as libc::socklen_t,
        )
    };
    if sent < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Reads answers until the dump's end or an acknowledgement; an error answer is returned
/// as the error it carries.
fn receive(socket: &OwnedFd, mut each: impl FnMut(SockDiagMessage)) -> io::Result<()> {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        // SAFETY: a buffer of its stated length, live across the call.
        let n = unsafe { libc::recv(socket.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        let mut rest = &buf[..n as usize];
        while !rest.is_empty() {
            let message = <NetlinkMessage<SockDiagMessage>>::deserialize(rest)
                .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e.to_string()))?;
            let len = message.header.length as usize;
            match message.payload {
                NetlinkPayload::Done(_) => return Ok(()),
                NetlinkPayload::Error(e) => {
                    return match e.code {
                        None => Ok(()),
                        Some(code) => Err(io::Error::from_raw_os_error(-code.get())),
                    };
                }
                NetlinkPayload::InnerMessage(m) => each(m),
                _ => {}
            }
            if len == 0 || len > rest.len() {
                break;
            }
            // Messages are aligned to 4 bytes.
            rest = &rest[len.next_multiple_of(4).min(rest.len())..];
        }
    }
}

#[cfg(test)]
#[expect(clippy::unwrap_used, reason = "tests fail loudly")]
mod tests {
    use super::*;
    use std::io::{Read, Write};

    /// A connection made here is listed with its cgroup, and destroying it resets it.
    /// Needs `CAP_NET_ADMIN` (as root, as the whole suite runs).
    #[test]
    fn lists_and_destroys_a_connection() {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            eprintln!("skipped: SOCK_DESTROY needs root");
            return;
        }
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let mut client = std::net::TcpStream::connect(addr).unwrap();
        let (mut server, _) = listener.accept().unwrap();
        let local = client.local_addr().unwrap();
        let all = connected().unwrap();
        let ours = all
            .iter()
            .find(|s| s.local == local && s.peer == addr)
            .unwrap();
        assert!(ours.cgroup_id.is_some(), "{ours:?}");
        // The listener has no peer: not a connection.
        assert!(!all.iter().any(|s| s.local == addr && s.peer.port() == 0));
        assert!(destroy(ours).unwrap());
        // Gone: writing fails, and the other end sees the reset.
        let mut byte = [0u8; 1];
        assert!(client.write_all(b"x").is_err() || client.read(&mut byte).is_err());
        assert!(server.read(&mut byte).map_or(true, |n| n == 0));
        // Destroying it again finds nothing.
        assert!(!destroy(ours).unwrap());
    }
}
