//! Passthrough connections: after the server-name check, the bytes (the buffered
//! ClientHello first) are relayed unchanged to the original destination. The sandbox
//! talks TLS with the real server; the proxy sees only the server name and byte counts.

use std::sync::Arc;

use tokio::net::TcpStream;
use tokio::time::Instant;

use super::error::ProxyError;
use super::io::{idle_watch, Activity, Metered, PrefixedStream};
use super::upstream::dial;
use super::{ConnInfo, Proxy};
use crate::audit::{ProxyVerdict as Verdict, RecordKind, TlsMode};

pub(super) async fn relay(
    proxy: Arc<Proxy>,
    stream: PrefixedStream<TcpStream>,
    conn: Arc<ConnInfo>,
    sni: String,
    started: Instant,
) {
    let mut record = proxy.record(
        &conn,
        TlsMode::Passthrough,
        Some(&sni),
        RecordKind::Connection,
    );
    let activity = Activity::new();
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
                record.verdict = Verdict::Deny;
            }
            record.reason = Some(e.to_string());
        }
        Ok(mut upstream) => {
            let idle = proxy.timeouts.idle;
            record.reason = tokio::select! {
                result = tokio::io::copy_bidirectional(&mut downstream, &mut upstream) => {
                    result.err().map(|e| format!("relay ended with an error: {e}"))
                }
                () = idle_watch(&activity, idle, || false) => {
                    Some(format!("closed after {} s without traffic", idle.as_secs()))
                }
            };
        }
    }
    record.bytes_in = activity.bytes_read();
    record.bytes_out = activity.bytes_written();
    record.duration_ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
    (proxy.audit)(record);
}
