//! The fuzz targets: one function per parser that reads bytes from a sandbox, an upstream
//! or an operator, each checking properties of what the daemon's own code made of them.
//! A broken property is a panic, which libFuzzer reports as a crash.
//!
//! The binaries in `fuzz_targets/` hand libFuzzer's input to these functions (`cargo xtask
//! fuzz`); the tests below replay every committed corpus file and crash regression
//! through them on every `cargo test`.
//!
//! | target        | input                                                              |
//! |---------------|--------------------------------------------------------------------|
//! | `dns`         | 2-byte length, a sandbox's DNS query, then an upstream's answer    |
//! | `git_push`    | mode byte, cut byte, a `git-receive-pack` request body              |
//! | `http_target` | method byte, rule byte, a request target (path and query)          |
//! | `tls_hello`   | count byte, that many read sizes, the bytes a client sends         |
//! | `policy_yaml` | a policy file                                                      |
//! | `control`     | one control-socket request line                                    |
use std::{
    net::IpAddr,
    sync::{Arc, OnceLock},
};

use egress::{
    control::{decode_request, Response},
    fuzzing::{self, DnsRun},
    policy::{
        git::{GitRule, RawGitRule},
        normalize_target, parse_str, Policy, Protocol,
    },
    proxy::git::{status_report, MAX_PKT_LEN},
};
use hickory_proto::{
    op::{Message, MessageType},
    rr::RData,
};

/// A fuzz target: takes libFuzzer's input, panics when a property breaks.
pub type Target = fn(&[u8]);

/// Every target, by the name of its binary and corpus directory.
pub const TARGETS: &[(&str, Target)] = &[
    ("dns", dns),
    ("git_push", git_push),
    ("http_target", http_target),
    ("tls_hello", tls_hello),
    ("policy_yaml", policy_yaml),
    ("control", control),
];

/// Names the `dns` target's stand-in policy lets resolve.
fn dns_allowed(name: &str) -> bool {
    name == "example.com" || name.ends_with(".example.com") || name.ends_with(".example.net")
}

/// DNS: a query from a sandbox and an answer from upstream.
///
/// Properties: every reply parses, is a response and carries the client's id; the name
/// the policy sees is lower case, without trailing dot, and only letters, digits, `-`,
/// `_` and dots; the upstream query is the question alone (lower case, RD only, no EDNS
/// options); a UDP answer fits the client's limit, and holds only addresses that were
/// installed.
pub fn dns(data: &[u8]) {
    let Some((len, rest)) = data.split_first_chunk::<2>() else {
        return;
    };
    let split = usize::from(u16::from_be_bytes(*len)).min(rest.len());
    let (query, upstream) = rest.split_at(split);
    match fuzzing::dns_exchange(query, upstream, dns_allowed) {
        DnsRun::Rejected { reply } => {
            if let Some(reply) = reply {
                check_reply(&reply, &query[..2], usize::from(u16::MAX));
            }
        }
        DnsRun::Accepted(acc) => {
            let id = acc.id.to_be_bytes();
            assert_eq!(&query[..2], &id, "the question's id is the client's");
            assert!(
                acc.name == "."
                    || (!acc.name.ends_with('.')
                        && acc.name.len() <= 253
                        && acc.name.bytes().all(|b| b.is_ascii_lowercase()
                            || b.is_ascii_digit()
                            || matches!(b, b'-' | b'_' | b'.'))),
                "policy name {:?}",
                acc.name
            );
            assert!((512..=1232).contains(&acc.udp_limit), "{}", acc.udp_limit);
            let up = acc.upstream_query.as_ref().map(|b| Message::from_vec(b));
            let Ok(Ok(up)) = up else {
                panic_with(
                    "upstream query does not encode or parse",
                    &acc.upstream_query,
                );
            };
            assert_eq!(up.queries.len(), 1);
            let labels: Vec<String> = up.queries[0]
                .name
                .iter()
                .map(|l| String::from_utf8_lossy(l).into_owned())
                .collect();
            let asked = if labels.is_empty() {
                ".".to_owned()
            } else {
                labels.join(".")
            };
            assert_eq!(asked, acc.name, "upstream asks the policy's name");
            assert!(up.metadata.recursion_desired && !up.metadata.checking_disabled);
            assert!(up
                .edns
                .as_ref()
                .is_some_and(|e| e.options().as_ref().is_empty()));
            for reply in &acc.error_replies {
                let Some(reply) = reply else {
                    panic_with("an error reply could not be encoded", &acc.name);
                };
                check_reply(reply, &id, acc.udp_limit);
            }
            let Some(answer) = acc.answer else { return };
            if let Ok(addrs) = &answer.checked {
                for (i, (a, _)) in addrs.iter().enumerate() {
                    assert!(!addrs[..i].iter().any(|(b, _)| a == b), "address twice");
                }
            }
            if let Ok((bytes, _)) = &answer.udp {
                let m = check_reply(bytes, &id, acc.udp_limit);
                if !m.metadata.truncation {
                    only_installed(&m, &answer.installed);
                }
            }
            if let Ok((bytes, _)) = &answer.tcp {
                let m = check_reply(bytes, &id, usize::from(u16::MAX));
                only_installed(&m, &answer.installed);
            }
        }
    }
}

/// A reply to the client: it parses, within `limit` bytes, as a response with `id`.
fn check_reply(reply: &[u8], id: &[u8], limit: usize) -> Message {
    assert!(reply.len() <= limit, "{} bytes over {limit}", reply.len());
    let m = match Message::from_vec(reply) {
        Ok(m) => m,
        Err(e) => panic_with("a reply does not parse", &e.to_string()),
    };
    assert_eq!(m.metadata.message_type, MessageType::Response);
    assert_eq!(&m.metadata.id.to_be_bytes(), id, "reply id");
    m
}

fn only_installed(m: &Message, installed: &[IpAddr]) {
    for record in m.answers.iter().chain(&m.authorities).chain(&m.additionals) {
        let addr = match &record.data {
            RData::A(a) => IpAddr::V4(a.0),
            RData::AAAA(a) => IpAddr::V6(a.0),
            // Address hints are never installed: none may reach the client.
            RData::SVCB(svcb) | RData::HTTPS(hickory_proto::rr::rdata::HTTPS(svcb)) => {
                assert!(
                    !svcb.svc_params.iter().any(|(key, _)| matches!(
                        key,
                        hickory_proto::rr::rdata::svcb::SvcParamKey::Ipv4Hint
                            | hickory_proto::rr::rdata::svcb::SvcParamKey::Ipv6Hint
                    )),
                    "an address hint reached the client: {record:?}"
                );
                continue;
            }
            _ => continue,
        };
        assert!(
            installed.contains(&addr),
            "{addr} reached the client uninstalled"
        );
    }
}

/// The `git_push` target's rule: pushes to `agent/**` branches of one repository.
fn git_rule() -> &'static GitRule {
    static RULE: OnceLock<GitRule> = OnceLock::new();
    RULE.get_or_init(|| {
        let raw: Result<RawGitRule, _> = serde_json::from_str(
            r#"{"repos": ["acme/widgets"], "push": {"refs": ["refs/heads/agent/**"],
                "options": ["ci.skip", "topic=*"]}}"#,
        );
        match raw.map(|r| GitRule::compile(&r)) {
            Ok(Ok(rule)) => rule,
            _ => panic_with("the git_push rule does not compile", &()),
        }
    })
}

/// git push: the command section of a `git-receive-pack` body, plain or gzip.
///
/// Input: a mode byte (bit 0: the body is taken as gzip as it is), a cut byte, the body.
/// Properties, for plain bodies: the section ends within the body; the bytes up to its
/// end read the same; any shorter prefix needs more bytes (so reading a body in pieces
/// gives what reading it whole gives); the body gzip-compressed reads exactly as it does
/// plain. For any section read: the status report the proxy would answer is well-formed
/// pkt-lines.
pub fn git_push(data: &[u8]) {
    let [mode, cut, body @ ..] = data else {
        return;
    };
    let gzip = mode & 1 == 1;
    let read = fuzzing::git_push_commands(body, gzip);
    if !gzip {
        let mut compressed = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        let _ = std::io::Write::write_all(&mut compressed, body);
        if let Ok(compressed) = compressed.finish() {
            assert_eq!(
                fuzzing::git_push_commands(&compressed, true),
                read,
                "gzip reads differently"
            );
        }
        if let Ok(Some(list)) = &read {
            assert!(list.len <= body.len());
            assert_eq!(
                fuzzing::git_push_commands(&body[..list.len], false).as_ref(),
                Ok(&Some(list.clone()))
            );
            let cut = list.len * usize::from(*cut) / 256;
            assert_eq!(
                fuzzing::git_push_commands(&body[..cut], false),
                Ok(None),
                "a prefix of {cut} bytes of a section of {}",
                list.len
            );
        }
    }
    if let Ok(Some(list)) = &read {
        let judged = git_rule().judge_push(list);
        assert_eq!(judged.results.len(), list.commands.len());
        assert_eq!(
            judged.refused.is_some(),
            judged.results.iter().any(Result::is_err)
        );
        check_pkt_lines(&status_report(list, &judged.results));
    }
}

/// A sequence of pkt-lines: four hex digits of length (4..=65520, or 0000) and the rest.
fn check_pkt_lines(mut bytes: &[u8]) {
    assert!(!bytes.is_empty());
    while !bytes.is_empty() {
        let header = std::str::from_utf8(&bytes[..4.min(bytes.len())]).unwrap_or("");
        let len = usize::from_str_radix(header, 16);
        let Ok(len) = len else {
            panic_with("a pkt-line header is not hex", &header);
        };
        assert!(
            len == 0 || (5..=MAX_PKT_LEN).contains(&len),
            "pkt-line length {len}"
        );
        let len = len.max(4);
        assert!(len <= bytes.len(), "pkt-line runs past the end");
        bytes = &bytes[len..];
    }
}

/// The `http_target` target's policy: an API rule with path rules, a git rule, and a
/// rule with neither.
fn http_policy() -> &'static Arc<Policy> {
    static POLICY: OnceLock<Arc<Policy>> = OnceLock::new();
    POLICY.get_or_init(|| {
        let src = include_str!("http_target.yaml");
        match parse_str(src, "http_target.yaml") {
            Ok(p) => Arc::new(p),
            Err(e) => panic_with("the http_target policy does not compile", &e.to_string()),
        }
    })
}

/// HTTP request targets: what is judged is what is forwarded.
///
/// Input: a method byte, a rule byte, the target. Properties: the normal form is a fixed
/// point of normalisation and goes on the wire unchanged; the target a rule lets through
/// is the normal form it judged (on a git rule, one that normalises to itself), and
/// judging the forwarded target again allows it unchanged; a target and its normal form
/// get the same verdict.
pub fn http_target(data: &[u8]) {
    const METHODS: &[&str] = &["GET", "POST", "HEAD", "PUT", "DELETE", "get", "G T", ""];
    let [method, rule, raw @ ..] = data else {
        return;
    };
    let method = METHODS[usize::from(*method) % METHODS.len()];
    let rule_id = 1 + u16::from(*rule % 3);
    let raw = String::from_utf8_lossy(raw);
    // The proxy judges what hyper parsed as a request target; nothing else reaches it.
    if http::uri::PathAndQuery::try_from(&*raw).is_err() {
        return;
    }
    let policy = http_policy();
    let normal = normalize_target(&raw);
    if let Ok(normal) = &normal {
        assert_eq!(
            normalize_target(normal).as_ref(),
            Ok(normal),
            "not a fixed point"
        );
        assert!(normal.starts_with('/') && !normal.contains('#'));
        match http::uri::PathAndQuery::try_from(normal.as_str()) {
            Ok(pq) => assert_eq!(pq.as_str(), normal, "the wire form differs"),
            Err(e) => panic_with("the normal form cannot be sent", &e.to_string()),
        }
    }
    let Some(judged) = fuzzing::judge_target(policy, rule_id, method, &raw) else {
        panic_with("rule is not a proxy rule", &rule_id);
    };
    let Ok(forwarded) = judged else {
        if let Ok(normal) = &normal {
            let again = fuzzing::judge_target(policy, rule_id, method, normal);
            assert!(
                matches!(again, Some(Err(_))),
                "allowed in normal form, refused as sent"
            );
        }
        return;
    };
    let Ok(normal) = normal else {
        panic_with("forwarded a target without a normal form", &forwarded);
    };
    let is_git = policy
        .proxy_rule(rule_id)
        .is_some_and(|r| r.git().is_some());
    if !is_git {
        assert_eq!(
            forwarded, normal,
            "forwarded form differs from the judged one"
        );
    }
    assert_eq!(normalize_target(&forwarded).as_ref(), Ok(&forwarded));
    assert_eq!(
        fuzzing::judge_target(policy, rule_id, method, &forwarded),
        Some(Ok(forwarded.clone())),
        "the forwarded target is judged differently"
    );
}

/// TLS ClientHello: the proxy's reader, fed whole and in pieces.
///
/// Input: a count byte (0-3), that many read sizes, the client's bytes. Properties: what
/// is kept for replay is exactly the bytes read, never more than the limit; a server
/// name is a DNS name (letters, digits, `-`, `_` and dots, as rustls accepts and policies
/// match); reads of any size give the same answer.
pub fn tls_hello(data: &[u8]) {
    let Some((&count, rest)) = data.split_first() else {
        return;
    };
    let count = usize::from(count % 4).min(rest.len());
    let (sizes, stream) = rest.split_at(count);
    let sizes: Vec<usize> = sizes.iter().map(|&s| usize::from(s) + 1).collect();
    let whole = fuzzing::read_client_hello(stream, &[]);
    let pieces = fuzzing::read_client_hello(stream, &sizes);
    for read in [&whole, &pieces] {
        assert!(
            stream.starts_with(&read.buffered),
            "kept bytes are not what was read"
        );
        assert!(read.buffered.len() <= 32 * 1024);
        if let Ok(Some(name)) = &read.server_name {
            assert!(
                !name.is_empty()
                    && name
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.')),
                "server name {name:?}"
            );
        }
    }
    assert_eq!(
        whole.server_name.as_ref().ok(),
        pieces.server_name.as_ref().ok(),
        "the hello reads differently in pieces of {sizes:?}"
    );
}

/// Policy files: loading never panics, and a policy that loads compiles to kernel rules,
/// runs its own tests and answers decisions.
pub fn policy_yaml(data: &[u8]) {
    let Ok(src) = std::str::from_utf8(data) else {
        return;
    };
    let policy = match parse_str(src, "fuzz.yaml") {
        Ok(p) => Arc::new(p),
        Err(e) => {
            assert!(!e.to_string().is_empty());
            return;
        }
    };
    if let Err(e) = policy.kernel_rules() {
        panic_with("a loaded policy has no kernel rules", &e.to_string());
    }
    let _ = policy.run_tests();
    for name in ["example.com", "a.example.com", "api.github.com", "."] {
        let ids = policy.rules_for_name(name);
        assert_eq!(policy.name_allowed(name), !ids.is_empty());
        for &id in &ids {
            let _ = policy.answer_refusal(&[id], IpAddr::from([192, 0, 2, 1]));
        }
    }
    for addr in [[192, 0, 2, 1], [127, 0, 0, 1]] {
        let _ = policy.decide(IpAddr::from(addr), 443, Protocol::Tcp);
    }
    for (index, _) in policy.rules().iter().enumerate() {
        let Ok(id) = u16::try_from(index + 1) else {
            break;
        };
        if policy.proxy_rule(id).is_some() {
            for target in ["/", "/repos/acme/widgets/info/refs?service=git-upload-pack"] {
                let _ = fuzzing::judge_target(&policy, id, "GET", target);
            }
        }
    }
}

/// Control-socket requests: decoding never panics, a refusal says the request is malformed, and a
/// decoded request encodes and decodes to itself.
pub fn control(data: &[u8]) {
    match decode_request(data.to_vec()) {
        Ok(request) => {
            let encoded = serde_json::to_vec(&request).unwrap_or_default();
            match decode_request(encoded.clone()) {
                Ok(again) => assert_eq!(
                    serde_json::to_vec(&again).unwrap_or_default(),
                    encoded,
                    "a request does not survive encoding"
                ),
                Err(e) => panic_with("an encoded request does not decode", &e),
            }
        }
        Err(error) => assert!(error.starts_with("malformed request: "), "{error}"),
    }
    // What the client does with the daemon's answer.
    let _ = serde_json::from_slice::<Response>(data);
}

/// Fails the target with `what` and the value.
#[expect(
    clippy::panic,
    reason = "a fuzz target reports a broken property by panicking"
)]
fn panic_with(what: &str, value: &dyn std::fmt::Debug) -> ! {
    panic!("{what}: {value:?}")
}

#[cfg(test)]
#[expect(clippy::unwrap_used, reason = "tests fail loudly")]
mod tests;
