//! Passthrough connections: after the server-name check, the bytes (the buffered
//! ClientHello first) are relayed unchanged to the original destination. The sandbox
//! talks TLS with the real server; the proxy sees only the server name and byte counts.

use std::sync::Arc;

use tokio::net::TcpStream;
use tokio::time::Instant;

use super::error::ProxyError;
use super::io::{idle_watch, Activity, Idle, Metered, PrefixedStream};
use super::upstream::dial;
use super::{ConnInfo, Proxy};
use crate::audit::{ProxyRecord, ProxyVerdict as Verdict, RecordKind, TlsMode};

pub(super) async fn relay(
    proxy: Arc<Proxy>,
    stream: PrefixedStream<TcpStream>,
    conn: Arc<ConnInfo>,
    sni: String,
    started: Instant,
) {
    let activity = Activity::new();
    // Recorded however the relay ends, also when the daemon closes it (its task aborted
    // on a quarantine, a policy change, a detach or shutdown) before it ends by itself.
    let mut relayed = Relayed {
        record: proxy.record(
            &conn,
            TlsMode::Passthrough,
            Some(&sni),
            RecordKind::Connection,
        ),
        ended: false,
        proxy: proxy.clone(),
        activity: activity.clone(),
        started,
    };
    let mut downstream = Metered::new(stream, activity.clone());
    match dial(
        conn.original_dst,
        &conn.route,
        proxy.timeouts.connect,
        &proxy.dialer,
    )
    .await
    {
        Err(e) => {
            if matches!(e, ProxyError::UpstreamRefused { .. }) {
                relayed.record.verdict = Verdict::Deny;
            }
            relayed.record.reason = Some(e.to_string());
        }
        Ok(mut upstream) => {
            let idle = proxy.timeouts.idle;
            relayed.record.reason = tokio::select! {
                result = tokio::io::copy_bidirectional(&mut downstream, &mut upstream) => {
                    result.err().map(|e| format!("relay ended with an error: {e}"))
                }
                why = idle_watch(&activity, idle, || false) => Some(match why {
                    Idle::Quiet => format!("closed after {} s without traffic", idle.as_secs()),
                    Idle::Stalled => format!("closed: {}", why.reason(idle)),
                }),
            };
        }
    }
    relayed.ended = true;
}

/// A passthrough connection's record, sent when it is dropped: at the relay's end, or
/// when its task is aborted before that, saying the daemon closed it.
struct Relayed {
    record: ProxyRecord,
    ended: bool,
    proxy: Arc<Proxy>,
    activity: Arc<Activity>,
    started: Instant,
}

impl Drop for Relayed {
    fn drop(&mut self) {
        let mut record = self.record.clone();
        if !self.ended {
            record.reason = Some(
                "closed by the daemon before the relay ended (the sandbox was quarantined or \
                 detached, its policy replaced, or the daemon stopped)"
                    .to_owned(),
            );
        }
        record.bytes_in = self.activity.bytes_read();
        record.bytes_out = self.activity.bytes_written();
        record.duration_ms = u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX);
        (self.proxy.audit)(record);
    }
}
