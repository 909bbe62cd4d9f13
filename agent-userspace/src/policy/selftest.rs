//! Running a policy's own `tests:` against its decisions. `egressctl policy test` and CI
//! print these outcomes; a policy whose tests fail should not be deployed.
use std::fmt;

use super::{compile::Policy, Verdict};

/// The result of one policy test.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TestOutcome {
    /// The test's `connect:` text.
    pub text: String,
    pub expected: Verdict,
    /// The rule that had to decide; `None` for the default.
    pub expected_rule: Option<String>,
    pub actual: Verdict,
    /// The rule that decided; `None` for the default.
    pub actual_rule: Option<String>,
    /// Both the verdict and the deciding rule were as expected.
    pub passed: bool,
}

impl Policy {
    /// Decides every test's connection and compares verdict and deciding rule.
    pub fn run_tests(&self) -> Vec<TestOutcome> {
        self.tests
            .iter()
            .map(|test| {
                let decision = self.decide(test.addr, test.port, test.protocol);
                TestOutcome {
                    text: test.text.clone(),
                    expected: test.expect,
                    expected_rule: self.rule_name(test.rule_id).map(str::to_owned),
                    actual: decision.verdict,
                    actual_rule: self.rule_name(decision.rule_id).map(str::to_owned),
                    passed: decision.verdict == test.expect && decision.rule_id == test.rule_id,
                }
            })
            .collect()
    }
}

struct By<'a>(&'a Option<String>);

impl fmt::Display for By<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            Some(name) => write!(f, "rule `{name}`"),
            None => f.write_str("the default"),
        }
    }
}

impl fmt::Display for TestOutcome {
    /// `ok   192.0.2.7:443/tcp: allow by rule `web``, or
    /// `FAIL 192.0.2.7:22: expected deny by the default, got allow by rule `web``.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.passed {
            write!(
                f,
                "ok   {}: {} by {}",
                self.text,
                self.actual,
                By(&self.actual_rule)
            )
        } else {
            write!(
                f,
                "FAIL {}: expected {} by {}, got {} by {}",
                self.text,
                self.expected,
                By(&self.expected_rule),
                self.actual,
                By(&self.actual_rule)
            )
        }
    }
}

#[cfg(test)]
#[expect(clippy::unwrap_used, reason = "tests fail loudly")]
mod tests {
    use std::path::Path;

    use crate::policy::{load_file, parse_str};

    #[test]
    fn outcomes() {
        let policy = parse_str(
            "version: 1
default: audit
rules:
  - {name: web, to: [192.0.2.7], ports: [443], protocol: tcp, action: allow}
  - {name: block, to: [192.0.2.0/24], action: deny}
tests:
  - {connect: 192.0.2.7:443/tcp, expect: allow, rule: web}
  - {connect: \"[::ffff:192.0.2.7]:443\", expect: allow, rule: web}
  - {connect: 192.0.2.7:443/udp, expect: deny, rule: block}
  - {connect: 198.51.100.1:80, expect: audit}
  - {connect: 198.51.100.1:80, expect: audit, rule: none}
  - {connect: 198.51.100.1:80, expect: audit, rule: ~}
  - {connect: 198.51.100.1:80, expect: audit, rule: default}
  - {connect: 192.0.2.7:443, expect: allow}
  - {connect: 192.0.2.7:443, expect: allow, rule: block}
  - {connect: 192.0.2.8:443, expect: allow, rule: block}
",
            "t.yaml",
        )
        .unwrap();
        let lines: Vec<String> = policy.run_tests().iter().map(|o| o.to_string()).collect();
        assert_eq!(
            lines,
            [
                "ok   192.0.2.7:443/tcp: allow by rule `web`",
                "ok   [::ffff:192.0.2.7]:443: allow by rule `web`",
                "ok   192.0.2.7:443/udp: deny by rule `block`",
                "ok   198.51.100.1:80: audit by the default",
                "ok   198.51.100.1:80: audit by the default",
                "ok   198.51.100.1:80: audit by the default",
                "ok   198.51.100.1:80: audit by the default",
                "FAIL 192.0.2.7:443: expected allow by the default, got allow by rule `web`",
                "FAIL 192.0.2.7:443: expected allow by rule `block`, got allow by rule `web`",
                "FAIL 192.0.2.8:443: expected allow by rule `block`, got deny by rule `block`",
            ]
        );
        let outcomes = policy.run_tests();
        assert!(outcomes[..7].iter().all(|o| o.passed));
        assert!(outcomes[7..].iter().all(|o| !o.passed));
    }

    /// Every example policy loads and passes its own tests.
    #[test]
    fn example_policies_pass_their_tests() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../policies");
        let mut seen = Vec::new();
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().is_none_or(|e| e != "yaml") {
                continue;
            }
            let policy = load_file(&path).unwrap_or_else(|e| unreachable!("{e}"));
            let outcomes = policy.run_tests();
            assert!(!outcomes.is_empty(), "{} has no tests", path.display());
            for outcome in outcomes {
                assert!(outcome.passed, "{}: {outcome}", path.display());
            }
            seen.extend(path.file_name().map(|n| n.to_string_lossy().into_owned()));
        }
        for required in ["demo.yaml", "audit-only.yaml", "deny-all.yaml"] {
            assert!(seen.iter().any(|s| s == required), "{required} missing");
        }
    }

    /// The examples in policies/README.md load and pass their tests too.
    #[test]
    fn readme_examples_pass_their_tests() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../policies/README.md");
        let readme = std::fs::read_to_string(path).unwrap();
        let blocks: Vec<&str> = readme
            .split("```yaml\n")
            .skip(1)
            .filter_map(|b| b.split_once("```").map(|(yaml, _)| yaml))
            .collect();
        assert!(blocks.len() >= 2);
        for yaml in blocks {
            let policy = parse_str(yaml, "README.md").unwrap_or_else(|e| unreachable!("{e}"));
            let outcomes = policy.run_tests();
            assert!(!outcomes.is_empty());
            for outcome in outcomes {
                assert!(outcome.passed, "README.md: {outcome}");
            }
        }
    }
}
