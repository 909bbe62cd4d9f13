//! Whether the calling thread's network namespace delivers an address locally, as its
//! routing says (`ip route get`): an address of one of its interfaces, or one a `local`
//! route covers without any interface holding it (AnyIP: `ip route add local
//! 198.18.0.0/24 dev lo`, which cloud guest agents add for load-balanced addresses).

use std::io;
use std::net::IpAddr;
use std::os::fd::AsRawFd;

use netlink_packet_core::{NetlinkHeader, NetlinkMessage, NetlinkPayload, NLM_F_REQUEST};
use netlink_packet_route::route::{RouteAddress, RouteAttribute, RouteMessage, RouteType};
use netlink_packet_route::{AddressFamily, RouteNetlinkMessage};

/// Whether the route to `ip` is of type `local` (the kernel's `RTM_GETROUTE`, which reads
/// every table and rule the kernel would). An address no route reaches is not local.
pub fn is_local(ip: IpAddr) -> io::Result<bool> {
    let ip = ip.to_canonical();
    let mut message = RouteMessage::default();
    message.header.address_family = match ip {
        IpAddr::V4(_) => AddressFamily::Inet,
        IpAddr::V6(_) => AddressFamily::Inet6,
    };
    message.header.destination_prefix_length = if ip.is_ipv4() { 32 } else { 128 };
    message
        .attributes
        .push(RouteAttribute::Destination(RouteAddress::from(ip)));
    let mut header = NetlinkHeader::default();
    header.flags = NLM_F_REQUEST;
    let mut packet = NetlinkMessage::new(header, RouteNetlinkMessage::GetRoute(message).into());
    packet.finalize();
    let mut buf = vec![0; packet.buffer_len()];
    packet.serialize(&mut buf);

    let socket = super::sock_diag::netlink_socket(libc::NETLINK_ROUTE)?;
    // SAFETY: a buffer of its stated length, live across the call; the socket is not
    // bound, so the kernel (port 0) is the peer.
    let sent = unsafe { libc::send(socket.as_raw_fd(), buf.as_ptr().cast(), buf.len(), 0) };
    if sent < 0 {
        return Err(io::Error::last_os_error());
    }
    let mut answer = vec![0u8; 8192];
    let n = loop {
        // SAFETY: a buffer of its stated length, live across the call.
        let n = unsafe {
            libc::recv(
                socket.as_raw_fd(),
                answer.as_mut_ptr().cast(),
                answer.len(),
                0,
            )
        };
        if n >= 0 {
            break n as usize;
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    };
    let message = <NetlinkMessage<RouteNetlinkMessage>>::deserialize(&answer[..n])
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e.to_string()))?;
    match message.payload {
        NetlinkPayload::InnerMessage(RouteNetlinkMessage::NewRoute(route)) => {
            Ok(route.header.kind == RouteType::Local)
        }
        NetlinkPayload::Error(e) => match e.code {
            None => Ok(false),
            Some(code) => {
                let e = io::Error::from_raw_os_error(-code.get());
                // No route there: nothing reaches it, locally or not.
                match e.raw_os_error() {
                    Some(libc::ENETUNREACH | libc::EHOSTUNREACH | libc::EACCES) => Ok(false),
                    _ => Err(e),
                }
            }
        },
        _ => Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "unexpected answer to a route lookup",
        )),
    }
}

#[cfg(test)]
#[expect(clippy::unwrap_used, reason = "tests fail loudly")]
mod tests {
    use super::*;

    /// Loopback is delivered here; a documentation address (no route in a namespace of
    /// the test's own, reached through the default route here) is not.
    #[test]
    fn loopback_is_local_and_a_remote_address_is_not() {
        assert!(is_local("127.0.0.1".parse().unwrap()).unwrap());
        assert!(is_local("127.5.6.7".parse().unwrap()).unwrap());
        assert!(is_local("::1".parse().unwrap()).unwrap());
        assert!(is_local("::ffff:127.0.0.1".parse().unwrap()).unwrap());
        assert!(!is_local("203.0.113.9".parse().unwrap()).unwrap());
    }

    /// An address no interface holds but a `local` route covers (AnyIP) is local; one
    /// beside it is not. In a network namespace of the test's own thread (as root).
    #[test]
    fn an_anyip_route_makes_its_addresses_local() {
        std::thread::spawn(|| {
            // SAFETY: moves only this thread into a new network namespace.
            assert_eq!(unsafe { libc::unshare(libc::CLONE_NEWNET) }, 0);
            for args in [
                &["link", "set", "lo", "up"][..],
                &["route", "add", "local", "198.18.0.0/24", "dev", "lo"],
                &["route", "add", "unreachable", "198.19.0.0/24"],
            ] {
                // A child forked from this thread is in its namespace.
                let out = std::process::Command::new("ip")
                    .args(args)
                    .output()
                    .unwrap();
                assert!(out.status.success(), "ip {args:?}: {out:?}");
            }
            assert!(is_local("198.18.0.5".parse().unwrap()).unwrap());
            assert!(is_local("::ffff:198.18.0.200".parse().unwrap()).unwrap());
            assert!(!is_local("198.19.0.5".parse().unwrap()).unwrap());
            assert!(!is_local("203.0.113.9".parse().unwrap()).unwrap());
            let addresses = super::super::dial::local_addresses().unwrap();
            assert!(!addresses.contains(&"198.18.0.5".parse().unwrap()));
        })
        .join()
        .unwrap();
    }
}
