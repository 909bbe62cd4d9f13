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
//! The section also bounds DNS as a data channel: only A and AAAA questions are
//! answered unless `query_types` lists more, and `budget` caps the queries a sandbox
//! sends upstream ([`DnsBudget`]). Without a `dns:` section, the defaults apply.
//!
//! [`Policy::learned_entries`]: super::Policy::learned_entries
use std::{net::SocketAddr, str::FromStr as _, time::Duration};

use hickory_proto::rr::RecordType;

use super::{
    error::{CompileError, FieldPath},
    raw::{RawDns, RawDnsBudget, RawSeconds},
};

/// Query types a policy can never allow: zone transfers and `ANY` return whole sets of
/// records at once, the others are not questions.
const NEVER_TYPES: [&str; 9] = [
    "ANY", "*", "AXFR", "IXFR", "OPT", "TSIG", "TKEY", "MAILA", "MAILB",
];

/// `dns.budget`: how much a sandbox may ask upstream.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct DnsBudget {
    /// Token bucket rate: queries per second sent upstream on average.
    pub queries_per_second: u32,
    /// Token bucket size: queries that may go at once after a quiet spell.
    pub burst: u32,
    /// Distinct names under one allowed wildcard per minute.
    pub names_per_suffix_per_minute: u32,
}

impl DnsBudget {
    /// Far above what package managers need (a `pip install` of 50 packages or an
    /// `npm install` asks a few names, each a handful of times), far below what a
    /// tunnel wants.
    pub const DEFAULT: Self = Self {
        queries_per_second: 50,
        burst: 200,
        names_per_suffix_per_minute: 100,
    };
    /// Largest value of each key.
    pub const MAX: u32 = 100_000;
}

impl Default for DnsBudget {
    fn default() -> Self {
        Self::DEFAULT
    }
}

/// A checked `dns:` section.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct DnsConfig {
    /// The resolvers to ask, in file order, without duplicates; empty when the file has
    /// no `upstream` (the daemon's `dns_upstream` then). Port 53 unless the file gave
    /// another.
    pub upstream: Vec<SocketAddr>,
    /// Seconds a learned address lives at least, at most [`DnsConfig::MAX_MIN_TTL`].
    pub min_ttl: u32,
    /// Seconds added after the TTL, at most [`DnsConfig::MAX_GRACE`].
    pub grace: u32,
    /// Query types answered besides A and AAAA, in file order, without duplicates.
    pub query_types: Vec<RecordType>,
    pub budget: DnsBudget,
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

/// Checks a `dns:` section: at least one upstream when the key is given (duplicates
/// dropped), `min_ttl` and `grace` within their limits, query types that can be allowed,
/// budgets within theirs.
pub(super) fn compile_dns(raw: &RawDns, at: &FieldPath) -> Result<DnsConfig, CompileError> {
    if raw.upstream.as_ref().is_some_and(Vec::is_empty) {
        return Err(CompileError::new(
            at.key("upstream"),
            "a `dns` section needs at least one upstream resolver (valid: addresses like \
             [192.0.2.53, \"2001:db8::53\"], port 53 unless written like \"192.0.2.53:5353\"; \
             or remove `upstream` to use the daemon's `dns_upstream`)",
        ));
    }
    let mut upstream: Vec<SocketAddr> = Vec::new();
    for server in raw.upstream.iter().flatten() {
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
        query_types: compile_query_types(raw.query_types.as_deref().unwrap_or(&[]), at)?,
        budget: compile_budget(raw.budget.as_ref(), &at.key("budget"))?,
    })
}

/// `dns.query_types`: known type names (any letter case), never `ANY` or a transfer; A and
/// AAAA are always answered and dropped from the list.
fn compile_query_types(raw: &[String], at: &FieldPath) -> Result<Vec<RecordType>, CompileError> {
    const VALID: &str = "valid: record type names like HTTPS, SVCB, TXT, MX, SRV, CAA, PTR; \
                         A and AAAA are always answered";
    let mut types = Vec::new();
    for (i, text) in raw.iter().enumerate() {
        let upper = text.trim().to_ascii_uppercase();
        let field = at.key("query_types").index(i);
        if NEVER_TYPES.contains(&upper.as_str()) {
            return Err(CompileError::new(
                field,
                format!(
                    "query type {text:?} is never answered: zone transfers and ANY hand out \
                     whole sets of records ({VALID})"
                ),
            ));
        }
        let qtype = RecordType::from_str(&upper)
            .ok()
            .filter(|t| !matches!(t, RecordType::Unknown(_)) && upper != "NULL")
            .ok_or_else(|| {
                CompileError::new(field, format!("unknown query type {text:?} ({VALID})"))
            })?;
        if !matches!(qtype, RecordType::A | RecordType::AAAA) && !types.contains(&qtype) {
            types.push(qtype);
        }
    }
    Ok(types)
}

/// `dns.budget`: every key from 1 to [`DnsBudget::MAX`], defaults for those omitted.
fn compile_budget(raw: Option<&RawDnsBudget>, at: &FieldPath) -> Result<DnsBudget, CompileError> {
    let d = DnsBudget::DEFAULT;
    let Some(raw) = raw else {
        return Ok(d);
    };
    let value = |v: Option<u64>, key: &'static str, default: u32| match v {
        None => Ok(default),
        Some(n) => u32::try_from(n)
            .ok()
            .filter(|n| (1..=DnsBudget::MAX).contains(n))
            .ok_or_else(|| {
                CompileError::new(
                    at.key(key),
                    format!(
                        "{key} {n} is out of range (valid: 1-{}; {default} when omitted)",
                        DnsBudget::MAX
                    ),
                )
            }),
    };
    Ok(DnsBudget {
        queries_per_second: value(
            raw.queries_per_second,
            "queries_per_second",
            d.queries_per_second,
        )?,
        burst: value(raw.burst, "burst", d.burst)?,
        names_per_suffix_per_minute: value(
            raw.names_per_suffix_per_minute,
            "names_per_suffix_per_minute",
            d.names_per_suffix_per_minute,
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
                query_types: Vec::new(),
                budget: DnsBudget::DEFAULT,
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
        // Without `upstream`: the daemon's resolvers; types and budget as written.
        let dns = dns_of(
            "dns:\n  query_types: [https, SVCB, TXT, A, txt]\n  budget: {queries_per_second: 5, \
             names_per_suffix_per_minute: 7}\n",
        )
        .unwrap()
        .unwrap();
        assert!(dns.upstream.is_empty());
        assert_eq!(
            dns.query_types,
            [RecordType::HTTPS, RecordType::SVCB, RecordType::TXT]
        );
        assert_eq!(
            dns.budget,
            DnsBudget {
                queries_per_second: 5,
                burst: 200,
                names_per_suffix_per_minute: 7
            }
        );
    }

    #[test]
    fn errors_name_file_line_column_and_field() {
        let cases: &[(&str, &str)] = &[
            (
                "dns:\n  upstream: []\n",
                "d.yaml:3:13: dns.upstream: a `dns` section needs at least one upstream resolver \
                 (valid: addresses like [192.0.2.53, \"2001:db8::53\"], port 53 unless written \
                 like \"192.0.2.53:5353\"; or remove `upstream` to use the daemon's \
                 `dns_upstream`)",
            ),
            (
                "dns:\n  query_types: [TXT, any]\n",
                "d.yaml:3:22: dns.query_types[1]: query type \"any\" is never answered: zone \
                 transfers and ANY hand out whole sets of records (valid: record type names like \
                 HTTPS, SVCB, TXT, MX, SRV, CAA, PTR; A and AAAA are always answered)",
            ),
            (
                "dns:\n  query_types: [AXFR]\n",
                "d.yaml:3:17: dns.query_types[0]: query type \"AXFR\" is never answered: zone \
                 transfers and ANY hand out whole sets of records (valid: record type names like \
                 HTTPS, SVCB, TXT, MX, SRV, CAA, PTR; A and AAAA are always answered)",
            ),
            (
                "dns:\n  query_types: [BOGUS]\n",
                "d.yaml:3:17: dns.query_types[0]: unknown query type \"BOGUS\" (valid: record \
                 type names like HTTPS, SVCB, TXT, MX, SRV, CAA, PTR; A and AAAA are always \
                 answered)",
            ),
            (
                "dns:\n  budget: {queries_per_second: 0}\n",
                "d.yaml:3:32: dns.budget.queries_per_second: queries_per_second 0 is out of \
                 range (valid: 1-100000; 50 when omitted)",
            ),
            (
                "dns:\n  budget: {names_per_minute: 5}\n",
                "d.yaml:3:12: dns.budget.names_per_minute: unknown field `names_per_minute`, \
                 expected one of `queries_per_second`, `burst`, `names_per_suffix_per_minute`",
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
                 `min_ttl`, `grace`, `query_types`, `budget`",
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

    #[test]
    fn answers_pin_what_names_resolve_to() {
        let policy = parse_str(
            "version: 1
rules:
  - {name: pinned, to: [api.example.com], answers: [192.0.2.0/24, \"2001:db8::/32\"], action: allow}
  - {name: free, to: [\"**.example.com\"], action: allow}
  - {name: static, to: [10.0.0.0/8], action: allow}
",
            "a.yaml",
        )
        .unwrap();
        let ip = |s: &str| s.parse::<std::net::IpAddr>().unwrap();
        let ids = policy.rules_for_name("api.example.com");
        assert_eq!(ids, [1, 2]);
        assert_eq!(policy.answer_refusal(&ids, ip("192.0.2.7")), None);
        assert_eq!(policy.answer_refusal(&ids, ip("2001:db8::7")), None);
        assert_eq!(
            policy.answer_refusal(&ids, ip("198.51.100.7")).as_deref(),
            Some("the address is outside the `answers` of rule `pinned`")
        );
        // IPv4-mapped answers are judged as IPv4.
        assert_eq!(policy.answer_refusal(&ids, ip("::ffff:192.0.2.7")), None);
        // A name only the unpinned rule matches may resolve anywhere.
        let other = policy.rules_for_name("www.example.com");
        assert_eq!(policy.answer_refusal(&other, ip("198.51.100.7")), None);
        assert_eq!(
            policy.wildcards_for_name(&ids, "api.example.com"),
            ["**.example.com"]
        );
        assert!(policy
            .wildcards_for_name(&[1], "api.example.com")
            .is_empty());

        let err = |rule: &str| {
            parse_str(&format!("version: 1\nrules:\n  - {rule}\n"), "e.yaml")
                .map(|_| ())
                .unwrap_err()
                .to_string()
        };
        assert_eq!(
            err("{name: a, to: [192.0.2.1], answers: [192.0.2.0/24], action: allow}"),
            "e.yaml:3:41: rules[0].answers: `answers` pins what the rule's host names resolve \
             to, and this rule's `to` has none (valid: host names in `to`, or remove `answers`)"
        );
        assert_eq!(
            err("{name: a, to: [a.example], answers: [], action: allow}"),
            "e.yaml:3:41: rules[0].answers: an empty `answers` list lets the names resolve to \
             nothing (valid: addresses and CIDRs like [192.0.2.0/24, \"2001:db8::/32\"], or \
             remove `answers`)"
        );
        assert_eq!(
            err("{name: a, to: [a.example], answers: [b.example], action: allow}"),
            "e.yaml:3:42: rules[0].answers[0]: `answers` lists addresses and CIDRs, not names \
             (valid: like 192.0.2.0/24 or \"2001:db8::/32\")"
        );
        assert!(
            err("{name: a, to: [a.example], answers: [192.0.2.1/24], action: allow}")
                .starts_with("e.yaml:3:42: rules[0].answers[0]: ")
        );
    }

    #[test]
    fn query_types_and_budget_default_without_a_section() {
        use hickory_proto::rr::RecordType;
        let policy = parse_str(
            "version: 1\nrules:\n  - {name: a, to: [a.example], action: allow}\n",
            "q.yaml",
        )
        .unwrap();
        assert!(policy.query_type_allowed(RecordType::A));
        assert!(policy.query_type_allowed(RecordType::AAAA));
        for t in [
            RecordType::TXT,
            RecordType::HTTPS,
            RecordType::ANY,
            RecordType::AXFR,
            RecordType::IXFR,
            RecordType::CNAME,
        ] {
            assert!(!policy.query_type_allowed(t), "{t}");
        }
        assert_eq!(policy.dns_budget(), DnsBudget::DEFAULT);
        let policy = parse_str(
            "version: 1\ndns: {query_types: [HTTPS, txt]}\nrules:\n  - {name: a, to: [a.example], action: allow}\n",
            "q.yaml",
        )
        .unwrap();
        assert!(policy.query_type_allowed(RecordType::HTTPS));
        assert!(policy.query_type_allowed(RecordType::TXT));
        assert!(!policy.query_type_allowed(RecordType::MX));
    }
}
