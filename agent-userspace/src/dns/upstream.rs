//! Asking the upstream resolvers. Each query goes out rebuilt canonically
//! ([`Question::upstream_request`]): the name in lower case, a fresh random id, only the
//! RD flag, our own plain OPT record; nothing else the client put in its message (letter
//! case, id, flags, EDNS options) is passed on. It leaves from a new UDP socket (a random
//! source port) in the dialer's namespace.
//! A reply counts only if it comes from the server asked, carries our id and repeats our
//! question; a truncated one is asked again over TCP.
use std::{io, net::SocketAddr, time::Duration};

use hickory_proto::op::{Message, MessageType, Query};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tracing::debug;

use super::query::Question;
use crate::net::Dialer;

/// Largest UDP reply we read; bigger than the [`EDNS_PAYLOAD`](super::query::EDNS_PAYLOAD)
/// we advertise, for servers that ignore it.
const UDP_BUFFER: usize = 4096;

/// An answer and who gave it.
#[derive(Debug)]
pub(super) struct Exchanged {
    pub response: Message,
    pub server: SocketAddr,
}

/// Why no upstream answered, and the last server tried.
#[derive(Debug)]
pub(super) struct Failure {
    pub reason: String,
    pub server: Option<SocketAddr>,
}

/// Asks `upstreams` in order until one answers; each gets `timeout` per transport.
pub(super) async fn exchange(
    dialer: &Dialer,
    upstreams: &[SocketAddr],
    timeout: Duration,
    question: &Question,
    quarantined: &std::sync::atomic::AtomicBool,
) -> Result<Exchanged, Failure> {
    let mut last = Failure {
        reason: "no upstream resolver is configured (the policy has no `dns.upstream` and \
                 the daemon no default)"
            .into(),
        server: None,
    };
    for (i, &server) in upstreams.iter().enumerate() {
        // A sandbox quarantined while its query waited on a server asks no other.
        if i > 0 && quarantined.load(std::sync::atomic::Ordering::Acquire) {
            return Err(Failure {
                reason: format!(
                    "{} (the sandbox was quarantined meanwhile: no other server was asked)",
                    last.reason
                ),
                ..last
            });
        }
        match ask(dialer, server, timeout, question).await {
            Ok(response) => return Ok(Exchanged { response, server }),
            Err(reason) => {
                debug!(%server, %reason, "Upstream resolver failed");
                let reason = if i == 0 {
                    reason
                } else {
                    format!("{} upstream servers failed; the last: {reason}", i + 1)
                };
                last = Failure {
                    reason,
                    server: Some(server),
                };
            }
        }
    }
    Err(last)
}

/// One server: UDP, then TCP if the UDP answer was truncated.
async fn ask(
    dialer: &Dialer,
    server: SocketAddr,
    timeout: Duration,
    question: &Question,
) -> Result<Message, String> {
    let request = question.upstream_request();
    let bytes = request
        .to_vec()
        .map_err(|e| format!("the agent could not encode the upstream query: {e}"))?;
    let outcome = |what: &str, r: Result<io::Result<Message>, tokio::time::error::Elapsed>| match r
    {
        Ok(Ok(m)) => Ok(m),
        Ok(Err(e)) => Err(format!("upstream server {server} ({what}): {e}")),
        Err(_) => Err(format!(
            "upstream server {server} ({what}): no answer within {} ms",
            timeout.as_millis()
        )),
    };
    let response = outcome(
        "udp",
        tokio::time::timeout(timeout, udp(dialer, server, &bytes, &request)).await,
    )?;
    if !response.metadata.truncation {
        return Ok(response);
    }
    outcome(
        "tcp",
        tokio::time::timeout(timeout, tcp(dialer, server, &bytes, &request)).await,
    )
}

async fn udp(
    dialer: &Dialer,
    server: SocketAddr,
    bytes: &[u8],
    request: &Message,
) -> io::Result<Message> {
    let socket = dialer.udp_socket(server.is_ipv6()).await?;
    // Connected: the kernel drops datagrams from anyone but `server`.
    socket.connect(server).await?;
    socket.send(bytes).await?;
    let mut buf = vec![0u8; UDP_BUFFER];
    loop {
        let len = socket.recv(&mut buf).await?;
        match Message::from_vec(&buf[..len]) {
            Ok(m) if answers(&m, request) => return Ok(m),
            // A stray or forged datagram: keep waiting for the real answer.
            _ => debug!(%server, len, "Ignored a datagram that does not answer our query"),
        }
    }
}

async fn tcp(
    dialer: &Dialer,
    server: SocketAddr,
    bytes: &[u8],
    request: &Message,
) -> io::Result<Message> {
    let mut stream = dialer.connect(server).await?;
    let len = u16::try_from(bytes.len()).map_err(|_| io::Error::other("query too long"))?;
    let mut framed = Vec::with_capacity(bytes.len() + 2);
    framed.extend_from_slice(&len.to_be_bytes());
    framed.extend_from_slice(bytes);
    stream.write_all(&framed).await?;
    let mut len = [0u8; 2];
    stream.read_exact(&mut len).await?;
    let mut buf = vec![0u8; usize::from(u16::from_be_bytes(len))];
    stream.read_exact(&mut buf).await?;
    let message =
        Message::from_vec(&buf).map_err(|e| io::Error::other(format!("malformed answer: {e}")))?;
    if answers(&message, request) {
        Ok(message)
    } else {
        Err(io::Error::other(
            "the answer does not match the query (id or question differs)",
        ))
    }
}

/// Whether `m` is the answer to `request`: a response with its id and question.
fn answers(m: &Message, request: &Message) -> bool {
    m.metadata.message_type == MessageType::Response
        && m.metadata.id == request.metadata.id
        && same_question(&m.queries, &request.queries)
}

fn same_question(got: &[Query], asked: &[Query]) -> bool {
    match (got, asked) {
        ([g], [a]) => {
            // Name comparison ignores ASCII case, as resolvers may change it.
            g.name == a.name && g.query_type == a.query_type && g.query_class == a.query_class
        }
        _ => false,
    }
}
