//! Names in rules: a `to:` name's spelling, and the `answers:` a named rule pins.

use ipnet::IpNet;

use crate::policy::{
    error::{CompileError, FieldPath},
    host::HostPattern,
    raw::{check_host_bits, RawAction, RawDest, RawRule},
};

use super::*;

/// A rule's `answers`: only beside names in `to`, addresses and CIDRs only, at least one.
pub(super) fn compile_answers(
    raw: &RawRule,
    names: &[HostPattern],
    at: &FieldPath,
) -> Result<Option<Vec<IpNet>>, CompileError> {
    let Some(list) = &raw.answers else {
        return Ok(None);
    };
    let field = at.key("answers");
    if matches!(raw.action, RawAction::Deny) {
        return Err(CompileError::new(
            field,
            "`answers` pins what a rule's names resolve to, and a deny rule's names do not \
             resolve at all (valid: remove `answers`, or put it on the rule that allows the \
             names)",
        ));
    }
    if names.is_empty() {
        return Err(CompileError::new(
            field,
            "`answers` pins what the rule's host names resolve to, and this rule's `to` has \
             none (valid: host names in `to`, or remove `answers`)",
        ));
    }
    if list.is_empty() {
        return Err(CompileError::new(
            field,
            "an empty `answers` list lets the names resolve to nothing (valid: addresses and \
             CIDRs like [192.0.2.0/24, \"2001:db8::/32\"], or remove `answers`)",
        ));
    }
    let mut nets = Vec::with_capacity(list.len());
    for (j, dest) in list.iter().enumerate() {
        let RawDest::Net(net) = dest else {
            return Err(CompileError::new(
                field.index(j),
                "`answers` lists addresses and CIDRs, not names (valid: like 192.0.2.0/24 or \
                 \"2001:db8::/32\")",
            ));
        };
        check_host_bits(*net).map_err(|m| CompileError::new(field.index(j), m))?;
        let net = normalise_net(*net);
        if !nets.contains(&net) {
            nets.push(net);
        }
    }
    Ok(Some(nets))
}

/// Longest rule name: audit records keep strings of up to 64 bytes whole when they
/// shorten a long record, so a rule is always named in full.
pub const MAX_RULE_NAME: usize = 64;

/// `rule.name`s records give the kernel's decisions that no policy rule made: a rule may
/// not take one, or its records could not be told from those.
pub const DAEMON_RULE_NAMES: [&str; 5] = [
    "dns-resolver",
    "proxy-port",
    "unspecified-address",
    "bound-device",
    "unknown",
];

pub(super) fn check_name(name: &str) -> Result<(), String> {
    const VALID: &str = "valid: letters, digits, `_`, `.` and `-`";
    if name.is_empty() {
        return Err(format!("a rule needs a non-empty name ({VALID})"));
    }
    if let Some(c) = name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-')))
    {
        return Err(format!("rule name {name:?} contains {c:?} ({VALID})"));
    }
    // ASCII from here on.
    if name.len() > MAX_RULE_NAME {
        return Err(format!(
            "rule name {:?}... is {} characters long (at most {MAX_RULE_NAME})",
            &name[..MAX_RULE_NAME],
            name.len()
        ));
    }
    if DEFAULT_RULE_WORDS.contains(&name) {
        return Err(format!(
            "rule name `{name}` is reserved: tests write `rule: {name}` for the default \
             ({VALID}, other than `none` and `default`)"
        ));
    }
    if DAEMON_RULE_NAMES
        .iter()
        .chain(&DEFAULT_RULE_WORDS)
        .any(|n| n.eq_ignore_ascii_case(name))
    {
        return Err(format!(
            "rule name `{name}` is reserved: records name the default rule and the \
             daemon's own decisions so ({VALID}, other than {} in any case)",
            DEFAULT_RULE_WORDS
                .iter()
                .chain(&DAEMON_RULE_NAMES)
                .map(|n| format!("`{n}`"))
                .collect::<Vec<_>>()
                .join(", ")
        ));
    }
    Ok(())
}
