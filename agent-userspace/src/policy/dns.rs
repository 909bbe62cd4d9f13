//! The `dns:` section: where the daemon sends the sandbox's name lookups, and how long an
//! address it learns from an answer stays in the kernel's maps.
//!
//! A name in a rule's `to` grants nothing by itself: the daemon answers the sandbox's
//! queries for allowed names (asking `upstream`), and writes each answered address into
//! the kernel with the rules the name matched ([`Policy::learned_entries`]). The entry
//! expires `max(TTL, min_ttl) + grace` seconds later; `min_ttl` keeps very short TTLs from
//! churning the maps, `grace` lets a client that looked a name up just before expiry still
//! connect.
//!
//! [`Policy::learned_entries`]: super::Policy::learned_entries
use std::{net::SocketAddr, time::Duration};

use super::{
    error::{CompileError, FieldPath},
    raw::{RawDns, RawSeconds},
};

/// A checked `dns:` section.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct DnsConfig {
    /// The resolvers to ask, in file order, without duplicates; never empty. Port 53
    /// unless the file gave another.
    pub upstream: Vec<SocketAddr>,
    /// Seconds a learned address lives at least, at most [`DnsConfig::MAX_MIN_TTL`].
    pub min_ttl: u32,
    /// Seconds added after the TTL, at most [`DnsConfig::MAX_GRACE`].
    pub grace: u32,
}

impl DnsConfig {
    /// `min_ttl` when the file omits it.
    pub const DEFAULT_MIN_TTL: u32 = 5;
    /// `grace` when the file omits it.
    pub const DEFAULT_GRACE: u32 = 30;
    /// Largest `min_ttl`: one day. Longer would keep addresses a name no longer has.
    pub const MAX_MIN_TTL: u32 = 86_400;
    /// Largest `grace`: one hour.
    pub const MAX_GRACE: u32 = 3_600;

    /// How long an address learned from an answer with `ttl` seconds stays in the
    /// kernel's maps: `max(ttl, min_ttl) + grace`.
    pub fn lifetime(&self, ttl: u32) -> Duration {
        Duration::from_secs(u64::from(ttl.max(self.min_ttl)) + u64::from(self.grace))
    }
}

/// Checks a `dns:` section: at least one upstream (duplicates dropped), `min_ttl` and
/// `grace` within their limits.
pub(super) fn compile_dns(raw: &RawDns, at: &FieldPath) -> Result<DnsConfig, CompileError> {
    if raw.upstream.is_empty() {
        return Err(CompileError::new(
            at.key("upstream"),
            "a `dns` section needs at least one upstream resolver (valid: addresses like \
             [192.0.2.53, \"2001:db8::53\"], port 53 unless written like \"192.0.2.53:5353\"; \
             or remove `dns` to use the daemon's settings)",
        ));
    }
    let mut upstream: Vec<SocketAddr> = Vec::with_capacity(raw.upstream.len());
    for server in &raw.upstream {
        if !upstream.contains(&server.0) {
            upstream.push(server.0);
        }
    }
    let seconds = |value: Option<RawSeconds>,
                   key: &'static str,
                   default: u32,
                   max: u32,
                   what: &str|
     -> Result<u32, CompileError> {
        let Some(RawSeconds(secs)) = value else {
            return Ok(default);
        };
        u32::try_from(secs)
            .ok()
            .filter(|s| *s <= max)
            .ok_or_else(|| {
                CompileError::new(
                    at.key(key),
                    format!(
                        "{key} {secs} is more than {max} seconds ({what}) (valid: 0-{max} \
                         seconds; {default} when omitted)"
                    ),
                )
            })
    };
    Ok(DnsConfig {
        upstream,
        min_ttl: seconds(
            raw.min_ttl,
            "min_ttl",
            DnsConfig::DEFAULT_MIN_TTL,
            DnsConfig::MAX_MIN_TTL,
            "one day",
        )?,
        grace: seconds(
            raw.grace,
            "grace",
            DnsConfig::DEFAULT_GRACE,
            DnsConfig::MAX_GRACE,
            "one hour",
        )?,
    })
}

#[cfg(test)]
#[expect(clippy::unwrap_used, reason = "tests fail loudly")]
mod tests {
    use super::*;
    use crate::policy::parse_str;

    fn dns_of(section: &str) -> Result<Option<DnsConfig>, String> {
        let src = format!(
            "version: 1\n{section}rules:\n  - {{name: a, to: [a.example], action: allow}}\n"
        );
        parse_str(&src, "d.yaml")
            .map(|p| p.dns().cloned())
            .map_err(|e| e.to_string())
    }

    #[test]
    fn sections() {
        assert_eq!(dns_of(""), Ok(None));
        // An empty key (everything under it commented out) is no section.
        assert_eq!(dns_of("dns:\n#  upstream: [192.0.2.53]\n"), Ok(None));
        let dns = dns_of("dns:\n  upstream: [192.0.2.53]\n").unwrap().unwrap();
        assert_eq!(
            dns,
            DnsConfig {
                upstream: vec!["192.0.2.53:53".parse().unwrap()],
                min_ttl: 5,
                grace: 30,
            }
        );
        assert_eq!(dns.lifetime(0), Duration::from_secs(35));
        assert_eq!(dns.lifetime(300), Duration::from_secs(330));
        assert_eq!(dns.lifetime(u32::MAX), Duration::from_secs(4_294_967_325));
        let dns = dns_of(
            "dns:
  upstream: [192.0.2.53, \"2001:db8::53\", \"192.0.2.54:5353\", \"[2001:db8::54]:5353\", 192.0.2.53:53]
  min_ttl: 0
  grace: 3600
",
        )
        .unwrap()
        .unwrap();
        let upstream: Vec<String> = dns.upstream.iter().map(ToString::to_string).collect();
        assert_eq!(
            upstream,
            [
                "192.0.2.53:53",
                "[2001:db8::53]:53",
                "192.0.2.54:5353",
                "[2001:db8::54]:5353"
            ]
        );
        assert_eq!((dns.min_ttl, dns.grace), (0, 3600));
        assert_eq!(dns.lifetime(0), Duration::from_secs(3600));
        let dns = dns_of("dns: {upstream: [192.0.2.53], min_ttl: 86400, grace: 0}\n")
            .unwrap()
            .unwrap();
        assert_eq!((dns.min_ttl, dns.grace), (86_400, 0));
    }

    #[test]
    fn errors_name_file_line_column_and_field() {
        let cases: &[(&str, &str)] = &[
            (
                "dns:\n  upstream: []\n",
                "d.yaml:3:13: dns.upstream: a `dns` section needs at least one upstream resolver \
                 (valid: addresses like [192.0.2.53, \"2001:db8::53\"], port 53 unless written \
                 like \"192.0.2.53:5353\"; or remove `dns` to use the daemon's settings)",
            ),
            (
                "dns:\n  min_ttl: 5\n",
                "d.yaml:3:3: dns: missing field `upstream`",
            ),
            (
                "dns:\n  upstream: 192.0.2.53\n",
                "d.yaml:3:13: dns.upstream: invalid type: string \"192.0.2.53\", expected a \
                 sequence",
            ),
            (
                "dns:\n  upstream: [192.0.2.53, dns.example]\n",
                "d.yaml:3:26: dns.upstream[1]: invalid resolver \"dns.example\": is a name; \
                 resolvers are given by address, since finding them by name would need a \
                 resolver (valid: a resolver's IP address like 192.0.2.53 or \"2001:db8::53\" \
                 (port 53), or with a port like \"192.0.2.53:5353\" or \"[2001:db8::53]:5353\")",
            ),
            (
                "dns:\n  upstream: [\"192.0.2.53:0\"]\n",
                "d.yaml:3:14: dns.upstream[0]: invalid resolver \"192.0.2.53:0\": port 0 is not a \
                 port a resolver listens on (valid: a resolver's IP address like 192.0.2.53 or \
                 \"2001:db8::53\" (port 53), or with a port like \"192.0.2.53:5353\" or \
                 \"[2001:db8::53]:5353\")",
            ),
            (
                "dns:\n  upstream: [192.0.2.53]\n  min_ttl: 86401\n",
                "d.yaml:4:12: dns.min_ttl: min_ttl 86401 is more than 86400 seconds (one day) \
                 (valid: 0-86400 seconds; 5 when omitted)",
            ),
            (
                "dns:\n  upstream: [192.0.2.53]\n  min_ttl: 99999999999\n",
                "d.yaml:4:12: dns.min_ttl: min_ttl 99999999999 is more than 86400 seconds (one \
                 day) (valid: 0-86400 seconds; 5 when omitted)",
            ),
            (
                "dns:\n  upstream: [192.0.2.53]\n  grace: 3601\n",
                "d.yaml:4:10: dns.grace: grace 3601 is more than 3600 seconds (one hour) (valid: \
                 0-3600 seconds; 30 when omitted)",
            ),
            (
                "dns:\n  upstream: [192.0.2.53]\n  grace: -1\n",
                "d.yaml:4:10: dns.grace: invalid duration -1: seconds are not negative (valid: a \
                 whole number of seconds, like 30)",
            ),
            (
                "dns:\n  upstream: [192.0.2.53]\n  min_ttl: 5s\n",
                "d.yaml:4:12: dns.min_ttl: invalid duration \"5s\": is not a number; units are \
                 not written, the number is seconds (valid: a whole number of seconds, like 30)",
            ),
            (
                "dns:\n  upstream: [192.0.2.53]\n  min_ttl: 1.5\n",
                "d.yaml:4:12: dns.min_ttl: invalid type: floating point `1.5`, expected a whole \
                 number of seconds",
            ),
            (
                "dns:\n  upstream: [192.0.2.53]\n  ttl: 5\n",
                "d.yaml:4:3: dns.ttl: unknown field `ttl`, expected one of `upstream`, \
                 `min_ttl`, `grace`",
            ),
        ];
        let wrong: Vec<String> = cases
            .iter()
            .filter_map(|(section, want)| {
                let got = dns_of(section).map_or_else(|e| e, |_| "(no error)".to_owned());
                (&got != want).then(|| format!("{section:?}\n got: {got}\nwant: {want}"))
            })
            .collect();
        assert!(wrong.is_empty(), "{}", wrong.join("\n"));
    }
}
