//! Policy files: what a sandbox may connect to.
//!
//! A file goes through two stages. `raw` mirrors the YAML (unknown keys rejected, each
//! scalar parsed where its line and column are known); `compile` checks the whole and
//! builds an immutable [`Policy`], or rejects the file with one [`PolicyError`]. A
//! compiled policy answers [`Policy::decide`] (pure, the reference semantics), produces
//! the kernel's LPM-trie entries with [`Policy::kernel_rules`] (equal in effect, checked by
//! tests), and runs its own `tests:` with [`Policy::run_tests`]. The format is documented
//! in `policies/README.md`.
mod compile;
mod decide;
mod error;
mod kernel;
mod load;
pub mod raw;
mod selftest;

pub use compile::{
    compile, normalise_net, Action, DefaultAction, Policy, PolicyTest, Protocol, Rule, MAX_RULES,
    POLICY_VERSION,
};
pub use decide::{Decision, Verdict};
pub use error::{CompileError, FieldPath, Location, PolicyError, Segment};
pub use kernel::{KernelRules, KernelRulesError};
pub use load::{load_file, parse_raw, parse_str};
pub use selftest::TestOutcome;

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
            // Destinations.
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
                 IP address like 192.0.2.7 or 2001:db8::7, a CIDR like 10.0.0.0/8, or a host \
                 name like api.example.com)",
            ),
            (
                5,
                "    to: []",
                "p.yaml:5:9: rules[0].to: a rule needs at least one destination (valid: a \
                 list of IP addresses and CIDRs, like [192.0.2.7, 10.0.0.0/8])",
            ),
            (
                5,
                "    to: [192.0.2.1, api.github.com]",
                "p.yaml:5:21: rules[0].to[1]: host name `api.github.com` needs the DNS \
                 resolver, which this build does not have yet; valid here: IP addresses and \
                 CIDRs",
            ),
            (
                5,
                "    to: [\"*.example.com\"]",
                "p.yaml:5:10: rules[0].to[0]: host name `*.example.com` needs the DNS \
                 resolver, which this build does not have yet; valid here: IP addresses and \
                 CIDRs",
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
                "p.yaml:8:13: rules[0].action: action `proxy` needs the proxy, which this \
                 build does not have yet; valid here: allow, deny",
            ),
            (
                8,
                "    action: passthrough",
                "p.yaml:8:13: rules[0].action: action `passthrough` needs the proxy, which \
                 this build does not have yet; valid here: allow, deny",
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
                 `to`, `ports`, `protocol`, `action`",
            ),
            (
                2,
                "dns: {}",
                "p.yaml:2:1: dns: unknown field `dns`, expected one of `version`, `default`, \
                 `rules`, `tests`",
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
                "  - name: none",
                "p.yaml:4:11: rules[0].name: rule name `none` is reserved: tests write \
                 `rule: none` for the default (valid: letters, digits, `_`, `.` and `-`, \
                 other than `none` and `default`)",
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
                 is missing (valid: \"192.0.2.7:443\", \"192.0.2.7:53/udp\" or \
                 \"[2001:db8::1]:443/tcp\"; the protocol is tcp (the default) or udp)",
            ),
            (
                14,
                "  - connect: 192.0.2.7:443/icmp",
                "p.yaml:14:14: tests[0].connect: invalid connection \"192.0.2.7:443/icmp\": \
                 unknown protocol \"icmp\" (valid: \"192.0.2.7:443\", \"192.0.2.7:53/udp\" \
                 or \"[2001:db8::1]:443/tcp\"; the protocol is tcp (the default) or udp)",
            ),
            (
                15,
                "    expect: allowed",
                "p.yaml:15:13: tests[0].expect: unknown variant `allowed`, expected one of \
                 `allow`, `deny`, `audit`",
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
    fn io_errors_name_the_path() {
        let err = load_file(std::path::Path::new("/nonexistent/p.yaml")).unwrap_err();
        assert!(matches!(err, PolicyError::Io { .. }));
        assert!(
            err.to_string()
                .starts_with("/nonexistent/p.yaml: cannot read the policy file: "),
            "{err}"
        );
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
