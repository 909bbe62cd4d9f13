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
    lost.add(3);
    let mut more = Lost::default();
    more.add(12);
    lost.merge(more);
    lost.merge(Lost::default());
    assert_eq!(
        lost,
        Lost {
            count: 4,
            first: 3,
            last: 12
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
    u.push(b"aaaa".to_vec(), 4);
    u.push(b"bbbb".to_vec(), 6);
    // 6 bytes outstanding: the last two messages cover them.
    assert_eq!(u.len(), 2);
    u.push(b"cc".to_vec(), 2);
    assert_eq!(u.len(), 1);
    // Everything acknowledged.
    u.push(b"dd".to_vec(), 0);
    assert_eq!(u.len(), 0);
    // Unknown: kept, up to the cap; those past it are counted as forgotten: a record
    // itself, a collector-lost record of this sink's own by what it counted, a line that
    // is neither not at all.
    let framed = |n: usize| {
        frame(
            format!("{{\"event\":{{\"sequence\":{n}}}}}").as_bytes(),
            "h",
            datetime!(2026-11-21 22:03:04 UTC),
        )
    };
    let earlier = lost_record(
        Lost {
            count: 3,
            first: 100,
            last: 102,
        },
        datetime!(2026-11-21 22:03:04 UTC),
    );
    u.push(
        frame(b"{}", "h", datetime!(2026-11-21 22:03:04 UTC)),
        usize::MAX,
    );
    u.push(
        frame(&earlier, "h", datetime!(2026-11-21 22:03:04 UTC)),
        usize::MAX,
    );
    for n in 1..(MAX_UNACKED + 4) {
        u.push(framed(n), usize::MAX);
    }
    assert_eq!(u.len(), MAX_UNACKED);
    let (again, forgotten) = u.take();
    assert_eq!(again.len(), MAX_UNACKED);
    assert_eq!(
        forgotten,
        Lost {
            count: 3 + 3,
            first: 1,
            last: 102
        }
    );
    assert_eq!(u.len(), 0);
    // Forgotten, then acknowledged after all: not lost.
    for n in 1..(MAX_UNACKED + 5) {
        u.push(framed(n), usize::MAX);
    }
    u.push(framed(0), 0);
    assert_eq!(u.take().1, Lost::default());
    // So too when the acknowledgement is seen with nothing more written.
    for n in 1..(MAX_UNACKED + 5) {
        u.push(framed(n), usize::MAX);
    }
    u.acknowledge(0);
    let (again, forgotten) = u.take();
    assert!(again.is_empty());
    assert_eq!(forgotten, Lost::default());
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
