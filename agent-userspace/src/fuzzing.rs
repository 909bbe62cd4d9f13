//! Entry points for the fuzz targets (`fuzz/`) and their corpus replay tests.
//!
//! Each function hands bytes from outside (a sandbox's DNS query and an upstream's answer,
//! a push body, a request target, a ClientHello, a policy, a control request) to exactly
//! the functions the daemon runs on them, without sockets, and returns what they
//! produced so that the targets can check properties of it. The daemon never calls
//! anything here.
use std::{
    future::Future,
    io,
    net::IpAddr,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll, Waker},
};

use hickory_proto::op::{Message, ResponseCode};
use tokio::io::{AsyncRead, ReadBuf};

use crate::{
    dns::{answer, query},
    policy::{git::CommandList, Policy},
    proxy::git::Encoding,
};

/// What the resolver made of one query and, when it was resolved, one upstream answer.
#[derive(Debug)]
pub enum DnsRun {
    /// The query was refused before any upstream was asked; `reply` is what the client
    /// gets (`None`: nothing).
    Rejected { reply: Option<Vec<u8>> },
    /// The query was accepted.
    Accepted(Box<DnsAccepted>),
}

/// An accepted query, what went upstream, and what came back.
#[derive(Debug)]
pub struct DnsAccepted {
    /// The client's id.
    pub id: u16,
    /// The name the policy is asked about.
    pub name: String,
    /// Largest UDP answer the client takes.
    pub udp_limit: usize,
    /// The bytes sent upstream.
    pub upstream_query: Result<Vec<u8>, String>,
    /// The `NXDOMAIN`, `REFUSED` and `SERVFAIL` answers the client would get instead.
    pub error_replies: Vec<Option<Vec<u8>>>,
    /// The answer path, when the upstream bytes are a DNS message.
    pub answer: Option<DnsAnswer>,
}

/// The answer path for one upstream message.
#[derive(Debug)]
pub struct DnsAnswer {
    /// [`answer::check`]: the addresses the answer gives the name, or why it is withheld.
    pub checked: Result<Vec<(IpAddr, u32)>, String>,
    /// The addresses treated as installed in the kernel (every other one of `checked`).
    pub installed: Vec<IpAddr>,
    /// The answer over UDP and over TCP, as sent to the client.
    pub udp: Result<(Vec<u8>, ResponseCode), String>,
    pub tcp: Result<(Vec<u8>, ResponseCode), String>,
}

/// Runs a sandbox's `query` through the resolver's parsing, and `upstream` (as the
/// upstream's answer to it) through the answer checks and encoding; `allowed` stands for
/// the policy's [`Policy::name_allowed`].
pub fn dns_exchange(query: &[u8], upstream: &[u8], allowed: impl Fn(&str) -> bool) -> DnsRun {
    let question = match query::inspect(query, crate::dns::DEFAULT_MAX_LABEL) {
        Ok(q) => q,
        Err(rejected) => {
            return DnsRun::Rejected {
                reply: rejected.reply,
            }
        }
    };
    let upstream_query = question
        .upstream_request()
        .to_vec()
        .map_err(|e| e.to_string());
    let error_replies = [
        (ResponseCode::NXDomain, true),
        (ResponseCode::Refused, false),
        (ResponseCode::ServFail, false),
    ]
    .into_iter()
    .map(|(code, authoritative)| question.error_reply(code, authoritative))
    .collect();
    let answer = Message::from_vec(upstream).ok().map(|response| {
        let checked = answer::check(&response, &question.qname, &allowed, |_| None);
        let installed: Vec<IpAddr> = checked
            .as_ref()
            .map(|addrs| addrs.iter().step_by(2).map(|(a, _)| *a).collect())
            .unwrap_or_default();
        let mut kept = response;
        answer::keep_only(&mut kept, &installed);
        let encode =
            |limit| answer::encode(kept.clone(), &question, limit).map_err(|e| e.to_string());
        DnsAnswer {
            udp: encode(question.udp_limit()),
            tcp: encode(usize::from(u16::MAX)),
            checked,
            installed,
        }
    });
    DnsRun::Accepted(Box::new(DnsAccepted {
        id: question.id,
        name: question.name.clone(),
        udp_limit: question.udp_limit(),
        upstream_query,
        error_replies,
        answer,
    }))
}

/// The proxy's reading of a push's command section from a whole body (`gzip`: the body
/// has `Content-Encoding: gzip`). `Ok(None)`: the section is not complete.
pub fn git_push_commands(raw: &[u8], gzip: bool) -> Result<Option<CommandList>, String> {
    let encoding = if gzip {
        Encoding::Gzip
    } else {
        Encoding::Identity
    };
    crate::proxy::git::try_parse(raw, encoding, true)
}

/// The request target forwarded for `method` and `raw` (path and query as the client
/// sent them) on proxy rule `rule_id` of `policy`, judged as the daemon judges it; `Err`
/// says why it is refused. `None` when `rule_id` is not a proxy rule.
pub fn judge_target(
    policy: &Arc<Policy>,
    rule_id: u16,
    method: &str,
    raw: &str,
) -> Option<Result<String, String>> {
    let route = crate::daemon::proxy::route_for(policy, rule_id)?;
    Some(
        crate::proxy::target::judge_target(&route, method, raw)
            .map(|judged| judged.target)
            .map_err(|refusal| match refusal {
                crate::proxy::target::TargetRefusal::Ambiguous(why) => why,
                crate::proxy::target::TargetRefusal::Denied { reason, .. } => reason,
            }),
    )
}

/// A ClientHello read as the proxy reads it.
#[derive(Debug)]
pub struct HelloRead {
    /// The server name, or why there is no hello (the error's text).
    pub server_name: Result<Option<String>, String>,
    /// Every byte read from the client, to be replayed.
    pub buffered: Vec<u8>,
}

/// Reads a ClientHello from `bytes`, delivered in reads of the sizes in `chunks` (cycled;
/// an empty list or a zero means 4096), then end of stream.
pub fn read_client_hello(bytes: &[u8], chunks: &[usize]) -> HelloRead {
    let mut reader = ChunkedReader {
        data: bytes,
        chunks,
        next: 0,
        read: 0,
    };
    let result = {
        let mut future = std::pin::pin!(crate::proxy::hello::read_client_hello(&mut reader));
        // The reader never waits, so the future is done after one poll.
        match future
            .as_mut()
            .poll(&mut Context::from_waker(Waker::noop()))
        {
            Poll::Ready(r) => r,
            Poll::Pending => Err(crate::proxy::hello::HelloError::Io(io::Error::other(
                "the hello reader waited on a reader that never waits",
            ))),
        }
    };
    match result {
        Ok(hello) => HelloRead {
            server_name: Ok(hello.server_name),
            buffered: hello.buffered,
        },
        Err(e) => HelloRead {
            server_name: Err(e.to_string()),
            buffered: bytes[..reader.read].to_vec(),
        },
    }
}

/// Hands out `data` in reads of the given sizes.
struct ChunkedReader<'a> {
    data: &'a [u8],
    chunks: &'a [usize],
    next: usize,
    read: usize,
}

impl AsyncRead for ChunkedReader<'_> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let size = match self.chunks.get(self.next % self.chunks.len().max(1)) {
            Some(&n) if n > 0 => n,
            _ => 4096,
        };
        self.next += 1;
        let start = self.read;
        let n = size.min(buf.remaining()).min(self.data.len() - start);
        buf.put_slice(&self.data[start..start + n]);
        self.read += n;
        Poll::Ready(Ok(()))
    }
}
