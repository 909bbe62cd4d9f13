//! Policy files: what a sandbox may connect to.
//!
//! A file goes through two stages. `raw` mirrors the YAML (unknown keys rejected, each
//! scalar parsed where its line and column are known); `compile` checks the whole and
//! builds an immutable [`Policy`], or rejects the file with one [`PolicyError`]. A
//! compiled policy answers [`Policy::decide`] (pure, the reference semantics), produces
//! the kernel's LPM-trie entries with [`Policy::kernel_rules`] (equal in effect, checked by
//! tests), and runs its own `tests:` with [`Policy::run_tests`]. The format is documented
//! in `policies/README.md`.
//!
//! Proxy and passthrough rules send connections to the egress proxy. For those, the
//! proxy asks [`Policy::proxy_rule`] for the rule the kernel redirected by, checks the TLS
//! server name and `Host` with [`Rule::allows_host`] and each request with
//! [`Rule::check_request`], and injects [`Rule::credential`]. [`Policy::decide_request`]
//! is the same judgement from a URL, used by `request:` tests.
//!
//! Rules may name destinations by host name or wildcard (`api.github.com`,
//! `"*.example.com"`). Those grant nothing by address: the daemon's resolver answers only
//! names [`Policy::rules_for_name`] allows, asking the resolvers of [`Policy::dns`], and
//! writes each address it learns into the kernel with [`Policy::learned_entries`];
//! [`Policy::decide_learned`] is the matching reference decision. See `names`.
mod compile;
mod decide;
mod dns;
mod error;
pub mod git;
mod host;
mod http;
mod kernel;
mod load;
mod names;
pub mod raw;
mod request;
mod selftest;

pub use compile::{
    compile, normalise_net, Action, DefaultAction, NameTest, NameTestKind, Policy, PolicyTest,
    Protocol, RequestTest, Rule, DAEMON_RULE_NAMES, MAX_RULES, POLICY_VERSION,
};
pub use decide::{Decision, Verdict};
pub use dns::{DnsBudget, DnsConfig};
pub use error::{CompileError, FieldPath, Location, PolicyError, Segment, MAX_POLICY_BYTES};
pub use host::HostPattern;
pub(crate) use http::target_for_reason;
pub use http::{normalize_target, HttpRule, MethodPattern, PathGlob};
pub use kernel::{KernelRules, KernelRulesError};
pub use load::{load_file, load_file_untested, parse_raw, parse_str, parse_untested};
pub use request::RequestDecision;
pub use selftest::TestOutcome;

#[cfg(test)]
mod proptests;

#[cfg(test)]
#[expect(clippy::unwrap_used, reason = "tests fail loudly")]
mod tests {
    use super::*;

    const GOOD: &str = "\
version: 1
default: deny
rules:
  - name: local-api
    to: [10.0.0.0/8, \"2001:db8::/32\", 192.0.2.7, \"::ffff:198.51.100.0/120\"]
    ports: [443, \"8000-8100\"]
    protocol: tcp
    action: allow
  - name: no-ssh
    to: [10.1.0.0/16]
    ports: [22]
    action: deny
tests:
  - connect: 192.0.2.7:443/tcp
    expect: allow
    rule: local-api
  - connect: \"[2001:db8::1]:8050\"
    expect: allow
    rule: local-api
  - connect: 10.1.0.1:22/udp
    expect: deny
    rule: no-ssh
  - connect: 203.0.113.1:443
    expect: deny
";

    #[test]
    fn good_file() {
        let policy = parse_str(GOOD, "good.yaml").unwrap();
        assert_eq!(policy.default_action(), DefaultAction::Deny);
        let rule = &policy.rules()[0];
        assert_eq!(rule.name(), "local-api");
        let nets: Vec<String> = rule.nets().iter().map(|n| n.to_string()).collect();
        // The v4-mapped CIDR is stored as IPv4.
        assert_eq!(
            nets,
            [
                "10.0.0.0/8",
                "2001:db8::/32",
                "192.0.2.7/32",
                "198.51.100.0/24"
            ]
        );
        assert_eq!(rule.ports(), &[(443, 443), (8000, 8100)]);
        assert_eq!(rule.protocol(), Protocol::Tcp);
        assert_eq!(rule.action(), Action::Allow);
        let rule = &policy.rules()[1];
        assert_eq!(rule.protocol(), Protocol::Any);
        assert_eq!(rule.action(), Action::Deny);
        assert_eq!(policy.tests().len(), 4);
        assert_eq!(policy.tests()[2].protocol(), Protocol::Udp);
        assert_eq!(policy.tests()[2].rule_id(), 2);
        assert_eq!(policy.tests()[3].rule_id(), 0);
        assert!(policy.run_tests().iter().all(|o| o.passed));
    }

    #[test]
    fn any_port_rules_store_no_ranges() {
        let policy = parse_str(
            "version: 1\nrules:\n  - {name: a, to: [192.0.2.1], action: allow}\n",
            "x",
        )
        .unwrap();
        assert!(policy.rules()[0].ports().is_empty());
        assert!(policy.rules()[0].matches_port(0, Protocol::Udp));
    }

    /// Replaces one line of `GOOD` (1-based) and returns the error text.
    fn error_with(line: usize, replacement: &str) -> String {
        let src: Vec<&str> = GOOD.lines().collect();
        let mut out: Vec<&str> = src.clone();
        out[line - 1] = replacement;
        let mut text = out.join("\n");
        text.push('\n');
        parse_str(&text, "p.yaml").unwrap_err().to_string()
    }

    #[test]
    fn errors_name_file_line_column_field_and_valid_values() {
        let cases: &[(usize, &str, &str)] = &[
            // Ports.
            (
                6,
                "    ports: [443, \"9000-80\"]",
                "p.yaml:6:18: rules[0].ports[1]: invalid port range \"9000-80\": start is \
                 greater than end (valid: a port 1-65535 or a range \"lo-hi\")",
            ),
            (
                6,
                "    ports: [0]",
                "p.yaml:6:13: rules[0].ports[0]: invalid port 0: is 0; ports start at 1 \
                 (valid: a port 1-65535 or a range \"lo-hi\")",
            ),
            (
                6,
                "    ports: [443, 65536]",
                "p.yaml:6:18: rules[0].ports[1]: invalid port 65536: is above 65535 (valid: \
                 a port 1-65535 or a range \"lo-hi\")",
            ),
            (
                6,
                "    ports: [-1]",
                "p.yaml:6:13: rules[0].ports[0]: invalid port -1: ports are not negative \
                 (valid: a port 1-65535 or a range \"lo-hi\")",
            ),
            (
                6,
                "    ports: [https]",
                "p.yaml:6:13: rules[0].ports[0]: invalid port \"https\": is not a number \
                 (valid: a port 1-65535 or a range \"lo-hi\")",
            ),
            (
                6,
                "    ports: [4.5]",
                "p.yaml:6:13: rules[0].ports[0]: invalid type: floating point `4.5`, \
                 expected a port 1-65535 or a range \"lo-hi\"",
            ),
            (
                6,
                "    ports: []",
                "p.yaml:6:12: rules[0].ports: an empty port list matches nothing (valid: \
                 omit `ports` for any port, or list ports and ranges like [443, \
                 \"8000-8100\"])",
            ),
            // A proxy rule whose names an earlier allow rule lets through directly.
            (
                12,
                "    action: deny\n  - {name: pkgs, to: [\"**.example.com\"], action: allow}\n  \
                 - {name: web, to: [api.example.com], ports: [443], action: proxy}",
                "p.yaml:14:21: rules[3].to: names matching `api.example.com` are allowed \
                 directly by the earlier rule `pkgs` on a port this rule takes, so their \
                 connections would never reach the proxy and nothing this rule checks would \
                 apply (valid: put this rule before `pkgs`, or narrow that rule's names or \
                 ports)",
            ),
            // A proxy rule whose address an earlier allow rule of the same network lets
            // through directly.
            (
                12,
                "    action: deny\n  - {name: net, to: [203.0.113.0/24], ports: [\"400-500\"], \
                 action: allow}\n  - {name: web, to: [203.0.113.0/24], ports: [443], action: proxy, \
                 hosts: [api.example.com]}",
                "p.yaml:14:21: rules[3].to: the address 203.0.113.0/24 is allowed directly by \
                 the earlier rule `net` on a port this rule takes, so connections there would \
                 never reach the proxy and nothing this rule checks would apply (valid: put \
                 this rule before `net`, or narrow that rule's ports)",
            ),
            // Two proxy rules serving one name on one port, one of them by name: the rule
            // of the name the sandbox resolved would serve the other's requests.
            (
                12,
                "    action: deny\n  - {name: a, to: [192.0.2.10], ports: [443], action: proxy, \
                 hosts: [api.example.com]}\n  - {name: b, to: [api.example.com], ports: [443], \
                 action: proxy}",
                "p.yaml:14:19: rules[3].to: serves names matching `api.example.com` that the \
                 earlier rule `a` serves too, on a port both take: which rule's checks and \
                 credential apply would depend on the name the sandbox resolved (valid: one \
                 proxy or passthrough rule per name and port; narrow `hosts` or `ports`)",
            ),
            // An empty value is not a key left out (which may mean no restriction).
            (
                6,
                "    ports:",
                "p.yaml:4:5: rules[0].ports: empty value: give it a value, or remove the key (an empty key is not read as \
                 one left out, which may mean no restriction)",
            ),
            (
                6,
                "    ports: ~",
                "p.yaml:4:5: rules[0].ports: empty value: give it a value, or remove the key (an empty key is not read as \
                 one left out, which may mean no restriction)",
            ),
            (
                6,
                "    protocol: ~",
                "p.yaml:4:5: rules[0].protocol: empty value: give it a value, or remove the key (an empty key is not read as \
                 one left out, which may mean no restriction)",
            ),
            (
                2,
                "require:",
                "p.yaml:1:1: require: empty value: give it a value, or remove the key (an empty key is not read as \
                 one left out, which may mean no restriction)",
            ),
            (
                2,
                "require:\n  no_capabilities:",
                "p.yaml:3:3: require.no_capabilities: empty value: give it a value, or remove the key (an empty key is not read as \
                 one left out, which may mean no restriction)",
            ),
            (
                2,
                "require: {no_capabilities: []}",
                "p.yaml:2:28: require.no_capabilities: an empty capability list requires \
                 nothing (valid: names like [sys_admin, net_admin], or remove \
                 `no_capabilities`)",
            ),
            (
                12,
                "    action: deny\n  - {name: no, to: [evil.example], answers: [192.0.2.1], \
                 action: deny}",
                "p.yaml:13:45: rules[2].answers: `answers` pins what a rule's names resolve \
                 to, and a deny rule's names do not resolve at all (valid: remove `answers`, \
                 or put it on the rule that allows the names)",
            ),
            // Destinations.
            (
                5,
                "    to: [\"64:ff9b::/96\"]",
                "p.yaml:5:10: rules[0].to[0]: 64:ff9b::/96 is inside the NAT64 prefix \
                 64:ff9b::/96, whose addresses are judged by the IPv4 address they carry: \
                 write the IPv4 network (0.0.0.0/0)",
            ),
            (
                5,
                "    to: [\"64:ff9b::/64\"]",
                "p.yaml:5:10: rules[0].to[0]: 64:ff9b::/64 holds the NAT64 prefix \
                 64:ff9b::/96, whose addresses are judged by the IPv4 address they carry: \
                 this network matches none of them; write the IPv4 networks meant \
                 (0.0.0.0/0 for all) and, for the rest, networks beside 64:ff9b::/96",
            ),
            (
                5,
                "    to: [\"64:ff9b::c000:20a\"]",
                "p.yaml:5:10: rules[0].to[0]: 64:ff9b::c000:20a/128 is inside the NAT64 \
                 prefix 64:ff9b::/96, whose addresses are judged by the IPv4 address they \
                 carry: write the IPv4 network (192.0.2.10/32)",
            ),
            (
                5,
                "    to: [10.0.0.1/8]",
                "p.yaml:5:10: rules[0].to[0]: CIDR 10.0.0.1/8 has host bits set: did you \
                 mean 10.0.0.0/8 (the whole network) or 10.0.0.1/32 (the single address)?",
            ),
            (
                5,
                "    to: [192.0.2.0/24, 300.1.2.3]",
                "p.yaml:5:24: rules[0].to[1]: invalid destination \"300.1.2.3\" (valid: an \
                 IP address like 192.0.2.7 or 2001:db8::7, a CIDR like 10.0.0.0/8, a host name \
                 like api.example.com, or a wildcard like \"*.example.com\" (one label in \
                 front) or \"**.example.com\" (one or more))",
            ),
            (
                5,
                "    to: []",
                "p.yaml:5:9: rules[0].to: a rule needs at least one destination (valid: a \
                 list of IP addresses, CIDRs and host names, like [192.0.2.7, 10.0.0.0/8, \
                 api.example.com])",
            ),
            (
                5,
                "    to: [192.0.2.1, \"a.*.example.com\"]",
                "p.yaml:5:21: rules[0].to[1]: invalid destination \"a.*.example.com\": `*` may \
                 only be the whole first label, followed by a domain: `*.` for one label or \
                 `**.` for one or more (valid: an IP address like 192.0.2.7 or 2001:db8::7, a \
                 CIDR like 10.0.0.0/8, a host name like api.example.com, or a wildcard like \
                 \"*.example.com\" (one label in front) or \"**.example.com\" (one or more))",
            ),
            (
                5,
                "    to: [api_v2.example.com]",
                "p.yaml:5:10: rules[0].to[0]: invalid destination \"api_v2.example.com\": label \
                 `api_v2` contains '_'; labels are letters, digits and `-` (valid: an IP \
                 address like 192.0.2.7 or 2001:db8::7, a CIDR like 10.0.0.0/8, a host name \
                 like api.example.com, or a wildcard like \"*.example.com\" (one label in \
                 front) or \"**.example.com\" (one or more))",
            ),
            (
                5,
                "    to: 10.0.0.0/8",
                "p.yaml:5:9: rules[0].to: invalid type: string \"10.0.0.0/8\", expected a \
                 sequence",
            ),
            // Enumerations.
            (
                7,
                "    protocol: icmp",
                "p.yaml:7:15: rules[0].protocol: unknown variant `icmp`, expected one of \
                 `any`, `tcp`, `udp`",
            ),
            (
                8,
                "    action: permit",
                "p.yaml:8:13: rules[0].action: unknown variant `permit`, expected one of \
                 `allow`, `deny`, `proxy`, `passthrough`",
            ),
            (
                8,
                "    action: proxy",
                "p.yaml:8:13: rules[0].action: `action: proxy` needs `hosts`, the names the \
                 TLS server name and the HTTP Host must match (valid: add a list like `hosts: \
                 [api.example.com]`, or put host names in `to`, which `hosts` then defaults to)",
            ),
            (
                8,
                "    action: passthrough",
                "p.yaml:8:13: rules[0].action: `action: passthrough` needs `hosts`, the names \
                 the TLS server name and the HTTP Host must match (valid: add a list like \
                 `hosts: [api.example.com]`, or put host names in `to`, which `hosts` then \
                 defaults to)",
            ),
            (
                2,
                "default: allow",
                "p.yaml:2:10: default: unknown variant `allow`, expected `deny` or `audit`",
            ),
            // Structure.
            (
                7,
                "    port: 443",
                "p.yaml:7:5: rules[0].port: unknown field `port`, expected one of `name`, \
                 `to`, `ports`, `protocol`, `action`, `hosts`, `credential`, `http`, `git`, \
                 `answers`",
            ),
            (
                2,
                "resolver: {}",
                "p.yaml:2:1: resolver: unknown field `resolver`, expected one of `version`, \
                 `default`, `dns`, `require`, `rules`, `tests`, `alerts`",
            ),
            (
                2,
                "alerts: {responses: {secret-leak: quarantine}}",
                "p.yaml:2:21: alerts.responses: `secret-leak` is not an alert kind (valid: \
                 secret-reflected, secret-outbound, dns-budget, denial-burst, cgroup-escape, \
                 risky-posture, source-routing, rate-limit, placeholder-misdirected, control-socket)",
            ),
            (
                2,
                "alerts: {denial_burst: {count: 5, seconds: 0}}",
                "p.yaml:2:24: alerts.denial_burst: seconds 0 is out of range (valid: 1-3600)",
            ),
            (
                8,
                "    protocol: tcp",
                "p.yaml:4:5: rules[0]: duplicate field `protocol`",
            ),
            (8, "", "p.yaml:4:5: rules[0]: missing field `action`"),
            (
                1,
                "version: 2",
                "p.yaml:1:10: version: unsupported policy version 2 (valid: 1)",
            ),
            (
                1,
                "version: one",
                "p.yaml:1:10: version: invalid type: string \"one\", expected u64",
            ),
            (
                5,
                "    to: [10.0.0.0/8]]",
                "p.yaml:5:21: rules[0]: did not find expected key, while parsing a block mapping \
                 (not valid YAML: check indentation, quotes and brackets)",
            ),
            // Names.
            (
                4,
                "  - name: \"\"",
                "p.yaml:4:11: rules[0].name: a rule needs a non-empty name (valid: letters, \
                 digits, `_`, `.` and `-`)",
            ),
            (
                4,
                "  - name: local api",
                "p.yaml:4:11: rules[0].name: rule name \"local api\" contains ' ' (valid: \
                 letters, digits, `_`, `.` and `-`)",
            ),
            (
                4,
                "  - name: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa",
                "p.yaml:4:11: rules[0].name: rule name \"aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\"... \
                 is 65 characters long (at most 64)",
            ),
            (
                4,
                "  - name: none",
                "p.yaml:4:11: rules[0].name: rule name `none` is reserved: tests write \
                 `rule: none` for the default (valid: letters, digits, `_`, `.` and `-`, \
                 other than `none` and `default`)",
            ),
            (
                4,
                "  - name: proxy-port",
                "p.yaml:4:11: rules[0].name: rule name `proxy-port` is reserved: records \
                 name the default rule and the daemon's own decisions so (valid: letters, \
                 digits, `_`, `.` and `-`, other than `none`, `default`, `dns-resolver`, \
                 `proxy-port`, `unspecified-address`, `bound-device`, `unknown` in any case)",
            ),
            (
                4,
                "  - name: Default",
                "p.yaml:4:11: rules[0].name: rule name `Default` is reserved: records \
                 name the default rule and the daemon's own decisions so (valid: letters, \
                 digits, `_`, `.` and `-`, other than `none`, `default`, `dns-resolver`, \
                 `proxy-port`, `unspecified-address`, `bound-device`, `unknown` in any case)",
            ),
            (
                9,
                "  - name: local-api",
                "p.yaml:9:11: rules[1].name: rule name `local-api` is already used by \
                 rules[0] (valid: a name no other rule has)",
            ),
            // Tests.
            (
                14,
                "  - connect: 192.0.2.7",
                "p.yaml:14:14: tests[0].connect: invalid connection \"192.0.2.7\": the port \
                 is missing (valid: \"192.0.2.7:443\", \"192.0.2.7:53/udp\", \
                 \"[2001:db8::1]:443/tcp\" or \"api.example.com:443\"; the protocol is tcp \
                 (the default) or udp)",
            ),
            (
                14,
                "  - connect: 192.0.2.7:443/icmp",
                "p.yaml:14:14: tests[0].connect: invalid connection \"192.0.2.7:443/icmp\": \
                 unknown protocol \"icmp\" (valid: \"192.0.2.7:443\", \"192.0.2.7:53/udp\", \
                 \"[2001:db8::1]:443/tcp\" or \"api.example.com:443\"; the protocol is tcp \
                 (the default) or udp)",
            ),
            (
                14,
                "  - connect: \"*.example.com:443\"",
                "p.yaml:14:14: tests[0].connect: invalid connection \"*.example.com:443\": \
                 name \"*.example.com\" is a wildcard; a test looks up one name (valid: \
                 \"192.0.2.7:443\", \"192.0.2.7:53/udp\", \"[2001:db8::1]:443/tcp\" or \
                 \"api.example.com:443\"; the protocol is tcp (the default) or udp)",
            ),
            (
                14,
                "  - connect: api.example.com:https",
                "p.yaml:14:14: tests[0].connect: invalid connection \"api.example.com:https\": \
                 port \"https\" is not a number 0-65535 (valid: \"192.0.2.7:443\", \
                 \"192.0.2.7:53/udp\", \"[2001:db8::1]:443/tcp\" or \"api.example.com:443\"; \
                 the protocol is tcp (the default) or udp)",
            ),
            (
                14,
                "  - connect: api.example.com:443",
                "p.yaml:16:11: tests[0].rule: rule `local-api` has no host names in `to`, so it \
                 never decides a connection to a name (valid: `none`, `default`)",
            ),
            (
                15,
                "    expect: allowed",
                "p.yaml:15:13: tests[0].expect: unknown variant `allowed`, expected one of \
                 `allow`, `deny`, `audit`, `redirect`",
            ),
            (
                16,
                "    rule: local_api",
                "p.yaml:16:11: tests[0].rule: no rule is named `local_api` (valid: \
                 `local-api`, `no-ssh`, `none`, `default`)",
            ),
        ];
        let wrong: Vec<String> = cases
            .iter()
            .filter_map(|(line, replacement, want)| {
                let got = error_with(*line, replacement);
                (&got != want)
                    .then(|| format!("line {line} {replacement:?}\n got: {got}\nwant: {want}"))
            })
            .collect();
        assert!(wrong.is_empty(), "{}", wrong.join("\n"));
    }

    const PROXY: &str = "\
version: 1
rules:
  - name: github-api
    to: [192.0.2.10]
    ports: [443]
    action: proxy
    hosts: [api.github.com]
    credential: github
    http:
      - methods: [GET, HEAD]
        paths: [\"/repos/acme/widgets/**\"]
  - name: pinned
    to: [192.0.2.20]
    action: passthrough
    hosts: [pinned.example]
  - name: plain
    to: [192.0.2.30]
    action: allow
tests:
  - request: GET https://api.github.com/repos/acme/widgets/pulls
    expect: allow
    rule: github-api
    credential: github
";

    /// Applies (1-based line, replacement) edits to `PROXY`; a replacement may hold
    /// several lines.
    fn proxy_with(edits: &[(usize, &str)]) -> String {
        let mut out: Vec<&str> = PROXY.lines().collect();
        for (line, replacement) in edits {
            out[line - 1] = replacement;
        }
        let mut text = out.join("\n");
        text.push('\n');
        text
    }

    /// Only an earlier `allow` of a proxy rule's own network, on a port both take, is
    /// refused; carve-outs, later allows, other ports and UDP stay valid.
    #[test]
    fn allows_beside_proxy_networks() {
        let policy = |rules: &str| {
            parse_str(&format!("version: 1\nrules:\n{rules}"), "a.yaml")
                .map(|_| ())
                .map_err(|e| e.to_string())
        };
        let proxy = "  - {name: p, to: [0.0.0.0/0], ports: [443], action: passthrough, hosts: [a.example]}\n";
        for allow in [
            // A more specific network: a carve-out (longest prefix decides).
            "  - {name: a, to: [10.0.0.0/8], ports: [443], action: allow}\n",
            // Other ports, UDP only.
            "  - {name: a, to: [0.0.0.0/0], ports: [80], action: allow}\n",
            "  - {name: a, to: [0.0.0.0/0], protocol: udp, action: allow}\n",
        ] {
            assert_eq!(policy(&format!("{allow}{proxy}")), Ok(()), "{allow}");
            assert_eq!(policy(&format!("{proxy}{allow}")), Ok(()), "{allow}");
        }
        // The same network after the proxy rule: the proxy rule decides first.
        let later = "  - {name: a, to: [0.0.0.0/0], ports: [443], action: allow}\n";
        assert_eq!(policy(&format!("{proxy}{later}")), Ok(()));
        let err = policy(&format!("{later}{proxy}")).unwrap_err();
        assert!(
            err.contains("allowed directly by the earlier rule `a`"),
            "{err}"
        );
    }

    #[test]
    fn proxy_policy() {
        let policy = parse_str(PROXY, "p.yaml").unwrap();
        let rule = &policy.rules()[0];
        assert_eq!(rule.action(), Action::Proxy);
        assert_eq!(rule.protocol(), Protocol::Tcp);
        assert_eq!(policy.rules()[1].action(), Action::Passthrough);
        assert_eq!(policy.rules()[1].protocol(), Protocol::Tcp);
        assert_eq!(policy.credential_names(), ["github"]);
        assert!(policy.run_tests().iter().all(|o| o.passed));
        // Accepted variations.
        for edits in [
            &[(5, "    ports: [443]\n    protocol: tcp")][..],
            &[(
                7,
                "    hosts: [\"API.GitHub.com.\", api.github.com, \"**.api.github.com\"]",
            )],
            &[(10, "      - methods: [\"*\"]")],
            &[(8, ""), (23, "")],
            &[(9, ""), (10, ""), (11, "")],
        ] {
            let src = proxy_with(edits);
            let policy = parse_str(&src, "p.yaml").unwrap_or_else(|e| unreachable!("{e}"));
            assert!(policy.run_tests().iter().all(|o| o.passed), "{src}");
        }
        let src = proxy_with(&[(
            7,
            "    hosts: [\"API.GitHub.com.\", api.github.com, \"**.api.github.com\"]",
        )]);
        let hosts: Vec<String> = parse_str(&src, "p.yaml").unwrap().rules()[0]
            .hosts()
            .iter()
            .map(ToString::to_string)
            .collect();
        assert_eq!(hosts, ["api.github.com", "**.api.github.com"]);
    }

    #[test]
    fn proxy_errors_name_file_line_column_field_and_valid_values() {
        let cases: &[(&[(usize, &str)], &str)] = &[
            (
                &[(7, "    hosts: []")],
                "p.yaml:7:12: rules[0].hosts: an empty host list matches nothing (valid: names \
                 like [api.example.com, \"*.example.com\"])",
            ),
            (
                &[(7, "    hosts: [\"a.*.example\"]")],
                "p.yaml:7:13: rules[0].hosts[0]: invalid host name \"a.*.example\": `*` may only \
                 be the whole first label, followed by a domain: `*.` for one label or `**.` for \
                 one or more (valid: a DNS name like api.example.com, *.example.com (one label in \
                 front) or **.example.com (one or more labels in front))",
            ),
            (
                &[(7, "    hosts: [api.github.com, \"*\"]")],
                "p.yaml:7:29: rules[0].hosts[1]: invalid host name \"*\": `*` may only be the \
                 whole first label, followed by a domain: `*.` for one label or `**.` for one or \
                 more (valid: a DNS name like api.example.com, *.example.com (one label in front) \
                 or **.example.com (one or more labels in front))",
            ),
            (
                &[(7, "    hosts: [192.0.2.10]")],
                "p.yaml:7:13: rules[0].hosts[0]: invalid host name \"192.0.2.10\": looks like an \
                 IP address; `hosts` lists TLS server names, addresses go in `to` (valid: a DNS \
                 name like api.example.com, *.example.com (one label in front) or **.example.com \
                 (one or more labels in front))",
            ),
            (
                &[(7, "    hosts: api.github.com")],
                "p.yaml:7:12: rules[0].hosts: invalid type: string \"api.github.com\", expected a \
                 sequence",
            ),
            (
                &[(7, "")],
                "p.yaml:6:13: rules[0].action: `action: proxy` needs `hosts`, the names the TLS \
                 server name and the HTTP Host must match (valid: add a list like `hosts: \
                 [api.example.com]`, or put host names in `to`, which `hosts` then defaults to)",
            ),
            (
                &[(5, "")],
                "p.yaml:8:17: rules[0].credential: a rule that injects a credential must list \
                 its `ports`: without them the credential is sent to any TLS service at the \
                 rule's addresses, on any port the sandbox connects to (valid: `ports: [443]`, \
                 or the ports the service answers on)",
            ),
            (
                &[(5, "    protocol: udp")],
                "p.yaml:5:15: rules[0].protocol: protocol `udp` does not fit `action: proxy`: the \
                 proxy handles TLS over TCP only (valid: `protocol: tcp`, or omit `protocol`)",
            ),
            (
                &[(5, "    protocol: any")],
                "p.yaml:5:15: rules[0].protocol: protocol `any` does not fit `action: proxy`: the \
                 proxy handles TLS over TCP only (valid: `protocol: tcp`, or omit `protocol`)",
            ),
            (
                &[(8, "    credential: \"git hub\"")],
                "p.yaml:8:17: rules[0].credential: credential name \"git hub\" contains ' ' \
                 (valid: the name of a credential in the daemon configuration: letters, digits, \
                 `_`, `.` and `-`)",
            ),
            (
                &[(8, "    credential: \"\"")],
                "p.yaml:8:17: rules[0].credential: a credential name cannot be empty (valid: the \
                 name of a credential in the daemon configuration: letters, digits, `_`, `.` and \
                 `-`)",
            ),
            (
                &[(9, "    http: []"), (10, ""), (11, "")],
                "p.yaml:9:11: rules[0].http: an empty `http` list refuses every request (valid: \
                 omit `http` to allow every request, or list entries like `- {methods: [GET], \
                 paths: [\"/**\"]}`)",
            ),
            (
                &[(10, "      - methods: []")],
                "p.yaml:10:18: rules[0].http[0].methods: an empty method list matches nothing \
                 (valid: methods like [GET, HEAD], or [\"*\"] for any)",
            ),
            (
                &[(11, "        paths: []")],
                "p.yaml:11:16: rules[0].http[0].paths: an empty path list matches nothing (valid: \
                 path patterns like [\"/repos/acme/**\"], or [\"/**\"] for any)",
            ),
            (
                &[(10, "      - methods: [get]")],
                "p.yaml:10:19: rules[0].http[0].methods[0]: invalid method \"get\": methods are \
                 case-sensitive and upper case: did you mean GET? (valid: an upper-case method \
                 like GET or POST (letters, digits, `-`, `_`), or \"*\" for any)",
            ),
            (
                &[(10, "      - methods: [GET, \"G*\"]")],
                "p.yaml:10:24: rules[0].http[0].methods[1]: invalid method \"G*\": is not a \
                 method name (valid: an upper-case method like GET or POST (letters, digits, `-`, \
                 `_`), or \"*\" for any)",
            ),
            (
                &[(11, "        paths: [\"repos/**\"]")],
                "p.yaml:11:17: rules[0].http[0].paths[0]: invalid path pattern \"repos/**\": does \
                 not start with `/` (valid: an absolute path like /repos/acme/widgets, where `*` \
                 matches within one segment and a whole segment `**` matches any number of \
                 segments)",
            ),
            (
                &[(11, "        paths: [\"/a/**b\"]")],
                "p.yaml:11:17: rules[0].http[0].paths[0]: invalid path pattern \"/a/**b\": \
                 segment `**b` mixes `**` with other characters; `**` must be a whole segment, \
                 and `*` matches within one (valid: an absolute path like /repos/acme/widgets, \
                 where `*` matches within one segment and a whole segment `**` matches any number \
                 of segments)",
            ),
            (
                &[(11, "        paths: [\"/a?b=c\"]")],
                "p.yaml:11:17: rules[0].http[0].paths[0]: invalid path pattern \"/a?b=c\": \
                 contains '?'; patterns match the path only (the query is ignored) (valid: an \
                 absolute path like /repos/acme/widgets, where `*` matches within one segment and \
                 a whole segment `**` matches any number of segments)",
            ),
            (
                &[(11, "        paths: [\"/a/../b\"]")],
                "p.yaml:11:17: rules[0].http[0].paths[0]: invalid path pattern \"/a/../b\": \
                 contains a `..` segment; such request paths are refused (valid: an absolute path \
                 like /repos/acme/widgets, where `*` matches within one segment and a whole \
                 segment `**` matches any number of segments)",
            ),
            (
                &[(10, "      - method: [GET]")],
                "p.yaml:10:9: rules[0].http[0].method: unknown field `method`, expected `methods` \
                 or `paths`",
            ),
            (
                &[(11, "")],
                "p.yaml:10:9: rules[0].http[0]: missing field `paths`",
            ),
            (
                &[(14, "    credential: github\n    action: passthrough")],
                "p.yaml:14:17: rules[1].credential: a passthrough rule relays TLS unchanged, so \
                 it cannot inject a credential (valid: `action: proxy`, or remove `credential`)",
            ),
            (
                &[(
                    14,
                    "    http: [{methods: [GET], paths: [/]}]\n    action: passthrough",
                )],
                "p.yaml:14:11: rules[1].http: a passthrough rule relays TLS unchanged, so it \
                 cannot check requests (valid: `action: proxy`, or remove `http`)",
            ),
            (
                &[(18, "    action: allow\n    hosts: [a.example]")],
                "p.yaml:19:12: rules[2].hosts: `hosts` applies only to proxy and passthrough \
                 rules, not to `action: allow` (valid: `action: proxy` or `action: passthrough`, \
                 or remove `hosts`)",
            ),
            (
                &[(18, "    action: deny\n    credential: github")],
                "p.yaml:19:17: rules[2].credential: `credential` applies only to proxy rules, not \
                 to `action: deny` (valid: `action: proxy`, or remove `credential`)",
            ),
            (
                &[(
                    18,
                    "    http: [{methods: [GET], paths: [/]}]\n    action: allow",
                )],
                "p.yaml:18:11: rules[2].http: `http` applies only to proxy rules, not to `action: \
                 allow` (valid: `action: proxy`, or remove `http`)",
            ),
            (
                &[(20, "  - request: GET http://api.github.com/")],
                "p.yaml:20:14: tests[0].request: invalid request \"GET http://api.github.com/\": \
                 URL \"http://api.github.com/\" is not https; the proxy only sees HTTPS requests \
                 (valid: METHOD URL, like \"GET https://api.example.com/path?query\")",
            ),
            (
                &[(20, "  - request: get https://api.github.com/")],
                "p.yaml:20:14: tests[0].request: invalid request \"get https://api.github.com/\": \
                 \"get\" is not an upper-case method like GET (valid: METHOD URL, like \"GET \
                 https://api.example.com/path?query\")",
            ),
            (
                &[(20, "  - request: GET")],
                "p.yaml:20:14: tests[0].request: invalid request \"GET\": expected a method and a \
                 URL separated by a space (valid: METHOD URL, like \"GET \
                 https://api.example.com/path?query\")",
            ),
            (
                &[(20, "  - request: GET https://api.github.com/#frag")],
                "p.yaml:20:14: tests[0].request: invalid request \"GET \
                 https://api.github.com/#frag\": URL \"https://api.github.com/#frag\" has a \
                 fragment (`#`), which is never sent; remove it (valid: METHOD URL, like \"GET \
                 https://api.example.com/path?query\")",
            ),
            (
                &[(21, "    expect: audit")],
                "p.yaml:21:13: tests[0].expect: a request is allowed or denied, never `audit` \
                 (valid: allow, deny)",
            ),
            (
                &[(21, "    expect: redirect")],
                "p.yaml:21:13: tests[0].expect: a request is allowed or denied, never `redirect` \
                 (valid: allow, deny)",
            ),
            (
                &[(22, "    rule: plain")],
                "p.yaml:22:11: tests[0].rule: rule `plain` is not a proxy or passthrough rule, so \
                 it never decides a request (valid: `github-api`, `pinned`, `none`, `default`)",
            ),
            (
                &[(22, "    rule: github")],
                "p.yaml:22:11: tests[0].rule: no rule is named `github` (valid: `github-api`, \
                 `pinned`, `none`, `default`)",
            ),
            (
                &[(23, "    credential: gitlab")],
                "p.yaml:23:17: tests[0].credential: no rule injects a credential named `gitlab` \
                 (valid: `github`, omit `credential` for none)",
            ),
            (
                &[(8, ""), (23, "    credential: github")],
                "p.yaml:23:17: tests[0].credential: no rule injects a credential named `github` \
                 (valid: omit `credential` for none)",
            ),
            (
                &[(20, "  - connect: 192.0.2.10:443")],
                "p.yaml:23:17: tests[0].credential: `credential` applies only to `request:` tests \
                 (valid: remove it)",
            ),
            (
                &[(
                    20,
                    "  - connect: 192.0.2.10:443\n    request: GET https://api.github.com/",
                )],
                "p.yaml:21:14: tests[0].request: a test has one of `connect:`, `request:` and \
                 `resolve:`, not several (here: `connect`, `request`) (valid: one test per \
                 connection, request or name)",
            ),
            (
                &[(
                    20,
                    "  - request: GET https://api.github.com/\n    resolve: api.github.com",
                )],
                "p.yaml:21:14: tests[0].resolve: a test has one of `connect:`, `request:` and \
                 `resolve:`, not several (here: `request`, `resolve`) (valid: one test per \
                 connection, request or name)",
            ),
            (
                &[(20, "  - expect: deny"), (21, "")],
                "p.yaml:20:5: tests[0]: a test needs `connect:`, `request:` or `resolve:` \
                 (valid: `connect: 192.0.2.7:443`, `request: GET https://api.example.com/` or \
                 `resolve: api.example.com`)",
            ),
        ];
        let wrong: Vec<String> = cases
            .iter()
            .filter_map(|(edits, want)| {
                let got = parse_str(&proxy_with(edits), "p.yaml")
                    .map(|_| "(no error)".to_owned())
                    .unwrap_or_else(|e| e.to_string());
                (&got != want).then(|| format!("{edits:?}\n got: {got}\nwant: {want}"))
            })
            .collect();
        assert!(wrong.is_empty(), "{}", wrong.join("\n"));
    }

    #[test]
    fn empty_and_odd_documents() {
        let err = |src: &str| parse_str(src, "e.yaml").unwrap_err().to_string();
        assert_eq!(
            err(""),
            "e.yaml:1:1: the policy is empty (valid: a mapping with at least `version: 1`)"
        );
        assert_eq!(
            err("default: deny\n"),
            "e.yaml:1:1: missing field `version`"
        );
        assert_eq!(
            err("- 1\n"),
            "e.yaml:1:1: invalid type: sequence, expected struct RawPolicy"
        );
        let many: String = (0..=MAX_RULES)
            .map(|i| {
                format!(
                    "  - {{name: r{i}, to: [192.0.2.1], ports: [{}], action: allow}}\n",
                    i + 1
                )
            })
            .collect();
        assert_eq!(
            err(&format!("version: 1\nrules:\n{many}")),
            "e.yaml:3:3: rules: 256 rules, more than the 255 a policy may have (valid: at \
             most 255 rules; list several destinations or ports in one rule)"
        );
    }

    #[test]
    fn policies_over_one_mib_are_refused_whole() {
        let mut src = String::from("version: 1\ndefault: deny\nrules: []\n");
        let fits = MAX_POLICY_BYTES - src.len();
        src.push_str(&"#".repeat(fits - 1));
        src.push('\n');
        assert_eq!(src.len(), MAX_POLICY_BYTES);
        assert!(parse_str(&src, "p.yaml").is_ok());
        src.push('\n');
        let err = parse_str(&src, "p.yaml").unwrap_err();
        assert!(matches!(err, PolicyError::TooLarge { .. }));
        assert_eq!(
            err.to_string(),
            "p.yaml: the policy is 1048577 bytes; policies are limited to 1048576 bytes \
             (1 MiB): split the sandbox's rules or use wider patterns and CIDRs"
        );
    }

    #[test]
    fn io_errors_name_the_path() {
        let err = load_file(std::path::Path::new("/nonexistent/p.yaml")).unwrap_err();
        assert!(matches!(err, PolicyError::Io { .. }));
        assert!(
            err.to_string()
                .starts_with("/nonexistent/p.yaml: cannot read the policy file: "),
            "{err}"
        );
    }

    /// The proxy dials from the daemon's namespace, where loopback is the host's: a proxy
    /// or passthrough rule naming loopback is refused, in `to` and in `answers`, in every
    /// spelling; loopback under `allow`, and networks that only hold it, stay valid.
    #[test]
    fn proxied_rules_never_name_loopback() {
        let policy = |rule: &str| {
            parse_str(&format!("version: 1\nrules:\n  - {rule}\n"), "l.yaml")
                .map(|_| ())
                .map_err(|e| e.to_string())
        };
        for rule in [
            "{name: p, to: [127.0.0.1], action: proxy, hosts: [api.example.com]}",
            "{name: p, to: [127.0.0.0/8], action: proxy, hosts: [api.example.com]}",
            "{name: p, to: [127.9.9.9/32], action: passthrough, hosts: [api.example.com]}",
            "{name: p, to: [\"::1\"], action: proxy, hosts: [api.example.com]}",
            "{name: p, to: [\"::ffff:127.0.0.1\"], action: proxy, hosts: [api.example.com]}",
            "{name: p, to: [api.example.com], answers: [127.0.0.1], action: proxy}",
        ] {
            let err = policy(rule).unwrap_err();
            assert!(err.contains("is a loopback address"), "{rule}: {err}");
        }
        for rule in [
            "{name: a, to: [127.0.0.1], action: allow}",
            "{name: p, to: [0.0.0.0/0], action: proxy, hosts: [api.example.com]}",
            "{name: p, to: [192.0.2.1], action: proxy, hosts: [api.example.com]}",
        ] {
            assert_eq!(policy(rule), Ok(()), "{rule}");
        }
    }

    #[test]
    fn invalid_errors_without_a_position() {
        let err = PolicyError::Invalid {
            origin: "x.yaml".into(),
            field: "rules[0].to[0]".into(),
            message: "bad".into(),
            location: None,
        };
        assert_eq!(err.to_string(), "x.yaml: rules[0].to[0]: bad");
    }

    #[test]
    fn mapped_and_nested_normalisation() {
        let policy = parse_str(
            "version: 1
rules:
  - {name: m, to: [\"::ffff:192.0.2.7\", \"::ffff:0:0/96\", \"::/80\", 192.0.2.7], action: allow}
",
            "m.yaml",
        )
        .unwrap();
        let nets: Vec<String> = policy.rules()[0]
            .nets()
            .iter()
            .map(|n| n.to_string())
            .collect();
        // Duplicates after normalisation collapse; ::/80 contains the mapped range but
        // is not inside it, so it stays IPv6.
        assert_eq!(nets, ["192.0.2.7/32", "0.0.0.0/0", "::/80"]);
    }
}
