//! The policy file as written: serde types that mirror the YAML one to one.
//!
//! Unknown keys are rejected rather than ignored, because a misspelt key (`port:` for
//! `ports:`) would otherwise silently widen a rule. Scalars with a syntax of their own
//! (addresses, CIDRs, host names, port ranges, resolver addresses, `connect:` strings)
//! are parsed here by their own `Deserialize` impls, so that a malformed one is reported
//! at its line and column. Checks that need more than one value live in `compile`.
use std::{
    fmt,
    marker::PhantomData,
    net::{IpAddr, SocketAddr},
    str::FromStr,
};

use ipnet::IpNet;
use serde::{de, Deserialize, Deserializer};

use super::{
    host::HostPattern,
    http::{MethodPattern, PathGlob},
    request::HttpsUrl,
};

/// Appended to every port error.
pub(crate) const VALID_PORTS: &str = "valid: a port 1-65535 or a range \"lo-hi\"";
/// Appended to every destination error.
pub(crate) const VALID_DEST: &str = "valid: an IP address like 192.0.2.7 or 2001:db8::7, \
     a CIDR like 10.0.0.0/8, a host name like api.example.com, or a wildcard like \
     \"*.example.com\" (one label in front) or \"**.example.com\" (one or more)";
/// Appended to every `connect:` error.
pub(crate) const VALID_CONNECT: &str = "valid: \"192.0.2.7:443\", \"192.0.2.7:53/udp\", \
     \"[2001:db8::1]:443/tcp\" or \"api.example.com:443\"; the protocol is tcp (the default) \
     or udp";
/// Appended to every `resolve:` error.
pub(crate) const VALID_RESOLVE: &str =
    "valid: one DNS name like api.example.com, not a wildcard or an address";
/// Appended to every `dns.upstream` error.
pub(crate) const VALID_UPSTREAM: &str = "valid: a resolver's IP address like 192.0.2.53 or \
     \"2001:db8::53\" (port 53), or with a port like \"192.0.2.53:5353\" or \
     \"[2001:db8::53]:5353\"";
/// Appended to every `dns.min_ttl` and `dns.grace` error.
pub(crate) const VALID_SECONDS: &str = "valid: a whole number of seconds, like 30";
/// Appended to every `request:` error.
pub(crate) const VALID_REQUEST: &str =
    "valid: METHOD URL, like \"GET https://api.example.com/path?query\"";

/// A whole policy file.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawPolicy {
    /// Format version. Only `1` exists.
    pub version: u64,
    /// What happens to a connection no rule decides: `deny` (when omitted) or `audit`.
    #[serde(default)]
    pub default: RawDefault,
    /// How the daemon resolves names on the sandbox's behalf. Omitted: the daemon's own
    /// settings apply.
    #[serde(default)]
    pub dns: Option<RawDns>,
    /// What the sandbox's processes must not hold; an attach that finds them holding it is
    /// refused.
    #[serde(default, deserialize_with = "present")]
    pub require: Option<RawRequire>,
    /// Rules, in priority order among rules whose destinations are equally specific.
    #[serde(default)]
    pub rules: Vec<RawRule>,
    /// Connections with the verdict the policy must give them, checked at load by
    /// `policy test` and by CI.
    #[serde(default)]
    pub tests: Vec<RawTest>,
    /// What the daemon does about this sandbox's alerts (`record` or `quarantine` per
    /// kind) and when denials count as a burst. Omitted: the daemon's settings.
    #[serde(default, deserialize_with = "present")]
    pub alerts: Option<crate::alerts::RawAlerts>,
}

/// The `require:` section.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRequire {
    /// Capabilities (lowercase, without `cap_`: `sys_admin`, `net_admin`, `net_raw`, ...)
    /// that no process in the sandbox may hold in its effective set at attach.
    #[serde(default, deserialize_with = "present")]
    pub no_capabilities: Option<Vec<String>>,
    /// The daemon must refuse packet, vsock and other non-inet sockets in the sandbox
    /// (BPF LSM): without that the attach is refused.
    #[serde(default)]
    pub non_inet_sockets_refused: bool,
}

/// The `dns:` section.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawDns {
    /// The resolvers the daemon asks on the sandbox's behalf (at least one when given),
    /// by address: `ADDRESS` (port 53) or `ADDRESS:PORT`, an IPv6 address in brackets.
    /// Omitted: the daemon's `dns_upstream`.
    #[serde(default, deserialize_with = "present")]
    pub upstream: Option<Vec<RawUpstream>>,
    /// Seconds a learned address lives at least, whatever the answer's TTL (0-86400;
    /// 5 when omitted).
    #[serde(default, deserialize_with = "present")]
    pub min_ttl: Option<RawSeconds>,
    /// Seconds a learned address lives after its TTL (0-3600; 30 when omitted), so that
    /// a connection made just before expiry is not refused.
    #[serde(default, deserialize_with = "present")]
    pub grace: Option<RawSeconds>,
    /// Query types answered besides A and AAAA (`HTTPS`, `SVCB`, `TXT`, `MX`, `SRV`, ...);
    /// all others are refused without reaching upstream. `ANY`, `AXFR` and `IXFR` never.
    #[serde(default, deserialize_with = "present")]
    pub query_types: Option<Vec<String>>,
    /// Limits on the queries a sandbox sends upstream.
    #[serde(default, deserialize_with = "present")]
    pub budget: Option<RawDnsBudget>,
}

/// `dns.budget`: each omitted key takes its default.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawDnsBudget {
    /// Queries per second sent upstream, on average (a token bucket's rate).
    #[serde(default, deserialize_with = "present")]
    pub queries_per_second: Option<u64>,
    /// Queries that may go upstream at once after a quiet spell (the bucket's size).
    #[serde(default, deserialize_with = "present")]
    pub burst: Option<u64>,
    /// Distinct names under one allowed wildcard (`*.x`, `**.x`) per minute.
    #[serde(default, deserialize_with = "present")]
    pub names_per_suffix_per_minute: Option<u64>,
}

/// A resolver address in `dns.upstream`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct RawUpstream(pub SocketAddr);

/// A number of seconds (range checked by `compile`, which knows the field).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct RawSeconds(pub u64);

/// For keys whose omission means "no restriction" or a default: when present they must
/// have a value. An empty one (`http:` with its entries commented out, or `~`) is an
/// error, not the same as leaving the key out, which would silently widen the rule.
fn present<'de, D, T>(d: D) -> Result<Option<T>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Deserialize<'de>,
{
    match Option::<T>::deserialize(d)? {
        Some(value) => Ok(Some(value)),
        None => Err(serde::de::Error::custom(
            "empty value: give it a value, or remove the key (an empty key is not read as \
             one left out, which may mean no restriction)",
        )),
    }
}

/// What happens to a connection no rule decides.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RawDefault {
    /// Refuse it.
    #[default]
    Deny,
    /// Let it through, but record it as one the policy would have denied.
    Audit,
}

/// One rule.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRule {
    /// Unique name of `[A-Za-z0-9_.-]` characters; audit records and tests refer to it.
    pub name: String,
    /// Destinations the rule applies to (at least one): addresses, CIDRs, and host names
    /// or wildcards, whose addresses the rule covers once the sandbox resolves them.
    pub to: Vec<RawDest>,
    /// Destination ports; omitted means any port.
    #[serde(default, deserialize_with = "present")]
    pub ports: Option<Vec<RawPortRange>>,
    /// `tcp`, `udp` or `any`. Omitted means `any`, or `tcp` for proxy and passthrough
    /// rules, which allow nothing else.
    #[serde(default, deserialize_with = "present")]
    pub protocol: Option<RawProtocol>,
    /// What to do with a matching connection.
    pub action: RawAction,
    /// Proxy and passthrough rules only (required there): the names the TLS server name
    /// and the HTTP `Host` must match.
    #[serde(default, deserialize_with = "present")]
    pub hosts: Option<Vec<HostPattern>>,
    /// Proxy rules only: the name of the daemon-configured credential to inject.
    #[serde(default, deserialize_with = "present")]
    pub credential: Option<String>,
    /// Proxy rules only: the requests allowed; when present, all others are refused.
    #[serde(default, deserialize_with = "present")]
    pub http: Option<Vec<RawHttpRule>>,
    /// Proxy rules only: git smart-HTTP to these repositories (fetch, and pushes only to
    /// the listed refs); other requests on the rule are refused.
    #[serde(default, deserialize_with = "present")]
    pub git: Option<super::git::RawGitRule>,
    /// Rules with names in `to` only: the addresses and CIDRs those names may resolve to;
    /// an answer's address elsewhere is refused (not installed, not released).
    #[serde(default, deserialize_with = "present")]
    pub answers: Option<Vec<RawDest>>,
}

/// One entry of a proxy rule's `http:` list: any of `methods` on any of `paths`.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawHttpRule {
    /// Upper-case method names, or `"*"` for any (at least one).
    pub methods: Vec<MethodPattern>,
    /// Absolute path patterns (at least one).
    pub paths: Vec<PathGlob>,
}

/// A destination in a rule's `to:` list.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum RawDest {
    /// An address (as a /32 or /128) or a CIDR whose host bits are clear.
    Net(IpNet),
    /// A host name (`api.example.com`) or wildcard (`*.example.com`, `**.example.com`),
    /// normalised. It covers the addresses the daemon learns by resolving a matching name.
    Host(HostPattern),
}

/// An inclusive destination port range; a single port is `lo == hi`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct RawPortRange {
    /// First port, at least 1.
    pub lo: u16,
    /// Last port, at least `lo`.
    pub hi: u16,
}

/// Which transport a rule applies to.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RawProtocol {
    /// Both TCP and UDP.
    #[default]
    Any,
    Tcp,
    Udp,
}

/// What a rule does with a matching connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RawAction {
    Allow,
    Deny,
    /// Send the connection through the proxy, which terminates TLS, checks each request
    /// and injects the rule's credential.
    Proxy,
    /// Send the connection through the proxy, which checks the TLS server name and then
    /// relays TLS unchanged.
    Passthrough,
}

impl RawAction {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Allow => "allow",
            Self::Deny => "deny",
            Self::Proxy => "proxy",
            Self::Passthrough => "passthrough",
        }
    }
}

/// A policy test: a connection, an HTTPS request or a name lookup, and the verdict the
/// policy must give it. Exactly one of `connect`, `request` and `resolve` is given
/// (checked by `compile`).
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawTest {
    /// The connection, like `192.0.2.7:443/tcp`, `[2001:db8::1]:53/udp` or
    /// `api.example.com:443` (judged as if the name resolved to an address no rule lists).
    #[serde(default)]
    pub connect: Option<RawConnect>,
    /// The request, like `GET https://api.example.com/path`.
    #[serde(default)]
    pub request: Option<RawRequest>,
    /// A name the sandbox looks up, like `api.example.com`: `expect: allow` if it
    /// resolves, `deny` if the resolver refuses it.
    #[serde(default)]
    pub resolve: Option<RawName>,
    /// The verdict it must get (`allow` or `deny` for a request or a name).
    pub expect: RawVerdict,
    /// The rule that must decide it. Omitted, `~`, `none` or `default` mean that no rule
    /// may match, so the policy default decides (for a request: it is denied).
    #[serde(default)]
    pub rule: Option<String>,
    /// Request tests only: the credential that must be injected; omitted means none.
    #[serde(default)]
    pub credential: Option<String>,
}

/// A verdict a test expects.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RawVerdict {
    Allow,
    Deny,
    /// Allowed only because the policy default is `audit`.
    Audit,
    /// Sent to the proxy (a proxy or passthrough rule).
    Redirect,
}

/// The transport of a test connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RawTransport {
    Tcp,
    Udp,
}

/// Where a test connection goes.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum RawTarget {
    /// An address as written (a v4-mapped address stays v6 here).
    Addr(IpAddr),
    /// One DNS name, normalised (lower case, no trailing dot).
    Name(String),
}

/// A test's `connect:` value.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RawConnect {
    /// The text as written, for reports.
    pub text: String,
    /// Destination address or name.
    pub target: RawTarget,
    /// Destination port (0 is allowed: a caller may pass it to `connect()`).
    pub port: u16,
    /// `tcp` unless the text ends in `/udp`.
    pub transport: RawTransport,
}

/// A test's `resolve:` value: one DNS name.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct RawName {
    /// The text as written, for reports.
    pub text: String,
    /// Normalised: lower case, no trailing dot.
    pub name: String,
}

/// A test's `request:` value.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RawRequest {
    /// The text as written, for reports.
    pub text: String,
    /// The method, an HTTP token (compared case-sensitively).
    pub method: String,
    /// The URL as written.
    pub url: String,
}

/// Deserializes a string through `FromStr`, naming what was expected when the YAML value
/// is not a string at all.
struct ParsedStr<T>(PhantomData<T>, &'static str);

impl<T> de::Visitor<'_> for ParsedStr<T>
where
    T: FromStr<Err = String>,
{
    type Value = T;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.1)
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<T, E> {
        v.parse().map_err(E::custom)
    }
}

impl<'de> Deserialize<'de> for RawDest {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_str(ParsedStr(
            PhantomData,
            "an IP address, a CIDR or a host name",
        ))
    }
}

impl<'de> Deserialize<'de> for RawConnect {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_str(ParsedStr(
            PhantomData,
            "a connection like \"192.0.2.7:443/tcp\"",
        ))
    }
}

impl<'de> Deserialize<'de> for RawName {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_str(ParsedStr(PhantomData, "a DNS name like api.example.com"))
    }
}

impl<'de> Deserialize<'de> for RawUpstream {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_str(ParsedStr(
            PhantomData,
            "a resolver address like 192.0.2.53 or \"192.0.2.53:5353\"",
        ))
    }
}

impl<'de> Deserialize<'de> for RawSeconds {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(SecondsVisitor)
    }
}

struct SecondsVisitor;

impl de::Visitor<'_> for SecondsVisitor {
    type Value = RawSeconds;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a whole number of seconds")
    }

    fn visit_u64<E: de::Error>(self, v: u64) -> Result<RawSeconds, E> {
        Ok(RawSeconds(v))
    }

    fn visit_i64<E: de::Error>(self, v: i64) -> Result<RawSeconds, E> {
        u64::try_from(v).map(RawSeconds).map_err(|_| {
            E::custom(format!(
                "invalid duration {v}: seconds are not negative ({VALID_SECONDS})"
            ))
        })
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<RawSeconds, E> {
        Err(E::custom(format!(
            "invalid duration {v:?}: is not a number; units are not written, the number is \
             seconds ({VALID_SECONDS})"
        )))
    }
}

impl<'de> Deserialize<'de> for RawRequest {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_str(ParsedStr(
            PhantomData,
            "a request like \"GET https://api.example.com/\"",
        ))
    }
}

impl<'de> Deserialize<'de> for HostPattern {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_str(ParsedStr(
            PhantomData,
            "a host name like api.example.com or \"*.example.com\"",
        ))
    }
}

impl<'de> Deserialize<'de> for MethodPattern {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_str(ParsedStr(PhantomData, "a method like GET, or \"*\""))
    }
}

impl<'de> Deserialize<'de> for PathGlob {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_str(ParsedStr(
            PhantomData,
            "a path pattern like \"/repos/acme/**\"",
        ))
    }
}

impl FromStr for RawRequest {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let text = s.trim();
        let bad = |why: &str| format!("invalid request {text:?}: {why} ({VALID_REQUEST})");
        let mut words = text.split_ascii_whitespace();
        let (Some(method), Some(url), None) = (words.next(), words.next(), words.next()) else {
            return Err(bad("expected a method and a URL separated by a space"));
        };
        let method = method
            .parse::<MethodPattern>()
            .ok()
            .filter(|m| *m != MethodPattern::Any)
            .ok_or_else(|| bad(&format!("{method:?} is not an upper-case method like GET")))?;
        HttpsUrl::parse(url).map_err(|why| bad(&why))?;
        Ok(Self {
            text: text.to_owned(),
            method: method.to_string(),
            url: url.to_owned(),
        })
    }
}

impl FromStr for RawDest {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let text = s.trim();
        if let Some((addr, len)) = text.split_once('/') {
            let addr: IpAddr = addr.parse().map_err(|_| {
                format!("invalid CIDR {text:?}: {addr:?} is not an IP address ({VALID_DEST})")
            })?;
            let max = if addr.is_ipv4() { 32 } else { 128 };
            let len: u8 = len.parse().ok().filter(|l| *l <= max).ok_or_else(|| {
                format!("invalid CIDR {text:?}: prefix length {len:?} is not a number 0-{max}")
            })?;
            let net = IpNet::new(addr, len).map_err(|e| format!("invalid CIDR {text:?}: {e}"))?;
            check_host_bits(net)?;
            return Ok(Self::Net(net));
        }
        if let Ok(addr) = text.parse::<IpAddr>() {
            return Ok(Self::Net(IpNet::from(addr)));
        }
        // `300.1.1.1` and `10.0.0` are mistyped addresses, not names.
        if looks_numeric(text) {
            return Err(format!("invalid destination {text:?} ({VALID_DEST})"));
        }
        HostPattern::parse_bare(text)
            .map(Self::Host)
            .map_err(|why| format!("invalid destination {text:?}: {why} ({VALID_DEST})"))
    }
}

/// Whether the last label (ignoring one trailing dot) is all digits, so the text can only
/// be a (mistyped) address: no top-level domain is numeric.
fn looks_numeric(text: &str) -> bool {
    let text = text.strip_suffix('.').unwrap_or(text);
    text.rsplit('.')
        .next()
        .is_some_and(|l| !l.is_empty() && l.bytes().all(|b| b.is_ascii_digit()))
}

/// Parses one DNS name (not a wildcard, not an address) and normalises it; `Err` says
/// only what is wrong.
fn parse_name(text: &str) -> Result<String, String> {
    if text.parse::<IpAddr>().is_ok() || looks_numeric(text) {
        return Err("is an address, not a name".into());
    }
    let pattern = HostPattern::parse_bare(text)?;
    if pattern.is_wildcard() {
        return Err("is a wildcard; a test looks up one name".into());
    }
    Ok(pattern.to_string())
}

impl FromStr for RawName {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let text = s.trim();
        let name = parse_name(text)
            .map_err(|why| format!("invalid name {text:?}: {why} ({VALID_RESOLVE})"))?;
        Ok(Self {
            text: text.to_owned(),
            name,
        })
    }
}

impl FromStr for RawUpstream {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let text = s.trim();
        let bad = |why: &str| format!("invalid resolver {text:?}: {why} ({VALID_UPSTREAM})");
        let addr = match text.parse::<SocketAddr>() {
            Ok(addr) => addr,
            Err(_) => match text.parse::<IpAddr>() {
                Ok(ip) => SocketAddr::new(ip, 53),
                Err(_) => {
                    let host = text.rsplit_once(':').map_or(text, |(h, _)| h);
                    return Err(if parse_name(host).is_ok() {
                        bad("is a name; resolvers are given by address, since finding \
                             them by name would need a resolver")
                    } else {
                        bad(
                            "is not an address, or ADDRESS:PORT with an IPv6 address in \
                             brackets",
                        )
                    });
                }
            },
        };
        if addr.port() == 0 {
            return Err(bad("port 0 is not a port a resolver listens on"));
        }
        if let SocketAddr::V6(v6) = addr {
            if v6.scope_id() != 0 {
                return Err(bad("zone indices are not supported"));
            }
        }
        Ok(Self(addr))
    }
}

/// A CIDR such as `10.0.0.1/8` is almost always a typo for the network or for the single
/// address; accepting it silently would cover far more (or less) than meant.
pub(crate) fn check_host_bits(net: IpNet) -> Result<(), String> {
    check_nat64(net)?;
    let network = net.trunc();
    if network == net {
        return Ok(());
    }
    let single = IpNet::from(net.addr());
    Err(format!(
        "CIDR {net} has host bits set: did you mean {network} (the whole network) \
         or {single} (the single address)?"
    ))
}

/// A network inside the NAT64 prefix (`64:ff9b::/96`) cannot be a rule's: the kernel
/// judges NAT64 destinations by the IPv4 address they carry, so the IPv4 network is what
/// a rule names (folding it silently would turn `64:ff9b::/96` into `0.0.0.0/0`). Nor can
/// a network of `/32` to `/95` around it (`64:ff9b::/64`): it would match none of the
/// NAT64 addresses it seems to name (a `deny` of it would not stop them). Wider ones
/// (`::/0`, `64::/16`) are about IPv6 at large and stay valid.
fn check_nat64(net: IpNet) -> Result<(), String> {
    let IpNet::V6(v6) = net else {
        return Ok(());
    };
    let Some(v4) = crate::net::nat64_v4(v6.network()) else {
        return Ok(());
    };
    let Some(len) = v6.prefix_len().checked_sub(96) else {
        if v6.prefix_len() < 32 {
            return Ok(());
        }
        return Err(format!(
            "{net} holds the NAT64 prefix 64:ff9b::/96, whose addresses are judged by the \
             IPv4 address they carry: this network matches none of them; write the IPv4 \
             networks meant (0.0.0.0/0 for all) and, for the rest, networks beside \
             64:ff9b::/96"
        ));
    };
    let v4 =
        ipnet::Ipv4Net::new(v4, len).map_or_else(|_| v4.to_string(), |n| n.trunc().to_string());
    Err(format!(
        "{net} is inside the NAT64 prefix 64:ff9b::/96, whose addresses are judged by the \
         IPv4 address they carry: write the IPv4 network ({v4})"
    ))
}

impl<'de> Deserialize<'de> for RawPortRange {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(PortVisitor)
    }
}

struct PortVisitor;

impl de::Visitor<'_> for PortVisitor {
    type Value = RawPortRange;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a port 1-65535 or a range \"lo-hi\"")
    }

    fn visit_u64<E: de::Error>(self, v: u64) -> Result<RawPortRange, E> {
        let port = single_port(v)
            .map_err(|why| E::custom(format!("invalid port {v}: {why} ({VALID_PORTS})")))?;
        Ok(RawPortRange { lo: port, hi: port })
    }

    fn visit_i64<E: de::Error>(self, v: i64) -> Result<RawPortRange, E> {
        match u64::try_from(v) {
            Ok(v) => self.visit_u64(v),
            Err(_) => Err(E::custom(format!(
                "invalid port {v}: ports are not negative ({VALID_PORTS})"
            ))),
        }
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<RawPortRange, E> {
        v.parse().map_err(E::custom)
    }
}

impl FromStr for RawPortRange {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let text = s.trim();
        let Some((lo, hi)) = text.split_once('-') else {
            let port = parse_port(text)
                .map_err(|why| format!("invalid port {text:?}: {why} ({VALID_PORTS})"))?;
            return Ok(Self { lo: port, hi: port });
        };
        let bad = |why: String| format!("invalid port range {text:?}: {why} ({VALID_PORTS})");
        let lo = parse_port(lo.trim()).map_err(|why| bad(format!("start {why}")))?;
        let hi = parse_port(hi.trim()).map_err(|why| bad(format!("end {why}")))?;
        check_port_range(lo, hi).map_err(bad)?;
        Ok(Self { lo, hi })
    }
}

fn parse_port(text: &str) -> Result<u16, String> {
    if text.is_empty() {
        return Err("is missing".into());
    }
    if !text.bytes().all(|b| b.is_ascii_digit()) {
        return Err("is not a number".into());
    }
    // All digits: the only parse failure left is overflow.
    let value = text.parse::<u64>().unwrap_or(u64::MAX);
    single_port(value)
}

fn single_port(value: u64) -> Result<u16, String> {
    match u16::try_from(value) {
        Ok(0) => Err("is 0; ports start at 1".into()),
        Ok(port) => Ok(port),
        Err(_) => Err("is above 65535".into()),
    }
}

/// Shared with `compile`, which re-checks ranges built in code rather than parsed.
pub(crate) fn check_port_range(lo: u16, hi: u16) -> Result<(), String> {
    if lo == 0 {
        Err("ports start at 1".into())
    } else if lo > hi {
        Err("start is greater than end".into())
    } else {
        Ok(())
    }
}

impl FromStr for RawConnect {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let text = s.trim();
        let bad = |why: &str| format!("invalid connection {text:?}: {why} ({VALID_CONNECT})");
        let (target, transport) = match text.rsplit_once('/') {
            None => (text, RawTransport::Tcp),
            Some((target, "tcp")) => (target, RawTransport::Tcp),
            Some((target, "udp")) => (target, RawTransport::Udp),
            Some((_, other)) => {
                return Err(bad(&format!("unknown protocol {other:?}")));
            }
        };
        if let Some((host, port)) = target.rsplit_once(':') {
            if !host.contains(':') && !host.starts_with('[') && !looks_numeric(host) {
                let name = parse_name(host).map_err(|why| bad(&format!("name {host:?} {why}")))?;
                // Port 0 is allowed, as for addresses.
                let port = Some(port)
                    .filter(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()))
                    .and_then(|p| p.parse::<u16>().ok())
                    .ok_or_else(|| bad(&format!("port {port:?} is not a number 0-65535")))?;
                return Ok(Self {
                    text: text.to_owned(),
                    target: RawTarget::Name(name),
                    port,
                    transport,
                });
            }
        }
        let addr: SocketAddr = target.parse().map_err(|_| {
            if target.parse::<std::net::Ipv6Addr>().is_ok() {
                bad("the port is missing (an IPv6 address goes in brackets: [ADDRESS]:PORT)")
            } else if target.parse::<IpAddr>().is_ok() || parse_name(target).is_ok() {
                bad("the port is missing")
            } else {
                bad("expected ADDRESS:PORT or NAME:PORT, with an IPv6 address in brackets")
            }
        })?;
        if let SocketAddr::V6(v6) = addr {
            if v6.scope_id() != 0 {
                return Err(bad("zone indices are not supported"));
            }
        }
        Ok(Self {
            text: text.to_owned(),
            target: RawTarget::Addr(addr.ip()),
            port: addr.port(),
            transport,
        })
    }
}

#[cfg(test)]
#[expect(clippy::unwrap_used, reason = "tests fail loudly")]
mod tests {
    use super::*;

    /// Input, and the parsed value or a part of the error message.
    type Case<T> = (&'static str, Result<T, &'static str>);

    #[test]
    fn ports() {
        let cases: &[Case<(u16, u16)>] = &[
            ("443", Ok((443, 443))),
            ("1", Ok((1, 1))),
            ("65535", Ok((65535, 65535))),
            ("8000-8100", Ok((8000, 8100))),
            (" 8000 - 8100 ", Ok((8000, 8100))),
            ("1-65535", Ok((1, 65535))),
            ("80-80", Ok((80, 80))),
            ("0", Err("invalid port \"0\": is 0; ports start at 1")),
            ("65536", Err("invalid port \"65536\": is above 65535")),
            ("99999999999999999999", Err("is above 65535")),
            ("http", Err("invalid port \"http\": is not a number")),
            ("-5", Err("invalid port range \"-5\": start is missing")),
            ("80-", Err("invalid port range \"80-\": end is missing")),
            (
                "0-80",
                Err("invalid port range \"0-80\": start is 0; ports start at 1"),
            ),
            (
                "9000-80",
                Err("invalid port range \"9000-80\": start is greater than end"),
            ),
            ("1-2-3", Err("end is not a number")),
        ];
        for (text, want) in cases {
            let got = text.parse::<RawPortRange>();
            match (want, got) {
                (Ok((lo, hi)), Ok(r)) => assert_eq!((r.lo, r.hi), (*lo, *hi), "{text}"),
                (Err(msg), Err(e)) => {
                    assert!(e.contains(msg), "{text}: {e:?} lacks {msg:?}");
                    assert!(e.contains(VALID_PORTS), "{text}: {e:?}");
                }
                (want, got) => unreachable!("{text}: want {want:?}, got {got:?}"),
            }
        }
    }

    #[test]
    fn destinations() {
        let net = |s: &str| RawDest::Net(s.parse().unwrap());
        let host = |s: &str| RawDest::Host(HostPattern::parse(s).unwrap());
        let cases: &[Case<RawDest>] = &[
            ("192.0.2.7", Ok(net("192.0.2.7/32"))),
            ("10.0.0.0/8", Ok(net("10.0.0.0/8"))),
            ("0.0.0.0/0", Ok(net("0.0.0.0/0"))),
            ("192.0.2.7/32", Ok(net("192.0.2.7/32"))),
            ("2001:db8::/32", Ok(net("2001:db8::/32"))),
            ("2001:db8::1/128", Ok(net("2001:db8::1/128"))),
            ("::/0", Ok(net("::/0"))),
            ("::ffff:192.0.2.0/120", Ok(net("::ffff:192.0.2.0/120"))),
            ("API.GitHub.com", Ok(host("api.github.com"))),
            ("api.github.com.", Ok(host("api.github.com"))),
            ("*.Example.com", Ok(host("*.example.com"))),
            ("**.example.com", Ok(host("**.example.com"))),
            ("localhost", Ok(host("localhost"))),
            ("1password.com", Ok(host("1password.com"))),
            (
                "10.0.0.1/8",
                Err("did you mean 10.0.0.0/8 (the whole network) or 10.0.0.1/32"),
            ),
            ("2001:db8::1/32", Err("did you mean 2001:db8::/32")),
            (
                "10.0.0.0/33",
                Err("prefix length \"33\" is not a number 0-32"),
            ),
            (
                "2001:db8::/129",
                Err("prefix length \"129\" is not a number 0-128"),
            ),
            ("10.0.0.0/x", Err("is not a number")),
            (
                "300.1.1.1",
                Err("invalid destination \"300.1.1.1\" (valid: "),
            ),
            ("10.0.0", Err("invalid destination \"10.0.0\" (valid: ")),
            ("*.10", Err("invalid destination \"*.10\" (valid: ")),
            ("foo/8", Err("\"foo\" is not an IP address")),
            (
                "a..b",
                Err("invalid destination \"a..b\": has an empty label"),
            ),
            ("*", Err("`*` may only be the whole first label")),
            ("a.*.b", Err("`*` may only be the whole first label")),
            ("***.b", Err("`*` may only be the whole first label")),
            ("-a.com", Err("label `-a` starts or ends with `-`")),
            ("a_b.example", Err("label `a_b` contains '_'")),
            ("", Err("invalid destination \"\": is empty")),
        ];
        for (text, want) in cases {
            match (want, text.parse::<RawDest>()) {
                (Ok(w), Ok(g)) => assert_eq!(w, &g, "{text}"),
                (Err(msg), Err(e)) => assert!(e.contains(msg), "{text}: {e:?} lacks {msg:?}"),
                (want, got) => unreachable!("{text}: want {want:?}, got {got:?}"),
            }
        }
    }

    #[test]
    fn name_connects() {
        let cases = [
            (
                "api.github.com:443",
                "api.github.com",
                443,
                RawTransport::Tcp,
            ),
            (
                "API.GitHub.com.:443/tcp",
                "api.github.com",
                443,
                RawTransport::Tcp,
            ),
            ("dns.example:53/udp", "dns.example", 53, RawTransport::Udp),
            ("localhost:0", "localhost", 0, RawTransport::Tcp),
        ];
        for (text, name, port, transport) in cases {
            let c = text.parse::<RawConnect>().unwrap();
            assert_eq!(
                (c.target, c.port, c.transport),
                (RawTarget::Name(name.to_owned()), port, transport),
                "{text}"
            );
            assert_eq!(c.text, text);
        }
    }

    #[test]
    fn upstreams() {
        let cases: &[Case<&str>] = &[
            ("192.0.2.53", Ok("192.0.2.53:53")),
            (" 2001:db8::53 ", Ok("[2001:db8::53]:53")),
            ("192.0.2.53:5353", Ok("192.0.2.53:5353")),
            ("[2001:db8::53]:5353", Ok("[2001:db8::53]:5353")),
            (
                "dns.example",
                Err("is a name; resolvers are given by address"),
            ),
            (
                "dns.example:53",
                Err("is a name; resolvers are given by address"),
            ),
            ("192.0.2.53:0", Err("port 0")),
            ("192.0.2.53:65536", Err("is not an address")),
            ("2001:db8::53:5353", Ok("[2001:db8::53:5353]:53")),
            ("300.1.2.3", Err("is not an address")),
            ("[fe80::1%2]:53", Err("zone indices")),
            ("", Err("is not an address")),
        ];
        for (text, want) in cases {
            match (want, text.parse::<RawUpstream>()) {
                (Ok(w), Ok(g)) => assert_eq!(g.0.to_string(), *w, "{text}"),
                (Err(msg), Err(e)) => {
                    assert!(e.contains(msg), "{text}: {e:?} lacks {msg:?}");
                    assert!(e.contains(VALID_UPSTREAM), "{text}: {e:?}");
                }
                (want, got) => unreachable!("{text}: want {want:?}, got {got:?}"),
            }
        }
    }

    #[test]
    fn requests() {
        let cases: &[Case<(&str, &str)>] = &[
            ("GET https://a.example/", Ok(("GET", "https://a.example/"))),
            (
                "  POST   https://a.example:8443/x?y=z ",
                Ok(("POST", "https://a.example:8443/x?y=z")),
            ),
            (
                "M-SEARCH https://a.example",
                Ok(("M-SEARCH", "https://a.example")),
            ),
            ("GET", Err("expected a method and a URL")),
            (
                "GET https://a.example/ x",
                Err("expected a method and a URL"),
            ),
            ("https://a.example/", Err("expected a method and a URL")),
            (
                "get https://a.example/",
                Err("\"get\" is not an upper-case method"),
            ),
            (
                "* https://a.example/",
                Err("\"*\" is not an upper-case method"),
            ),
            ("GET ftp://a.example/", Err("is not https")),
            (
                "GET https://a.example:99999/",
                Err("is not a number 1-65535"),
            ),
        ];
        for (text, want) in cases {
            match (want, text.parse::<RawRequest>()) {
                (Ok((m, u)), Ok(r)) => {
                    assert_eq!((r.method.as_str(), r.url.as_str()), (*m, *u), "{text}");
                    assert_eq!(r.text, text.trim());
                }
                (Err(msg), Err(e)) => {
                    assert!(e.contains(msg), "{text}: {e:?} lacks {msg:?}");
                    assert!(e.contains(VALID_REQUEST), "{text}: {e:?}");
                }
                (want, got) => unreachable!("{text}: want {want:?}, got {got:?}"),
            }
        }
    }

    #[test]
    fn connects() {
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        let cases: &[Case<(IpAddr, u16, RawTransport)>] = &[
            (
                "192.0.2.7:443",
                Ok((ip("192.0.2.7"), 443, RawTransport::Tcp)),
            ),
            (
                "192.0.2.7:443/tcp",
                Ok((ip("192.0.2.7"), 443, RawTransport::Tcp)),
            ),
            (
                "192.0.2.7:53/udp",
                Ok((ip("192.0.2.7"), 53, RawTransport::Udp)),
            ),
            (
                "[2001:db8::1]:443/udp",
                Ok((ip("2001:db8::1"), 443, RawTransport::Udp)),
            ),
            (
                "[::ffff:192.0.2.7]:80",
                Ok((ip("::ffff:192.0.2.7"), 80, RawTransport::Tcp)),
            ),
            ("192.0.2.7:0", Ok((ip("192.0.2.7"), 0, RawTransport::Tcp))),
            ("192.0.2.7", Err("the port is missing")),
            ("192.0.2.7:443/sctp", Err("unknown protocol \"sctp\"")),
            ("2001:db8::1:443", Err("goes in brackets")),
            ("192.0.2.7:70000", Err("expected ADDRESS:PORT")),
            ("[fe80::1%2]:443", Err("zone indices")),
            ("example.com", Err("the port is missing")),
            (
                "example.com:99999",
                Err("port \"99999\" is not a number 0-65535"),
            ),
            ("example.com:", Err("port \"\" is not a number 0-65535")),
            ("a..b:443", Err("name \"a..b\" has an empty label")),
            (
                "**.example.com:443",
                Err("name \"**.example.com\" is a wildcard"),
            ),
            ("exa mple.com:443", Err("label `exa mple` contains ' '")),
            ("300.1.1.1:443", Err("expected ADDRESS:PORT or NAME:PORT")),
        ];
        for (text, want) in cases {
            match (want, text.parse::<RawConnect>()) {
                (Ok((a, p, t)), Ok(c)) => {
                    let got = (c.target, c.port, c.transport);
                    assert_eq!(got, (RawTarget::Addr(*a), *p, *t), "{text}");
                }
                (Err(msg), Err(e)) => {
                    assert!(e.contains(msg), "{text}: {e:?} lacks {msg:?}");
                    assert!(e.contains(VALID_CONNECT), "{text}: {e:?}");
                }
                (want, got) => unreachable!("{text}: want {want:?}, got {got:?}"),
            }
        }
    }
}
