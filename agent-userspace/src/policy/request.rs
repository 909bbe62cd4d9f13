//! The decision for one HTTPS request through the proxy, as a pure function of the
//! policy: which proxy or passthrough rule serves the host, whether that rule's `http:`
//! list lets the request through, and which credential would be injected.
//!
//! The proxy itself starts from the rule the kernel redirected the connection by
//! ([`Policy::proxy_rule`]) and calls [`Rule::allows_host`] and [`Rule::check_request`];
//! [`Policy::decide_request`] is the same check from a URL alone, for policy tests.
use std::{fmt, net::Ipv6Addr};

use super::{
    compile::{rule_id, Action, Policy, Protocol, Rule},
    http::{
        batch_segment, is_token, names_targets_in_body, normalize_target, path_only,
        target_for_reason,
    },
    Verdict,
};

/// The outcome for one request.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct RequestDecision {
    /// `Allow` or `Deny`.
    pub verdict: Verdict,
    /// 1-based id of the proxy or passthrough rule that served the host; 0 when none did.
    pub rule_id: u16,
    /// The credential that would be injected (only for an allowed request through a proxy
    /// rule that names one). A name, never a secret.
    pub credential: Option<String>,
    /// Why, in a few words (never including the query string, which may carry secrets).
    pub reason: String,
}

/// A checked `https://` URL, split as the proxy sees a request: the host from the TLS
/// server name and `Host`, the port from the original destination, the request target.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct HttpsUrl {
    /// Lower case; an IPv6 literal without brackets.
    pub host: String,
    pub port: u16,
    /// Starts with `/`.
    pub path_and_query: String,
}

impl HttpsUrl {
    /// Parses `https://host[:port][/path][?query]`. No user info, no fragment, and the host
    /// is a DNS name or an IP literal.
    pub fn parse(url: &str) -> Result<Self, String> {
        let Some((scheme, rest)) = url.split_once("://") else {
            return Err(format!("URL {url:?} has no scheme; only https:// URLs"));
        };
        if !scheme.eq_ignore_ascii_case("https") {
            return Err(format!(
                "URL {url:?} is not https; the proxy only sees HTTPS requests"
            ));
        }
        if rest.contains('#') {
            return Err(format!(
                "URL {url:?} has a fragment (`#`), which is never sent; remove it"
            ));
        }
        let split = rest.find(['/', '?']).unwrap_or(rest.len());
        let (authority, target) = rest.split_at(split);
        if authority.contains('@') {
            return Err(format!("URL {url:?} has user info (`@`); remove it"));
        }
        let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
            let Some((addr, after)) = v6.split_once(']') else {
                return Err(format!("URL {url:?} has an unclosed `[`"));
            };
            if addr.parse::<Ipv6Addr>().is_err() {
                return Err(format!("URL {url:?}: {addr:?} is not an IPv6 address"));
            }
            let port = match after {
                "" => None,
                p => Some(p.strip_prefix(':').ok_or_else(|| {
                    format!("URL {url:?} has {p:?} after the IPv6 address; expected :PORT")
                })?),
            };
            (addr.to_ascii_lowercase(), port)
        } else {
            let (host, port) = match authority.split_once(':') {
                Some((h, p)) => (h, Some(p)),
                None => (authority, None),
            };
            let host = host.to_ascii_lowercase();
            if !super::host::is_name_or_ipv4(&host) {
                return Err(format!(
                    "URL {url:?}: {host:?} is not a host name or IPv4 address"
                ));
            }
            (host, port)
        };
        let port = match port {
            None => 443,
            Some(p) => p
                .parse::<u16>()
                .ok()
                .filter(|p| *p != 0)
                .ok_or_else(|| format!("URL {url:?}: port {p:?} is not a number 1-65535"))?,
        };
        let path_and_query = if target.starts_with('/') {
            target.to_owned()
        } else {
            format!("/{target}")
        };
        Ok(Self {
            host,
            port,
            path_and_query,
        })
    }
}

/// Lists a rule's `http:` entries for a refusal reason.
struct Allowed<'a>(&'a [super::HttpRule]);

impl fmt::Display for Allowed<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, rule) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str("; ")?;
            }
            write!(f, "{rule}")?;
        }
        Ok(())
    }
}

impl Rule {
    /// Whether a request with `method` and request target `path_and_query` may go through
    /// this rule, judged in its normal form ([`normalize_target`]). `Err` holds a short
    /// plain-text reason. Ambiguous paths (`//`, `.` or `..` segments, also
    /// percent-encoded, encoded `/` or `\`, ...) are always refused; otherwise, without
    /// `http:` every request is allowed, with it only those an entry lists. The query
    /// string is ignored and never appears in the reason.
    pub fn check_request(&self, method: &str, path_and_query: &str) -> Result<(), String> {
        if !is_token(method) {
            return Err(format!(
                "invalid method {:?} refused by rule {}",
                method.chars().take(32).collect::<String>(),
                self.name
            ));
        }
        let target = normalize_target(path_and_query).map_err(|why| {
            format!(
                "{method} {} refused by rule {}: {why}",
                target_for_reason(path_and_query),
                self.name
            )
        })?;
        let path = path_only(&target);
        let by_name_only = || {
            if names_targets_in_body(method) {
                format!(
                    "; {method} names its targets in its body, which the proxy does not \
                     judge: only an `http:` entry listing {method} by name allows it"
                )
            } else if let Some(segment) = batch_segment(method, path) {
                format!(
                    "; `{segment}` requests carry other requests in their body (or name a \
                     second target), which the proxy does not judge: only an `http:` path \
                     naming `{segment}` itself allows it"
                )
            } else {
                String::new()
            }
        };
        match &self.http {
            None if names_targets_in_body(method) => Err(format!(
                "{method} {path} not allowed by rule {} (it has no `http:` list){}",
                self.name,
                by_name_only()
            )),
            None => Ok(()),
            Some(http) if http.iter().any(|r| r.allows(method, path)) => Ok(()),
            Some(http) => Err(format!(
                "{method} {path} not allowed by rule {} (allowed: {}){}",
                self.name,
                Allowed(http),
                by_name_only()
            )),
        }
    }
}

impl Policy {
    /// Decides an HTTPS request as the proxy would, from the URL alone: the first proxy or
    /// passthrough rule (in file order) whose `hosts` match the URL's host and whose
    /// ports include its port (443 when omitted) serves it; then its
    /// [`Rule::check_request`] decides. A passthrough rule relays TLS unchanged, so it
    /// allows any request and injects nothing. A request no rule serves, or that is not
    /// a valid `https://` URL, is denied with rule id 0.
    ///
    /// The connection-level decision (which rule the kernel redirects an address to) is
    /// [`Policy::decide`]; this one does not look at addresses.
    pub fn decide_request(&self, method: &str, url: &str) -> RequestDecision {
        let deny = |rule_id, reason| RequestDecision {
            verdict: Verdict::Deny,
            rule_id,
            credential: None,
            reason,
        };
        let url = match HttpsUrl::parse(url) {
            Ok(url) => url,
            Err(why) => return deny(0, why),
        };
        let served = self.rules.iter().enumerate().find(|(_, rule)| {
            (rule.is_proxy() || rule.is_passthrough())
                && rule.matches_port(url.port, Protocol::Tcp)
                && rule.allows_host(&url.host)
        });
        let Some((index, rule)) = served else {
            return deny(
                0,
                format!(
                    "no proxy or passthrough rule serves {} port {}",
                    url.host, url.port
                ),
            );
        };
        let id = rule_id(index);
        if let Some(denied_by) = self.name_denied_by(&url.host) {
            let name = self.rule_name(denied_by).unwrap_or("?");
            return deny(
                denied_by,
                format!(
                    "{} is denied by rule {name}, which no proxy or passthrough rule serves",
                    url.host
                ),
            );
        }
        if rule.action == Action::Passthrough {
            return RequestDecision {
                verdict: Verdict::Allow,
                rule_id: id,
                credential: None,
                reason: format!(
                    "rule {} passes TLS through unchanged; requests are not inspected",
                    rule.name
                ),
            };
        }
        match rule.check_request(method, &url.path_and_query) {
            Ok(()) => RequestDecision {
                verdict: Verdict::Allow,
                rule_id: id,
                credential: rule.credential.clone(),
                reason: format!("allowed by rule {}", rule.name),
            },
            Err(why) => deny(id, why),
        }
    }
}

#[cfg(test)]
#[expect(clippy::unwrap_used, reason = "tests fail loudly")]
mod tests {
    use super::*;
    use crate::policy::{http::BODY_TARGET_METHODS, parse_str};

    #[test]
    fn urls() {
        let ok = |url: &str| {
            let u = HttpsUrl::parse(url).unwrap();
            (u.host, u.port, u.path_and_query)
        };
        let t = |h: &str, p: u16, q: &str| (h.to_owned(), p, q.to_owned());
        assert_eq!(ok("https://api.github.com"), t("api.github.com", 443, "/"));
        assert_eq!(ok("HTTPS://API.GitHub.com/"), t("api.github.com", 443, "/"));
        assert_eq!(
            ok("https://api.github.com.:8443/a/b?c=d/e"),
            t("api.github.com.", 8443, "/a/b?c=d/e")
        );
        assert_eq!(ok("https://x.example?q"), t("x.example", 443, "/?q"));
        assert_eq!(ok("https://192.0.2.1/"), t("192.0.2.1", 443, "/"));
        assert_eq!(ok("https://[2001:DB8::1]:444/"), t("2001:db8::1", 444, "/"));
        for (url, why) in [
            ("api.github.com/x", "has no scheme"),
            ("http://api.github.com/", "is not https"),
            ("https://api.github.com/#x", "has a fragment"),
            ("https://user:pw@api.github.com/", "has user info"),
            ("https://api.github.com:0/", "is not a number 1-65535"),
            ("https://api.github.com:65536/", "is not a number 1-65535"),
            ("https://api.github.com:/", "is not a number 1-65535"),
            ("https:///x", "is not a host name"),
            ("https://a..b/", "is not a host name"),
            ("https://a_b.example/", "is not a host name"),
            ("https://*.example/", "is not a host name"),
            ("https://[2001:db8::1/", "unclosed `[`"),
            ("https://[example]/", "is not an IPv6 address"),
            ("https://[::1]x/", "expected :PORT"),
        ] {
            let err = HttpsUrl::parse(url).unwrap_err();
            assert!(err.contains(why), "{url}: {err}");
        }
    }

    const POLICY: &str = "version: 1
rules:
  - name: gh
    to: [192.0.2.10]
    ports: [443]
    action: proxy
    hosts: [api.github.com, \"*.githubusercontent.com\"]
    credential: github
    http:
      - methods: [GET, HEAD]
        paths: [\"/repos/acme/widgets/**\"]
      - methods: [POST]
        paths: [/repos/acme/widgets/issues]
  - name: open
    to: [192.0.2.11]
    action: proxy
    hosts: [\"**.example.com\"]
  - name: pinned
    to: [192.0.2.20]
    ports: [443]
    action: passthrough
    hosts: [pinned.example]
  - name: plain
    to: [192.0.2.0/24]
    action: allow
  - name: no-uploads
    to: [uploads.example.com]
    action: deny
";

    #[test]
    fn decide_request_cases() {
        let policy = parse_str(POLICY, "r.yaml").unwrap();
        // (method, url, verdict, rule id, credential, reason)
        type Case = (
            &'static str,
            &'static str,
            Verdict,
            u16,
            Option<&'static str>,
            &'static str,
        );
        let cases: &[Case] = &[
            (
                "GET",
                "https://api.github.com/repos/acme/widgets/pulls?state=open",
                Verdict::Allow,
                1,
                Some("github"),
                "allowed by rule gh",
            ),
            (
                "HEAD",
                "https://API.GITHUB.COM./repos/acme/widgets",
                Verdict::Allow,
                1,
                Some("github"),
                "allowed by rule gh",
            ),
            (
                "POST",
                "https://api.github.com/repos/acme/widgets/issues",
                Verdict::Allow,
                1,
                Some("github"),
                "allowed by rule gh",
            ),
            (
                "POST",
                "https://api.github.com/repos/x?token=secret",
                Verdict::Deny,
                1,
                None,
                "POST /repos/x not allowed by rule gh (allowed: GET,HEAD \
                 /repos/acme/widgets/**; POST /repos/acme/widgets/issues)",
            ),
            (
                "DELETE",
                "https://api.github.com/repos/acme/widgets",
                Verdict::Deny,
                1,
                None,
                "DELETE /repos/acme/widgets not allowed by rule gh (allowed: GET,HEAD \
                 /repos/acme/widgets/**; POST /repos/acme/widgets/issues)",
            ),
            (
                "GET",
                "https://api.github.com/repos/acme/widgets/../secrets",
                Verdict::Deny,
                1,
                None,
                "GET /repos/acme/widgets/../secrets refused by rule gh: ambiguous path: \
                 contains a `..` segment",
            ),
            (
                "GET",
                "https://raw.githubusercontent.com/repos/acme/widgets/x",
                Verdict::Allow,
                1,
                Some("github"),
                "allowed by rule gh",
            ),
            (
                "GET",
                "https://a.raw.githubusercontent.com/repos/acme/widgets/x",
                Verdict::Deny,
                0,
                None,
                "no proxy or passthrough rule serves a.raw.githubusercontent.com port 443",
            ),
            (
                "GET",
                "https://api.github.com:8443/repos/acme/widgets",
                Verdict::Deny,
                0,
                None,
                "no proxy or passthrough rule serves api.github.com port 8443",
            ),
            (
                "GET",
                "https://github.com/",
                Verdict::Deny,
                0,
                None,
                "no proxy or passthrough rule serves github.com port 443",
            ),
            (
                "DELETE",
                "https://a.b.example.com:9999/anything",
                Verdict::Allow,
                2,
                None,
                "allowed by rule open",
            ),
            (
                "GET",
                "https://x.example.com//etc",
                Verdict::Deny,
                2,
                None,
                "GET //etc refused by rule open: ambiguous path: contains `//`",
            ),
            (
                "get",
                "https://x.example.com/",
                Verdict::Allow,
                2,
                None,
                "allowed by rule open",
            ),
            (
                "GET",
                "https://UPLOADS.example.com./x",
                Verdict::Deny,
                5,
                None,
                "uploads.example.com. is denied by rule no-uploads, which no proxy or \
                 passthrough rule serves",
            ),
            (
                "GET /",
                "https://x.example.com/",
                Verdict::Deny,
                2,
                None,
                "invalid method \"GET /\" refused by rule open",
            ),
            (
                "GET",
                "https://pinned.example/a/../b",
                Verdict::Allow,
                3,
                None,
                "rule pinned passes TLS through unchanged; requests are not inspected",
            ),
            (
                "GET",
                "https://192.0.2.1/",
                Verdict::Deny,
                0,
                None,
                "no proxy or passthrough rule serves 192.0.2.1 port 443",
            ),
            (
                "GET",
                "http://api.github.com/",
                Verdict::Deny,
                0,
                None,
                "URL \"http://api.github.com/\" is not https; the proxy only sees HTTPS \
                 requests",
            ),
        ];
        for &(method, url, verdict, rule_id, credential, reason) in cases {
            assert_eq!(
                policy.decide_request(method, url),
                RequestDecision {
                    verdict,
                    rule_id,
                    credential: credential.map(str::to_owned),
                    reason: reason.to_owned(),
                },
                "{method} {url}"
            );
        }
    }

    #[test]
    fn rule_accessors() {
        let policy = parse_str(POLICY, "r.yaml").unwrap();
        let gh = policy.proxy_rule(1).unwrap();
        assert!(gh.is_proxy() && !gh.is_passthrough());
        assert_eq!(gh.credential(), Some("github"));
        let hosts: Vec<String> = gh.hosts().iter().map(|h| h.to_string()).collect();
        assert_eq!(hosts, ["api.github.com", "*.githubusercontent.com"]);
        assert!(gh.allows_host("Api.GitHub.com."));
        assert!(!gh.allows_host("githubusercontent.com"));
        assert_eq!(gh.http().map(<[_]>::len), Some(2));
        assert_eq!(gh.protocol(), Protocol::Tcp);
        assert_eq!(gh.check_request("GET", "/repos/acme/widgets?x"), Ok(()));
        let open = policy.proxy_rule(2).unwrap();
        assert_eq!(open.http(), None);
        assert_eq!(open.credential(), None);
        assert_eq!(open.check_request("PUT", "/x?y"), Ok(()));
        assert!(open.check_request("PUT", "/x/./y").is_err());
        let pinned = policy.proxy_rule(3).unwrap();
        assert!(pinned.is_passthrough() && !pinned.is_proxy());
        assert_eq!(pinned.credential(), None);
        assert!(pinned.allows_host("pinned.example"));
        assert!(!pinned.allows_host("x.pinned.example"));
        assert!(policy.proxy_rule(4).is_none());
        assert!(policy.proxy_rule(0).is_none());
        assert!(policy.proxy_rule(5).is_none());
        let plain = policy.rule(4).unwrap();
        assert!(plain.hosts().is_empty() && !plain.allows_host("pinned.example"));
        assert_eq!(policy.credential_names(), ["github"]);
    }

    /// Methods whose body names their targets pass only an entry that lists them by
    /// name, on a path it allows: not `*`, not a rule without `http:`.
    #[test]
    fn methods_naming_targets_in_the_body_need_an_entry_naming_them() {
        let policy = parse_str(
            r#"version: 1
default: deny
rules:
  - name: any
    to: [192.0.2.1]
    ports: [443]
    action: proxy
    hosts: [dav.example]
    http:
      - methods: ["*"]
        paths: ["/mine/**"]
  - name: open
    to: [192.0.2.2]
    ports: [443]
    action: proxy
    hosts: [open.example]
  - name: named
    to: [192.0.2.3]
    ports: [443]
    action: proxy
    hosts: [cal.example]
    http:
      - methods: [REPORT, SEARCH]
        paths: ["/cal/**"]
"#,
            "m.yaml",
        )
        .unwrap();
        let (any, open, named) = (
            policy.proxy_rule(1).unwrap(),
            policy.proxy_rule(2).unwrap(),
            policy.proxy_rule(3).unwrap(),
        );
        for rule in [any, open] {
            assert_eq!(rule.check_request("PROPFIND", "/mine/x"), Ok(()));
            // In any case: origins that upper-case the method run `report` as REPORT.
            let cases = BODY_TARGET_METHODS.iter().flat_map(|m| {
                let mixed: String = m
                    .chars()
                    .enumerate()
                    .map(|(i, c)| {
                        if i % 2 == 0 {
                            c.to_ascii_lowercase()
                        } else {
                            c
                        }
                    })
                    .collect();
                [m.to_string(), m.to_ascii_lowercase(), mixed]
            });
            for method in cases {
                let refused = rule.check_request(&method, "/mine/x").unwrap_err();
                assert!(
                    refused.contains("names its targets in its body"),
                    "{method}: {refused}"
                );
            }
        }
        assert_eq!(named.check_request("REPORT", "/cal/x"), Ok(()));
        assert_eq!(named.check_request("SEARCH", "/cal/"), Ok(()));
        assert!(named.check_request("REPORT", "/other").is_err());
        assert!(named.check_request("BIND", "/cal/x").is_err());
        assert!(named.check_request("report", "/cal/x").is_err());
    }

    /// A batch endpoint (its body carries whole requests) is allowed only where an
    /// `http:` path names its segment itself; GET and HEAD, and paths without one, are
    /// judged as before.
    #[test]
    fn batch_endpoints_need_their_segment_named() {
        let policy = parse_str(
            r#"version: 1
rules:
  - name: broad
    to: [192.0.2.1]
    ports: [443]
    action: proxy
    hosts: [a.example]
    http:
      - methods: [GET, POST]
        paths: ["/**"]
  - name: named
    to: [192.0.2.2]
    ports: [443]
    action: proxy
    hosts: [b.example]
    http:
      - methods: [POST]
        paths: ["/batch/storage/v1", "/v1.0/$batch", "/odata/**"]
"#,
            "b.yaml",
        )
        .unwrap();
        let (broad, named) = (policy.proxy_rule(1).unwrap(), policy.proxy_rule(2).unwrap());
        for path in [
            "/batch/storage/v1",
            "/v1.0/$batch",
            "/odata/Products/$batch",
            "/x/BATCH",
            // Google Cloud Storage copies: the second bucket is in the path, past `**`.
            "/storage/v1/b/mine/o/x/rewriteTo/b/theirs/o/y",
            "/storage/v1/b/mine/o/x/copyTo/b/theirs/o/y",
        ] {
            let refused = broad.check_request("POST", path).unwrap_err();
            assert!(
                refused.contains("carry other requests in their body"),
                "{path}: {refused}"
            );
        }
        assert_eq!(broad.check_request("GET", "/batch/storage/v1"), Ok(()));
        assert_eq!(broad.check_request("POST", "/batches/1"), Ok(()));
        assert_eq!(
            broad.check_request("POST", "/upload/storage/v1/b/x/o"),
            Ok(())
        );
        assert_eq!(named.check_request("POST", "/batch/storage/v1"), Ok(()));
        assert_eq!(named.check_request("POST", "/v1.0/$batch"), Ok(()));
        // A wildcard does not name it.
        assert!(named
            .check_request("POST", "/odata/Products/$batch")
            .is_err());
        // Elasticsearch's multi-target endpoints, whose body names other indices: GET
        // carries a body there too.
        for (method, path) in [
            ("GET", "/logs-agent/_mget"),
            ("POST", "/logs-agent/_msearch"),
            ("GET", "/logs-agent/_msearch/template"),
            ("POST", "/logs-agent/_bulk"),
            ("POST", "/logs-agent/_MTERMVECTORS"),
        ] {
            let refused = broad.check_request(method, path).unwrap_err();
            assert!(
                refused.contains("carry other requests in their body"),
                "{method} {path}: {refused}"
            );
        }
        assert_eq!(broad.check_request("GET", "/logs-agent/_search"), Ok(()));
        assert_eq!(broad.check_request("GET", "/logs-agent/_doc/1"), Ok(()));
    }
}
