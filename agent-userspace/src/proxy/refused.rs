//! Refusals made below the proxy's request handler, so that they are recorded too:
//! requests hyper's HTTP/1 parser refuses (it answers 400, 414 or 431 itself), HTTP/2
//! connection errors, HTTP/2 streams the HTTP/2 layer resets for breaking the protocol
//! (seen in the frames written to the client, [`H2Watch`]), and client aborts.

use std::error::Error as StdError;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

pub use crate::audit::CLIENT_ABORTED;

/// Prefix of the reason of every request the daemon cut short by closing its connection.
pub const CLOSED_BY_DAEMON: &str = "closed by the daemon (the sandbox was quarantined or \
     detached, its policy replaced, or the daemon stopped)";

/// The status hyper answered with and the reason to record, when a served connection
/// ended with an error that refused a request: an HTTP/1 parse error, or an HTTP/2
/// connection error the proxy's side detected. `None` for a client that went away, a
/// timeout, an I/O error or a clean end.
pub fn connection_refusal(error: &(dyn StdError + 'static)) -> Option<(Option<u16>, String)> {
    let mut source = Some(error);
    while let Some(e) = source {
        if let Some(h2) = e.downcast_ref::<h2::Error>() {
            let protocol_error = h2.is_go_away()
                && !h2.is_remote()
                && h2.reason().is_some_and(|r| r != h2::Reason::NO_ERROR);
            return protocol_error.then(|| {
                (
                    None,
                    format!(
                        "downstream client: HTTP/2 connection refused by the HTTP/2 layer: {h2}"
                    ),
                )
            });
        }
        if let Some(hyper) = e.downcast_ref::<hyper::Error>() {
            if hyper.is_parse() || hyper.is_parse_too_large() || hyper.is_parse_version_h2() {
                let text = hyper.to_string();
                let status = if hyper.is_parse_version_h2() {
                    None
                } else if hyper.is_parse_too_large() && text.contains("URI") {
                    Some(414)
                } else if hyper.is_parse_too_large() {
                    Some(431)
                } else {
                    Some(400)
                };
                return Some((
                    status,
                    format!("downstream client: HTTP/1 request refused by the parser: {text}"),
                ));
            }
            // Not a header timeout: hyper's also fires on an idle keep-alive connection,
            // which refused nothing.
        }
        source = e.source();
    }
    None
}

/// Whether an upstream request failed because the body the client was sending failed
/// (the client closed the connection or reset the stream mid-upload).
pub fn is_client_abort(error: &hyper::Error) -> bool {
    // HTTP/1 upstream: the body stream's own error, a downstream hyper error.
    if error.is_user() && error.source().is_some_and(|s| s.is::<hyper::Error>()) {
        return true;
    }
    // HTTP/2 upstream: hyper resets the stream itself when the body fails.
    let mut source = error.source();
    while let Some(e) = source {
        if let Some(h2) = e.downcast_ref::<h2::Error>() {
            return h2.is_reset()
                && !h2.is_remote()
                && !h2.is_library()
                && h2.reason() == Some(h2::Reason::INTERNAL_ERROR);
        }
        source = e.source();
    }
    false
}

/// An HTTP/2 stream the proxy's HTTP/2 layer reset for breaking the protocol.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamReset {
    pub stream: u32,
    pub code: u32,
}

impl StreamReset {
    /// The reason recorded.
    pub fn reason(&self) -> String {
        let (name, why) = match self.code {
            0x1 => ("PROTOCOL_ERROR", "a malformed request (pseudo-headers, header names or values, :protocol, content-length)"),
            0x3 => ("FLOW_CONTROL_ERROR", "flow control violated"),
            0x6 => ("FRAME_SIZE_ERROR", "a frame of an invalid size"),
            0x7 => ("REFUSED_STREAM", "too many concurrent streams"),
            0x9 => ("COMPRESSION_ERROR", "header compression state broken"),
            0xa => ("CONNECT_ERROR", "CONNECT failed"),
            0xb => ("ENHANCE_YOUR_CALM", "too many resets, headers or pings"),
            0xc => ("INADEQUATE_SECURITY", "inadequate TLS"),
            0xd => ("HTTP_1_1_REQUIRED", "HTTP/1.1 required"),
            _ => ("error", "unknown error code"),
        };
        format!(
            "downstream client: HTTP/2 stream {} refused by the HTTP/2 layer: {name} ({why})",
            self.stream
        )
    }

    /// Whether a reset with this code refuses the client's request. Not: NO_ERROR
    /// (response sent, request body unread), INTERNAL_ERROR (the response failed, which
    /// the request's own record says), STREAM_CLOSED (frames after such a reset) and
    /// CANCEL.
    fn is_refusal(code: u32) -> bool {
        !matches!(code, 0x0 | 0x2 | 0x5 | 0x8)
    }
}

/// Follows the HTTP/2 frames a server writes, reporting `RST_STREAM` frames that refuse a
/// request. The server writes whole frames from its first byte (no preface).
#[derive(Debug, Default)]
pub struct FrameScan {
    state: ScanState,
    buf: Vec<u8>,
}

#[derive(Debug, Default, Clone, Copy)]
enum ScanState {
    #[default]
    Header,
    Skip(usize),
    Reset {
        stream: u32,
        len: usize,
    },
}

impl FrameScan {
    /// Feeds bytes written; returns the refusing resets they complete.
    pub fn feed(&mut self, mut data: &[u8]) -> Vec<StreamReset> {
        let mut found = Vec::new();
        while !data.is_empty() {
            match self.state {
                ScanState::Header => {
                    let take = (9 - self.buf.len()).min(data.len());
                    self.buf.extend_from_slice(&data[..take]);
                    data = &data[take..];
                    if self.buf.len() == 9 {
                        let b = &self.buf;
                        let len =
                            usize::from(b[0]) << 16 | usize::from(b[1]) << 8 | usize::from(b[2]);
                        let stream = u32::from_be_bytes([b[5], b[6], b[7], b[8]]) & 0x7fff_ffff;
                        self.state = if b[3] == 0x3 && len == 4 {
                            ScanState::Reset { stream, len }
                        } else if len == 0 {
                            ScanState::Header
                        } else {
                            ScanState::Skip(len)
                        };
                        self.buf.clear();
                    }
                }
                ScanState::Skip(left) => {
                    let take = left.min(data.len());
                    data = &data[take..];
                    self.state = if take == left {
                        ScanState::Header
                    } else {
                        ScanState::Skip(left - take)
                    };
                }
                ScanState::Reset { stream, len } => {
                    let take = (len - self.buf.len()).min(data.len());
                    self.buf.extend_from_slice(&data[..take]);
                    data = &data[take..];
                    if self.buf.len() == len {
                        let b = &self.buf;
                        let code = u32::from_be_bytes([b[0], b[1], b[2], b[3]]);
                        if StreamReset::is_refusal(code) {
                            found.push(StreamReset { stream, code });
                        }
                        self.buf.clear();
                        self.state = ScanState::Header;
                    }
                }
            }
        }
        found
    }
}

/// A stream whose written bytes are HTTP/2 frames, each refusing reset reported to
/// `on_reset`.
pub struct H2Watch<S, F> {
    inner: S,
    scan: FrameScan,
    on_reset: F,
}

impl<S, F: Fn(StreamReset)> H2Watch<S, F> {
    pub fn new(inner: S, on_reset: F) -> Self {
        Self {
            inner,
            scan: FrameScan::default(),
            on_reset,
        }
    }
}

impl<S: AsyncRead + Unpin, F: Unpin> AsyncRead for H2Watch<S, F> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin, F: Fn(StreamReset) + Unpin> AsyncWrite for H2Watch<S, F> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let poll = Pin::new(&mut this.inner).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = &poll {
            for reset in this.scan.feed(&buf[..*n]) {
                (this.on_reset)(reset);
            }
        }
        poll
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(kind: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
        let len = payload.len();
        let mut v = vec![(len >> 16) as u8, (len >> 8) as u8, len as u8, kind, 0];
        v.extend_from_slice(&stream.to_be_bytes());
        v.extend_from_slice(payload);
        v
    }

    #[test]
    fn resets_are_found_across_writes() {
        let mut bytes = frame(0x4, 0, &[0; 12]); // SETTINGS
        bytes.extend(frame(0x1, 1, &[0x88; 30])); // HEADERS
        bytes.extend(frame(0x3, 1, &1u32.to_be_bytes())); // RST_STREAM PROTOCOL_ERROR
        bytes.extend(frame(0x0, 3, &[7; 100])); // DATA
        bytes.extend(frame(0x3, 3, &0u32.to_be_bytes())); // RST_STREAM NO_ERROR
        bytes.extend(frame(0x3, 5, &8u32.to_be_bytes())); // CANCEL
        bytes.extend(frame(0x3, 7, &7u32.to_be_bytes())); // REFUSED_STREAM
        bytes.extend(frame(0x7, 0, &[0; 8])); // GOAWAY
        let want = vec![
            StreamReset { stream: 1, code: 1 },
            StreamReset { stream: 7, code: 7 },
        ];
        for chunk in [1, 2, 5, 9, 13, bytes.len()] {
            let mut scan = FrameScan::default();
            let found: Vec<StreamReset> = bytes.chunks(chunk).flat_map(|c| scan.feed(c)).collect();
            assert_eq!(found, want, "chunks of {chunk}");
        }
        assert!(
            want[0].reason().contains("stream 1") && want[0].reason().contains("PROTOCOL_ERROR")
        );
    }
}
