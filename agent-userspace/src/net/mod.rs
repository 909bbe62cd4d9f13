//! Network plumbing several parts of the daemon share: the special-purpose address table
//! ([`special`]), sockets from a chosen network namespace ([`dial`]), the TLS trust for
//! outgoing connections ([`tls`]), and both together ([`upstream`]). The proxy, the DNS
//! resolver and the credential sources all dial through here; none imports another.
pub mod dial;
pub mod route;
pub mod sock_diag;
pub mod special;
pub mod tls;
pub mod upstream;

pub use dial::Dialer;

use std::net::{IpAddr, Ipv6Addr};

/// The NAT64 well-known prefix, `64:ff9b::/96` (RFC 6052).
const NAT64_PREFIX: [u16; 6] = [0x64, 0xff9b, 0, 0, 0, 0];

/// The IPv4 address a NAT64 address (`64:ff9b::a.b.c.d`) reaches through a translator.
pub fn nat64_v4(addr: Ipv6Addr) -> Option<std::net::Ipv4Addr> {
    let s = addr.segments();
    (s[..6] == NAT64_PREFIX).then(|| {
        let [.., a, b, c, d] = addr.octets();
        std::net::Ipv4Addr::new(a, b, c, d)
    })
}

/// `addr` as the kernel programs judge it: IPv4-mapped and NAT64 addresses as the IPv4
/// address they carry, so that rules, learned addresses and the kernel agree.
pub fn judged_as(addr: IpAddr) -> IpAddr {
    match addr.to_canonical() {
        IpAddr::V6(v6) => nat64_v4(v6).map_or(IpAddr::V6(v6), IpAddr::V4),
        v4 => v4,
    }
}
pub use special::{classify as special_address, explicitly_covers, names_loopback, Special};
pub use tls::TrustError;
pub use upstream::{UpstreamError, UpstreamOptions};

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mapped_and_nat64_addresses_are_judged_as_their_ipv4() {
        let v4: IpAddr = "203.0.113.66".parse().unwrap_or_else(|_| unreachable!());
        for spelled in ["::ffff:203.0.113.66", "64:ff9b::cb00:7142", "203.0.113.66"] {
            let ip: IpAddr = spelled.parse().unwrap_or_else(|_| unreachable!());
            assert_eq!(judged_as(ip), v4, "{spelled}");
        }
        for other in ["64:ff9b:1::cb00:7142", "2001:db8::cb00:7142", "::cb00:7142"] {
            let ip: IpAddr = other.parse().unwrap_or_else(|_| unreachable!());
            assert_eq!(judged_as(ip), ip, "{other}");
        }
    }
}
