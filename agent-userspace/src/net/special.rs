//! The special-purpose address table: one list, built from the IANA IPv4 and IPv6
//! Special-Purpose Address Registries (plus multicast, the deprecated site-local block
//! and the cloud metadata addresses), that the proxy's dial check, the resolver's
//! learning of answers and the daemon's "explicitly covered" check all consult.
//!
//! An address is *special* when the most specific entry holding it is: such addresses
//! reach the host, its networks or nothing routable (loopback, private, link-local,
//! shared, multicast, reserved, identifiers that are not locators, tunnels into IPv4).
//! A special address is only dialled, or learned from a DNS answer, when a rule names it
//! explicitly: a listed network that holds it and lies inside its [`Special::block`]
//! (`10.1.2.3/32` or `10.0.0.0/8` name 10.1.2.3; `0.0.0.0/0` does not).
//!
//! Entries the registries mark globally reachable (PCP and TURN anycast, AS112, AMT, the
//! NAT64 well-known prefix) are *ordinary*, even inside a special block. So are the
//! documentation ranges (192.0.2.0/24, 198.51.100.0/24, 203.0.113.0/24, 2001:db8::/32,
//! 3fff::/20): the internet never routes them, so a name resolving there reaches nothing
//! in a real deployment, and test beds and demos are built on them. A network that uses
//! them internally denies them with a `deny` rule, which also keeps names from resolving
//! to them.
//!
//! IPv6 addresses that carry an IPv4 address (IPv4-mapped, IPv4-compatible, IPv4-translated,
//! NAT64, 6to4, and Teredo's client) are also judged by the IPv4 address inside: when that
//! is special, the address is special with the IPv4 block carried under the IPv6 prefix
//! (for Teredo, whose client bits are scrambled, the single address) as its block.
use std::{
    fmt,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

use ipnet::{IpNet, Ipv4Net, Ipv6Net};

/// Where an IPv6 entry carries an IPv4 address.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Embeds {
    /// Nothing to look at.
    None,
    /// The last 32 bits (IPv4-mapped, -compatible, -translated, NAT64 `/96`).
    Low32,
    /// Bits 16-47 (6to4, RFC 3056).
    SixToFour,
    /// The last 32 bits inverted (Teredo's client address, RFC 4380).
    TeredoClient,
}

/// A network of the table, IPv4 or IPv6, in a form a `const` can hold.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Net {
    V4(Ipv4Addr, u8),
    V6(Ipv6Addr, u8),
}

impl Net {
    fn prefix_len(self) -> u8 {
        match self {
            Self::V4(_, l) | Self::V6(_, l) => l,
        }
    }

    /// Whether the block holds `ip`: the first `l` bits equal (judged for every request a
    /// proxy sends, so plain bit arithmetic).
    fn contains(self, ip: IpAddr) -> bool {
        match (self, ip) {
            (Self::V4(n, l), IpAddr::V4(a)) => {
                let mask = u32::MAX
                    .checked_shl(32u32.saturating_sub(l.into()))
                    .unwrap_or(0);
                (u32::from(n) ^ u32::from(a)) & mask == 0
            }
            (Self::V6(n, l), IpAddr::V6(a)) => {
                let mask = u128::MAX
                    .checked_shl(128u32.saturating_sub(l.into()))
                    .unwrap_or(0);
                (u128::from(n) ^ u128::from(a)) & mask == 0
            }
            _ => false,
        }
    }

    /// As an [`IpNet`]; the table's prefix lengths are all valid (a unit test checks).
    pub fn to_ipnet(self) -> IpNet {
        match self {
            Self::V4(n, l) => {
                Ipv4Net::new(n, l).map_or(IpNet::V4(Ipv4Net::default()), |n| IpNet::V4(n.trunc()))
            }
            Self::V6(n, l) => {
                Ipv6Net::new(n, l).map_or(IpNet::V6(Ipv6Net::default()), |n| IpNet::V6(n.trunc()))
            }
        }
    }
}

/// One entry of the table.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Entry {
    pub net: Net,
    /// What an address in it is, as a noun phrase: "loopback address".
    pub name: &'static str,
    /// The RFC that defines it (for an address no RFC sets aside, whose it is).
    pub rfc: &'static str,
    /// Whether an address whose most specific entry is this one needs a rule naming it.
    pub special: bool,
    pub embeds: Embeds,
}

/// What a loopback address is called.
const LOOPBACK: &str = "loopback address";

const fn v4(a: u8, b: u8, c: u8, d: u8, len: u8) -> Net {
    Net::V4(Ipv4Addr::new(a, b, c, d), len)
}

#[expect(clippy::too_many_arguments, reason = "eight segments and a length")]
const fn v6(a: u16, b: u16, c: u16, d: u16, e: u16, f: u16, g: u16, h: u16, len: u8) -> Net {
    Net::V6(Ipv6Addr::new(a, b, c, d, e, f, g, h), len)
}

const fn special(net: Net, name: &'static str, rfc: &'static str) -> Entry {
    Entry {
        net,
        name,
        rfc,
        special: true,
        embeds: Embeds::None,
    }
}

const fn ordinary(net: Net, name: &'static str, rfc: &'static str) -> Entry {
    Entry {
        net,
        name,
        rfc,
        special: false,
        embeds: Embeds::None,
    }
}

const fn embedding(mut entry: Entry, embeds: Embeds) -> Entry {
    entry.embeds = embeds;
    entry
}

/// The table, in registry order. Overlaps are intended: the most specific entry holding
/// an address decides whether it is special and what it is called.
pub const TABLE: &[Entry] = &[
    // IPv4 Special-Purpose Address Registry.
    special(v4(0, 0, 0, 0, 8), "\"this network\" address", "RFC 791"),
    special(v4(0, 0, 0, 0, 32), "unspecified address", "RFC 1122"),
    special(v4(10, 0, 0, 0, 8), "private (RFC 1918) address", "RFC 1918"),
    special(
        v4(100, 64, 0, 0, 10),
        "shared (carrier-grade NAT) address",
        "RFC 6598",
    ),
    special(
        v4(100, 100, 100, 200, 32),
        "cloud metadata address",
        "RFC 6598",
    ),
    special(v4(127, 0, 0, 0, 8), LOOPBACK, "RFC 1122"),
    // Not in the registry: a public address every Azure VM reaches its host agent,
    // WireServer (VM extensions, their settings and certificates) and DNS at.
    special(
        v4(168, 63, 129, 16, 32),
        "cloud metadata address",
        "Azure WireServer",
    ),
    special(v4(169, 254, 0, 0, 16), "link-local address", "RFC 3927"),
    special(
        v4(169, 254, 169, 254, 32),
        "cloud metadata address",
        "RFC 3927",
    ),
    special(
        v4(172, 16, 0, 0, 12),
        "private (RFC 1918) address",
        "RFC 1918",
    ),
    special(
        v4(192, 0, 0, 0, 24),
        "IETF protocol assignment (192.0.0.0/24) address",
        "RFC 6890",
    ),
    special(
        v4(192, 0, 0, 0, 29),
        "IPv4 service continuity (DS-Lite) address",
        "RFC 7335",
    ),
    special(v4(192, 0, 0, 8, 32), "IPv4 dummy address", "RFC 7600"),
    ordinary(v4(192, 0, 0, 9, 32), "PCP anycast address", "RFC 7723"),
    ordinary(v4(192, 0, 0, 10, 32), "TURN anycast address", "RFC 8155"),
    special(
        v4(192, 0, 0, 170, 31),
        "NAT64/DNS64 discovery address",
        "RFC 8880",
    ),
    ordinary(
        v4(192, 0, 2, 0, 24),
        "documentation (TEST-NET-1) address",
        "RFC 5737",
    ),
    ordinary(v4(192, 31, 196, 0, 24), "AS112 address", "RFC 7535"),
    ordinary(v4(192, 52, 193, 0, 24), "AMT address", "RFC 7450"),
    special(
        v4(192, 88, 99, 0, 24),
        "deprecated 6to4 relay anycast address",
        "RFC 7526",
    ),
    special(
        v4(192, 168, 0, 0, 16),
        "private (RFC 1918) address",
        "RFC 1918",
    ),
    ordinary(
        v4(192, 175, 48, 0, 24),
        "AS112 direct delegation address",
        "RFC 7534",
    ),
    special(
        v4(198, 18, 0, 0, 15),
        "benchmarking (198.18.0.0/15) address",
        "RFC 2544",
    ),
    ordinary(
        v4(198, 51, 100, 0, 24),
        "documentation (TEST-NET-2) address",
        "RFC 5737",
    ),
    ordinary(
        v4(203, 0, 113, 0, 24),
        "documentation (TEST-NET-3) address",
        "RFC 5737",
    ),
    // Not in the special-purpose registry, but never a unicast destination.
    special(v4(224, 0, 0, 0, 4), "multicast address", "RFC 5771"),
    special(
        v4(240, 0, 0, 0, 4),
        "reserved (240.0.0.0/4) address",
        "RFC 1112",
    ),
    special(v4(255, 255, 255, 255, 32), "broadcast address", "RFC 919"),
    // IPv6 Special-Purpose Address Registry.
    special(
        v6(0, 0, 0, 0, 0, 0, 0, 0, 128),
        "unspecified address",
        "RFC 4291",
    ),
    special(v6(0, 0, 0, 0, 0, 0, 0, 1, 128), LOOPBACK, "RFC 4291"),
    // Judged as the IPv4 address inside (`IpAddr::to_canonical` turns them into it).
    embedding(
        ordinary(
            v6(0, 0, 0, 0, 0, 0xffff, 0, 0, 96),
            "IPv4-mapped address",
            "RFC 4291",
        ),
        Embeds::Low32,
    ),
    embedding(
        special(
            v6(0, 0, 0, 0, 0, 0, 0, 0, 96),
            "IPv4-compatible address",
            "RFC 4291",
        ),
        Embeds::Low32,
    ),
    embedding(
        special(
            v6(0, 0, 0, 0, 0xffff, 0, 0, 0, 96),
            "IPv4-translated address",
            "RFC 2765",
        ),
        Embeds::Low32,
    ),
    embedding(
        ordinary(
            v6(0x64, 0xff9b, 0, 0, 0, 0, 0, 0, 96),
            "NAT64 (64:ff9b::/96) address",
            "RFC 6052",
        ),
        Embeds::Low32,
    ),
    special(
        v6(0x64, 0xff9b, 1, 0, 0, 0, 0, 0, 48),
        "local-use IPv4/IPv6 translation address",
        "RFC 8215",
    ),
    special(
        v6(0x100, 0, 0, 0, 0, 0, 0, 0, 64),
        "discard-only address",
        "RFC 6666",
    ),
    special(
        v6(0x100, 0, 0, 1, 0, 0, 0, 0, 64),
        "dummy IPv6 prefix address",
        "RFC 9780",
    ),
    special(
        v6(0x2001, 0, 0, 0, 0, 0, 0, 0, 23),
        "IETF protocol assignment (2001::/23) address",
        "RFC 2928",
    ),
    embedding(
        special(
            v6(0x2001, 0, 0, 0, 0, 0, 0, 0, 32),
            "Teredo address",
            "RFC 4380",
        ),
        Embeds::TeredoClient,
    ),
    ordinary(
        v6(0x2001, 1, 0, 0, 0, 0, 0, 1, 128),
        "PCP anycast address",
        "RFC 7723",
    ),
    ordinary(
        v6(0x2001, 1, 0, 0, 0, 0, 0, 2, 128),
        "TURN anycast address",
        "RFC 8155",
    ),
    ordinary(
        v6(0x2001, 1, 0, 0, 0, 0, 0, 3, 128),
        "DNS-SD service registration anycast address",
        "RFC 9665",
    ),
    special(
        v6(0x2001, 2, 0, 0, 0, 0, 0, 0, 48),
        "benchmarking (2001:2::/48) address",
        "RFC 5180",
    ),
    ordinary(
        v6(0x2001, 3, 0, 0, 0, 0, 0, 0, 32),
        "AMT address",
        "RFC 7450",
    ),
    ordinary(
        v6(0x2001, 4, 0x112, 0, 0, 0, 0, 0, 48),
        "AS112 address",
        "RFC 7535",
    ),
    special(
        v6(0x2001, 0x10, 0, 0, 0, 0, 0, 0, 28),
        "deprecated ORCHID identifier",
        "RFC 4843",
    ),
    // Identifiers, not locators: nothing should be dialled there.
    special(
        v6(0x2001, 0x20, 0, 0, 0, 0, 0, 0, 28),
        "ORCHIDv2 identifier",
        "RFC 7343",
    ),
    special(
        v6(0x2001, 0x30, 0, 0, 0, 0, 0, 0, 28),
        "drone remote ID entity tag",
        "RFC 9374",
    ),
    ordinary(
        v6(0x2001, 0xdb8, 0, 0, 0, 0, 0, 0, 32),
        "documentation (2001:db8::/32) address",
        "RFC 3849",
    ),
    embedding(
        special(
            v6(0x2002, 0, 0, 0, 0, 0, 0, 0, 16),
            "6to4 address",
            "RFC 3056",
        ),
        Embeds::SixToFour,
    ),
    ordinary(
        v6(0x2620, 0x4f, 0x8000, 0, 0, 0, 0, 0, 48),
        "AS112 direct delegation address",
        "RFC 7534",
    ),
    ordinary(
        v6(0x3fff, 0, 0, 0, 0, 0, 0, 0, 20),
        "documentation (3fff::/20) address",
        "RFC 9637",
    ),
    special(
        v6(0x5f00, 0, 0, 0, 0, 0, 0, 0, 16),
        "segment routing (SRv6) SID",
        "RFC 9602",
    ),
    special(
        v6(0xfc00, 0, 0, 0, 0, 0, 0, 0, 7),
        "private (unique local) address",
        "RFC 4193",
    ),
    special(
        v6(0xfd00, 0x0ec2, 0, 0, 0, 0, 0, 0x254, 128),
        "cloud metadata address",
        "RFC 4193",
    ),
    special(
        v6(0xfe80, 0, 0, 0, 0, 0, 0, 0, 10),
        "link-local address",
        "RFC 4291",
    ),
    special(
        v6(0xfec0, 0, 0, 0, 0, 0, 0, 0, 10),
        "deprecated site-local address",
        "RFC 3879",
    ),
    special(
        v6(0xff00, 0, 0, 0, 0, 0, 0, 0, 8),
        "multicast address",
        "RFC 4291",
    ),
];

/// Why an address is special, and the block a rule must lie inside to name it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Special {
    /// The most specific entry holding the address.
    pub entry: &'static Entry,
    /// A rule names the address explicitly when one of its networks holds it and is at
    /// least as specific as this block: the outermost special entry holding the address,
    /// or the carried IPv4 address's block under the IPv6 prefix.
    pub block: IpNet,
    /// The IPv4 address an IPv6 address carries, with its own entry, when that made the
    /// address special.
    pub embedded: Option<(Ipv4Addr, &'static Entry)>,
}

impl Special {
    /// Short noun phrase, e.g. "loopback address", for messages and records.
    pub fn what(&self) -> &'static str {
        match self.embedded {
            Some((_, inner)) => inner.name,
            None => self.entry.name,
        }
    }
}

impl fmt::Display for Special {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.embedded {
            None => f.write_str(self.entry.name),
            Some((v4, inner)) => write!(f, "{} carrying {v4}, a {}", self.entry.name, inner.name),
        }
    }
}

/// Entries holding `ip`, most specific first.
fn holding(ip: IpAddr) -> Vec<&'static Entry> {
    let mut found: Vec<&'static Entry> = TABLE.iter().filter(|e| e.net.contains(ip)).collect();
    found.sort_by_key(|e| std::cmp::Reverse(e.net.prefix_len()));
    found
}

/// `ip` judged alone, without looking inside (IPv4, or IPv6 that carries nothing).
fn judge_plain(found: &[&'static Entry]) -> Option<Special> {
    let entry = *found.first()?;
    if !entry.special {
        return None;
    }
    // The outermost special entry: a rule inside 169.254.0.0/16 names the metadata
    // address too. Entries that carry IPv4 addresses are containers of another kind
    // (`::/96` holds `::1`) and never widen the block.
    let outer = found
        .iter()
        .rev()
        .find(|e| e.special && e.embeds == Embeds::None)
        .unwrap_or(&entry);
    Some(Special {
        entry,
        block: outer.net.to_ipnet(),
        embedded: None,
    })
}

fn classify_v4(v4: Ipv4Addr) -> Option<Special> {
    judge_plain(&holding(IpAddr::V4(v4)))
}

/// The IPv4 address an IPv6 address carries per `how`.
fn carried(v6: Ipv6Addr, how: Embeds) -> Option<Ipv4Addr> {
    let bits = u128::from(v6);
    match how {
        Embeds::None => None,
        Embeds::Low32 => Some(Ipv4Addr::from(bits as u32)),
        Embeds::SixToFour => Some(Ipv4Addr::from((bits >> 80) as u32)),
        Embeds::TeredoClient => Some(Ipv4Addr::from(!(bits as u32))),
    }
}

/// The block of `inner` (an IPv4 block) carried under `outer`'s prefix per `how`.
fn carried_block(outer: Net, how: Embeds, inner: IpNet, addr: Ipv6Addr) -> IpNet {
    let (IpNet::V4(inner), Net::V6(prefix, _)) = (inner, outer) else {
        return IpNet::from(IpAddr::V6(addr));
    };
    let net = u128::from(u32::from(inner.network()));
    let (base, len) = match how {
        Embeds::Low32 => (u128::from(prefix) | net, 96 + inner.prefix_len()),
        Embeds::SixToFour => (u128::from(prefix) | (net << 80), 16 + inner.prefix_len()),
        // Scrambled bits behind a variable server and port: only the address itself.
        Embeds::TeredoClient | Embeds::None => return IpNet::from(IpAddr::V6(addr)),
    };
    Ipv6Net::new(Ipv6Addr::from(base), len)
        .map_or_else(|_| IpNet::from(IpAddr::V6(addr)), IpNet::V6)
}

/// Whether `ip` is special, why, and the block a rule must lie inside to name it; `None`
/// for an ordinary address. IPv4-mapped addresses are judged as the IPv4 address.
pub fn classify(ip: IpAddr) -> Option<Special> {
    let v6 = match ip.to_canonical() {
        IpAddr::V4(v4) => return classify_v4(v4),
        IpAddr::V6(v6) => v6,
    };
    let found = holding(IpAddr::V6(v6));
    let entry = *found.first()?;
    if let Some(v4) = carried(v6, entry.embeds) {
        if let Some(inner) = classify_v4(v4) {
            return Some(Special {
                entry,
                block: carried_block(entry.net, entry.embeds, inner.block, v6),
                embedded: Some((v4, inner.entry)),
            });
        }
    }
    judge_plain(&found)
}

/// Whether one of `nets` names `ip` explicitly: for an ordinary address, any network
/// holding it; for a special one, a network holding it that lies inside its
/// [`Special::block`] (so `0.0.0.0/0` or `::/0` names no special address).
pub fn explicitly_covers(nets: &[IpNet], ip: IpAddr) -> bool {
    // As the kernel judges it (a NAT64 address by the IPv4 address it carries).
    let ip = super::judged_as(ip);
    match classify(ip) {
        None => nets.iter().any(|n| n.contains(&ip)),
        Some(s) => nets
            .iter()
            .any(|n| n.contains(&ip) && n.prefix_len() >= s.block.prefix_len()),
    }
}

/// Whether `net` names loopback addresses explicitly ([`explicitly_covers`]): a rule with
/// it may have them dialled (`127.0.0.0/8` does, `0.0.0.0/0` does not).
pub fn names_loopback(net: &IpNet) -> bool {
    let ip = net.network();
    classify(super::judged_as(ip)).is_some_and(|s| s.what() == LOOPBACK)
        && explicitly_covers(std::slice::from_ref(net), ip)
}

#[cfg(test)]
#[expect(clippy::unwrap_used, reason = "tests fail loudly")]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn net(s: &str) -> IpNet {
        s.parse().unwrap()
    }

    fn what(s: &str) -> Option<String> {
        classify(ip(s)).map(|c| c.to_string())
    }

    #[test]
    fn table_is_well_formed() {
        for e in TABLE {
            let n = e.net.to_ipnet();
            let want = match e.net {
                Net::V4(a, l) => IpNet::V4(Ipv4Net::new(a, l).unwrap()),
                Net::V6(a, l) => IpNet::V6(Ipv6Net::new(a, l).unwrap()),
            };
            // Valid lengths, and no host bits: the table says what it means.
            assert_eq!(n, want, "{} {:?}", e.name, e.net);
            assert!(
                e.rfc.starts_with("RFC ") || e.rfc == "Azure WireServer",
                "{}",
                e.name
            );
            if e.embeds != Embeds::None {
                assert!(matches!(e.net, Net::V6(..)), "{}", e.name);
            }
        }
        // No network listed twice.
        for (i, a) in TABLE.iter().enumerate() {
            assert!(!TABLE[i + 1..].iter().any(|b| b.net == a.net), "{a:?}");
        }
    }

    #[test]
    fn every_registry_entry_is_special() {
        let cases = [
            ("0.0.0.0", "unspecified address"),
            ("0.1.2.3", "\"this network\" address"),
            ("10.1.2.3", "private (RFC 1918) address"),
            ("100.64.0.1", "shared (carrier-grade NAT) address"),
            ("100.100.100.200", "cloud metadata address"),
            ("127.8.9.10", "loopback address"),
            ("169.254.1.1", "link-local address"),
            ("169.254.169.254", "cloud metadata address"),
            ("172.31.255.255", "private (RFC 1918) address"),
            ("192.0.0.1", "IPv4 service continuity (DS-Lite) address"),
            ("192.0.0.8", "IPv4 dummy address"),
            (
                "192.0.0.100",
                "IETF protocol assignment (192.0.0.0/24) address",
            ),
            ("192.0.0.170", "NAT64/DNS64 discovery address"),
            ("192.0.0.171", "NAT64/DNS64 discovery address"),
            ("192.88.99.1", "deprecated 6to4 relay anycast address"),
            ("192.168.1.1", "private (RFC 1918) address"),
            ("198.19.255.1", "benchmarking (198.18.0.0/15) address"),
            ("224.0.0.1", "multicast address"),
            ("239.255.255.250", "multicast address"),
            ("240.0.0.1", "reserved (240.0.0.0/4) address"),
            ("255.255.255.254", "reserved (240.0.0.0/4) address"),
            ("255.255.255.255", "broadcast address"),
            ("::", "unspecified address"),
            ("::1", "loopback address"),
            ("64:ff9b:1::1", "local-use IPv4/IPv6 translation address"),
            ("100::1", "discard-only address"),
            ("100:0:0:1::1", "dummy IPv6 prefix address"),
            ("2001:0:0:0:8000:63bf:3fff:fdd2", "Teredo address"),
            ("2001:2::1", "benchmarking (2001:2::/48) address"),
            ("2001:5::1", "IETF protocol assignment (2001::/23) address"),
            ("2001:10::1", "deprecated ORCHID identifier"),
            ("2001:20::1", "ORCHIDv2 identifier"),
            ("2001:30::1", "drone remote ID entity tag"),
            ("2002:5db8:d822::1", "6to4 address"),
            ("5f00::1", "segment routing (SRv6) SID"),
            ("fc00::1", "private (unique local) address"),
            ("fd12::1", "private (unique local) address"),
            ("fd00:ec2::254", "cloud metadata address"),
            ("::ffff:168.63.129.16", "cloud metadata address"),
            ("fe80::1", "link-local address"),
            ("febf::1", "link-local address"),
            ("fec0::1", "deprecated site-local address"),
            ("ff02::1", "multicast address"),
            // IPv4-mapped: the IPv4 address decides.
            ("::ffff:127.0.0.1", "loopback address"),
            ("::ffff:10.0.0.1", "private (RFC 1918) address"),
        ];
        let wrong: Vec<String> = cases
            .iter()
            .filter_map(|(a, want)| {
                let got = what(a);
                (got.as_deref() != Some(*want)).then(|| format!("{a}: got {got:?}, want {want}"))
            })
            .collect();
        assert!(wrong.is_empty(), "{}", wrong.join("\n"));
    }

    #[test]
    fn ordinary_addresses() {
        for a in [
            "93.184.216.34",
            "1.1.1.1",
            "100.63.255.255",
            "100.128.0.1",
            "172.32.0.1",
            "198.17.255.255",
            "198.20.0.1",
            "223.255.255.255",
            // Globally reachable entries inside special blocks.
            "192.0.0.9",
            "192.0.0.10",
            "192.31.196.1",
            "192.52.193.1",
            "192.175.48.1",
            "2001:1::1",
            "2001:1::2",
            "2001:3::1",
            "2001:4:112::1",
            "2620:4f:8000::1",
            // Documentation ranges: never routed on the internet (see the module docs).
            "192.0.2.10",
            "198.51.100.1",
            "203.0.113.5",
            "2001:db8::1",
            "3fff::1",
            // Real IPv6 unicast, and NAT64 of a public address.
            "2606:4700::1",
            "64:ff9b::5db8:d822",
            "::ffff:93.184.216.34",
        ] {
            assert_eq!(what(a), None, "{a}");
        }
    }

    #[test]
    fn carried_ipv4_is_judged_too() {
        let cases = [
            // NAT64 well-known prefix: ordinary itself, special by what it carries.
            (
                "64:ff9b::a9fe:a9fe",
                "NAT64 (64:ff9b::/96) address carrying 169.254.169.254, a cloud metadata address",
                "64:ff9b::a9fe:0/112",
            ),
            (
                "64:ff9b::7f00:1",
                "NAT64 (64:ff9b::/96) address carrying 127.0.0.1, a loopback address",
                "64:ff9b::7f00:0/104",
            ),
            // 6to4 of 127.0.0.1 and of 10.0.0.1.
            (
                "2002:7f00:1::1",
                "6to4 address carrying 127.0.0.1, a loopback address",
                "2002:7f00::/24",
            ),
            (
                "2002:a00:1::",
                "6to4 address carrying 10.0.0.1, a private (RFC 1918) address",
                "2002:a00::/24",
            ),
            // Teredo whose client (bits inverted) is 192.168.1.1.
            (
                "2001:0:4136:e378:8000:63bf:3f57:fefe",
                "Teredo address carrying 192.168.1.1, a private (RFC 1918) address",
                "2001:0:4136:e378:8000:63bf:3f57:fefe/128",
            ),
            // IPv4-compatible and IPv4-translated.
            (
                "::10.0.0.1",
                "IPv4-compatible address carrying 10.0.0.1, a private (RFC 1918) address",
                "::a00:0/104",
            ),
            (
                "::ffff:0:127.0.0.1",
                "IPv4-translated address carrying 127.0.0.1, a loopback address",
                "::ffff:0:7f00:0/104",
            ),
        ];
        for (a, want, block) in cases {
            let got = classify(ip(a)).unwrap();
            assert_eq!(got.to_string(), want, "{a}");
            assert_eq!(got.block, net(block), "{a}");
        }
        // Special themselves even when what they carry is public.
        assert_eq!(
            what("::93.184.216.34").as_deref(),
            Some("IPv4-compatible address")
        );
        assert_eq!(what("2002:5db8:d822::1").as_deref(), Some("6to4 address"));
        assert_eq!(
            classify(ip("2002:5db8:d822::1")).unwrap().block,
            net("2002::/16")
        );
        assert_eq!(classify(ip("2001:5::1")).unwrap().block, net("2001::/23"));
        // A Teredo address with a public client: the IETF block around it.
        assert_eq!(
            classify(ip("2001:0:0:0:8000:63bf:3fff:fdd2"))
                .unwrap()
                .block,
            net("2001::/23")
        );
    }

    #[test]
    fn block_membership_is_ipnets() {
        // Every prefix length, each address at both ends of the block, just outside it and
        // a bit flipped at each place.
        let addr = |bits: u32, x: u128| match bits {
            32 => IpAddr::V4(Ipv4Addr::from(x as u32)),
            _ => IpAddr::V6(Ipv6Addr::from(x)),
        };
        let number = |ip: IpAddr| match ip {
            IpAddr::V4(a) => u128::from(u32::from(a)),
            IpAddr::V6(a) => u128::from(a),
        };
        let families: [(u32, &[u128]); 2] = [
            (32, &[0, 0xc000_0201, 0xffff_ffff, 0x0a01_0203, 0x8000_0000]),
            (128, &[0, 1, u128::MAX, 0x2001_0db8 << 96 | 5, 1 << 127]),
        ];
        for (bits, bases) in families {
            let top = u128::MAX >> (128 - bits);
            for &base in bases {
                for l in 0..=bits as u8 {
                    let n = IpNet::new(addr(bits, base), l).unwrap().trunc();
                    let (first, last) = (number(n.network()), number(n.broadcast()));
                    let mut probes = vec![first, last];
                    probes.push(first.wrapping_sub(1) & top);
                    probes.push(last.wrapping_add(1) & top);
                    probes.extend((0..bits).map(|bit| base ^ (1 << bit)));
                    let (ours, other) = match addr(bits, base) {
                        IpAddr::V4(b) => (Net::V4(b, l), Net::V6(Ipv6Addr::UNSPECIFIED, 0)),
                        IpAddr::V6(b) => (Net::V6(b, l), Net::V4(Ipv4Addr::UNSPECIFIED, 0)),
                    };
                    for a in probes.into_iter().map(|x| addr(bits, x)) {
                        assert_eq!(ours.contains(a), n.contains(&a), "{base:#x}/{l} holds {a}?");
                        assert!(!other.contains(a));
                    }
                }
            }
        }
    }

    #[test]
    fn blocks_are_the_outermost_special_entry() {
        let block = |a: &str| classify(ip(a)).unwrap().block;
        assert_eq!(block("169.254.169.254"), net("169.254.0.0/16"));
        assert_eq!(block("100.100.100.200"), net("100.64.0.0/10"));
        assert_eq!(block("192.0.0.8"), net("192.0.0.0/24"));
        assert_eq!(block("0.0.0.0"), net("0.0.0.0/8"));
        assert_eq!(block("fd00:ec2::254"), net("fc00::/7"));
        assert_eq!(block("2001:20::1"), net("2001::/23"));
        assert_eq!(block("::1"), net("::1/128"));
        assert_eq!(block("::"), net("::/128"));
        assert_eq!(block("::ffff:10.0.0.1"), net("10.0.0.0/8"));
    }

    #[test]
    fn explicit_coverage() {
        let covers = |nets: &[&str], a: &str| {
            let nets: Vec<IpNet> = nets.iter().map(|n| net(n)).collect();
            explicitly_covers(&nets, ip(a))
        };
        assert!(covers(&["192.0.2.10/32"], "192.0.2.10"));
        assert!(covers(&["0.0.0.0/0"], "192.0.2.10"));
        assert!(!covers(&["0.0.0.0/0"], "10.1.2.3"));
        assert!(covers(&["10.0.0.0/8"], "10.1.2.3"));
        assert!(!covers(&["0.0.0.0/0"], "169.254.169.254"));
        assert!(covers(&["169.254.169.254/32"], "169.254.169.254"));
        assert!(covers(&["169.254.0.0/16"], "169.254.169.254"));
        assert!(!covers(&["::/0"], "::1"));
        assert!(!covers(&["::/0"], "fd00:ec2::254"));
        assert!(covers(&["fd00::/8"], "fd00:ec2::254"));
        assert!(!covers(&["::/0"], "::ffff:127.0.0.1"));
        assert!(covers(&["127.0.0.0/8"], "::ffff:127.0.0.1"));
        // A NAT64 address as the kernel judges it: by the IPv4 address it carries.
        assert!(covers(&["10.0.0.0/8"], "64:ff9b::a00:5"));
        assert!(!covers(&["0.0.0.0/0"], "64:ff9b::a00:5"));
        assert!(!covers(&["::/0"], "64:ff9b::a00:5"));
        assert!(covers(&["192.0.2.0/24"], "64:ff9b::c000:20a"));
        assert!(!covers(&["0.0.0.0/0"], "100.100.100.200"));
        assert!(covers(&["100.64.0.0/10"], "100.100.100.200"));
        assert!(!covers(&["::/0"], "64:ff9b::a9fe:a9fe"));
        // (Policies name NAT64 destinations by their IPv4 networks.)
        assert!(!covers(&["0.0.0.0/0"], "64:ff9b::a9fe:a9fe"));
        assert!(covers(&["169.254.0.0/16"], "64:ff9b::a9fe:a9fe"));
        assert!(covers(&["0.0.0.0/0"], "64:ff9b::5db8:d822"));
        assert!(!covers(&["::/0"], "2002:5db8:d822::1"));
        assert!(covers(&["2002::/16"], "2002:5db8:d822::1"));
        // 6to4 of loopback needs more than the 6to4 block, and an IPv4 rule is no IPv6 one.
        assert!(!covers(&["2002::/16"], "2002:7f00:1::1"));
        assert!(!covers(&["127.0.0.0/8"], "2002:7f00:1::1"));
        assert!(covers(&["2002:7f00::/24"], "2002:7f00:1::1"));
        assert!(!covers(
            &["2001::/32"],
            "2001:0:4136:e378:8000:63bf:3f57:fefe"
        ));
        assert!(!covers(&["::/0"], "2001:20::1"));
        // `::/96` (IPv4-compatible) does not name the loopback or unspecified address.
        assert!(!covers(&["::/96"], "::1"));
        assert!(!covers(&["::/96"], "::"));
        assert!(covers(&["::1/128"], "::1"));
    }
}
