//! Reading a sandbox's query: exactly one `IN` question in a standard query, with a name
//! short enough and plain enough to be a host name rather than a data channel. The result
//! is a [`Question`] to resolve, or a [`Rejected`] saying what to send back instead.
use hickory_proto::{
    op::{Edns, Message, MessageType, OpCode, Query, ResponseCode},
    rr::{DNSClass, Name, RecordType},
};

use super::MAX_NAME;

/// Size of the fixed DNS header.
const HEADER_LEN: usize = 12;
/// The UDP payload size we advertise and accept, as DNS Flag Day 2020 recommends: it
/// avoids IP fragmentation on every common path.
pub(crate) const EDNS_PAYLOAD: u16 = 1232;
/// Answers to a client without EDNS must fit the classic limit.
const CLASSIC_UDP_LIMIT: usize = 512;

/// The client's EDNS, as far as it matters to its answer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct ClientEdns {
    pub payload: u16,
    pub dnssec_ok: bool,
}

/// A query to resolve.
#[derive(Clone, Debug)]
pub(crate) struct Question {
    /// The client's message id.
    pub id: u16,
    pub recursion_desired: bool,
    pub checking_disabled: bool,
    /// The question exactly as asked (letter case included), echoed in the answer.
    pub query: Query,
    /// The name as asked, for matching the upstream's answer.
    pub qname: Name,
    /// Lower case, no trailing dot: what the policy is asked about.
    pub name: String,
    pub qtype: RecordType,
    /// `None` when the client sent no OPT record.
    pub edns: Option<ClientEdns>,
}

impl Question {
    /// Largest UDP answer this client takes.
    pub fn udp_limit(&self) -> usize {
        self.edns.map_or(CLASSIC_UDP_LIMIT, |e| {
            usize::from(e.payload.clamp(512, EDNS_PAYLOAD))
        })
    }

    /// An answer with no records and `code`; `authoritative` for names we answer for
    /// ourselves (a denied name does not exist, as far as the sandbox can tell).
    pub fn error_reply(&self, code: ResponseCode, authoritative: bool) -> Option<Vec<u8>> {
        let mut reply = Message::error_msg(self.id, OpCode::Query, code);
        reply.metadata.authoritative = authoritative;
        reply.metadata.recursion_desired = self.recursion_desired;
        reply.metadata.recursion_available = true;
        reply.metadata.checking_disabled = self.checking_disabled;
        reply.add_query(self.query.clone());
        reply.edns = self.edns.map(|e| our_edns(e.dnssec_ok));
        reply.to_vec().ok()
    }
}

impl Question {
    /// The query we send upstream, rebuilt from the question alone so that nothing the
    /// client chose beyond the name and type can carry data out: the name in lower case,
    /// a fresh random id, class `IN`, only the RD flag (no CD, AD or opcode bits from the
    /// client), and a plain OPT record with our payload size (no client options, no DO).
    pub fn upstream_request(&self) -> Message {
        let mut name = self.qname.to_lowercase();
        name.set_fqdn(true);
        let mut request = Message::query();
        request.metadata.recursion_desired = true;
        request.add_query(Query::query(name, self.qtype));
        request.edns = Some(our_edns(false));
        request
    }
}

/// The OPT record of our answers and upstream queries.
pub(crate) fn our_edns(dnssec_ok: bool) -> Edns {
    let mut edns = Edns::new();
    edns.set_max_payload(EDNS_PAYLOAD);
    edns.set_dnssec_ok(dnssec_ok);
    edns
}

/// A query that is not resolved, and what it gets instead.
#[derive(Debug)]
pub(crate) struct Rejected {
    /// The bytes to send back; `None` when nothing should be sent.
    pub reply: Option<Vec<u8>>,
    pub code: ResponseCode,
    pub reason: String,
    /// The question (normalised name, type) when it could be read.
    pub question: Option<(String, RecordType)>,
}

/// Parses and checks a query. Labels longer than `max_label` are refused.
pub(crate) fn inspect(bytes: &[u8], max_label: usize) -> Result<Question, Rejected> {
    if bytes.len() < HEADER_LEN {
        return Err(Rejected {
            reply: None,
            code: ResponseCode::FormErr,
            reason: format!(
                "malformed query: {} bytes is too short for a DNS header; dropped without an \
                 answer",
                bytes.len()
            ),
            question: None,
        });
    }
    // Answering a response could start a loop between two resolvers.
    if bytes[2] & 0x80 != 0 {
        return Err(Rejected {
            reply: None,
            code: ResponseCode::FormErr,
            reason: "malformed query: the message is a response (QR set); dropped without an \
                     answer"
                .into(),
            question: None,
        });
    }
    let message = match Message::from_vec(bytes) {
        Ok(m) => m,
        Err(e) => {
            // The parser's message may quote the query's names (punycode shown as
            // Unicode): cut on a character boundary, control characters escaped.
            let reason = crate::text::sanitize(&format!("malformed query: {e}"), 200);
            return Err(Rejected {
                reply: Some(header_only_formerr(bytes)),
                code: ResponseCode::FormErr,
                reason,
                question: None,
            });
        }
    };
    let meta = &message.metadata;
    let edns = message.edns.as_ref().map(|e| ClientEdns {
        payload: e.max_payload(),
        dnssec_ok: e.flags().dnssec_ok,
    });
    let reject = |code: ResponseCode, reason: String, query: Option<&Query>| {
        let mut reply = Message::error_msg(meta.id, meta.op_code, code);
        reply.metadata.recursion_desired = meta.recursion_desired;
        reply.metadata.recursion_available = true;
        reply.metadata.checking_disabled = meta.checking_disabled;
        if let Some(q) = query {
            reply.add_query(q.clone());
        }
        reply.edns = edns.map(|e| our_edns(e.dnssec_ok));
        Rejected {
            reply: reply.to_vec().ok(),
            code,
            reason,
            question: query.map(|q| (normalise(&q.name), q.query_type)),
        }
    };
    if meta.message_type != MessageType::Query {
        return Err(reject(
            ResponseCode::FormErr,
            "malformed query: not a query".into(),
            None,
        ));
    }
    if meta.op_code != OpCode::Query {
        return Err(reject(
            ResponseCode::NotImp,
            format!(
                "opcode {} is not served; only standard queries are",
                u8::from(meta.op_code)
            ),
            None,
        ));
    }
    let [query] = message.queries.as_slice() else {
        return Err(reject(
            ResponseCode::FormErr,
            format!(
                "malformed query: {} questions; exactly one is served",
                message.queries.len()
            ),
            None,
        ));
    };
    if query.query_class != DNSClass::IN {
        return Err(reject(
            ResponseCode::Refused,
            format!("class {} is not served; only IN is", query.query_class),
            Some(query),
        ));
    }
    if let Err(why) = check_name(&query.name, max_label) {
        return Err(reject(ResponseCode::Refused, why, Some(query)));
    }
    Ok(Question {
        id: meta.id,
        recursion_desired: meta.recursion_desired,
        checking_disabled: meta.checking_disabled,
        query: query.clone(),
        qname: query.name.clone(),
        name: normalise(&query.name),
        qtype: query.query_type,
        edns,
    })
}

/// A `FORMERR` answer to a query that could not be parsed: its id, opcode and RD flag,
/// and nothing else. `bytes` has at least a header.
fn header_only_formerr(bytes: &[u8]) -> Vec<u8> {
    let mut reply = vec![0u8; HEADER_LEN];
    reply[..2].copy_from_slice(&bytes[..2]);
    // QR, the query's opcode and RD; then RA and RCODE 1.
    reply[2] = 0x80 | (bytes[2] & 0x79);
    reply[3] = 0x80 | 0x01;
    reply
}

/// Checks a question's name: at most [`MAX_NAME`] characters, no label longer than
/// `max_label`, and only letters, digits, `-` and `_` in labels. The last rule keeps the
/// text the policy sees unambiguous: a label holding a `.` (or bytes shown escaped)
/// could otherwise look like a name it is not.
pub(crate) fn check_name(name: &Name, max_label: usize) -> Result<(), String> {
    let labels: Vec<&[u8]> = name.iter().collect();
    let text_len = labels.iter().map(|l| l.len()).sum::<usize>() + labels.len().saturating_sub(1);
    if text_len > MAX_NAME {
        return Err(format!(
            "name of {text_len} characters is longer than the {MAX_NAME} allowed"
        ));
    }
    for label in &labels {
        if label.len() > max_label {
            return Err(format!(
                "label of {} characters is longer than the {max_label} allowed (a guard \
                 against data tunnelled in names)",
                label.len()
            ));
        }
        if !label
            .iter()
            .all(|b| b.is_ascii_alphanumeric() || *b == b'-' || *b == b'_')
        {
            return Err(
                "name has a label with characters other than letters, digits, `-` and `_`".into(),
            );
        }
    }
    Ok(())
}

/// The name as the policy and the audit trail see it: lower case, no trailing dot; the
/// root is `.`. A name [`check_name`] accepts is its labels as sent, joined by dots (the
/// DNS presentation format would escape some of them, such as a leading `-`, which no
/// policy name matches); any other name is shown escaped, for the record only.
pub(crate) fn normalise(name: &Name) -> String {
    let plain = |l: &[u8]| {
        l.iter()
            .all(|b| b.is_ascii_alphanumeric() || *b == b'-' || *b == b'_')
    };
    if name.num_labels() > 0 && name.iter().all(plain) {
        let labels: Vec<String> = name
            .iter()
            .map(|l| String::from_utf8_lossy(l).to_ascii_lowercase())
            .collect();
        return labels.join(".");
    }
    if name.num_labels() == 0 {
        return ".".to_owned();
    }
    // RFC 1035's presentation escapes, decimal (`\DDD`), which is how a SIEM or `dig`
    // reads them back.
    let mut text = String::new();
    for (i, label) in name.iter().enumerate() {
        if i > 0 {
            text.push('.');
        }
        for &b in label {
            match b {
                b'.' | b'\\' => {
                    text.push('\\');
                    text.push(char::from(b));
                }
                b if b.is_ascii_graphic() => text.push(char::from(b.to_ascii_lowercase())),
                b => text.push_str(&format!("\\{b:03}")),
            }
        }
    }
    text
}

#[cfg(test)]
#[expect(clippy::unwrap_used, reason = "tests fail loudly")]
mod tests {
    use hickory_proto::rr::rdata::opt::EdnsOption;

    use super::*;

    /// A query whose OPT record has a non-root owner of IDNA labels: the parser's error
    /// shows them as Unicode, at every offset against the reason's length bound.
    #[test]
    fn a_parse_error_quoting_unicode_names_is_refused_whole() {
        let label = b"xn--1kqaaaaaaaaaaaaaaaaaaaaaaaaaa";
        for pad in 1..64u8 {
            let mut q = vec![0x12, 0x34, 0x01, 0x00, 0, 0, 0, 0, 0, 0, 0, 1];
            q.push(pad);
            q.extend(std::iter::repeat_n(b'a', usize::from(pad)));
            for _ in 0..3 {
                q.push(label.len() as u8);
                q.extend_from_slice(label);
            }
            q.extend_from_slice(&[0, 0, 41, 0x04, 0xd0, 0, 0, 0, 0, 0, 0]);
            let rejected = inspect(&q, 63).unwrap_err();
            assert_eq!(rejected.code, ResponseCode::FormErr);
            assert!(rejected.reason.len() <= 200, "{}", rejected.reason);
        }
    }

    /// A client query for `name`/`qtype` with every header bit and EDNS field a client
    /// could use to carry data set.
    fn noisy(name: &str, qtype: RecordType) -> Vec<u8> {
        let mut m = Message::query();
        m.metadata.id = 0xbeef;
        m.metadata.recursion_desired = false;
        m.metadata.checking_disabled = true;
        m.metadata.authentic_data = true;
        m.add_query(Query::query(Name::from_ascii(name).unwrap(), qtype));
        let mut edns = Edns::new();
        edns.set_max_payload(65000);
        edns.set_dnssec_ok(true);
        edns.set_version(0);
        edns.options_mut()
            .insert(EdnsOption::Unknown(65001, b"payload bytes".to_vec()));
        m.edns = Some(edns);
        m.to_vec().unwrap()
    }

    #[test]
    fn the_policy_sees_the_labels_as_sent() {
        // Found by the `dns` fuzz target: the presentation format escapes a leading `-`
        // (`x.\-ple.com`), which is not the name asked.
        for (asked, seen) in [
            ("x.-ple.com", "x.-ple.com"),
            ("-A.Example.COM", "-a.example.com"),
            ("_dmarc.example.com", "_dmarc.example.com"),
            ("a-.b", "a-.b"),
            ("", "."),
        ] {
            // From labels: the presentation-format parser refuses some of these names.
            let labels = asked
                .split('.')
                .filter(|l| !l.is_empty())
                .map(str::as_bytes);
            let mut m = Message::query();
            m.add_query(Query::query(
                Name::from_labels(labels).unwrap(),
                RecordType::A,
            ));
            let bytes = m.to_vec().unwrap();
            let q = inspect(&bytes, 63).unwrap();
            assert_eq!(q.name, seen, "{asked}");
            let up = q.upstream_request();
            assert_eq!(up.queries[0].name.to_lowercase(), q.qname.to_lowercase());
        }
        // A name refused for its characters is still shown escaped in the record.
        let odd = Name::from_labels(vec![b"a.b".to_vec(), b"c".to_vec()]).unwrap();
        assert_eq!(normalise(&odd), "a\\.b.c");
        // Bytes outside printable ASCII as decimal escapes, as RFC 1035 writes them (a
        // newline is 010, not octal 012).
        let odd = Name::from_labels(vec![&b"a\nB"[..], &b"x y\xff"[..], &b"c"[..]]).unwrap();
        assert_eq!(normalise(&odd), "a\\010b.x\\032y\\255.c");
        assert_eq!(normalise(&Name::root()), ".");
    }

    #[test]
    fn upstream_request_depends_on_the_question_only() {
        let plain = {
            let mut m = Message::query();
            m.add_query(Query::query(
                Name::from_ascii("api.example.com.").unwrap(),
                RecordType::AAAA,
            ));
            m.to_vec().unwrap()
        };
        let forms = [
            noisy("API.Example.COM.", RecordType::AAAA),
            noisy("api.example.com", RecordType::AAAA),
            plain,
        ];
        let mut wires = Vec::new();
        for bytes in &forms {
            let q = inspect(bytes, 63).unwrap();
            let up = q.upstream_request();
            assert_eq!(up.queries.len(), 1);
            assert!(up.metadata.recursion_desired);
            assert!(!up.metadata.checking_disabled && !up.metadata.authentic_data);
            let edns = up.edns.as_ref().unwrap();
            assert_eq!(edns.max_payload(), EDNS_PAYLOAD);
            assert!(!edns.flags().dnssec_ok);
            assert!(edns.options().as_ref().is_empty());
            let mut wire = up.to_vec().unwrap();
            wire[..2].copy_from_slice(&[0, 0]);
            wires.push(wire);
        }
        assert!(wires.iter().all(|w| *w == wires[0]), "{wires:02x?}");
        // Lower case on the wire, and the client's question kept for its answer.
        let q = inspect(&forms[0], 63).unwrap();
        assert_eq!(
            q.upstream_request().queries[0].name.to_ascii(),
            "api.example.com."
        );
        assert_eq!(q.query.name.to_ascii(), "API.Example.COM.");
        // A fresh random id each time, not the client's.
        let ids: std::collections::HashSet<u16> =
            (0..16).map(|_| q.upstream_request().metadata.id).collect();
        assert!(
            ids.len() > 1 && !ids.iter().all(|&id| id == 0xbeef),
            "{ids:?}"
        );
    }
}
