//! Names in rules' `to`: which names the sandbox may resolve, and which rules the
//! addresses it learns that way get.
//!
//! A name rule never matches an address by itself ([`Policy::decide`] ignores names).
//! When the sandbox looks a name up, the daemon asks [`Policy::rules_for_name`]; an empty
//! answer means the resolver refuses the name. Otherwise each address in the answer is
//! written into the kernel as a /32 or /128 entry built by [`Policy::learned_entries`]
//! from those rules (and the static rules that already cover the address), until it
//! expires (see [`DnsConfig::lifetime`](super::DnsConfig::lifetime)).
//!
//! **The first matching name rule decides whether a name resolves.** If it is a `deny`
//! rule, the name does not resolve at all, whatever ports the rule lists; otherwise the
//! name resolves and its addresses get every non-deny rule whose names match, in policy
//! order. A `deny` name rule after an `allow` one for the same name therefore has no
//! effect: put exceptions (`deny: [bad.example.com]`) before the wildcard they carve out
//! of (`allow: ["**.example.com"]`). A `deny` name an earlier rule wholly takes is refused
//! when the policy is compiled.
use super::{
    compile::{rule_id, Action, DefaultAction, Policy, Protocol},
    Decision, Verdict,
};

impl Policy {
    /// The 1-based ids of the rules an address learned for `qname` gets, in policy order:
    /// the non-deny rules whose `to` names match `qname` (ASCII case and one trailing dot
    /// ignored). Empty when the name must not resolve: no name rule matches, or the first
    /// one that does (in policy order) is a `deny` rule.
    pub fn rules_for_name(&self, qname: &str) -> Vec<u16> {
        let mut matching = self
            .rules
            .iter()
            .enumerate()
            .filter(|(_, rule)| rule.matches_name(qname))
            .peekable();
        if matching
            .peek()
            .is_none_or(|(_, rule)| rule.action == Action::Deny)
        {
            return Vec::new();
        }
        matching
            .filter(|(_, rule)| rule.action != Action::Deny)
            .map(|(index, _)| rule_id(index))
            .collect()
    }

    /// Whether the resolver may answer for `qname`: [`Policy::rules_for_name`] is not
    /// empty.
    pub fn name_allowed(&self, qname: &str) -> bool {
        self.decide_name(qname).verdict == Verdict::Allow
    }

    /// Whether `qname` resolves, and which rule says so: `Allow` by the first rule whose
    /// names match; `Deny` by that rule if it is a `deny` rule, or with rule id 0 when no
    /// rule's names match. The policy `default` never makes a name resolve.
    pub fn decide_name(&self, qname: &str) -> Decision {
        match self
            .rules
            .iter()
            .enumerate()
            .find(|(_, rule)| rule.matches_name(qname))
        {
            Some((index, rule)) => Decision {
                verdict: if rule.action == Action::Deny {
                    Verdict::Deny
                } else {
                    Verdict::Allow
                },
                rule_id: rule_id(index),
            },
            None => Decision {
                verdict: Verdict::Deny,
                rule_id: 0,
            },
        }
    }

    /// The `deny` rule that keeps `host` from resolving, if one does: the first rule
    /// whose names match it is a `deny` rule. A proxy or passthrough rule does not serve
    /// such a name either (as TLS server name or `Host`), whatever its own `hosts` say,
    /// or a wildcard rule would serve it on an address it shares with an allowed name.
    pub fn name_denied_by(&self, host: &str) -> Option<u16> {
        let decision = self.decide_name(host);
        (decision.verdict == Verdict::Deny && decision.rule_id != 0).then_some(decision.rule_id)
    }

    /// Decides a connection to `qname:port` as if the name had resolved to an address no
    /// rule lists: the first of [`Policy::rules_for_name`] whose ports and protocol
    /// match decides, otherwise the default does (also when the name does not resolve:
    /// that is what the address would get if the client found it another way). Used by
    /// `connect: NAME:PORT` tests.
    pub fn decide_name_connect(&self, qname: &str, port: u16, protocol: Protocol) -> Decision {
        self.decide_by_rules(&self.rules_for_name(qname), port, protocol)
            .unwrap_or_else(|| self.default_decision())
    }

    /// The first of the rules `rule_ids` (taken in policy order; unknown ids ignored)
    /// whose ports and protocol match.
    pub(super) fn decide_by_rules(
        &self,
        rule_ids: &[u16],
        port: u16,
        protocol: Protocol,
    ) -> Option<Decision> {
        let mut ids = rule_ids.to_vec();
        ids.sort_unstable();
        ids.into_iter().find_map(|id| {
            let rule = self.rule(id)?;
            rule.matches_port(port, protocol).then(|| Decision {
                verdict: rule.action.verdict(),
                rule_id: id,
            })
        })
    }

    /// What the default gives a connection no rule decides.
    pub(super) fn default_decision(&self) -> Decision {
        Decision {
            verdict: match self.default {
                DefaultAction::Deny => Verdict::Deny,
                DefaultAction::Audit => Verdict::Audit,
            },
            rule_id: 0,
        }
    }
}

#[cfg(test)]
#[expect(clippy::unwrap_used, reason = "tests fail loudly")]
mod tests {
    use crate::policy::{parse_str, parse_untested, Decision, Policy, Protocol, Verdict};

    /// Its tests are not run: some policies here have failing ones on purpose.
    fn policy(src: &str) -> Policy {
        parse_untested(src, "n.yaml").unwrap()
    }

    #[test]
    fn names_against_patterns() {
        let p = policy(
            "version: 1
rules:
  - {name: exact, to: [API.GitHub.com.], ports: [443], protocol: tcp, action: allow}
  - {name: one, to: [\"*.example.com\"], action: allow}
  - {name: many, to: [\"**.example.org\"], action: allow}
  - {name: single-label, to: [localhost], action: allow}
",
        );
        // (query, the rules its addresses get)
        let cases: &[(&str, &[u16])] = &[
            // Exact names: case and one trailing dot are ignored, nothing else is.
            ("api.github.com", &[1]),
            ("API.GITHUB.COM", &[1]),
            ("api.github.com.", &[1]),
            ("api.github.com..", &[]),
            ("github.com", &[]),
            ("x.api.github.com", &[]),
            ("api.github.com.evil.example", &[]),
            ("evilapi.github.com", &[]),
            ("api-github.com", &[]),
            // `*.`: exactly one label in front.
            ("a.example.com", &[2]),
            ("A-1.Example.COM.", &[2]),
            ("example.com", &[]),
            ("example.com.", &[]),
            ("a.b.example.com", &[]),
            ("evilexample.com", &[]),
            ("a.evilexample.com", &[]),
            ("example.com.evil.example", &[]),
            ("a.example.com.evil.example", &[]),
            // `**.`: one or more labels in front.
            ("a.example.org", &[3]),
            ("x.y.z.example.org.", &[3]),
            ("example.org", &[]),
            ("evilexample.org", &[]),
            ("a.evilexample.org", &[]),
            ("example.org.evil.example", &[]),
            ("localhost", &[4]),
            ("localhost.", &[4]),
            // Not names at all.
            ("", &[]),
            (".", &[]),
            ("a..example.com", &[]),
            (".a.example.com", &[]),
            ("-a.example.com", &[]),
            ("a_b.example.com", &[]),
            ("*.example.com", &[]),
            ("a.example.com:443", &[]),
            ("192.0.2.1", &[]),
        ];
        let wrong: Vec<String> = cases
            .iter()
            .filter(|(q, want)| {
                p.rules_for_name(q) != *want || p.name_allowed(q) == want.is_empty()
            })
            .map(|(q, want)| format!("{q:?}: want {want:?}, got {:?}", p.rules_for_name(q)))
            .collect();
        assert!(wrong.is_empty(), "{}", wrong.join("\n"));
    }

    const ORDERED: &str = "version: 1
default: audit
rules:
  - {name: block-bad, to: [bad.example.com], ports: [22], action: deny}
  - {name: web, to: [\"**.example.com\"], ports: [443], protocol: tcp, action: allow}
  - {name: ssh, to: [git.example.com, 192.0.2.0/24], ports: [22], protocol: tcp, action: allow}
  - {name: late-deny, to: [\"**.example.net\"], action: deny}
  - {name: proxied, to: [\"*.example.com\"], ports: [8443], action: proxy}
  - {name: addresses, to: [198.51.100.0/24], action: deny}
";

    #[test]
    fn first_matching_name_rule_decides() {
        let p = policy(ORDERED);
        let d = |verdict, rule_id| Decision { verdict, rule_id };
        // (query, rules, decide_name)
        let cases: &[(&str, &[u16], Decision)] = &[
            // A deny rule first: the name does not resolve, whatever its ports.
            ("bad.example.com", &[], d(Verdict::Deny, 1)),
            ("BAD.example.com.", &[], d(Verdict::Deny, 1)),
            // A deny rule after an allowing one is left out (a deny every name of which an
            // earlier rule takes does not load: see `a_deny_an_earlier_rule_shadows_...`).
            ("git.example.com", &[2, 3, 5], d(Verdict::Allow, 2)),
            ("a.example.net", &[], d(Verdict::Deny, 4)),
            ("x.example.com", &[2, 5], d(Verdict::Allow, 2)),
            ("a.b.example.com", &[2], d(Verdict::Allow, 2)),
            // No name rule: refused, even with `default: audit`.
            ("example.com", &[], d(Verdict::Deny, 0)),
            ("other.test", &[], d(Verdict::Deny, 0)),
        ];
        for (q, ids, decision) in cases {
            assert_eq!(p.rules_for_name(q), *ids, "{q}");
            assert_eq!(p.decide_name(q), *decision, "{q}");
            assert_eq!(p.name_allowed(q), !ids.is_empty(), "{q}");
        }
        let names: Vec<String> = p.rules()[2].names().iter().map(|n| n.to_string()).collect();
        assert_eq!(names, ["git.example.com"]);
        assert_eq!(p.rules()[2].nets().len(), 1);
        assert!(p.rules()[5].names().is_empty());
        // `hosts` defaults to the names of `to`.
        let hosts: Vec<String> = p.rules()[4].hosts().iter().map(|n| n.to_string()).collect();
        assert_eq!(hosts, ["*.example.com"]);
    }

    /// A `deny` whose names an earlier rule already matches would never apply: refused,
    /// naming the rule to put it before. One that still takes some names loads.
    #[test]
    fn a_deny_an_earlier_rule_shadows_does_not_load() {
        let src = |deny: &str| {
            format!(
                "version: 1
rules:
  - {{name: web, to: [\"**.example.com\"], ports: [443], action: allow}}
  - {{name: one, to: [\"*.example.org\"], ports: [443], action: allow}}
  - {{name: late, to: [{deny}], action: deny}}
"
            )
        };
        for (deny, by) in [
            (
                "storage.example.com",
                "`**.example.com` of the earlier rule `web`",
            ),
            (
                "\"*.a.example.com\"",
                "`**.example.com` of the earlier rule `web`",
            ),
            (
                "\"**.a.example.com\"",
                "`**.example.com` of the earlier rule `web`",
            ),
            (
                "other.test, a.example.org",
                "`*.example.org` of the earlier rule `one`",
            ),
        ] {
            let e = parse_str(&src(deny), "d.yaml").unwrap_err().to_string();
            assert!(e.starts_with("d.yaml:5:"), "{e}");
            assert!(e.contains(&format!("is matched first by {by}")), "{e}");
            assert!(e.contains("(valid: put this rule before"), "{e}");
        }
        // Partly shadowed: the names the earlier rule does not take are denied.
        for (deny, denied, resolves) in [
            ("\"**.example.org\"", "a.b.example.org", "a.example.org"),
            ("example.com", "example.com", "a.example.com"),
        ] {
            let p = parse_str(&src(deny), "d.yaml").unwrap();
            assert_eq!(
                p.decide_name(denied),
                Decision {
                    verdict: Verdict::Deny,
                    rule_id: 3
                }
            );
            assert!(p.name_allowed(resolves), "{deny}");
        }
        // Before the wildcard it carves out of, the same deny loads and applies.
        let first = "version: 1
rules:
  - {name: late, to: [storage.example.com], action: deny}
  - {name: web, to: [\"**.example.com\"], ports: [443], action: allow}
";
        let p = parse_str(first, "d.yaml").unwrap();
        assert_eq!(p.decide_name("storage.example.com").verdict, Verdict::Deny);
    }

    #[test]
    fn names_never_match_addresses_by_themselves() {
        let p = policy(ORDERED);
        let ip = |s: &str| s.parse().unwrap();
        // Rule 3 lists 192.0.2.0/24 besides its name; only that address part counts.
        assert_eq!(p.decide(ip("192.0.2.1"), 22, Protocol::Tcp).rule_id, 3);
        assert_eq!(
            p.decide(ip("192.0.2.1"), 443, Protocol::Tcp),
            Decision {
                verdict: Verdict::Audit,
                rule_id: 0
            }
        );
        // Learned for git.example.com, the same address gets the name rules first.
        let git = p.rules_for_name("git.example.com");
        let learned = |a, port, proto| p.decide_learned(ip(a), port, proto, &git);
        assert_eq!(learned("192.0.2.1", 443, Protocol::Tcp).rule_id, 2);
        assert_eq!(learned("192.0.2.1", 22, Protocol::Tcp).rule_id, 3);
        assert_eq!(
            learned("192.0.2.1", 8443, Protocol::Tcp).verdict,
            Verdict::Redirect
        );
        assert_eq!(
            learned("192.0.2.1", 80, Protocol::Tcp).verdict,
            Verdict::Audit
        );
        // A static deny for the address still applies to ports the names do not grant.
        assert_eq!(
            learned("198.51.100.7", 80, Protocol::Tcp),
            Decision {
                verdict: Verdict::Deny,
                rule_id: 6
            }
        );
        assert_eq!(learned("198.51.100.7", 443, Protocol::Tcp).rule_id, 2);
        // Connecting by name: as if the address were in no rule.
        let c = |q, port, proto| p.decide_name_connect(q, port, proto);
        assert_eq!(c("git.example.com", 22, Protocol::Tcp).rule_id, 3);
        assert_eq!(
            c("git.example.com", 22, Protocol::Udp).verdict,
            Verdict::Audit
        );
        assert_eq!(
            c("bad.example.com", 443, Protocol::Tcp).verdict,
            Verdict::Audit
        );
        assert_eq!(
            c("x.example.com", 8443, Protocol::Tcp).verdict,
            Verdict::Redirect
        );
    }

    const RESOLVING: &str = "version: 1
rules:
  - {name: no-evil, to: [evil.example.com], action: deny}
  - name: gh
    to: [api.github.com]
    ports: [443]
    action: proxy
    credential: github
  - {name: web, to: [\"**.example.com\", 192.0.2.10], ports: [80, 443], protocol: tcp, action: allow}
tests:
  - {resolve: API.GitHub.com., expect: allow, rule: gh}
  - {resolve: evil.example.com, expect: deny, rule: no-evil}
  - {resolve: example.com, expect: deny}
  - {resolve: a.b.example.com, expect: allow, rule: web}
  - {connect: \"api.github.com:443\", expect: redirect, rule: gh}
  - {connect: api.github.com:80, expect: deny}
  - {connect: www.example.com:80/udp, expect: deny}
  - {request: GET https://api.github.com/x, expect: allow, rule: gh, credential: github}
  - {connect: 192.0.2.10:80, expect: allow, rule: web}
  - {resolve: example.com, expect: deny, rule: web}
  - {resolve: www.example.com, expect: allow, rule: no-evil}
  - {connect: evil.example.com:80, expect: allow, rule: web}
";

    #[test]
    fn resolve_and_name_connect_tests() {
        let p = policy(RESOLVING);
        assert_eq!(p.name_tests().len(), 10);
        assert_eq!(p.tests().len(), 1);
        assert_eq!(p.request_tests().len(), 1);
        let lines: Vec<String> = p.run_tests().iter().map(ToString::to_string).collect();
        assert_eq!(
            lines,
            [
                "ok   resolve API.GitHub.com.: allow by rule `gh`",
                "ok   resolve evil.example.com: deny by rule `no-evil`",
                "ok   resolve example.com: deny by the default",
                "ok   resolve a.b.example.com: allow by rule `web`",
                "ok   api.github.com:443: redirect by rule `gh`",
                "ok   api.github.com:80: deny by the default",
                "ok   www.example.com:80/udp: deny by the default",
                "ok   GET https://api.github.com/x: allow by rule `gh` with credential `github` \
                 (allowed by rule gh)",
                "ok   192.0.2.10:80: allow by rule `web`",
                "FAIL resolve example.com: expected deny by rule `web`, got deny by the default",
                "FAIL resolve www.example.com: expected allow by rule `no-evil`, got allow by rule `web`",
                "FAIL evil.example.com:80: expected allow by rule `web`, got deny by the default",
            ]
        );
    }

    #[test]
    fn resolve_test_errors() {
        let with = |line: usize, replacement: &str| {
            let mut lines: Vec<&str> = RESOLVING.lines().collect();
            lines[line - 1] = replacement;
            let src = lines.join("\n") + "\n";
            parse_str(&src, "r.yaml")
                .map(|_| "(no error)".to_owned())
                .unwrap_or_else(|e| e.to_string())
        };
        let cases: &[(usize, &str, &str)] = &[
            (
                11,
                "  - {resolve: \"*.example.com\", expect: deny}",
                "r.yaml:11:15: tests[0].resolve: invalid name \"*.example.com\": is a wildcard; \
                 a test looks up one name (valid: one DNS name like api.example.com, not a \
                 wildcard or an address)",
            ),
            (
                11,
                "  - {resolve: 192.0.2.10, expect: deny}",
                "r.yaml:11:15: tests[0].resolve: invalid name \"192.0.2.10\": is an address, not \
                 a name (valid: one DNS name like api.example.com, not a wildcard or an address)",
            ),
            (
                11,
                "  - {resolve: a..b, expect: deny}",
                "r.yaml:11:15: tests[0].resolve: invalid name \"a..b\": has an empty label (two \
                 dots in a row, or a leading dot) (valid: one DNS name like api.example.com, not \
                 a wildcard or an address)",
            ),
            (
                11,
                "  - {resolve: api.github.com, expect: redirect, rule: gh}",
                "r.yaml:11:39: tests[0].expect: a name resolves or not, so it is allowed or \
                 denied, never `redirect` (valid: allow, deny)",
            ),
            (
                11,
                "  - {resolve: api.github.com, expect: allow}",
                "r.yaml:11:39: tests[0].expect: a name resolves only through a rule: `expect: \
                 allow` needs `rule:`, the first rule whose names match (valid: add `rule: \
                 NAME`, or `expect: deny`)",
            ),
            (
                11,
                "  - {resolve: api.github.com, expect: allow, rule: nope}",
                "r.yaml:11:52: tests[0].rule: no rule is named `nope` (valid: `gh`, `no-evil`, \
                 `web`, `none`, `default`)",
            ),
            (
                11,
                "  - {resolve: api.github.com, expect: deny, rule: gh, credential: github}",
                "r.yaml:11:67: tests[0].credential: `credential` applies only to `request:` tests \
                 (valid: remove it)",
            ),
            (
                11,
                "  - {resolve: api.github.com, connect: 192.0.2.10:80, expect: deny}",
                "r.yaml:11:15: tests[0].resolve: a test has one of `connect:`, `request:` and \
                 `resolve:`, not several (here: `connect`, `resolve`) (valid: one test per \
                 connection, request or name)",
            ),
        ];
        let wrong: Vec<String> = cases
            .iter()
            .filter_map(|(line, replacement, want)| {
                let got = with(*line, replacement);
                (&got != want).then(|| format!("{replacement}\n got: {got}\nwant: {want}"))
            })
            .collect();
        assert!(wrong.is_empty(), "{}", wrong.join("\n"));
        // A rule without names can never decide a name.
        let src = "version: 1
rules:
  - {name: addr, to: [192.0.2.1], action: allow}
tests:
  - {resolve: a.example, expect: deny, rule: addr}
";
        assert_eq!(
            parse_str(src, "r.yaml").unwrap_err().to_string(),
            "r.yaml:5:46: tests[0].rule: rule `addr` has no host names in `to`, so it never \
             decides whether a name resolves (valid: `none`, `default`)"
        );
    }
}
