//! Framing, the loss record, and sending through a reconnection.

use time::macros::datetime;
use tokio::io::AsyncReadExt;

use super::*;

/// Splits octet-counted messages; returns them and whether bytes were left over.
fn unframe(mut buf: &[u8]) -> (Vec<String>, bool) {
    let mut out = Vec::new();
    while let Some(sp) = buf.iter().position(|&b| b == b' ') {
        let Some(len) = std::str::from_utf8(&buf[..sp])
            .ok()
            .and_then(|s| s.parse::<usize>().ok())
        else {
            return (out, true);
        };
        if buf.len() < sp + 1 + len {
            return (out, true);
        }
        out.push(String::from_utf8_lossy(&buf[sp + 1..sp + 1 + len]).into_owned());
        buf = &buf[sp + 1 + len..];
    }
    (out, !buf.is_empty())
}

#[test]
fn messages_are_octet_counted_rfc5424() {
    let t = datetime!(2026-11-21 22:03:04.5 UTC);
    let json = br#"{"event":{"sequence":7}}"#;
    let framed = frame(json, "host-1", t);
    let (msgs, rest) = unframe(&framed);
    assert!(!rest);
    assert_eq!(msgs.len(), 1);
    let pid = std::process::id();
    assert_eq!(
        msgs[0],
        format!(
            r#"<110>1 2026-11-21T22:03:04.500000Z host-1 egressd {pid} audit - {{"event":{{"sequence":7}}}}"#
        )
    );
}

#[test]
fn a_framed_message_gives_back_its_record() {
    let json = br#"{"event":{"sequence":7},"x":"a b c d e f g h"}"#;
    let framed = frame(json, "host-1", datetime!(2026-11-21 22:03:04.5 UTC));
    // Spaces inside the record are its own.
    assert_eq!(framed_json(&framed), json);
    let mut lost = Lost::default();
    lost.add(7);
    lost.add(9);
    assert_eq!(
        lost,
        Lost {
            count: 2,
            first: 7,
            last: 9
        }
    );
}

#[test]
fn the_loss_record_names_count_and_range() {
    let rec = lost_record(
        Lost {
            count: 3,
            first: 10,
            last: 14,
        },
        datetime!(2026-11-21 22:03:04 UTC),
    );
    let v: serde_json::Value = serde_json::from_slice(&rec).unwrap_or_default();
    assert_eq!(v["event"]["action"], "collector-lost");
    assert_eq!(v["egress"]["lost"]["count"], 3);
    assert_eq!(v["egress"]["lost"]["first_sequence"], 10);
    assert_eq!(v["egress"]["lost"]["last_sequence"], 14);
}

#[tokio::test]
async fn sends_in_order_and_again_after_the_collector_drops_the_connection() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .unwrap_or_else(|e| unreachable!("{e}"));
    let addr = listener
        .local_addr()
        .unwrap_or_else(|e| unreachable!("{e}"));
    let (tx, rx) = mpsc::channel(16);
    let task = tokio::spawn(run(addr, rx));
    for i in 1..=3u8 {
        tx.send(format!("{{\"n\":{i}}}").into_bytes())
            .await
            .unwrap_or_else(|e| unreachable!("{e}"));
    }
    let (mut conn, _) = listener
        .accept()
        .await
        .unwrap_or_else(|e| unreachable!("{e}"));
    let mut got = Vec::new();
    let mut buf = vec![0; 4096];
    while unframe(&got).0.len() < 3 {
        let n = conn.read(&mut buf).await.unwrap_or(0);
        assert!(n > 0, "connection closed early");
        got.extend_from_slice(&buf[..n]);
    }
    let (msgs, rest) = unframe(&got);
    assert!(!rest);
    assert!(
        msgs[0].ends_with(r#"{"n":1}"#) && msgs[2].ends_with(r#"{"n":3}"#),
        "{msgs:?}"
    );
    // The collector goes away; the next record arrives over a new connection.
    drop(conn);
    tokio::time::sleep(Duration::from_millis(100)).await;
    tx.send(b"{\"n\":4}".to_vec())
        .await
        .unwrap_or_else(|e| unreachable!("{e}"));
    let (mut conn, _) = tokio::time::timeout(Duration::from_secs(10), listener.accept())
        .await
        .unwrap_or_else(|_| unreachable!("no reconnection"))
        .unwrap_or_else(|e| unreachable!("{e}"));
    let mut got = Vec::new();
    while unframe(&got).0.is_empty() {
        let n = conn.read(&mut buf).await.unwrap_or(0);
        assert!(n > 0, "connection closed early");
        got.extend_from_slice(&buf[..n]);
    }
    assert!(unframe(&got).0[0].ends_with(r#"{"n":4}"#));
    drop(tx);
    let _ = tokio::time::timeout(Duration::from_secs(5), task).await;
}

#[test]
fn unacknowledged_messages_are_kept_to_send_again() {
    let mut u = Unacked::default();
    assert!(u.push(b"aaaa".to_vec(), 4).is_empty());
    assert!(u.push(b"bbbb".to_vec(), 6).is_empty());
    // 6 bytes outstanding: the last two messages cover them.
    assert_eq!(u.len(), 2);
    assert!(u.push(b"cc".to_vec(), 2).is_empty());
    assert_eq!(u.len(), 1);
    // Everything acknowledged: nothing forgotten unreceived.
    assert!(u.push(b"dd".to_vec(), 0).is_empty());
    assert_eq!(u.len(), 0);
    // Unknown: kept, up to the cap; those past it are handed back to be counted lost.
    let mut forgotten = Vec::new();
    for i in 0..(MAX_UNACKED + 5) {
        forgotten.extend(u.push(i.to_string().into_bytes(), usize::MAX));
    }
    assert_eq!(u.len(), MAX_UNACKED);
    let firsts: Vec<&[u8]> = forgotten.iter().map(Vec::as_slice).collect();
    assert_eq!(firsts, [&b"0"[..], b"1", b"2", b"3", b"4"]);
    assert_eq!(u.take().len(), MAX_UNACKED);
    assert_eq!(u.len(), 0);
}

/// A collector that accepts but never reads: after the write timeout the task
/// reconnects instead of hanging for ever, and what it wrote unacknowledged comes again.
#[tokio::test]
async fn a_collector_that_stops_reading_gets_a_new_connection() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .unwrap_or_else(|e| unreachable!("{e}"));
    let addr = listener
        .local_addr()
        .unwrap_or_else(|e| unreachable!("{e}"));
    let (tx, rx) = mpsc::channel(100_000);
    let task = tokio::spawn(run(addr, rx));
    // Enough to fill both sockets' buffers.
    let big = vec![b'x'; 64 * 1024];
    for _ in 0..200 {
        tx.send(big.clone())
            .await
            .unwrap_or_else(|e| unreachable!("{e}"));
    }
    let (stalled, _) = listener
        .accept()
        .await
        .unwrap_or_else(|e| unreachable!("{e}"));
    let again = tokio::time::timeout(WRITE_TIMEOUT + Duration::from_secs(10), listener.accept())
        .await
        .unwrap_or_else(|_| unreachable!("no new connection after the write timeout"));
    assert!(again.is_ok());
    drop(stalled);
    drop(tx);
    task.abort();
}
