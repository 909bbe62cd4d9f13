//! Checking an upstream answer against the policy, and turning it into the sandbox's
//! answer.
//!
//! A CNAME hands the client a new name to connect to, so every CNAME in the answer must
//! join two names the policy allows, or the whole answer is withheld. The addresses the
//! kernel learns are only those of the A/AAAA records on the chain from the question's
//! name; other records in the answer pass through to the client but open nothing.
use std::net::IpAddr;

use hickory_proto::{
    op::{Message, MessageType, ResponseCode},
    rr::{rdata::svcb::SvcParamKey, Name, RData},
    ProtoError,
};

use super::query::{check_name, normalise, our_edns, Question};

/// Longest label a name in an answer may have (RFC 1035; the exfiltration guard applies
/// to questions only, and CDNs do use long labels in CNAME targets).
const MAX_LABEL: usize = 63;

/// The addresses (with TTLs, each address once) an answer gives `qname`, or why the
/// answer must not reach the client. `crossing` says why a name a CNAME leads to may not
/// lend its addresses to the name asked, if so: the addresses are learned with the
/// asked name's rules, so a target served through the proxy would have its traffic let
/// straight out by an `allow` rule of the asked name.
pub(crate) fn check(
    response: &Message,
    qname: &Name,
    allowed: impl Fn(&str) -> bool,
    crossing: impl Fn(&str) -> Option<String>,
) -> Result<Vec<(IpAddr, u32)>, String> {
    let mut cnames: Vec<(&Name, &Name)> = Vec::new();
    for record in &response.answers {
        if let RData::CNAME(target) = &record.data {
            let (owner, target) = (&record.name, &target.0);
            let ok = |n: &Name| check_name(n, MAX_LABEL).is_ok() && allowed(&normalise(n));
            if !ok(owner) || !ok(target) {
                return Err(format!(
                    "the answer's CNAME {} -> {} involves a name the policy does not allow",
                    normalise(owner),
                    normalise(target)
                ));
            }
            for name in [owner, target] {
                if let Some(why) = crossing(&normalise(name)) {
                    return Err(format!(
                        "the answer's CNAME {} -> {} leads to a name served through the \
                         proxy, whose addresses the name asked would let straight out: {why}",
                        normalise(owner),
                        normalise(target)
                    ));
                }
            }
            cnames.push((owner, target));
        }
    }
    if response.metadata.response_code != ResponseCode::NoError {
        return Ok(Vec::new());
    }
    // Follow the chain from the question; each step adds a name, so it ends.
    let mut chain: Vec<&Name> = vec![qname];
    while let Some(&(_, target)) = chain
        .last()
        .and_then(|last| cnames.iter().find(|(owner, _)| owner == last))
    {
        if chain.contains(&target) {
            break;
        }
        chain.push(target);
    }
    let mut addrs: Vec<(IpAddr, u32)> = Vec::new();
    for record in &response.answers {
        let addr = match &record.data {
            RData::A(a) => IpAddr::V4(a.0),
            RData::AAAA(a) => IpAddr::V6(a.0),
            _ => continue,
        };
        if chain.contains(&&record.name) && !addrs.iter().any(|(a, _)| *a == addr) {
            addrs.push((addr, record.ttl));
        }
    }
    Ok(addrs)
}

/// Removes from every section of `response` the A and AAAA records whose address is not
/// in `installed`, so the sandbox is handed only addresses the kernel already knows, and
/// the address hints of SVCB and HTTPS records (`ipv4hint`, `ipv6hint`), which nothing
/// installs (a client that would connect to a hint resolves the name's A/AAAA instead).
/// Returns the addresses removed, each once.
pub(crate) fn keep_only(response: &mut Message, installed: &[IpAddr]) -> Vec<IpAddr> {
    for record in response
        .answers
        .iter_mut()
        .chain(response.authorities.iter_mut())
        .chain(response.additionals.iter_mut())
    {
        let svcb = match &mut record.data {
            RData::SVCB(svcb) => svcb,
            RData::HTTPS(https) => &mut https.0,
            _ => continue,
        };
        svcb.svc_params
            .retain(|(key, _)| !matches!(key, SvcParamKey::Ipv4Hint | SvcParamKey::Ipv6Hint));
    }
    let mut removed: Vec<IpAddr> = Vec::new();
    let mut keep = |record: &hickory_proto::rr::Record| {
        let addr = match &record.data {
            RData::A(a) => IpAddr::V4(a.0),
            RData::AAAA(a) => IpAddr::V6(a.0),
            _ => return true,
        };
        if installed.contains(&addr) {
            return true;
        }
        if !removed.contains(&addr) {
            removed.push(addr);
        }
        false
    };
    response.answers.retain(&mut keep);
    response.authorities.retain(&mut keep);
    response.additionals.retain(&mut keep);
    removed
}

/// Caps every record's TTL at `max`, what the kernel keeps a learned address for: a
/// client caching an answer longer would be refused its address once it expires.
pub(crate) fn cap_ttls(response: &mut Message, max: u32) {
    for record in response
        .answers
        .iter_mut()
        .chain(response.authorities.iter_mut())
        .chain(response.additionals.iter_mut())
    {
        record.ttl = record.ttl.min(max);
    }
}

/// The sandbox's answer: the upstream answer under the client's id and question, with
/// our EDNS if the client sent one (its own, if any, says nothing about our link to the
/// client). If it does not fit in `limit` bytes it is sent truncated (TC set, no records),
/// so the client asks again over TCP. Also returns the response code sent.
pub(crate) fn encode(
    mut response: Message,
    question: &Question,
    limit: usize,
) -> Result<(Vec<u8>, ResponseCode), ProtoError> {
    response.metadata.id = question.id;
    response.metadata.message_type = MessageType::Response;
    response.metadata.recursion_desired = question.recursion_desired;
    response.queries = vec![question.query.clone()];
    response.signature = None;
    response.edns = question.edns.map(|e| our_edns(e.dnssec_ok));
    // An extended code cannot be sent without EDNS; it concerned our query anyway.
    if response.edns.is_none() && response.metadata.response_code.high() > 0 {
        response.metadata.response_code = ResponseCode::ServFail;
    }
    let code = response.metadata.response_code;
    let bytes = response.to_vec()?;
    if bytes.len() <= limit {
        return Ok((bytes, code));
    }
    let mut truncated = Message::response(question.id, response.metadata.op_code);
    truncated.metadata = response.metadata;
    truncated.metadata.truncation = true;
    truncated.add_query(question.query.clone());
    truncated.edns = response.edns;
    Ok((truncated.to_vec()?, code))
}

#[cfg(test)]
#[expect(clippy::unwrap_used, reason = "tests fail loudly")]
mod tests {
    use hickory_proto::rr::{rdata::A, Name, Record};

    use super::*;

    #[test]
    fn only_installed_addresses_and_no_address_hints_reach_the_client() {
        use hickory_proto::rr::rdata::{
            svcb::{IpHint, SvcParamValue, SVCB},
            HTTPS,
        };
        let name = Name::from_ascii("api.example.").unwrap();
        let mut m = Message::query();
        for last in [1, 2] {
            m.add_answer(Record::from_rdata(
                name.clone(),
                300,
                RData::A(A([192, 0, 2, last].into())),
            ));
        }
        let hinted = SVCB::new(
            1,
            Name::root(),
            vec![
                (
                    SvcParamKey::Ipv4Hint,
                    SvcParamValue::Ipv4Hint(IpHint(vec![A([203, 0, 113, 66].into())])),
                ),
                (SvcParamKey::Port, SvcParamValue::Port(8443)),
            ],
        );
        m.add_answer(Record::from_rdata(
            name.clone(),
            300,
            RData::HTTPS(HTTPS(hinted.clone())),
        ));
        m.add_additional(Record::from_rdata(name, 300, RData::SVCB(hinted)));
        let removed = keep_only(&mut m, &[IpAddr::from([192, 0, 2, 1])]);
        assert_eq!(removed, [IpAddr::from([192, 0, 2, 2])]);
        for record in m.answers.iter().chain(m.additionals.iter()) {
            let params = match &record.data {
                RData::HTTPS(h) => &h.0.svc_params,
                RData::SVCB(s) => &s.svc_params,
                _ => continue,
            };
            let keys: Vec<_> = params.iter().map(|(k, _)| *k).collect();
            assert_eq!(keys, [SvcParamKey::Port], "{record:?}");
        }
        assert_eq!(m.answers.len(), 2);
        assert_eq!(m.additionals.len(), 1);
    }

    #[test]
    fn ttls_are_capped_at_what_the_kernel_keeps() {
        let name = Name::from_ascii("api.example.").unwrap();
        let mut m = Message::query();
        m.add_answer(Record::from_rdata(
            name.clone(),
            86_400,
            RData::A(A([192, 0, 2, 1].into())),
        ));
        m.add_answer(Record::from_rdata(
            name,
            30,
            RData::A(A([192, 0, 2, 2].into())),
        ));
        cap_ttls(&mut m, 3600);
        let ttls: Vec<u32> = m.answers.iter().map(|r| r.ttl).collect();
        assert_eq!(ttls, [3600, 30]);
    }
}
