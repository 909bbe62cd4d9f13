//! Running a policy's own `tests:` against its decisions. `egressctl policy test` and CI
//! print these outcomes; a policy whose tests fail should not be deployed.
use std::fmt;

use super::{
    compile::{NameTestKind, Policy},
    Verdict,
};

/// The result of one policy test.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TestOutcome {
    /// The test's `connect:` or `request:` text, or `resolve NAME`.
    pub text: String,
    pub expected: Verdict,
    /// The rule that had to decide; `None` for the default.
    pub expected_rule: Option<String>,
    pub actual: Verdict,
    /// The rule that decided; `None` for the default.
    pub actual_rule: Option<String>,
    /// Request tests: the credential that had to be injected. Always `None` for
    /// connection tests.
    pub expected_credential: Option<String>,
    /// Request tests: the credential that would be injected.
    pub actual_credential: Option<String>,
    /// Request tests: why the request got its verdict ([`RequestDecision::reason`]).
    ///
    /// [`RequestDecision::reason`]: super::RequestDecision::reason
    pub reason: Option<String>,
    /// The verdict, the deciding rule and (for requests) the credential were as expected.
    pub passed: bool,
}

impl Policy {
    /// Runs every test, in file order: connections to addresses through
    /// [`Policy::decide`], requests through [`Policy::decide_request`], `resolve:` tests
    /// through [`Policy::decide_name`] and connections to names through
    /// [`Policy::decide_name_connect`], comparing verdict, deciding rule and injected
    /// credential.
    pub fn run_tests(&self) -> Vec<TestOutcome> {
        let connects = self.tests.iter().map(|test| {
            let decision = self.decide(test.addr, test.port, test.protocol);
            let outcome = TestOutcome {
                text: test.text.clone(),
                expected: test.expect,
                expected_rule: self.rule_name(test.rule_id).map(str::to_owned),
                actual: decision.verdict,
                actual_rule: self.rule_name(decision.rule_id).map(str::to_owned),
                expected_credential: None,
                actual_credential: None,
                reason: None,
                passed: decision.verdict == test.expect && decision.rule_id == test.rule_id,
            };
            (test.index, outcome)
        });
        let requests = self.request_tests.iter().map(|test| {
            let decision = self.decide_request(&test.method, &test.url);
            let outcome = TestOutcome {
                text: test.text.clone(),
                expected: test.expect,
                expected_rule: self.rule_name(test.rule_id).map(str::to_owned),
                actual: decision.verdict,
                actual_rule: self.rule_name(decision.rule_id).map(str::to_owned),
                passed: decision.verdict == test.expect
                    && decision.rule_id == test.rule_id
                    && decision.credential == test.credential,
                expected_credential: test.credential.clone(),
                actual_credential: decision.credential,
                reason: Some(decision.reason),
            };
            (test.index, outcome)
        });
        let names = self.name_tests.iter().map(|test| {
            let decision = match test.kind {
                NameTestKind::Resolve => self.decide_name(&test.name),
                NameTestKind::Connect { port, protocol } => {
                    self.decide_name_connect(&test.name, port, protocol)
                }
            };
            let text = match test.kind {
                // A bare name would read like a connection.
                NameTestKind::Resolve => format!("resolve {}", test.text),
                NameTestKind::Connect { .. } => test.text.clone(),
            };
            let outcome = TestOutcome {
                text,
                expected: test.expect,
                expected_rule: self.rule_name(test.rule_id).map(str::to_owned),
                actual: decision.verdict,
                actual_rule: self.rule_name(decision.rule_id).map(str::to_owned),
                expected_credential: None,
                actual_credential: None,
                reason: None,
                passed: decision.verdict == test.expect && decision.rule_id == test.rule_id,
            };
            (test.index, outcome)
        });
        let mut all: Vec<(usize, TestOutcome)> = connects.chain(requests).chain(names).collect();
        all.sort_by_key(|(index, _)| *index);
        all.into_iter().map(|(_, outcome)| outcome).collect()
    }
}

/// `rule `web``, `the default`, and for a request ` with credential `github``.
struct By<'a>(&'a Option<String>, &'a Option<String>);

impl fmt::Display for By<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            Some(name) => write!(f, "rule `{name}`")?,
            None => f.write_str("the default")?,
        }
        match self.1 {
            Some(credential) => write!(f, " with credential `{credential}`"),
            None => Ok(()),
        }
    }
}

/// ` (reason)` for requests.
struct Why<'a>(&'a Option<String>);

impl fmt::Display for Why<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            Some(reason) => write!(f, " ({reason})"),
            None => Ok(()),
        }
    }
}

impl fmt::Display for TestOutcome {
    /// `ok   192.0.2.7:443/tcp: allow by rule `web``, or
    /// `FAIL 192.0.2.7:22: expected deny by the default, got allow by rule `web``; a
    /// request also shows the credential and the reason:
    /// `ok   GET https://a.example/: allow by rule `a` with credential `c` (allowed by rule a)`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.passed {
            write!(
                f,
                "ok   {}: {} by {}{}",
                self.text,
                self.actual,
                By(&self.actual_rule, &self.actual_credential),
                Why(&self.reason)
            )
        } else {
            write!(
                f,
                "FAIL {}: expected {} by {}, got {} by {}{}",
                self.text,
                self.expected,
                By(&self.expected_rule, &self.expected_credential),
                self.actual,
                By(&self.actual_rule, &self.actual_credential),
                Why(&self.reason)
            )
        }
    }
}

#[cfg(test)]
#[expect(clippy::unwrap_used, reason = "tests fail loudly")]
mod tests {
    use std::path::Path;

    use crate::policy::{load_file, parse_untested as parse_str};

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

    /// A policy whose own test fails does not load (so neither `policy check`, `attach`
    /// nor the daemon takes it): the error names the first failing test and its line.
    #[test]
    fn a_policy_whose_test_fails_does_not_load() {
        let src = "version: 1
rules:
  - {name: web, to: [192.0.2.7], ports: [443], action: allow}
  - {name: block, to: [192.0.2.0/24], action: deny}
tests:
  - {connect: 192.0.2.7:443, expect: allow, rule: web}
  - {connect: 192.0.2.8:443, expect: allow}
  - {connect: 192.0.2.9:443, expect: allow}
";
        let e = crate::policy::parse_str(src, "t.yaml")
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with(
                "t.yaml:7:5: tests[1]: the policy's own test fails, so the policy does not \
                 mean what it says: FAIL 192.0.2.8:443: expected allow by the default, got \
                 deny by rule `block` (1 more of its 3 tests fail too)"
            ),
            "{e}"
        );
        // With its tests passing it loads, and `policy test` still reads it as it is.
        let passing = src.replace("expect: allow}", "expect: deny, rule: block}");
        assert!(crate::policy::parse_str(&passing, "t.yaml").is_ok());
        assert_eq!(parse_str(src, "t.yaml").unwrap().run_tests().len(), 3);
    }

    #[test]
    fn request_outcomes_in_file_order() {
        let policy = parse_str(
            "version: 1
rules:
  - name: gh
    to: [192.0.2.10]
    ports: [443]
    action: proxy
    hosts: [api.github.com]
    credential: github
    http:
      - {methods: [GET], paths: [\"/repos/acme/**\"]}
  - {name: pinned, to: [192.0.2.20], ports: [443], action: passthrough, hosts: [pinned.example]}
tests:
  - {request: GET https://api.github.com/repos/acme/w, expect: allow, rule: gh, credential: github}
  - {connect: 192.0.2.10:443, expect: redirect, rule: gh}
  - {request: POST https://api.github.com/repos/acme/w, expect: deny, rule: gh}
  - {request: GET https://pinned.example/, expect: allow, rule: pinned}
  - {request: GET https://example.com/, expect: deny}
  - {connect: 192.0.2.10:443/udp, expect: deny}
  - {request: GET https://api.github.com/repos/acme/w, expect: allow, rule: gh}
  - {request: POST https://api.github.com/repos/acme/w, expect: deny, rule: gh, credential: github}
  - {request: GET https://pinned.example/, expect: allow, rule: gh}
  - {request: GET https://api.github.com/, expect: allow, rule: gh, credential: github}
  - {connect: 192.0.2.20:443, expect: allow, rule: pinned}
",
            "t.yaml",
        )
        .unwrap();
        let lines: Vec<String> = policy.run_tests().iter().map(|o| o.to_string()).collect();
        assert_eq!(
            lines,
            [
                "ok   GET https://api.github.com/repos/acme/w: allow by rule `gh` with \
                 credential `github` (allowed by rule gh)",
                "ok   192.0.2.10:443: redirect by rule `gh`",
                "ok   POST https://api.github.com/repos/acme/w: deny by rule `gh` (POST \
                 /repos/acme/w not allowed by rule gh (allowed: GET /repos/acme/**))",
                "ok   GET https://pinned.example/: allow by rule `pinned` (rule pinned passes \
                 TLS through unchanged; requests are not inspected)",
                "ok   GET https://example.com/: deny by the default (no proxy or passthrough \
                 rule serves example.com port 443)",
                "ok   192.0.2.10:443/udp: deny by the default",
                "FAIL GET https://api.github.com/repos/acme/w: expected allow by rule `gh`, got \
                 allow by rule `gh` with credential `github` (allowed by rule gh)",
                "FAIL POST https://api.github.com/repos/acme/w: expected deny by rule `gh` with \
                 credential `github`, got deny by rule `gh` (POST /repos/acme/w not allowed by \
                 rule gh (allowed: GET /repos/acme/**))",
                "FAIL GET https://pinned.example/: expected allow by rule `gh`, got allow by \
                 rule `pinned` (rule pinned passes TLS through unchanged; requests are not \
                 inspected)",
                "FAIL GET https://api.github.com/: expected allow by rule `gh` with credential \
                 `github`, got deny by rule `gh` (GET / not allowed by rule gh (allowed: GET \
                 /repos/acme/**))",
                "FAIL 192.0.2.20:443: expected allow by rule `pinned`, got redirect by rule \
                 `pinned`",
            ]
        );
        assert_eq!(policy.tests().len(), 3);
        assert_eq!(policy.request_tests().len(), 8);
        let t = &policy.request_tests()[0];
        assert_eq!(
            (t.method(), t.url(), t.rule_id(), t.credential()),
            (
                "GET",
                "https://api.github.com/repos/acme/w",
                1,
                Some("github")
            )
        );
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
        for required in [
            "demo.yaml",
            "audit-only.yaml",
            "deny-all.yaml",
            "github-proxy.yaml",
            "names.yaml",
            "aws-s3.yaml",
        ] {
            assert!(seen.iter().any(|s| s == required), "{required} missing");
        }
    }

    /// The examples in policies/README.md, and the policies in the project's README, load
    /// and pass their tests too.
    #[test]
    fn readme_examples_pass_their_tests() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        let policies = std::fs::read_to_string(root.join("policies/README.md")).unwrap();
        let project = std::fs::read_to_string(root.join("README.md")).unwrap();
        fn yaml_blocks(text: &str) -> impl Iterator<Item = &str> {
            text.split("```yaml\n")
                .skip(1)
                .filter_map(|b| b.split_once("```").map(|(yaml, _)| yaml))
        }
        let mut blocks: Vec<&str> = yaml_blocks(&policies).collect();
        assert!(blocks.len() >= 2);
        // The project's README also shows daemon configuration.
        let shown: Vec<&str> = yaml_blocks(&project)
            .filter(|b| b.starts_with("version: 1"))
            .collect();
        assert!(!shown.is_empty());
        // The one it says is `policies/names.yaml`, shortened, has that file's rules.
        let names = std::fs::read_to_string(root.join("policies/names.yaml")).unwrap();
        let names = parse_str(&names, "names.yaml").unwrap();
        let excerpt = parse_str(shown[0], "README.md").unwrap();
        assert_eq!(format!("{:?}", excerpt.rules), format!("{:?}", names.rules));
        blocks.extend(shown);
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
